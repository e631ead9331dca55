"""The quality gate's library check (cfr_core.engine.gate) on real synthetic scans."""

from dataclasses import replace

import pytest
import torch

from cfr_core.config import ExtractorConfig, FitConfig
from cfr_core.data.mvtec import index_category
from cfr_core.engine import FeatureCache, build_extractors, extract_features, fit
from cfr_core.engine.fit import attach_library_gate, library_samples
from cfr_core.engine.gate import (
    GATE_STRIDE,
    MODALITIES,
    build_library_gate,
    gate_decision,
    novelty_peaks,
)
from cfr_core.errors import DataError
from cfr_core.io import ArtifactError, load_model, save_model

GRID = 32
EXTRACTORS = ExtractorConfig(grid=GRID)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return FeatureCache(tmp_path_factory.mktemp("gate-features"))


@pytest.fixture(scope="module")
def dome(synth_root, cache):
    """Features of dome's library (train + validation), its test scans and a ribbed part."""
    ex = build_extractors(EXTRACTORS)
    pre = FitConfig().preprocess
    library = library_samples(synth_root, "dome")
    test = index_category(synth_root, "dome").split("test")
    ribbed = index_category(synth_root, "ribbed").split("test")[:1]
    return {
        "library": extract_features(library, ex, pre, cache),
        "test": extract_features(test, ex, pre, cache),
        "labels": [s.label for s in test],
        "ribbed": extract_features(ribbed, ex, pre, cache),
    }


def test_limits_are_the_leave_one_out_maximum_and_library_scans_pass(dome):
    lib = dome["library"]
    gate = build_library_gate(lib, margin=0.1)
    assert gate.scans == lib.keys and len(gate.loo_peaks["rgb"]) == len(lib)
    for m in MODALITIES:
        assert gate.limits[m] == pytest.approx(max(gate.loo_peaks[m]) * 1.1)
        # the bank holds every GATE_STRIDE-th foreground pixel of every library scan
        fg = lib.foreground[:, ::GATE_STRIDE, ::GATE_STRIDE].sum()
        assert gate.banks[m].shape[0] == int(fg)
    # a scan that is in the bank finds itself: far below the leave-one-out limit
    for peaks in novelty_peaks(gate, lib):
        assert all(peaks[m] < 0.5 * gate.limits[m] for m in MODALITIES)


def test_a_wrong_part_and_an_unseen_local_appearance_are_stopped(dome):
    gate = build_library_gate(dome["library"], margin=0.1)
    wrong = novelty_peaks(gate, dome["ribbed"])[0]
    assert wrong["rgb"] > gate.limits["rgb"] and wrong["points"] > gate.limits["points"]
    # a good dome part with a patch of appearance no library scan shows (RGB only)
    good = dome["test"].select([dome["labels"].index(0)])
    before = novelty_peaks(gate, good)[0]
    patched = replace(good, rgb=good.rgb.clone())
    fg = good.foreground[0]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    cy, cx = int(ys.float().median()), int(xs.float().median())
    spread = good.rgb[0][:, fg].std(dim=1)
    patch = (slice(cy - 4, cy + 4), slice(cx - 4, cx + 4))
    patched.rgb[0][:, patch[0], patch[1]] = (-6 * spread)[:, None, None]
    after = novelty_peaks(gate, patched)[0]
    assert after["rgb"] > gate.limits["rgb"] > before["rgb"] * 0.5
    assert after["points"] == pytest.approx(before["points"])  # the geometry is unchanged


def test_the_library_check_needs_two_scans_and_foreground(dome):
    lib = dome["library"]
    with pytest.raises(ValueError, match="at least 2 good scans"):
        build_library_gate(lib.select([0]), margin=0.1)
    empty = replace(lib.select([0, 1]), points=lib.points[:2].clone())
    empty.points[1].zero_()
    with pytest.raises(DataError, match="no foreground pixel"):
        build_library_gate(empty, margin=0.1)


@pytest.fixture(scope="module")
def fitted(synth_root, cache):
    cfg = FitConfig.for_method("cfr-bank", shots=2, extractors=EXTRACTORS)
    cfg = replace(
        cfg, mappers=replace(cfg.mappers, epochs=3), retriever=replace(cfg.retriever, epochs=3)
    )
    return fit(synth_root, "dome", cfg, cache)


def test_fit_builds_the_check_on_train_and_validation_and_saves_it(fitted, dome, tmp_path):
    gate = fitted.library_gate
    assert gate is not None and gate.scans == dome["library"].keys
    assert gate.margin == fitted.config.scoring.library_gate_margin
    save_model(fitted, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.library_gate.limits == gate.limits
    assert novelty_peaks(loaded.library_gate, dome["test"]) == novelty_peaks(gate, dome["test"])
    # gate tensors whose description was removed from model.json: refused, not ignored
    import json

    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    del meta["library_gate"]
    from cfr_core.io.artifacts import model_from_parts

    with pytest.raises(ValueError, match="gate tensors without library_gate"):
        model_from_parts(meta, fitted.tensors())


def test_decision_names_the_failed_checks(fitted, dome):
    decision = gate_decision(fitted, 0.0, dome["ribbed"])
    assert not decision.passed and decision.ratio > 1
    assert decision.failed()[:2] == ["RGB novelty", "3D novelty"]
    assert decision.describe().startswith("RGB novelty")
    assert "model score 0.000 <= " in decision.describe()
    high = gate_decision(fitted, fitted.gate_threshold * 2, dome["library"].select([0]))
    assert high.failed() == ["model score"]
    # without a library check (a one-scan library) the gate is the model's score alone
    note = attach_library_gate(fitted_copy := replace(fitted), dome["library"].select([0]))
    assert fitted_copy.library_gate is None and "needs 2" in note
    alone = gate_decision(fitted_copy, 0.0, dome["ribbed"])
    assert list(alone.checks) == ["model score"] and alone.passed


def test_stored_gate_from_other_code_is_refused(fitted, tmp_path):
    save_model(fitted, tmp_path / "m")
    import json

    from cfr_core.io.artifacts import model_from_parts

    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["library_gate"]["stride"] = 4
    with pytest.raises(ValueError, match="another stride or blur"):
        model_from_parts(meta, fitted.tensors())
    meta["library_gate"]["stride"] = GATE_STRIDE
    meta["library_gate"]["limits"]["rgb"] = float("nan")
    with pytest.raises(ValueError, match="finite and positive"):
        model_from_parts(meta, fitted.tensors())
    with pytest.raises(ArtifactError):  # the manifest catches a hand-edited model.json
        (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
        load_model(tmp_path / "m")


def test_a_stopped_scan_shows_the_map_of_the_check_that_stopped_it(fitted, synth_root):
    from cfr_core.engine.gate import gate_heatmap, novelty_maps
    from cfr_core.engine.score import score_arrays

    wrong = index_category(synth_root, "ribbed").split("test")[0]
    scored = score_arrays(
        fitted, build_extractors(EXTRACTORS), wrong.load_rgb(), wrong.load_xyz(), "ribbed"
    )
    decision = gate_decision(fitted, scored.score, scored.features)
    picture, caption = gate_heatmap(decision, scored)
    # the novelty map says where the part is unlike the library (the anomaly map need not)
    assert "RGB novelty" in decision.failed() and caption.startswith("RGB novelty")
    assert picture.shape == (GRID, GRID, 3)
    maps = novelty_maps(fitted.library_gate, scored.features)
    assert float(maps["rgb"].max()) == decision.checks["RGB novelty"][0]
    assert maps["rgb"].shape == scored.features.foreground[0].shape
    # a scan that passes every library check but not the model score: the model's map
    only_score = gate_decision(fitted, fitted.gate_threshold * 2, scored.features)
    only_score.checks = {"model score": only_score.checks["model score"]}
    assert gate_heatmap(only_score, scored)[1] == "model anomaly map"
