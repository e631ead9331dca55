"""A fitted detector: configuration, learned modules, banks, threshold and lineage."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from cfr_core.config import FitConfig
from cfr_core.engine.normalize import FeatureNorm

if TYPE_CHECKING:
    from cfr_core.engine.gate import LibraryGate
from cfr_core.memory.bank import Banks
from cfr_core.models.mappers import CrossModalMappers
from cfr_core.models.retriever import AttentionRetriever
from cfr_core.scoring.verdict import Calibration


@dataclass
class ShotRecord:
    """One normal sample the model was fitted on, as lineage records it."""

    key: str
    rgb_path: str
    xyz_path: str
    rgb_sha256: str
    xyz_sha256: str


@dataclass
class FittedModel:
    """Everything ``score`` needs. Built by :func:`cfr_core.engine.fit.fit`, saved by
    :func:`cfr_core.io.artifacts.save_model`."""

    category: str
    config: FitConfig
    extractor_ids: dict[str, str]  # modality -> lineage id
    dims: dict[str, int]  # modality -> feature dim
    norm: FeatureNorm | None = None
    mappers: CrossModalMappers | None = None
    banks: Banks | None = None
    retriever: AttentionRetriever | None = None
    joint_bank: torch.Tensor | None = None
    threshold: float | None = None
    threshold_source: str = ""
    calibration: Calibration | None = None  # how the threshold was set (rule, n, promise)
    gate_threshold: float | None = None  # the quality gate's (more tolerant) threshold
    library_gate: LibraryGate | None = None  # the gate's check against the good library scans
    theta: float | None = None  # replacement threshold in force (fixed or calibrated)
    theta_source: str = ""
    shots: list[ShotRecord] = field(default_factory=list)
    history: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage; not saved
    extra: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)  # pipeline models: stage -> version

    def variant(self, method: str | None = None, theta: float | None = None) -> FittedModel:
        """A copy sharing every fitted part, scored as ``method`` and/or at replacement ``theta``.

        The CFR family (cfr, cfr-bank, cfr-noreplace, cfr-nn, cfr-cond) differs only at
        inference, so one fit serves them all. The pass/fail and gate thresholds were
        calibrated on this model's scores: a copy that scores differently has none until
        :func:`cfr_core.engine.fit.calibrate` gives it its own.
        """
        config = self.config
        if method is not None:
            config = replace(config, method=method)
        if theta is not None:
            config = replace(config, scoring=replace(config.scoring, theta=float(theta)))
        out = replace(self, config=config, theta=self.theta if theta is None else float(theta))
        if config != self.config:
            out.threshold = out.gate_threshold = out.calibration = None
            out.threshold_source = ""
            out.library_gate = None
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """All learned state under stable names (for safetensors)."""
        out: dict[str, torch.Tensor] = {}
        if self.norm is not None:
            out.update(self.norm.tensors())
        if self.mappers is not None:
            out.update({f"mappers.{k}": v for k, v in self.mappers.state_dict().items()})
        if self.retriever is not None:
            out.update({f"retriever.{k}": v for k, v in self.retriever.state_dict().items()})
        if self.banks is not None:
            out.update(self.banks.tensors())
        if self.joint_bank is not None:
            out["bank.joint"] = self.joint_bank
        if self.library_gate is not None:
            out.update(self.library_gate.tensors())
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def to(self, device: torch.device | str) -> FittedModel:
        for module in (self.mappers, self.retriever):
            if module is not None:
                module.to(device)
        if self.banks is not None:
            self.banks = Banks(
                self.banks.rgb.to(device), self.banks.keys.to(device), self.banks.values.to(device)
            )
        if self.joint_bank is not None:
            self.joint_bank = self.joint_bank.to(device)
        return self
