"""ROC-AUC for image scores and pixel maps (exact, ties averaged)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from cfr_core.errors import MetricError


def _as_finite(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise MetricError(f"{name} contain NaN or inf; fix the scoring before computing metrics")
    return arr


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = anomalous).

    Computed as the Mann-Whitney statistic with average ranks, so tied scores
    count one half, identical to integrating the ROC curve with the trapezoid rule.
    """
    s = _as_finite(scores, "scores").ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise MetricError(f"{s.size} scores but {y.size} labels")
    pos = y.astype(bool)
    if not np.array_equal(y.astype(np.float64), pos.astype(np.float64)):
        raise MetricError("labels must be 0/1 or boolean")
    n_pos = int(pos.sum())
    n_neg = s.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(f"ROC-AUC needs both classes; got {n_pos} anomalous and {n_neg} normal")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """I-AUROC: ROC-AUC of per-image scores, good = 0, defective = 1."""
    return roc_auc(scores, labels)


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """P-AUROC: ROC-AUC over every pixel of every image (``maps``, ``masks``: N×H×W)."""
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise MetricError(f"maps {maps.shape} and masks {masks.shape} must both be N×H×W")
    return roc_auc(maps, masks > 0)
