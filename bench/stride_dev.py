"""Development check of the scoring stride for the default method (cfr-bank, lite preset).

Evaluates the models bench/develop.py fitted on the development categories at
strides 2 and 4 (stride 1 is the development study itself) and writes
bench/results/dev/stride.csv. Used to choose the default stride.
"""

import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdata import bench_data  # noqa: E402

from cfr_core.data.synth import DEV_CATEGORIES  # noqa: E402
from cfr_core.engine import FeatureCache, build_extractors, evaluate  # noqa: E402
from cfr_core.io.artifacts import load_model  # noqa: E402


def main() -> None:
    from dataclasses import replace

    models = ROOT / "bench" / ".cache" / "models" / sys.argv[1]
    strides = [int(s) for s in sys.argv[2].split(",")]
    cache = FeatureCache(ROOT / "bench" / ".cache" / "features")
    rows = []
    ex = None
    for shots in (1, 4):
        for cat in DEV_CATEGORIES:
            model = load_model(models / f"{cat}-{shots}-42").variant("cfr-bank")
            ex = ex or build_extractors(model.config.extractors)
            for stride in strides:
                m = replace(
                    model,
                    config=replace(
                        model.config, scoring=replace(model.config.scoring, stride=stride)
                    ),
                )
                t0 = time.perf_counter()
                ev = evaluate(m, bench_data(), cache, ex)
                rows.append(
                    {
                        "category": cat,
                        "shots": shots,
                        "stride": stride,
                        "image_auroc": round(ev.report.image_auroc, 4),
                        "aupro_30": round(ev.report.aupro[0.3], 4),
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                print(rows[-1], flush=True)
    out = ROOT / "bench" / "results" / "dev" / f"stride-{sys.argv[1]}.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
