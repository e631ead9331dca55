"""Unit tests for what turns features into scores: maps, standardisation, retriever training,
and `cfr score` agreeing with `cfr evaluate` on the same scan."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cfr_core.config import RetrieverConfig
from cfr_core.engine.features import FeatureSet
from cfr_core.engine.normalize import FeatureNorm
from cfr_core.engine.train import _candidates, train_retriever
from cfr_core.memory.bank import Banks
from cfr_core.memory.search import topk_cosine
from cfr_core.scoring.maps import (
    aupro_maps,
    box_blur,
    decision_threshold,
    discrepancy,
    gate_threshold,
    image_scores,
    pixel_maps,
)

# ----------------------------------------------------------------------------- maps


def test_discrepancy_is_the_distance_of_unit_vectors():
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[5.0, 0.0], [-2.0, -2.0], [2.0, 0.0]])
    assert torch.allclose(discrepancy(a, b), torch.tensor([0.0, 2.0, 2**0.5]), atol=1e-6)
    assert torch.allclose(discrepancy(a, a * 7), torch.zeros(3), atol=1e-6)  # scale-free


def test_box_blur_averages_inside_the_image_and_keeps_mass_in_the_interior():
    maps = torch.zeros(1, 9, 9)
    maps[0, 4, 4] = 25.0
    once = box_blur(maps, ((5, 1),))
    assert torch.allclose(once[0, 2:7, 2:7], torch.ones(5, 5)) and once.sum() == 25.0
    corner = torch.zeros(1, 9, 9)
    corner[0, 0, 0] = 9.0
    # at the corner the 5×5 window holds 9 pixels of the image: the average is over those 9
    assert box_blur(corner, ((5, 1),))[0, 0, 0] == pytest.approx(1.0)
    flat = torch.full((2, 7, 7), 3.0)
    assert torch.allclose(box_blur(flat, ((5, 5), (7, 3))), flat)  # constants stay constant
    assert torch.equal(box_blur(maps, ()), maps)


def test_image_scores_normalise_by_the_maps_own_level():
    peak = torch.zeros(1, 10, 10)
    peak[0, :5, :5] = 1.0
    peak[0, 0, 0] = 4.0  # non-zero mean = (24 + 4) / 25
    assert image_scores(peak)[0] == pytest.approx(4.0 / (28 / 25) ** 0.5)
    assert torch.allclose(image_scores(3 * peak), image_scores(peak) * 3**0.5)
    assert image_scores(torch.zeros(2, 4, 4)).tolist() == [0.0, 0.0]  # no foreground, no score
    norm = aupro_maps(peak)
    assert norm[0][peak[0] > 0].mean() == pytest.approx(1.0)  # mean of the non-zero values
    assert pixel_maps(peak).mean() ** 2 == pytest.approx(float(peak.mean()))


def test_thresholds_take_the_highest_finite_normal_score_plus_a_margin():
    assert decision_threshold([1.0, 2.0, float("nan"), 1.5], 0.05) == pytest.approx(2.1)
    assert gate_threshold([1.0, 2.0], 0.25) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="no finite score"):
        decision_threshold([float("inf")], 0.05)


# ----------------------------------------------------------------------------- FeatureNorm


def _features(seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    rgb = 5 + 2 * torch.randn(2, 4, 6, 6, generator=g)
    pts = 3 + torch.randn(2, 3, 6, 6, generator=g)
    pts[:, :, :2] = 0.0  # two background rows
    return FeatureSet(rgb, pts, torch.zeros(2, 6, 6, dtype=torch.bool), ["a", "b"])


def test_feature_norm_standardises_the_foreground_and_keeps_the_background():
    feats = _features()
    norm = FeatureNorm.fit(feats)
    out = norm.apply(feats)
    fg = feats.foreground
    assert torch.equal(out.foreground, fg)  # background stays exactly zero, foreground stays
    rgb = out.rgb.permute(0, 2, 3, 1)[fg]
    pts = out.points.permute(0, 2, 3, 1)[fg]
    assert torch.allclose(rgb.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(pts.std(0), torch.ones(3), atol=1e-5)
    # a foreground pixel that standardises to exactly zero must not turn into background
    centred = replace(feats, points=feats.points.clone())
    centred.points[0, :, 3, 3] = norm.points_mean
    assert norm.apply(centred).foreground[0, 3, 3]
    back = FeatureNorm.from_tensors(norm.tensors())
    assert all(torch.equal(getattr(back, k), getattr(norm, k)) for k in vars(norm))
    assert FeatureNorm.from_tensors({}) is None
    with pytest.raises(ValueError, match="at least two foreground"):
        FeatureNorm.fit(replace(feats, points=torch.zeros_like(feats.points)))


# ----------------------------------------------------------------------------- retriever


def test_retriever_candidates_are_the_bank_subsets_exact_top_k():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(60, 5, generator=g)
    banks = Banks(torch.randn(10, 3, generator=g), keys, torch.randn(60, 3, generator=g))
    queries = torch.randn(40, 5, generator=g)
    _, pre = topk_cosine(queries, keys, 3 + 16)
    assert torch.equal(_candidates(queries, banks, 3, 100, pre, g), pre[:, :3])  # no subset
    sub_gen = torch.Generator().manual_seed(7)
    got = _candidates(queries, banks, 3, 20, pre, sub_gen)
    keep = torch.zeros(60, dtype=torch.bool)
    keep[torch.randperm(60, generator=torch.Generator().manual_seed(7))[:20]] = True
    subset = torch.nonzero(keep).squeeze(1)
    _, local = topk_cosine(queries, keys[subset], 3)
    assert torch.equal(got, subset[local])  # the same as searching the subset itself


def test_retriever_learns_to_return_the_value_of_the_matching_key():
    """Targets are the real RGB features of the shots' pixels: on a toy bank whose values are a
    fixed function of the keys, training drives the retriever's output towards the target."""
    g = torch.Generator().manual_seed(2)
    keys = F.normalize(torch.randn(32, 6, generator=g), dim=1)
    values = keys @ torch.randn(6, 4, generator=g)
    pixels = keys.repeat(3, 1)[torch.randperm(96, generator=g)]
    rgb = (pixels @ torch.linalg.lstsq(keys, values).solution).T.reshape(1, 4, 8, 12)
    pts = pixels.T.reshape(1, 6, 8, 12)
    feats = FeatureSet(rgb, pts, torch.zeros(1, 8, 12, dtype=torch.bool), ["toy"])
    banks = Banks(values, keys, values)
    cfg = RetrieverConfig(top_k=3, d_model=8, lr=1e-2, epochs=150)
    retriever, history = train_retriever(feats, banks, cfg)
    assert history.losses[-1] < 0.2 * history.losses[0] and history.losses[-1] < 0.05
    _, idx = topk_cosine(keys, keys, 3)
    with torch.no_grad():
        out = retriever(keys, idx, keys, values)
    assert F.cosine_similarity(out, values).mean() > 0.95


# ----------------------------------------------------------------------------- score vs evaluate


def test_cfr_score_gives_the_score_evaluate_gives_for_the_same_scan(synth_root, tmp_path):
    from cfr_core.cli import main
    from cfr_core.engine.fit import evaluate, test_samples
    from cfr_core.io.artifacts import load_model

    runner = CliRunner()
    model = tmp_path / "m"
    fit = runner.invoke(
        main,
        ["fit", "--data", str(synth_root), "-c", "candy", "--shots", "2", "--grid", "32"]
        + ["--epochs", "3", "--out", str(model)],
    )
    assert fit.exit_code == 0, fit.output
    ev = runner.invoke(main, ["evaluate", "--model", str(model), "--data", str(synth_root)])
    assert ev.exit_code == 0, ev.output
    evaluation = evaluate(load_model(model), synth_root)
    samples = test_samples(synth_root, "candy")
    for i in (0, len(samples) - 1):
        out = runner.invoke(
            main,
            ["score", "--model", str(model), str(samples[i].rgb_path), str(samples[i].xyz_path)]
            + ["--json"],
        )
        got = json.loads(out.output)
        assert got["score"] == pytest.approx(float(evaluation.scores[i]), rel=1e-5)
        # the same verdict as the evaluation, and the exit code says it (0 PASS, 1 FAIL)
        assert got["verdict"] == evaluation.verdicts.scans[i]["verdict"]
        assert out.exit_code == {"PASS": 0, "FAIL": 1}[got["verdict"]], out.output
