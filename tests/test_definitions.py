from pathlib import Path

import yaml


def test_code_location_loads():
    from cfr_assets.definitions import defs

    assert defs is not None


def test_instance_config_limits_one_run_per_category():
    cfg = yaml.safe_load((Path(__file__).parents[1] / "dagster_home" / "dagster.yaml").read_text())
    limits = cfg["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert {
        "key": "cfr/category",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in limits
    assert cfg["telemetry"]["enabled"] is False
