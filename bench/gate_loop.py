"""The quality gate in the operator's loop: does it drift as accepted scans rebuild it?

bench/gate.py measures one gate judging every test scan. On a line the gate changes:
each scan it accepts joins the shot library, and the next rebuild calibrates the
model's gate threshold and the library check on the grown library. Scans accepted just
under a limit might raise the next limits (the gate loosens), or a growing bank might
lower them (the gate tightens). This script runs that loop on the development
categories with the real gate code and measures both.

For each category and few-shot seed, the category's test scans (good and defective)
land in a seeded random order, ``--batch`` at a time (one sensor tick each). Every scan
of a tick is judged by the gate in force (:func:`cfr_core.engine.gate.gate_decision`);
after the tick the gate is rebuilt the way the pipeline's evaluation rebuilds it. Four
policies:

* **fixed**: the first gate judges every scan (what bench/gate.py measures);
* **loop**: accepted scans join the library; the model's gate threshold is recalibrated
  on the good scans it was not fitted on (validation + unused train + accepted) and the
  library check is rebuilt on the library (:func:`~cfr_core.engine.gate.build_library_gate`,
  at most ``library_gate_scans`` of the most varied scans);
* **loop + review**: as *loop*, and a person releases the good scans the gate held
  (`cfr shots release`) before the rebuild; defective scans stay in the quarantine;
* **reviewed only**: a person releases the good scans the gate held, as in *loop +
  review*, but only they (and the original library) rebuild the gate: the scans the gate
  itself accepted join the shot pool and not the gate's calibration. This is what the
  pipeline does (only scans a person vouched for calibrate the next gate).

The model itself is not refitted (the pipeline also redraws its shots from the grown
pool): its test scores come from ``bench/results/dev/scores.jsonl`` (bench/gate.py), so
only the gate's calibration and library change here. Writes
``bench/results/gate_loop.md``, ``gate_loop.csv`` (one row per judged scan) and
``gate_loop.png`` (each limit over the ticks, relative to the first gate); the reading of
the numbers, ``gate_loop_notes.md``, is appended to the Markdown.

    .venv/bin/python bench/gate_loop.py                          # dev categories, seed 42
    .venv/bin/python bench/gate_loop.py --categories dome --batch 8
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdata import bench_data  # noqa: E402

from cfr_core.config import (  # noqa: E402
    DEFAULT_EXTRACTORS,
    DEFAULT_METHOD,
    ExtractorConfig,
    PreprocessConfig,
    ScoringConfig,
)
from cfr_core.data.synth import DEV_CATEGORIES  # noqa: E402
from cfr_core.engine import FeatureCache, build_extractors, extract_features  # noqa: E402
from cfr_core.engine.fit import library_samples, test_samples  # noqa: E402
from cfr_core.engine.gate import CHECKS, LABELS, build_library_gate, gate_decision  # noqa: E402
from cfr_core.scoring.maps import gate_threshold  # noqa: E402

OUT = ROOT / "bench" / "results"
SCORES = OUT / "dev" / "scores.jsonl"
POLICIES = ("fixed", "loop", "loop + review", "reviewed only")
MODEL = "model score"
SCORING = ScoringConfig()


def run(policy, features, n_library, record, order, batch) -> tuple[list[dict], list[dict]]:
    """Judge the test scans (``features`` after its first ``n_library``, the library) in
    ``order``, ``batch`` scans per tick, under ``policy``: one row per judged scan, and the
    gate's limits at each tick."""
    scores = record["test_scores"]
    known = record["calibration"] + record["unused_train"]  # good scans the model did not fit
    model = SimpleNamespace(category=record["category"], threshold=None)
    joined_idx: list[int] = []  # test scans that joined the library

    def rebuild() -> None:
        lib = features.select([*range(n_library), *(n_library + i for i in joined_idx)])
        model.gate_threshold = gate_threshold(
            known + [scores[i] for i in joined_idx], SCORING.gate_margin
        )
        model.library_gate = build_library_gate(
            lib, SCORING.library_gate_margin, SCORING.library_gate_scans
        )

    rebuild()
    rows, ticks = [], []
    for tick, start in enumerate(range(0, len(order), batch)):
        gate = model.library_gate
        ticks.append(
            {
                "tick": tick,
                MODEL: model.gate_threshold,
                # a check the gate did not build (no curvature, one colour) has no limit
                **{LABELS[c]: gate.limits.get(c, float("nan")) for c in CHECKS},
                "library": gate.library_size,
            }
        )
        changed = False
        for i in order[start : start + batch]:
            i = int(i)
            decision = gate_decision(model, scores[i], features.select([n_library + i]))
            good = record["test_labels"][i] == 0
            rows.append(
                {
                    "tick": tick,
                    "scan": features.keys[n_library + i],
                    "label": "good" if good else "defective",
                    "stopped": not decision.passed,
                    "failed": "; ".join(decision.failed()),
                }
            )
            released = good and not decision.passed  # a person looked and released it
            joins = {
                "fixed": False,
                "loop": decision.passed,
                "loop + review": decision.passed or released,
                "reviewed only": released,
            }[policy]
            if joins:
                joined_idx.append(i)
                changed = True
        if changed and start + batch < len(order):
            rebuild()
    return rows, ticks


def summary_rows(rows: list[dict]) -> dict:
    good = [r for r in rows if r["label"] == "good"]
    bad = [r for r in rows if r["label"] != "good"]
    return {
        "held": float(np.mean([r["stopped"] for r in good])),
        "caught": float(np.mean([r["stopped"] for r in bad])),
        "slipped_in": sum(not r["stopped"] for r in bad),
    }


def halves(rows: list[dict]) -> tuple[dict, dict]:
    """Held / caught of the first and second half of the stream (by arrival)."""
    mid = len(rows) // 2
    return summary_rows(rows[:mid]), summary_rows(rows[mid:])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(dict.fromkeys(r["category"] for r in results))
    fig, axes = plt.subplots(1, len(cats), figsize=(3.2 * len(cats), 3.2), sharey=True)
    axes = np.atleast_1d(axes)
    names = [MODEL, *(LABELS[c] for c in CHECKS)]
    for ax, cat in zip(axes, cats, strict=True):
        res = next(r for r in results if (r["category"], r["policy"]) == (cat, "loop"))
        for name in names:
            first = res["ticks"][0][name]
            ax.plot([t[name] / first for t in res["ticks"]], label=name)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(f"{cat} (seed {res['seed']}), loop")
        ax.set_xlabel("tick")
    axes[0].set_ylabel("limit / first gate's limit")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def report(results: list[dict], batch: int) -> str:
    lines = [
        "# The quality gate in the operator's loop",
        "",
        "Produced by `bench/gate_loop.py`. Each development category's test scans land in a "
        f"seeded random order, {batch} per tick; the gate judges each and, under *loop*, "
        "is rebuilt after each tick on the library with the scans it accepted (*loop + "
        "review*: and the good scans it held, released by a person; *reviewed only*: with "
        "the released scans only). The model is not "
        "refitted; its scores are those of bench/gate.py's fits. Held: good scans stopped; "
        "caught: defective scans stopped; slipped in: defective scans that joined the "
        "library.",
        "",
        "| category | seed | policy | held | caught | slipped in | 1st half held / caught "
        "| 2nd half held / caught | limits, last tick / first (model, RGB, 3D, pairing) "
        "| library |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = [MODEL, *(LABELS[c] for c in CHECKS)]
    for r in results:
        s, (h1, h2) = r["summary"], r["halves"]
        ratios = ", ".join(f"{r['ticks'][-1][n] / r['ticks'][0][n]:.2f}" for n in names)
        lines.append(
            f"| {r['category']} | {r['seed']} | {r['policy']} | {s['held']:.2f} | "
            f"{s['caught']:.2f} | {s['slipped_in']} | {h1['held']:.2f} / {h1['caught']:.2f} "
            f"| {h2['held']:.2f} / {h2['caught']:.2f} | {ratios} | "
            f"{r['ticks'][0]['library']} → {r['ticks'][-1]['library']} |"
        )
    lines += ["", "Means over categories and seeds:", ""]
    lines += ["| policy | held | caught | slipped in (sum) |", "|---|---|---|---|"]
    for policy in POLICIES:
        sel = [r["summary"] for r in results if r["policy"] == policy]
        if sel:
            lines.append(
                f"| {policy} | {np.mean([s['held'] for s in sel]):.3f} | "
                f"{np.mean([s['caught'] for s in sel]):.3f} | {sum(s['slipped_in'] for s in sel)} |"
            )
    lines += ["", "Good scans held, by the checks that failed (all policies):", ""]
    lines += ["| category | policy | scan | tick | failed |", "|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            if row["label"] == "good" and row["stopped"]:
                lines.append(
                    f"| {r['category']} | {r['policy']} | {row['scan']} | {row['tick']} | "
                    f"{row['failed']} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--categories", nargs="+", default=list(DEV_CATEGORIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[42])
    ap.add_argument("--batch", type=int, default=6, help="scans per sensor tick (default 6)")
    ap.add_argument(
        "--policies", nargs="+", choices=POLICIES, default=list(POLICIES), metavar="POLICY",
        help=f"policies to run (default all: {', '.join(repr(p) for p in POLICIES)})",
    )  # fmt: skip
    ap.add_argument(
        "--out", type=Path, default=OUT / "gate_loop",
        help="where to write: OUT.md, OUT.csv and OUT.png (default bench/results/gate_loop); "
        "OUT_notes.md, when it exists, is appended to OUT.md",
    )  # fmt: skip
    args = ap.parse_args()
    if args.batch < 1:
        ap.error(f"--batch must be at least 1 scan per tick, got {args.batch}")
    policies = [p for p in POLICIES if p in args.policies]
    logging.basicConfig(level=logging.WARNING)
    if not SCORES.exists():
        sys.exit(f"{SCORES} is missing: run bench/gate.py collect (see bench/gate.py)")
    records = [json.loads(line) for line in SCORES.read_text().splitlines()]
    data, pre = bench_data(), PreprocessConfig()
    cache = FeatureCache(ROOT / "bench" / ".cache" / "features")
    extractors = build_extractors(ExtractorConfig.preset(DEFAULT_EXTRACTORS))
    results = []
    for cat in args.categories:
        lib_s, test_s = library_samples(data, cat), test_samples(data, cat)
        features = extract_features(lib_s + test_s, extractors, pre, cache)
        for seed in args.seeds:
            record = next(
                (
                    r
                    for r in records
                    if (r["category"], r["seed"], r["method"], r["preset"], r["shots"])
                    == (cat, seed, DEFAULT_METHOD, DEFAULT_EXTRACTORS, 4)
                ),
                None,
            )
            if record is None:
                sys.exit(f"no scores of {cat}, seed {seed} in {SCORES}")
            if record["test_labels"] != [s.label for s in test_s]:
                sys.exit(f"{cat}: the benchmark's test split differs from {SCORES}")
            order = np.random.default_rng(seed).permutation(len(test_s))
            for policy in policies:
                t0 = time.perf_counter()
                rows, ticks = run(policy, features, len(lib_s), record, order, args.batch)
                res = {
                    "category": cat,
                    "seed": seed,
                    "policy": policy,
                    "rows": rows,
                    "ticks": ticks,
                    "summary": summary_rows(rows),
                    "halves": halves(rows),
                }
                results.append(res)
                s = res["summary"]
                print(
                    f"{cat} seed {seed} {policy}: held {s['held']:.2f}, caught "
                    f"{s['caught']:.2f}, {s['slipped_in']} defective joined the library "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    md = report(results, args.batch)
    notes = out.with_name(out.name + "_notes.md")
    if notes.exists():  # the reading of the numbers, written by hand
        md += "\n" + notes.read_text()
    tmp = out.with_name(out.name + ".md.tmp")
    tmp.write_text(md)
    tmp.replace(out.with_name(out.name + ".md"))
    tmp = out.with_name(out.name + ".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "seed", "policy", "tick", "scan", "label", "stopped", "failed"])
        for r in results:
            for row in r["rows"]:
                w.writerow(
                    [r["category"], r["seed"], r["policy"], row["tick"], row["scan"],
                     row["label"], int(row["stopped"]), row["failed"]]
                )  # fmt: skip
    tmp.replace(out.with_name(out.name + ".csv"))
    if any(r["policy"] == "loop" for r in results):
        plot(results, out.with_name(out.name + ".png"))
    print(md)


if __name__ == "__main__":
    main()
