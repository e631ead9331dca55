"""Anomaly maps and scores (method.md, step 6).

Per pixel and direction the discrepancy is ||unit(pred) - unit(real)||; the
two maps are multiplied, background set to 0, and box-blurred. The image score
is max / sqrt(mean of the non-zero values); the map used for AUPRO is divided by
the mean of its non-zero values and the map used for P-AUROC by the square root
of its mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def discrepancy(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Row-wise ||unit(pred) - unit(real)|| (N×C, N×C -> N)."""
    return (F.normalize(pred, dim=-1) - F.normalize(real, dim=-1)).norm(dim=-1)


def box_blur(maps: torch.Tensor, spec: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Apply box filters ``(kernel, repeats)`` in order to B×H×W maps (size kept, edges
    averaged over the pixels inside the image)."""
    x = maps.unsqueeze(1)
    for kernel, repeats in spec:
        for _ in range(repeats):
            x = F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return x.squeeze(1)


def _nonzero_mean(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    nz = flat != 0
    return (flat * nz).sum(dim=1) / nz.sum(dim=1).clamp_min(1)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """B scores: max of the map / sqrt(mean of its non-zero values); 0 for an all-zero map."""
    mean = _nonzero_mean(maps)
    peak = maps.reshape(maps.shape[0], -1).max(dim=1).values
    return torch.where(mean > 0, peak / mean.clamp_min(1e-12).sqrt(), torch.zeros_like(peak))


def aupro_maps(maps: torch.Tensor) -> torch.Tensor:
    """Maps for AUPRO: divided by the mean of their non-zero values."""
    mean = _nonzero_mean(maps).clamp_min(1e-12)
    return maps / mean.view(-1, 1, 1)


def pixel_maps(maps: torch.Tensor) -> torch.Tensor:
    """Maps for P-AUROC: divided by the square root of their mean."""
    mean = maps.reshape(maps.shape[0], -1).mean(dim=1).clamp_min(1e-12)
    return maps / mean.sqrt().view(-1, 1, 1)


def decision_threshold(scores: list[float], margin: float) -> float:
    """The highest finite score of normal samples * (1 + margin): the quality gate's rule.

    The line's pass/fail threshold is no longer this: it is set for a stated
    false-reject rate by :func:`cfr_core.scoring.verdict.calibrate_threshold`.
    """
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        raise ValueError("no finite score to calibrate a threshold on")
    return max(finite) * (1.0 + margin)


def gate_threshold(scores: list[float], margin: float) -> float:
    """The quality gate's threshold for new good scans: max * (1 + margin).

    Separate from the line's threshold (:mod:`cfr_core.scoring.verdict`): a scan that
    enters the shot library only has to look like the good parts, so the gate tolerates
    more scan-to-scan variation than the line (the margin is chosen on the
    development categories: bench/results/gate.md).
    """
    return decision_threshold(scores, margin)
