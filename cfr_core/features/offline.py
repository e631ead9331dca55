"""Training-free extractors with the same per-pixel contract as DINO / Point-MAE.

* ``color_texture`` (RGB, 39-d): CIELAB colour; local means and spreads of Lab
  in 5, 11 and 21 pixel windows; gradient-orientation histograms (8 unsigned
  bins) in 5 and 11 pixel windows; local log gradient energy at two scales.
* ``fpfh`` (3D, 38-d): Fast Point Feature Histograms (33-d: normals by PCA
  over 30 neighbours, Darboux-frame angles over 100 neighbours, 11 bins per
  angle), height above the table plane, surface variation (curvature) and the
  normal itself (FPFH is rotation invariant, but shading in the colour image is
  not), projected onto the grid and smoothed like the Point-MAE features.

Both need no weights, so they run anywhere; they are the offline default.
Histograms are centred (the uniform histogram subtracted) so that cosine
similarity between features is informative rather than always near 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from cfr_core.data.prepare import PreparedScan
from cfr_core.features.base import Extractor, register_extractor
from cfr_core.features.point_ops import scatter_to_grid, smooth_to_grid, stack_maps

# ----------------------------------------------------------------------------- RGB

_SRGB_TO_XYZ = torch.tensor(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """B×3×H×W sRGB in [0, 1] -> CIELAB (L in [0, 100], a/b roughly [-128, 127])."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", _SRGB_TO_XYZ.to(rgb), lin) / _WHITE_D65.to(rgb).view(
        1, 3, 1, 1
    )
    delta = 6.0 / 29.0
    f = torch.where(
        xyz > delta**3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0
    )
    return torch.stack(
        [116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], dim=1
    )


def _box(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="replicate"), k, stride=1)


def upsample(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinear upsampling of B×C×h×w maps to grid×grid (identity when already there)."""
    if fmap.shape[-1] == grid and fmap.shape[-2] == grid:
        return fmap
    return F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)


def rgb_to_grid(
    scans: Sequence[PreparedScan],
    size: tuple[int, int],
    device: torch.device,
    mode: str = "bilinear",
) -> torch.Tensor:
    """B×3×H×W float RGB in [0, 1]: each square scan resized (antialiased) to ``size``."""
    out = []
    for scan in scans:
        x = (
            torch.from_numpy(np.ascontiguousarray(scan.rgb))
            .to(device)
            .permute(2, 0, 1)[None]
            .float()
            / 255.0
        )
        out.append(F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False))
    return torch.cat(out).clamp_(0.0, 1.0)


class ColorTexture(Extractor):
    name = "color_texture"
    modality = "rgb"
    WINDOWS = (5, 11, 21)
    HOG_WINDOWS = (5, 11)
    BINS = 8

    def __init__(self, grid: int = 224, native: int = 112):
        dim = 3 + 6 * len(self.WINDOWS) + (self.BINS + 1) * len(self.HOG_WINDOWS)
        settings = {
            "windows": self.WINDOWS,
            "hog": self.HOG_WINDOWS,
            "bins": self.BINS,
            "native": native,
        }
        super().__init__(dim, grid, settings, None)
        self.native = min(native, grid)

    @torch.no_grad()
    def forward(self, scans: Sequence[PreparedScan]) -> torch.Tensor:
        feats = self.native_features(rgb_to_grid(scans, (self.native, self.native), self.device))
        return upsample(feats, self.grid)

    def native_features(self, rgb: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(rgb)
        lab = torch.stack([lab[:, 0] / 100.0 - 0.5, lab[:, 1] / 64.0, lab[:, 2] / 64.0], dim=1)
        parts = [lab]
        for k in self.WINDOWS:
            mean = _box(lab, k)
            var = (_box(lab * lab, k) - mean * mean).clamp_min(0.0)
            parts += [mean, 4.0 * var.sqrt()]
        lum = lab[:, :1]
        sobel = (
            torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=rgb.device)
            / 8.0
        )
        padded = F.pad(lum, [1, 1, 1, 1], mode="replicate")
        gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
        gy = F.conv2d(padded, sobel.T.contiguous().view(1, 1, 3, 3))
        mag = torch.sqrt(gx * gx + gy * gy + 1e-12)
        angle = (
            torch.remainder(torch.atan2(gy, gx), math.pi) / math.pi * self.BINS
        )  # unsigned, [0, BINS)
        lower = torch.floor(angle)
        frac = angle - lower
        hist = torch.zeros(rgb.shape[0], self.BINS, *rgb.shape[2:], device=rgb.device)
        hist.scatter_add_(1, lower.long() % self.BINS, mag * (1 - frac))
        hist.scatter_add_(1, (lower.long() + 1) % self.BINS, mag * frac)
        for k in self.HOG_WINDOWS:
            local = _box(hist, k)
            energy = local.sum(dim=1, keepdim=True)
            parts += [local / (energy + 1e-3) - 1.0 / self.BINS, torch.log1p(50.0 * energy) / 4.0]
        return torch.cat(parts, dim=1)


@register_extractor("color_texture")
def _color_texture(grid: int = 224, **options) -> ColorTexture:
    return ColorTexture(grid, **options)


# ----------------------------------------------------------------------------- 3D


def estimate_normals(points: np.ndarray, tree: cKDTree, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals (oriented towards the sensor at the origin) and surface variation by PCA."""
    k = min(k, len(points))
    _, idx = tree.query(points, k=k)
    nbrs = points[idx.reshape(len(points), k)]
    centred = nbrs - nbrs.mean(axis=1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", centred, centred) / k
    evals, evecs = np.linalg.eigh(cov)
    normals = evecs[:, :, 0]
    flip = (normals * points).sum(axis=1) > 0  # the sensor looks along +z from the origin
    normals[flip] *= -1
    curvature = evals[:, 0] / np.clip(evals.sum(axis=1), 1e-18, None)
    return normals, curvature


def _spfh(points, normals, src, idx, bins):
    """Simplified point feature histograms of the points ``src`` (n×3·bins, each part sums to 1);
    ``idx`` (n×k) are their neighbours."""
    n, k = idx.shape
    src_p, src_n = points[src, None, :], normals[src, None, :]
    tgt_p, tgt_n = points[idx], normals[idx]
    d = tgt_p - src_p
    dist = np.linalg.norm(d, axis=2, keepdims=True)
    d = d / np.clip(dist, 1e-12, None)
    # Use as source the point whose normal makes the smaller angle with the line (PCL's rule).
    swap = np.abs((src_n * d).sum(axis=2)) < np.abs((tgt_n * d).sum(axis=2))
    u = np.where(swap[..., None], tgt_n, src_n)
    n2 = np.where(swap[..., None], src_n, tgt_n)
    d = np.where(swap[..., None], -d, d)
    v = np.cross(u, d)
    v /= np.clip(np.linalg.norm(v, axis=2, keepdims=True), 1e-12, None)
    w = np.cross(u, v)
    alpha = (v * n2).sum(axis=2)
    phi = (u * d).sum(axis=2)
    theta = np.arctan2((w * n2).sum(axis=2), (u * n2).sum(axis=2))
    real = dist[..., 0] > 1e-12  # the point itself is not a pair
    hist = np.zeros((n, 3 * bins))
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k))[real]
    for j, (val, lo, hi) in enumerate(((alpha, -1, 1), (phi, -1, 1), (theta, -np.pi, np.pi))):
        b = np.clip(((val[real] - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
        np.add.at(hist, (rows, j * bins + b), 1.0)
    counts = np.clip(real.sum(axis=1, keepdims=True), 1, None)
    return hist / counts, real


def fpfh(
    points: np.ndarray,
    normals: np.ndarray,
    tree: cKDTree,
    k: int = 100,
    bins: int = 11,
    chunk: int = 8192,
):
    """FPFH (N×3·bins) of ``points``; each of the three histograms sums to 1."""
    k = min(k, len(points))
    _, idx = tree.query(points, k=k)
    idx = idx.reshape(len(points), k)
    spfh = np.zeros((len(points), 3 * bins))
    for s in range(0, len(points), chunk):
        spfh[s : s + chunk], _ = _spfh(
            points, normals, np.arange(s, min(s + chunk, len(points))), idx[s : s + chunk], bins
        )
    out = np.empty_like(spfh)
    for s in range(0, len(points), chunk):
        nb = idx[s : s + chunk]
        dist = np.linalg.norm(points[nb] - points[s : s + chunk, None], axis=2)
        weight = np.where(dist > 1e-12, 1.0 / np.clip(dist, 1e-12, None), 0.0)
        neigh = (spfh[nb] * weight[..., None]).sum(axis=1) / np.clip(
            (dist > 1e-12).sum(axis=1), 1, None
        )[:, None]
        out[s : s + chunk] = spfh[s : s + chunk] + neigh
    out = out.reshape(len(points), 3, bins)
    out /= np.clip(out.sum(axis=2, keepdims=True), 1e-12, None)
    return out.reshape(len(points), 3 * bins)


def _outline_plane(points: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares plane through the part's outline, when the table plane is unknown."""
    inner = valid.copy()
    inner[1:-1, 1:-1] = (
        valid[1:-1, 1:-1] & valid[:-2, 1:-1] & valid[2:, 1:-1] & valid[1:-1, :-2] & valid[1:-1, 2:]
    )
    outline = (valid & ~inner)[valid]
    pts = points[outline] if outline.sum() >= 3 else points
    centre = pts.mean(axis=0)
    normal = np.linalg.svd(pts - centre, full_matrices=False)[2][-1]
    return normal, -float(normal @ centre)


class FPFHExtractor(Extractor):
    name = "fpfh"
    modality = "points"
    version = "2"  # 2: normals appended

    def __init__(
        self,
        grid: int = 224,
        native: int = 112,
        normal_k: int = 30,
        feature_k: int = 100,
        bins: int = 11,
    ):
        settings = {"normal_k": normal_k, "feature_k": feature_k, "bins": bins, "native": native}
        super().__init__(3 * bins + 5, grid, settings, None)
        self.native = min(native, grid)
        self.normal_k, self.feature_k, self.bins = normal_k, feature_k, bins

    def point_features(self, scan: PreparedScan) -> tuple[np.ndarray, np.ndarray]:
        """(valid grid×grid bool, N×dim features of its valid points)."""
        from cfr_core.data.pointcloud import resize_nearest, valid_mask

        xyz = resize_nearest(scan.xyz, self.native).astype(np.float64)
        valid = valid_mask(xyz)
        pts = xyz[valid]
        if len(pts) < 4:
            return valid, np.zeros((len(pts), self.dim))
        tree = cKDTree(pts)
        normals, curvature = estimate_normals(pts, tree, self.normal_k)
        hist = fpfh(pts, normals, tree, self.feature_k, self.bins) - 1.0 / self.bins
        normal, offset = scan.plane if scan.plane is not None else _outline_plane(pts, valid)
        height = np.abs(pts @ normal + offset) * 100.0  # centimetres above the table
        feats = np.column_stack([hist, height, np.clip(curvature * 10.0, 0.0, 1.0), normals])
        return valid, feats

    @torch.no_grad()
    def forward(self, scans: Sequence[PreparedScan]) -> torch.Tensor:
        maps = []
        for scan in scans:
            valid, feats = self.point_features(scan)
            values = torch.from_numpy(feats).float()
            maps.append(scatter_to_grid(values, torch.from_numpy(valid)))
        native = smooth_to_grid(stack_maps(maps), self.native)
        if self.native == self.grid:
            return native.to(self.device)
        # Upsample without bleeding features into the background: nearest for the
        # foreground support, bilinear for the values inside it.
        support = F.interpolate(
            (native.abs().sum(1, keepdim=True) > 0).float(), size=self.grid, mode="nearest"
        )
        return (upsample(native, self.grid) * support).to(self.device)


@register_extractor("fpfh")
def _fpfh(grid: int = 224, **options) -> FPFHExtractor:
    return FPFHExtractor(grid, **options)
