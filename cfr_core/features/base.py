"""The extractor protocol and registry (timm-style: ``create_extractor(name, **cfg)``).

Every extractor is a frozen ``torch.nn.Module`` in eval mode that maps a list of
:class:`~cfr_core.data.prepare.PreparedScan` to a B×C×G×G feature map of one
modality, and states its ``dim``, ``grid`` and a ``lineage_id`` that names the
extractor, its settings and a hash of its weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from cfr_core.data.prepare import PreparedScan
from cfr_core.errors import ConfigError, DataError

_REGISTRY: dict[str, Callable[..., Extractor]] = {}


class Extractor(nn.Module):
    """Base class: frozen, eval-mode, per-pixel features of one modality."""

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""  # "rgb" or "points"
    version: ClassVar[str] = "1"  # bump whenever the features change: it keys caches and lineage

    def __init__(self, dim: int, grid: int, settings: dict[str, Any], weights_sha256: str | None):
        super().__init__()
        if grid < 8:
            raise ConfigError(f"feature grid must be >= 8, got {grid}")
        self.dim = dim
        self.grid = grid
        self.settings = settings
        self.weights_sha256 = weights_sha256

    @property
    def lineage_id(self) -> str:
        """``name@version:<settings hash>:<weights hash or 'none'>``, stable across runs."""
        blob = json.dumps({"grid": self.grid, **self.settings}, sort_keys=True, default=str)
        settings = hashlib.sha256(blob.encode()).hexdigest()[:12]
        weights = (self.weights_sha256 or "none")[:16]
        return f"{self.name}@{self.version}:{settings}:{weights}"

    def freeze(self) -> Extractor:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Extractor:
        # Extractors are frozen: BatchNorm statistics and dropout must never switch on
        # (the reference code forgets eval mode and gets random Point-MAE features).
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @torch.no_grad()
    def forward(self, scans: Sequence[PreparedScan]) -> torch.Tensor:
        """B×dim×grid×grid features of ``scans``."""
        raise NotImplementedError


def register_extractor(name: str):
    def wrap(factory: Callable[..., Extractor]):
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_extractors() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_extractor(name: str, grid: int = 224, **options: Any) -> Extractor:
    """Build a registered extractor by name, frozen and in eval mode."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown extractor {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](grid=grid, **options).freeze()


def file_sha256(path: str | Path) -> str:
    from cfr_core.data.io import sha256_file

    return sha256_file(path)


def _load_builtin() -> None:
    # importing the modules registers their extractors
    from cfr_core.features import dino, efficientnet, offline, point_mae  # noqa: F401


def load_checkpoint(path: Path, what: str, fix: str) -> Any:
    """``torch.load`` of a weights file with tensors and plain containers only.

    A file that holds other Python objects is refused in one line: unpickling them could
    run code from the file, and torch's own message (many lines, suggesting
    ``weights_only=False``) advises exactly the wrong fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on a corrupt or foreign file
        text = str(exc)
        if "Unsupported global" in text or "This file can still be loaded" in text:
            raise DataError(
                f"{what} holds Python objects besides tensors and was not loaded (loading "
                "them could run code from the file)",
                path,
                fix,
            ) from exc
        # torch's text advises weights_only=False, the wrong fix for a corrupt file too
        raise DataError(
            f"{what} does not load ({type(exc).__name__}: not a torch file of tensors, or "
            "truncated)",
            path,
            fix,
        ) from exc
