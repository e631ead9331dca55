"""The fault matrix (docs/reliability.md): concurrency, kills, tampering and hostile input.

Each case asserts the exact outcome: the error text names the file, nothing
outside its root is touched, and the previous deployment stays live and
audit-clean.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from click.testing import CliRunner

from cfr_assets.definitions import default_resources
from cfr_assets.resources import CFRData, CFRStore
from cfr_assets.sensors import landing_sensor
from cfr_core.audit import audit
from cfr_core.cli import main
from cfr_core.data.io import write_rgb, write_xyz
from cfr_core.data.landing import ShotLibrary, scan_landing
from cfr_core.data.mvtec import index_category
from cfr_core.io.artifacts import ArtifactError, load_model, save_model
from cfr_core.registry import BankRegistry, CategoryBusyError

REPO = Path(__file__).resolve().parents[1]
CFR = str(Path(sys.executable).parent / "cfr")
TINY = ["--shots", "2", "--grid", "32"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A Dagster home where the demo deployed dome (tiny settings)."""
    from cfr_assets.demo import run_demo

    home = tmp_path_factory.mktemp("faults")
    old = os.environ.get("DAGSTER_HOME")
    rows = run_demo(
        home, size=96, categories=("dome",), shots=2, epochs=2, grid=32, log=lambda m: None
    )
    assert rows[0].success and rows[0].audit_ok
    yield home
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


def registry_of(home: Path) -> BankRegistry:
    return BankRegistry(f"sqlite:///{home / 'registry.db'}")


def env(home: Path) -> dict:
    return {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def pipeline(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [CFR, "pipeline", "run", "dome", "--home", str(home), *TINY, *args],
        env=env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# ----------------------------------------------------------------------------- concurrency


def test_a_held_category_lock_refuses_a_second_run_with_a_clear_message(home):
    with registry_of(home).category_lock("dome", "maintenance by the test"):
        proc = pipeline(home, "--epochs", "2", "--wait", "0")
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "is being rebuilt by maintenance by the test" in out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out, out


def test_a_misspelt_category_is_one_line_and_never_a_partition(home):
    proc = subprocess.run(
        [CFR, "pipeline", "run", "domee", "--home", str(home), *TINY],
        env=env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "unknown category 'domee': did you mean 'dome'?" in out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out, out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert "domee" not in instance.get_dynamic_partitions("category")


def test_concurrent_runs_of_one_category_never_mix_their_lineage(home):
    """Two runs with different settings, started together: the lock serialises them, every
    registered version holds exactly what its row and its lineage say, and the audit proves it."""
    registry = registry_of(home)
    before = {r.version for r in registry.list("dome")}
    procs = [pipeline(home, "--epochs", e, "--wait", "300", "--tolerance", "1") for e in ("3", "5")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    new = [r for r in registry.list("dome") if r.version not in before]
    assert len(new) == 2
    assert sorted(r.method_config["mappers"]["epochs"] for r in new) == [3, 5]
    for record in new:
        report = audit(record, registry)
        assert report.ok, report.failures
        model = load_model(record.model_path)
        assert model.config.mappers.epochs == record.method_config["mappers"]["epochs"]
        assert len(model.history["mappers"]) == model.config.mappers.epochs  # its own mappers
    assert registry.verify() == []


def test_a_killed_run_releases_its_category(home):
    registry = registry_of(home)
    proc = pipeline(home, "--epochs", "400", "--wait", "0")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _holder(home, "dome"):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        assert _holder(home, "dome"), "the run never took the lock"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with registry.category_lock("dome", "the next run", wait=10):
        pass  # the dead run's lock died with its process
    assert audit(registry.deployed("dome"), registry).ok


def _holder(home: Path, category: str) -> str | None:
    with sqlite3.connect(home / "registry.db") as con:
        row = con.execute(
            "select holder from cfr_category_locks where category = ?", (category,)
        ).fetchone()
    return row[0] if row else None


# ----------------------------------------------------------------------------- paths


def test_shots_release_refuses_paths_outside_the_library(home, tmp_path):
    victim = tmp_path / "some" / "dir"
    victim.mkdir(parents=True)
    (victim / "unrelated.txt").write_text("keep me")
    runner = CliRunner()
    for category, content_id in (
        (str(Path("..")), "../../some/dir"),
        ("dome", "../../x"),
        ("..", "0" * 20),
    ):
        result = runner.invoke(
            main, ["shots", "release", category, content_id, "--home", str(home)]
        )
        assert (
            result.exit_code == 2 and "unsafe" in result.output
        ) or "not a scan id" in result.output
    assert (victim / "unrelated.txt").read_text() == "keep me"


def test_symlinks_are_refused_in_the_data_and_landing_roots(synth_root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(synth_root / "dome", data / "dome")  # a category pulled in from elsewhere
    result = CliRunner().invoke(
        main, ["fit", "--data", str(data), "-c", "dome", "--out", str(tmp_path / "m")]
    )
    assert (
        result.exit_code == 2
        and "symbolic link" in result.output
        and str(data / "dome") in result.output
    )
    landing = tmp_path / "landing"
    (landing / "dome").mkdir(parents=True)
    sample = index_category(synth_root, "dome").split("train")[0]
    os.symlink(sample.rgb_path, landing / "dome" / "a.png")
    os.symlink(sample.xyz_path, landing / "dome" / "a.tiff")
    scans, problems = scan_landing(landing / "dome", "dome")
    assert not scans and {p.path.name for p in problems} == {"a.png", "a.tiff"}
    assert all("symbolic link" in p.reason for p in problems)
    os.symlink(synth_root / "candy", landing / "candy")
    res = {"data": CFRData(landing=str(landing)), "store": CFRStore(root=str(tmp_path / "store"))}
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources=res) as context:
            tick = landing_sensor(context)
    assert not tick.run_requests  # neither the linked files nor the linked folder
    assert not (tmp_path / "store" / "shots" / "library").exists()


# ----------------------------------------------------------------------------- tampering


def _sql(home: Path, statement: str, *args) -> None:
    with sqlite3.connect(home / "registry.db") as con:
        con.execute(statement, args)


def test_the_audit_derives_what_must_exist_and_cannot_be_fooled(home):
    registry = registry_of(home)
    live = registry.deployed("dome")
    runner = CliRunner()
    audit_cmd = ["audit", "dome", "--home", str(home)]
    assert runner.invoke(main, audit_cmd).exit_code == 0
    row_id = f"(select id from cfr_deployments where category='dome' and version={live.version})"
    # 1. empty the row's artifact list, then alter the banks file
    banks_version = load_model(live.model_path).lineage["memory_banks"]
    banks = next(
        (home / "artifacts" / "stages" / "dome" / "memory_banks").glob(
            f"{banks_version[:16]}/banks.safetensors"
        )
    )
    original = banks.read_bytes()
    _sql(home, f"update cfr_deployments set artifact_hashes='{{}}' where id={row_id}")
    try:
        banks.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        out = runner.invoke(main, audit_cmd)
        assert out.exit_code == 1
        assert "FAIL stage memory_banks intact" in out.output
        assert "FAIL registry rows and deploy log match their hash chains" in out.output
        assert "FAIL registry artifact list = the derived lineage" in out.output
    finally:
        banks.write_bytes(original)
        _sql(
            home,
            f"update cfr_deployments set artifact_hashes=? where id={row_id}",
            json.dumps(live.artifact_hashes),
        )
    assert runner.invoke(main, audit_cmd).exit_code == 0
    # 2. the metrics that no_regression gates on
    _sql(
        home,
        f"update cfr_deployments set metrics=? where id={row_id}",
        json.dumps({**live.metrics, "image_auroc": 1.0}),
    )
    try:
        out = runner.invoke(main, audit_cmd)
        assert out.exit_code == 1 and "FAIL model metrics = registry metrics" in out.output
    finally:
        _sql(
            home,
            f"update cfr_deployments set metrics=? where id={row_id}",
            json.dumps(live.metrics),
        )
    # 3. any column of any row, e.g. the note, or the deployed flag
    _sql(home, f"update cfr_deployments set note='edited' where id={row_id}")
    try:
        assert any("content differs" in p for p in registry.verify())
    finally:
        _sql(home, f"update cfr_deployments set note='' where id={row_id}")
    assert registry.verify() == []
    assert runner.invoke(main, ["audit", "--all", "--home", str(home)]).exit_code == 0


def test_a_model_folder_must_list_every_file(tmp_path, home):
    model = load_model(registry_of(home).deployed("dome").model_path)
    folder = tmp_path / "m"
    save_model(model, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    meta = json.loads((folder / "model.json").read_text())
    meta["threshold"] = 1e9  # "PASS for anything"
    (folder / "model.json").write_text(json.dumps(meta))
    (folder / "manifest.json").write_text(json.dumps({**manifest, "files": {}}))
    with pytest.raises(ArtifactError, match="manifest.json does not list model.json"):
        load_model(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="model.json: file content does not match"):
        load_model(folder)
    save_model(model, folder, overwrite=True)
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="extra.bin: file is not listed"):
        load_model(folder)
    (folder / "extra.bin").unlink()
    (folder / "manifest.json").write_text(json.dumps({"format": manifest["format"]}))
    result = CliRunner().invoke(main, ["score", "--model", str(folder), "a.png", "b.tiff"])
    assert result.exit_code == 2 and "manifest.json lacks 'files'" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- hostile files


def png_header(width: int, height: int) -> bytes:
    """A PNG that announces width×height pixels (the decompression-bomb header) and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_refused_everywhere(synth_copy, tmp_path, home, monkeypatch):
    bomb_png = png_header(60000, 60000)
    train = index_category(synth_copy, "dome").split("train")
    train[0].rgb_path.write_bytes(bomb_png)
    runner = CliRunner()
    check = runner.invoke(main, ["data", "check", str(synth_copy), "-c", "dome"])
    assert check.exit_code == 1 and "3,600,000,000 pixels, above the limit" in check.output
    fit = runner.invoke(
        main,
        [
            "fit",
            "--data",
            str(synth_copy),
            "-c",
            "dome",
            "--shots",
            "4",
            "--grid",
            "32",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert (
        fit.exit_code == 2
        and str(train[0].rgb_path) in fit.output
        and "above the limit" in fit.output
    )
    model = registry_of(home).deployed("dome").model_path
    score = runner.invoke(
        main, ["score", "--model", model, str(train[0].rgb_path), str(train[0].xyz_path)]
    )
    assert (
        score.exit_code == 2
        and "above the limit" in score.output
        and "Traceback" not in score.output
    )
    # in the landing folder: reported, and the other category of the tick still gets its run
    landing = tmp_path / "landing"
    for cat, rgb in (("dome", train[0].rgb_path), ("candy", None)):
        src = index_category(synth_copy, cat).split("train")[1]
        (landing / cat).mkdir(parents=True)
        shutil.copyfile(rgb or src.rgb_path, landing / cat / "x.png")
        shutil.copyfile(src.xyz_path, landing / cat / "x.tiff")
    monkeypatch.setenv("CFR_LANDING_SETTLE_SECONDS", "0")  # the copy is complete
    res = {"data": CFRData(landing=str(landing)), "store": CFRStore(root=str(tmp_path / "store"))}
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources=res) as context:
            tick = landing_sensor(context)
    assert [r.partition_key for r in tick.run_requests] == ["candy"]


def test_the_pixel_cap_is_configurable_and_read_from_the_tiff_header(synth_root, monkeypatch):
    sample = index_category(synth_root, "dome").split("train")[0]
    monkeypatch.setenv("CFR_MAX_PIXELS", "1000")
    from cfr_core.data.io import read_xyz
    from cfr_core.errors import DataError

    with pytest.raises(DataError, match=r"xyz/000.tiff: point cloud is 96×96 = 9,216 pixels"):
        read_xyz(sample.xyz_path)
    monkeypatch.setenv("CFR_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="CFR_MAX_PIXELS='lots'"):
        read_xyz(sample.xyz_path)


def test_multi_page_and_planar_tiffs_are_refused_from_the_header(tmp_path, monkeypatch):
    import tifffile

    from cfr_core.data.io import read_xyz
    from cfr_core.errors import DataError

    def never_decode(*args, **kwargs):
        raise AssertionError("decoded before the header was checked")

    stack = tmp_path / "stack.tiff"  # 40 pages of 64×64: each page under the cap, not the file
    tifffile.imwrite(stack, np.zeros((40, 64, 64, 3), np.float32), photometric="rgb")
    planar = tmp_path / "planar.tiff"  # one page, channels stored as three planes
    tifffile.imwrite(
        planar, np.zeros((3, 64, 64), np.float32), photometric="rgb", planarconfig="separate"
    )
    big_planar = tmp_path / "big-planar.tiff"
    tifffile.imwrite(
        big_planar, np.zeros((3, 200, 200), np.float32), photometric="rgb", planarconfig="separate"
    )
    monkeypatch.setenv("CFR_MAX_PIXELS", "20000")
    monkeypatch.setattr(tifffile.TiffFile, "asarray", never_decode)
    with pytest.raises(DataError, match="stack.tiff: point cloud TIFF holds 40 pages"):
        read_xyz(stack)
    with pytest.raises(DataError, match=r"planar.tiff: point cloud TIFF holds 3×64×64 samples"):
        read_xyz(planar)
    with pytest.raises(DataError, match=r"announces 3×200×200 = 120,000 samples, above the limit"):
        read_xyz(big_planar)
    monkeypatch.undo()
    ok = tmp_path / "ok.tiff"
    tifffile.imwrite(ok, np.ones((64, 64, 3), np.float32), photometric="rgb")
    assert read_xyz(ok).shape == (64, 64, 3)


def test_malformed_json_is_one_line_naming_the_file(tmp_path, synth_root):
    library = ShotLibrary(tmp_path / "shots")
    scans, _ = scan_landing_pairs(synth_root, tmp_path / "landing")
    library.quarantine(scans[0], "looked odd")
    record = library.folder("dome", scans[0].content_id, True) / "scan.json"
    record.write_text(json.dumps({"name": "x"}))  # no content_id
    result = CliRunner().invoke(main, ["shots", "quarantine", "--store", str(tmp_path)])
    assert result.exit_code == 2 and f"{record}: scan record lacks 'content_id'" in result.output
    record.write_text("{not json")
    result = CliRunner().invoke(main, ["shots", "quarantine", "--store", str(tmp_path)])
    assert result.exit_code == 2 and "scan record is not valid JSON" in result.output
    assert "Traceback" not in result.output


def scan_landing_pairs(synth_root: Path, landing: Path):
    (landing / "dome").mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(index_category(synth_root, "dome").split("train")[:3]):
        shutil.copyfile(s.rgb_path, landing / "dome" / f"s{i}.png")
        shutil.copyfile(s.xyz_path, landing / "dome" / f"s{i}.tiff")
    return scan_landing(landing / "dome", "dome")


def test_a_file_changed_while_copying_is_named_and_the_others_are_ingested(
    synth_root, tmp_path, monkeypatch
):
    from cfr_assets.assets.library import shot_library

    landing = tmp_path / "landing"
    scans, _ = scan_landing_pairs(synth_root, landing)
    changing = scans[1].xyz_path
    import cfr_core.data.landing as landing_mod

    real_copy = landing_mod.shutil.copyfile

    def copy(src, dst, *a, **k):
        out = real_copy(src, dst, *a, **k)
        if Path(src) == changing:  # the scanner rewrites the file while we copy it
            with open(dst, "ab") as fh:
                fh.write(b"more")
        return out

    monkeypatch.setattr(landing_mod.shutil, "copyfile", copy)
    res = default_resources()
    store = CFRStore(root=str(tmp_path / "store"), registry_url=f"sqlite:///{tmp_path / 'r.db'}")
    with dg.build_asset_context(partition_key="dome") as context:
        result = shot_library(
            context, data=CFRData(landing=str(landing)), settings=res["settings"], store=store
        )
    meta = {k: getattr(v, "value", v) for k, v in result.metadata.items()}
    assert meta["new_accepted"] == 2 and meta["not_ingested"] == 1
    assert str(changing) in meta["problems"] or changing.name in meta["problems"]
    assert "changed while it was being copied" in meta["problems"]
    assert len(store.library().samples("dome")) == 2


def test_unused_files_are_counted_and_printed_never_dropped_silently(synth_copy, tmp_path):
    test_dir = synth_copy / "dome" / "test" / "good"
    shutil.copyfile(test_dir / "rgb" / "000.png", test_dir / "rgb" / "bad name.png")
    shutil.copyfile(test_dir / "xyz" / "000.tiff", test_dir / "xyz" / "bad name.tiff")
    runner = CliRunner()
    model = tmp_path / "m"
    fit = runner.invoke(
        main,
        [
            "fit",
            "--data",
            str(synth_copy),
            "-c",
            "dome",
            "--shots",
            "2",
            "--grid",
            "32",
            "--epochs",
            "2",
            "--out",
            str(model),
        ],
    )
    assert fit.exit_code == 0, fit.output
    ev = runner.invoke(main, ["evaluate", "--model", str(model), "--data", str(synth_copy)])
    assert ev.exit_code == 0, ev.output
    assert (
        "warning: 2 file(s) of dome not used" in ev.output
        and "bad name.png: unsafe file name" in ev.output
    )


def test_every_door_applies_the_minimum_size_that_fit_applies(tmp_path):
    for split in ("train", "test"):
        d = tmp_path / "tiny" / "cat" / split / "good"
        write_rgb(d / "rgb" / "000.png", np.full((8, 8, 3), 100, np.uint8))
        write_xyz(d / "xyz" / "000.tiff", np.full((8, 8, 3), 0.5, np.float32))
    runner = CliRunner()
    check = runner.invoke(main, ["data", "check", str(tmp_path / "tiny")])
    assert check.exit_code == 1 and "scan is 8×8 pixels; at least 32×32 is needed" in check.output
    fit = runner.invoke(
        main,
        [
            "fit",
            "--data",
            str(tmp_path / "tiny"),
            "-c",
            "cat",
            "--shots",
            "1",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert fit.exit_code == 2 and "scan is 8×8 pixels; at least 32×32 is needed" in fit.output
    # the landing folder: refused before it can enter the library (and break every rebuild)
    landing = tmp_path / "landing" / "cat"
    write_rgb(landing / "small.png", np.full((8, 8, 3), 100, np.uint8))
    write_xyz(landing / "small.tiff", np.full((8, 8, 3), 0.5, np.float32))
    scans, problems = scan_landing(landing, "cat")
    assert not scans and len(problems) == 1
    assert "small.tiff" in str(problems[0].path)
    assert "scan is 8×8 pixels; at least 32×32 is needed" in problems[0].reason


def test_score_with_a_model_that_has_no_threshold(home, tmp_path, synth_root):
    model = load_model(registry_of(home).deployed("dome").model_path)
    model.threshold = None
    save_model(model, tmp_path / "edited")  # a threshold edited away from its calibration
    sample = index_category(synth_root, "dome").split("test")[0]
    args = [str(sample.rgb_path), str(sample.xyz_path)]
    result = CliRunner().invoke(main, ["score", "--model", str(tmp_path / "edited"), *args])
    assert result.exit_code == 2 and "differs from its calibration" in result.output
    model.calibration = None
    save_model(model, tmp_path / "m")
    result = CliRunner().invoke(main, ["score", "--model", str(tmp_path / "m"), *args])
    assert result.exit_code == 3, result.output  # UNKNOWN
    assert "threshold none (the model was never calibrated)  UNKNOWN" in result.output


def test_a_busy_lock_names_its_holder(tmp_path):
    registry = BankRegistry(f"sqlite:///{tmp_path / 'r.db'}")
    with registry.category_lock("dome", "run abc"):
        with pytest.raises(
            CategoryBusyError, match=r"'dome' is being rebuilt by run abc \(pid \d+"
        ):
            with BankRegistry(f"sqlite:///{tmp_path / 'r.db'}").category_lock(
                "dome", "run xyz", wait=1
            ):
                pass
    with registry.category_lock("dome", "run xyz"):  # released
        pass


# ----------------------------------------------------------------------------- run monitoring


def _runs(home: Path) -> list:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_runs())


def test_run_monitoring_fails_a_dead_run_and_the_queue_moves_on(tmp_path, synth_root):
    """kill -9 of a run's worker: the daemon's run monitoring marks it failed, and the next
    queued run of the same category (held back by the one-run-per-category limit) starts."""
    import yaml

    home = tmp_path / "home"
    home.mkdir()
    config = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    config["run_monitoring"]["poll_interval_seconds"] = 3
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    landing = home / "landing" / "dome"
    landing.mkdir(parents=True)
    for i, s in enumerate(index_category(synth_root, "dome").split("train")):
        shutil.copyfile(s.rgb_path, landing / f"d{i}.png")
        shutil.copyfile(s.xyz_path, landing / f"d{i}.tiff")
    run_env = {**env(home), "CFR_SETTINGS": json.dumps({"epochs": 1, "grid": 32, "shots": 1})}
    dagster = str(Path(sys.executable).parent / "dagster")
    workspace = ["-w", str(REPO / "workspace.yaml")]
    for sensor in ("landing_sensor", "library_sensor"):  # only the runs this test starts
        subprocess.run(
            [dagster, "sensor", "stop", *workspace, sensor],
            env=run_env,
            check=True,
            capture_output=True,
        )
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", *workspace],
        env=run_env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = subprocess.Popen(
        [CFR, "pipeline", "run", "dome", "--home", str(home), "--epochs", "5000", *TINY],
        env=env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any(
            r.status == dg.DagsterRunStatus.STARTED for r in _runs(home)
        ):
            time.sleep(1)
        (dead,) = [r for r in _runs(home) if r.status == dg.DagsterRunStatus.STARTED]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        tags = json.dumps({"cfr/category": "dome", "dagster/partition": "dome"})
        subprocess.run(
            [dagster, "job", "launch", *workspace, "-j", "cfr_category_job", "--tags", tags],
            env=run_env,
            check=True,
            capture_output=True,
        )
        deadline = time.time() + 240
        while time.time() < deadline:
            runs = {r.run_id: r for r in _runs(home)}
            nxt = [r for r in runs.values() if r.run_id != dead.run_id]
            if (
                runs[dead.run_id].status == dg.DagsterRunStatus.FAILURE
                and nxt
                and nxt[0].status
                in (
                    dg.DagsterRunStatus.STARTED,
                    dg.DagsterRunStatus.SUCCESS,
                    dg.DagsterRunStatus.FAILURE,
                )
            ):
                break
            time.sleep(2)
        runs = {r.run_id: r for r in _runs(home)}
        assert runs[dead.run_id].status == dg.DagsterRunStatus.FAILURE
        (nxt,) = [r for r in runs.values() if r.run_id != dead.run_id]
        assert nxt.status != dg.DagsterRunStatus.QUEUED, "the queue did not move on"
        with dg.DagsterInstance.from_config(str(home)) as instance:
            text = " ".join(e.message or "" for e in instance.all_logs(dead.run_id))
        assert "is gone" in text  # failed by run monitoring, not by chance
        deadline = time.time() + 240
        while (
            time.time() < deadline
            and not {r.run_id: r for r in _runs(home)}[nxt.run_id].is_finished
        ):
            time.sleep(2)
    finally:
        if first.poll() is None:
            first.kill()
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


# ----------------------------------------------------------------------------- a hostile pass


def test_an_absurd_point_cloud_is_refused_never_passed(home, tmp_path, synth_root):
    from cfr_core.data.io import read_xyz

    sample = next(s for s in index_category(synth_root, "dome").split("test") if s.label == 1)
    huge = tmp_path / "huge.tiff"
    write_xyz(huge, read_xyz(sample.xyz_path) * 1e20)
    model = registry_of(home).deployed("dome").model_path
    result = CliRunner().invoke(main, ["score", "--model", model, str(sample.rgb_path), str(huge)])
    assert result.exit_code == 2, result.output
    assert (
        "huge.tiff: point cloud coordinates reach" in result.output and "PASS" not in result.output
    )


def test_rollback_refuses_a_model_folder_altered_since_registration(home):
    registry = registry_of(home)
    live = registry.deployed("dome")
    meta = Path(live.model_path) / "model.json"
    original = meta.read_bytes()
    cmd = ["registry", "rollback", "dome", str(live.version), "--home", str(home)]
    meta.write_bytes(original + b" ")
    try:
        result = CliRunner().invoke(main, cmd)
        assert result.exit_code == 2 and "model.json: file content does not match" in result.output
    finally:
        meta.write_bytes(original)
    assert registry.deployed("dome").version == live.version
    assert CliRunner().invoke(main, cmd).exit_code == 0
    assert registry.verify() == []


def _second_version(registry: BankRegistry, live) -> int:
    """A second, honest version row of dome naming the live model folder (not deployed)."""
    fields = {k: getattr(live, k) for k in ("model_path", "model_hash", "artifact_hashes")}
    return registry.register(
        category="dome",
        shot_hashes=live.shot_hashes,
        extractor_ids=live.extractor_ids,
        method_config=live.method_config,
        metrics=live.metrics,
        threshold=live.threshold,
        code_version=live.code_version,
        run_id="second",
        deploy=False,
        **fields,
    ).version


def test_rollback_deploys_only_a_version_that_passes_the_full_audit(home, tmp_path):
    registry = registry_of(home)
    live = registry.deployed("dome")
    second = _second_version(registry, live)
    runner = CliRunner()

    def rollback(version: int):
        return runner.invoke(
            main, ["registry", "rollback", "dome", str(version), "--home", str(home)]
        )

    row = f"category='dome' and version={second}"
    # 1. a row edited in SQL to point elsewhere with a threshold nobody reaches
    forged = tmp_path / "forged"
    forged.mkdir()
    _sql(home, f"update cfr_deployments set threshold=1e9, model_path=? where {row}", str(forged))
    result = rollback(second)
    assert result.exit_code == 2, result.output
    assert f"refusing to rollback dome version {second}" in result.output
    assert "registry rows and deploy log match their hash chains" in result.output
    assert "Traceback" not in result.output
    assert registry.deployed("dome").version == live.version
    _sql(
        home,
        f"update cfr_deployments set threshold=?, model_path=? where {row}",
        live.threshold,
        live.model_path,
    )
    assert registry.verify() == []
    # 2. a stage file of the version's lineage altered (the row and folder intact)
    version = load_model(live.model_path).lineage["attention_retriever"]
    retriever = next(
        (home / "artifacts" / "stages" / "dome" / "attention_retriever").glob(
            f"{version[:16]}/retriever.safetensors"
        )
    )
    original = retriever.read_bytes()
    retriever.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        result = rollback(second)
        assert result.exit_code == 2 and "stage attention_retriever intact" in result.output
        assert registry.deployed("dome").version == live.version
    finally:
        retriever.write_bytes(original)
    # 3. intact: it deploys, and back
    assert rollback(second).exit_code == 0 and registry.deployed("dome").version == second
    assert rollback(live.version).exit_code == 0
    assert registry.deployed("dome").version == live.version and registry.verify() == []


def test_the_audit_checks_the_chain_first_and_never_tracebacks_on_edited_rows(home):
    registry = registry_of(home)
    live = registry.deployed("dome")
    runner = CliRunner()
    row = f"category='dome' and version={live.version}"
    audit_cmd = ["audit", "dome", "--home", str(home)]
    # a short model_path (once an IndexError)
    _sql(home, f"update cfr_deployments set model_path='m' where {row}")
    try:
        out = runner.invoke(main, audit_cmd)
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        assert "FAIL registry rows and deploy log match their hash chains" in out.output
        report = audit(registry.deployed("dome"), registry)
        assert not report.ok and all(isinstance(d, str) for _, _, d in report.checks)
    finally:
        _sql(home, f"update cfr_deployments set model_path=? where {row}", live.model_path)
    # a row whose shots are no longer a list of objects (once an AttributeError)
    _sql(home, f"""update cfr_deployments set shot_hashes='["x"]' where {row}""")
    try:
        out = runner.invoke(main, audit_cmd)
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        assert "FAIL model shots = registry shots" in out.output
    finally:
        _sql(
            home,
            f"update cfr_deployments set shot_hashes=? where {row}",
            json.dumps(live.shot_hashes),
        )
    # the deployed flag flipped off: `cfr audit dome` once stopped at "no deployed version"
    _sql(home, f"update cfr_deployments set deployed=0 where {row}")
    try:
        out = runner.invoke(main, audit_cmd)
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        assert "FAIL registry rows and deploy log match their hash chains" in out.output
        assert "no deployed version" in out.output
    finally:
        _sql(home, f"update cfr_deployments set deployed=1 where {row}")
    healthy = runner.invoke(main, audit_cmd)
    assert healthy.exit_code == 0 and "ok   model loads" in healthy.output


def test_a_model_json_with_a_non_finite_threshold_does_not_load(home, tmp_path):
    model = load_model(registry_of(home).deployed("dome").model_path)
    model.threshold = float("nan")  # a manifest recomputed by whoever edited it
    save_model(model, tmp_path / "m")
    with pytest.raises(ArtifactError, match="field 'threshold' must be a finite number"):
        load_model(tmp_path / "m")


def _edited_copy(model_path: str, out: Path, edit) -> Path:
    """A copy of a model folder with model.json edited by ``edit(meta)`` and its manifest
    recomputed to match (what a forger with write access does)."""
    import shutil

    from cfr_core.io.artifacts import MODEL_JSON

    shutil.copytree(model_path, out)
    meta = json.loads((out / MODEL_JSON).read_text())
    edit(meta)
    (out / MODEL_JSON).write_text(json.dumps(meta))
    _rehash(out)
    return out


def test_every_model_json_field_is_typed_and_ranged_and_unknown_ones_are_refused(
    home, tmp_path, synth_root
):
    from safetensors.torch import load_file, save_file

    live = registry_of(home).deployed("dome").model_path
    edits = {
        "theta NaN": (
            lambda m: m.update(theta=float("nan")),
            "field 'theta' must be a number in [0, 2]",
        ),
        "theta < 0": (lambda m: m.update(theta=-0.2), "field 'theta' must be a number in [0, 2]"),
        "theta huge": (lambda m: m.update(theta=1e9), "field 'theta' must be a number in [0, 2]"),
        "theta text": (lambda m: m.update(theta="0.3"), "field 'theta' must be a number or null"),
        "threshold < 0": (
            lambda m: m.update(threshold=-1.0),
            "field 'threshold' must be a finite number >= 0",
        ),
        "threshold 400 digits": (
            lambda m: m.update(threshold=10**400),
            "field 'threshold' must be a finite number >= 0",
        ),
        "unknown": (lambda m: m.update(accept_all=True), "field 'accept_all' is not a model.json"),
        "dims": (lambda m: m.update(dims={"rgb": "x"}), "field 'dims' must be"),
        "shots": (lambda m: m.update(shots=[{"key": 1}]), "field 'shots' entry 0 must hold"),
        "category": (lambda m: m.update(category="../x"), "field 'category' must be a plain"),
    }
    sample = next(s for s in index_category(synth_root, "dome").split("test") if s.label == 0)
    for name, (edit, message) in edits.items():
        folder = _edited_copy(live, tmp_path / name.replace(" ", "-"), edit)
        with pytest.raises(ArtifactError, match=re.escape(message)):
            load_model(folder)
        result = CliRunner().invoke(
            main, ["score", "--model", str(folder), str(sample.rgb_path), str(sample.xyz_path)]
        )
        assert result.exit_code == 2 and message.split(" must")[0] in result.output, name
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    # a method whose tensors the weights lack: cfr-bank without its attention retriever
    folder = _edited_copy(live, tmp_path / "no-retriever", lambda m: None)
    weights = folder / "weights.safetensors"
    save_file(
        {k: v for k, v in load_file(weights).items() if not k.startswith("retriever.")},
        str(weights),
    )
    folder = _edited_copy(folder, tmp_path / "no-retriever-sealed", lambda m: None)
    with pytest.raises(ArtifactError, match="needs the attention retriever"):
        load_model(folder)


def test_output_paths_that_cannot_be_written_are_one_line_errors(tmp_path):
    from cfr_core.data.io import atomic_path, check_output_folder
    from cfr_core.errors import DataError

    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a folder; expected the path of a file"):
        with atomic_path(tmp_path):
            pass
    with pytest.raises(DataError, match="part of its path is a file"):
        with atomic_path(tmp_path / "file" / "out.json"):
            pass
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="output is a symbolic link"):
        check_output_folder(tmp_path / "link", overwrite=True)
    with pytest.raises(DataError, match="exists and is a file"):
        check_output_folder(tmp_path / "file", overwrite=True)


def test_fit_refuses_what_it_cannot_do_before_it_starts(synth_root, tmp_path):
    base = ["fit", "--data", str(synth_root), "-c", "dome"]
    runner = CliRunner()
    many = runner.invoke(main, [*base, "--shots", "99", "--out", str(tmp_path / "m")])
    assert many.exit_code == 2 and "pass --shots 4 or fewer" in many.output
    inside = runner.invoke(main, [*base, "--out", str(synth_root / "dome" / "model")])
    assert inside.exit_code == 2 and "lies inside the dataset" in inside.output
    nan = runner.invoke(main, [*base, "--theta", "nan", "--out", str(tmp_path / "m")])
    assert nan.exit_code == 2 and "'nan' is not a finite number" in nan.output
    for result in (many, inside, nan):
        assert "fitting" not in result.output and "Traceback" not in result.output
    assert not (synth_root / "dome" / "model").exists() and not (tmp_path / "m").exists()


def test_a_mistyped_home_is_an_error_not_an_empty_registry(tmp_path):
    for cmd in (["registry", "list"], ["audit", "--all"], ["registry", "rollback", "dome", "1"]):
        result = CliRunner().invoke(main, [*cmd, "--home", str(tmp_path / "typo")])
        assert result.exit_code == 2 and "no bank registry here" in result.output, cmd
    assert not (tmp_path / "typo").exists()


def test_the_quarantine_list_ignores_stray_files_and_release_names_a_missing_file(tmp_path):
    from cfr_core.errors import DataError

    library = ShotLibrary(tmp_path / "shots")
    (tmp_path / "shots" / "quarantine").mkdir(parents=True)
    (tmp_path / "shots" / "quarantine" / "notes.txt").write_text("stray")
    assert library.quarantine_list() == []
    scan = library.folder("dome", "a" * 20, True)
    scan.mkdir(parents=True)
    (scan / "rgb.png").write_bytes(b"x")
    rgb_sha = hashlib.sha256(b"x").hexdigest()
    record = {"content_id": "a" * 20, "rgb_sha256": rgb_sha, "xyz_sha256": "y"}
    (scan / "scan.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="xyz.tiff: quarantined scan is incomplete"):
        library.release("dome", "a" * 20)
    assert scan.is_dir()  # nothing moved


def test_evaluate_refuses_to_write_maps_over_a_folder_before_scoring(home, synth_root, tmp_path):
    model = registry_of(home).deployed("dome").model_path
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "mine.png").write_bytes(b"keep")
    cmd = ["evaluate", "--model", model, "--data", str(synth_root), "--maps", str(maps)]
    result = CliRunner().invoke(main, cmd)
    assert result.exit_code == 2 and "maps: output folder exists and is not empty" in result.output
    assert "I-AUROC" not in result.output  # refused before the work
    assert (maps / "mine.png").read_bytes() == b"keep"
    result = CliRunner().invoke(main, [*cmd, "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


def test_data_check_lists_every_unusable_category_and_checks_the_rest(synth_copy, tmp_path):
    shutil.copytree(synth_copy / "dome", synth_copy / "-lead")
    (tmp_path / "outside").mkdir()
    shutil.copytree(synth_copy / "candy", tmp_path / "outside" / "candy")
    (synth_copy / "linked").symlink_to(tmp_path / "outside" / "candy")
    result = CliRunner().invoke(main, ["data", "check", str(synth_copy)])
    assert result.exit_code == 1, result.output
    assert "-lead" in result.output and "linked" in result.output
    assert "Traceback" not in result.output
    for good in ("dome", "candy", "speckled", "ribbed"):
        assert f"\n{good} " in result.output  # still checked and tabulated


def test_a_registry_row_that_no_longer_parses_is_one_line_not_a_traceback(home):
    live = registry_of(home).deployed("dome")
    row_id = f"(select id from cfr_deployments where category='dome' and version={live.version})"
    _sql(home, f"update cfr_deployments set metrics='not json' where id={row_id}")
    try:
        # listing stops with an error; the audit reports the row as a failed check
        for cmd, code in (
            (["registry", "list"], 2),
            (["audit", "--all"], 1),
            (["audit", "dome"], 1),
        ):
            result = CliRunner().invoke(main, [*cmd, "--home", str(home)])
            assert result.exit_code == code, result.output
            assert "cannot be read" in result.output and "Traceback" not in result.output
    finally:
        _sql(
            home,
            f"update cfr_deployments set metrics=? where id={row_id}",
            json.dumps(live.metrics),
        )
    assert CliRunner().invoke(main, ["registry", "list", "--home", str(home)]).exit_code == 0


def test_fit_names_a_symlinked_split_folder_it_cannot_use(synth_copy, tmp_path):
    """A split folder that is a symlink is refused by indexing; fit must say so, not drop it
    silently (resolving the link used to move it outside the category and hide the warning)."""
    val = synth_copy / "dome" / "validation"
    shutil.move(val, tmp_path / "elsewhere")
    val.symlink_to(tmp_path / "elsewhere")
    args = ["fit", "--data", str(synth_copy), "-c", "dome", "--shots", "2", "--grid", "32"]
    fit = CliRunner().invoke(main, [*args, "--epochs", "2", "--out", str(tmp_path / "m")])
    assert fit.exit_code == 0, fit.output
    assert "warning: 1 file(s) of dome not used" in fit.output, fit.output
    assert str(val) in fit.output and "symlink" in fit.output


def _four_landed_dome_scans(synth_root, tmp_path):
    """Four good dome scans dropped into ``tmp_path/landing/dome``, as the landing reads them."""
    landing = tmp_path / "landing" / "dome"
    landing.mkdir(parents=True)
    for i, s in enumerate(index_category(synth_root, "dome").split("train")[:4]):
        shutil.copyfile(s.rgb_path, landing / f"s{i}.png")
        shutil.copyfile(s.xyz_path, landing / f"s{i}.tiff")
    scans, problems = scan_landing(landing, "dome")
    assert len(scans) == 4 and not problems
    return scans


def test_the_library_records_how_each_scan_got_in_and_a_hand_edited_record_is_named(
    tmp_path, synth_root
):
    from cfr_core.errors import DataError

    library = ShotLibrary(tmp_path / "shots")
    scans = _four_landed_dome_scans(synth_root, tmp_path)
    ids = [s.content_id for s in scans]
    library.add(scans[0])  # no gate in force: the operator's own scan
    library.add(scans[1], gate_version=3)  # the gate of deployed version 3 passed it
    library.quarantine(scans[2], "RGB novelty above the gate")
    library.release("dome", ids[2])  # a person looked and released it
    library.add(scans[3])
    records = {i: library.folder("dome", i) / "scan.json" for i in ids}

    def edit(scan_id, changes):  # a value of ... removes the key
        record = {**json.loads(records[scan_id].read_text()), **changes}
        records[scan_id].write_text(json.dumps({k: v for k, v in record.items() if v != ...}))

    info = {i: library.info("dome", i) for i in ids}
    assert [info[i]["admitted"] for i in ids] == ["no gate", "gate", "released", "no gate"]
    assert info[ids[1]]["gate_version"] == 3
    everything = {s.stem for s in library.samples("dome")}
    assert everything == set(ids)
    vouched = {s.stem for s in library.samples("dome", vouched=True)}
    assert vouched == everything - {ids[1]}  # the gate's own verdict is left out

    # records written before the field existed: vouched for, and told apart in the list
    edit(ids[3], {"admitted": ...})
    edit(ids[2], {"admitted": ...})  # still says released_from_quarantine
    edit(ids[0], {"content_id": ids[1], "category": "../x"})  # the folder names it, not this
    listed = {e["content_id"]: e for e in library.library_list("dome")}
    assert {i: e["admitted"] for i, e in listed.items()} == dict(
        zip(ids, ["no gate", "gate", "released", "unrecorded"], strict=True)
    )
    assert listed[ids[0]]["category"] == "dome"
    assert {s.stem for s in library.samples("dome", vouched=True)} == vouched

    # hand-edited: refused naming the record, never read as vouched; the pool does not read it
    for changes, message in (
        ({"admitted": "trusted"}, "unknown admitted value 'trusted'"),
        ({"admitted": None}, "unknown admitted value None"),
        ({"admitted": ["gate"]}, r"unknown admitted value \['gate'\]"),
        ({"gate_version": "../../x"}, "admitted 'gate' with gate_version '../../x'"),
        ({"gate_version": ...}, "admitted 'gate' with gate_version None"),
        ({"gate_version": True}, "admitted 'gate' with gate_version True"),
        ({"admitted": "no gate"}, "admitted 'no gate' with gate_version 3"),
    ):
        edit(ids[1], {"admitted": "gate", "gate_version": 3, **changes})
        path = re.escape(str(records[ids[1]]))
        with pytest.raises(DataError, match=f"{path}: {message}"):
            library.samples("dome", vouched=True)
        with pytest.raises(DataError, match=f"{path}: {message}"):
            library.library_list()
        listed = CliRunner().invoke(main, ["shots", "list", "--store", str(tmp_path)])
        assert listed.exit_code == 2 and re.search(f"{path}: {message}", listed.output)
        assert "Traceback" not in listed.output
        assert len(library.samples("dome")) == 4


def test_without_a_validation_split_thresholds_come_from_vouched_scans_first(tmp_path, synth_root):
    from cfr_assets.assets.evaluation import GATE_PASSED_ONLY, _calibration, _gate_library

    store = CFRStore(root=str(tmp_path / "store"), registry_url=f"sqlite:///{tmp_path / 'r.db'}")
    library = store.library()
    scans = _four_landed_dome_scans(synth_root, tmp_path)
    for scan, version in zip(scans, (None, 1, 2, None), strict=True):
        library.add(scan, version)
    key = {s.stem: s.key for s in library.samples("dome")}
    ids = [s.content_id for s in scans]
    data = CFRData(landing=str(tmp_path / "landing"))  # no labelled dataset: no validation

    val, source = _calibration(data, store, "dome", {key[ids[0]]})
    assert [s.stem for s in val] == [ids[3]]
    assert source == "vouched scans of the pool not used as shots"
    gate, left_out = _gate_library(data, store, "dome")
    assert sorted(s.stem for s in gate) == sorted([ids[0], ids[3]]) and left_out == 2
    # only scans the gate passed beside the shots: used, and the source says so
    val, source = _calibration(data, store, "dome", {key[ids[0]], key[ids[3]]})
    assert sorted(s.stem for s in val) == sorted(ids[1:3]) and source == GATE_PASSED_ONLY
    val, source = _calibration(data, store, "dome", set(key.values()))
    assert val is None and "shots themselves" in source

    # the dataset's train/good in the pool (no validation split) counts as vouched for
    shutil.copytree(synth_root / "dome" / "train", tmp_path / "data" / "dome" / "train")
    data = CFRData(
        landing=str(tmp_path / "landing"),
        dataset_root=str(tmp_path / "data"),
        use_dataset_train=True,
    )
    train = index_category(tmp_path / "data", "dome").split("train")
    val, source = _calibration(data, store, "dome", {key[ids[0]], key[ids[3]], train[0].key})
    assert {s.key for s in val} == {s.key for s in train[1:]}  # not the gate-passed ones
    gate, left_out = _gate_library(data, store, "dome")
    assert {s.key for s in gate} == {key[ids[0]], key[ids[3]]} | {s.key for s in train}


def test_a_damaged_library_record_is_reported_by_the_ingest_that_still_takes_its_scans(
    tmp_path, synth_root
):
    from cfr_assets.assets.library import shot_library
    from cfr_assets.resources import CFRModelSettings

    store = CFRStore(root=str(tmp_path / "store"), registry_url=f"sqlite:///{tmp_path / 'r.db'}")
    scans = _four_landed_dome_scans(synth_root, tmp_path)
    library = store.library()
    library.add(scans[0], gate_version=1)
    record = library.folder("dome", scans[0].content_id) / "scan.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "gate_version": "one"}))
    data = CFRData(landing=str(tmp_path / "landing"))
    with dg.build_asset_context(partition_key="dome") as context:
        meta = shot_library(context, data=data, settings=CFRModelSettings(), store=store).metadata
    assert meta["new_accepted"] == 3 and meta["accepted_scans"] == 4  # no deployed gate yet
    assert meta["vouched_scans"].startswith(f"unknown: {record}: admitted 'gate' with")


def test_landing_names_that_differ_only_by_case_are_refused_not_shadowed(synth_root, tmp_path):
    sample = index_category(synth_root, "dome").split("train")[0]
    landing = tmp_path / "dome"
    landing.mkdir()
    for name in ("scan.png", "SCAN.PNG"):
        shutil.copy(sample.rgb_path, landing / name)
    shutil.copy(sample.xyz_path, landing / "scan.tiff")
    shutil.copy(sample.rgb_path, landing / "other.png")
    shutil.copy(sample.xyz_path, landing / "Other.TIF")  # one pair, cases differ: fine
    scans, problems = scan_landing(landing, "dome")
    assert [s.name for s in scans] == ["other"]
    by_file = {p.path.name: p.reason for p in problems}
    assert set(by_file) == {"scan.png", "SCAN.PNG", "scan.tiff"}
    assert "names differ only by case or extension (SCAN.PNG, scan.png)" in by_file["scan.png"]
    assert "its pair is ambiguous" in by_file["scan.tiff"]


def test_a_float64_cloud_beyond_float32_is_refused_before_the_cast(tmp_path):
    import tifffile

    from cfr_core.data.io import read_xyz
    from cfr_core.errors import DataError

    cloud = np.full((40, 40, 3), 0.5, np.float64)
    cloud[3, 4] = (0.1, 0.2, 1e300)  # inf once cast: it would have become a missing point
    path = tmp_path / "f64.tiff"
    tifffile.imwrite(path, cloud, photometric="rgb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw numpy overflow warning either
        with pytest.raises(DataError, match="coordinates reach 1e[+]300"):
            read_xyz(path)
    cloud[3, 4] = (0.1, 0.2, 0.55)
    tifffile.imwrite(path, cloud, photometric="rgb")
    assert read_xyz(path).dtype == np.float32


def test_a_checkpoint_with_python_objects_is_one_line_with_the_right_fix(tmp_path):
    import argparse

    import torch

    from cfr_core.errors import DataError
    from cfr_core.features.efficientnet import load_lite
    from cfr_core.features.point_mae import PointMAEEncoder, load_point_mae_checkpoint

    path = tmp_path / "ckpt.pth"  # any object torch's safe loader will not rebuild
    torch.save({"model": argparse.Namespace(weights=1)}, path)
    with pytest.raises(DataError) as lite:
        load_lite("lite0", checkpoint=path)
    with pytest.raises(DataError) as mae:
        load_point_mae_checkpoint(PointMAEEncoder(), path)
    for exc in (lite.value, mae.value):
        text = str(exc)
        assert "holds Python objects besides tensors and was not loaded" in text
        assert "\n" not in text and "weights_only" not in text


def test_the_first_ctrl_c_stops_the_demo_and_says_what_is_deployed(tmp_path):
    home = tmp_path / "home"
    cmd = [CFR, "demo", "--home", str(home), "--size", "96", "--shots", "2", "--epochs", "2"]
    proc = subprocess.Popen(
        [*cmd, "--grid", "32", "--categories", "dome,candy,speckled"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "running cfr_category_job for candy" in line:
                time.sleep(4)  # inside candy's run
                proc.send_signal(signal.SIGINT)  # once
                break
        lines += proc.stdout.readlines()
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode == 130, out
    assert "interrupted during the run of candy" in out and "Deployed now: dome v1" in out
    assert "running cfr_category_job for speckled" not in out
    assert "Traceback" not in out


def test_a_feature_cache_entry_is_checked_on_read(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cfr_core.engine import FeatureCache

    cache = FeatureCache(tmp_path)
    features = torch.randn(8, 4, 4)
    cache.put("k" * 64, features)
    assert torch.equal(cache.get("k" * 64), features)
    path = cache.path("k" * 64)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file({"features": features * 1.3}, str(path), metadata=metadata)  # edited in place
    assert cache.get("k" * 64) is None
    save_file({"features": features}, str(path))  # no record of what was written
    assert cache.get("k" * 64) is None
    cache.put("k" * 64, features)
    cache.path("j" * 64).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, cache.path("j" * 64))  # a valid entry moved under another key
    assert cache.get("j" * 64) is None and torch.equal(cache.get("k" * 64), features)


def test_audit_recompute_proves_a_deployment_against_a_clean_recomputation(home):
    from cfr_core.engine import FeatureCache

    registry = registry_of(home)
    live = registry.deployed("dome")
    runner = CliRunner()
    recompute = ["audit", "dome", "--recompute", "--home", str(home)]
    clean = runner.invoke(main, recompute)
    assert clean.exit_code == 0, clean.output
    assert "ok   rgb features = a clean recomputation" in clean.output
    # a forger who knows the cache's scheme: every entry scaled and re-sealed
    cache = FeatureCache(home / "artifacts" / "feature-cache")
    entries = list(cache.root.rglob("*.safetensors"))
    assert entries
    for path in entries:
        key = path.stem
        cache.put(key, cache.get(key) * 1.3)
    try:
        proc = pipeline(home, "--epochs", "2", "--tolerance", "1")
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        forged = registry.deployed("dome")
        assert forged.version != live.version
        assert runner.invoke(main, ["audit", "dome", "--home", str(home)]).exit_code == 0
        caught = runner.invoke(main, recompute)
        assert caught.exit_code == 1, caught.output
        assert "FAIL rgb features = a clean recomputation" in caught.output
    finally:
        for path in entries:
            path.unlink(missing_ok=True)
        back = ["registry", "rollback", "dome", str(live.version), "--home", str(home)]
        assert runner.invoke(main, back).exit_code == 0
    assert runner.invoke(main, recompute).exit_code == 0


# ---- second hostile pass (issue 24, "go looking for the same classes elsewhere")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"bank.keys": t["bank.keys"][:5].clone()}), "pairs are lost"),
        (lambda t: t.update({"bank.rgb": t["bank.rgb"].int()}), "bank.rgb is torch.int32"),
        (lambda t: t.update({"bank.rgb": t["bank.rgb"][:, :3].clone()}), "expected (rows > 0,"),
        (lambda t: t.update({"bank.rgb": t["bank.rgb"][:0].clone()}), "expected (rows > 0,"),
        (lambda t: t["bank.keys"].__setitem__((0, 0), float("nan")), "NaN or infinite"),
        (lambda t: t.pop("norm.rgb_std"), "norm.rgb_std is missing"),
        (lambda t: t.update({"norm.rgb_std": -t["norm.rgb_std"]}), "values <= 0"),
    ],
)
def test_weights_that_would_score_wrongly_do_not_load(home, tmp_path, edit, message):
    """Banks, standardisation and their dtypes are checked against model.json when the
    folder loads (a forger recomputes the manifest), not discovered while scoring."""
    from safetensors.torch import load_file, save_file

    model = load_model(registry_of(home).deployed("dome").model_path)
    save_model(model, tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights), metadata={"format": "cfr-model/1"})
    _rehash(tmp_path / "m")
    with pytest.raises(ArtifactError, match=re.escape(message)):
        load_model(tmp_path / "m")


def test_huge_widths_in_model_json_are_refused_before_anything_is_built(home, tmp_path):
    folder = _edited_copy(
        registry_of(home).deployed("dome").model_path,
        tmp_path / "m",
        lambda meta: meta["dims"].update(points=65536),  # 4 G mapper weights if built
    )
    started = time.perf_counter()
    with pytest.raises(ArtifactError, match="the widths in model.json"):
        load_model(folder)
    assert time.perf_counter() - started < 20  # refused from shapes, not after allocating


def _rehash(folder: Path) -> None:
    from cfr_core.data.io import sha256_file
    from cfr_core.io.artifacts import MANIFEST, content_hash

    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {name: sha256_file(folder / name) for name in manifest["files"]}
    manifest["content_hash"] = content_hash(manifest["files"])
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_empty_clouds_get_one_line_everywhere(tmp_path):
    import tifffile

    from cfr_core.data.io import read_xyz
    from cfr_core.data.validate import check_xyz_values
    from cfr_core.errors import DataError

    path = tmp_path / "e.tiff"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns that it writes a zero-size array
        tifffile.imwrite(path, np.zeros((0, 0, 3), np.float32))
    with pytest.raises(DataError, match=r"unusable shape \(0, 0, 3\)"):
        read_xyz(path)
    problems = check_xyz_values(np.zeros((0, 5, 3), np.float32), path, 0.01)
    assert [p.reason for p in problems] == ["the cloud has no point (shape (0, 5, 3))"]


def test_colour_palette_and_alpha_masks_mark_only_the_defect(tmp_path):
    from PIL import Image

    from cfr_core.data.io import read_mask

    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black background
    rgba[5:15, 5:15, :3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert int(read_mask(tmp_path / "rgba.png").sum()) == 100
    la = np.zeros((40, 40, 2), np.uint8)
    la[..., 1] = 255
    la[0:4, 0:5, 0] = 200
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert int(read_mask(tmp_path / "la.png").sum()) == 20
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 1 is black: no defect
    pal.save(tmp_path / "pal.png")
    assert int(read_mask(tmp_path / "pal.png").sum()) == 0


def test_a_name_with_a_final_newline_is_not_safe():
    from cfr_core.paths import is_safe_name

    assert is_safe_name("dome") and not is_safe_name("dome\n") and not is_safe_name("a\nb")


def test_a_mostly_dropped_cloud_gets_no_verdict(home, tmp_path, synth_root):
    """`cfr score` (and the service, which shares score_arrays) refuse what the landing
    folder and `cfr data check` refuse: a cloud with under 1 % measured points."""
    sample = index_category(synth_root, "dome").split("test")[0]
    xyz = np.zeros((96, 96, 3), np.float32)
    xyz[:9, :9] = 0.3  # 81 of 9,216 points
    write_xyz(tmp_path / "sparse.tiff", xyz)
    model_dir = registry_of(home).deployed("dome").model_path
    result = CliRunner().invoke(
        main, ["score", "--model", model_dir, str(sample.rgb_path), str(tmp_path / "sparse.tiff")]
    )
    assert result.exit_code == 2, result.output
    assert "only 0.88% of points are valid (minimum 1.00%)" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["data", "check", ".", "--min-valid", "nan"],
        ["pipeline", "run", "dome", "--tolerance", "nan"],
        ["pipeline", "run", "dome", "--wait", "inf"],
        ["fit", "--data", ".", "-c", "dome", "--theta", "nan"],
        ["serve", "--poll", "1e300"],
    ],
)
def test_non_finite_numbers_are_refused_by_the_cli(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "not a finite number" in result.output or "is not in the range" in result.output


def test_a_lock_wait_that_is_not_a_number_is_refused(monkeypatch):
    from cfr_assets.definitions import _env_seconds
    from cfr_core.errors import ConfigError

    monkeypatch.setenv("CFR_LOCK_WAIT", "abc")
    with pytest.raises(ConfigError, match="CFR_LOCK_WAIT must be a number of seconds"):
        _env_seconds("CFR_LOCK_WAIT")
    monkeypatch.setenv("CFR_LOCK_WAIT", "nan")
    with pytest.raises(ConfigError):
        _env_seconds("CFR_LOCK_WAIT")
    monkeypatch.setenv("CFR_LOCK_WAIT", "2.5")
    assert _env_seconds("CFR_LOCK_WAIT") == 2.5


def test_a_mistyped_home_is_not_an_empty_shot_library(tmp_path):
    for command in (["shots", "list"], ["shots", "quarantine"]):
        result = CliRunner().invoke(main, [*command, "--home", str(tmp_path / "typo")])
        assert result.exit_code == 2
        assert "no artifact store here" in result.output and "empty" not in result.output


def test_preprocessing_a_tree_applies_the_minimum_scan_size(tmp_path):
    from cfr_core.data.preprocess_tree import preprocess_tree
    from cfr_core.errors import DataError

    for split in ("train", "test"):
        good = tmp_path / "data" / "tiny" / split / "good"
        write_rgb(good / "rgb" / "000.png", np.full((24, 24, 3), 100, np.uint8))
        write_xyz(good / "xyz" / "000.tiff", np.full((24, 24, 3), 0.5, np.float32))
    with pytest.raises(DataError, match=r"scan is 24×24 pixels; at least 32×32") as caught:
        preprocess_tree(tmp_path / "data", tmp_path / "out")
    assert caught.value.path.name == "000.tiff"
    assert not (tmp_path / "out").exists()


def test_data_check_refuses_a_json_target_that_is_a_folder_before_checking(synth_root, tmp_path):
    (tmp_path / "report").mkdir()
    args = ["data", "check", str(synth_root), "--json", str(tmp_path / "report")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "checking" not in result.output and "report" in result.output


def test_listing_an_empty_file_as_registry_writes_nothing(tmp_path):
    empty = tmp_path / "afile"
    empty.touch()
    result = CliRunner().invoke(main, ["registry", "list", "--registry-url", f"sqlite:///{empty}"])
    assert result.exit_code == 2 and "an empty file, not a bank registry" in result.output
    assert empty.stat().st_size == 0
