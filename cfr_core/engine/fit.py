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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from cfr_core.errors import ConfigError, EmptyCategoryError
from cfr_core.features.base import Extractor
from cfr_core.memory.bank import Banks, build_banks, build_joint_bank
from cfr_core.metrics.report import MetricReport, compute_report
from cfr_core.models.mappers import CrossModalMappers
from cfr_core.models.retriever import AttentionRetriever
from cfr_core.scoring.maps import aupro_maps, decision_threshold, gate_threshold, pixel_maps

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


def calibrate(
    model: FittedModel, features: FeatureSet, source: str, unseen: FeatureSet | None = None
) -> float:
    """The line's pass/fail threshold and the quality gate's threshold, from normal samples'
    scores (:func:`~cfr_core.scoring.maps.decision_threshold`, :func:`~cfr_core.scoring.maps.gate_threshold`).

    The pass/fail threshold comes from ``features`` (validation scans); the gate's from
    those and ``unseen``, the other good scans the model was not fitted on (the library
    beside its shots), which show more of the good parts' spread.
    """
    scores = infer(model, features).scores.tolist()
    scoring = model.config.scoring
    model.threshold = decision_threshold(scores, scoring.threshold_margin)
    more = infer(model, unseen).scores.tolist() if unseen is not None and len(unseen) else []
    model.gate_threshold = gate_threshold(scores + more, scoring.gate_margin)
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
) -> str:
    """Thresholds (:func:`calibrate`) and library check (:func:`attach_library_gate`) of a
    model fitted on ``model.shots``, from the good ``library`` scans (shots included) and the
    ``calibration`` scans (validation); features of both are extracted once."""
    samples = list({s.key: s for s in [*library, *calibration]}.values())
    features = extract_features(samples, extractors, model.config.preprocess, cache)
    pos = {s.key: i for i, s in enumerate(samples)}
    shots = {s.key for s in model.shots}
    cal = {s.key for s in calibration}
    unseen = [pos[s.key] for s in samples if s.key not in shots and s.key not in cal]
    calibrate(
        model,
        features.select([pos[s.key] for s in calibration]),
        source,
        features.select(unseen) if unseen else None,
    )
    return attach_library_gate(model, features.select([pos[s.key] for s in library]))


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
        model, library_samples(root, category), val, source, extractors, cache
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

    @property
    def replacement_rate(self) -> float:
        fg = self.result.foreground.reshape(len(self.keys), -1).sum(dim=1).float()
        return float((self.result.replaced * fg).sum() / fg.sum().clamp_min(1))

    def to_dict(self) -> dict:
        """The metrics as stored with a model and in the registry."""
        return {**self.report.to_dict(), "replacement_rate": self.replacement_rate}


def evaluate_features(model: FittedModel, features: FeatureSet, labels: np.ndarray) -> Evaluation:
    result = infer(model, features)
    masks = features.masks
    report = compute_report(
        result.scores.numpy(),
        labels,
        aupro_maps(result.maps).numpy(),
        masks.numpy(),
        pixel_maps=pixel_maps(result.maps).numpy(),
    )
    return Evaluation(report, features.keys, labels, result.scores.numpy(), result, masks)


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
    return evaluate_features(model, features, np.array([s.label for s in samples]))
