"""What the quality gate's library check costs as the shot library grows.

Operators drop good scans into the landing folder for as long as a line runs, and every
scan the gate accepts joins the category's library. The library check
(cfr_core.engine.gate) keeps every 2nd foreground pixel of *every* library scan and
calibrates its limits leave-one-out (each library scan against all the others), so its
bank grows linearly with the library and its build with the *square* of it. This script
measures that on synthetic categories with many good scans: the smallest part (dome) and
the largest (checker, the most foreground pixels of the benchmark).

For each library size it prints and saves (bench/results/gate_scale.md, .csv): bank
rows and MB (float16, both modalities), the build time (leave-one-out limits: what a fit
adds) and the check time per landing scan (what the sensor's gate adds per scan), for
every scan kept and for the check cut to ``ScoringConfig.library_gate_scans`` (the most
varied scans). It also counts what each check stops among the category's test scans
(good ones held, defective ones caught, library margin in force), so that the cut's
effect on the gate is measured and not assumed. Feature extraction is not included (it
is the same per scan whatever the library size). Timings are wall-clock on this
machine; compare ratios within one run.

    .venv/bin/python bench/gate_scale.py                 # sizes 6 12 24 48
    .venv/bin/python bench/gate_scale.py --sizes 6 12    # a quick look
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from cfr_core.config import (  # noqa: E402
    DEFAULT_EXTRACTORS,
    ExtractorConfig,
    PreprocessConfig,
    ScoringConfig,
)
from cfr_core.data.mvtec import index_category  # noqa: E402
from cfr_core.data.synth import SynthConfig, generate  # noqa: E402
from cfr_core.engine import FeatureCache, build_extractors, extract_features  # noqa: E402
from cfr_core.engine.gate import (  # noqa: E402
    FOREGROUND_MISSING_LIMIT,
    build_library_gate,
    foreground_missing,
    novelty_peaks,
)

CATEGORIES = ("dome", "checker")
OUT = ROOT / "bench" / "results"
CHECKED = 4  # landing scans timed per size (the test split's first good scans)
TEST_GOOD, TEST_PER_DEFECT = 20, 4
SCORING = ScoringConfig()


def data(largest: int) -> Path:
    """A synthetic set with ``largest`` good train scans per category (generated once)."""
    root = ROOT / "bench" / ".data" / f"gate-scale-{largest}-{TEST_GOOD}-{TEST_PER_DEFECT}"
    if not (root / "synth.json").exists():
        print(f"generating {largest} good scans per category in {root} ...", flush=True)
        cfg = SynthConfig(
            categories=CATEGORIES,
            seed=11,
            size=256,
            n_train=largest,
            n_validation=0,
            n_test_good=TEST_GOOD,
            n_test_per_defect=TEST_PER_DEFECT,
        )
        generate(root, cfg, overwrite=True)
    return root


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[6, 12, 24, 48])
    args = p.parse_args()
    if min(args.sizes) < 2:
        p.error("the library check needs at least 2 library scans")
    logging.basicConfig(level=logging.WARNING)
    root = data(max(args.sizes))
    cache = FeatureCache(ROOT / "bench" / ".cache" / "features")
    extractors = build_extractors(ExtractorConfig.preset(DEFAULT_EXTRACTORS))
    pre = PreprocessConfig()
    rows = []
    for cat in CATEGORIES:
        index = index_category(root, cat)
        library = extract_features(index.split("train"), extractors, pre, cache)
        test = index.split("test")
        tested = extract_features(test, extractors, pre, cache)
        good = np.array([s.label == 0 for s in test])
        timed = [i for i in range(len(test)) if good[i]][:CHECKED]
        for n in sorted(args.sizes):
            cuts = [("every scan", None)]
            if n > SCORING.library_gate_scans:
                cuts.append(("most varied", SCORING.library_gate_scans))
            for kept, cap in cuts:
                t0 = time.perf_counter()
                gate = build_library_gate(
                    library.select(list(range(n))), SCORING.library_gate_margin, cap
                )
                t1 = time.perf_counter()
                novelty_peaks(gate, tested.select(timed))
                t2 = time.perf_counter()
                peaks = novelty_peaks(gate, tested)
                stopped = np.array(
                    [
                        any(p[c] > gate.limits[c] for c in gate.checks)
                        or foreground_missing(gate, tested, i) > FOREGROUND_MISSING_LIMIT
                        for i, p in enumerate(peaks)
                    ]
                )
                mb = sum(b.numel() * b.element_size() for b in gate.banks.values()) / 2**20
                rows.append(
                    {
                        "category": cat,
                        "library_scans": n,
                        "kept": f"{kept} ({len(gate.scans)})",
                        "bank_rows": gate.banks["rgb"].shape[0],
                        "bank_mb": round(mb, 1),
                        "build_s": round(t1 - t0, 1),
                        "check_s_per_scan": round((t2 - t1) / len(timed), 2),
                        "held": f"{int(stopped[good].sum())}/{int(good.sum())}",
                        "caught": f"{int(stopped[~good].sum())}/{int((~good).sum())}",
                    }
                )
                print(rows[-1], flush=True)
    lines = [
        "# The library check as the shot library grows",
        "",
        "Produced by `bench/gate_scale.py` (synthetic scans, 256 px, the default "
        f"extractors; {CHECKED} landing scans timed per size; 2-core machine). Build = the "
        "leave-one-out limits a fit computes (for a cut library, choosing the scans "
        "included); check = the gate on one landing scan; held / caught = the library "
        f"check alone at margin {SCORING.library_gate_margin} on the category's "
        f"{TEST_GOOD} good and {TEST_PER_DEFECT} per defect test scans. *most varied*: "
        f"the check cut to `library_gate_scans` = {SCORING.library_gate_scans} (in force).",
        "",
        "| category | library scans | kept | bank rows | bank MB | build s | check s / scan "
        "| held | caught |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['category']} | {r['library_scans']} | {r['kept']} | {r['bank_rows']} | "
        f"{r['bank_mb']} | {r['build_s']} | {r['check_s_per_scan']} | {r['held']} | "
        f"{r['caught']} |"
        for r in rows
    ]
    notes = OUT / "gate_scale_notes.md"
    if notes.exists():
        lines += ["", notes.read_text()]
    text = "\n".join(lines) + "\n"
    with open(OUT / "gate_scale.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (OUT / "gate_scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
