"""The only training loops and the only inference loop."""

from cfr_core.engine.features import FeatureCache, FeatureSet, build_extractors, extract_features
from cfr_core.engine.fit import (
    Evaluation,
    calibrate,
    evaluate,
    evaluate_features,
    fit,
    fit_features,
)
from cfr_core.engine.infer import InferenceResult, infer
from cfr_core.engine.model import FittedModel, ShotRecord

__all__ = [
    "Evaluation",
    "FeatureCache",
    "FeatureSet",
    "FittedModel",
    "InferenceResult",
    "ShotRecord",
    "build_extractors",
    "calibrate",
    "evaluate",
    "evaluate_features",
    "extract_features",
    "fit",
    "fit_features",
    "infer",
]
