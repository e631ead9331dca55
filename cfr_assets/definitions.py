"""The one place that wires assets, checks, sensors, schedules and resources."""

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
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore
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
    """Resources from the environment (CFR_DATASET_ROOT, CFR_LANDING, CFR_STORE, CFR_REGISTRY_URL)."""
    return {
        "data": CFRData(
            landing=dg.EnvVar("CFR_LANDING").get_value("") or "",
            dataset_root=dg.EnvVar("CFR_DATASET_ROOT").get_value("") or "",
        ),
        "settings": CFRModelSettings(),
        "store": CFRStore(
            root=dg.EnvVar("CFR_STORE").get_value("") or "",
            registry_url=dg.EnvVar("CFR_REGISTRY_URL").get_value("") or "",
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
