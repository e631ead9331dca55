"""Fitting a category, calibrating its decision threshold, and evaluating it.

``fit`` = choose the shots (published few-shot protocol) → extract features →
train the mappers → build the banks → train the retriever (the parts each
method needs) → calibrate the pass/fail threshold on normal samples the model
has not seen. Each stage is also callable on its own (the Dagster assets do).
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
from cfr_core.data.fewshot import select_shots
from cfr_core.data.io import sha256_file
from cfr_core.data.mvtec import GOOD, Sample, index_category
from cfr_core.engine.features import FeatureCache, FeatureSet, build_extractors, extract_features
from cfr_core.engine.infer import InferenceResult, infer
from cfr_core.engine.model import FittedModel, ShotRecord
from cfr_core.engine.normalize import FeatureNorm
from cfr_core.engine.train import Progress, train_mappers, train_retriever
from cfr_core.errors import ConfigError, EmptyCategoryError
from cfr_core.features.base import Extractor
from cfr_core.memory.bank import build_banks, build_joint_bank
from cfr_core.metrics.report import MetricReport, compute_report
from cfr_core.scoring.maps import aupro_maps, decision_threshold, pixel_maps

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


def standardize(config: FitConfig, features: FeatureSet) -> tuple[FeatureNorm | None, FeatureSet]:
    """Fit the per-category standardisation when the config asks for it; apply it."""
    if not config.extractors.standardized:
        return None, features
    norm = FeatureNorm.fit(features)
    return norm, norm.apply(features)


def fit_features(
    category: str,
    config: FitConfig,
    features: FeatureSet,
    extractors: tuple[Extractor, Extractor],
    progress: Progress | None = None,
    device: str = "cpu",
) -> FittedModel:
    """Train what ``config.method`` needs on the shots' features (no threshold yet).

    ``device`` runs the mapper training there (the costly part with the paper's
    1152/768-d features); banks, retriever and the returned model stay on the CPU.
    """
    model = FittedModel(
        category=category,
        config=config,
        extractor_ids={"rgb": extractors[0].lineage_id, "points": extractors[1].lineage_id},
        dims={"rgb": features.rgb.shape[1], "points": features.points.shape[1]},
    )
    model.norm, features = standardize(config, features)
    t0 = time.perf_counter()
    if config.method == "btf":
        model.joint_bank = build_joint_bank(
            features.rgb, features.points, features.foreground, config.banks
        )
        model.timings["banks"] = time.perf_counter() - t0
        return model
    model.mappers, hist = train_mappers(features, config.mappers, progress, device)
    model.history["mappers"] = hist.losses
    model.timings["mappers"] = hist.seconds
    if config.replacement is not None:
        t0 = time.perf_counter()
        model.banks = build_banks(features.rgb, features.points, config.banks)
        model.timings["banks"] = time.perf_counter() - t0
        if config.replacement == "attention":
            model.retriever, hist = train_retriever(
                features, model.banks, config.retriever, progress
            )
            model.history["retriever"] = hist.losses
            model.timings["retriever"] = hist.seconds
    return model


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


def calibrate(model: FittedModel, features: FeatureSet, source: str) -> float:
    scores = infer(model, features).scores.tolist()
    model.threshold = decision_threshold(scores, model.config.scoring.threshold_margin)
    model.threshold_source = source
    return model.threshold


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
    selection = select_shots(index.require_train(), config.shots, config.fewshot_seed)
    extractors = on_device(extractors or build_extractors(config.extractors), device)
    t0 = time.perf_counter()
    shots = extract_features(selection.samples, extractors, config.preprocess, cache)
    model = fit_features(category, config, shots, extractors, progress, device)
    model.timings["shot_features"] = time.perf_counter() - t0
    model.shots = shot_records(selection.samples)
    val, source = calibration_samples(root, category, selection.samples)
    calibrate(model, extract_features(val, extractors, config.preprocess, cache), source)
    return model


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
