import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cfr_core.cli import main
from cfr_core.data.eyecandies import FOCAL_LENGTH_PX, convert
from cfr_core.data.io import read_mask, read_rgb, read_xyz, sha256_file
from cfr_core.data.pointcloud import valid_mask
from cfr_core.data.validate import check_dataset
from cfr_core.errors import DataError

SIZE = 64
D_MIN, D_MAX = 0.9, 1.1
ANGLE = np.deg2rad(20)
POSE = np.array(
    [
        [np.cos(ANGLE), -np.sin(ANGLE), 0, 0.01],
        [np.sin(ANGLE), np.cos(ANGLE), 0, -0.02],
        [0, 0, 1, 0.3],
        [0, 0, 0, 1],
    ]
)


def _depth(rng, with_object=True):
    depth = np.full((SIZE, SIZE), 1.0)
    if with_object:
        rows, cols = np.mgrid[0:SIZE, 0:SIZE]
        blob = (rows - 30) ** 2 + (cols - 34) ** 2 < 12**2
        depth[blob] = 0.97 - 0.005 * rng.random(blob.sum())
    return np.round((depth - D_MIN) / (D_MAX - D_MIN) * 65535).astype(np.uint16)


def _write_sample(folder, idx, rng, mask=None):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(6):
        img = np.full((SIZE, SIZE, 3), 20 * k, np.uint8)
        img[..., 0] = k  # tells which light this is
        Image.fromarray(img).save(folder / f"{idx}_image_{k}.png")
    Image.fromarray(_depth(rng)).save(folder / f"{idx}_depth.png")
    (folder / f"{idx}_info_depth.yaml").write_text(
        f"normalization:\n  min: {D_MIN}\n  max: {D_MAX}\n"
    )
    np.savetxt(folder / f"{idx}_pose.txt", POSE)
    if mask is not None:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(folder / f"{idx}_mask.png")


@pytest.fixture
def eyecandies_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "eyecandies"
    cls = root / "GummyBear"
    for i in range(2):
        _write_sample(cls / "train" / "data", f"{i:03d}", rng)
    _write_sample(cls / "val" / "data", "000", rng)
    _write_sample(cls / "test_public" / "data", "000", rng, mask=np.zeros((SIZE, SIZE), bool))
    defect = np.zeros((SIZE, SIZE), bool)
    defect[28:33, 30:36] = True
    _write_sample(cls / "test_public" / "data", "001", rng, mask=defect)
    _write_sample(cls / "test_private" / "data", "000", rng)
    return root


def test_convert_layout_rgb_and_geometry(eyecandies_root, tmp_path):
    before = {p: sha256_file(p) for p in eyecandies_root.rglob("*") if p.is_file()}
    out = convert(eyecandies_root, tmp_path / "mvtec")
    assert {p: sha256_file(p) for p in eyecandies_root.rglob("*") if p.is_file()} == before
    cat = out / "GummyBear"
    assert sorted(p.name for p in (cat / "train" / "good" / "rgb").iterdir()) == [
        "000.png",
        "001.png",
    ]
    assert (cat / "validation" / "good" / "xyz" / "000.tiff").exists()
    assert (cat / "test" / "good" / "gt" / "000.png").exists()
    assert read_mask(cat / "test" / "bad" / "gt" / "001.png").sum() == 30
    assert not (out / "GummyBear" / "test_private").exists()
    assert read_rgb(cat / "train" / "good" / "rgb" / "000.png")[0, 0, 0] == 4  # image_4

    xyz = read_xyz(cat / "train" / "good" / "xyz" / "000.tiff")
    raw = np.asarray(Image.open(eyecandies_root / "GummyBear/train/data/000_depth.png")).astype(
        float
    )
    depth = D_MIN + raw / 65535 * (D_MAX - D_MIN)
    r, c = 30, 34  # centre of the part
    cam = np.array(
        [
            (c - (SIZE - 1) / 2) * depth[r, c] / FOCAL_LENGTH_PX,
            (r - (SIZE - 1) / 2) * depth[r, c] / FOCAL_LENGTH_PX,
            depth[r, c],
        ]
    )
    assert np.allclose(xyz[r, c], POSE[:3, :3] @ cam + POSE[:3, 3], atol=1e-6)
    valid = valid_mask(xyz)
    assert not valid[0, 0] and not valid[-1, -1]  # background plane removed
    assert 300 < valid.sum() < 460  # the part (a disc of radius 12 px) is kept
    reports = check_dataset(out)
    assert reports[0].n_errors == 0 and reports[0].defect_types == ["bad"]


def test_bad_inputs_are_named(eyecandies_root, tmp_path):
    (eyecandies_root / "GummyBear/train/data/001_info_depth.yaml").unlink()
    with pytest.raises(
        DataError, match=r"001_info_depth\.yaml: depth normalisation file is missing"
    ):
        convert(eyecandies_root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    (eyecandies_root / "GummyBear/train/data/001_info_depth.yaml").write_text("normalization: 3\n")
    with pytest.raises(DataError, match="expected 'normalization"):
        convert(eyecandies_root, tmp_path / "out")
    with pytest.raises(DataError, match="inside the source"):
        convert(eyecandies_root, eyecandies_root / "converted")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no Eyecandies classes"):
        convert(empty, tmp_path / "x")


def test_cli_convert(eyecandies_root, tmp_path):
    result = CliRunner().invoke(
        main, ["data", "convert-eyecandies", str(eyecandies_root), str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(
        main, ["data", "convert-eyecandies", str(eyecandies_root), str(tmp_path / "o")]
    )
    assert again.exit_code == 2 and "not empty" in again.output
