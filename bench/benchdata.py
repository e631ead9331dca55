"""The synthetic benchmark data that bench/accuracy.py, bench/develop.py and bench/speed.py share.

Seed 0, 256 px, every category (development and report), 8 train, 4 validation,
20 good and 8 of each defect per category in test (more test parts than the
generator's default, so that a difference of ~0.02 I-AUROC is not noise alone).
"""

from __future__ import annotations

import json
from pathlib import Path

from cfr_core.config import EXTRACTOR_PRESETS, ExtractorConfig
from cfr_core.data.fewshot import select_shots
from cfr_core.data.mvtec import index_category
from cfr_core.data.synth import DEV_CATEGORIES, REPORT_CATEGORIES, SynthConfig, generate
from cfr_core.engine.features import extract_features
from cfr_core.engine.fit import calibrate, calibration_samples

ROOT = Path(__file__).resolve().parents[1]
BENCH_CONFIG = SynthConfig(
    categories=DEV_CATEGORIES + REPORT_CATEGORIES,
    seed=0,
    size=256,
    n_train=8,
    n_validation=4,
    n_test_good=20,
    n_test_per_defect=8,
)


def bench_data(root: Path | None = None) -> Path:
    """The benchmark dataset, generated on first use."""
    root = root or ROOT / "bench" / ".data" / "bench-256"
    if not (root / "synth.json").exists():
        print(f"generating the synthetic benchmark in {root} ...", flush=True)
        generate(root, BENCH_CONFIG, overwrite=True)
    return root


def preset_of(extractors: ExtractorConfig) -> str:
    """The preset name of an extractor pair (or 'rgb+points')."""
    pair = (extractors.rgb, extractors.points)
    return next((k for k, v in EXTRACTOR_PRESETS.items() if v == pair), "+".join(pair))


def bench_calibrate(model, data: Path, cat: str, cache, extractors) -> dict:
    """Calibrate ``model`` as ``fit`` does (unless it already is) and return every good
    score the rule reads.

    The line's threshold is set on validation/good and the pool's other good scans
    (train/good not used as shots: never seen by the model, like the library scans a
    pipeline holds beside its shots), plus the shots' leave-one-out scores when those are
    too few; the gate's on the first two.
    """
    cfg = model.config
    if model.calibration is None:
        index = index_category(data, cat).require_train()
        shots = select_shots(index, cfg.shots, cfg.fewshot_seed).samples
        val, source = calibration_samples(data, cat, shots)
        used = {s.key for s in shots}
        rest = [s for s in index if s.key not in used]
        features = extract_features(val, extractors, cfg.preprocess, cache)
        rest_features = extract_features(rest, extractors, cfg.preprocess, cache) if rest else None
        shot_features = extract_features(shots, extractors, cfg.preprocess, cache)
        calibrate(model, features, source, rest_features, shot_features)
    scores = model.calibration.scores
    return {
        "calibration": [round(x, 5) for x in scores.get("validation/good", [])],
        "unused_train": [round(x, 5) for x in scores.get("other good scans", [])],
        "cross_fitted": [round(x, 5) for x in scores.get("leave-one-out shots", [])],
    }


def record_scores(out: Path, cat: str, model, ev, raw: dict) -> None:
    """Append one model's good scores (:func:`bench_calibrate`), thresholds and test scores
    to ``out/scores.jsonl`` (for bench/gate.py and bench/calibration.py)."""
    cfg = model.config
    line = {
        "preset": preset_of(cfg.extractors),
        "method": cfg.method,
        "category": cat,
        "shots": cfg.shots,
        "seed": cfg.fewshot_seed,
        **raw,
        "threshold": model.threshold,
        "calibration_rule": model.calibration.to_dict() if model.calibration else None,
        "gate_threshold": model.gate_threshold,
        "test_scores": [round(float(x), 5) for x in ev.scores],
        "test_labels": [int(x) for x in ev.labels],
        "test_defects": list(ev.defects),
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
