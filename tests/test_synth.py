import json

import numpy as np
import pytest
from scipy import ndimage

from cfr_core.data.io import sha256_file
from cfr_core.data.mvtec import index_category
from cfr_core.data.pointcloud import valid_mask
from cfr_core.data.synth import DEFECTS, SynthConfig, generate, render_sample
from cfr_core.errors import ConfigError, DataError


def _hashes(root):
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic_per_seed(synth_root, small_config, tmp_path):
    again = generate(tmp_path / "again", small_config)
    assert _hashes(again) == _hashes(synth_root)
    other = generate(
        tmp_path / "other",
        SynthConfig(
            categories=("dome",),
            seed=8,
            size=96,
            n_train=1,
            n_validation=0,
            n_test_good=1,
            n_test_per_defect=1,
        ),
    )
    assert (
        _hashes(other)["dome/train/good/rgb/000.png"]
        != _hashes(synth_root)["dome/train/good/rgb/000.png"]
    )


def test_layout_manifest_and_scene(synth_root, small_config):
    manifest = json.loads((synth_root / "synth.json").read_text())
    assert manifest["categories"]["ribbed"]["defects"]["mismatch"] == "crossmodal"
    for cat in small_config.categories:
        idx = index_category(synth_root, cat)
        assert idx.defect_types == sorted(DEFECTS[cat]) and not idx.issues
        _, xyz, mask = idx.split("test")[-1].load()
        valid = valid_mask(xyz)
        assert 0.5 < valid.mean() < 0.995  # sensor dropouts exist, most points measured
        z = xyz[..., 2][valid]
        assert 0.45 < z.min() and z.max() < 0.65  # metres from the sensor
        assert mask.any() and (mask & valid).any()


@pytest.mark.parametrize("category", list(DEFECTS))
def test_defect_modalities_against_the_good_twin(category):
    """A defect sample is its good twin plus the defect, in the promised modality only."""
    for defect in DEFECTS[category]:
        bad = render_sample(category, defect, 3, "test", 1, 128)
        twin = render_sample(category, defect, 3, "test", 1, 128, apply_defect=False)
        near = ndimage.binary_dilation(bad.mask, iterations=2)
        both = valid_mask(bad.xyz) & valid_mask(twin.xyz)
        dz = np.abs(bad.xyz - twin.xyz).max(axis=2)
        drgb = np.abs(bad.rgb.astype(int) - twin.rgb).max(axis=2)
        assert bad.mask.sum() > 20
        if defect in ("stain", "mismatch", "bare", "ghost"):  # colour only
            assert np.array_equal(bad.xyz, twin.xyz)
            assert drgb[bad.mask].mean() > 40 and not drgb[~near].any()
        if defect == "dent":  # geometry only
            assert np.array_equal(bad.rgb, twin.rgb)
            assert dz[bad.mask & both].max() > 0.002 and dz[~near & both].max() < 0.0005
        if defect == "crack":  # both
            assert dz[bad.mask & both].max() > 0.002 and drgb[bad.mask].mean() > 40
            assert dz[~near & both].max() < 0.0005 and drgb[~near].max() < 16


def test_one_to_many_categories_vary_as_designed():
    colours = {render_sample("candy", "good", 0, "train", i, 64).info["colour"] for i in range(8)}
    assert len(colours) >= 3  # the same shape in several colours
    chips = [render_sample("speckled", "good", 0, "train", i, 96).rgb for i in range(2)]
    dark = [(c.astype(int).sum(axis=2) < 200) for c in chips]
    assert (dark[0] ^ dark[1]).sum() > 50  # chips sit elsewhere on every part
    ribs = [
        render_sample("ribbed", "good", 0, "train", i, 96).info["rib_centres"] for i in range(3)
    ]
    assert len({round(r[0], 4) for r in ribs}) == 3
    finishes = {render_sample("knob", "good", 0, "train", i, 64).info["finish"] for i in range(8)}
    assert finishes == {"anodised", "turned", "rubber"}
    pairs = {render_sample("capsule", "good", 0, "train", i, 64).info["colours"] for i in range(8)}
    assert len(pairs) == 3
    phases = {
        tuple(render_sample("checker", "good", 0, "train", i, 64).info["phase"]) for i in range(3)
    }
    assert len(phases) == 3  # the print sits elsewhere on every tile


def test_kinds_and_the_development_report_split():
    from cfr_core.data.synth import DEV_CATEGORIES, KINDS, REPORT_CATEGORIES

    assert set(DEV_CATEGORIES).isdisjoint(REPORT_CATEGORIES)
    assert set(DEV_CATEGORIES) | set(REPORT_CATEGORIES) == set(KINDS) == set(DEFECTS)
    for split in (DEV_CATEGORIES, REPORT_CATEGORIES):  # every kind of ambiguity on both sides
        assert {"across", "within", "crossmodal"} <= {KINDS[c] for c in split}


def test_studs_carry_their_paint_and_the_crossmodal_defects_break_exactly_that():
    good = render_sample("studded", "good", 0, "test", 0, 128)
    red = (good.rgb[..., 0].astype(int) - good.rgb[..., 1]) > 60
    studs = good.info["studs"]
    assert 4 <= len(studs) <= 7 and red.sum() > 20 * len(studs)
    bare = render_sample("studded", "bare", 0, "test", 0, 128)
    ghost = render_sample("studded", "ghost", 0, "test", 0, 128)
    red_bare = (bare.rgb[..., 0].astype(int) - bare.rgb[..., 1]) > 60
    red_ghost = (ghost.rgb[..., 0].astype(int) - ghost.rgb[..., 1]) > 60
    twin_bare = render_sample("studded", "bare", 0, "test", 0, 128, apply_defect=False)
    twin_red = (twin_bare.rgb[..., 0].astype(int) - twin_bare.rgb[..., 1]) > 60
    assert red_bare.sum() < twin_red.sum() and not red_bare[bare.mask].any()  # paint gone
    assert red_ghost[ghost.mask].mean() > 0.5  # paint where no stud stands


def test_bad_config_and_existing_output(synth_root, small_config):
    with pytest.raises(ConfigError, match="unknown synthetic categories"):
        SynthConfig(categories=("bagel",))
    with pytest.raises(ConfigError, match="size"):
        SynthConfig(size=10)
    with pytest.raises(DataError, match="not empty"):
        generate(synth_root, small_config)
