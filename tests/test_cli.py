import subprocess
import sys

from click.testing import CliRunner

from cfr_core.cli import main
from cfr_core.data.validate import check_dataset


def test_help_explains_commands():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "data" in top.output and "demo" in top.output
    synth = runner.invoke(main, ["data", "synth", "--help"])
    assert "--categories" in synth.output and "mismatch" in synth.output


def test_synth_preprocess_and_preview(tmp_path):
    runner = CliRunner()
    out = tmp_path / "synth"
    args = [
        "data",
        "synth",
        str(out),
        "--categories",
        "dome,ribbed",
        "--size",
        "80",
        "--train",
        "2",
        "--validation",
        "1",
        "--test-good",
        "1",
        "--test-per-defect",
        "1",
        "--preview",
        str(tmp_path / "p.png"),
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["dome", "ribbed", "synth.json"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert runner.invoke(main, args).exit_code == 2  # refuses to overwrite silently

    pre = tmp_path / "pre"
    result = runner.invoke(main, ["data", "preprocess", str(out), str(pre)])
    assert result.exit_code == 0, result.output
    assert all(r.n_errors == 0 for r in check_dataset(pre))
    assert check_dataset(pre)[1].sizes == {(100, 100)}  # ribbed 80x60 padded to a square


def test_demo_command_deploys_and_audits(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # run_demo points DAGSTER_HOME at --home
    args = [
        "demo",
        "--home",
        str(tmp_path),
        "--size",
        "64",
        "--categories",
        "dome",
        "--shots",
        "1",
        "--epochs",
        "2",
        "--grid",
        "24",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "OK: every demo category deployed and audited" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("dome"))
    assert row.split()[1:3] == ["deployed", "1"] and row.endswith("ok")
    assert (tmp_path / "registry.db").exists() and (tmp_path / "dagster.yaml").exists()


def test_core_never_imports_dagster():
    code = (
        "import sys, pkgutil, importlib, cfr_core\n"
        "for m in pkgutil.walk_packages(cfr_core.__path__, 'cfr_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('dagster', 'cfr_assets')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
