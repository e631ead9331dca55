"""The pipeline on a real PostgreSQL: Dagster's instance storage and the bank registry.

Run with `make test-postgres`, which starts a throwaway server
(scripts/with_postgres.py) and sets DAGSTER_PG_* and CFR_REGISTRY_URL. Excluded
from `make test` by the ``postgres`` marker.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from cfr_assets.resources import CFRData, CFRStore
from cfr_assets.sensors import landing_sensor
from cfr_core.audit import audit
from cfr_core.cli import main
from cfr_core.data.mvtec import index_category
from cfr_core.registry import BankRegistry, CategoryBusyError

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parents[1]
CFR = str(Path(sys.executable).parent / "cfr")
URL = os.environ.get("CFR_TEST_PG_URL", "")
TINY = ["--shots", "2", "--grid", "32", "--tolerance", "1"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A Dagster home on Postgres where the demo deployed dome and ribbed."""
    if not URL:
        pytest.fail("no PostgreSQL server: run these tests with `make test-postgres`")
    from cfr_assets.demo import run_demo

    home = tmp_path_factory.mktemp("pg-home")
    shutil.copyfile(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    old = os.environ.get("DAGSTER_HOME")
    rows = run_demo(
        home, size=96, categories=("dome", "ribbed"), shots=2, epochs=2, grid=32, log=lambda m: None
    )
    yield home, rows
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


def test_two_categories_materialize_with_postgres_storage_and_registry(home):
    home, rows = home
    assert [(r.category, r.success, r.version, r.audit_ok) for r in rows] == [
        ("dome", True, 1, True),
        ("ribbed", True, 1, True),
    ]
    assert not (home / "registry.db").exists()  # the registry lives in Postgres
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"  # runs and events
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert {r.job_name for r in instance.get_runs()} == {"cfr_category_job"}
        mats = instance.fetch_materializations(dg.AssetKey("deployed_bank"), limit=10).records
        assert sorted(m.partition_key for m in mats) == ["dome", "ribbed"]
    registry = BankRegistry(URL)
    assert registry.engine.dialect.name == "postgresql" and registry.verify() == []


def test_sensor_tick_on_postgres(home, synth_root, tmp_path, monkeypatch):
    home, _ = home
    monkeypatch.setenv("CFR_LANDING_SETTLE_SECONDS", "0")  # the copy below is complete
    landing = tmp_path / "landing"
    (landing / "candy").mkdir(parents=True)
    sample = index_category(synth_root, "candy").split("train")[0]
    shutil.copyfile(sample.rgb_path, landing / "candy" / "a.png")
    shutil.copyfile(sample.xyz_path, landing / "candy" / "a.tiff")
    res = {
        "data": CFRData(landing=str(landing)),
        "store": CFRStore(root=str(tmp_path / "s"), registry_url=URL),
    }
    with dg.DagsterInstance.get() as instance:
        with dg.build_sensor_context(instance=instance, resources=res) as context:
            tick = landing_sensor(context)
    assert [r.partition_key for r in tick.run_requests] == ["candy"]


def test_registry_list_rollback_and_audit_on_postgres(home):
    home, _ = home
    runner = CliRunner()
    env = {"CFR_REGISTRY_URL": URL}
    proc = subprocess.run(
        [CFR, "pipeline", "run", "dome", "--home", str(home), "--epochs", "3", *TINY],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = runner.invoke(main, ["registry", "list", "-c", "dome"], env=env)
    assert listed.exit_code == 0 and listed.output.count("dome") == 2
    back = runner.invoke(main, ["registry", "rollback", "dome", "1"], env=env)
    assert back.exit_code == 0 and "version 1 is deployed" in back.output
    ok = runner.invoke(main, ["audit", "--all"], env=env)
    assert ok.exit_code == 0 and ok.output.count("audit PASSED") == 2, ok.output
    registry = BankRegistry(URL)
    assert [e["action"] for e in registry.events("dome")][-1] == "rollback"
    assert registry.verify() == [] and audit(registry.deployed("dome"), registry).ok


def test_two_processes_contending_for_one_category(home):
    home, _ = home
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    registry = BankRegistry(URL)
    with registry.category_lock("ribbed", "the test"):  # an advisory lock in Postgres
        busy = subprocess.run(
            [CFR, "pipeline", "run", "ribbed", "--home", str(home), "--epochs", "2", *TINY],
            env=env,
            capture_output=True,
            text=True,
        )
    # refused before a run starts: one line, exit 2
    assert busy.returncode == 2 and "is being rebuilt by the test" in busy.stdout + busy.stderr
    before = {r.version for r in registry.list("ribbed")}
    procs = [
        subprocess.Popen(
            [
                CFR,
                "pipeline",
                "run",
                "ribbed",
                "--home",
                str(home),
                "--epochs",
                e,
                "--wait",
                "300",
                *TINY,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for e in ("3", "4")
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    new = [r for r in registry.list("ribbed") if r.version not in before]
    assert sorted(r.method_config["mappers"]["epochs"] for r in new) == [3, 4]
    assert all(audit(r, registry).ok for r in new) and registry.verify() == []


def test_a_killed_holder_frees_the_postgres_lock():
    code = (
        "import time, sys\n"
        "from cfr_core.registry import BankRegistry\n"
        f"reg = BankRegistry({URL!r})\n"
        "with reg.category_lock('capsule', 'doomed'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        registry = BankRegistry(URL)
        with pytest.raises(CategoryBusyError, match="doomed"):
            with registry.category_lock("capsule", "second", wait=0):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.time() + 30
        while True:  # Postgres ends the dead session's advisory locks
            try:
                with registry.category_lock("capsule", "second", wait=0):
                    break
            except CategoryBusyError:
                assert time.time() < deadline, "the lock outlived its process"
                time.sleep(0.5)
    finally:
        if holder.poll() is None:
            holder.kill()
