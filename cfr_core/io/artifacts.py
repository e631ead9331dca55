"""Model folders: safetensors + JSON + a manifest of content hashes. Never pickles.

A model folder holds::

    model.json          category, full FitConfig, extractor lineage ids, dims,
                        threshold, shots (paths + sha256), loss history, timings,
                        code version
    weights.safetensors mappers, retriever, banks, feature standardisation
    manifest.json       sha256 of the two files above and the folder's content hash

It is written to a temporary sibling and renamed, so a crash never leaves a
half-written model; loading re-hashes the files and refuses a folder whose
bytes do not match its manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cfr_core
from cfr_core.config import FitConfig
from cfr_core.data.io import atomic_folder, sha256_file
from cfr_core.engine.model import FittedModel, ShotRecord
from cfr_core.engine.normalize import FeatureNorm
from cfr_core.errors import CFRError, DataError
from cfr_core.memory.bank import Banks
from cfr_core.models.mappers import CrossModalMappers
from cfr_core.models.retriever import AttentionRetriever

FORMAT = "cfr-model/1"
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"


class ArtifactError(DataError):
    """A model folder is missing, incomplete, of another format, or altered."""


def code_version() -> str:
    """Package version, plus the git commit (and '+dirty') when run from a checkout."""
    version = cfr_core.__version__
    root = Path(cfr_core.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}" if commit else version


def content_hash(file_hashes: dict[str, str]) -> str:
    blob = "\n".join(f"{name}:{digest}" for name, digest in sorted(file_hashes.items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def model_metadata(model: FittedModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "category": model.category,
        "config": model.config.to_dict(),
        "extractor_ids": model.extractor_ids,
        "dims": model.dims,
        "threshold": model.threshold,
        "threshold_source": model.threshold_source,
        "shots": [asdict(s) for s in model.shots],
        "history": model.history,
        "timings": model.timings,
        "extra": model.extra,
        "code_version": code_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def save_model(model: FittedModel, out: str | Path, overwrite: bool = False) -> str:
    """Write ``model`` to the folder ``out`` atomically; return its content hash."""
    out = Path(out)
    with atomic_folder(out, overwrite) as tmp:
        save_file(model.tensors(), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MODEL_JSON).write_text(
            json.dumps(model_metadata(model), indent=2, sort_keys=True) + "\n"
        )
        hashes = {name: sha256_file(tmp / name) for name in (MODEL_JSON, WEIGHTS)}
        digest = content_hash(hashes)
        manifest = {"format": FORMAT, "files": hashes, "content_hash": digest}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return digest


def verify_model(folder: str | Path) -> str:
    """Re-hash the folder's files against its manifest; return the content hash."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError("model folder not found", folder, "pass the --out folder of `cfr fit`")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(
            "manifest.json is missing: not a complete model folder", folder
        ) from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"manifest.json is not valid JSON ({exc})", folder / MANIFEST) from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"unsupported model format {manifest.get('format')!r}; expected {FORMAT}", folder
        )
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError("file listed in the manifest is missing", path)
        if sha256_file(path) != expected:
            raise ArtifactError(
                "file content does not match its manifest hash (altered or corrupt)", path
            )
    digest = content_hash(manifest["files"])
    if digest != manifest.get("content_hash"):
        raise ArtifactError("manifest content hash is inconsistent", folder / MANIFEST)
    return digest


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_model(folder: str | Path, verify: bool = True) -> FittedModel:
    """Rebuild a :class:`FittedModel` from a folder written by :func:`save_model`."""
    folder = Path(folder)
    if verify:
        verify_model(folder)
    try:
        meta = json.loads((folder / MODEL_JSON).read_text())
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ArtifactError(f"model files do not load ({exc})", folder) from exc
    try:
        return model_from_parts(meta, tensors)
    except (KeyError, TypeError, RuntimeError, CFRError) as exc:
        raise ArtifactError(
            f"model folder is inconsistent ({type(exc).__name__}: {exc})", folder
        ) from exc


def model_from_parts(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FittedModel:
    """Rebuild a model from its metadata (``model.json`` fields) and named tensors."""
    config = (
        meta["config"]
        if isinstance(meta["config"], FitConfig)
        else FitConfig.from_dict(meta["config"])
    )
    model = FittedModel(
        category=meta["category"],
        config=config,
        extractor_ids=meta["extractor_ids"],
        dims=meta["dims"],
        threshold=meta.get("threshold"),
        threshold_source=meta.get("threshold_source", ""),
        shots=[s if isinstance(s, ShotRecord) else ShotRecord(**s) for s in meta.get("shots", [])],
        history=meta.get("history", {}),
        timings=meta.get("timings", {}),
        extra=meta.get("extra", {}),
    )
    model.norm = FeatureNorm.from_tensors(tensors)
    mapper_state = _sub(tensors, "mappers.")
    if mapper_state:
        model.mappers = CrossModalMappers(model.dims["rgb"], model.dims["points"], config.mappers)
        model.mappers.load_state_dict(mapper_state)
        model.mappers.eval()
    retriever_state = _sub(tensors, "retriever.")
    if retriever_state:
        model.retriever = AttentionRetriever(
            model.dims["points"],
            model.dims["rgb"],
            config.retriever.d_model,
            config.retriever.top_k,
        )
        model.retriever.load_state_dict(retriever_state)
        model.retriever.eval()
    if "bank.rgb" in tensors:
        model.banks = Banks(tensors["bank.rgb"], tensors["bank.keys"], tensors["bank.values"])
    model.joint_bank = tensors.get("bank.joint")
    return model
