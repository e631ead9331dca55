import shutil

import numpy as np
from click.testing import CliRunner

from cfr_core.cli import main
from cfr_core.data.io import write_rgb, write_xyz
from cfr_core.data.validate import check_category, check_dataset


def test_generated_tree_passes(synth_root):
    reports = check_dataset(synth_root)
    assert [r.category for r in reports] == ["candy", "dome", "ribbed", "speckled"]
    assert all(r.n_errors == 0 and r.n_warnings == 0 for r in reports), [
        r.problems for r in reports
    ]
    ribbed = next(r for r in reports if r.category == "ribbed")
    assert ribbed.sizes == {(72, 96)}
    assert 0.3 < ribbed.mean_valid_fraction < 1.0


def _break_tree(root):
    """Damage one file per failure mode; return {file: expected reason fragment}."""
    good = root / "dome" / "train" / "good"
    tiff = good / "xyz" / "000.tiff"
    tiff.write_bytes(tiff.read_bytes()[:500])
    (good / "xyz" / "001.tiff").unlink()
    write_xyz(good / "xyz" / "002.tiff", np.ones((80, 96, 3), np.float32))
    write_xyz(good / "xyz" / "003.tiff", np.zeros((96, 96, 3), np.float32))
    test = root / "dome" / "test" / "good"
    write_xyz(test / "xyz" / "000.tiff", np.full((96, 96, 3), np.nan, np.float32))
    sparse = np.zeros((96, 96, 3), np.float32)
    sparse[:5, :5] = 0.5
    write_xyz(test / "xyz" / "001.tiff", sparse)
    (root / "dome" / "validation" / "good" / "rgb" / "000.png").write_bytes(b"garbage")
    write_rgb(root / "dome" / "test" / "crack" / "gt" / "000.png", np.zeros((10, 10, 3), np.uint8))
    return {
        "train/good/xyz/000.tiff": "does not decode",
        "train/good/rgb/001.png": "has no point cloud",
        "train/good/xyz/002.tiff": "differs from RGB",
        "train/good/xyz/003.tiff": "all points are zero",
        "test/good/xyz/000.tiff": "every point is NaN",
        "test/good/xyz/001.tiff": "only 0.27% of points are valid",
        "validation/good/rgb/000.png": "does not decode",
        "test/crack/gt/000.png": "mask size 10×10 differs",
    }


def test_each_broken_file_is_named_with_its_reason(synth_copy):
    expected = _break_tree(synth_copy)
    report = check_category(synth_copy, "dome")
    found: dict[str, list[str]] = {}
    for p in report.problems:
        found.setdefault(str(p.path.relative_to(synth_copy / "dome")), []).append(p.reason)
    for path, fragment in expected.items():
        assert path in found, f"{path} not reported; got {sorted(found)}"
        assert any(fragment in reason for reason in found[path]), (path, found[path])
    assert report.n_errors == len(expected)


def test_partial_nan_is_a_warning_not_an_error(synth_copy):
    xyz_path = synth_copy / "candy" / "train" / "good" / "xyz" / "000.tiff"
    from cfr_core.data.io import read_xyz

    xyz = read_xyz(xyz_path)
    xyz[:3] = np.nan
    write_xyz(xyz_path, xyz)
    report = check_category(synth_copy, "candy")
    assert report.n_errors == 0 and report.n_warnings == 1
    assert "288 of 9216 points are NaN/inf" in report.problems[0].reason


def test_cli_check_exit_codes_and_output(synth_copy, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(
        main, ["data", "check", str(synth_copy), "-c", "candy", "--json", str(tmp_path / "r.json")]
    )
    assert ok.exit_code == 0, ok.output
    assert "OK: 0 error(s)" in ok.output and (tmp_path / "r.json").exists()
    expected = _break_tree(synth_copy)
    bad = runner.invoke(main, ["data", "check", str(synth_copy)])
    assert bad.exit_code == 1
    for path, fragment in expected.items():
        line = next(line for line in bad.output.splitlines() if path in line)
        assert fragment in line and line.startswith("ERROR")
    assert f"FAILED: {len(expected)} error(s)" in bad.output


def test_cli_check_missing_root_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "nowhere: dataset root is not a folder" in result.output


def test_empty_category_is_an_error(synth_copy):
    shutil.rmtree(synth_copy / "speckled" / "train" / "good")
    (synth_copy / "speckled" / "train" / "good").mkdir()
    report = check_category(synth_copy, "speckled")
    assert any("no train/good samples" in p.reason for p in report.problems)
