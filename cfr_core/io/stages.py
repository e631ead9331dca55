"""Content-addressed stage versions: the pipeline's artifacts and what an audit derives from them.

A stage version is a folder ``<base>/stages/<category>/<stage>/<version[:16]>``
whose name is the content hash of every file in it. ``stage.json`` names the
upstream versions it was built from and the full configuration, so the chain
model → stages → shots is a Merkle chain: the registry's model hash fixes
model.json, whose ``lineage`` fixes every upstream version, whose bytes fix
their own upstream versions and, at the root, the shot files' sha256.

What must exist is derived from this module (:data:`UPSTREAM`,
:data:`STAGE_FILES`), never from a registry row's own list.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfr_core.data.io import sha256_file
from cfr_core.io.artifacts import (
    MANIFEST,
    MODEL_JSON,
    WEIGHTS,
    ArtifactError,
    content_hash,
    read_json,
)
from cfr_core.paths import check_name

STAGE_JSON = "stage.json"
STAGE_FORMAT = "cfr-stage/1"
REPORT_JSON = "report.json"

#: every stage whose output a pipeline model is built from, in order
TRAINING_STAGES = (
    "normal_shots",
    "shot_features",
    "standardisation",
    "crossmodal_mappers",
    "memory_banks",
    "attention_retriever",
)
MODEL_STAGE = "evaluation_report"
#: the upstream versions each stage's stage.json must name
UPSTREAM: dict[str, tuple[str, ...]] = {
    "normal_shots": (),
    "shot_features": ("normal_shots",),
    "standardisation": ("shot_features",),
    "crossmodal_mappers": ("shot_features", "standardisation"),
    "memory_banks": ("shot_features", "standardisation", "crossmodal_mappers"),
    "attention_retriever": ("shot_features", "standardisation", "memory_banks"),
    MODEL_STAGE: TRAINING_STAGES,
}
#: the files every version of a stage holds (besides stage.json)
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "normal_shots": ("shots.json",),
    "shot_features": ("features.safetensors", "features.json"),
    "standardisation": ("norm.safetensors", "norm.json"),
    "crossmodal_mappers": ("mappers.safetensors", "mappers.json"),
    "memory_banks": ("banks.safetensors", "banks.json"),
    "attention_retriever": ("retriever.safetensors", "retriever.json"),
    MODEL_STAGE: (MODEL_JSON, WEIGHTS, MANIFEST, REPORT_JSON),
}


def folder_hash(folder: Path) -> str:
    """Content hash of every file in ``folder``: what a stage version is."""
    return content_hash({p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()})


@dataclass(frozen=True)
class StageRef:
    """One immutable, content-addressed version of a stage's output."""

    category: str
    stage: str
    version: str
    folder: Path

    def file(self, name: str) -> Path:
        return self.folder / name

    def json(self, name: str) -> dict[str, Any]:
        return read_json(self.folder / name, f"{self.stage} {name}")

    @property
    def inputs(self) -> dict[str, str]:
        return self.json(STAGE_JSON).get("inputs", {})


class StageStore:
    """Stage versions under ``base/stages``."""

    def __init__(self, base: str | Path):
        self.base = Path(base)

    def stage_root(self, category: str, stage: str) -> Path:
        return self.base / "stages" / check_name(category) / check_name(stage, "stage")

    def folder(self, category: str, stage: str, version: str) -> Path:
        return self.stage_root(category, stage) / check_name(version[:16], "version")

    def write(
        self,
        category: str,
        stage: str,
        inputs: dict[str, str],
        config: dict[str, Any],
        writer: Callable[[Path], None],
    ) -> StageRef:
        """A new version of ``stage``: ``stage.json`` (upstream versions + config) and what
        ``writer(folder)`` writes, in a folder named after the content hash of it all.

        Written to a temporary folder and renamed, so a killed run leaves no partial
        version; equal content is one version (the existing folder is re-hashed).
        """
        parent = self.stage_root(category, stage)
        parent.mkdir(parents=True, exist_ok=True)
        lineage = {
            "format": STAGE_FORMAT,
            "stage": stage,
            "category": category,
            "inputs": dict(sorted(inputs.items())),
            "config": config,
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage}.", dir=parent))
        try:
            (tmp / STAGE_JSON).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
            writer(tmp)
            version = folder_hash(tmp)
            final = parent / version[:16]
            if final.exists():
                if folder_hash(final) != version:
                    raise ArtifactError(
                        "an existing stage version does not match its name (altered on disk)",
                        final,
                        "move it aside and rerun",
                    )
            else:
                os.chmod(tmp, 0o755)
                tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return StageRef(category, stage, version, final)

    def open(self, category: str, stage: str, version: str) -> StageRef:
        """The stage version ``version``, after checking that its bytes still hash to it."""
        folder = self.folder(category, stage, version)
        if not folder.is_dir():
            raise ArtifactError(f"{stage} version {version[:16]} is missing", folder)
        got = folder_hash(folder)
        if got != version:
            raise ArtifactError(
                f"{stage} version {version[:16]} was altered on disk (content hash {got[:16]})",
                folder,
            )
        return StageRef(category, stage, version, folder)
