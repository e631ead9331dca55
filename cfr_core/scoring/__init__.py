"""Discrepancy maps, blur, image scores, metric normalisations and the decision threshold."""

from cfr_core.scoring.maps import (
    aupro_maps,
    box_blur,
    decision_threshold,
    discrepancy,
    image_scores,
    pixel_maps,
)

__all__ = [
    "aupro_maps",
    "box_blur",
    "decision_threshold",
    "discrepancy",
    "image_scores",
    "pixel_maps",
]
