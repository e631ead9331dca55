"""The quality gate's library check (cfr_core.engine.gate) on real synthetic scans."""

import math
from dataclasses import replace

import pytest
import torch

from cfr_core.config import ExtractorConfig, FitConfig
from cfr_core.data.mvtec import index_category
from cfr_core.engine import FeatureCache, build_extractors, extract_features, fit
from cfr_core.engine.fit import attach_library_gate, library_samples
from cfr_core.engine.gate import (
    FOREGROUND_CHECK,
    GATE_STRIDE,
    MODALITIES,
    GateDecision,
    NoLibraryCheck,
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
    # a copy with other banks searches those banks
    flipped = replace(gate, banks={m: -b for m, b in gate.banks.items()})
    assert novelty_peaks(flipped, lib.select([0]))[0]["rgb"] > gate.limits["rgb"]


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
    with pytest.raises(NoLibraryCheck, match="at least 2 different good scans"):
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
    assert "model score 0 <= " in decision.describe()
    assert decision.checks[FOREGROUND_CHECK] == (0.0, 0.5)  # a whole part: nothing missing
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
    with pytest.raises(ValueError, match="finite number"):
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


def test_a_hand_edited_gate_cannot_pass_every_scan(fitted):
    """Limits that no novelty reaches, limits that disagree with their leave-one-out
    peaks, non-numbers and malformed tensors are refused when the model is read."""
    import json

    from cfr_core.io.artifacts import model_from_parts, model_metadata

    meta = json.loads(json.dumps(model_metadata(fitted)))
    gate_meta = meta["library_gate"]
    good = model_from_parts(meta, fitted.tensors()).library_gate
    assert good.limits == fitted.library_gate.limits

    def refused(match, limits=None, tensors=None, **changes):
        edited = {**meta, "library_gate": {**gate_meta, **changes}}
        if limits is not None:
            edited["library_gate"]["limits"] = {**gate_meta["limits"], **limits}
        with pytest.raises(ValueError, match=match):
            model_from_parts(edited, {**fitted.tensors(), **(tensors or {})})

    refused(r"must be in \(0, 2\]", limits={"rgb": 1e9})
    refused("finite number", limits={"rgb": "0.5"})
    refused("finite number", limits={"points": True})
    refused("leave-one-out peaks", limits={"rgb": gate_meta["limits"]["rgb"] * 3})
    refused("leave-one-out peaks", margin=gate_meta["margin"] + 1)
    refused("nothing else", limits={"sparkle": 0.1})
    refused(
        "needs limits and leave-one-out peaks",
        limits={"sparkle": 0.1},
        loo_peaks={**gate_meta["loo_peaks"], "sparkle": [0.1] * len(gate_meta["scans"])},
    )
    refused("leave-one-out peaks", limits={"pairing": gate_meta["limits"]["pairing"] / 2})
    refused("must be a list of numbers", loo_peaks={**gate_meta["loo_peaks"], "pairing": 0.1})
    refused("positive integer", min_foreground=0)
    refused("at least 2 scan keys", scans="abc")
    bank, stats = fitted.tensors()["gate.rgb"], fitted.tensors()["gate.rgb_stats"]
    refused("features are", tensors={"gate.rgb": bank[:, 1:]})
    refused("non-empty 2-D float", tensors={"gate.rgb": bank[:0]})
    refused("non-empty 2-D float", tensors={"gate.rgb": bank.flatten()})
    refused("features are", tensors={"gate.rgb_stats": stats[:, 1:]})
    refused("one library pixel of both modalities", tensors={"gate.rgb": bank[:-3]})
    without = {k: v for k, v in fitted.tensors().items() if k != "gate.points"}
    with pytest.raises(ValueError, match=r"without its tensors \['gate.points'\]"):
        model_from_parts(meta, without)
    refused("non-finite", tensors={"gate.rgb": torch.full_like(bank, float("nan"))})
    refused("standard deviation", tensors={"gate.rgb_stats": stats * torch.tensor([[1.0], [0.0]])})


def test_a_check_that_is_not_a_number_fails_and_says_so():
    decision = GateDecision({"model score": (1.0, 2.0), "RGB novelty": (float("nan"), 0.068)})
    assert not decision.passed and decision.failed() == ["RGB novelty"]
    assert decision.ratio == float("inf")
    # a limit of 0 (a score threshold at 0): no division by zero, a value above it fails
    zero = GateDecision({"model score": (0.5, 0.0), "RGB novelty": (0.01, 0.068)})
    assert zero.failed() == ["model score"] and zero.ratio == float("inf")
    assert decision.describe() == "RGB novelty nan > 0.068, model score 1 <= 2"


def test_a_model_without_a_threshold_cannot_gate(fitted, dome):
    uncalibrated = replace(fitted, threshold=None, gate_threshold=None, library_gate=None)
    with pytest.raises(DataError, match="no threshold to gate"):
        gate_decision(uncalibrated, 0.0, dome["ribbed"])


def test_the_same_scan_twice_counts_once(dome):
    """Duplicates (the same files under two names) would find their twin in leave-one-out
    and pull the limit down; they are counted once, and a library of one scan under two
    names has no check (the fit goes on with the model's score alone)."""
    lib = dome["library"]
    once = build_library_gate(lib, margin=0.1)
    doubled = lib.select(list(range(len(lib))) + [0, 1])
    doubled = replace(doubled, keys=lib.keys + ["copy/0", "copy/1"])
    twice = build_library_gate(doubled, margin=0.1)
    assert twice.limits == once.limits and twice.scans == lib.keys
    same = replace(lib.select([0, 0]), keys=["a", "b"])
    with pytest.raises(NoLibraryCheck, match="2 different"):
        build_library_gate(same, margin=0.1)
    bad = replace(lib.select([0, 1]), rgb=lib.rgb[:2].clone())
    bad.rgb[1, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match=f"{lib.keys[1]} has non-finite features"):
        build_library_gate(bad, margin=0.1)


def test_a_scan_with_a_sliver_of_foreground_is_stopped(fitted, dome):
    """Blurring averages novelty with the empty background, so a few odd pixels alone
    would look familiar: the foreground check stops a scan that lost most of its part."""
    good = dome["test"].select([dome["labels"].index(0)])
    assert gate_decision(fitted, 0.0, good).passed
    sliver = replace(good, points=good.points.clone(), rgb=good.rgb.clone())
    fg = good.foreground[0]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    keep = torch.zeros_like(fg)
    keep[ys[0] : ys[0] + 4, xs[0] : xs[0] + 4] = True
    sliver.points[0][:, ~keep] = 0
    sliver.rgb[0][:, keep] = 6.0  # and what is left is unlike any good pixel
    decision = gate_decision(fitted, 0.0, sliver)
    assert FOREGROUND_CHECK in decision.failed()
    assert decision.checks[FOREGROUND_CHECK][0] > 0.9


def test_a_pairing_no_good_scan_shows_is_stopped_though_each_modality_looks_good(dome):
    """Move real 3D features of the part's rim to its middle, where the colour image stays
    as it was: each modality alone is still like some good pixel, only the pair is new."""
    from cfr_core.engine.gate import CHECKS, LABELS, PAIRING

    gate = build_library_gate(dome["library"], margin=0.1)
    assert gate.checks == CHECKS and LABELS[PAIRING] == "RGB-3D pairing novelty"
    good = dome["test"].select([dome["labels"].index(0)])
    before = novelty_peaks(gate, good)[0]
    assert all(before[c] <= gate.limits[c] for c in CHECKS)
    fg = good.foreground[0]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    cy, cx = int(ys.float().median()), int(xs.float().median())
    top = int(ys.min())  # the rim of the part, above its middle
    swapped = replace(good, points=good.points.clone())
    rim = good.points[0][:, top + 1 : top + 2, cx - 4 : cx + 4]  # one row of real rim pixels
    swapped.points[0][:, cy - 4 : cy + 4, cx - 4 : cx + 4] = rim.expand(-1, 8, -1)
    after = novelty_peaks(gate, swapped)[0]
    assert after["rgb"] == pytest.approx(before["rgb"])  # the colour image is unchanged
    assert after["points"] <= gate.limits["points"]  # rim geometry: seen on every good part
    assert after[PAIRING] > gate.limits[PAIRING]  # ... but never under the part's middle


def test_a_model_saved_before_the_pairing_check_keeps_its_two_checks(fitted, dome):
    """Models registered before the pairing check existed still load and gate (RGB and 3D);
    the summary says a refit adds the third check."""
    import json

    from cfr_core.engine.gate import PAIRING, gate_summary
    from cfr_core.io.artifacts import model_from_parts, model_metadata

    meta = json.loads(json.dumps(model_metadata(fitted)))
    for key in ("limits", "loo_peaks"):
        del meta["library_gate"][key][PAIRING]
    older = model_from_parts(meta, fitted.tensors())
    assert older.library_gate.checks == (*MODALITIES, "colour", "shape")
    assert "refit to add it" in gate_summary(older)
    decision = gate_decision(older, 0.0, dome["ribbed"])
    assert "RGB-3D pairing novelty" not in decision.checks
    assert {"RGB novelty", "3D novelty"} <= set(decision.failed())
    assert "RGB-3D pairing novelty <= " in gate_summary(fitted)


def test_a_large_library_keeps_its_most_varied_scans(fitted, dome):
    """Above ``max_scans`` the check keeps the scans least like the others: near-copies of a
    kept scan (its features with a trace of noise, so not exact twins) are left out, the
    summary says how many were kept of how many, and that survives save and load."""
    import json

    from cfr_core.config import ScoringConfig
    from cfr_core.engine.gate import gate_summary
    from cfr_core.errors import ConfigError
    from cfr_core.io.artifacts import model_from_parts, model_metadata

    lib = dome["library"]
    n = len(lib)
    near = lib.select([0, 0, 0])
    gen = torch.Generator().manual_seed(3)

    def trace(x):  # noise at 1 % of each channel's spread, on the part only
        scale = x.std(dim=(0, 2, 3), keepdim=True)
        on_part = lib.foreground[:1, None].to(x.dtype)
        return x + 0.01 * scale * on_part * torch.randn(x.shape, generator=gen)

    near = replace(near, keys=["near/0", "near/1", "near/2"], rgb=trace(near.rgb))
    near = replace(near, points=trace(near.points))
    grown = replace(
        lib.select(list(range(n)) + [0, 0, 0]),
        keys=lib.keys + near.keys,
        rgb=torch.cat([lib.rgb, near.rgb]),
        points=torch.cat([lib.points, near.points]),
    )
    whole = build_library_gate(lib, margin=0.1)
    cut = build_library_gate(grown, margin=0.1, max_scans=n)
    assert cut.scans == lib.keys and cut.library_size == n + 3
    assert cut.limits == pytest.approx(whole.limits)
    assert build_library_gate(lib, margin=0.1, max_scans=n).limits == whole.limits
    assert build_library_gate(lib, margin=0.1, max_scans=4).scans[0] == lib.keys[0]
    assert len(build_library_gate(lib, margin=0.1, max_scans=4).scans) == 4
    model = replace(fitted, library_gate=cut)
    assert f"the {n} most varied of {n + 3} good scans" in gate_summary(model)
    meta = json.loads(json.dumps(model_metadata(model)))
    assert model_from_parts(meta, model.tensors()).library_gate.library_size == n + 3
    meta["library_gate"]["library_size"] = n - 1
    with pytest.raises(ValueError, match="library_size must be an integer >="):
        model_from_parts(meta, model.tensors())
    for bad in (1, True, 2.5):
        with pytest.raises(ConfigError, match="library_gate_scans"):
            ScoringConfig(library_gate_scans=bad)


def test_a_library_scan_the_check_cannot_sample_is_named_and_small_scans_set_the_floor(dome):
    """A library scan whose few foreground pixels all fall between the check's sampled rows
    is refused by name (not an empty search deep in torch, cut or not); the foreground
    floor is the library's smallest scan even when the cut leaves it out."""
    lib = dome["library"]
    n = len(lib)
    odd = replace(lib, points=lib.points.clone())
    ys, xs = torch.nonzero(lib.foreground[0], as_tuple=True)
    y, x = [int(v) | 1 for v in (ys.float().median(), xs.float().median())]  # odd row, column
    keep = odd.points[0][:, y, x].clone()
    odd.points[0].zero_()
    odd.points[0][:, y, x] = keep
    for cap in (None, 2):
        with pytest.raises(DataError, match=f"{lib.keys[0]} has no foreground pixel where"):
            build_library_gate(odd, margin=0.1, max_scans=cap)
    # a small but sampled scan: the cut drops it, the floor stays its size
    small = replace(lib, points=lib.points.clone())
    fg = lib.foreground[n - 1]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    box = torch.zeros_like(fg)
    box[ys.min() : ys.min() + 6, :] = True
    small.points[n - 1][:, ~box] = 0
    whole = build_library_gate(small, margin=0.1)
    cut = build_library_gate(small, margin=0.1, max_scans=2)
    assert lib.keys[n - 1] not in cut.scans
    assert (
        cut.min_foreground
        == whole.min_foreground
        < 0.5 * build_library_gate(lib, margin=0.1).min_foreground
    )
    for bad in (1, 3.5, "4", True):
        with pytest.raises(ValueError, match="max_scans must be an integer >= 2"):
            build_library_gate(lib, margin=0.1, max_scans=bad)


def _centre_disk(features, radius: int) -> torch.Tensor:
    """A disk of ``radius`` grid pixels at the middle of sample 0's part."""
    ys, xs = torch.nonzero(features.foreground[0], as_tuple=True)
    cy, cx = int(ys.float().median()), int(xs.float().median())
    rows, cols = torch.meshgrid(
        torch.arange(features.foreground.shape[1]),
        torch.arange(features.foreground.shape[2]),
        indexing="ij",
    )
    return ((rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2) & features.foreground[0]


def test_a_colour_no_good_scan_shows_is_stopped_and_a_dimmer_lamp_is_not(fitted, dome):
    """Paint a green stain into a good dome scan's colour (its deep features untouched, so
    only the colour check can see it): the colour check stops it and the heatmap shows it.
    The same scan 10 % darker (lamp, gain) passes: chromaticity divides brightness out."""
    from types import SimpleNamespace

    import numpy as np

    from cfr_core.engine.gate import CHECKS, COLOUR, LABELS, gate_heatmap

    gate = fitted.library_gate
    assert gate.checks == CHECKS and gate.colour_margin == 1.0
    assert gate.limits[COLOUR] == pytest.approx(max(gate.loo_peaks[COLOUR]) * 2.0)
    good = dome["test"].select([dome["labels"].index(0)])
    before = novelty_peaks(gate, good)[0]
    assert all(before[c] <= gate.limits[c] for c in CHECKS)
    stained = replace(good, colour=good.colour.clone())
    disk = _centre_disk(good, radius=3)
    stained.colour[0][:, disk] = torch.tensor([0.36, 0.52, 0.30])[:, None]
    after = novelty_peaks(gate, stained)[0]
    assert after[COLOUR] > 10 * gate.limits[COLOUR]
    for c in ("rgb", "points", "pairing"):
        assert after[c] == before[c]  # the deep features did not change
    decision = gate_decision(fitted, 0.0, stained)
    assert decision.failed() == [LABELS[COLOUR]]
    assert "colour novelty" in decision.describe().split(",")[0]
    # what the quarantine shows: the colour check's own map (only .scan.rgb is read)
    scanned = SimpleNamespace(scan=SimpleNamespace(rgb=np.full((GRID, GRID, 3), 128, np.uint8)))
    picture, caption = gate_heatmap(decision, scanned)
    assert caption.startswith("colour novelty") and picture.shape == (GRID, GRID, 3)
    dimmer = replace(good, colour=good.colour * 0.9)
    assert novelty_peaks(gate, dimmer)[0][COLOUR] <= gate.limits[COLOUR]


def test_the_colour_the_gate_reads_is_the_same_at_fit_and_at_the_landing(synth_root, cache):
    """The library's colour comes from extract_features (files, cached features), a landing
    scan's from features_of_scans (a prepared scan): both must be the same numbers, or good
    landing scans would look novel."""
    from cfr_core.data.prepare import prepare_sample
    from cfr_core.engine.features import features_of_scans

    ex = build_extractors(EXTRACTORS)
    pre = FitConfig().preprocess
    sample = library_samples(synth_root, "candy")[0]
    extract_features([sample], ex, pre, cache)
    cached = extract_features([sample], ex, pre, cache)  # the features now from the cache
    landing = features_of_scans([prepare_sample(sample, pre)], ex)
    assert cached.colour.shape == (1, 3, GRID, GRID) and cached.colour.dtype == torch.float32
    assert torch.equal(cached.colour, landing.colour)
    # the part's own colour: candy is one saturated colour, far from grey
    part = cached.colour[0][:, cached.foreground[0]]
    assert float((part.max(0).values - part.min(0).values).mean()) > 0.2


def test_a_grey_scale_library_gets_no_colour_check_and_says_so(fitted, dome, tmp_path):
    from cfr_core.engine.gate import COLOUR, gate_summary

    lib = dome["library"]
    grey = replace(lib, colour=lib.colour.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1))
    gate = build_library_gate(grey, margin=0.1)
    assert COLOUR not in gate.checks and gate.colour_margin is None
    # uniform grey levels: float32 rounding alone gives their chromaticities ~1e-8 apart, so
    # a check calibrated on them would hold every other grey level
    levels = torch.tensor([3.0, 32.0, 56.0, 70.0, 80.0, 200.0]) / 255
    flat = levels[torch.arange(len(lib)) % len(levels)].view(-1, 1, 1, 1)
    uniform = replace(lib, colour=flat.expand(-1, 3, GRID, GRID).contiguous())
    assert COLOUR not in build_library_gate(uniform, margin=0.1).checks
    model = replace(fitted, library_gate=gate)
    assert "no colour check" in gate_summary(model) and "grey-scale" in gate_summary(model)
    save_model(model, tmp_path / "grey")
    loaded = load_model(tmp_path / "grey").library_gate
    assert loaded.checks == gate.checks and "gate.colour" not in model.tensors()
    # features built without colour: the check cannot be built silently without it
    with pytest.raises(ValueError, match="needs the library scans' colour"):
        build_library_gate(replace(lib, colour=None), margin=0.1)
    assert COLOUR not in build_library_gate(lib, margin=0.1, colour_margin=None).checks
    with pytest.raises(ValueError, match="colour_margin must be"):
        build_library_gate(lib, margin=0.1, colour_margin=-1.0)
    with pytest.raises(ValueError, match="carry no colour"):
        novelty_peaks(fitted.library_gate, replace(dome["test"], colour=None))
    from cfr_core.config import ScoringConfig
    from cfr_core.errors import ConfigError

    for bad in (float("nan"), float("inf"), True, None, "1", -0.1):
        with pytest.raises(ConfigError, match="colour_gate_margin"):
            ScoringConfig(colour_gate_margin=bad)


def test_a_model_saved_before_the_colour_check_keeps_its_three_checks(fitted, dome):
    import json

    from cfr_core.engine.gate import COLOUR, PAIRING, gate_summary
    from cfr_core.io.artifacts import model_from_parts, model_metadata

    meta = json.loads(json.dumps(model_metadata(fitted)))
    for key in ("limits", "loo_peaks"):
        del meta["library_gate"][key][COLOUR]
    del meta["library_gate"]["colour"]
    tensors = {k: v for k, v in fitted.tensors().items() if k != "gate.colour"}
    older = model_from_parts(meta, tensors)
    assert older.library_gate.checks == (*MODALITIES, PAIRING, "shape")
    assert "no colour check" in gate_summary(older)
    assert "colour novelty" not in gate_decision(older, 0.0, dome["ribbed"]).checks
    # the colour bank left behind without its limit is refused, not ignored
    with pytest.raises(ValueError, match="without a colour limit"):
        model_from_parts(meta, fitted.tensors())


def _edit_refuser(fitted):
    """(the saved gate's metadata, a function that edits it and the tensors and asserts that
    loading the model refuses the edit with an error matching ``match``)."""
    import json

    from cfr_core.io.artifacts import model_from_parts, model_metadata

    meta = json.loads(json.dumps(model_metadata(fitted)))
    gate_meta = meta["library_gate"]

    def refused(match, tensors=None, **changes):
        edited = {**meta, "library_gate": {**gate_meta, **changes}}
        with pytest.raises(ValueError, match=match):
            model_from_parts(edited, {**fitted.tensors(), **(tensors or {})})

    return meta, refused


def test_a_hand_edited_colour_check_is_refused(fitted):
    from cfr_core.engine.gate import COLOUR
    from cfr_core.io.artifacts import model_from_parts

    meta, refused = _edit_refuser(fitted)
    gate_meta = meta["library_gate"]
    bank = fitted.tensors()["gate.colour"]
    limit = gate_meta["limits"][COLOUR]
    refused("leave-one-out peaks", limits={**gate_meta["limits"], COLOUR: limit * 3})
    refused("leave-one-out peaks", colour={**gate_meta["colour"], "margin": 9.0})
    refused("another colour space", colour={**gate_meta["colour"], "space": "CIELAB"})
    refused("another colour space", colour={**gate_meta["colour"], "dark_floor": 0.0})
    refused("colour margin must be >= 0", colour={**gate_meta["colour"], "margin": -0.5})
    refused("finite number", colour={**gate_meta["colour"], "margin": "1"})
    refused("without its colour settings", colour=None)
    refused(
        "must be in",
        loo_peaks={**gate_meta["loo_peaks"], COLOUR: [5.0] * len(gate_meta["scans"])},
        limits={**gate_meta["limits"], COLOUR: 10.0},
    )
    # a limit no colour distance can reach (margin and limit consistent with each other)
    huge = {**gate_meta["colour"], "margin": 1e12}
    top = max(gate_meta["loo_peaks"][COLOUR]) * (1 + 1e12)
    refused("must be in", colour=huge, limits={**gate_meta["limits"], COLOUR: top})
    refused("float32 rows", tensors={"gate.colour": bank.half()})
    refused("float32 rows", tensors={"gate.colour": bank[:-1]})
    refused("outside", tensors={"gate.colour": bank + 2.0})
    refused("outside", tensors={"gate.colour": torch.full_like(bank, float("nan"))})
    without = {k: v for k, v in fitted.tensors().items() if k != "gate.colour"}
    with pytest.raises(ValueError, match="no gate.colour tensor"):
        model_from_parts(meta, without)


def test_a_gate_copied_with_another_colour_bank_searches_that_bank(fitted, dome):
    """The nearest-colour search is built once per gate; a copy with another colour bank
    (dataclasses.replace) must search its own bank, not the original's."""
    from cfr_core.engine.gate import COLOUR

    gate = fitted.library_gate
    good = dome["test"].select([dome["labels"].index(0)])
    before = novelty_peaks(gate, good)[0][COLOUR]  # builds the original's search
    swapped = replace(gate, banks={**gate.banks, COLOUR: torch.full_like(gate.banks[COLOUR], 0.9)})
    assert novelty_peaks(swapped, good)[0][COLOUR] > 100 * before
    assert novelty_peaks(gate, good)[0][COLOUR] == before


# --------------------------------------------------------------------------- shape check


def _dented(sample, depth_mm: float, sigma_mm: float = 3.0, tilt_deg: float = 0.0):
    """The sample's prepared scan with a smooth dent (or bump, depth < 0) pressed into its
    cloud at the middle of the part, the colour image untouched; optionally the whole cloud
    tilted by ``tilt_deg`` about the image's vertical axis (a part lying a little askew)."""
    import numpy as np

    from cfr_core.data.prepare import prepare_arrays

    rgb, xyz, _ = sample.load()
    xyz = xyz.astype(np.float64)
    valid = np.abs(xyz).sum(-1) > 0
    rows, cols = np.nonzero(valid)
    cy, cx = np.median(rows), np.median(cols)
    pitch = float(np.median(np.abs(np.diff(xyz[..., 0], axis=1))[valid[:, 1:] & valid[:, :-1]]))
    r, c = np.mgrid[0 : xyz.shape[0], 0 : xyz.shape[1]]
    d2 = ((r - cy) ** 2 + (c - cx) ** 2) * pitch**2
    xyz[..., 2] += depth_mm / 1000 * np.exp(-0.5 * d2 / (sigma_mm / 1000) ** 2) * valid
    if tilt_deg:
        a = np.deg2rad(tilt_deg)
        centre = xyz[valid].mean(0)
        rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        xyz[valid] = (xyz[valid] - centre) @ rot.T + centre
    return prepare_arrays(rgb, xyz.astype(np.float32), None, FitConfig().preprocess, sample.key)


def test_a_dent_is_stopped_by_the_shape_check_and_a_tilted_good_part_is_not(fitted, synth_root):
    """Press a 3 mm dent into a good dome scan's cloud (the colour untouched): the shape
    check stops it, its map is what the quarantine shows; the same scan unchanged or
    tilted 4° passes it (curvature does not depend on how the part lies)."""
    from types import SimpleNamespace

    import numpy as np

    from cfr_core.engine.features import features_of_scans
    from cfr_core.engine.gate import LABELS, SHAPE, gate_heatmap

    gate = fitted.library_gate
    assert SHAPE in gate.checks and gate.shape_margin == 2.0
    assert gate.limits[SHAPE] == pytest.approx(max(gate.loo_peaks[SHAPE]) * 3.0)
    ex = build_extractors(EXTRACTORS)
    good = next(s for s in index_category(synth_root, "dome").split("test") if s.label == 0)
    peak = {}
    for name, depth, tilt in (("good", 0.0, 0.0), ("tilted", 0.0, 4.0), ("dent", 3.0, 0.0)):
        feats = features_of_scans([_dented(good, depth, tilt_deg=tilt)], ex, [name])
        peak[name] = novelty_peaks(gate, feats)[0][SHAPE]
        if name == "dent":
            decision = gate_decision(fitted, 0.0, feats)
    assert peak["good"] <= gate.limits[SHAPE] and peak["tilted"] <= gate.limits[SHAPE]
    # the dent is far outside what the good scan (as it is or tilted) shows
    assert peak["dent"] > 1.5 * gate.limits[SHAPE] and peak["dent"] > 10 * peak["tilted"]
    assert LABELS[SHAPE] in decision.failed()
    scanned = SimpleNamespace(scan=SimpleNamespace(rgb=np.full((GRID, GRID, 3), 128, np.uint8)))
    first = decision.failed()[0]
    _, caption = gate_heatmap(decision, scanned)
    assert caption.startswith(first)


def test_shape_maps_read_the_curvature_of_known_surfaces_and_skip_what_they_cannot_tell():
    """A sphere of radius 40 mm gives both curvatures 1/40 per mm; a tilted plane 0; a hole
    leaves NaN around it (never the huge curvature that reading missing points as depth 0
    would give); a cloud of isolated points or of nothing gives NaN everywhere."""
    import numpy as np

    from cfr_core.engine.surface import shape_grid

    n, pitch = 160, 0.0003  # 48 mm at 0.3 mm per point
    y, x = (np.mgrid[0:n, 0:n] - (n - 1) / 2) * pitch
    radius = 0.040
    sphere = np.stack([x, y, 0.5 - np.sqrt(radius**2 - x**2 - y**2)], -1)
    curv = shape_grid(sphere, 32)
    middle = curv[:, 8:24, 8:24]
    assert torch.isfinite(middle).all()
    assert middle.abs().mean(dim=(1, 2)).tolist() == pytest.approx([1 / 40, 1 / 40], rel=0.05)
    assert torch.isnan(curv[:, 0, 0]).all()  # the edge of the cloud: half its support missing
    plane = np.stack([x, y, 0.5 + 0.2 * x + 0.1 * y], -1)
    assert shape_grid(plane, 32)[:, 8:24, 8:24].abs().max() < 1e-3
    holed = sphere.copy()
    holed[70:90, 70:90] = 0.0
    with_hole = shape_grid(holed, 32)
    assert torch.isnan(with_hole[:, 16, 16]).all()
    known = with_hole[torch.isfinite(with_hole)]
    assert known.abs().max() < 0.05  # no cell reads the hole as a cliff
    sparse = np.zeros_like(sphere)
    sparse[::7, ::7] = sphere[::7, ::7]
    assert torch.isnan(shape_grid(sparse, 32)).all()
    assert torch.isnan(shape_grid(np.zeros_like(sphere), 32)).all()
    with pytest.raises(ValueError, match="H×W×3"):
        shape_grid(sphere[..., :2], 32)


def test_the_shape_the_gate_reads_is_the_same_at_fit_and_at_the_landing(synth_root, tmp_path):
    """extract_features (computed, then from the cache) and features_of_scans (a landing
    scan) give the same shape map; a cache entry of another grid is recomputed."""
    from cfr_core.data.prepare import prepare_sample
    from cfr_core.engine.features import features_of_scans

    ex = build_extractors(EXTRACTORS)
    pre = FitConfig().preprocess
    store = FeatureCache(tmp_path / "cache")
    sample = library_samples(synth_root, "dome")[0]
    fresh = extract_features([sample], ex, pre, store)
    cached = extract_features([sample], ex, pre, store)
    landing = features_of_scans([prepare_sample(sample, pre)], ex)
    assert cached.shape.shape == (1, 2, GRID, GRID) and cached.shape.dtype == torch.float32
    for other in (fresh, landing):
        assert torch.equal(cached.shape.isnan(), other.shape.isnan())
        assert torch.equal(cached.shape.nan_to_num(), other.shape.nan_to_num())
    part = cached.shape[0][:, cached.foreground[0]]
    # the dome's middle has a curvature; its outline and steep walls have none (at this
    # 96-pixel test size the outline's 4 mm band is a large share of a small part)
    assert torch.isfinite(part).float().mean() > 0.15
    middle = cached.shape[0][:, _centre_disk(cached, radius=2)]
    assert torch.isfinite(middle).float().mean() > 0.5  # a lone missing point skips its cells
    # a damaged cache entry of the wrong size is not trusted
    for path in (tmp_path / "cache").rglob("*.safetensors"):
        from safetensors.torch import load_file, save_file

        if load_file(path)["features"].shape == (2, GRID, GRID):
            save_file({"features": torch.zeros(2, 4, 4)}, str(path))
    again = extract_features([sample], ex, pre, store)
    assert torch.equal(again.shape.nan_to_num(), cached.shape.nan_to_num())


def test_a_library_without_curvature_gets_no_shape_check_and_older_models_keep_theirs(
    fitted, dome, tmp_path
):
    import json

    from cfr_core.config import ScoringConfig
    from cfr_core.engine.gate import PAIRING, SHAPE, gate_summary
    from cfr_core.errors import ConfigError
    from cfr_core.io.artifacts import model_from_parts, model_metadata

    lib = dome["library"]
    blind = replace(lib, shape=torch.full_like(lib.shape, float("nan")))
    gate = build_library_gate(blind, margin=0.1)
    assert SHAPE not in gate.checks and gate.shape_margin is None
    model = replace(fitted, library_gate=gate)
    assert "no shape check" in gate_summary(model)
    save_model(model, tmp_path / "blind")
    assert SHAPE not in load_model(tmp_path / "blind").library_gate.checks
    # a flat or thin part: curvature read only off the part (once saved as min_shape_read
    # 0.0, a model that fit wrote and evaluate refused)
    off_part = torch.full_like(lib.shape, float("nan"))
    table = ~lib.foreground
    off_part[:, 0][table] = 0.02 + 0.01 * torch.rand(int(table.sum()))
    off_part[:, 1][table] = 0.01
    gate = build_library_gate(replace(lib, shape=off_part), margin=0.1)
    assert SHAPE not in gate.checks and gate.min_shape_read is None
    save_model(replace(fitted, library_gate=gate), tmp_path / "off-part")
    assert SHAPE not in load_model(tmp_path / "off-part").library_gate.checks
    with pytest.raises(ValueError, match="needs the library scans' shape"):
        build_library_gate(replace(lib, shape=None), margin=0.1)
    assert SHAPE not in build_library_gate(lib, margin=0.1, shape_margin=None).checks
    with pytest.raises(ValueError, match="shape_margin must be"):
        build_library_gate(lib, margin=0.1, shape_margin=float("nan"))
    with pytest.raises(ValueError, match="carry no shape"):
        novelty_peaks(fitted.library_gate, replace(dome["test"], shape=None))
    for bad in (float("nan"), float("inf"), True, None, "1", -0.1):
        with pytest.raises(ConfigError, match="shape_gate_margin"):
            ScoringConfig(shape_gate_margin=bad)
    # a model saved before the shape check: its four checks, and the summary says why
    meta = json.loads(json.dumps(model_metadata(fitted)))
    for key in ("limits", "loo_peaks"):
        del meta["library_gate"][key][SHAPE]
    del meta["library_gate"]["shape"]
    del meta["library_gate"]["min_shape_read"]
    tensors = {k: v for k, v in fitted.tensors().items() if k != "gate.shape"}
    older = model_from_parts(meta, tensors)
    assert older.library_gate.checks == (*MODALITIES, PAIRING, "colour")
    assert "no shape check" in gate_summary(older)
    assert "3D shape novelty" not in gate_decision(older, 0.0, dome["ribbed"]).checks
    with pytest.raises(ValueError, match="without a shape limit"):
        model_from_parts(meta, fitted.tensors())
    # one saved by an older version of the descriptor (before the surface view): it loads
    # without its shape check, whose curvatures this code no longer computes, and says so
    meta = json.loads(json.dumps(model_metadata(fitted)))
    spec = meta["library_gate"]["shape"]
    meta["library_gate"]["shape"] = {**spec, "version": 3, "table_sigmas": None}
    outdated = model_from_parts(meta, fitted.tensors())
    assert outdated.library_gate.checks == (*MODALITIES, PAIRING, "colour")
    assert outdated.library_gate.shape_outdated == 3
    assert "built by version 3" in gate_summary(outdated) and "refit" in gate_summary(outdated)
    assert "3D shape novelty" not in gate_decision(outdated, 0.0, dome["ribbed"]).checks


def test_a_hand_edited_shape_check_is_refused(fitted, dome):
    from cfr_core.engine.gate import SHAPE
    from cfr_core.io.artifacts import model_from_parts

    meta, refused = _edit_refuser(fitted)
    gate_meta = meta["library_gate"]
    bank = fitted.tensors()["gate.shape"]
    spec = gate_meta["shape"]
    limit = gate_meta["limits"][SHAPE]
    refused("leave-one-out peaks", limits={**gate_meta["limits"], SHAPE: limit * 3})
    refused("leave-one-out peaks", shape={**spec, "margin": 9.0})
    refused("another descriptor", shape={**spec, "scale_mm": 3.0})
    refused("another descriptor", shape={**spec, "support": 0.5})
    refused("another descriptor", shape={**spec, "descriptor": "normals"})
    refused("another descriptor", shape={**spec, "version": spec["version"] + 1})  # newer code's
    refused("shape margin must be >= 0", shape={**spec, "margin": -0.5})
    refused("finite number", shape={**spec, "margin": "1"})
    refused("without its shape settings", shape=None)
    huge = {**spec, "margin": 1e12}
    top = max(gate_meta["loo_peaks"][SHAPE]) * (1 + 1e12)
    refused("must be in", shape=huge, limits={**gate_meta["limits"], SHAPE: top})
    refused("float32 rows", tensors={"gate.shape": bank.half()})
    refused("float32 rows", tensors={"gate.shape": bank[:, :1]})
    refused("float32 rows", tensors={"gate.shape": bank[:0]})
    refused("non-finite", tensors={"gate.shape": torch.full_like(bank, float("nan"))})
    refused("first is not the larger", tensors={"gate.shape": bank.flip(1) - 1.0})
    # a bank denser than the library could ever give (it would explain every dent)
    rows = len(fitted.library_gate.scans) * math.ceil(GRID / GATE_STRIDE) ** 2 + 1
    refused("more than the library", tensors={"gate.shape": bank[:1].expand(rows, 2).clone()})
    for bad in (0.0, 1.5, None, "0.5"):
        refused("min_shape_read", min_shape_read=bad)
    without = {k: v for k, v in fitted.tensors().items() if k != "gate.shape"}
    with pytest.raises(ValueError, match="no gate.shape tensor"):
        model_from_parts(meta, without)
    # a copy with another shape bank searches that bank, not the original's
    gate = fitted.library_gate
    good = dome["test"].select([dome["labels"].index(0)])
    before = novelty_peaks(gate, good)[0][SHAPE]
    swapped = replace(gate, banks={**gate.banks, SHAPE: torch.full_like(gate.banks[SHAPE], 5.0)})
    assert novelty_peaks(swapped, good)[0][SHAPE] > 10 * max(before, 1e-3)
    assert novelty_peaks(gate, good)[0][SHAPE] == before


def test_a_scan_whose_shape_cannot_be_read_is_stopped_not_passed_unseen(fitted, synth_root):
    """Scattered point loss (10 % of the points) leaves no pixel with 97 % of its smoothing
    on points: the shape check would read 0 and pass. The unread guard stops the scan and
    says why; the same scan whole passes it."""
    import numpy as np

    from cfr_core.data.prepare import prepare_arrays
    from cfr_core.engine.features import features_of_scans
    from cfr_core.engine.gate import SHAPE_UNREAD_CHECK, SHAPE_UNREAD_LIMIT, shape_unread

    gate = fitted.library_gate
    assert 0 < gate.min_shape_read <= 1
    ex = build_extractors(EXTRACTORS)
    good = next(s for s in index_category(synth_root, "dome").split("test") if s.label == 0)
    rgb, xyz, _ = good.load()
    whole = features_of_scans([prepare_arrays(rgb, xyz, None, FitConfig().preprocess)], ex)
    assert shape_unread(gate, whole) <= SHAPE_UNREAD_LIMIT
    holey = xyz.copy()
    holey[np.random.default_rng(0).random(xyz.shape[:2]) < 0.1] = 0.0
    lossy = features_of_scans([prepare_arrays(rgb, holey, None, FitConfig().preprocess)], ex)
    decision = gate_decision(fitted, 0.0, lossy)
    assert decision.checks[SHAPE_UNREAD_CHECK][0] > SHAPE_UNREAD_LIMIT
    assert SHAPE_UNREAD_CHECK in decision.failed()


def test_points_packed_absurdly_close_give_no_shape_and_no_hang():
    """A cloud whose points are picometres apart (a unit error, a hostile file) would ask for
    a smoothing kernel of billions of pixels (a MemoryError, or minutes of filtering for
    nanometres): it is read as no curvature at once."""
    import numpy as np

    from cfr_core.engine.surface import shape_grid

    y, x = np.mgrid[0:40, 0:40] * 1e-12
    cloud = np.stack([x, y, np.full_like(x, 0.5)], -1)
    assert torch.isnan(shape_grid(cloud, 16)).all()


def _pressed(scan, depth_mm: float, sigma_mm: float = 3.5):
    """(rgb, xyz, centre) of a synthetic scan with a dent pressed ``depth_mm`` towards the
    table at the point of its surface farthest inside the part among those the method's
    5 mm clearance erases (the colour untouched)."""
    import numpy as np
    from scipy import ndimage

    from cfr_core.data.pointcloud import preprocess, valid_mask

    out = preprocess(scan.xyz, scan.rgb, surface=True)
    top, _, left, _ = out.pad
    h, w = scan.xyz.shape[:2]
    surface = valid_mask(out.surface)[top : top + h, left : left + w]
    erased = surface & ~valid_mask(out.xyz)[top : top + h, left : left + w]
    inside = ndimage.distance_transform_edt(ndimage.binary_fill_holes(surface)) * erased
    cy, cx = np.unravel_index(np.argmax(inside), inside.shape)
    xyz = scan.xyz.astype(np.float64)
    valid = valid_mask(scan.xyz)
    d2 = (xyz[..., 0] - xyz[cy, cx, 0]) ** 2 + (xyz[..., 1] - xyz[cy, cx, 1]) ** 2
    # towards the table: along the plane's normal, away from the camera
    normal = out.plane.normal * np.sign(out.plane.normal[2])
    bump = depth_mm / 1000 * np.exp(-0.5 * d2 / (sigma_mm / 1000) ** 2) * valid
    xyz += bump[..., None] * normal
    return scan.rgb, xyz.astype(np.float32), (cy + top, cx + left)


def test_the_shape_check_reads_a_thin_part_where_the_method_sees_nothing():
    """A 5 mm studded plate: the method's preprocessing erases about half of it, so the 3D
    features (and, before the surface view, the shape check) never see that half. The shape
    check reads it from the scan's surface view: its pixels reach beyond the 3D
    foreground, a good plate passes and a 2.5 mm dent (5 mm wide) pressed into the erased half is
    stopped by the shape check."""
    from cfr_core.data.prepare import prepare_arrays
    from cfr_core.data.synth import render_sample
    from cfr_core.engine.features import features_of_scans
    from cfr_core.engine.gate import SHAPE, _sampled_mask, _shape_mask
    from cfr_core.engine.surface import shape_grid

    ex = build_extractors(EXTRACTORS)
    pre = FitConfig().preprocess

    def prepared(rgb, xyz, key):
        return prepare_arrays(rgb, xyz, None, pre, key)

    library = [render_sample("studded", "good", 5, "train", i, 256) for i in range(8)]
    lib = features_of_scans([prepared(s.rgb, s.xyz, f"lib{i}") for i, s in enumerate(library)], ex)
    gate = build_library_gate(lib, margin=0.05)
    assert SHAPE in gate.checks
    # the shape check reads far more of each scan than it would from the method's cloud
    scans = [prepared(s.rgb, s.xyz, f"lib{i}") for i, s in enumerate(library[:3])]
    method = torch.stack([shape_grid(s.xyz, GRID) for s in scans])  # the method's 5 mm cloud
    bare = replace(lib.select(range(len(scans))), shape=method)
    for i in range(len(scans)):
        read, before = (
            int(_shape_mask(f, i, _sampled_mask(f, i)).logical_and(f.shape[i][0].isfinite()).sum())
            for f in (lib, bare)
        )
        assert read > 1.5 * before
    # a scan prepared without its surface view is refused, never read from the 5 mm cloud
    with pytest.raises(ValueError, match="without its surface view"):
        features_of_scans([replace(scans[0], surface=None)], ex)
    # without the gate's maps (scoring on the line) it needs none, and a gate refuses those
    plain = features_of_scans([replace(scans[0], surface=None)], ex, gate_maps=False)
    assert plain.shape is None and plain.colour is None
    with pytest.raises(ValueError, match="carry no"):
        novelty_peaks(gate, plain)
    good = render_sample("studded", "good", 5, "test", 0, 256)
    rgb, xyz, centre = _pressed(good, 2.5, sigma_mm=5.0)
    feats = features_of_scans(
        [prepared(good.rgb, good.xyz, "good"), prepared(rgb, xyz, "dent")], ex
    )
    cell = (centre[0] * GRID // 300, centre[1] * GRID // 300)
    assert not feats.foreground[1][cell]  # where the 3D features have nothing
    peaks = novelty_peaks(gate, feats)
    assert peaks[0][SHAPE] <= gate.limits[SHAPE]
    assert peaks[1][SHAPE] > 1.5 * gate.limits[SHAPE]
    # the other checks see the dent far less (the RGB image is untouched)
    assert peaks[1]["rgb"] == pytest.approx(peaks[0]["rgb"], rel=0.2)


def test_a_readable_rim_does_not_make_up_for_an_unread_part():
    """The shape guard reads the share of the sampled *foreground* with a curvature: a scan
    whose surface view shows a readable rim beyond its 3D foreground (a thin part's lower
    surface) but no curvature on the foreground itself is '3D shape unread', as it was
    before the surface view."""
    from cfr_core.engine.features import FeatureSet
    from cfr_core.engine.gate import SHAPE, SHAPE_UNREAD_LIMIT, shape_unread

    g = 16
    fg = torch.zeros(g, g, dtype=torch.bool)
    fg[4:12, 4:12] = True
    rim = torch.zeros(g, g, dtype=torch.bool)
    rim[:3] = rim[13:] = True

    def scans(n, seed, part_read):
        gen = torch.Generator().manual_seed(seed)
        rgb = torch.randn(n, 8, g, g, generator=gen) * fg
        points = (torch.randn(n, 4, g, g, generator=gen) + 3) * fg
        curv = (torch.rand(n, 2, g, g, generator=gen) * 0.05).sort(dim=1, descending=True).values
        shape = torch.full((n, 2, g, g), float("nan"))
        read = (fg if part_read else torch.zeros_like(fg)) | rim
        shape[:, :, read] = curv[:, :, read]
        masks = torch.zeros(n, g, g, dtype=torch.bool)
        return FeatureSet(rgb, points, masks, [f"s{seed}-{i}" for i in range(n)], None, shape)

    gate = build_library_gate(scans(4, 0, True), margin=0.1, colour_margin=None)
    assert SHAPE in gate.checks and gate.min_shape_read == 1.0
    assert shape_unread(gate, scans(1, 1, True)) == 0.0
    assert shape_unread(gate, scans(1, 2, False)) == 1.0 > SHAPE_UNREAD_LIMIT
