"""The main job on the embedded default: synthetic data → landing folders → every asset → deployed banks.

Runs ``cfr_category_job`` in-process against the persistent Dagster instance in
DAGSTER_HOME, once per category, so the runs, materializations and check
results it produces are what `dagster dev` then shows (under the job's name).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from cfr_assets.definitions import default_resources
from cfr_assets.resources import CFRData
from cfr_assets.runner import run_category
from cfr_core.audit import audit
from cfr_core.data.mvtec import index_category
from cfr_core.data.synth import SynthConfig, generate

REPO_INSTANCE_YAML = Path(__file__).resolve().parents[1] / "dagster_home" / "dagster.yaml"


@dataclass
class DemoRow:
    category: str
    success: bool
    status: str
    version: int | None
    image_auroc: float | None
    aupro_30: float | None
    threshold: float | None
    audit_ok: bool
    message: str = ""
    false_reject_rate: float | None = None  # good test parts failed at the threshold
    escape_rate: float | None = None  # defective test parts passed
    oracle_escape_rate: float | None = None  # the best threshold at that false-reject rate


def prepare_home(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and REPO_INSTANCE_YAML.exists():
        shutil.copyfile(REPO_INSTANCE_YAML, home / "dagster.yaml")


def fill_landing(data_root: Path, landing: Path, categories: list[str]) -> None:
    """Copy each category's train/good scans into <landing>/<category>/ as flat pairs."""
    for cat in categories:
        target = landing / cat
        target.mkdir(parents=True, exist_ok=True)
        for s in index_category(data_root, cat).split("train"):
            shutil.copyfile(s.rgb_path, target / f"{cat}_{s.stem}.png")
            shutil.copyfile(s.xyz_path, target / f"{cat}_{s.stem}.tiff")


class DemoInterrupted(Exception):
    """The operator pressed Ctrl-C: the demo stopped; ``rows`` are the categories it finished."""

    def __init__(self, rows: list[DemoRow], during: str):
        self.rows, self.during = rows, during
        super().__init__(f"interrupted during {during}")


@dataclass
class _Stop:
    """Whether Ctrl-C was pressed, and what the demo was doing."""

    requested: bool = False
    during: str = "setting up"


@contextlib.contextmanager
def _first_interrupt_stops(stop: _Stop):
    """Ctrl-C sets ``stop.requested`` (and interrupts what runs now, as usual). Dagster turns the
    interrupt inside a step into a failed run and carries on: the flag is what makes the
    demo stop after it instead of starting the next category."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame):
        stop.requested = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_demo(
    home: Path,
    size: int = 256,
    seed: int = 0,
    categories: tuple[str, ...] | None = None,
    shots: int = 4,
    epochs: int = 100,
    grid: int = 224,
    log=print,
) -> list[DemoRow]:
    stop, rows = _Stop(), []
    try:
        with _first_interrupt_stops(stop):
            return _run_demo(home, size, seed, categories, shots, epochs, grid, log, stop, rows)
    except KeyboardInterrupt:
        raise DemoInterrupted(rows, stop.during) from None


def _run_demo(home, size, seed, categories, shots, epochs, grid, log, stop, rows):
    home = home.resolve()
    prepare_home(home)
    os.environ["DAGSTER_HOME"] = str(home)
    synth = SynthConfig(size=size, seed=seed, **({"categories": categories} if categories else {}))
    data_root = home / "demo" / "data"
    log(f"generating synthetic data ({', '.join(synth.categories)}) in {data_root}")
    stop.during = "generating the demo data"
    generate(data_root, synth, overwrite=True)
    landing = home / "landing"
    fill_landing(data_root, landing, list(synth.categories))
    log(f"dropped the train/good scans into {landing}/<category>/")
    resources = default_resources(shots=shots, epochs=epochs, grid=grid)
    resources["data"] = CFRData(landing=str(landing), dataset_root=str(data_root))
    with dg.DagsterInstance.get() as instance:
        registry = resources["store"].registry()
        for cat in synth.categories:
            log(f"running cfr_category_job for {cat} ...")
            stop.during = f"the run of {cat}"
            outcome = run_category(cat, instance, resources)
            if stop.requested or outcome.interrupted:  # stop here, and say what is live
                raise KeyboardInterrupt
            if not outcome.success:
                log(f"{cat}: {outcome.message}")
            record = registry.deployed(cat)
            metrics = (record.metrics or {}) if record else {}
            rows.append(
                DemoRow(
                    category=cat,
                    success=outcome.success,
                    status=outcome.status,
                    version=record.version if record else None,
                    image_auroc=metrics.get("image_auroc"),
                    aupro_30=(metrics.get("aupro") or {}).get("0.3"),
                    threshold=record.threshold if record else None,
                    audit_ok=bool(record) and audit(record, registry).ok,
                    message=outcome.message,
                    false_reject_rate=metrics.get("false_reject_rate"),
                    escape_rate=metrics.get("escape_rate"),
                    oracle_escape_rate=metrics.get("oracle_escape_rate"),
                )
            )
    return rows
