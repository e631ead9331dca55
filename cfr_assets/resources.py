"""Typed, swappable resources: where data lives, how models are fitted, where results go.

Every path defaults to a folder under DAGSTER_HOME, so the embedded default
(``dagster_home/``) needs no configuration.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg

from cfr_core.config import ExtractorConfig, FitConfig
from cfr_core.data.io import atomic_folder, sha256_file
from cfr_core.data.landing import ShotLibrary
from cfr_core.io.artifacts import content_hash
from cfr_core.registry import BankRegistry, default_url


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME", "dagster_home")).resolve()


class CFRData(dg.ConfigurableResource):
    """Inputs: the landing folder operators drop scans into, and an optional labelled dataset.

    ``dataset_root`` (MVTec 3D-AD layout) supplies validation/good samples for the
    pass/fail threshold and the test split for the metrics; with
    ``use_dataset_train`` its train/good samples join the pool of normal scans.
    """

    landing: str = ""
    dataset_root: str = ""
    use_dataset_train: bool = False

    def landing_dir(self) -> Path:
        return Path(self.landing) if self.landing else dagster_home() / "landing"

    def dataset(self) -> Path | None:
        return Path(self.dataset_root) if self.dataset_root else None


class CFRModelSettings(dg.ConfigurableResource):
    """How a category's detector is fitted (defaults: the paper's CFR, offline extractors)."""

    method: str = "cfr"
    shots: int = 4
    fewshot_seed: int = 42
    extractors: str = "offline"  # or "paper"
    rgb_weights: str = ""
    points_weights: str = ""
    grid: int = 224
    epochs: int = 100
    theta: float = 0.4
    tolerance: float = (
        0.02  # a new model may be this much worse (I-AUROC, AUPRO@30%) than the deployed one
    )
    quality_gate: bool = True
    device: str = "cpu"  # feature extraction and mapper training: cpu, cuda, cuda:N

    def build_extractors(self, cfg: FitConfig):
        """The configuration's extractors, on ``device``."""
        from cfr_core.engine.features import build_extractors
        from cfr_core.engine.fit import on_device

        return on_device(build_extractors(cfg.extractors), self.device)

    def fit_config(self, shots: int | None = None) -> FitConfig:
        ex = ExtractorConfig.preset(self.extractors, grid=self.grid)
        if self.extractors == "paper":
            ex = replace(
                ex,
                rgb_options={"checkpoint": self.rgb_weights} if self.rgb_weights else {},
                points_options={"checkpoint": self.points_weights} if self.points_weights else {},
            )
        cfg = FitConfig.for_method(
            self.method, shots=shots or self.shots, fewshot_seed=self.fewshot_seed, extractors=ex
        )
        return replace(
            cfg,
            mappers=replace(cfg.mappers, epochs=self.epochs),
            retriever=replace(cfg.retriever, epochs=self.epochs),
            scoring=replace(cfg.scoring, theta=self.theta),
        )


class CFRStore(dg.ConfigurableResource):
    """Outputs: stage artifacts and the shot library on disk, deployments in SQL."""

    root: str = ""
    registry_url: str = ""

    def base(self) -> Path:
        return Path(self.root) if self.root else dagster_home() / "artifacts"

    def library(self) -> ShotLibrary:
        return ShotLibrary(self.base() / "shots")

    def registry(self) -> BankRegistry:
        return BankRegistry(self.registry_url or default_url(dagster_home()))

    def feature_cache(self) -> Path:
        return self.base() / "feature-cache"

    def stage_pointer(self, category: str, stage: str) -> Path:
        return self.base() / "stages" / category / stage / "latest.json"

    def write_stage(self, category: str, stage: str, writer) -> dict[str, Any]:
        """Run ``writer(folder)`` into a fresh version folder; point ``latest`` at it.

        The folder is named after the content hash of what was written, so equal
        results share a version; the pointer is replaced atomically.
        """
        parent = self.base() / "stages" / category / stage
        staging = parent / "incoming"
        with atomic_folder(staging, overwrite=True) as tmp:
            writer(tmp)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        version = content_hash(files)
        final = parent / version[:16]
        if final.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(final)
        pointer = {
            "version": version,
            "folder": str(final),
            "files": {n: [str(final / n), h] for n, h in files.items()},
        }
        tmp_ptr = self.stage_pointer(category, stage).with_suffix(".tmp")
        tmp_ptr.write_text(json.dumps(pointer, indent=2) + "\n")
        os.replace(tmp_ptr, self.stage_pointer(category, stage))
        return pointer

    def read_stage(self, category: str, stage: str) -> dict[str, Any]:
        path = self.stage_pointer(category, stage)
        if not path.exists():
            raise dg.Failure(
                f"stage {stage!r} of {category!r} has no output yet; materialize it first ({path})"
            )
        return json.loads(path.read_text())
