from pathlib import Path

import numpy as np
import pytest

from cfr_core.data.io import (
    atomic_folder,
    atomic_path,
    read_mask,
    read_rgb,
    read_xyz,
    sha256_file,
    write_mask,
    write_rgb,
    write_xyz,
)
from cfr_core.errors import DataError


def test_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    xyz = rng.normal(size=(30, 40, 3)).astype(np.float32)
    mask = rng.random((30, 40)) > 0.7
    write_rgb(tmp_path / "a.png", rgb)
    write_xyz(tmp_path / "a.tiff", xyz)
    write_mask(tmp_path / "m.png", mask)
    assert np.array_equal(read_rgb(tmp_path / "a.png"), rgb)
    back = read_xyz(tmp_path / "a.tiff")
    assert back.dtype == np.float32 and np.array_equal(back, xyz)
    assert np.array_equal(read_mask(tmp_path / "m.png"), mask)


def test_mask_class_ids_are_binarised(tmp_path):
    ids = np.zeros((8, 8), dtype=np.uint8)
    ids[2:4, 2:4] = 3  # MVTec GT PNGs hold class ids, not 255
    write_rgb(tmp_path / "ids.png", np.stack([ids] * 3, axis=-1))
    assert read_mask(tmp_path / "ids.png").sum() == 4


def test_truncated_tiff_is_a_clear_error(tmp_path):
    path = tmp_path / "x.tiff"
    write_xyz(path, np.ones((50, 50, 3), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError) as info:
        read_xyz(path)
    assert info.value.path == path and "does not decode" in str(info.value)


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.ones((10, 10), np.float32), "expected H×W×3"),
        (np.ones((10, 10, 3), np.uint16), "dtype"),
    ],
)
def test_wrong_cloud_shape_or_dtype(tmp_path, array, reason):
    import tifffile

    path = tmp_path / "x.tiff"
    tifffile.imwrite(path, array)
    with pytest.raises(DataError, match=reason):
        read_xyz(path)


def test_missing_empty_and_corrupt_png(tmp_path):
    with pytest.raises(DataError, match="missing"):
        read_rgb(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_rgb(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="does not decode"):
        read_rgb(tmp_path / "junk.png")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_folder_refuses_nonempty_and_cleans_up(tmp_path):
    out = tmp_path / "tree"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"), atomic_folder(out):
        pass
    with pytest.raises(ValueError), atomic_folder(out, overwrite=True) as tmp:
        (tmp / "partial").write_text("x")
        raise ValueError("fail mid-way")
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_sha256_file(tmp_path):
    p = Path(tmp_path / "f")
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_written_files_get_normal_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_rgb(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
        with atomic_folder(tmp_path / "tree") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "tree").stat().st_mode & 0o777 == 0o755
