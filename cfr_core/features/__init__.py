"""Frozen per-pixel feature extractors: registry, DINO ViT, Point-MAE, offline FPFH / colour-texture."""

from cfr_core.features.base import (
    Extractor,
    available_extractors,
    create_extractor,
    register_extractor,
)

__all__ = ["Extractor", "available_extractors", "create_extractor", "register_extractor"]
