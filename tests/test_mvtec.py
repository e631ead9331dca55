import shutil

import numpy as np
import pytest

from cfr_core.data.mvtec import index_category, is_safe_name, list_categories
from cfr_core.errors import DatasetLayoutError, EmptyCategoryError, ShapeMismatchError


def test_index_discovers_splits_and_defects(synth_root):
    assert list_categories(synth_root) == ["candy", "dome", "ribbed", "speckled"]
    idx = index_category(synth_root, "ribbed")
    assert not idx.issues
    assert len(idx.split("train")) == 4 and len(idx.split("validation")) == 1
    assert idx.defect_types == ["crack", "dent", "mismatch", "stain"]
    test = idx.split("test")
    assert {s.label for s in test} == {0, 1}
    assert all(s.gt_path is not None for s in test)


def test_non_square_sample_loads_aligned(synth_root):
    sample = index_category(synth_root, "ribbed").split("test")[-1]
    rgb, xyz, mask = sample.load()
    assert rgb.shape == (72, 96, 3) and xyz.shape == (72, 96, 3) and mask.shape == (72, 96)
    assert rgb.dtype == np.uint8 and xyz.dtype == np.float32 and mask.dtype == bool


def test_orphans_unsafe_names_and_missing_masks_are_reported(synth_copy):
    good = synth_copy / "dome" / "train" / "good"
    (good / "xyz" / "001.tiff").unlink()
    shutil.copy(good / "rgb" / "002.png", good / "rgb" / "bad name!.png")
    crack = synth_copy / "dome" / "test" / "crack"
    (crack / "gt" / "000.png").unlink()
    (synth_copy / "dome" / "train" / "scratch").mkdir()
    idx = index_category(synth_copy, "dome")
    reasons = {(p.path.name, p.reason.split(" (")[0]) for p in idx.issues}
    assert ("001.png", "RGB image has no point cloud") in reasons
    assert ("bad name!.png", "unsafe file name") in reasons
    assert ("000.png", "defect sample has no mask") in reasons
    assert any(p.path.name == "scratch" for p in idx.issues)
    assert len(idx.split("train")) == 3  # the orphan is not silently used
    assert "crack" not in idx.defect_types  # its only sample has no mask


def test_size_mismatch_raises_on_load(synth_copy):
    from cfr_core.data.io import write_xyz

    sample = index_category(synth_copy, "candy").split("train")[0]
    write_xyz(sample.xyz_path, np.ones((50, 60, 3), np.float32))
    with pytest.raises(ShapeMismatchError, match="RGB is 96×96 but point cloud is 60×50"):
        sample.load()


def test_missing_category_and_empty_train(synth_copy, tmp_path):
    with pytest.raises(DatasetLayoutError, match="available: candy, dome"):
        index_category(synth_copy, "bagel")
    shutil.rmtree(synth_copy / "dome" / "train")
    with pytest.raises(EmptyCategoryError):
        index_category(synth_copy, "dome").require_train()
    with pytest.raises(DatasetLayoutError, match="no category folders"):
        list_categories(tmp_path / "data" / "dome" / "test" / "good")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("000", True),
        ("cable_gland", True),
        ("a b", False),
        (".hidden", False),
        ("x/../y", False),
        ("ü", False),
    ],
)
def test_safe_names(name, ok):
    assert is_safe_name(name) is ok
