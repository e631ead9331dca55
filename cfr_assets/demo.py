"""The main job on the embedded default: synthetic data → landing folders → every asset → deployed banks.

Runs in-process against the persistent Dagster instance in DAGSTER_HOME, so the
runs, materializations and check results it produces are what `dagster dev`
then shows.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from cfr_assets.checks import checks
from cfr_assets.definitions import assets
from cfr_assets.partitions import CATEGORY_TAG, category_partitions
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore
from cfr_core.audit import audit
from cfr_core.data.mvtec import index_category
from cfr_core.data.synth import SynthConfig, generate

REPO_INSTANCE_YAML = Path(__file__).resolve().parents[1] / "dagster_home" / "dagster.yaml"


@dataclass
class DemoRow:
    category: str
    success: bool
    version: int | None
    image_auroc: float | None
    aupro_30: float | None
    threshold: float | None
    audit_ok: bool


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


def materialize_category(
    category: str, instance: dg.DagsterInstance, resources: dict, log_level: str = "DEBUG"
) -> dg.ExecuteInProcessResult:
    """Every asset and check of one category partition, in process, tagged for the run queue."""
    return dg.materialize(
        [*assets, *checks],
        partition_key=category,
        instance=instance,
        resources=resources,
        tags={CATEGORY_TAG: category},
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )


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
    home = home.resolve()
    prepare_home(home)
    os.environ["DAGSTER_HOME"] = str(home)
    synth = SynthConfig(size=size, seed=seed, **({"categories": categories} if categories else {}))
    data_root = home / "demo" / "data"
    log(f"generating synthetic data ({', '.join(synth.categories)}) in {data_root}")
    generate(data_root, synth, overwrite=True)
    landing = home / "landing"
    fill_landing(data_root, landing, list(synth.categories))
    log(f"dropped the train/good scans into {landing}/<category>/")
    resources = {
        "data": CFRData(landing=str(landing), dataset_root=str(data_root)),
        "settings": CFRModelSettings(shots=shots, epochs=epochs, grid=grid),
        "store": CFRStore(root=str(home / "artifacts")),
    }
    rows = []
    with dg.DagsterInstance.get() as instance:
        known = set(instance.get_dynamic_partitions(category_partitions.name))
        new = [c for c in synth.categories if c not in known]
        if new:
            instance.add_dynamic_partitions(category_partitions.name, new)
        registry = resources["store"].registry()
        for cat in synth.categories:
            log(f"materializing every asset of {cat} ...")
            result = materialize_category(cat, instance, resources)
            record = registry.deployed(cat)
            metrics = (record.metrics or {}) if record else {}
            rows.append(
                DemoRow(
                    category=cat,
                    success=result.success,
                    version=record.version if record else None,
                    image_auroc=metrics.get("image_auroc"),
                    aupro_30=(metrics.get("aupro") or {}).get("0.3"),
                    threshold=record.threshold if record else None,
                    audit_ok=bool(record) and audit(record).ok,
                )
            )
    return rows
