"""Point-MAE encoder in pure torch and its per-pixel extractor.

Architecture (Pang et al., ECCV 2022, the ShapeNet-55 pre-trained encoder):
1024 groups of 128 points (farthest-point-sampled centres + kNN), each group
centred on its centre and embedded by a mini-PointNet (3→128→256, max-pool,
concatenated with the pooled feature, 512→512→384, max-pool); a 3→128→384 MLP
embeds the centres; 12 pre-norm transformer blocks of width 384 with 6 heads,
the positional embedding added before every block.

For anomaly detection the LayerNorm'd outputs of blocks 3, 7 and 11 are
concatenated (1152-d per group), mixed back onto every valid point by inverse
distance over its 3 nearest centres, scattered onto the grid and smoothed.

Weights: the official ``pretrain.pth`` holds the state under ``base_model``
with prefix ``MAE_encoder.`` (possibly behind ``module.``); decoder entries
are ignored. Module names here mirror that layout, so loading is a prefix strip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfr_core.data.prepare import PreparedScan
from cfr_core.errors import ConfigError, DataError
from cfr_core.features.base import Extractor, file_sha256, load_checkpoint, register_extractor
from cfr_core.features.point_ops import (
    farthest_point_sample,
    interpolate_from_centres,
    knn,
    resize_cloud,
    scatter_to_grid,
    smooth_to_grid,
    stack_maps,
    valid_points,
)

WEIGHTS_HINT = (
    "download pretrain.pth (ShapeNet-55) from the Point-MAE release "
    "(github.com/Pang-Yatian/Point-MAE) and pass its path"
)


class MiniPointNet(nn.Module):
    """Group tokenizer: G×K×3 centred points -> G×C token."""

    def __init__(self, channels: int = 384):
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, channels, 1),
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(groups.transpose(1, 2))  # G×256×K
        pooled = x.max(dim=2).values  # G×256
        # second_conv[0] sees cat([pooled broadcast over K, x]): its pooled half is the
        # same for every point of a group, so apply it once per group (a quarter of
        # the tokenizer's multiply-adds saved, same result up to float rounding)
        first = self.second_conv[0]
        c = pooled.shape[1]
        per_group = pooled @ first.weight[:, :c, 0].T + first.bias  # G×512
        h = F.conv1d(x, first.weight[:, c:], None) + per_group.unsqueeze(-1)
        return self.second_conv[1:](h).max(dim=2).values


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])


class PointMAEEncoder(nn.Module):
    """The Point-MAE encoder; ``forward`` returns the normed outputs of ``fetch`` blocks."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6):
        super().__init__()
        self.encoder = MiniPointNet(dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = TransformerEncoder(dim, depth, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, groups: torch.Tensor, centres: torch.Tensor, fetch: Sequence[int]
    ) -> torch.Tensor:
        """groups: B×G×K×3 (centred), centres: B×G×3 -> B×G×(dim·len(fetch))."""
        b, g, k, _ = groups.shape
        x = self.encoder(groups.reshape(b * g, k, 3)).reshape(b, g, -1)
        pos = self.pos_embed(centres)
        outs = []
        for i, block in enumerate(self.blocks.blocks):
            x = block(x + pos)
            if i in fetch:
                outs.append(self.norm(x))
        return torch.cat(outs, dim=-1)


def load_point_mae_checkpoint(model: PointMAEEncoder, path: str | Path) -> str:
    """Load the official Point-MAE layout into ``model``; return the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise DataError("Point-MAE checkpoint not found", path, WEIGHTS_HINT)
    ckpt = load_checkpoint(path, "Point-MAE checkpoint", WEIGHTS_HINT)
    state = ckpt.get("base_model", ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise DataError(
            "not a Point-MAE checkpoint: no 'base_model' state dict", path, WEIGHTS_HINT
        )
    prefix = "MAE_encoder."
    own = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(prefix):
            own[key[len(prefix) :]] = value
    if not own:
        raise DataError("checkpoint has no 'MAE_encoder.' weights", path, WEIGHTS_HINT)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(own))
    if missing:
        raise DataError(
            f"checkpoint lacks {len(missing)} encoder tensors, e.g. {missing[:3]}",
            path,
            WEIGHTS_HINT,
        )
    wrong = [k for k in expected if tuple(own[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise DataError(
            f"tensor {k} has shape {tuple(own[k].shape)}, expected {tuple(expected[k].shape)}", path
        )
    model.load_state_dict({k: own[k] for k in expected})
    return file_sha256(path)


class PointMAEExtractor(Extractor):
    name = "point_mae"
    modality = "points"

    def __init__(
        self,
        grid: int = 224,
        checkpoint: str | None = None,
        n_groups: int = 1024,
        group_size: int = 128,
        fetch: Sequence[int] = (3, 7, 11),
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        allow_random_weights: bool = False,
        seed: int = 0,
    ):
        if checkpoint is None and not allow_random_weights:
            raise ConfigError(
                f"point_mae needs a checkpoint: {WEIGHTS_HINT} (points_options checkpoint=PATH)"
            )
        if any(i >= depth for i in fetch):
            raise ConfigError(f"fetch blocks {tuple(fetch)} exceed depth {depth}")
        torch.manual_seed(seed)
        model = PointMAEEncoder(dim, depth, heads)
        sha = load_point_mae_checkpoint(model, checkpoint) if checkpoint else f"random-seed{seed}"
        settings = {
            "n_groups": n_groups,
            "group_size": group_size,
            "fetch": list(fetch),
            "dim": dim,
            "depth": depth,
            "heads": heads,
        }
        super().__init__(dim * len(fetch), grid, settings, sha)
        self.model = model
        self.n_groups, self.group_size, self.fetch = n_groups, group_size, tuple(fetch)

    def point_features(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid grid×grid, N×dim features of the valid points) for one organized cloud."""
        cloud = resize_cloud(xyz, self.grid)
        valid = valid_points(cloud)
        pts = cloud[valid]
        if pts.shape[0] < 1:
            return valid, torch.zeros(0, self.dim, device=xyz.device)
        centres = pts[farthest_point_sample(pts, self.n_groups)]
        _, idx = knn(centres, pts, self.group_size)
        groups = pts[idx] - centres[:, None, :]
        if groups.shape[1] < self.group_size:  # fewer points than a group: repeat to full size
            reps = -(-self.group_size // groups.shape[1])
            groups = groups.repeat(1, reps, 1)[:, : self.group_size]
        feats = self.model(groups[None], centres[None], self.fetch)[0]
        return valid, interpolate_from_centres(pts, centres, feats, k=3)

    @torch.no_grad()
    def forward(self, scans: Sequence[PreparedScan]) -> torch.Tensor:
        maps = []
        for scan in scans:
            xyz = torch.from_numpy(np.ascontiguousarray(scan.xyz)).to(self.device)
            valid, feats = self.point_features(xyz)
            maps.append(scatter_to_grid(feats, valid))
        return smooth_to_grid(stack_maps(maps), self.grid)


@register_extractor("point_mae")
def _point_mae(grid: int = 224, **options) -> PointMAEExtractor:
    return PointMAEExtractor(grid, **options)
