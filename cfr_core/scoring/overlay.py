"""Anomaly-map pictures: heatmap blended over the scan, ground truth outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage

from cfr_core.data.io import atomic_path
from cfr_core.data.pointcloud import resize_nearest


def overlay(
    rgb: np.ndarray,
    amap: np.ndarray,
    vmax: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """uint8 G×G×3: ``amap`` (G×G, scaled to [0, vmax]) in 'inferno' over ``rgb`` (any square size)."""
    g = amap.shape[0]
    base = resize_nearest(rgb, g).astype(np.float32)
    heat = colormaps["inferno"](np.clip(amap / max(vmax, 1e-12), 0, 1))[..., :3] * 255.0
    out = (1 - alpha) * base + alpha * heat
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask)
        out[edge] = (0, 255, 120)
    return np.clip(out, 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, picture: np.ndarray, caption: str = "", scale: int = 2) -> Path:
    img = Image.fromarray(picture)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if caption:
        ImageDraw.Draw(img).text((4, 4), caption, fill=(255, 255, 255))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
