"""Typed, swappable resources: where data lives, how models are fitted, where results go.

Every path defaults to a folder under DAGSTER_HOME, so the embedded default
(``dagster_home/``) needs no configuration.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg

from cfr_assets.partitions import PARTITION_TAG
from cfr_core.config import DEFAULT_EXTRACTORS, DEFAULT_METHOD, FitConfig, preset_extractors
from cfr_core.data.landing import ShotLibrary
from cfr_core.io.stages import StageRef, StageStore
from cfr_core.paths import check_name
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

    def has_split(self, category: str, split: str) -> bool:
        root = self.dataset()
        return root is not None and (root / check_name(category) / split).is_dir()


class CFRModelSettings(dg.ConfigurableResource):
    """How a category's detector is fitted (defaults: those of `cfr fit`, see cfr_core.config)."""

    method: str = DEFAULT_METHOD
    shots: int = 4
    fewshot_seed: int = 42
    extractors: str = DEFAULT_EXTRACTORS  # lite, offline or paper
    rgb_weights: str = ""
    points_weights: str = ""
    grid: int = 224
    epochs: int = 100
    theta: float | None = None  # None: "auto" (calibrated from the shots), or the paper's 0.4
    # share of good parts the line's threshold may reject; None: cfr_core.config's default
    target_false_reject: float | None = None
    tolerance: float = (
        0.02  # a new model may be this much worse (I-AUROC, AUPRO@30%) than the live one
    )
    quality_gate: bool = True
    device: str = "cpu"  # feature extraction and mapper training: cpu, cuda, cuda:N

    def build_extractors(self, cfg: FitConfig):
        """The configuration's extractors, on ``device``."""
        from cfr_core.engine.features import build_extractors
        from cfr_core.engine.fit import on_device

        return on_device(build_extractors(cfg.extractors), self.device)

    def fit_config(self, shots: int | None = None) -> FitConfig:
        ex = preset_extractors(self.extractors, self.grid, self.rgb_weights, self.points_weights)
        cfg = FitConfig.for_method(
            self.method, shots=shots or self.shots, fewshot_seed=self.fewshot_seed, extractors=ex
        )
        scoring = cfg.scoring if self.theta is None else replace(cfg.scoring, theta=self.theta)
        if self.target_false_reject is not None:
            scoring = replace(scoring, target_false_reject=self.target_false_reject)
        return replace(
            cfg,
            mappers=replace(cfg.mappers, epochs=self.epochs),
            retriever=replace(cfg.retriever, epochs=self.epochs),
            scoring=scoring,
        )


#: the ingest job's name (its runs hold only the ingest lock)
INGEST_JOB = "cfr_ingest_job"
#: seconds an ingest step waits for another one of the same category
INGEST_LOCK_WAIT = 300.0


class CFRStore(dg.ConfigurableResource):
    """Outputs: stage artifacts and the shot library on disk, deployments in SQL.

    In a run, the store also holds the run's **category lock** from the first
    step to the last. The lock lives in the registry's database (a PostgreSQL
    advisory lock, or a file lock next to a SQLite registry), so it serialises
    runs of one category whatever started them: the daemon's queue,
    `cfr pipeline run`, `cfr demo`, or a second machine sharing the database.
    A second run waits up to ``lock_wait_seconds``, then fails with a message
    naming the run that holds the lock.
    """

    root: str = ""
    registry_url: str = ""
    lock_wait_seconds: float = 0.0

    @contextlib.contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator[CFRStore]:
        run = context.run
        category = run.tags.get(PARTITION_TAG) if run is not None else None
        if not category:
            yield self
            return
        if run.job_name == INGEST_JOB:  # its ingest step takes the ingest lock on its own
            yield self
            return
        holder = f"run {run.run_id[:8]} ({run.job_name})"
        with self.registry().category_lock(category, holder, self.lock_wait_seconds):
            yield self

    def ingest_lock(self, category: str, holder: str):
        """The category's ingest lock (writes to its shot library), waited for up to
        INGEST_LOCK_WAIT seconds: another ingest step takes seconds, not minutes."""
        return self.registry().category_lock(
            category, holder, max(self.lock_wait_seconds, INGEST_LOCK_WAIT), scope="ingest"
        )

    def base(self) -> Path:
        return Path(self.root) if self.root else dagster_home() / "artifacts"

    def library(self) -> ShotLibrary:
        return ShotLibrary(self.base() / "shots")

    def registry(self) -> BankRegistry:
        return BankRegistry(self.registry_url or default_url(dagster_home()))

    def feature_cache(self) -> Path:
        return self.base() / "feature-cache"

    def stages(self) -> StageStore:
        return StageStore(self.base())

    def write_stage(
        self,
        category: str,
        stage: str,
        inputs: dict[str, str],
        config: dict[str, Any],
        writer: Callable[[Path], None],
    ) -> StageRef:
        """A new content-addressed version of ``stage`` (see cfr_core.io.stages)."""
        return self.stages().write(category, stage, inputs, config, writer)

    def open_stage(self, category: str, stage: str, version: str) -> StageRef:
        """The stage version ``version``, re-hashed before use."""
        return self.stages().open(category, stage, version)
