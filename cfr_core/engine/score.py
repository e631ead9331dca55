"""Score one raw scan (RGB + organized cloud) with a fitted model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfr_core.data.prepare import PreparedScan, prepare_arrays
from cfr_core.data.validate import DEFAULT_MIN_VALID_FRACTION, ERROR, check_xyz_values
from cfr_core.engine.features import FeatureSet, features_of_scans
from cfr_core.engine.infer import infer
from cfr_core.engine.model import FittedModel
from cfr_core.errors import DataError, ShapeMismatchError
from cfr_core.features.base import Extractor
from cfr_core.scoring.overlay import overlay


@dataclass
class ScanScore:
    score: float
    threshold: float | None
    anomaly_map: np.ndarray  # G×G
    scan: PreparedScan
    features: FeatureSet | None = None  # the scan's raw features (the gate's library check)

    @property
    def verdict(self) -> str:
        """PASS / FAIL against the threshold; UNKNOWN for a model that was never calibrated."""
        if self.threshold is None:
            return "UNKNOWN"
        return "FAIL" if self.score > self.threshold else "PASS"

    def heatmap(self) -> np.ndarray:
        return overlay(self.scan.rgb, self.anomaly_map, max(float(self.anomaly_map.max()), 1e-12))


def score_arrays(
    model: FittedModel,
    extractors: tuple[Extractor, Extractor],
    rgb: np.ndarray,
    xyz: np.ndarray,
    source: str = "",
    gate_maps: bool = True,
) -> ScanScore:
    """Preprocess, extract and score; errors name ``source`` (the xyz file).
    ``gate_maps=False``: without the surface view and the colour and shape maps that only
    the quality gate reads (scoring on the line needs none of them)."""
    if rgb.shape[:2] != xyz.shape[:2]:
        raise ShapeMismatchError(
            f"RGB is {rgb.shape[1]}×{rgb.shape[0]} but the cloud is {xyz.shape[1]}×{xyz.shape[0]}",
            source or None,
        )
    # the landing folder's and `cfr data check`'s test of the cloud's values: a scan the
    # scanner mostly dropped gets no verdict
    for problem in check_xyz_values(xyz, Path(source or "xyz"), DEFAULT_MIN_VALID_FRACTION):
        if problem.severity == ERROR:
            raise DataError(problem.reason, source or None)
    try:
        scan = prepare_arrays(
            rgb, xyz, None, model.config.preprocess, key=source, surface=gate_maps
        )
    except DataError as exc:
        raise DataError(exc.reason, source or exc.path, exc.fix) from exc
    features = features_of_scans([scan], extractors, gate_maps=gate_maps)
    result = infer(model, features)
    value = float(result.scores[0])
    if not math.isfinite(value) or not bool(result.maps[0].isfinite().all()):
        raise DataError(
            "the scan's anomaly map is not finite (the point cloud's values break the geometry)",
            source or None,
            "check the file with `cfr data check`; re-export it in metres",
        )
    return ScanScore(value, model.threshold, result.maps[0].numpy(), scan, features)
