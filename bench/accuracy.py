"""Accuracy benchmark: presets × methods × shots × few-shot seeds × categories.

    .venv/bin/python bench/accuracy.py                     # report categories (the default)
    .venv/bin/python bench/accuracy.py --split dev         # development categories
    .venv/bin/python bench/accuracy.py --data OTHER_ROOT   # any MVTec-layout dataset

Defaults are chosen on development categories (bench/develop.py) and only
*measured* on report categories: run `--split report` once the choices are
frozen. A dataset written by `cfr data synth` (or any generator that writes the
same synth.json manifest) says which categories are development or report and
which are one-to-many; for other datasets, pass --categories and --one-to-many.

The CFR family (cfr, cfr-noreplace, cfr-nn, cfr-cond, cfr-bank) shares one fit
per (preset, category, shots, seed): the family differs only at inference. CFM
and BTF are fitted on their own. Writes to --out:

* ``accuracy.csv``  one row per (preset, method, category, shots, seed)
* ``accuracy.md``   mean ± spread over seeds; one-to-many categories; per category;
  the targets (CFR family vs the best of CFM and BTF, AUPRO@30 %, 4-shot ≥ 1-shot)
* ``accuracy.png``  mean I-AUROC per method, shot count and preset
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdata import bench_calibrate, bench_data, record_scores  # noqa: E402

from cfr_core.config import (  # noqa: E402
    DEFAULT_EXTRACTORS,
    DEFAULT_METHOD,
    ExtractorConfig,
    FitConfig,
)
from cfr_core.data.mvtec import list_categories  # noqa: E402
from cfr_core.data.synth import ONE_TO_MANY_KINDS  # noqa: E402
from cfr_core.engine import FeatureCache, build_extractors, evaluate, fit  # noqa: E402

FAMILY = ("cfr", "cfr-bank", "cfr-noreplace", "cfr-nn", "cfr-cond")
BASELINES = ("cfm", "btf")
FIELDS = [
    "preset",
    "method",
    "category",
    "kind",
    "shots",
    "seed",
    "theta",
    "image_auroc",
    "pixel_auroc",
    "aupro_30",
    "aupro_01",
    "replacement_rate",
    "threshold",
    "false_reject_rate",
    "escape_rate",
    "oracle_escape_rate",
    "target_supported",
    "fit_seconds",
]


def manifest(data: Path) -> dict:
    path = data / "synth.json"
    return json.loads(path.read_text()).get("categories", {}) if path.exists() else {}


def choose_categories(args, data: Path) -> tuple[list[str], set[str], dict[str, str]]:
    """(categories, one-to-many categories, kind per category) for this run."""
    info = manifest(data)
    kinds = {c: v.get("kind", "") for c, v in info.items()}
    if args.categories:
        cats = args.categories
    else:
        cats = list_categories(data)
        if args.split != "all" and info:
            want = {"dev": "development", "report": "report"}[args.split]
            cats = [c for c in cats if info.get(c, {}).get("split") == want]
    if args.one_to_many is not None:
        o2m = set(args.one_to_many)
    else:
        o2m = {c for c in cats if kinds.get(c) in ONE_TO_MANY_KINDS}
    return cats, o2m, kinds


def config(preset: str, method: str, shots: int, seed: int, epochs: int) -> FitConfig:
    cfg = FitConfig.for_method(
        method, shots=shots, fewshot_seed=seed, extractors=ExtractorConfig.preset(preset)
    )
    return replace(
        cfg,
        mappers=replace(cfg.mappers, epochs=epochs),
        retriever=replace(cfg.retriever, epochs=epochs),
    )


def row(preset, method, category, kind, shots, seed, model, ev, fit_seconds) -> dict:
    r = ev.report
    return {
        "preset": preset,
        "method": method,
        "category": category,
        "kind": kind,
        "shots": shots,
        "seed": seed,
        "theta": "" if model.theta is None else round(model.theta, 4),
        "image_auroc": round(r.image_auroc, 4),
        "pixel_auroc": round(r.pixel_auroc, 4),
        "aupro_30": round(r.aupro[0.3], 4),
        "aupro_01": round(r.aupro[0.01], 4),
        "replacement_rate": round(ev.replacement_rate, 4),
        **verdict_cells(model, ev),
        "fit_seconds": round(fit_seconds, 1),
    }


def verdict_cells(model, ev) -> dict:
    """The line's numbers at the model's calibrated threshold (blank without one)."""
    v = ev.verdicts

    def cell(x):
        return "" if x is None else round(x, 4)

    return {
        "threshold": cell(model.threshold),
        "false_reject_rate": cell(v.false_reject_rate),
        "escape_rate": cell(v.escape_rate),
        "oracle_escape_rate": cell(v.oracle_escape_rate),
        "target_supported": "" if model.calibration is None else model.calibration.supported,
    }


def run(args, data: Path, cats: list[str], kinds: dict[str, str]) -> list[dict]:
    cache = FeatureCache(ROOT / "bench" / ".cache" / "features")
    out_csv = args.out / "accuracy.csv"
    rows: list[dict] = []
    if args.resume and out_csv.exists():
        with open(out_csv) as fh:
            rows = list(csv.DictReader(fh))
    seen = {
        (r["preset"], r["method"], r["category"], int(r["shots"]), int(r["seed"])) for r in rows
    }

    def record(r: dict) -> None:
        rows.append(r)
        args.out.mkdir(parents=True, exist_ok=True)
        new = not out_csv.exists()
        with open(out_csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(r)
        print(
            f"{r['preset']:<8} {r['category']:<9} {r['shots']}-shot seed {r['seed']} "
            f"{r['method']:<14} I-AUROC {r['image_auroc']:.3f}  AUPRO@30% {r['aupro_30']:.3f}  "
            f"replaced {r['replacement_rate']:.3f}  false rejects {r['false_reject_rate']}  "
            f"escapes {r['escape_rate']} (oracle {r['oracle_escape_rate']})",
            flush=True,
        )

    family = [m for m in args.methods if m in FAMILY or m.startswith("cfr")]
    for preset in args.presets:
        extractors = build_extractors(ExtractorConfig.preset(preset))
        for seed in args.seeds:
            for shots in args.shots:
                for cat in cats:
                    todo = [m for m in args.methods if (preset, m, cat, shots, seed) not in seen]
                    if not todo:
                        continue
                    kind = kinds.get(cat, "")
                    if any(m in family for m in todo):
                        t0 = time.perf_counter()
                        # fitted as the default when it is asked for, so that its calibration
                        # is fit's own; the other family members are recalibrated
                        base = DEFAULT_METHOD if DEFAULT_METHOD in todo else "cfr"
                        model = fit(
                            data,
                            cat,
                            config(preset, base, shots, seed, args.epochs),
                            cache,
                            extractors,
                        )
                        fit_s = time.perf_counter() - t0
                        for method in (m for m in todo if m in family):
                            variant = model.variant(method)
                            raw = bench_calibrate(variant, data, cat, cache, extractors)
                            ev = evaluate(variant, data, cache, extractors)
                            record(row(preset, method, cat, kind, shots, seed, variant, ev, fit_s))
                            if method == DEFAULT_METHOD:
                                record_scores(args.out, cat, variant, ev, raw)
                    for method in (m for m in todo if m in BASELINES):
                        t0 = time.perf_counter()
                        model = fit(
                            data,
                            cat,
                            config(preset, method, shots, seed, args.epochs),
                            cache,
                            extractors,
                        )
                        fit_s = time.perf_counter() - t0
                        raw = bench_calibrate(model, data, cat, cache, extractors)
                        ev = evaluate(model, data, cache, extractors)
                        record(row(preset, method, cat, kind, shots, seed, model, ev, fit_s))
                        record_scores(args.out, cat, model, ev, raw)
    return rows


# ----------------------------------------------------------------------------- report


def _ms(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def seed_means(rows, preset, method, shots, metric, cats) -> list[float]:
    """Per seed, the mean over ``cats`` (a seed counts only when every category has a row)."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        vals = [
            r[metric]
            for r in rows
            if (r["preset"], r["method"], r["shots"], r["seed"]) == (preset, method, shots, seed)
            and r["category"] in cats
        ]
        if vals and len(vals) == len(cats):
            out.append(float(np.mean(vals)))
    return out


def summarise(rows: list[dict], out: Path, o2m: set[str], title: str) -> str:
    for r in rows:
        for k in ("image_auroc", "pixel_auroc", "aupro_30", "aupro_01", "replacement_rate"):
            r[k] = float(r[k])
        r["shots"], r["seed"] = int(r["shots"]), int(r["seed"])
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cats = sorted({r["category"] for r in rows})
    o2m_cats = [c for c in cats if c in o2m]
    shots = sorted({r["shots"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"# Accuracy: {title}",
        "",
        f"Produced by `bench/accuracy.py`. Categories: {', '.join(cats)} (one-to-many: "
        f"{', '.join(o2m_cats) or 'none'}); few-shot seeds {', '.join(map(str, seeds))}. Each "
        "cell: mean over seeds of the category mean ± the spread (standard deviation) of that "
        "mean across seeds. Values in [0, 1].",
        "",
    ]
    for preset in presets:
        for subset_title, subset in (
            ("all categories", cats),
            ("one-to-many categories", o2m_cats),
        ):
            if not subset:
                continue
            lines += [
                f"## {preset} preset, {subset_title}",
                "",
                "| method | shots | I-AUROC | P-AUROC | AUPRO@30% | AUPRO@1% | replaced |",
                "|---|---|---|---|---|---|---|",
            ]
            for method in methods:
                for shot in shots:
                    if not seed_means(rows, preset, method, shot, "image_auroc", subset):
                        continue
                    cells = [
                        _ms(seed_means(rows, preset, method, shot, m, subset))
                        for m in (
                            "image_auroc",
                            "pixel_auroc",
                            "aupro_30",
                            "aupro_01",
                            "replacement_rate",
                        )
                    ]
                    lines.append(f"| {method} | {shot} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [
            f"## {preset} preset, per category (I-AUROC / AUPRO@30%, mean over seeds)",
            "",
            "| method | shots | " + " | ".join(cats) + " |",
            "|---|---|" + "---|" * len(cats),
        ]
        for method in methods:
            for shot in shots:
                cells = []
                for c in cats:
                    sel = [
                        r
                        for r in rows
                        if (r["preset"], r["method"], r["shots"], r["category"])
                        == (preset, method, shot, c)
                    ]
                    cells.append(
                        f"{np.mean([r['image_auroc'] for r in sel]):.3f} / {np.mean([r['aupro_30'] for r in sel]):.3f}"
                        if sel
                        else "-"
                    )
                if any(c != "-" for c in cells):
                    lines.append(f"| {method} | {shot} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += verdict_table(rows, preset, methods, shots)
        lines += targets(rows, preset, methods, shots, cats, o2m_cats)
    text = "\n".join(lines) + "\n"
    notes = out / "accuracy_notes.md"
    if notes.exists():  # the hand-written reading of the numbers, kept across reruns
        text += "\n" + notes.read_text()
    (out / "accuracy.md").write_text(text)
    _plot(rows, out / "accuracy.png", presets, methods, shots)
    return text


def verdict_table(rows, preset, methods, shots) -> list[str]:
    """False rejects and escapes at each model's calibrated threshold, and the oracle's
    escapes at the same false-reject rate (means over categories and seeds)."""

    def num(r, k):
        try:
            return float(r[k])
        except (KeyError, TypeError, ValueError):
            return None

    out = [
        f"## {preset} preset, the line at the calibrated threshold (mean over categories and "
        "seeds)",
        "",
        "| method | shots | good parts rejected | defective parts passed | oracle passed "
        "| gap | target supported |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        for shot in shots:
            sel = [
                r
                for r in rows
                if (r["preset"], r["method"], r["shots"]) == (preset, method, shot)
                and num(r, "false_reject_rate") is not None
            ]
            if not sel:
                continue
            frr = np.mean([num(r, "false_reject_rate") for r in sel])
            esc = np.mean([num(r, "escape_rate") for r in sel])
            orc = np.mean([num(r, "oracle_escape_rate") for r in sel])
            sup = np.mean([str(r.get("target_supported")) == "True" for r in sel])
            out.append(
                f"| {method} | {shot} | {frr:.1%} | {esc:.1%} | {orc:.1%} | "
                f"{(esc - orc) * 100:+.1f} pt | {sup:.0%} of {len(sel)} |"
            )
    return [*out, ""]


def targets(rows, preset, methods, shots, cats, o2m_cats) -> list[str]:
    """The accuracy issue's targets, checked on this preset's rows."""

    def mean(method, shot, metric, subset):
        v = seed_means(rows, preset, method, shot, metric, subset)
        return float(np.mean(v)) if v else float("nan")

    family = [m for m in methods if m.startswith("cfr")]
    base = [m for m in methods if m in BASELINES]
    out = [f"### Targets ({preset} preset)", "", "| target | value | met |", "|---|---|---|"]
    for shot in shots:
        if o2m_cats and family and base:
            best_f = max(family, key=lambda m: mean(m, shot, "image_auroc", o2m_cats))
            best_b = max(base, key=lambda m: mean(m, shot, "image_auroc", o2m_cats))
            f, b = (
                mean(best_f, shot, "image_auroc", o2m_cats),
                mean(best_b, shot, "image_auroc", o2m_cats),
            )
            out.append(
                f"| {shot}-shot one-to-many I-AUROC: best CFR family ({best_f}) ≥ best of CFM/BTF "
                f"({best_b}) | {f:.3f} vs {b:.3f} | {'yes' if f >= b else f'no (by {b - f:.3f})'} |"
            )
        for m in methods:
            a = mean(m, shot, "aupro_30", cats)
            if not np.isnan(a):
                out.append(
                    f"| {shot}-shot {m} mean AUPRO@30% ≥ 0.90 | {a:.3f} | "
                    f"{'yes' if a >= 0.9 else f'no (by {0.9 - a:.3f})'} |"
                )
    if 1 in shots and 4 in shots:
        for m in methods:
            one, four = mean(m, 1, "image_auroc", cats), mean(m, 4, "image_auroc", cats)
            if not (np.isnan(one) or np.isnan(four)):
                out.append(
                    f"| {m}: 4-shot ≥ 1-shot I-AUROC | {four:.3f} vs {one:.3f} | {'yes' if four >= one else 'no'} |"
                )
    return [*out, ""]


def _plot(rows, path: Path, presets, methods, shots) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(presets), figsize=(4.5 * len(presets), 3.6), dpi=110, squeeze=False
    )
    width = 0.8 / len(shots)
    for ax, preset in zip(axes[0], presets, strict=True):
        for j, shot in enumerate(shots):
            means = [
                np.mean(
                    [
                        r["image_auroc"]
                        for r in rows
                        if (r["preset"], r["method"], r["shots"]) == (preset, m, shot)
                    ]
                    or [np.nan]
                )
                for m in methods
            ]
            ax.bar(np.arange(len(methods)) + j * width, means, width, label=f"{shot}-shot")
        ax.set_xticks(np.arange(len(methods)) + width * (len(shots) - 1) / 2, methods, rotation=30)
        ax.set_ylim(0.4, 1.0)
        ax.set_title(f"{preset} preset")
        ax.set_ylabel("mean I-AUROC")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    csv_list = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    int_list = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument(
        "--data", type=Path, help="MVTec-layout dataset (default: the synthetic benchmark)"
    )
    p.add_argument("--split", choices=["dev", "report", "all"], default="report")
    p.add_argument(
        "--categories", type=csv_list, help="comma-separated (default: those of --split)"
    )
    p.add_argument(
        "--one-to-many",
        type=csv_list,
        help="which categories are one-to-many (default: from synth.json)",
    )
    p.add_argument("--presets", type=csv_list, default=[DEFAULT_EXTRACTORS, "offline"])
    p.add_argument("--methods", type=csv_list, default=[*FAMILY, *BASELINES])
    p.add_argument("--shots", type=int_list, default=[1, 4])
    p.add_argument("--seeds", type=int_list, default=[42, 43, 44])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument(
        "--out", type=Path, help="default: bench/results/accuracy (report) or bench/results/dev"
    )
    p.add_argument("--resume", action="store_true", help="keep rows already in accuracy.csv")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 shot, 10 epochs")
    p.add_argument(
        "--summarise", action="store_true", help="only rewrite the reports from accuracy.csv"
    )
    args = p.parse_args()
    if args.quick:
        args.seeds, args.shots, args.epochs = [42], [1], 10
    if args.out is None:
        sub = {"report": "accuracy", "dev": "dev", "all": "accuracy-all"}[args.split]
        args.out = ROOT / "bench" / "results" / (sub if not args.quick else f"quick-{sub}")
    logging.basicConfig(level=logging.WARNING)
    data = args.data or bench_data()
    cats, o2m, kinds = choose_categories(args, data)
    title = (
        f"{args.split} categories of {data.name}" if not args.categories else f"{', '.join(cats)}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        with open(args.out / "accuracy.csv") as fh:
            rows = list(csv.DictReader(fh))
        print(summarise(rows, args.out, o2m, title))
        return
    if not args.resume:
        for name in ("accuracy.csv", "scores.jsonl"):
            (args.out / name).unlink(missing_ok=True)
    rows = run(args, data, cats, kinds)
    print(summarise(rows, args.out, o2m, title))


if __name__ == "__main__":
    main()
