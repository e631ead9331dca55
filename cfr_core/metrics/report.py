"""A metrics report: I-AUROC, P-AUROC and AUPRO at the four standard limits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cfr_core.metrics.aupro import AUPRO_LIMITS, aupro_multi
from cfr_core.metrics.roc import image_auroc, pixel_auroc


@dataclass(frozen=True)
class MetricReport:
    """Detection and localisation metrics of one category (values in [0, 1])."""

    image_auroc: float
    pixel_auroc: float
    aupro: dict[float, float] = field(default_factory=dict)
    n_test: int = 0
    n_defective: int = 0

    def to_dict(self) -> dict:
        """JSON-ready: AUPRO keys are the limits as strings ("0.3", "0.1", ...)."""
        return {
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "aupro": {_limit_key(k): v for k, v in sorted(self.aupro.items(), reverse=True)},
            "n_test": self.n_test,
            "n_defective": self.n_defective,
        }

    @classmethod
    def from_dict(cls, data: dict) -> MetricReport:
        return cls(
            image_auroc=float(data["image_auroc"]),
            pixel_auroc=float(data["pixel_auroc"]),
            aupro={float(k): float(v) for k, v in data["aupro"].items()},
            n_test=int(data.get("n_test", 0)),
            n_defective=int(data.get("n_defective", 0)),
        )

    def summary(self) -> str:
        parts = [f"I-AUROC {self.image_auroc:.3f}", f"P-AUROC {self.pixel_auroc:.3f}"]
        parts += [
            f"AUPRO@{_limit_key(k)} {v:.3f}" for k, v in sorted(self.aupro.items(), reverse=True)
        ]
        return "  ".join(parts)


def _limit_key(limit: float) -> str:
    return format(limit, "g")


def compute_report(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    limits: tuple[float, ...] = AUPRO_LIMITS,
    thresholds: int | np.ndarray | None = None,
    pixel_maps: np.ndarray | None = None,
) -> MetricReport:
    """All metrics of one test set. AUPRO is NaN when the set has no defect pixel.

    ``maps`` feed AUPRO; ``pixel_maps`` (default: ``maps``) feed P-AUROC, for
    methods that normalise the two differently.
    """
    labels = np.asarray(labels)
    masks = np.asarray(masks) > 0
    if masks.any():
        pro = aupro_multi(maps, masks, limits, thresholds)
        p_auroc = pixel_auroc(maps if pixel_maps is None else pixel_maps, masks)
    else:
        pro, p_auroc = {lim: math.nan for lim in limits}, math.nan
    return MetricReport(
        image_auroc=image_auroc(scores, labels),
        pixel_auroc=p_auroc,
        aupro=pro,
        n_test=int(labels.size),
        n_defective=int((labels > 0).sum()),
    )
