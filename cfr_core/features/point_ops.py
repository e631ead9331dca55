"""Point operations in plain torch (CPU and GPU, no CUDA extension).

Farthest-point sampling, k nearest neighbours, inverse-distance interpolation
from group centres, and the projection of per-point features onto the pixel grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def farthest_point_sample(points: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Indices (n,) of ``n`` points of ``points`` (N×3) chosen by farthest-point sampling.

    Deterministic: starts from index ``start`` (the reference CUDA kernel starts at 0).
    When N < n, indices repeat (the farthest remaining point is then at distance 0).
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"expected N×3 points, got {tuple(points.shape)}")
    count = points.shape[0]
    idx = torch.empty(n, dtype=torch.long, device=points.device)
    dist = torch.full((count,), float("inf"), dtype=points.dtype, device=points.device)
    current = torch.tensor(start, device=points.device)
    for i in range(n):
        idx[i] = current
        d = ((points - points[current]) ** 2).sum(dim=1)
        dist = torch.minimum(dist, d)
        current = torch.argmax(dist)
    return idx


def knn(
    query: torch.Tensor, ref: torch.Tensor, k: int, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distances, indices), each Q×k, of the ``k`` nearest ``ref`` points per query."""
    k = min(k, ref.shape[0])
    origin = ref.mean(dim=0)  # centring keeps cdist's matmul path precise (xyz sits ~0.5 m out)
    query, ref = query - origin, ref - origin
    dists, idxs = [], []
    for s in range(0, query.shape[0], chunk):
        d = torch.cdist(query[s : s + chunk], ref).pow_(2)
        top = torch.topk(d, k, dim=1, largest=False)
        dists.append(top.values)
        idxs.append(top.indices)
    return torch.cat(dists), torch.cat(idxs)


def interpolate_from_centres(
    points: torch.Tensor, centres: torch.Tensor, features: torch.Tensor, k: int = 3
) -> torch.Tensor:
    """Per-point features (N×C): inverse-distance-weighted mix of the ``k`` nearest centres."""
    d2, idx = knn(points, centres, k)
    weight = 1.0 / (d2.sqrt() + 1e-8)
    weight = weight / weight.sum(dim=1, keepdim=True)
    return (features[idx] * weight.unsqueeze(-1)).sum(dim=1)


def scatter_to_grid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """C×G×G map holding ``values`` (N×C) at the N True pixels of ``valid`` (G×G), zeros elsewhere.

    The map is a view of a G×G×C buffer (channels last): each pixel's features
    are written as one contiguous row, and the pooling below runs fastest on it.
    """
    grid = torch.zeros(*valid.shape, values.shape[1], dtype=values.dtype, device=values.device)
    grid[valid] = values
    return grid.permute(2, 0, 1)


def stack_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """B×C×G×G from C×G×G maps made by :func:`scatter_to_grid`, kept channels last."""
    return torch.stack([m.permute(1, 2, 0) for m in maps]).permute(0, 3, 1, 2)


def smooth_to_grid(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """The method's post-processing of 3D maps: 3×3 average pool (stride 1, no padding),
    then an adaptive average pool back to ``grid``. Works on C×H×W or B×C×H×W.

    Pooled in channels-last layout (the result keeps it): the same numbers as
    the default layout, about 3× faster on CPU for the 1152-channel Point-MAE
    maps (1.05 s -> 0.34 s per 224 map on 2 cores).
    """
    squeeze = feature_map.ndim == 3
    x = feature_map.unsqueeze(0) if squeeze else feature_map
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.adaptive_avg_pool2d(F.avg_pool2d(x, 3, stride=1), grid)
    return x.squeeze(0) if squeeze else x


def resize_cloud(xyz: torch.Tensor, grid: int) -> torch.Tensor:
    """Nearest-neighbour resize of an organized cloud (H×W×3) to grid×grid×3."""
    x = xyz.permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(x, size=(grid, grid), mode="nearest")[0].permute(1, 2, 0)


def valid_points(xyz: torch.Tensor) -> torch.Tensor:
    """H×W bool: all three coordinates finite and non-zero."""
    return torch.isfinite(xyz).all(dim=-1) & (xyz != 0).all(dim=-1)
