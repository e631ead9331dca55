"""`cfr serve` latency: per part over HTTP, and parts/s with concurrent clients.

    .venv/bin/python bench/serve.py                   # default model: cfr-bank, lite, 4 shots
    .venv/bin/python bench/serve.py --model DIR --category dome

Fits (once, cached in bench/.models) the default configuration on one category of the
synthetic benchmark, starts the real `cfr serve --model` on a free port, and posts each
test scan of that category: first one client at a time (latency per part, p50 / p95),
then ``--clients`` clients at once (parts/s). Every verdict is compared with the one
`cfr evaluate` gives the same scan (same model, same files). An in-process breakdown of
one part's hot path (read, preprocess, features, inference stages) says where the time
goes. Writes bench/results/serve.{md,json}. Run it on a quiet machine: nothing else may
run beside it on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdata import bench_data  # noqa: E402

from cfr_core.config import DEFAULT_EXTRACTORS, DEFAULT_METHOD, ExtractorConfig, FitConfig  # noqa: E402
from cfr_core.data.mvtec import index_category  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_for(category: str, shots: int, out: Path) -> Path:
    """The default configuration fitted on ``category`` (cached)."""
    from cfr_core.engine import FeatureCache, fit
    from cfr_core.io.artifacts import save_model

    if (out / "manifest.json").exists():
        return out
    data = bench_data()
    cfg = FitConfig.for_method(
        DEFAULT_METHOD, shots=shots, extractors=ExtractorConfig.preset(DEFAULT_EXTRACTORS)
    )
    print(f"fitting {DEFAULT_METHOD} on {shots} shots of {category} ...", flush=True)
    model = fit(data, category, cfg, FeatureCache(ROOT / "bench" / ".cache" / "features"))
    save_model(model, out, overwrite=True)
    return out


def expected_verdicts(model_dir: Path, data: Path) -> dict[str, tuple[float, str]]:
    """What `cfr evaluate` says of every test scan: name -> (score, verdict)."""
    from cfr_core.engine import evaluate
    from cfr_core.io.artifacts import load_model

    ev = evaluate(load_model(model_dir), data)
    return {s["name"]: (s["score"], s["verdict"]) for s in ev.verdicts.scans}


def hot_path(model_dir: Path, sample, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per stage of one part, in process (median of ``repeats``)."""
    from cfr_core.data.io import read_rgb, read_xyz
    from cfr_core.data.prepare import prepare_arrays
    from cfr_core.engine.features import build_extractors, features_of_scans
    from cfr_core.engine.infer import infer
    from cfr_core.engine.timing import StageTimer
    from cfr_core.io.artifacts import load_model

    model = load_model(model_dir)
    extractors = build_extractors(model.config.extractors)
    runs = []
    for _ in range(repeats + 1):
        t = StageTimer()
        with t("read files"):
            rgb, xyz = read_rgb(sample.rgb_path), read_xyz(sample.xyz_path)
        with t("preprocess"):
            scan = prepare_arrays(rgb, xyz, None, model.config.preprocess, surface=False)
        with t("rgb features"):
            extractors[0]([scan])
        with t("3D features"):
            extractors[1]([scan])
        feats = features_of_scans([scan], extractors, gate_maps=False)
        infer(model, feats, timer=t)
        runs.append(dict(t.seconds))
    runs = runs[1:]  # the first warms caches
    return {k: 1000 * float(np.median([r.get(k, 0.0) for r in runs])) for k in runs[0]}


def post(port: int, category: str, sample) -> tuple[float, dict]:
    import requests

    with open(sample.rgb_path, "rb") as rgb, open(sample.xyz_path, "rb") as xyz:
        t0 = time.perf_counter()
        r = requests.post(
            f"http://127.0.0.1:{port}/v1/categories/{category}/score",
            files={"rgb": rgb, "xyz": xyz},
            timeout=300,
        )
        dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt, r.json()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--category", default="dome")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--model", type=Path, help="a model folder (default: fitted here, cached)")
    p.add_argument(
        "--data", type=Path, help="the dataset whose test split is posted (default: the benchmark)"
    )
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--baseline",
        type=Path,
        help="a folder with the serve.json of an earlier run on this machine the same day "
        "(e.g. of another commit), shown as a row beside this one",
    )
    p.add_argument("--baseline-label", default="before", help="what the baseline row was")
    args = p.parse_args()

    data = args.data or bench_data()
    model_dir = args.model or model_for(
        args.category, args.shots, ROOT / "bench" / ".models" / f"serve-{args.category}"
    )
    samples = index_category(data, args.category).split("test")
    print("scoring the test split as `cfr evaluate` does ...", flush=True)
    expected = expected_verdicts(model_dir, data)
    print("timing the hot path in process ...", flush=True)
    stages = hot_path(model_dir, samples[0])

    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DAGSTER_HOME": home}
        from cfr_core.registry import BankRegistry

        BankRegistry(f"sqlite:///{Path(home) / 'registry.db'}")  # so verdicts are recorded
        cfr = Path(sys.executable).parent / "cfr"
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(cfr), "serve", "--model", str(model_dir), "--home", home, "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            import requests

            while True:
                try:
                    requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    break
                except requests.ConnectionError:
                    if proc.poll() is not None or time.perf_counter() - t0 > 300:
                        raise SystemExit("cfr serve did not start") from None
                    time.sleep(0.2)
            startup = time.perf_counter() - t0
            for s in samples[:2]:  # warm-up
                post(port, args.category, s)
            latencies, mismatches = [], []
            for s in samples:
                dt, body = post(port, args.category, s)
                latencies.append(dt)
                want = expected[f"{s.defect}/{s.stem}"]
                if body["verdict"] != want[1] or abs(body["score"] - want[0]) > 1e-4 * max(
                    1.0, want[0]
                ):
                    mismatches.append(f"{s.defect}/{s.stem}: {body} vs {want}")
            print(f"sequential: p50 {np.median(latencies) * 1000:.0f} ms", flush=True)

            done, lock = [], threading.Lock()

            def client(part: list) -> None:
                for s in part:
                    post(port, args.category, s)
                    with lock:
                        done.append(s)

            parts = [samples[i :: args.clients] for i in range(args.clients)]
            threads = [threading.Thread(target=client, args=(part,)) for part in parts]
            t1 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            concurrent = len(done) / (time.perf_counter() - t1)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    import torch

    result = {
        "machine": f"{os.cpu_count()} cores ({platform.machine()}), {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "category": args.category,
        "model": str(model_dir),
        "parts": len(samples),
        "startup_s": round(startup, 1),
        "p50_ms": round(float(np.median(latencies)) * 1000, 1),
        "p95_ms": round(float(np.quantile(latencies, 0.95)) * 1000, 1),
        "mean_ms": round(float(np.mean(latencies)) * 1000, 1),
        "parts_per_s_concurrent": round(concurrent, 2),
        "clients": args.clients,
        "verdict_mismatches": mismatches,
        "hot_path_ms": {k: round(v, 1) for k, v in stages.items()},
    }
    lines = [
        "# `cfr serve` latency (produced by `bench/serve.py`)",
        "",
        f"Machine: {result['machine']}, torch {result['torch']} ({result['torch_threads']} "
        f"threads), CPU, {result['date']}. Model: {DEFAULT_METHOD}, {DEFAULT_EXTRACTORS} "
        f"preset, {args.shots} shots of {args.category} from {data.name} (256 px scans, 224 "
        f"grid); its {len(samples)} test scans posted over HTTP to `cfr serve --model` on this "
        "machine, nothing else running.",
        "",
        "| p50 per part | p95 per part | mean | parts/s, "
        f"{args.clients} clients at once | start-up | verdicts = `cfr evaluate` |",
        "|---|---|---|---|---|---|",
        f"| {result['p50_ms']:.0f} ms | {result['p95_ms']:.0f} ms | {result['mean_ms']:.0f} ms "
        f"| {concurrent:.2f} | {startup:.0f} s | "
        f"{'all ' + str(len(samples)) if not mismatches else f'{len(mismatches)} differ'} |",
        "",
        "One part's hot path in process (median of 5, ms):",
        "",
        "| " + " | ".join(result["hot_path_ms"]) + " | total |",
        "|" + "---|" * (len(result["hot_path_ms"]) + 1),
        "| "
        + " | ".join(f"{v:.0f}" for v in result["hot_path_ms"].values())
        + f" | {sum(result['hot_path_ms'].values()):.0f} |",
    ]
    if args.baseline:
        base = json.loads((args.baseline / "serve.json").read_text())
        lines += [
            "",
            f"Beside it, the same bench run earlier on this machine ({base['date']}): "
            f"{args.baseline_label}. Compare these two rows, not runs of other days.",
            "",
            "| run | p50 per part | p95 per part | parts/s, 2 clients | hot path total (ms) |",
            "|---|---|---|---|---|",
        ]
        for label, r in ((args.baseline_label, base), ("this run", result)):
            lines.append(
                f"| {label} | {r['p50_ms']:.0f} ms | {r['p95_ms']:.0f} ms | "
                f"{r['parts_per_s_concurrent']:.2f} | {sum(r['hot_path_ms'].values()):.0f} |"
            )
        result["baseline"] = {"label": args.baseline_label, **base}
    if mismatches:
        lines += ["", "Verdicts that differ from `cfr evaluate`:", ""] + [
            f"- {m}" for m in mismatches
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.md").write_text("\n".join(lines) + "\n")
    (args.out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
