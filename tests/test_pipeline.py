"""The Dagster pipeline: definitions, assets, checks, sensor, schedule, registry, audit, UI."""

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from cfr_assets.definitions import defs
from cfr_assets.demo import materialize_category
from cfr_assets.partitions import CATEGORY_TAG, category_partitions
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore
from cfr_assets.schedules import weekly_refit
from cfr_assets.sensors import landing_sensor
from cfr_core.audit import audit
from cfr_core.cli import main
from cfr_core.data.mvtec import index_category
from cfr_core.registry import BankRegistry, RegistryError

REPO = Path(__file__).resolve().parents[1]
TINY = {"shots": 2, "epochs": 3, "grid": 32}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A Dagster home where the demo deployed dome and ribbed (tiny settings)."""
    from cfr_assets.demo import run_demo

    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("DAGSTER_HOME")
    rows = run_demo(home, size=96, categories=("dome", "ribbed"), log=lambda m: None, **TINY)
    yield home, rows
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


def _v(meta):
    return getattr(meta, "value", meta)


def resources(home: Path, **settings) -> dict:
    return {
        "data": CFRData(landing=str(home / "landing"), dataset_root=str(home / "demo" / "data")),
        "settings": CFRModelSettings(**{**TINY, **settings}),
        "store": CFRStore(root=str(home / "artifacts")),
    }


def test_definitions_load():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {
        "normal_shots",
        "shot_features",
        "crossmodal_mappers",
        "memory_banks",
        "attention_retriever",
        "evaluation_report",
        "deployed_bank",
    }
    assert all(graph.get(dg.AssetKey(k)).partitions_def == category_partitions for k in keys)
    assert {c.name for c in defs.resolve_asset_graph().asset_check_keys} == {
        "finite_weights",
        "bank_shape",
        "no_regression",
    }
    assert defs.resolve_sensor_def("landing_sensor") and defs.resolve_schedule_def("weekly_refit")


def test_demo_deploys_and_audits_every_category(home):
    home, rows = home
    assert [(r.category, r.success, r.version, r.audit_ok) for r in rows] == [
        ("dome", True, 1, True),
        ("ribbed", True, 1, True),
    ]
    assert all(0 <= r.image_auroc <= 1 and r.threshold > 0 for r in rows)
    registry = BankRegistry(f"sqlite:///{home / 'registry.db'}")
    live = registry.deployed("dome")
    assert live.shot_hashes and all(len(s["xyz_sha256"]) == 64 for s in live.shot_hashes)
    assert (
        live.extractor_ids["points"].startswith("fpfh@") and live.method_config["method"] == "cfr"
    )
    assert {k.split("/")[0] for k in live.artifact_hashes} >= {
        "normal_shots",
        "memory_banks",
        "evaluation_report",
    }
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # checks ran per partition: one evaluation of each check for each category
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("evaluation_report"), "no_regression"), limit=10
        )
        assert len(records) == 2
        mats = instance.fetch_materializations(dg.AssetKey("deployed_bank"), limit=10).records
        assert sorted(m.partition_key for m in mats) == ["dome", "ribbed"]


def test_asset_invoked_directly(home, tmp_path):
    home, _ = home
    store = CFRStore(root=str(tmp_path / "store"))
    from cfr_assets.assets.shots import normal_shots

    with dg.build_asset_context(partition_key="ribbed") as context:
        result = normal_shots(
            context, data=resources(home)["data"], settings=CFRModelSettings(**TINY), store=store
        )
    assert _v(result.metadata["pool_size"]) == 8 and _v(result.metadata["shots"]) == 2
    manifest = json.loads(
        Path(store.read_stage("ribbed", "normal_shots")["files"]["shots.json"][0]).read_text()
    )
    library = {s.stem for s in store.library().samples("ribbed")}
    assert len(manifest["shots"]) == 2 and {s["stem"] for s in manifest["shots"]} <= library


def test_blocking_check_stops_deployment(home):
    home, _ = home
    registry = BankRegistry(f"sqlite:///{home / 'registry.db'}")
    before = registry.deployed("dome").version
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # a new model must beat the deployed one by 1.0 AUROC: impossible, so the check fails
        result = materialize_category("dome", instance, resources(home, tolerance=-1.0))
    assert not result.success
    evals = [e for e in result.get_asset_check_evaluations() if e.check_name == "no_regression"]
    assert len(evals) == 1 and not evals[0].passed
    assert registry.deployed("dome").version == before
    assert not [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("deployed_bank")
    ]
    assert audit(registry.deployed("dome")).ok  # the previous deployment is intact


def test_nan_weights_are_blocked(home, monkeypatch):
    home, _ = home
    import cfr_assets.assets.training as training

    real = training.train_mappers

    def poisoned(*args, **kwargs):
        mappers, hist = real(*args, **kwargs)
        with __import__("torch").no_grad():
            mappers.to_rgb.out.weight[0, 0] = float("nan")
        return mappers, hist

    monkeypatch.setattr(training, "train_mappers", poisoned)
    registry = BankRegistry(f"sqlite:///{home / 'registry.db'}")
    before = registry.deployed("ribbed").version
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = materialize_category("ribbed", instance, resources(home))
    finite = [e for e in result.get_asset_check_evaluations() if e.check_name == "finite_weights"]
    assert (
        finite
        and not finite[0].passed
        and "mappers.to_rgb.out.weight" in finite[0].metadata["non_finite"].value
    )
    assert registry.deployed("ribbed").version == before


def test_registry_round_trip_and_rollback(tmp_path):
    reg = BankRegistry(f"sqlite:///{tmp_path / 'r.db'}")
    common = {
        "model_path": "/m",
        "artifact_hashes": {},
        "shot_hashes": [],
        "extractor_ids": {},
        "method_config": {"method": "cfr"},
        "metrics": {"image_auroc": 0.9},
        "threshold": 1.5,
        "code_version": "test",
        "run_id": "r",
    }
    a = reg.register(category="dome", model_hash="a" * 64, **common)
    b = reg.register(category="dome", model_hash="b" * 64, **common)
    reg.register(category="candy", model_hash="c" * 64, **common)
    assert (a.version, b.version) == (1, 2) and reg.deployed("dome").model_hash == "b" * 64
    assert reg.rollback("dome", 1).deployed and reg.deployed("dome").version == 1
    assert [r.deployed for r in reg.list("dome")] == [True, False]
    assert reg.deployed("candy").version == 1  # other categories untouched
    with pytest.raises(RegistryError, match="no version 7"):
        reg.rollback("dome", 7)
    again = BankRegistry(f"sqlite:///{tmp_path / 'r.db'}")  # persisted
    assert again.deployed("dome").version == 1


def test_registry_cli_and_audit_detects_a_changed_file(home):
    home, _ = home
    runner = CliRunner()
    listed = runner.invoke(main, ["registry", "list", "--home", str(home), "--json"])
    rows = json.loads(listed.output)
    assert {"category", "version", "deployed"} <= set(rows[0])
    ok = runner.invoke(main, ["audit", "ribbed", "--home", str(home)])
    assert ok.exit_code == 0 and "audit PASSED" in ok.output
    shot = Path(
        BankRegistry(f"sqlite:///{home / 'registry.db'}")
        .deployed("ribbed")
        .shot_hashes[0]["xyz_path"]
    )
    original = shot.read_bytes()
    try:
        shot.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        bad = runner.invoke(main, ["audit", "ribbed", "--home", str(home)])
        assert bad.exit_code == 1 and "FAIL shot" in bad.output and str(shot) in bad.output
    finally:
        shot.write_bytes(original)
    missing = runner.invoke(main, ["registry", "rollback", "ribbed", "9", "--home", str(home)])
    assert missing.exit_code == 2 and "no version 9" in missing.output


def test_quality_gate_quarantines_a_bad_scan_and_release(home):
    home, _ = home
    from cfr_assets.assets.shots import normal_shots

    odd = index_category(home / "demo" / "data", "ribbed").split("test")[
        0
    ]  # a ribbed crack, dropped as "dome"
    landing = home / "landing" / "dome"
    shutil.copyfile(odd.rgb_path, landing / "odd.png")
    shutil.copyfile(odd.xyz_path, landing / "odd.tiff")
    (landing / "half.png").write_bytes(
        odd.rgb_path.read_bytes()
    )  # incomplete pair: reported, left in place
    res = resources(home)
    try:
        with dg.build_asset_context(partition_key="dome") as context:
            result = normal_shots(context, **res)
        assert (
            _v(result.metadata["new_quarantined"]) == 1 and _v(result.metadata["not_ingested"]) == 1
        )
        assert (landing / "half.png").exists()
        q = res["store"].library().quarantine_list("dome")
        assert len(q) == 1 and "above the threshold" in q[0]["reason"]
        assert (
            res["store"].library().folder("dome", q[0]["content_id"], True) / "heatmap.png"
        ).exists()
        runner = CliRunner()
        listed = runner.invoke(main, ["shots", "quarantine", "--home", str(home)])
        assert q[0]["content_id"] in listed.output
        rel = runner.invoke(
            main, ["shots", "release", "dome", q[0]["content_id"], "--home", str(home)]
        )
        assert rel.exit_code == 0 and res["store"].library().contains("dome", q[0]["content_id"])
    finally:
        for name in ("odd.png", "odd.tiff", "half.png"):
            (landing / name).unlink(missing_ok=True)


def _write_pair(folder: Path, name: str, sample) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample.rgb_path, folder / f"{name}.png")
    shutil.copyfile(sample.xyz_path, folder / f"{name}.tiff")


def test_sensor_new_category_new_shots_same_shots_and_corrupt(synth_root, tmp_path):
    landing, store = tmp_path / "landing", CFRStore(root=str(tmp_path / "store"))
    train = index_category(synth_root, "candy").split("train")
    _write_pair(landing / "candy", "a", train[0])
    _write_pair(landing / "candy", "b", train[1])
    (landing / "broken").mkdir()
    (landing / "broken" / "x.png").write_bytes(train[0].rgb_path.read_bytes())
    (landing / "broken" / "x.tiff").write_bytes(train[0].xyz_path.read_bytes()[:300])  # truncated
    res = {"data": CFRData(landing=str(landing)), "store": store}
    with dg.instance_for_test() as instance:
        first = landing_sensor(dg.build_sensor_context(instance=instance, resources=res))
        assert [r.partition_key for r in first.run_requests] == ["candy"]
        assert first.dynamic_partitions_requests[0].partition_keys == ["candy"]
        assert first.run_requests[0].tags[CATEGORY_TAG] == "candy"
        key = first.run_requests[0].run_key
        again = landing_sensor(dg.build_sensor_context(instance=instance, resources=res))
        assert again.run_requests[0].run_key == key  # same files, same key: Dagster runs it once
        instance.add_dynamic_partitions(category_partitions.name, ["candy"])
        from cfr_core.data.landing import scan_landing

        for scan in scan_landing(landing / "candy", "candy")[0]:
            store.library().add(scan)  # what normal_shots does
        idle = landing_sensor(dg.build_sensor_context(instance=instance, resources=res))
        assert not idle.run_requests and "no new scans" in idle.skip_reason.skip_message
        assert "problem" in idle.skip_reason.skip_message  # the truncated TIFF is reported
        _write_pair(landing / "candy", "c", train[2])
        new = landing_sensor(dg.build_sensor_context(instance=instance, resources=res))
        assert len(new.run_requests) == 1 and new.run_requests[0].run_key != key
        assert not new.dynamic_partitions_requests  # the partition exists already
    assert (landing / "broken" / "x.tiff").exists()  # left in place


def test_schedule_fans_out_over_categories():
    with dg.instance_for_test() as instance:
        empty = weekly_refit(
            dg.build_schedule_context(
                instance=instance, scheduled_execution_time=dt.datetime(2026, 11, 29, 3)
            )
        )
        assert isinstance(empty, dg.SkipReason)
        instance.add_dynamic_partitions(category_partitions.name, ["ribbed", "dome"])
        ctx = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=dt.datetime(2026, 11, 29, 3)
        )
        requests = weekly_refit(ctx)
        assert [(r.partition_key, r.tags[CATEGORY_TAG]) for r in requests] == [
            ("dome", "dome"),
            ("ribbed", "ribbed"),
        ]
        assert requests[0].run_key == "refit:dome:20261129T0300"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webserver_serves_the_deployed_materializations(home):
    home, _ = home
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen(
        [str(exe), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = {
            "query": '{ assetOrError(assetKey: {path: ["deployed_bank"]}) { ... on Asset { '
            "assetMaterializations(limit: 10) { partition runId } } } }"
        }
        deadline, body = time.time() + 120, None
        while time.time() < deadline:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql",
                    json.dumps(query).encode(),
                    {"Content-Type": "application/json"},
                )
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
                break
            except OSError:
                assert proc.poll() is None, "webserver exited"
                time.sleep(1)
        assert body is not None, "webserver did not answer within 120 s"
        mats = body["data"]["assetOrError"]["assetMaterializations"]
        assert {m["partition"] for m in mats} >= {"dome", "ribbed"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_run_failing_half_way_keeps_the_deployment_and_leaves_no_partial_artifact(
    home, monkeypatch
):
    home, _ = home
    import cfr_assets.assets.evaluation as evaluation

    store = CFRStore(root=str(home / "artifacts"))
    registry = store.registry()
    before = registry.deployed("ribbed")
    pointer = store.stage_pointer("ribbed", "evaluation_report").read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("power cut while writing the model")

    monkeypatch.setattr(evaluation, "save_model", crash)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = materialize_category("ribbed", instance, resources(home))
    assert not result.success
    assert registry.deployed("ribbed") == before and audit(before).ok
    assert store.stage_pointer("ribbed", "evaluation_report").read_text() == pointer
    stage_root = home / "artifacts" / "stages" / "ribbed" / "evaluation_report"
    assert not [
        p.name for p in stage_root.iterdir() if p.name.startswith(".") or p.name == "incoming"
    ]
