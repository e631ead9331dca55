from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_scale_out_instance_configs_are_complete():
    for name in ("dagster-postgres.yaml", "dagster-k8s.yaml"):
        cfg = yaml.safe_load((DEPLOY / name).read_text())
        pg = cfg["storage"]["postgres"]["postgres_db"]
        assert {"hostname", "username", "password", "db_name"} <= set(pg)
        limits = cfg["run_coordinator"]["config"]["tag_concurrency_limits"]
        assert {
            "key": "cfr/category",
            "value": {"applyLimitPerUniqueValue": True},
            "limit": 1,
        } in limits
        assert cfg["run_monitoring"]["enabled"] is True
    k8s = yaml.safe_load((DEPLOY / "dagster-k8s.yaml").read_text())["run_launcher"]
    assert k8s["class"] == "K8sRunLauncher" and k8s["module"] == "dagster_k8s"
    assert "cfr-data" in {v["name"] for v in k8s["config"]["volumes"]}


def test_registry_url_for_postgres_is_accepted_by_sqlalchemy():
    from sqlalchemy.engine import make_url

    url = make_url("postgresql+psycopg2://cfr:secret@db.internal/cfr")
    assert url.get_backend_name() == "postgresql" and url.database == "cfr"
