"""Per-category feature standardisation, fitted on the shots.

The training-free extractors put every feature far from the origin (colour
means, centred histograms), so cosine similarities between any two features
are close to 1 and distances that the method thresholds (θ) lose meaning.
Standardising each channel with the mean and spread of the shots' foreground
pixels fixes that. It is stored with the model and applied before mapping,
banks and scoring. Background 3D features stay exactly zero, so the foreground
(non-zero 3D feature) is unchanged. The paper's extractors do not use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfr_core.engine.features import FeatureSet


@dataclass
class FeatureNorm:
    rgb_mean: torch.Tensor
    rgb_std: torch.Tensor
    points_mean: torch.Tensor
    points_std: torch.Tensor

    @classmethod
    def fit(cls, features: FeatureSet, floor: float = 1e-3) -> FeatureNorm:
        fg = features.foreground
        rgb = features.rgb.permute(0, 2, 3, 1)[fg]
        pts = features.points.permute(0, 2, 3, 1)[fg]
        if rgb.shape[0] < 2:
            raise ValueError("standardisation needs at least two foreground pixels in the shots")
        return cls(
            rgb.mean(0), rgb.std(0).clamp_min(floor), pts.mean(0), pts.std(0).clamp_min(floor)
        )

    def apply(self, features: FeatureSet) -> FeatureSet:
        fg = features.foreground.unsqueeze(1)
        rgb = (features.rgb - self.rgb_mean.view(1, -1, 1, 1)) / self.rgb_std.view(1, -1, 1, 1)
        pts = (features.points - self.points_mean.view(1, -1, 1, 1)) / self.points_std.view(
            1, -1, 1, 1
        )
        pts = torch.where(fg, pts, torch.zeros_like(pts))
        # a foreground pixel whose standardised feature is exactly zero would turn into background
        pts = torch.where(
            fg & (pts.abs().sum(1, keepdim=True) == 0), torch.full_like(pts, 1e-6), pts
        )
        return FeatureSet(rgb, pts, features.masks, features.keys, features.colour, features.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"norm.{k}": v for k, v in vars(self).items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> FeatureNorm | None:
        names = ("rgb_mean", "rgb_std", "points_mean", "points_std")
        if not all(f"norm.{n}" in tensors for n in names):
            return None
        return cls(*(tensors[f"norm.{n}"] for n in names))
