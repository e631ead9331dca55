"""The one place that wires assets, checks, sensors, schedules and resources."""

import os

import dagster as dg

from cfr_assets.assets.evaluation import deployed_bank, evaluation_report
from cfr_assets.assets.shots import normal_shots
from cfr_assets.assets.training import (
    attention_retriever,
    crossmodal_mappers,
    memory_banks,
    shot_features,
)
from cfr_assets.checks import checks
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore, dagster_home
from cfr_assets.schedules import weekly_refit
from cfr_assets.sensors import cfr_job, landing_sensor

assets = [
    normal_shots,
    shot_features,
    crossmodal_mappers,
    memory_banks,
    attention_retriever,
    evaluation_report,
    deployed_bank,
]


def default_resources() -> dict:
    """Resources from the environment: CFR_LANDING, CFR_DATASET_ROOT, CFR_STORE, CFR_REGISTRY_URL,
    CFR_DEVICE (cpu, cuda, cuda:N: where features are extracted and mappers trained).

    Unset, everything lives under DAGSTER_HOME, and the demo data (HOME/demo/data,
    written by `cfr demo`) is the labelled dataset when it exists.
    """
    demo = dagster_home() / "demo" / "data"
    return {
        "data": CFRData(
            landing=os.environ.get("CFR_LANDING", ""),
            dataset_root=os.environ.get("CFR_DATASET_ROOT", str(demo) if demo.is_dir() else ""),
        ),
        "settings": CFRModelSettings(device=os.environ.get("CFR_DEVICE", "cpu")),
        "store": CFRStore(
            root=os.environ.get("CFR_STORE", ""),
            registry_url=os.environ.get("CFR_REGISTRY_URL", ""),
        ),
    }


defs = dg.Definitions(
    assets=assets,
    asset_checks=checks,
    jobs=[cfr_job],
    sensors=[landing_sensor],
    schedules=[weekly_refit],
    resources=default_resources(),
)
