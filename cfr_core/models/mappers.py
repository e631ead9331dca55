"""Crossmodal feature mappers and their loss.

CFR: two GeGLU networks, ``Linear(in, 2h)`` split into gate and value,
``gelu(gate) * value``, ``Linear(h, out)``; trained with four ``1 - cos`` terms
(RGB→3D, 3D→RGB, RGB→3D→RGB, 3D→RGB→3D). CFM: 3-layer MLPs with GELU and only
the two direct terms. Mappers act per pixel: inputs are N×C rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cfr_core.config import MapperConfig


class GeGLU(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(d_in, 2 * hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.proj(x).chunk(2, dim=-1)
        return self.out(F.gelu(gate) * value)


class MLP(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MIN_HIDDEN = 256


def default_hidden(d_rgb: int, d_3d: int) -> int:
    """The paper's (d_rgb + d_3d) // 2 (960 for DINO + Point-MAE), at least 256.

    The floor only matters for the low-dimensional offline features, where the
    paper's rule would leave ~37 hidden units and the mappers underfit.
    """
    return max((d_rgb + d_3d) // 2, MIN_HIDDEN)


class CrossModalMappers(nn.Module):
    """``to_rgb``: 3D feature -> RGB feature; ``to_3d``: RGB feature -> 3D feature."""

    def __init__(self, d_rgb: int, d_3d: int, config: MapperConfig):
        super().__init__()
        hidden = config.hidden or default_hidden(d_rgb, d_3d)
        block = GeGLU if config.kind == "geglu" else MLP
        self.to_rgb = block(d_3d, d_rgb, hidden)
        self.to_3d = block(d_rgb, d_3d, hidden)
        self.cyclic = config.cyclic

    def forward(self, f_rgb: torch.Tensor, f_3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted RGB from 3D, predicted 3D from RGB) for N×C rows."""
        return self.to_rgb(f_3d), self.to_3d(f_rgb)

    def loss(self, f_rgb: torch.Tensor, f_3d: torch.Tensor) -> torch.Tensor:
        """Sum of the ``1 - cos`` terms, each averaged over the rows (foreground pixels)."""
        p_rgb, p_3d = self(f_rgb, f_3d)
        terms = [cosine_loss(p_rgb, f_rgb), cosine_loss(p_3d, f_3d)]
        if self.cyclic:
            terms += [cosine_loss(self.to_rgb(p_3d), f_rgb), cosine_loss(self.to_3d(p_rgb), f_3d)]
        return torch.stack(terms).sum()


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
