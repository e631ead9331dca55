"""Contact sheets of a dataset: RGB, depth (coloured, missing points black) and GT overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from cfr_core.data.io import atomic_path
from cfr_core.data.mvtec import GOOD, Sample, index_category, list_categories
from cfr_core.data.pointcloud import resize_nearest, valid_mask

_TILE = 160
_LABEL_H = 14


def depth_image(xyz: np.ndarray) -> np.ndarray:
    """uint8 H×W×3: distance to the sensor (near = bright), missing points black."""
    valid = valid_mask(xyz)
    out = np.zeros((*xyz.shape[:2], 3), dtype=np.uint8)
    if valid.any():
        z = xyz[..., 2][valid]
        lo, hi = np.percentile(z, [1, 99])
        t = np.clip((hi - xyz[..., 2]) / max(hi - lo, 1e-9), 0, 1)
        out[valid] = (colormaps["viridis"](t[valid])[:, :3] * 255).astype(np.uint8)
    return out


def overlay_mask(rgb: np.ndarray, mask: np.ndarray, colour=(255, 40, 40)) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colour, dtype=np.float32)
    return out.astype(np.uint8)


def _fit(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    scale = _TILE / max(h, w)
    small = resize_nearest(img, (max(1, round(h * scale)), max(1, round(w * scale))))
    tile = np.zeros((_TILE, _TILE, 3), dtype=np.uint8)
    top, left = (_TILE - small.shape[0]) // 2, (_TILE - small.shape[1]) // 2
    tile[top : top + small.shape[0], left : left + small.shape[1]] = small
    return tile


def _labelled(tile: np.ndarray, text: str) -> np.ndarray:
    img = Image.new("RGB", (_TILE, _TILE + _LABEL_H), (30, 30, 30))
    img.paste(Image.fromarray(tile), (0, _LABEL_H))
    ImageDraw.Draw(img).text((3, 1), text, fill=(230, 230, 230))
    return np.asarray(img)


def sample_column(sample: Sample) -> np.ndarray:
    """RGB (GT in red) above the coloured depth, labelled with split/defect."""
    rgb, xyz, mask = sample.load()
    top = _labelled(_fit(overlay_mask(rgb, mask)), f"{sample.defect} {sample.stem}")
    bottom = _fit(depth_image(xyz))
    return np.concatenate([top, bottom], axis=0)


def contact_sheet(
    root: str | Path, categories: list[str] | None = None, per_category: int = 5
) -> np.ndarray:
    """One row per category: a good test sample, then one sample of each defect type."""
    rows = []
    for cat in categories or list_categories(root):
        index = index_category(root, cat)
        test = index.split("test") or index.split("train")
        picks = [s for s in test if s.defect == GOOD][:1]
        for defect in index.defect_types:
            picks += [s for s in test if s.defect == defect][:1]
        picks = picks[:per_category]
        cols = [sample_column(s) for s in picks]
        while len(cols) < per_category:
            cols.append(np.zeros_like(cols[0]))
        header = _labelled(np.zeros((_TILE, _TILE, 3), np.uint8), cat)[:_LABEL_H]
        header = np.concatenate([header] + [np.full_like(header, 30)] * (per_category - 1), axis=1)
        rows.append(np.concatenate([header, np.concatenate(cols, axis=1)], axis=0))
    return np.concatenate(rows, axis=0)


def save_contact_sheet(
    root: str | Path, out: str | Path, categories: list[str] | None = None
) -> Path:
    sheet = contact_sheet(root, categories)
    with atomic_path(out) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return Path(out)
