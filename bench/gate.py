"""The quality gate: how often it quarantines good scans, and how many defective scans it stops.

New "good" scans that operators drop into the landing folder are scored by the
deployed model before they may enter the shot library; a scan above the gate
threshold is quarantined. This script fits the pipeline's model (default
preset, 4 shots, the calibration the pipeline uses: validation/good), scores
every test scan of a category, and measures for each candidate gate rule:

* **false quarantine**: the share of good test scans (never seen by the model)
  above the gate threshold — good parts an operator would have to release;
* **catch rate**: the share of defective test scans above the gate threshold.

The rule is chosen on the development categories (``--split dev``), then the
report categories are measured with it. Writes ``bench/results/gate.{md,csv}``.

    .venv/bin/python bench/gate.py --split dev
    .venv/bin/python bench/gate.py --split report
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdata import bench_data  # noqa: E402

from cfr_core.config import DEFAULT_EXTRACTORS, ExtractorConfig, FitConfig  # noqa: E402
from cfr_core.data.synth import DEV_CATEGORIES, REPORT_CATEGORIES  # noqa: E402
from cfr_core.engine import FeatureCache, build_extractors, evaluate, fit  # noqa: E402
from cfr_core.engine.features import extract_features  # noqa: E402
from cfr_core.engine.fit import calibration_samples  # noqa: E402
from cfr_core.engine.infer import infer  # noqa: E402

MARGINS = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5)
OUT = ROOT / "bench" / "results"


def scores(
    data: Path, cat: str, seed: int, preset: str, shots: int, epochs: int, cache, extractors
):
    """(calibration scores, test scores, test labels) of the pipeline's model."""
    cfg = FitConfig.for_method(
        "cfr", shots=shots, fewshot_seed=seed, extractors=ExtractorConfig.preset(preset)
    )
    cfg = replace(
        cfg,
        mappers=replace(cfg.mappers, epochs=epochs),
        retriever=replace(cfg.retriever, epochs=epochs),
    )
    model = fit(data, cat, cfg, cache, extractors)
    from cfr_core.data.fewshot import select_shots
    from cfr_core.data.mvtec import index_category

    shots_used = select_shots(index_category(data, cat).require_train(), shots, seed).samples
    val, _ = calibration_samples(data, cat, shots_used)
    cal = infer(model, extract_features(val, extractors, cfg.preprocess, cache)).scores.numpy()
    ev = evaluate(model, data, cache, extractors)
    return cal, ev.scores, ev.labels


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--split", choices=["dev", "report"], default="dev")
    p.add_argument("--preset", default=DEFAULT_EXTRACTORS)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--margin", type=float, help="the chosen margin (report: measure only this one)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = bench_data()
    cats = DEV_CATEGORIES if args.split == "dev" else REPORT_CATEGORIES
    cache = FeatureCache(ROOT / "bench" / ".cache" / "features")
    extractors = build_extractors(ExtractorConfig.preset(args.preset))
    margins = MARGINS if args.margin is None else (args.margin,)
    rows = []
    for seed in args.seeds:
        for cat in cats:
            cal, test, labels = scores(
                data, cat, seed, args.preset, args.shots, args.epochs, cache, extractors
            )
            for m in margins:
                gate = float(cal.max() * (1 + m))
                good, bad = test[labels == 0], test[labels == 1]
                rows.append(
                    {
                        "split": args.split,
                        "category": cat,
                        "seed": seed,
                        "margin": m,
                        "gate": round(gate, 4),
                        "false_quarantine": round(float((good > gate).mean()), 4),
                        "caught": round(float((bad > gate).mean()), 4),
                        "n_good": len(good),
                        "n_defective": len(bad),
                    }
                )
            print(
                f"{cat} seed {seed}: "
                + "  ".join(
                    f"m={r['margin']}: FQ {r['false_quarantine']:.2f} caught {r['caught']:.2f}"
                    for r in rows[-len(margins) :]
                ),
                flush=True,
            )
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"gate-{args.split}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summarise()


def summarise() -> None:
    lines = [
        "# The quality gate: false quarantine and catch rate",
        "",
        "Produced by `bench/gate.py`. The gate threshold is the highest score of the normal "
        "calibration scans (validation/good, as in the pipeline) × (1 + margin). False "
        "quarantine: good test scans above it; caught: defective test scans above it. Mean "
        "over categories and few-shot seeds (4 shots, the pipeline's default preset).",
        "",
    ]
    for split in ("dev", "report"):
        path = OUT / f"gate-{split}.csv"
        if not path.exists():
            continue
        rows = list(csv.DictReader(open(path)))
        title = (
            "Development categories (where the margin is chosen)"
            if split == "dev"
            else "Report categories (measured with the chosen margin)"
        )
        lines += [
            f"## {title}",
            "",
            "| margin | false quarantine | caught | per category (FQ / caught) |",
            "|---|---|---|---|",
        ]
        for m in sorted({float(r["margin"]) for r in rows}):
            sel = [r for r in rows if float(r["margin"]) == m]
            fq = np.mean([float(r["false_quarantine"]) for r in sel])
            caught = np.mean([float(r["caught"]) for r in sel])
            per = ", ".join(
                f"{c} {np.mean([float(r['false_quarantine']) for r in sel if r['category'] == c]):.2f} / "
                f"{np.mean([float(r['caught']) for r in sel if r['category'] == c]):.2f}"
                for c in dict.fromkeys(r["category"] for r in sel)
            )
            lines.append(f"| {m:g} | {fq:.3f} | {caught:.3f} | {per} |")
        lines.append("")
    notes = OUT / "gate_notes.md"
    if notes.exists():
        lines.append(notes.read_text())
    (OUT / "gate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
