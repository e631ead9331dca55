"""The synthetic benchmark data that bench/accuracy.py, bench/develop.py and bench/speed.py share.

Seed 0, 256 px, every category (development and report), 8 train, 4 validation,
20 good and 8 of each defect per category in test (more test parts than the
generator's default, so that a difference of ~0.02 I-AUROC is not noise alone).
"""

from __future__ import annotations

from pathlib import Path

from cfr_core.data.synth import DEV_CATEGORIES, REPORT_CATEGORIES, SynthConfig, generate

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
