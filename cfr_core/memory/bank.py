"""Memory banks built from the shots' features and reduced by the greedy coreset.

* RGB bank: real RGB features (to judge how plausible a reconstructed RGB feature is).
* Key-value bank: 3D features as keys, the RGB feature at the same pixel as values;
  subsampled on its keys, the same indices selecting the values.
* Joint bank (``btf``): per-modality unit-normalised RGB and 3D features, concatenated.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cfr_core.config import BankConfig
from cfr_core.errors import CFRError
from cfr_core.memory.coreset import greedy_coreset
from cfr_core.memory.pruned import CosineIndex


class EmptyBankError(CFRError):
    """A bank would hold no entry (no shot, or no foreground)."""


def coreset_size(n_rows: int, ratio: float) -> int:
    return max(1, int(n_rows * ratio))


@dataclass
class Banks:
    rgb: torch.Tensor  # M_rgb×D_rgb
    keys: torch.Tensor  # M_kv×D_3d
    values: torch.Tensor  # M_kv×D_rgb

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank.rgb": self.rgb, "bank.keys": self.keys, "bank.values": self.values}

    def index(self, name: str) -> CosineIndex:
        """The pruned max-cosine index of bank ``name`` ("rgb" or "keys"), built on first use
        and kept while that tensor is the bank (a replaced tensor gets a new one)."""
        bank = getattr(self, name)
        cache = self.__dict__.setdefault("_indices", {})
        key = (id(bank), bank.data_ptr(), tuple(bank.shape))
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, CosineIndex(bank))
        return cache[name][1]


def _rows(fmap: torch.Tensor) -> torch.Tensor:
    """B×C×G×G -> (B·G·G)×C."""
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])


def coreset(rows: torch.Tensor, config: BankConfig) -> torch.Tensor:
    """Indices of the greedy coreset of ``rows`` at the configured ratio."""
    n = coreset_size(len(rows), config.coreset_ratio)
    return greedy_coreset(rows, n, config.projection_dim, config.n_starts, config.seed)


def build_banks(f_rgb: torch.Tensor, f_3d: torch.Tensor, config: BankConfig) -> Banks:
    """Banks from all pixels (background included) of the shots' feature maps."""
    rgb, pts = _rows(f_rgb), _rows(f_3d)
    if rgb.shape[0] == 0:
        raise EmptyBankError("no shot features to build banks from")
    # the two coresets are independent and mostly elementwise, single-threaded work:
    # side by side they take ~1.3-1.5x less wall time on 2 cores (same indices)
    with ThreadPoolExecutor(max_workers=2) as pool:
        rgb_job, kv_job = pool.submit(coreset, rgb, config), pool.submit(coreset, pts, config)
        rgb_idx, kv_idx = rgb_job.result(), kv_job.result()
    return Banks(
        rgb=rgb[rgb_idx].contiguous(),
        keys=pts[kv_idx].contiguous(),
        values=rgb[kv_idx].contiguous(),
    )


def joint_features(rgb_rows: torch.Tensor, pts_rows: torch.Tensor) -> torch.Tensor:
    """N×(Cr+C3): each modality's rows unit-normalised, then concatenated (BTF)."""
    return torch.cat([F.normalize(rgb_rows, dim=-1), F.normalize(pts_rows, dim=-1)], dim=-1)


def build_joint_bank(
    f_rgb: torch.Tensor, f_3d: torch.Tensor, foreground: torch.Tensor, config: BankConfig
) -> torch.Tensor:
    """BTF's memory: coreset of the joint features of the shots' foreground pixels."""
    fg = foreground.reshape(-1)
    rows = joint_features(_rows(f_rgb)[fg], _rows(f_3d)[fg])
    if rows.shape[0] == 0:
        raise EmptyBankError(
            "the shots have no foreground pixel (no valid 3D point after preprocessing)"
        )
    return rows[coreset(rows, config)].contiguous()
