"""The quality gate: how often it quarantines good scans, and how many defective scans it stops.

New "good" scans that operators drop into the landing folder are scored by the
deployed model before they may enter the shot library; a scan above the gate
threshold (the highest score of the normal calibration scans × (1 + margin),
calibrated as the pipeline does: validation/good) is quarantined. For each
candidate margin this script measures, over categories and few-shot seeds:

* **false quarantine**: the share of good test scans (never seen by the model)
  above the gate threshold, i.e. good parts an operator would have to release;
* **catch rate**: the share of defective test scans above the gate threshold.

It reads the scores that the fits of the default method left in ``scores.jsonl``:

* development categories: ``bench/results/dev/scores.jsonl``, written by
  ``gate.py collect`` from the models bench/develop.py fitted and saved, or by
  ``bench/accuracy.py --split dev``; the margin (``ScoringConfig.gate_margin``)
  is chosen there;
* report categories: ``bench/results/accuracy/scores.jsonl``, written by
  ``bench/accuracy.py`` (``--split report``): measured only, with the chosen margin.

Writes ``bench/results/gate.md`` and ``gate.csv``.

    .venv/bin/python bench/gate.py collect --models bench/.cache/models/lite-default
    .venv/bin/python bench/gate.py
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdata import bench_data, record_scores  # noqa: E402

from cfr_core.config import DEFAULT_EXTRACTORS, DEFAULT_METHOD, ScoringConfig  # noqa: E402
from cfr_core.data.synth import DEV_CATEGORIES  # noqa: E402
from cfr_core.engine import FeatureCache, build_extractors, evaluate  # noqa: E402
from cfr_core.io.artifacts import load_model  # noqa: E402
from cfr_core.scoring.maps import gate_threshold  # noqa: E402

MARGINS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
OUT = ROOT / "bench" / "results"
SOURCES = {"dev": OUT / "dev" / "scores.jsonl", "report": OUT / "accuracy" / "scores.jsonl"}
CHOSEN = ScoringConfig().gate_margin
CALIBRATION = "validation"  # the normal scans the pipeline calibrates on


def collect(models: Path, shots: int) -> None:
    """Scores of the default method on every saved development model ``<cat>-<shots>-<seed>``."""
    cache = FeatureCache(ROOT / "bench" / ".cache" / "features")
    data, extractors = bench_data(), None
    for folder in sorted(models.glob(f"*-{shots}-*")):
        cat = folder.name.rsplit("-", 2)[0]
        if cat not in DEV_CATEGORIES:
            continue
        model = load_model(folder).variant(DEFAULT_METHOD)
        extractors = extractors or build_extractors(model.config.extractors)
        ev = evaluate(model, data, cache, extractors)
        record_scores(SOURCES["dev"].parent, data, cat, model, ev, cache, extractors)
        print(f"scored {folder.name} as {DEFAULT_METHOD}", flush=True)


def oracle_threshold(good: np.ndarray, allowed: float = 0.05) -> float:
    """The lowest threshold that quarantines at most ``allowed`` of these good scans.

    Chosen on the test scans themselves, so no gate rule can do better on them: its
    catch rate is the most that any threshold on this score catches at that false
    quarantine (the bound the detector sets, not a rule to deploy).
    """
    ranked = np.sort(good)
    above = int(np.floor(allowed * len(ranked)))  # good scans allowed above the threshold
    return float(ranked[len(ranked) - above - 1])


def measure(split: str, shots: int) -> list[dict]:
    rows = []
    margins = MARGINS if split == "dev" else (CHOSEN,)
    path = SOURCES[split]
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["method"] != DEFAULT_METHOD or rec["shots"] != shots:
            continue
        if rec["preset"] != DEFAULT_EXTRACTORS:
            continue
        test, labels = np.array(rec["test_scores"]), np.array(rec["test_labels"])
        good, bad = test[labels == 0], test[labels == 1]
        sets = {"validation": rec["calibration"]}
        if rec.get("unused_train"):  # older records lack them
            sets["validation + unused train"] = rec["calibration"] + rec["unused_train"]
        gates = [
            (name, m, gate_threshold(scores, m))
            for name, scores in sets.items()
            if split == "dev" or name == CALIBRATION
            for m in margins
        ]
        gates.append(("oracle", None, oracle_threshold(good)))
        for rule, m, gate in gates:
            rows.append(
                {
                    "split": split,
                    "rule": rule,
                    "preset": rec["preset"],
                    "category": rec["category"],
                    "seed": rec["seed"],
                    "margin": m,
                    "gate": round(gate, 4),
                    "false_quarantine": round(float((good > gate).mean()), 4),
                    "caught": round(float((bad > gate).mean()), 4),
                    "n_good": len(good),
                    "n_defective": len(bad),
                }
            )
    return rows


def by_rule(rows: list[dict]) -> dict[tuple[str, float | None], tuple[float, float, list]]:
    """(calibration set, margin) → (mean false quarantine, mean caught, its rows), in order."""
    out = {}
    for key in dict.fromkeys((r["rule"], r["margin"]) for r in rows):
        sel = [r for r in rows if (r["rule"], r["margin"]) == key]
        fq = float(np.mean([r["false_quarantine"] for r in sel]))
        out[key] = (fq, float(np.mean([r["caught"] for r in sel])), sel)
    return out


def choose(rows: list[dict]) -> tuple[str, float]:
    """The development choice: (calibration set, margin) with the most defective scans caught
    among those that quarantine ≤ 5 % of good scans on average, else the fewest quarantined."""
    stats = {k: v[:2] for k, v in by_rule(rows).items() if k[0] != "oracle"}
    ok = [k for k, (fq, _) in stats.items() if fq <= 0.05]
    if ok:
        return max(ok, key=lambda k: (stats[k][1], -stats[k][0]))
    return min(stats, key=lambda k: (stats[k][0], -stats[k][1]))


def summarise(rows: list[dict], shots: int) -> str:
    lines = [
        "# The quality gate: false quarantine and catch rate",
        "",
        f"Produced by `bench/gate.py` from the scores of `{DEFAULT_METHOD}` (the default "
        f"method, {shots} shots, the default preset) in `scores.jsonl`. Gate threshold = the "
        "highest score of the normal calibration scans (validation/good, as in the pipeline) "
        "× (1 + margin). False quarantine: good test scans (never seen) above it; caught: "
        "defective test scans above it. Means over categories and few-shot seeds. Target: "
        f"false quarantine ≤ 5 % with ≥ 90 % caught. Margin in force: **{CHOSEN:g}** "
        "(`ScoringConfig.gate_margin`).",
        "",
    ]
    for split, title in (
        ("dev", "Development categories (where the margin is chosen)"),
        ("report", "Report categories (measured with the chosen margin only)"),
    ):
        sel_split = [r for r in rows if r["split"] == split]
        if not sel_split:
            lines += [f"## {title}", "", "(no scores yet)", ""]
            continue
        seeds = sorted({r["seed"] for r in sel_split})
        lines += [
            f"## {title}",
            "",
            f"Seeds {', '.join(map(str, seeds))}.",
            "",
            "| calibration scans, margin | false quarantine | caught | per category (FQ / caught) |",
            "|---|---|---|---|",
        ]
        for (rule, m), (fq, caught, sel) in by_rule(sel_split).items():
            per = ", ".join(
                f"{c} {np.mean([r['false_quarantine'] for r in sel if r['category'] == c]):.2f} / "
                f"{np.mean([r['caught'] for r in sel if r['category'] == c]):.2f}"
                for c in dict.fromkeys(r["category"] for r in sel)
            )
            if rule == "oracle":
                label = "best any threshold can do (chosen on these test scans, ≤ 5 %)"
            else:
                force = m == CHOSEN and rule == CALIBRATION
                label = f"{rule}, {m:g}" + (" **(in force)**" if force else "")
            lines.append(f"| {label} | {fq:.3f} | {caught:.3f} | {per} |")
        lines.append("")
        if split == "dev":
            best = choose(sel_split)
            lines += [
                "Choice rule: the most caught among the rules whose mean "
                f"false quarantine is ≤ 5 %, else the lowest false quarantine → **{best[0]}, "
                f"margin {best[1]:g}**.",
                "",
            ]
    notes = OUT / "gate_notes.md"
    if notes.exists():
        lines.append(notes.read_text())
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", nargs="?", choices=["collect", "report"], default="report")
    p.add_argument("--models", type=Path, help="collect: folder of develop.py's saved models")
    p.add_argument("--shots", type=int, default=4, help="the pipeline's shot count")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.what == "collect":
        if args.models is None:
            p.error("collect needs --models (e.g. bench/.cache/models/lite-default)")
        collect(args.models, args.shots)
    rows = measure("dev", args.shots) + measure("report", args.shots)
    if not rows:
        sys.exit("no scores.jsonl yet: run `gate.py collect` or bench/accuracy.py first")
    with open(OUT / "gate.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = summarise(rows, args.shots)
    (OUT / "gate.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
