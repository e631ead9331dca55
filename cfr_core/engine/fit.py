"""Fitting a category, calibrating it, and evaluating it: one staged path for `cfr fit` and the pipeline.

The stages, each a function that the Dagster assets call one by one and that
:func:`fit_features` / :func:`fit` call in sequence (so the factory deploys
exactly the detector that `cfr fit` builds):

1. :func:`choose_shots`        the published few-shot protocol
2. ``extract_features``        frozen per-pixel features (cached)
3. :func:`fit_standardisation` per-category feature standardisation (or none)
4. :func:`fit_mappers`         crossmodal mappers (CFR: cyclic GeGLU, CFM: MLP)
5. :func:`fit_banks`           memory banks (+ the θ the method replaces at)
6. :func:`fit_retriever`       attention retriever
7. :func:`assemble`            the model; then :func:`calibrate` its thresholds
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cfr_core.config import FitConfig
from cfr_core.data.fewshot import ShotSelection, select_shots
from cfr_core.data.io import sha256_file
from cfr_core.data.mvtec import GOOD, Sample, index_category
from cfr_core.engine.features import FeatureCache, FeatureSet, build_extractors, extract_features
from cfr_core.engine.gate import NoLibraryCheck, build_library_gate, gate_summary
from cfr_core.engine.infer import InferenceResult, infer, plausibility
from cfr_core.engine.model import FittedModel, ShotRecord
from cfr_core.engine.normalize import FeatureNorm
from cfr_core.engine.train import Progress, train_mappers, train_retriever
from cfr_core.errors import ConfigError, DataError, EmptyCategoryError
from cfr_core.features.base import Extractor
from cfr_core.memory.bank import Banks, build_banks, build_joint_bank
from cfr_core.metrics.report import MetricReport, compute_report
from cfr_core.models.mappers import CrossModalMappers
from cfr_core.models.retriever import AttentionRetriever
from cfr_core.scoring.maps import aupro_maps, gate_threshold, pixel_maps
from cfr_core.scoring.verdict import (
    LEAVE_ONE_OUT,
    Verdicts,
    calibrate_threshold,
    needed_scans,
    verdicts,
)

log = logging.getLogger(__name__)


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, or a ConfigError that says what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} asked for, but there are {torch.cuda.device_count()} GPUs"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return dev


def on_device(extractors: tuple[Extractor, Extractor], device: str) -> tuple[Extractor, Extractor]:
    dev = check_device(device)
    return extractors[0].to(dev), extractors[1].to(dev)


def shot_records(samples: Sequence[Sample]) -> list[ShotRecord]:
    return [
        ShotRecord(
            s.key,
            str(s.rgb_path),
            str(s.xyz_path),
            sha256_file(s.rgb_path),
            sha256_file(s.xyz_path),
        )
        for s in samples
    ]


# ----------------------------------------------------------------------------- stages


def choose_shots(pool: Sequence[Sample], config: FitConfig) -> ShotSelection:
    """Stage 1: ``config.shots`` of ``pool`` by the published protocol (all of them if fewer)."""
    return select_shots(list(pool), min(config.shots, len(pool)), config.fewshot_seed)


def fit_standardisation(config: FitConfig, features: FeatureSet) -> FeatureNorm | None:
    """Stage 3: the per-category standardisation, when the config asks for one."""
    return FeatureNorm.fit(features) if config.extractors.standardized else None


def standardised(norm: FeatureNorm | None, features: FeatureSet) -> FeatureSet:
    return features if norm is None else norm.apply(features)


def fit_mappers(
    config: FitConfig,
    features: FeatureSet,
    progress: Progress | None = None,
    device: str = "cpu",
) -> tuple[CrossModalMappers | None, list[float], float]:
    """Stage 4: (mappers or None, loss per epoch, seconds) on standardised features."""
    if not config.uses_mappers:
        return None, [], 0.0
    mappers, hist = train_mappers(features, config.mappers, progress, device)
    return mappers, hist.losses, hist.seconds


def fit_banks(
    config: FitConfig, features: FeatureSet
) -> tuple[Banks | None, torch.Tensor | None, float]:
    """Stage 5: (key-value + RGB banks, BTF's joint bank, seconds), what the method needs."""
    t0 = time.perf_counter()
    banks = joint = None
    if config.method == "btf":
        joint = build_joint_bank(features.rgb, features.points, features.foreground, config.banks)
    elif config.needs_banks:
        banks = build_banks(features.rgb, features.points, config.banks)
    return banks, joint, time.perf_counter() - t0


@torch.no_grad()
def fit_theta(
    config: FitConfig,
    features: FeatureSet,
    mappers: CrossModalMappers | None,
    banks: Banks | None,
) -> tuple[float | None, str]:
    """Stage 5b: the replacement threshold θ and where it came from.

    A fixed θ (the paper's 0.4 for DINO + Point-MAE) is used as it is. ``"auto"``
    calibrates it from the shots alone: the ``theta_quantile`` quantile of the
    unreliability d = 1 - max cos(prediction, RGB bank) of the mappers'
    predictions on the shots' foreground pixels, so that a test prediction is
    replaced when it is less plausible than almost every prediction on known-good
    pixels, whatever the feature space's scale.
    """
    if config.replacement is None:
        return None, "no replacement"
    theta = config.scoring.theta
    if theta != "auto":
        return float(theta), "fixed"
    d = []
    for i in range(len(features)):
        fg = features.foreground[i]
        if fg.any():
            p_rgb, _ = mappers(features.rgb[i][:, fg].T, features.points[i][:, fg].T)
            d.append(plausibility(p_rgb, banks.rgb))
    q = config.scoring.theta_quantile
    theta = float(np.quantile(torch.cat(d).double().numpy(), q))
    return theta, f"calibrated: q{q:g} of the shots' unreliability"


def fit_retriever(
    config: FitConfig,
    features: FeatureSet,
    banks: Banks | None,
    progress: Progress | None = None,
) -> tuple[AttentionRetriever | None, list[float], float]:
    """Stage 6: (attention retriever or None, loss per epoch, seconds)."""
    if config.replacement != "attention":
        return None, [], 0.0
    retriever, hist = train_retriever(features, banks, config.retriever, progress)
    return retriever, hist.losses, hist.seconds


def assemble(
    category: str,
    config: FitConfig,
    extractor_ids: dict[str, str],
    dims: dict[str, int],
    norm: FeatureNorm | None = None,
    mappers: CrossModalMappers | None = None,
    banks: Banks | None = None,
    joint_bank: torch.Tensor | None = None,
    retriever: AttentionRetriever | None = None,
    theta: tuple[float | None, str] = (None, ""),
    history: dict[str, list[float]] | None = None,
) -> FittedModel:
    """Stage 7: the model from its fitted parts (no threshold yet)."""
    return FittedModel(
        category=category,
        config=config,
        extractor_ids=extractor_ids,
        dims=dims,
        norm=norm,
        mappers=mappers,
        banks=banks,
        joint_bank=joint_bank,
        retriever=retriever,
        theta=theta[0],
        theta_source=theta[1],
        history={k: v for k, v in (history or {}).items() if v},
    )


def fit_features(
    category: str,
    config: FitConfig,
    features: FeatureSet,
    extractors: tuple[Extractor, Extractor],
    progress: Progress | None = None,
    device: str = "cpu",
) -> FittedModel:
    """Stages 3-7 on the shots' features: what ``config.method`` needs (no threshold yet).

    ``device`` runs the mapper training there (the costly part with the paper's
    1152/768-d features); banks, retriever and the returned model stay on the CPU.
    """
    norm = fit_standardisation(config, features)
    feats = standardised(norm, features)
    mappers, mapper_losses, mapper_s = fit_mappers(config, feats, progress, device)
    banks, joint, bank_s = fit_banks(config, feats)
    theta = fit_theta(config, feats, mappers, banks)
    retriever, retriever_losses, retriever_s = fit_retriever(config, feats, banks, progress)
    model = assemble(
        category,
        config,
        {"rgb": extractors[0].lineage_id, "points": extractors[1].lineage_id},
        {"rgb": features.rgb.shape[1], "points": features.points.shape[1]},
        norm,
        mappers,
        banks,
        joint,
        retriever,
        theta,
        {"mappers": mapper_losses, "retriever": retriever_losses},
    )
    model.timings.update({"mappers": mapper_s, "banks": bank_s, "retriever": retriever_s})
    return model


# ----------------------------------------------------------------------------- thresholds


def calibration_samples(
    root: str | Path, category: str, shots: Sequence[Sample]
) -> tuple[list[Sample], str]:
    """Normal samples the model has not seen: validation/good, else the unused train/good."""
    index = index_category(root, category)
    if index.split("validation"):
        return index.split("validation"), "validation/good"
    used = {s.key for s in shots}
    rest = [s for s in index.split("train") if s.key not in used]
    if rest:
        return rest, "train/good not used as shots"
    return list(shots), "the shots themselves (optimistic: add validation/good samples)"


@torch.no_grad()
def cross_fitted_scores(model: FittedModel, shots: FeatureSet) -> list[float]:
    """Leave-one-shot-out scores: each shot scored by ``model`` with its banks rebuilt from
    the other shots (mappers, retriever and θ as fitted). A shot scored against banks that
    hold it looks perfect; against the others' it looks like a new good part the banks
    never saw. Empty for one shot, and for methods without banks (cfm, cfr-noreplace)."""
    if len(shots) < 2 or (model.banks is None and model.joint_bank is None):
        return []
    feats = standardised(model.norm, shots)
    out = []
    for i in range(len(shots)):
        banks, joint, _ = fit_banks(
            model.config, feats.select([j for j in range(len(shots)) if j != i])
        )
        held_out = replace(model, banks=banks, joint_bank=joint)
        out.append(float(infer(held_out, shots.select([i])).scores[0]))
    return out


def calibrate(
    model: FittedModel,
    features: FeatureSet | None,
    source: str,
    unseen: FeatureSet | None = None,
    shots: FeatureSet | None = None,
) -> float:
    """The line's pass/fail threshold and the quality gate's threshold, from good scans'
    scores.

    The line's threshold (:func:`~cfr_core.scoring.verdict.calibrate_threshold`) is set
    for ``scoring.target_false_reject`` on every good scan the model was not fitted on:
    ``features`` (validation; ``source`` names them) and ``unseen`` (the library's other
    good scans), plus, when those are too few for the target, the leave-one-shot-out
    scores of ``shots`` (:func:`cross_fitted_scores`). The rule, n and what it promises
    are kept in ``model.calibration``. The gate's threshold comes from the validation and
    unseen scans, the highest x (1 + ``gate_margin``).
    """
    scoring = model.config.scoring
    pooled: dict[str, list[float]] = {}
    for name, feats in ((source, features), ("other good scans", unseen)):
        if feats is None or not len(feats):
            continue
        values = infer(model, feats).scores.tolist()
        broken = [key for key, v in zip(feats.keys, values, strict=True) if not math.isfinite(v)]
        if broken:
            raise DataError(
                f"good scan(s) {', '.join(broken)} score non-finite: the threshold cannot be "
                "calibrated",
                None,
                "check them with `cfr data check`, or remove them from the good scans",
            )
        pooled[name] = values
    first, more = pooled.get(source, []), pooled.get("other good scans", [])
    if shots is not None and len(first) + len(more) < needed_scans(scoring.target_false_reject):
        loo = [v for v in cross_fitted_scores(model, shots) if math.isfinite(v)]
        if loo:
            pooled[LEAVE_ONE_OUT] = loo
    if not pooled:
        raise EmptyCategoryError("no good scan to calibrate the line threshold on", None)
    model.calibration = calibrate_threshold(
        pooled, scoring.target_false_reject, scoring.threshold_margin
    )
    model.threshold = model.calibration.threshold
    model.gate_threshold = gate_threshold(
        first + more or model.calibration.all_scores(), scoring.gate_margin
    )
    model.threshold_source = source
    return model.threshold


def attach_library_gate(model: FittedModel, library: FeatureSet) -> str:
    """Give ``model`` the gate's library check (:mod:`cfr_core.engine.gate`) built on the
    good ``library`` scans (the ``library_gate_scans`` most varied when there are more); a
    sentence for the log says what was built, or why not."""
    if len(library) < 2:
        model.library_gate = None
        return (
            f"library check off: {len(library)} good scan(s) in the library, it needs 2 "
            "(the gate uses the model's score alone)"
        )
    t0 = time.perf_counter()
    try:
        scoring = model.config.scoring
        model.library_gate = build_library_gate(
            library,
            scoring.library_gate_margin,
            scoring.library_gate_scans,
            colour_margin=scoring.colour_gate_margin,
            shape_margin=scoring.shape_gate_margin,
        )
    except NoLibraryCheck as exc:
        model.library_gate = None
        return f"library check off: {exc} (the gate uses the model's score alone)"
    model.timings["library_gate"] = time.perf_counter() - t0
    return gate_summary(model)


def library_samples(root: str | Path, category: str) -> list[Sample]:
    """Every good scan outside test: train/good and validation/good (`cfr fit`'s library)."""
    index = index_category(root, category)
    return index.split("train") + index.split("validation")


def calibrate_and_gate(
    model: FittedModel,
    library: Sequence[Sample],
    calibration: Sequence[Sample],
    source: str,
    extractors: tuple[Extractor, Extractor],
    cache: FeatureCache | None = None,
    shots: Sequence[Sample] = (),
) -> str:
    """Thresholds (:func:`calibrate`) and library check (:func:`attach_library_gate`) of a
    model fitted on ``model.shots``, from the good ``library`` scans (shots included), the
    ``calibration`` scans (validation) and the ``shots`` (their leave-one-out scores);
    features of all are extracted once.

    When the calibration scans are the shots themselves (nothing else is known good), the
    shots are scored against the other shots' banks instead, where the method has banks."""
    samples = list({s.key: s for s in [*library, *calibration, *shots]}.values())
    features = extract_features(samples, extractors, model.config.preprocess, cache)
    pos = {s.key: i for i, s in enumerate(samples)}
    shot_keys = {s.key for s in model.shots}
    cal = {s.key for s in calibration}
    unseen = [pos[s.key] for s in samples if s.key not in shot_keys and s.key not in cal]
    shot_idx = [pos[k] for k in (s.key for s in model.shots) if k in pos]
    shot_features = features.select(shot_idx) if len(shot_idx) == len(model.shots) else None
    cal_features = features.select([pos[s.key] for s in calibration])
    self_only = bool(cal) and cal <= shot_keys
    if self_only and shot_features is not None and cross_fitted_scores_possible(model):
        cal_features, source = None, "the shots, each against the other shots' banks"
    calibrate(
        model,
        cal_features,
        source,
        features.select(unseen) if unseen else None,
        shot_features,
    )
    return attach_library_gate(model, features.select([pos[s.key] for s in library]))


def cross_fitted_scores_possible(model: FittedModel) -> bool:
    """Leave-one-shot-out scores exist: two shots or more, and banks to leave one out of."""
    return len(model.shots) >= 2 and (model.banks is not None or model.joint_bank is not None)


def fit(
    root: str | Path,
    category: str,
    config: FitConfig,
    cache: FeatureCache | None = None,
    extractors: tuple[Extractor, Extractor] | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
) -> FittedModel:
    """Fit ``config.method`` on ``config.shots`` normal samples of ``category``.

    ``device`` ("cpu", "cuda", "cuda:1") runs feature extraction and mapper
    training there; everything else, and the returned model, is on the CPU.
    """
    index = index_category(root, category)
    selection = choose_shots(index.require_train(), config)
    extractors = on_device(extractors or build_extractors(config.extractors), device)
    t0 = time.perf_counter()
    shots = extract_features(selection.samples, extractors, config.preprocess, cache)
    model = fit_features(category, config, shots, extractors, progress, device)
    model.timings["shot_features"] = time.perf_counter() - t0
    model.shots = shot_records(selection.samples)
    val, source = calibration_samples(root, category, selection.samples)
    note = calibrate_and_gate(
        model, library_samples(root, category), val, source, extractors, cache, selection.samples
    )
    log.info(note)
    return model


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Test-set results of one model."""

    report: MetricReport
    keys: list[str]
    labels: np.ndarray
    scores: np.ndarray
    result: InferenceResult
    masks: torch.Tensor
    defects: list[str]  # per scan: "good" or the defect type
    names: list[str]  # per scan: "<defect>/<stem>"
    threshold: float | None  # the model's line threshold when scored

    @property
    def verdicts(self) -> Verdicts:
        """False rejects and escapes at the model's threshold, per defect type and per scan."""
        return verdicts(self.scores, self.defects, self.names, self.threshold)

    @property
    def replacement_rate(self) -> float:
        fg = self.result.foreground.reshape(len(self.keys), -1).sum(dim=1).float()
        return float((self.result.replaced * fg).sum() / fg.sum().clamp_min(1))

    def to_dict(self) -> dict:
        """The metrics as stored with a model and in the registry (verdict rates at the
        model's threshold included; per-scan verdicts are in :attr:`verdicts`)."""
        return {
            **self.report.to_dict(),
            "replacement_rate": self.replacement_rate,
            **self.verdicts.line_numbers(),
        }


def evaluate_features(
    model: FittedModel,
    features: FeatureSet,
    labels: np.ndarray,
    defects: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> Evaluation:
    """Metrics of ``model`` on labelled ``features``; ``defects`` (default: "good" or
    "defective" from the labels) and ``names`` (default: the feature keys) label the
    per-scan verdicts."""
    result = infer(model, features)
    if defects is None:
        defects = [GOOD if int(y) == 0 else "defective" for y in labels]
    masks = features.masks
    report = compute_report(
        result.scores.numpy(),
        labels,
        aupro_maps(result.maps).numpy(),
        masks.numpy(),
        pixel_maps=pixel_maps(result.maps).numpy(),
    )
    return Evaluation(
        report,
        features.keys,
        labels,
        result.scores.numpy(),
        result,
        masks,
        list(defects),
        list(names if names is not None else features.keys),
        model.threshold,
    )


def test_samples(root: str | Path, category: str) -> list[Sample]:
    test = index_category(root, category).split("test")
    if not test or all(s.defect == GOOD for s in test) or all(s.defect != GOOD for s in test):
        raise EmptyCategoryError(
            "evaluation needs test samples of both good and defective parts",
            Path(root) / category / "test",
        )
    return test


def evaluate(
    model: FittedModel,
    root: str | Path,
    cache: FeatureCache | None = None,
    extractors: tuple[Extractor, Extractor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
) -> Evaluation:
    """Score every test sample of the model's category and compute the metrics
    (features extracted on ``device``, scored on the CPU)."""
    samples = test_samples(root, model.category)
    extractors = on_device(extractors or build_extractors(model.config.extractors), device)
    features = extract_features(samples, extractors, model.config.preprocess, cache, progress)
    return evaluate_features(
        model,
        features,
        np.array([s.label for s in samples]),
        [s.defect for s in samples],
        [f"{s.defect}/{s.stem}" for s in samples],
    )
