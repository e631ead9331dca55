"""The Dagster pipeline: definitions, assets, checks, sensors, schedule, registry, audit, UI.

The module-scoped ``home`` is a Dagster home where `cfr demo` deployed dome and
ribbed with tiny settings; tests that change it clean up after themselves.
"""

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import dagster as dg
import pytest
import torch
from click.testing import CliRunner

from cfr_assets.definitions import default_resources, defs
from cfr_assets.partitions import CATEGORY_TAG, INGEST_TAG, category_partitions
from cfr_assets.resources import CFRData, CFRStore
from cfr_assets.runner import run_category
from cfr_assets.schedules import weekly_refit
from cfr_assets.sensors import landing_sensor, library_sensor
from cfr_core.audit import audit
from cfr_core.cli import main
from cfr_core.config import DEFAULT_METHOD
from cfr_core.data.landing import content_hash, scan_landing
from cfr_core.data.mvtec import index_category
from cfr_core.io.artifacts import load_model
from cfr_core.registry import BankRegistry, CategoryBusyError

REPO = Path(__file__).resolve().parents[1]
TINY = {"shots": 2, "epochs": 3, "grid": 32}
ASSETS = [
    "shot_library",
    "normal_shots",
    "shot_features",
    "standardisation",
    "crossmodal_mappers",
    "memory_banks",
    "attention_retriever",
    "evaluation_report",
    "deployed_bank",
]


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
    os.environ["DAGSTER_HOME"] = str(home)
    res = default_resources(**{**TINY, **settings})
    res["data"] = CFRData(landing=str(home / "landing"), dataset_root=str(home / "demo" / "data"))
    return res


def registry_of(home: Path) -> BankRegistry:
    return BankRegistry(f"sqlite:///{home / 'registry.db'}")


def run(home: Path, category: str, **settings):
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return run_category(category, instance, resources(home, **settings), log_level="WARNING")


def test_definitions_load_with_groups_kinds_owners_and_descriptions():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {*ASSETS, "line_summary"}
    for key in keys:
        node = graph.get(dg.AssetKey(key))
        # the line summary reads every category's verdicts: one run, no category lock
        assert node.partitions_def == (None if key == "line_summary" else category_partitions)
        assert node.owners == ["team:vision-engineering"]
        assert node.kinds and len(node.description) > 80, key
    groups = {k: graph.get(dg.AssetKey(k)).group_name for k in keys}
    assert groups["shot_library"] == "ingest" and groups["deployed_bank"] == "release"
    assert groups["memory_banks"] == "training"
    assert {c.name for c in graph.asset_check_keys} == {
        "finite_weights",
        "bank_shape",
        "no_regression",
        "line_false_reject",
        "threshold_calibration",
        "line_fail_rate",
    }
    assert groups == {**groups, "line_summary": "line"}
    assert defs.resolve_job_def("cfr_line_job") and defs.resolve_schedule_def("hourly_line_summary")
    assert defs.resolve_sensor_def("landing_sensor") and defs.resolve_sensor_def("library_sensor")
    assert (
        defs.resolve_schedule_def("weekly_refit").default_status == dg.DefaultScheduleStatus.STOPPED
    )
    job = defs.resolve_job_def("cfr_category_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == set(ASSETS)


def test_demo_deploys_and_audits_every_category(home):
    home, rows = home
    assert [(r.category, r.success, r.status, r.version, r.audit_ok) for r in rows] == [
        ("dome", True, "deployed", 1, True),
        ("ribbed", True, "deployed", 1, True),
    ]
    assert all(0 <= r.image_auroc <= 1 and r.threshold > 0 for r in rows)
    registry = registry_of(home)
    live = registry.deployed("dome")
    assert live.shot_hashes and all(len(s["xyz_sha256"]) == 64 for s in live.shot_hashes)
    assert live.method_config["method"] == DEFAULT_METHOD  # the same default as `cfr fit`
    assert live.method_config["extractors"]["rgb"] == "efficientnet_lite"
    assert set(live.artifact_hashes) == set(ASSETS[1:-1])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert {r.job_name for r in runs} == {"cfr_category_job"}  # named, not __ephemeral
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("evaluation_report"), "no_regression"), limit=10
        )
        assert len(records) == 2  # checks ran per partition
        mats = instance.fetch_materializations(dg.AssetKey("deployed_bank"), limit=10).records
        assert sorted(m.partition_key for m in mats) == ["dome", "ribbed"]
        meta = mats[0].asset_materialization.metadata
        assert _v(meta["audit"]).startswith("PASSED") and _v(meta["status"]) == "deployed"
        assert {"version", "threshold", "gate_threshold", "metrics"} <= set(meta)


def test_shot_library_and_normal_shots_invoked_directly(home, tmp_path):
    home, _ = home
    from cfr_assets.assets.library import shot_library
    from cfr_assets.assets.shots import normal_shots

    res = resources(home)
    res["store"] = CFRStore(
        root=str(tmp_path / "store"), registry_url=f"sqlite:///{tmp_path / 'r.db'}"
    )
    with dg.build_asset_context(partition_key="ribbed") as context:
        lib = shot_library(context, data=res["data"], settings=res["settings"], store=res["store"])
        shots = normal_shots(
            context, data=res["data"], settings=res["settings"], store=res["store"]
        )
    assert (
        _v(lib.metadata["new_accepted"]) == 8
        and _v(lib.metadata["gate"]) == "no deployed model yet"
    )
    assert {r.data["admitted"] for r in _v(lib.metadata["new_scans"]).records} == {"no gate"}
    assert _v(lib.metadata["vouched_scans"]) == 8  # no gate in force: the operator's own
    assert _v(shots.metadata["pool_size"]) == 8 and _v(shots.metadata["shots"]) == 2
    files = [r.data["file"] for r in _v(shots.metadata["shot_table"]).records]
    assert all(f.startswith("ribbed_") for f in files)  # the names the operator dropped
    ref = res["store"].open_stage("ribbed", "normal_shots", _v(shots.metadata["stage_version"]))
    manifest = ref.json("shots.json")
    library = {s.stem for s in res["store"].library().samples("ribbed")}
    assert {s["stem"] for s in manifest["shots"]} <= library and manifest["pool_hash"]


def test_blocking_check_stops_deployment(home):
    home, _ = home
    registry = registry_of(home)
    before = registry.deployed("dome").version
    # a new model must beat the deployed one by 1.0 AUROC: impossible, so the check fails
    outcome = run(home, "dome", tolerance=-1.0, epochs=4)
    assert not outcome.success and "no_regression" in outcome.message
    assert registry.deployed("dome").version == before
    assert audit(registry.deployed("dome"), registry).ok  # the previous deployment is intact


def test_a_threshold_that_rejects_good_parts_is_not_deployed(home, monkeypatch):
    """A candidate whose threshold rejects more labelled good test scans than its
    calibration promises is stopped by line_false_reject, which names the scans."""
    home, _ = home
    import importlib

    from cfr_core.scoring.verdict import calibrate_threshold

    # the module, not the `fit` function cfr_core.engine re-exports under the same name
    fit_module = importlib.import_module("cfr_core.engine.fit")

    def optimistic(scores, target, margin):
        # a calibration that believes good parts score a third of what they do
        return calibrate_threshold(
            {k: [x / 3 for x in v] for k, v in scores.items()}, target, margin
        )

    monkeypatch.setattr(fit_module, "calibrate_threshold", optimistic)
    registry = registry_of(home)
    before = registry.deployed("ribbed").version
    outcome = run(home, "ribbed", epochs=6)
    assert not outcome.success and "line_false_reject (" in outcome.message
    assert "good test scans rejected" in outcome.message
    assert "threshold_calibration" not in outcome.message  # a WARN blocks nothing
    assert registry.deployed("ribbed").version == before
    with dg.DagsterInstance.from_config(str(home)) as instance:
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("evaluation_report"), "line_false_reject")]
        )
    evaluation = next(iter(record.values())).evaluation
    assert not evaluation.passed
    rejected = _v(evaluation.metadata["rejected good scans"])
    assert rejected.startswith("good/") and "over the threshold" in rejected
    assert _v(evaluation.metadata["false_reject_rate"]) > _v(evaluation.metadata["allowed_rate"])


def test_nan_weights_are_blocked(home, monkeypatch):
    home, _ = home
    import cfr_assets.assets.training as training

    real = training.fit_mappers

    def poisoned(*args, **kwargs):
        mappers, losses, seconds = real(*args, **kwargs)
        with torch.no_grad():
            mappers.to_rgb.out.weight[0, 0] = float("nan")
        return mappers, losses, seconds

    monkeypatch.setattr(training, "fit_mappers", poisoned)
    registry = registry_of(home)
    before = registry.deployed("ribbed").version
    outcome = run(home, "ribbed", epochs=5)
    assert not outcome.success and "finite_weights" in outcome.message
    assert "mappers.to_rgb.out.weight" in outcome.message
    assert registry.deployed("ribbed").version == before


def test_rerun_with_the_same_inputs_registers_nothing(home):
    home, _ = home
    registry = registry_of(home)
    before = registry.list("dome")
    outcome = run(home, "dome")
    assert outcome.success and outcome.status == "unchanged" and outcome.version == 1
    assert registry.list("dome") == before


def test_pipeline_deploys_exactly_what_cfr_fit_builds(home, tmp_path):
    """One fit path: same shots, config and seeds → identical tensors, thresholds and metrics."""
    home, _ = home
    data = home / "demo" / "data"
    res = resources(home)
    res["data"] = CFRData(
        landing=str(tmp_path / "empty"), dataset_root=str(data), use_dataset_train=True
    )
    res["store"] = CFRStore(
        root=str(tmp_path / "store"), registry_url=f"sqlite:///{tmp_path / 'r.db'}"
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        outcome = run_category("ribbed", instance, res, log_level="WARNING")
    assert outcome.success and outcome.status == "deployed", outcome.message
    deployed = load_model(res["store"].registry().deployed("ribbed").model_path)
    out = tmp_path / "fit"
    cli = CliRunner().invoke(
        main,
        [
            "fit",
            "--data",
            str(data),
            "-c",
            "ribbed",
            "--shots",
            "2",
            "--epochs",
            "3",
            "--grid",
            "32",
        ]
        + ["--out", str(out)],
    )
    assert cli.exit_code == 0, cli.output
    fitted = load_model(out)
    a, b = deployed.tensors(), fitted.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert deployed.config == fitted.config and deployed.theta == fitted.theta
    assert (deployed.threshold, deployed.gate_threshold) == (
        fitted.threshold,
        fitted.gate_threshold,
    )
    from cfr_core.engine.fit import evaluate

    assert deployed.extra["metrics"] == evaluate(fitted, data).to_dict()


def test_registry_round_trip_rollback_and_verify(tmp_path):
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
    assert [e["action"] for e in reg.events("dome")] == ["deploy", "deploy", "rollback"]
    assert reg.verify() == []
    again = BankRegistry(f"sqlite:///{tmp_path / 'r.db'}")  # persisted
    assert again.deployed("dome").version == 1 and again.verify() == []


def test_registry_cli_and_audit_detects_a_changed_file(home):
    home, _ = home
    runner = CliRunner()
    listed = runner.invoke(main, ["registry", "list", "--home", str(home), "--json"])
    rows = json.loads(listed.output)
    assert {"category", "version", "deployed", "row_hash"} <= set(rows[0])
    ok = runner.invoke(main, ["audit", "ribbed", "--home", str(home)])
    assert ok.exit_code == 0 and "audit PASSED" in ok.output
    every = runner.invoke(main, ["audit", "--all", "--home", str(home)])
    assert every.exit_code == 0 and every.output.count("audit PASSED") == 2
    shot = Path(registry_of(home).deployed("ribbed").shot_hashes[0]["xyz_path"])
    original = shot.read_bytes()
    try:
        shot.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        bad = runner.invoke(main, ["audit", "ribbed", "--home", str(home)])
        assert bad.exit_code == 1 and "FAIL shot" in bad.output and str(shot) in bad.output
    finally:
        shot.write_bytes(original)
    missing = runner.invoke(main, ["registry", "rollback", "ribbed", "9", "--home", str(home)])
    assert missing.exit_code == 2 and "no version 9" in missing.output


def tick(sensor, instance, res):
    with dg.build_sensor_context(instance=instance, resources=res) as context:
        return sensor(context)


def _write_pair(folder: Path, name: str, sample) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample.rgb_path, folder / f"{name}.png")
    shutil.copyfile(sample.xyz_path, folder / f"{name}.tiff")


def test_gate_quarantines_without_a_rebuild_and_release_requests_one(home):
    home, _ = home
    from cfr_assets.assets.library import shot_library

    odd = index_category(home / "demo" / "data", "ribbed").split("test")[
        0
    ]  # a ribbed part, as dome
    landing = home / "landing" / "dome"
    _write_pair(landing, "odd", odd)
    (landing / "half.png").write_bytes(odd.rgb_path.read_bytes())  # incomplete: reported, kept
    res = resources(home)
    sensor_res = {"store": res["store"]}
    q = []
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            idle = tick(library_sensor, instance, sensor_res)
            assert not idle.run_requests  # every deployed model matches its library
            with dg.build_asset_context(partition_key="dome", instance=instance) as context:
                result = shot_library(
                    context, data=res["data"], settings=res["settings"], store=res["store"]
                )
            assert _v(result.metadata["new_quarantined"]) == 1
            assert _v(result.metadata["not_ingested"]) == 1 and (landing / "half.png").exists()
            q = res["store"].library().quarantine_list("dome")
            assert (
                len(q) == 1
                and "above the gate of deployed version 1" in q[0]["reason"]
                and "RGB novelty" in q[0]["reason"]  # every check is named with its limit
                and "colour novelty" in q[0]["reason"]  # the deployed gate has a colour check
                and q[0]["name"] == "odd"
            )
            assert (
                res["store"].library().folder("dome", q[0]["content_id"], True) / "heatmap.png"
            ).exists()
            after = tick(library_sensor, instance, sensor_res)
            assert not after.run_requests  # only a quarantined scan: no rebuild
            runner = CliRunner()
            listed = runner.invoke(main, ["shots", "quarantine", "--home", str(home)])
            assert q[0]["content_id"] in listed.output and "odd" in listed.output
            release = ["shots", "release", "dome", q[0]["content_id"], "--home", str(home)]
            asked = runner.invoke(main, release)  # first it says what the release loosens
            assert asked.exit_code == 1 and "colour novelty" in asked.output, asked.output
            assert "every limit it exceeded rises" in asked.output and "--yes" in asked.output
            assert not res["store"].library().contains("dome", q[0]["content_id"])
            rel = runner.invoke(main, [*release, "--yes"])
            assert rel.exit_code == 0 and "rebuild" in rel.output
            assert res["store"].library().contains("dome", q[0]["content_id"])
            wanted = tick(library_sensor, instance, sensor_res)
            assert [r.partition_key for r in wanted.run_requests] == ["dome"]
            assert wanted.run_requests[0].run_key.startswith("rebuild:dome:")
    finally:
        for name in ("odd.png", "odd.tiff", "half.png"):
            (landing / name).unlink(missing_ok=True)
        for entry in q:
            shutil.rmtree(res["store"].library().folder("dome", entry["content_id"]), True)


def test_landing_sensor_new_category_same_files_corrupt_and_isolation(
    synth_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("CFR_LANDING_SETTLE_SECONDS", "0")  # copies complete at once here
    landing, store = tmp_path / "landing", CFRStore(root=str(tmp_path / "store"))
    train = index_category(synth_root, "candy").split("train")
    _write_pair(landing / "candy", "a", train[0])
    _write_pair(landing / "candy", "b", train[1])
    (landing / "broken").mkdir()
    (landing / "broken" / "x.png").write_bytes(train[0].rgb_path.read_bytes())
    (landing / "broken" / "x.tiff").write_bytes(train[0].xyz_path.read_bytes()[:300])  # truncated
    (landing / "bad name!").mkdir()
    res = {"data": CFRData(landing=str(landing)), "store": store}
    with dg.instance_for_test() as instance:
        first = tick(landing_sensor, instance, res)
        assert [r.partition_key for r in first.run_requests] == ["candy"]
        assert first.dynamic_partitions_requests[0].partition_keys == ["candy"]
        assert first.run_requests[0].tags == {INGEST_TAG: "candy"}  # not queued behind rebuilds
        key = first.run_requests[0].run_key
        assert key.startswith("ingest:candy:")
        again = tick(landing_sensor, instance, res)
        assert again.run_requests[0].run_key == key  # same files, same key: Dagster runs it once
        instance.add_dynamic_partitions(category_partitions.name, ["candy"])
        for scan in scan_landing(landing / "candy", "candy")[0]:
            store.library().add(scan)  # what shot_library does
        idle = tick(landing_sensor, instance, res)
        assert not idle.run_requests and "no new scans" in idle.skip_reason.skip_message
        assert "problem" in idle.skip_reason.skip_message  # the truncated TIFF is reported
        _write_pair(landing / "candy", "c", train[2])
        new = tick(landing_sensor, instance, res)
        assert len(new.run_requests) == 1 and new.run_requests[0].run_key != key
        assert not new.dynamic_partitions_requests  # the partition exists already
    assert (landing / "broken" / "x.tiff").exists()  # left in place


def test_a_batch_is_one_ingest_and_one_rebuild_and_ingest_never_waits_for_training(
    synth_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("CFR_LANDING_SETTLE_SECONDS", "1.5")
    landing, store = tmp_path / "landing", CFRStore(root=str(tmp_path / "store"))
    train = index_category(synth_root, "candy").split("train")
    res = {"data": CFRData(landing=str(landing)), "store": store}

    def in_flight(tag: str, status=dg.DagsterRunStatus.NOT_STARTED) -> dg.DagsterRun:
        run = dg.DagsterRun(
            job_name="job", run_id=str(uuid.uuid4()), status=status, tags={tag: "candy"}
        )
        return instance.add_run(run)

    with dg.instance_for_test() as instance:
        _write_pair(landing / "candy", "a", train[0])  # the copy goes on ...
        early = tick(landing_sensor, instance, res)
        assert not early.run_requests and "files still arriving" in early.skip_reason.skip_message
        _write_pair(landing / "candy", "b", train[1])
        time.sleep(1.6)
        batch = tick(landing_sensor, instance, res)  # ... and both scans are one ingest
        scans, _ = scan_landing(landing / "candy", "candy")
        assert [r.run_key for r in batch.run_requests] == [f"ingest:candy:{content_hash(scans)}"]
        assert batch.run_requests[0].tags == {INGEST_TAG: "candy"}
        ingest = in_flight(INGEST_TAG)  # that run, about to start
        _write_pair(landing / "candy", "c", train[2])
        time.sleep(1.6)
        later = tick(landing_sensor, instance, res)  # c waits for the batch in progress
        assert (
            not later.run_requests and "an ingest run is starting" in later.skip_reason.skip_message
        )
        instance.add_dynamic_partitions(category_partitions.name, ["candy"])
        for scan in scans:
            store.library().add(scan)  # what the ingest run does
        waiting = tick(library_sensor, instance, {"store": store})
        assert (
            not waiting.run_requests
            and "an ingest run is starting" in waiting.skip_reason.skip_message
        )
        instance.report_run_canceled(ingest)
        rebuild = tick(library_sensor, instance, {"store": store})  # one rebuild, of the final pool
        pool = store.library().pool_hash("candy")
        assert [r.run_key for r in rebuild.run_requests] == [f"rebuild:candy:{pool}"]
        assert rebuild.run_requests[0].tags == {CATEGORY_TAG: "candy"}
        running = in_flight(CATEGORY_TAG, dg.DagsterRunStatus.STARTED)
        assert not tick(library_sensor, instance, {"store": store}).run_requests
        # a rebuild running: the new scan is ingested (and gate-checked) now, not after it
        assert [r.partition_key for r in tick(landing_sensor, instance, res).run_requests] == [
            "candy"
        ]
        instance.report_run_canceled(running)
    registry = store.registry()
    with registry.category_lock("candy", "a rebuild's training"):
        with registry.category_lock("candy", "an ingest step", scope="ingest"):
            with pytest.raises(CategoryBusyError, match="is ingesting scans in an ingest step"):
                with registry.category_lock("candy", "another ingest", scope="ingest"):
                    pass


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


def _graphql(port: int, query: str, proc) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/graphql",
                json.dumps({"query": query}).encode(),
                {"Content-Type": "application/json"},
            )
            return json.loads(urllib.request.urlopen(req, timeout=10).read())
        except OSError:
            assert proc.poll() is None, "webserver exited"
            time.sleep(1)
    raise AssertionError("webserver did not answer within 120 s")


def test_webserver_explains_the_graph_and_serves_the_deployments(home):
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
        nodes = _graphql(
            port,
            "{ assetNodes { assetKey { path } groupName kinds description owners { "
            "... on TeamAssetOwner { team } } } }",
            proc,
        )["data"]["assetNodes"]
        by_key = {n["assetKey"]["path"][-1]: n for n in nodes}
        assert set(by_key) == {*ASSETS, "line_summary"}
        assert by_key["shot_library"]["groupName"] == "ingest"
        assert by_key["evaluation_report"]["groupName"] == "release"
        assert "sql" in by_key["deployed_bank"]["kinds"]
        assert "quarantine" in by_key["shot_library"]["description"]
        assert all(n["owners"] == [{"team": "vision-engineering"}] for n in nodes)
        body = _graphql(
            port,
            '{ assetOrError(assetKey: {path: ["deployed_bank"]}) { ... on Asset { '
            "assetMaterializations(limit: 10) { partition runId } } } }",
            proc,
        )
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

    registry = registry_of(home)
    before = registry.deployed("ribbed")
    stage_root = home / "artifacts" / "stages" / "ribbed" / "evaluation_report"
    versions = sorted(p.name for p in stage_root.iterdir())

    def crash(*args, **kwargs):
        raise RuntimeError("power cut while writing the model")

    monkeypatch.setattr(evaluation, "save_model", crash)
    outcome = run(home, "ribbed", epochs=6)
    assert not outcome.success and "power cut" in outcome.message
    assert registry.deployed("ribbed") == before and audit(before, registry).ok
    assert sorted(p.name for p in stage_root.iterdir()) == versions  # nothing new, nothing partial


def test_only_scans_a_person_vouched_for_calibrate_the_next_gate(home):
    """A scan the deployed gate passed on its own joins the shot pool, not the next gate's
    calibration; a scan a person released from the quarantine joins both."""
    home, _ = home
    from cfr_assets.assets.evaluation import _gate_library
    from cfr_assets.assets.library import shot_library

    res = resources(home)
    library, registry = res["store"].library(), registry_of(home)
    first = registry.deployed("dome")
    gate_before = load_model(first.model_path).library_gate
    data = home / "demo" / "data"
    odd = index_category(data, "ribbed").split("test")[0]  # a ribbed part, as dome
    goods = [s for s in index_category(data, "dome").split("test") if s.label == 0]
    landing = home / "landing" / "dome"
    added: list[tuple[str, bool]] = []
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for name, sample in [("odd", odd), *((f"good{i}", s) for i, s in enumerate(goods))]:
                _write_pair(landing, name, sample)
                with dg.build_asset_context(partition_key="dome", instance=instance) as ctx:
                    meta = shot_library(
                        ctx, data=res["data"], settings=res["settings"], store=res["store"]
                    ).metadata
                table = _v(meta["new_scans"]).records
                assert len(table) == 1
                added.append((table[0].data["id"], table[0].data["verdict"] == "quarantined"))
                assert table[0].data["admitted"] == ("" if added[-1][1] else "gate v1")
                if name != "odd" and not added[-1][1]:
                    break  # a good part the gate passed on its own
        (odd_id, odd_held), (passed_id, passed_held) = added[0], added[-1]
        assert odd_held and not passed_held, added
        record = library.info("dome", passed_id)
        assert record["admitted"] == "gate" and record["gate_version"] == 1
        library.release("dome", odd_id)
        assert library.info("dome", odd_id)["admitted"] == "released"
        gate_scans, left_out = _gate_library(res["data"], res["store"], "dome")
        keys = {s.key for s in gate_scans}
        assert left_out == 1 and f"dome/train/good/{passed_id}" not in keys
        assert f"dome/train/good/{odd_id}" in keys
        listed = CliRunner().invoke(main, ["shots", "list", "-c", "dome", "--home", str(home)])
        assert listed.exit_code == 0, listed.output
        lines = {line.split()[1]: line for line in listed.output.splitlines()}
        assert "gate v1" in lines[passed_id] and "good" in lines[passed_id]  # operator's name
        assert "released" in lines[odd_id] and lines[odd_id].rstrip().endswith("odd")
        assert sum("no gate" in line for line in lines.values()) == len(lines) - 2  # the demo's

        outcome = run(home, "dome")
        assert outcome.success and outcome.status == "deployed", outcome.message
        gate_after = load_model(registry.deployed("dome").model_path).library_gate
        # the released scan joined the gate's library, the one the gate passed did not
        assert gate_after.library_size == gate_before.library_size + 1
    finally:
        for name in ("odd", *(f"good{i}" for i in range(len(goods)))):
            for ext in (".png", ".tiff"):
                (landing / f"{name}{ext}").unlink(missing_ok=True)
        for content_id, _ in added:
            for quarantine in (False, True):
                shutil.rmtree(library.folder("dome", content_id, quarantine), True)
        registry.rollback("dome", first.version)


def _start_serve(args: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "cfr"), "serve", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"cfr serve exited: {proc.stdout.read()}") from None
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("cfr serve did not answer within 120 s")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def _forge(record, folder: Path) -> str:
    """A copy of ``record``'s model folder with its threshold raised and its manifest
    recomputed to match: a folder that verifies on its own but is not what was evaluated."""
    from cfr_core.data.io import sha256_file
    from cfr_core.io.artifacts import MANIFEST, MODEL_JSON, content_hash

    shutil.copytree(record.model_path, folder)
    meta = json.loads((folder / MODEL_JSON).read_text())
    meta["threshold"] = meta["calibration"]["threshold"] = 1e9
    (folder / MODEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][MODEL_JSON] = sha256_file(folder / MODEL_JSON)
    manifest["content_hash"] = content_hash(manifest["files"])
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest["content_hash"]


def test_serve_answers_like_evaluate_records_verdicts_and_swaps_only_audited_models(home, tmp_path):
    """`cfr serve` on the registry, over HTTP: each verdict equals the evaluation's, is
    recorded in the registry's database; a new deployment answers only after its audit
    passes, and a forged one is refused while the previous model keeps answering."""
    import requests

    from cfr_core.io.stages import REPORT_JSON
    from cfr_core.line_log import LineLog

    home, _ = home
    serve_home = tmp_path / "serve-home"  # a copy of the registry: the rows still point at
    serve_home.mkdir()  # the module's model folders, which this test only reads
    shutil.copyfile(home / "registry.db", serve_home / "registry.db")
    registry = registry_of(serve_home)
    live = registry.deployed("dome")
    env = {**os.environ, "DAGSTER_HOME": str(serve_home), "HF_HUB_OFFLINE": "1"}
    proc, port = _start_serve(["--home", str(serve_home), "--poll", "0.5"], env)
    base = f"http://127.0.0.1:{port}"
    try:
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        models = {m["category"]: m for m in requests.get(f"{base}/v1/models").json()["models"]}
        assert set(models) == {"dome", "ribbed"}
        assert models["dome"]["version"] == live.version
        assert models["dome"]["model_hash"] == live.model_hash
        assert models["dome"]["audit"].startswith("PASSED")

        # the verdicts the pipeline's evaluation gave the same scans
        report = json.loads((Path(live.model_path) / REPORT_JSON).read_text())
        expected = {s["name"]: s for s in report["scans"]}
        test = index_category(home / "demo" / "data", "dome").split("test")
        picks = [s for s in test if s.defect == "good"][:2] + [
            s for s in test if s.defect != "good"
        ][:2]
        for sample in picks:
            with open(sample.rgb_path, "rb") as rgb, open(sample.xyz_path, "rb") as xyz:
                r = requests.post(
                    f"{base}/v1/categories/dome/score",
                    files={"rgb": rgb, "xyz": xyz},
                    params={"heatmap": "true"},
                    timeout=120,
                )
            assert r.status_code == 200, r.text
            body = r.json()
            want = expected[f"{sample.defect}/{sample.stem}"]
            assert body["verdict"] == want["verdict"]
            assert abs(body["score"] - want["score"]) < 1e-4 * max(1.0, want["score"])
            assert body["version"] == live.version and body["model_hash"] == live.model_hash
            assert body["threshold"] == live.threshold
            assert body["heatmap_png"][:8] == "iVBORw0K"  # base64 of the PNG signature
        rows = LineLog(registry.engine).rows("dome")
        assert len(rows) == len(picks)
        assert {r.verdict for r in rows} <= {"PASS", "FAIL"} and rows[0].version == live.version
        assert all(len(r.rgb_sha256) == 64 and r.model_hash == live.model_hash for r in rows)

        # bad input: the CLI's one-line errors as 4xx, nothing recorded
        sample = picks[0]
        with open(sample.rgb_path, "rb") as rgb:
            r = requests.post(
                f"{base}/v1/categories/dome/score",
                files={"rgb": rgb, "xyz": ("part.tiff", b"not a tiff")},
            )
        assert r.status_code == 422 and "xyz (part.tiff)" in r.json()["error"]
        assert "\n" not in r.json()["error"]
        with open(sample.rgb_path, "rb") as rgb, open(sample.xyz_path, "rb") as xyz:
            r = requests.post(f"{base}/v1/categories/nosuch/score", files={"rgb": rgb, "xyz": xyz})
        assert r.status_code == 404 and "nosuch" in r.json()["error"]
        with open(sample.rgb_path, "rb") as rgb:
            r = requests.post(f"{base}/v1/categories/dome/score", files={"rgb": rgb})
        assert r.status_code == 422 and r.json()["error"].startswith("xyz: Field required")
        assert len(LineLog(registry.engine).rows("dome")) == len(picks)

        # a forged deployment (threshold 1e9, manifest recomputed) is refused; dome still
        # answers with the audited version
        forged_hash = _forge(live, tmp_path / "forged")
        fields = {
            k: getattr(live, k)
            for k in ("artifact_hashes", "shot_hashes", "extractor_ids", "method_config")
        }
        registry.register(
            category="dome",
            model_path=str(tmp_path / "forged"),
            model_hash=forged_hash,
            metrics=live.metrics,
            threshold=1e9,
            code_version=live.code_version,
            run_id="forged",
            **fields,
        )
        deadline = time.time() + 60
        while "dome" not in requests.get(f"{base}/v1/models").json()["refused"]:
            assert time.time() < deadline, "the forged version was never looked at"
            time.sleep(0.5)
        state = requests.get(f"{base}/v1/models").json()
        assert "audit" in state["refused"]["dome"]
        dome = next(m for m in state["models"] if m["category"] == "dome")
        assert dome["model_hash"] == live.model_hash and dome["version"] == live.version

        # a legitimate new version (the same audited folder, registered again) answers
        # once its audit passes
        again = registry.register(
            category="dome",
            model_path=live.model_path,
            model_hash=live.model_hash,
            metrics=live.metrics,
            threshold=live.threshold,
            code_version=live.code_version,
            run_id="again",
            **fields,
        )
        deadline = time.time() + 60
        while True:
            dome = next(
                m for m in requests.get(f"{base}/v1/models").json()["models"]
                if m["category"] == "dome"
            )  # fmt: skip
            if dome["version"] == again.version:
                break
            assert time.time() < deadline, "the new version never answered"
            time.sleep(0.5)
        assert "dome" not in requests.get(f"{base}/v1/models").json()["refused"]
    finally:
        out = _stop(proc)
    assert "Traceback" not in out, out


def test_score_exit_codes_and_the_registry_lookup(home):
    """`cfr score --category` takes the deployed model from the registry; exit 0 PASS,
    1 FAIL, 2 error (one line)."""
    home, _ = home
    runner = CliRunner()
    test = index_category(home / "demo" / "data", "dome").split("test")
    report = json.loads(
        (Path(registry_of(home).deployed("dome").model_path) / "report.json").read_text()
    )
    verdict = {s["name"]: s["verdict"] for s in report["scans"]}
    for sample in test[:3]:
        r = runner.invoke(
            main,
            ["score", "--category", "dome", "--home", str(home), str(sample.rgb_path),
             str(sample.xyz_path)],
        )  # fmt: skip
        want = verdict[f"{sample.defect}/{sample.stem}"]
        assert r.exit_code == {"PASS": 0, "FAIL": 1}[want], r.output
        assert r.output.strip().endswith(want)
    r = runner.invoke(
        main,
        ["score", "--category", "nosuch", "--home", str(home), str(test[0].rgb_path),
         str(test[0].xyz_path)],
    )  # fmt: skip
    assert r.exit_code == 2 and "no deployed model for category 'nosuch'" in r.output
    assert "dome" in r.output  # names the categories that are deployed
    r = runner.invoke(main, ["score", str(test[0].rgb_path), str(test[0].xyz_path)])
    assert r.exit_code == 2 and "--model" in r.output and "--category" in r.output


def test_line_summary_warns_when_the_line_fails_more_than_good_parts_explain(home, tmp_path):
    import datetime as dt

    from cfr_assets.assets.line import line_fail_rate, line_summary
    from cfr_core.line_log import LineLog, VerdictRow

    home, _ = home
    shutil.copyfile(home / "registry.db", tmp_path / "registry.db")
    registry = registry_of(tmp_path)
    log = LineLog(registry.engine)
    store = CFRStore(registry_url=f"sqlite:///{tmp_path / 'registry.db'}")

    def add(category: str, verdicts: list[str], score: float) -> None:
        rec = registry.deployed(category)
        for v in verdicts:
            log.record(
                VerdictRow(dt.datetime.now(dt.UTC), category, rec.version, rec.model_hash,
                           "a" * 64, "b" * 64, score, rec.threshold, v)
            )  # fmt: skip

    def materialize():
        with dg.DagsterInstance.ephemeral() as instance:
            return dg.materialize(
                [line_summary, line_fail_rate], resources={"store": store}, instance=instance
            )

    add("ribbed", ["PASS"] * 30, 0.5)  # a quiet line
    add("dome", ["PASS"] * 2, 0.5)
    result = materialize()
    checks = result.get_asset_check_evaluations()
    assert result.success and checks[0].passed  # dome: too few verdicts to judge
    add("dome", ["FAIL"] * 14, 50.0)  # 14 of 16 fail: far more than good parts explain
    result = materialize()
    check = result.get_asset_check_evaluations()[0]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    text = _v(check.metadata["departing"])
    assert text.startswith("dome: 14/16 failed") and "ribbed" not in text
    meta = result.asset_materializations_for_node("line_summary")[0].metadata
    assert _v(meta["parts judged"]) == 46 and _v(meta["categories departing"]) == "dome"
