"""The operator's loop, timed: a good scan dropped into the landing folder → its gate
verdict → the rebuilt model deployed.

    .venv/bin/python bench/loop.py                     # dome, default configuration
    .venv/bin/python bench/loop.py --epochs 10 --grid 112 --category candy

Sets up a Dagster home with the demo's data for one category and deploys a first model
from four dropped scans (not timed: that is the initial set-up). Then drops one more
good scan and plays the daemon without its 30 s sensor interval: the landing sensor is
ticked every second (it waits until the files have settled, 5 s), the ingest run it
requests is executed (the gate's verdict is known when it ends), then the library sensor
requests the rebuild, which is executed to deployment. Each run's steps are timed from
Dagster's step statistics. With the daemon, add up to one sensor interval (30 s) before
each of the two runs starts. Writes bench/results/loop.{md,json}. Run it on a quiet
machine: nothing else may run beside it on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SENSOR_INTERVAL = 30  # seconds: the sensors' minimum_interval_seconds


def drop(sample, landing: Path, name: str) -> None:
    landing.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample.rgb_path, landing / f"{name}.png")
    shutil.copyfile(sample.xyz_path, landing / f"{name}.tiff")


def step_times(instance, run_id: str) -> dict[str, float]:
    return {
        s.step_key: round(s.end_time - s.start_time, 1)
        for s in instance.get_run_step_stats(run_id)
        if s.start_time and s.end_time
    }


def tick(sensor, instance, resources) -> list:
    import dagster as dg

    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = sensor(context)
    return list(result.run_requests or [])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--category", default="dome")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--grid", type=int, default=224)
    p.add_argument("--size", type=int, default=256, help="scan side in pixels (the demo's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--beside",
        default="nothing else running",
        help="what else ran on the machine (said in the results)",
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    home = Path(tempfile.mkdtemp(prefix="cfr-loop-"))
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg
    import torch

    from cfr_assets.definitions import default_resources
    from cfr_assets.demo import prepare_home
    from cfr_assets.resources import CFRData
    from cfr_assets.runner import run_category
    from cfr_assets.sensors import landing_sensor, library_sensor
    from cfr_core.data.mvtec import index_category
    from cfr_core.data.synth import SynthConfig, generate

    prepare_home(home)
    data = home / "demo" / "data"
    generate(data, SynthConfig(size=args.size, categories=(args.category,), n_train=6))
    train = index_category(data, args.category).split("train")
    landing = home / "landing"
    resources = default_resources(shots=args.shots, epochs=args.epochs, grid=args.grid)
    resources["data"] = CFRData(landing=str(landing), dataset_root=str(data))
    rows: dict[str, object] = {}
    try:
        with dg.DagsterInstance.get() as instance:
            for i in range(args.shots):
                drop(train[i], landing / args.category, f"first{i}")
            print("set-up: the first deployment ...", flush=True)
            t = time.perf_counter()
            first = run_category(args.category, instance, resources)
            rows["setup_seconds"] = round(time.perf_counter() - t, 1)
            if not first.success:
                sys.exit(f"set-up failed: {first.message}")

            print("dropping one good scan ...", flush=True)
            t0 = time.perf_counter()
            drop(train[args.shots], landing / args.category, "new")
            sensor_res = {"data": resources["data"], "store": resources["store"]}
            while not (requests := tick(landing_sensor, instance, sensor_res)):
                time.sleep(1.0)
            rows["drop_to_ingest_requested"] = round(time.perf_counter() - t0, 1)
            ingest = run_category(args.category, instance, resources, job="cfr_ingest_job")
            rows["drop_to_gate_verdict"] = round(time.perf_counter() - t0, 1)
            rows["ingest_steps"] = step_times(instance, ingest.run_id)
            rows["ingest_outcome"] = ingest.message
            requests = tick(library_sensor, instance, {"store": resources["store"]})
            if not requests:
                sys.exit("the library sensor requested no rebuild (was the scan quarantined?)")
            rebuild = run_category(args.category, instance, resources)
            rows["drop_to_rebuild_done"] = round(time.perf_counter() - t0, 1)
            rows["deployed"] = rebuild.success and rebuild.status == "deployed"
            rows["rebuild_steps"] = step_times(instance, rebuild.run_id)
            rows["rebuild_outcome"] = rebuild.message
    finally:
        shutil.rmtree(home, ignore_errors=True)

    machine = (
        f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}"
    )
    config = (
        f"{args.category}, {args.shots} shots, {args.epochs} epochs, grid {args.grid}, "
        f"{args.size} px scans"
    )
    steps = rows["rebuild_steps"]
    lines = [
        "# The operator's loop: drop → gate verdict → deployed (produced by `bench/loop.py`)",
        "",
        f"Machine: {machine}. Configuration: {config}; in process, the sensors ticked every "
        f"second (the daemon ticks every {SENSOR_INTERVAL} s: add up to that before each of "
        f"the two runs). {args.beside[:1].upper() + args.beside[1:]}.",
        "",
        "| drop → ingest requested | drop → gate verdict | drop → rebuild done | deployed "
        "| first deployment (set-up) |",
        "|---|---|---|---|---|",
        f"| {rows['drop_to_ingest_requested']} s | {rows['drop_to_gate_verdict']} s | "
        f"{rows['drop_to_rebuild_done']} s | {'yes' if rows['deployed'] else 'no (see outcome)'} "
        f"| {rows['setup_seconds']} s |",
        "",
        "Ingest run, per step (s): "
        + ", ".join(f"{k} {v}" for k, v in rows["ingest_steps"].items()),
        "",
        "Rebuild run, per step (s):",
        "",
        "| " + " | ".join(steps) + " |",
        "|" + "---|" * len(steps),
        "| " + " | ".join(str(v) for v in steps.values()) + " |",
        "",
        f"Outcomes: ingest {rows['ingest_outcome']}; rebuild {rows['rebuild_outcome']}.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loop.md").write_text("\n".join(lines) + "\n")
    (args.out / "loop.json").write_text(
        json.dumps({"machine": machine, "config": config, **rows}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
