"""Accuracy floors: the shipped defaults must keep finding defects on generated data.

Small and fast (a 128 px control category, a 40×40 grid, 20 epochs), so the floors sit
well under what the full benchmark measures (bench/results/accuracy/accuracy.md): they catch a
default that breaks (wrong weights mapping, a scoring bug, a θ that replaces
everything), not a drift of a point or two.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cfr_core.config import DEFAULT_EXTRACTORS, DEFAULT_METHOD, ExtractorConfig, FitConfig
from cfr_core.data.synth import SynthConfig, generate
from cfr_core.engine import build_extractors, evaluate, fit

CONTROL = SynthConfig(
    categories=("dome",),
    seed=3,
    size=128,
    n_train=4,
    n_validation=2,
    n_test_good=6,
    n_test_per_defect=2,
)


@pytest.fixture(scope="module")
def control_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("floor") / "data", CONTROL)


def default_config(shots: int) -> FitConfig:
    extractors = ExtractorConfig.preset(DEFAULT_EXTRACTORS, grid=40)
    cfg = FitConfig.for_method(DEFAULT_METHOD, shots=shots, extractors=extractors)
    return replace(
        cfg,
        mappers=replace(cfg.mappers, epochs=20),
        retriever=replace(cfg.retriever, epochs=20),
    )


def test_default_detector_finds_control_defects_at_four_shots(control_root):
    cfg = default_config(4)
    extractors = build_extractors(cfg.extractors)
    model = fit(control_root, "dome", cfg, None, extractors)
    ev = evaluate(model, control_root, None, extractors)
    # full benchmark (bench-256, 100 epochs): 1.000 / 0.99; this small run: 1.000 / 0.97
    assert ev.report.image_auroc >= 0.9, ev.report
    assert ev.report.aupro[0.3] >= 0.85, ev.report
    # θ calibrated from the shots replaces a minority of pixels, not none and not all
    assert model.theta_source.startswith("calibrated")
    assert 0.0 < ev.replacement_rate < 0.3
    # the line's threshold passes most good parts and stops most defective ones
    good, bad = ev.scores[ev.labels == 0], ev.scores[ev.labels == 1]
    assert (good <= model.threshold).mean() >= 0.5 and (bad > model.threshold).mean() >= 0.8
