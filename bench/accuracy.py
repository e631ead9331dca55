"""Accuracy benchmark: methods × shots × few-shot seeds × synthetic categories.

Rerun from a clean clone with ``.venv/bin/python bench/accuracy.py`` (about
30 min on 2 cores; ``--quick`` for a 2-minute smoke run). It generates the
synthetic benchmark (seed 0, 256 px) unless ``--data`` points to a dataset,
fits every method with the offline extractors, and writes under ``--out``:

* ``accuracy.csv``   one row per (method, category, shots, seed)
* ``accuracy.md``    mean ± spread tables (per method and shots, per category,
  one-to-many categories separately, replacement rates, θ sweep)
* ``accuracy.png``   mean I-AUROC per method and shot count

The CFR family (cfr, cfr-noreplace, cfr-nn, cfr-cond) shares one fit per
(category, shots, seed): the mappers and banks are identical by construction,
only inference differs, so each variant is evaluated on the same fitted parts.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfr_core.config import FitConfig  # noqa: E402
from cfr_core.data.mvtec import list_categories  # noqa: E402
from cfr_core.data.synth import SynthConfig, generate  # noqa: E402
from cfr_core.engine import FeatureCache, build_extractors, evaluate, fit  # noqa: E402

FAMILY = ("cfr", "cfr-noreplace", "cfr-nn", "cfr-cond")
METHODS = (*FAMILY, "cfm", "btf")
ONE_TO_MANY = ("candy", "speckled")
FIELDS = [
    "method",
    "category",
    "shots",
    "seed",
    "theta",
    "image_auroc",
    "pixel_auroc",
    "aupro_30",
    "aupro_01",
    "replacement_rate",
    "fit_seconds",
]


def variant(model, method: str, theta: float | None = None):
    out = copy.copy(model)
    scoring = model.config.scoring if theta is None else replace(model.config.scoring, theta=theta)
    out.config = replace(model.config, method=method, scoring=scoring)
    return out


def row(method, category, shots, seed, theta, ev, fit_seconds):
    r = ev.report
    return {
        "method": method,
        "category": category,
        "shots": shots,
        "seed": seed,
        "theta": theta,
        "image_auroc": round(r.image_auroc, 4),
        "pixel_auroc": round(r.pixel_auroc, 4),
        "aupro_30": round(r.aupro[0.3], 4),
        "aupro_01": round(r.aupro[0.01], 4),
        "replacement_rate": round(ev.replacement_rate, 4),
        "fit_seconds": round(fit_seconds, 1),
    }


def run(args) -> list[dict]:
    data = args.data
    if data is None:
        data = ROOT / "bench" / ".data" / f"synth-{args.size}"
        if not data.exists():
            generate(data, SynthConfig(size=args.size, seed=0))
    cats = args.categories.split(",") if args.categories else list_categories(data)
    cache = FeatureCache(ROOT / "bench" / ".cache" / "features")
    out_csv = args.out / "accuracy.csv"
    done: list[dict] = []
    if args.resume and out_csv.exists():
        with open(out_csv) as fh:
            done = list(csv.DictReader(fh))
    seen = {(d["method"], d["category"], int(d["shots"]), int(d["seed"]), d["theta"]) for d in done}
    rows = list(done)
    base = FitConfig()
    extractors = build_extractors(base.extractors)
    epochs = {
        "mappers": replace(base.mappers, epochs=args.epochs),
        "retriever": replace(base.retriever, epochs=args.epochs),
    }

    def record(r):
        rows.append(r)
        args.out.mkdir(parents=True, exist_ok=True)
        new = not out_csv.exists()
        with open(out_csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(r)
        print(
            f"{r['category']:<9} {r['shots']}-shot seed {r['seed']} {r['method']:<14} θ={r['theta']:<5} "
            f"I-AUROC {r['image_auroc']:.3f}  AUPRO@30% {r['aupro_30']:.3f}  replaced {r['replacement_rate']:.3f}",
            flush=True,
        )

    theta_default = str(base.scoring.theta)

    def evaluated(method, fitted, key, fit_s, theta=theta_default):
        cat, shots, seed = key
        ev = evaluate(fitted, data, cache, extractors)
        record(row(method, cat, shots, seed, theta, ev, fit_s))

    for seed in args.seeds:
        for shots in args.shots:
            for cat in cats:
                key = (cat, shots, seed)
                if all((m, *key, theta_default) in seen for m in METHODS):
                    continue
                t0 = time.perf_counter()
                cfg = replace(FitConfig.for_method("cfr", shots=shots, fewshot_seed=seed), **epochs)
                model = fit(data, cat, cfg, cache, extractors)
                fit_s = time.perf_counter() - t0
                for method in FAMILY:
                    evaluated(method, variant(model, method), key, fit_s)
                for theta in args.thetas:
                    if str(theta) != theta_default:
                        evaluated("cfr", variant(model, "cfr", theta), key, fit_s, str(theta))
                for method in ("cfm", "btf"):
                    t0 = time.perf_counter()
                    cfg = FitConfig.for_method(method, shots=shots, fewshot_seed=seed)
                    cfg = replace(cfg, mappers=replace(cfg.mappers, epochs=args.epochs))
                    m = fit(data, cat, cfg, cache, extractors)
                    fit_s = time.perf_counter() - t0
                    evaluated(method, m, key, fit_s)
    return rows


def _ms(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def summarise(rows: list[dict], out: Path, theta_default: str) -> str:
    for r in rows:
        for k in ("image_auroc", "pixel_auroc", "aupro_30", "aupro_01", "replacement_rate"):
            r[k] = float(r[k])
        r["shots"], r["seed"] = int(r["shots"]), int(r["seed"])
    main = [r for r in rows if r["theta"] == theta_default]
    cats = sorted({r["category"] for r in main})
    shots = sorted({r["shots"] for r in main})
    seeds = sorted({r["seed"] for r in main})
    lines = [
        "# Accuracy on the synthetic benchmark (offline extractors)",
        "",
        f"Produced by `bench/accuracy.py`. Categories: {', '.join(cats)}; few-shot seeds: "
        f"{', '.join(map(str, seeds))}. Each cell: mean over seeds of the category mean, ± the spread "
        "(standard deviation) of that mean across seeds. Values in [0, 1].",
        "",
    ]

    def seed_means(method, shot, metric, subset):
        out = []
        for s in seeds:
            vals = [
                r[metric]
                for r in main
                if r["method"] == method
                and r["shots"] == shot
                and r["seed"] == s
                and r["category"] in subset
            ]
            if vals:
                out.append(np.mean(vals))
        return out

    for title, subset in (
        ("All categories", cats),
        ("One-to-many categories (candy, speckled)", [c for c in cats if c in ONE_TO_MANY]),
    ):
        if not subset:
            continue
        lines += [
            f"## {title}",
            "",
            "| method | shots | I-AUROC | P-AUROC | AUPRO@30% | AUPRO@1% | replaced |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            for shot in shots:
                cells = [
                    _ms(seed_means(method, shot, m, subset))
                    for m in (
                        "image_auroc",
                        "pixel_auroc",
                        "aupro_30",
                        "aupro_01",
                        "replacement_rate",
                    )
                ]
                if seed_means(method, shot, "image_auroc", subset):
                    lines.append(f"| {method} | {shot} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Per category (I-AUROC / AUPRO@30%, mean over seeds)",
        "",
        "| method | shots | " + " | ".join(cats) + " |",
        "|---|---|" + "---|" * len(cats),
    ]
    for method in METHODS:
        for shot in shots:
            cells = []
            for c in cats:
                sel = [
                    r
                    for r in main
                    if r["method"] == method and r["shots"] == shot and r["category"] == c
                ]
                cells.append(
                    f"{np.mean([r['image_auroc'] for r in sel]):.3f} / "
                    f"{np.mean([r['aupro_30'] for r in sel]):.3f}"
                    if sel
                    else "-"
                )
            lines.append(f"| {method} | {shot} | " + " | ".join(cells) + " |")
    sweep = [r for r in rows if r["method"] == "cfr"]
    thetas = sorted({r["theta"] for r in sweep}, key=float)
    if len(thetas) > 1:
        lines += [
            "",
            "## θ sweep (cfr; mean over categories and seeds: I-AUROC / AUPRO@30% / replaced)",
            "",
            "| shots | " + " | ".join(f"θ={t}" for t in thetas) + " |",
            "|---|" + "---|" * len(thetas),
        ]
        for shot in shots:
            cells = []
            for t in thetas:
                sel = [r for r in sweep if r["theta"] == t and r["shots"] == shot]
                cells.append(
                    f"{np.mean([r['image_auroc'] for r in sel]):.3f} / {np.mean([r['aupro_30'] for r in sel]):.3f}"
                    f" / {np.mean([r['replacement_rate'] for r in sel]):.3f}"
                    if sel
                    else "-"
                )
            lines.append(f"| {shot} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    notes = out / "accuracy_notes.md"
    if notes.exists():  # the hand-written reading of the numbers, kept across reruns
        text += "\n" + notes.read_text()
    (out / "accuracy.md").write_text(text)
    _plot(main, out / "accuracy.png", shots)
    return text


def _plot(rows, path: Path, shots) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    width = 0.8 / len(shots)
    for j, shot in enumerate(shots):
        means = [
            np.mean(
                [r["image_auroc"] for r in rows if r["method"] == m and r["shots"] == shot]
                or [np.nan]
            )
            for m in METHODS
        ]
        ax.bar(np.arange(len(METHODS)) + j * width, means, width, label=f"{shot}-shot")
    ax.set_xticks(np.arange(len(METHODS)) + width * (len(shots) - 1) / 2, METHODS)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("mean I-AUROC")
    ax.set_title("Synthetic benchmark, offline extractors")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", type=Path, help="MVTec-layout dataset (default: generate the synthetic one)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--categories", help="comma-separated (default: all)")
    p.add_argument("--shots", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44])
    p.add_argument(
        "--thetas", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.1, 0.2, 0.4]
    )
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--resume", action="store_true", help="keep rows already in accuracy.csv")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 1 shot, 10 epochs, 2 categories"
    )
    p.add_argument(
        "--summarise", action="store_true", help="only rewrite the reports from accuracy.csv"
    )
    args = p.parse_args()
    if args.quick:
        args.seeds, args.shots, args.epochs = [42], [1], 10
        args.categories = args.categories or "dome,speckled"
        args.out = args.out / "quick"
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        with open(args.out / "accuracy.csv") as fh:
            rows = list(csv.DictReader(fh))
        print(summarise(rows, args.out, str(FitConfig().scoring.theta)))
        return
    if not args.resume and (args.out / "accuracy.csv").exists():
        (args.out / "accuracy.csv").unlink()
    rows = run(args)
    print(summarise(rows, args.out, str(FitConfig().scoring.theta)))


if __name__ == "__main__":
    main()
