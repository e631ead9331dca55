"""The surface's own shape on the feature grid: principal curvatures at a millimetre scale.

The quality gate's shape check (:mod:`cfr_core.engine.gate`) compares these with the
library's. A dent or bump a few millimetres across bends the surface far more than any
good part does at that scale, yet the 3D features (FPFH: the angles between neighbouring
normals, at the scale of a few points) see it only as the scanner's noise does.

How a map is made from an organized cloud (metres, zeros = missing or removed):

* The cloud is the scan's *surface view* (:attr:`cfr_core.data.prepare.PreparedScan.surface`):
  the table plane cleared only down to five times its own measured noise, where the
  method's preprocessing clears 5 mm. A part thinner than that (a 5 mm plate, the floor
  of a deep dent in a 6 mm tile) would otherwise lose its lower surface, and a dent
  whose floor was cleared would read as a hole, which the check skips.
* The depth (the cloud's z, in mm) is smoothed by a Gaussian of ``SHAPE_SCALE_MM``
  over the valid points only (normalised convolution: missing points, the shadows at
  steep walls and dropout holes, are left out, never read as depth 0). The pixel pitch
  is the median distance across the view (x, y) between neighbouring valid points.
* The two principal curvatures (1/mm) of the smoothed depth, as a height field over
  the pixel grid, larger first. They do not change when the part turns or shifts in
  the image, and a tilt of the part changes them only as a slanted view does.
* A pixel counts only where the valid points carry at least ``SHAPE_SUPPORT`` of its
  smoothing weight (near a hole or a wall's shadow the smoothed depth leans to one
  side, and its curvature says more about the missing points than about the
  surface), and at least two scales (4 mm) inside the part's outline, where the
  smoothing mixes the part with what lies beyond it.
* The map is area-averaged onto the feature grid; a grid cell with any unsupported
  pixel is NaN (the check skips it).

Scale and support were chosen on the development categories (bench/results/gate_notes.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cfr_core.data.pointcloud import (
    SURFACE_MIN_CLEARANCE,
    SURFACE_MIN_TABLE_POINTS,
    SURFACE_TABLE_QUANTILE,
    SURFACE_TABLE_SIGMAS,
)

#: the descriptor and its settings, saved with a model's shape check (refused when they differ)
SHAPE_DESCRIPTOR = "principal curvatures"
#: Gaussian smoothing of the depth, in millimetres (development, a scratch study: 2 mm held
#: fewer good scans than 3 mm, with the same dents stopped)
SHAPE_SCALE_MM = 2.0
#: share of a pixel's smoothing weight that must fall on valid points (development: at 0.5
#: holes and shadows read as curvature; at 0.9 a good dome scan reached 2.8x the
#: leave-one-out limit, at 0.97 no good scan passed 2.1x; bench/results/gate_notes.md)
SHAPE_SUPPORT = 0.97
#: counts changes to how a map is computed from a cloud (the feature cache keys on it);
#: 4: read from the scan's surface view (the table cleared down to its noise, not 5 mm)
SHAPE_VERSION = 4
#: everything a shape map depends on: the feature cache keys on it, and a saved shape check
#: built with other settings is refused
SHAPE_SETTINGS = {
    "descriptor": SHAPE_DESCRIPTOR,
    "version": SHAPE_VERSION,
    "scale_mm": SHAPE_SCALE_MM,
    "support": SHAPE_SUPPORT,
    "table_sigmas": SURFACE_TABLE_SIGMAS,
    "table_quantile": SURFACE_TABLE_QUANTILE,
    "table_floor_m": SURFACE_MIN_CLEARANCE,
    "table_points": SURFACE_MIN_TABLE_POINTS,
}
#: a grid cell is read only when (almost) all of its pixels are supported
_CELL_COVER = 0.99


def point_pitch_mm(xyz: np.ndarray, valid: np.ndarray) -> float | None:
    """Median distance (mm) across the view (x, y: not depth, which a slope adds) between
    horizontally or vertically neighbouring valid points; None when no two valid points
    are neighbours (or they all coincide)."""
    steps = []
    for a, b, both in (
        (xyz[:, 1:], xyz[:, :-1], valid[:, 1:] & valid[:, :-1]),
        (xyz[1:], xyz[:-1], valid[1:] & valid[:-1]),
    ):
        if both.any():
            steps.append(np.linalg.norm((a - b)[both][:, :2].astype(np.float64), axis=1))
    if not steps:
        return None
    pitch = float(np.median(np.concatenate(steps))) * 1000.0
    return pitch if np.isfinite(pitch) and pitch > 0 else None


def shape_grid(xyz: np.ndarray, grid: int) -> torch.Tensor:
    """2×G×G float32 principal curvatures (1/mm, larger first) of an organized cloud
    (S×S×3 metres, zeros or non-finite = missing; padded like its scan), NaN where a
    cell is not fully supported (see the module's docstring)."""
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"an organized cloud is H×W×3, got {xyz.shape}")
    out = torch.full((2, grid, grid), float("nan"))
    xyz = xyz.astype(np.float64)
    valid = np.isfinite(xyz).all(axis=-1) & (np.abs(np.nan_to_num(xyz)).sum(axis=-1) > 0)
    pitch = point_pitch_mm(xyz, valid)
    if pitch is None:
        return out
    sigma = SHAPE_SCALE_MM / pitch
    if not np.isfinite(sigma) or sigma > max(xyz.shape[:2]) / 4:
        # points so close together that 2 mm spans more than a quarter of the image: no
        # pixel could gather 97 % of its weight inside it (and the filter would run for
        # minutes or exhaust memory on an absurd kernel), so nothing can be read
        return out
    weight = valid.astype(np.float64)
    # beyond the image's border there are no points (mode constant): a part cut off by
    # the border is not continued by a mirror image of itself
    support = ndimage.gaussian_filter(weight, sigma, mode="constant")
    depth = np.where(valid, xyz[..., 2], 0.0) * 1000.0
    z = ndimage.gaussian_filter(depth, sigma, mode="constant") / np.maximum(support, 1e-12)
    zy, zx = np.gradient(z, pitch)
    zxy, zxx = np.gradient(zx, pitch)
    zyy, _ = np.gradient(zy, pitch)
    # the shape operator of the height field z(x, y): mean (h) and Gaussian (k) curvature
    e, f, g = 1 + zx**2, zx * zy, 1 + zy**2
    n = np.sqrt(1 + zx**2 + zy**2)
    ll, mm, nn = zxx / n, zxy / n, zyy / n
    den = e * g - f**2
    k = (ll * nn - mm**2) / den
    h = (e * nn - 2 * f * mm + g * ll) / (2 * den)
    root = np.sqrt(np.maximum(h**2 - k, 0.0))
    # the part's outline: the smoothing there mixes the part with what lies beyond it (the
    # removed table, the shadow beside a wall), so a band of 2 sigma inside it is skipped
    # (holes inside the part are not outline: the support rule handles them)
    part = ndimage.binary_fill_holes(valid)
    inner = (support >= SHAPE_SUPPORT) & (ndimage.distance_transform_edt(part) >= 2 * sigma)
    curv = np.stack([h + root, h - root]) * inner
    stack = torch.from_numpy(np.concatenate([curv, inner[None].astype(np.float64)]))[None]
    cells = F.interpolate(stack, size=(grid, grid), mode="area")[0]
    cover = cells[2]
    mean = cells[:2] / cover.clamp_min(1e-12)
    out = torch.where(cover[None] >= _CELL_COVER, mean, out.double()).float()
    return out
