"""The one place that wires assets, checks, jobs, sensors, schedules and resources."""

import json
import math
import os

import dagster as dg

from cfr_assets.assets.evaluation import deployed_bank, evaluation_report
from cfr_assets.assets.library import shot_library
from cfr_assets.assets.line import line_fail_rate, line_summary
from cfr_assets.assets.shots import normal_shots
from cfr_assets.assets.training import (
    attention_retriever,
    crossmodal_mappers,
    memory_banks,
    shot_features,
    standardisation,
)
from cfr_assets.checks import checks
from cfr_assets.jobs import cfr_job, ingest_job, line_job
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore, dagster_home
from cfr_assets.schedules import hourly_line_summary, weekly_refit
from cfr_assets.sensors import landing_sensor, library_sensor
from cfr_core.errors import ConfigError

assets = [
    shot_library,
    normal_shots,
    shot_features,
    standardisation,
    crossmodal_mappers,
    memory_banks,
    attention_retriever,
    evaluation_report,
    deployed_bank,
    line_summary,
]


def env_settings() -> dict:
    """CFRModelSettings fields from CFR_SETTINGS (a JSON object, e.g. '{"epochs": 50}')."""
    raw = os.environ.get("CFR_SETTINGS", "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"CFR_SETTINGS is not valid JSON ({exc})") from exc
    fields = set(CFRModelSettings.model_fields)
    if not isinstance(value, dict) or set(value) - fields:
        raise ConfigError(
            f"CFR_SETTINGS must be a JSON object with fields of {sorted(fields)}, got {raw!r}"
        )
    return value


def _env_seconds(name: str) -> float:
    """A number of seconds >= 0 from the environment variable ``name`` (0 when unset)."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw or 0)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a number of seconds >= 0, got {raw!r}")
    return value


def default_resources(**settings) -> dict:
    """Resources from the environment: CFR_LANDING, CFR_DATASET_ROOT, CFR_STORE, CFR_REGISTRY_URL,
    CFR_DEVICE (cpu, cuda, cuda:N: where features are extracted and mappers trained),
    CFR_LOCK_WAIT (seconds a run waits for its category's lock; default 0), CFR_SETTINGS
    (JSON object of CFRModelSettings fields, e.g. '{"extractors": "paper", "epochs": 50}').

    Unset, everything lives under DAGSTER_HOME, and the demo data (HOME/demo/data,
    written by `cfr demo`) is the labelled dataset when it exists. ``settings``
    override CFRModelSettings fields (and CFR_SETTINGS).
    """
    demo = dagster_home() / "demo" / "data"
    store = CFRStore(
        root=os.environ.get("CFR_STORE", ""),
        registry_url=os.environ.get("CFR_REGISTRY_URL", ""),
        lock_wait_seconds=_env_seconds("CFR_LOCK_WAIT"),
    )
    return {
        "data": CFRData(
            landing=os.environ.get("CFR_LANDING", ""),
            dataset_root=os.environ.get("CFR_DATASET_ROOT", str(demo) if demo.is_dir() else ""),
        ),
        "settings": CFRModelSettings(
            **{"device": os.environ.get("CFR_DEVICE", "cpu"), **env_settings(), **settings}
        ),
        "store": store,
    }


def build_definitions(resources: dict) -> dg.Definitions:
    return dg.Definitions(
        assets=assets,
        asset_checks=[*checks, line_fail_rate],
        jobs=[cfr_job, ingest_job, line_job],
        sensors=[landing_sensor, library_sensor],
        schedules=[weekly_refit, hourly_line_summary],
        resources=resources,
    )


defs = build_definitions(default_resources())
