import json

from click.testing import CliRunner

from cfr_core.cli import main
from cfr_core.config import DEFAULT_METHOD
from cfr_core.data.mvtec import index_category


def test_fit_evaluate_score_end_to_end(synth_root, tmp_path):
    runner = CliRunner()
    model = tmp_path / "model"
    cache = tmp_path / "cache"
    fit = runner.invoke(
        main,
        [
            "fit",
            "--data",
            str(synth_root),
            "--category",
            "ribbed",
            "--shots",
            "2",
            "--grid",
            "32",
            "--epochs",
            "3",
            "--cache",
            str(cache),
            "--stride",
            "2",
            "--device",
            "cpu",
            "--out",
            str(model),
        ],
    )
    assert fit.exit_code == 0, fit.output
    assert "threshold:" in fit.output and (model / "weights.safetensors").exists()
    meta = json.loads((model / "model.json").read_text())
    assert meta["config"]["method"] == DEFAULT_METHOD and len(meta["shots"]) == 2
    assert meta["config"]["extractors"]["rgb"] == "efficientnet_lite"  # the default preset
    assert meta["config"]["scoring"]["stride"] == 2
    assert all(len(s["rgb_sha256"]) == 64 for s in meta["shots"])

    out_json, maps = tmp_path / "metrics.json", tmp_path / "maps"
    ev = runner.invoke(
        main,
        [
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(synth_root),
            "--json",
            str(out_json),
            "--maps",
            str(maps),
            "--cache",
            str(cache),
        ],
    )
    assert ev.exit_code == 0, ev.output
    metrics = json.loads(out_json.read_text())
    assert {
        "category",
        "method",
        "shots",
        "seed",
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "n_test",
    } <= set(metrics)
    assert list(metrics["aupro"]) == ["0.3", "0.1", "0.05", "0.01"] and metrics["n_test"] == 6
    # the line's numbers at the deployed threshold, and every scan's verdict
    scans = metrics["scans"]
    assert len(scans) == 6 and {s["defect"] for s in scans} >= {"good"}
    assert all(set(s) == {"name", "defect", "score", "verdict"} for s in scans)
    assert all(
        s["verdict"] == ("FAIL" if s["score"] > metrics["threshold"] else "PASS") for s in scans
    )
    good = [s for s in scans if s["defect"] == "good"]
    bad = [s for s in scans if s["defect"] != "good"]
    assert metrics["false_reject_rate"] == sum(s["verdict"] == "FAIL" for s in good) / len(good)
    assert metrics["escape_rate"] == sum(s["verdict"] == "PASS" for s in bad) / len(bad)
    assert metrics["flagged"] == sum(s["verdict"] == "FAIL" for s in scans)
    assert metrics["confusion"]["good"] == len(good) and metrics["oracle_escape_rate"] <= 1
    # 1 validation + 2 unused train scans are too few for 5 %: the shots' leave-one-out
    # scores join, and the rule says it cannot support the target
    cal = metrics["calibration"]
    assert cal["n"] == 3 and not cal["supported"] and cal["rule"].startswith("highest")
    assert {k: len(v) for k, v in cal["scores"].items()} == {
        "validation/good": 1,
        "other good scans": 2,
        "leave-one-out shots": 2,
    }
    assert "false rejects" in ev.output and "TARGET NOT SUPPORTED" in ev.output
    assert len(list(maps.glob("*.png"))) == 6

    sample = index_category(synth_root, "ribbed").split("test")[0]
    heat = tmp_path / "heat.png"
    sc = runner.invoke(
        main,
        [
            "score",
            "--model",
            str(model),
            str(sample.rgb_path),
            str(sample.xyz_path),
            "--heatmap",
            str(heat),
            "--json",
        ],
    )
    result = json.loads(sc.output)
    assert result["score"] > 0 and heat.stat().st_size > 500
    assert sc.exit_code == {"PASS": 0, "FAIL": 1}[result["verdict"]], sc.output


def test_target_false_reject_sets_the_order_statistic_when_scans_support_it(synth_root, tmp_path):
    """At a 30 % target, 3 unseen good scans are enough (k = ceil(4 * 0.7) = 3 of 3): the
    threshold is their highest score, no margin, no leave-one-out scores, and fit says so."""
    model = tmp_path / "m"
    fit = CliRunner().invoke(
        main,
        [
            "fit",
            "--data",
            str(synth_root),
            "-c",
            "ribbed",
            "--shots",
            "2",
            "--grid",
            "32",
            "--epochs",
            "2",
            "--target-false-reject",
            "0.3",
            "--out",
            str(model),
        ],
    )
    assert fit.exit_code == 0, fit.output
    cal = json.loads((model / "model.json").read_text())["calibration"]
    assert cal["supported"] and cal["rule"] == "order statistic" and (cal["n"], cal["k"]) == (3, 3)
    assert "leave-one-out shots" not in cal["scores"]
    meta = json.loads((model / "model.json").read_text())
    assert meta["threshold"] == max(x for v in cal["scores"].values() for x in v)
    assert meta["config"]["scoring"]["target_false_reject"] == 0.3
    assert "good score 3 of 3" in fit.output
    bad = CliRunner().invoke(
        main,
        ["fit", "--data", str(synth_root), "-c", "ribbed", "--target-false-reject", "0.7",
         "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert bad.exit_code == 2 and "target-false-reject" in bad.output


def test_score_bad_inputs_name_the_file(synth_root, tmp_path):
    runner = CliRunner()
    model = tmp_path / "m"
    assert (
        runner.invoke(
            main,
            [
                "fit",
                "--data",
                str(synth_root),
                "-c",
                "dome",
                "--method",
                "cfm",
                "--grid",
                "32",
                "--epochs",
                "2",
                "--out",
                str(model),
            ],
        ).exit_code
        == 0
    )
    sample = index_category(synth_root, "dome").split("test")[0]
    other = index_category(synth_root, "ribbed").split("test")[0]
    missing = runner.invoke(
        main, ["score", "--model", str(model), str(sample.rgb_path), str(tmp_path / "x.tiff")]
    )
    assert missing.exit_code == 2 and "x.tiff: point cloud file is missing" in missing.output
    mismatch = runner.invoke(
        main, ["score", "--model", str(model), str(sample.rgb_path), str(other.xyz_path)]
    )
    assert mismatch.exit_code == 2 and "RGB is 96×96 but the cloud is 96×72" in mismatch.output
    wrong = runner.invoke(
        main,
        [
            "fit",
            "--data",
            str(synth_root),
            "-c",
            "dome",
            "--extractors",
            "offline",
            "--rgb-weights",
            str(model / "model.json"),
            "--out",
            str(tmp_path / "n"),
        ],
    )
    assert wrong.exit_code == 2 and "needs --extractors paper or lite" in wrong.output
    absent = runner.invoke(
        main,
        ["fit", "--data", str(synth_root), "-c", "dome", "--rgb-weights", "w.pth"]
        + ["--out", str(tmp_path / "n")],
    )
    assert absent.exit_code == 2 and "'w.pth' does not exist" in absent.output
    assert "fitting" not in absent.output


def test_unusable_device_is_a_clear_error(synth_root, tmp_path):
    base = ["fit", "--data", str(synth_root), "-c", "ribbed", "--grid", "32", "--epochs", "1"]
    cases = (("tpu", "unknown device"), ("meta", "not supported"), ("cuda:7", "cuda"))
    for device, says in cases:
        res = CliRunner().invoke(main, [*base, "--device", device, "--out", str(tmp_path / "m")])
        assert res.exit_code != 0 and says in res.output.lower(), (device, res.output)
        assert "Traceback" not in res.output and not (tmp_path / "m").exists()
