"""AUPRO: area under the per-region-overlap curve up to a false-positive-rate limit.

Regions are the 8-connected components of every ground-truth mask. At a
threshold t, FPR(t) is the share of all defect-free pixels of the whole test set
scoring >= t, and PRO(t) the mean over all regions of the share of the region's
pixels scoring >= t. The curve runs from (0, 0) (t above every score) to
(1, 1) (t below every score); it is integrated over FPR in [0, limit] by the
trapezoid rule, interpolating linearly at the limit, and divided by the limit,
so a perfect map gives 1.0.

``thresholds=None`` gives the exact curve (every distinct score is a
threshold); an integer T gives the coarse curve of the papers: T thresholds
taken at evenly spaced positions (``linspace(0, M-1, T)`` rounded) in the sorted
defect-free scores, plus the threshold just above the highest defect-free score
(the point of FPR 0, so that a perfect map scores 1 here too); an array gives
those thresholds.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cfr_core.errors import MetricError

AUPRO_LIMITS = (0.3, 0.1, 0.05, 0.01)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected components of N×H×W masks; ids are unique over the whole set.

    Returns (labels N×H×W int, 0 = no defect; number of regions).
    """
    labels = np.zeros(masks.shape, dtype=np.int64)
    total = 0
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        labels[i] = np.where(lab > 0, lab + total, 0)
        total += n
    return labels, total


def _check(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) > 0
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.shape != masks.shape or maps.ndim != 3:
        raise MetricError(f"maps {maps.shape} and masks {masks.shape} must both be N×H×W")
    if not np.isfinite(maps).all():
        raise MetricError(
            "anomaly maps contain NaN or inf; fix the scoring before computing metrics"
        )
    if not masks.any():
        raise MetricError("AUPRO needs at least one defect pixel in the masks")
    if masks.all():
        raise MetricError("AUPRO needs defect-free pixels; every mask pixel is a defect")
    return maps, masks


def pro_curve(
    maps: np.ndarray, masks: np.ndarray, thresholds: int | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro), both ascending in fpr, starting at (0, 0) and ending at (1, 1)."""
    maps, masks = _check(maps, masks)
    regions, n_regions = label_regions(masks)
    ok_scores = maps[~masks]
    n_ok = ok_scores.size

    if thresholds is None:
        flat = maps.ravel()
        region_of = regions.ravel()
        sizes = np.bincount(region_of, minlength=n_regions + 1).astype(np.float64)
        pro_step = np.where(region_of > 0, 1.0 / (sizes[region_of] * n_regions), 0.0)
        order = np.argsort(-flat, kind="stable")
        sorted_scores = flat[order]
        fpr = np.cumsum(region_of[order] == 0) / n_ok  # integer counts: exact
        pro = np.cumsum(pro_step[order])
        pro /= pro[-1]  # the sum is 1 up to rounding; make a perfect map exactly 1
        # one point per distinct score: the last position of each run of equal scores
        ends = np.flatnonzero(np.diff(sorted_scores) != 0)
        ends = np.append(ends, sorted_scores.size - 1)
        fpr, pro = fpr[ends], pro[ends]
    else:
        if np.ndim(thresholds) == 0:
            count = int(thresholds)
            if count < 1:
                raise MetricError(f"threshold count must be >= 1, got {thresholds}")
            sorted_ok = np.sort(ok_scores)
            pos = np.round(np.linspace(0, n_ok - 1, count)).astype(np.int64)
            # plus the lowest threshold with FPR 0, which the exact curve also holds
            thr = np.unique(np.append(sorted_ok[pos], np.nextafter(sorted_ok[-1], np.inf)))
        else:
            thr = np.unique(np.asarray(thresholds, dtype=np.float64))
        thr = thr[::-1]  # descending thresholds -> ascending fpr
        sorted_ok = np.sort(ok_scores)
        fpr = (n_ok - np.searchsorted(sorted_ok, thr, side="left")) / n_ok
        pro = np.zeros_like(thr)
        defect_scores = maps[masks]
        defect_regions = regions[masks]
        order = np.argsort(defect_regions, kind="stable")
        bounds = np.searchsorted(defect_regions[order], np.arange(1, n_regions + 2))
        for r in range(n_regions):
            region_scores = np.sort(defect_scores[order[bounds[r] : bounds[r + 1]]])
            pro += (
                region_scores.size - np.searchsorted(region_scores, thr, side="left")
            ) / region_scores.size
        pro /= n_regions
    fpr = np.concatenate([[0.0], fpr, [1.0]])
    pro = np.concatenate([[0.0], pro, [1.0]])
    return fpr, pro


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under (fpr, pro) for fpr in [0, limit], divided by ``limit``."""
    if not 0.0 < limit <= 1.0:
        raise MetricError(f"FPR limit must be in (0, 1], got {limit}")
    n_in = int(np.searchsorted(fpr, limit, side="right"))
    x, y = fpr[:n_in], pro[:n_in]
    if x[-1] < limit:
        x0, y0, x1, y1 = fpr[n_in - 1], pro[n_in - 1], fpr[n_in], pro[n_in]
        x = np.append(x, limit)
        y = np.append(y, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / limit)


def aupro(
    maps: np.ndarray,
    masks: np.ndarray,
    limit: float = 0.3,
    thresholds: int | np.ndarray | None = None,
) -> float:
    """Normalised AUPRO of anomaly ``maps`` (N×H×W) against ground-truth ``masks``."""
    fpr, pro = pro_curve(maps, masks, thresholds)
    return area_to_limit(fpr, pro, limit)


def aupro_multi(
    maps: np.ndarray,
    masks: np.ndarray,
    limits: tuple[float, ...] = AUPRO_LIMITS,
    thresholds: int | np.ndarray | None = None,
) -> dict[float, float]:
    """AUPRO at several limits from one curve."""
    fpr, pro = pro_curve(maps, masks, thresholds)
    return {lim: area_to_limit(fpr, pro, lim) for lim in limits}
