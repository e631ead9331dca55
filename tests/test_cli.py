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


def test_demo_generates_and_checks(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--home", str(tmp_path), "--size", "64"])
    assert result.exit_code == 0, result.output
    assert "OK: demo data generated and checked" in result.output
    assert (tmp_path / "demo" / "preview.png").exists()


def test_core_never_imports_dagster():
    code = (
        "import sys, pkgutil, importlib, cfr_core\n"
        "for m in pkgutil.walk_packages(cfr_core.__path__, 'cfr_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('dagster', 'cfr_assets')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
