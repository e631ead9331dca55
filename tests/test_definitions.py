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
    assert cfg["run_monitoring"]["enabled"] is True
    assert cfg["run_launcher"] == {"module": "cfr_assets.launcher", "class": "MonitoredRunLauncher"}


def test_device_setting_comes_from_the_environment_and_is_checked(monkeypatch):
    import pytest
    import torch

    from cfr_assets.definitions import default_resources
    from cfr_assets.resources import CFRModelSettings
    from cfr_core.errors import ConfigError

    monkeypatch.setenv("CFR_DEVICE", "cuda:9")
    settings = default_resources()["settings"]
    assert settings.device == "cuda:9"
    with pytest.raises(ConfigError, match="cuda:9"):
        settings.build_extractors(settings.fit_config(shots=1))
    rgb, pts = CFRModelSettings(grid=32).build_extractors(CFRModelSettings(grid=32).fit_config(1))
    assert rgb.device == pts.device == torch.device("cpu") and rgb.grid == 32
