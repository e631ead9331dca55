"""Model folders: safetensors + JSON + a manifest of content hashes. Never pickles.

A model folder holds::

    model.json          category, full FitConfig, extractor lineage ids, dims,
                        thresholds, shots (paths + sha256), the quality gate's
                        library check (limits, leave-one-out peaks, library scan
                        keys), loss history, code version, and (pipeline models)
                        the stage versions it was built from
    weights.safetensors mappers, retriever, banks, feature standardisation, the
                        library check's banks
    <extra files>       e.g. the pipeline's report.json and stage.json
    manifest.json       sha256 of every other file and the folder's content hash

The content is a function of the inputs alone (no wall-clock time, no run
durations), so the same shots, config, code and weights give the same hash.
It is written to a temporary sibling and renamed, so a crash never leaves a
half-written model. Loading re-hashes the files and refuses a folder whose
manifest does not list model.json and weights.safetensors, lists a file that is
missing or altered, or does not list a file the folder holds.
"""

from __future__ import annotations

import hashlib
import json
import re
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
from cfr_core.engine.gate import LibraryGate
from cfr_core.engine.model import FittedModel, ShotRecord
from cfr_core.engine.normalize import FeatureNorm
from cfr_core.errors import CFRError, DataError, finite_number
from cfr_core.io.model_schema import (
    ModelFieldError,
    check_method_tensors,
    check_model_fields,
    check_weights,
)
from cfr_core.memory.bank import Banks
from cfr_core.models.mappers import CrossModalMappers
from cfr_core.models.retriever import AttentionRetriever
from cfr_core.paths import is_safe_name
from cfr_core.scoring.verdict import Calibration

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
    """What model.json holds: everything but wall-clock facts (no creation time, no durations)."""
    meta = {
        "format": FORMAT,
        "category": model.category,
        "config": model.config.to_dict(),
        "extractor_ids": model.extractor_ids,
        "dims": model.dims,
        "threshold": model.threshold,
        "threshold_source": model.threshold_source,
        "calibration": model.calibration.to_dict() if model.calibration else None,
        "gate_threshold": model.gate_threshold,
        "theta": model.theta,
        "theta_source": model.theta_source,
        "shots": [asdict(s) for s in model.shots],
        "history": model.history,
        "extra": model.extra,
        "code_version": code_version(),
    }
    if model.library_gate is not None:
        meta["library_gate"] = model.library_gate.metadata()
    if model.lineage:
        meta["lineage"] = model.lineage
    return meta


def save_model(
    model: FittedModel,
    out: str | Path,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> str:
    """Write ``model`` (and ``extra_files``) to the folder ``out`` atomically; return its content hash."""
    out = Path(out)
    extra_files = extra_files or {}
    for name in extra_files:
        if name in (MODEL_JSON, WEIGHTS, MANIFEST) or not is_safe_name(name):
            raise ArtifactError(f"{name!r} cannot be an extra file of a model folder", out)
    with atomic_folder(out, overwrite) as tmp:
        save_file(model.tensors(), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MODEL_JSON).write_text(
            json.dumps(model_metadata(model), indent=2, sort_keys=True) + "\n"
        )
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data)
        hashes = {name: sha256_file(tmp / name) for name in (MODEL_JSON, WEIGHTS, *extra_files)}
        digest = content_hash(hashes)
        manifest = {"format": FORMAT, "files": hashes, "content_hash": digest}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return digest


def read_json(path: str | Path, what: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object from ``path``; one clear error naming the file when it is missing,
    not JSON, not an object, or lacks a ``required`` key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{what} is missing", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{what} cannot be read ({exc})", path) from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{what} is not valid JSON ({exc})", path) from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} is not a JSON object", path)
    missing = [k for k in required if k not in data]
    if missing:
        raise ArtifactError(f"{what} lacks {', '.join(map(repr, missing))}", path)
    return data


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def verify_model(folder: str | Path) -> str:
    """Re-hash the folder's files against its manifest; return the content hash.

    Refused, with one line naming the file: a manifest that does not list
    model.json and weights.safetensors, a listed file that is missing or
    altered, a file in the folder that the manifest does not list.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError("model folder not found", folder, "pass the --out folder of `cfr fit`")
    manifest = read_json(folder / MANIFEST, "manifest.json", ("format", "files", "content_hash"))
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"unsupported model format {manifest.get('format')!r}; expected {FORMAT}", folder
        )
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _SHA256.match(v) for k, v in files.items()
    ):
        raise ArtifactError(
            "manifest.json 'files' is not a map of names to sha256", folder / MANIFEST
        )
    for needed in (MODEL_JSON, WEIGHTS):
        if needed not in files:
            raise ArtifactError(f"manifest.json does not list {needed}", folder / MANIFEST)
    for name, expected in files.items():
        if not is_safe_name(name):
            raise ArtifactError(f"manifest.json lists an unsafe name {name!r}", folder / MANIFEST)
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise ArtifactError("file listed in the manifest is missing", path)
        if sha256_file(path) != expected:
            raise ArtifactError(
                "file content does not match its manifest hash (altered or corrupt)", path
            )
    for path in sorted(folder.iterdir()):
        if path.name != MANIFEST and path.name not in files:
            raise ArtifactError("file is not listed in the model's manifest.json", path)
    digest = content_hash(files)
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
    meta = read_json(
        folder / MODEL_JSON, "model.json", ("category", "config", "extractor_ids", "dims")
    )
    fix = "it was edited, or written by another version: restore the folder, or refit"
    try:
        check_model_fields(meta, FORMAT)
    except ModelFieldError as exc:
        raise ArtifactError(str(exc), folder / MODEL_JSON, fix) from exc
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"weights do not load ({exc})", folder / WEIGHTS) from exc
    try:
        model = model_from_parts(meta, tensors)
        check_method_tensors(model.config, tensors)
        return model
    except ModelFieldError as exc:
        raise ArtifactError(str(exc), folder / MODEL_JSON, fix) from exc
    except (KeyError, TypeError, ValueError, RuntimeError, CFRError) as exc:
        raise ArtifactError(
            f"model.json does not match the weights ({type(exc).__name__}: {exc})",
            folder / MODEL_JSON,
        ) from exc


def model_from_parts(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FittedModel:
    """Rebuild a model from its metadata (``model.json`` fields) and named tensors."""
    for key in ("threshold", "gate_threshold"):  # what decides PASS/FAIL and the gate
        finite_number(meta.get(key), key, or_null=True)
    for key in ("history", "extra", "lineage", "dims"):
        if not isinstance(meta.get(key, {}), dict):
            raise ValueError(f"{key} must be an object, got {type(meta[key]).__name__}")
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
        gate_threshold=meta.get("gate_threshold"),
        theta=meta.get("theta"),
        theta_source=meta.get("theta_source", ""),
        shots=[s if isinstance(s, ShotRecord) else ShotRecord(**s) for s in meta.get("shots", [])],
        history=meta.get("history", {}),
        extra=meta.get("extra", {}),
        lineage=meta.get("lineage", {}),
    )
    calibration = meta.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise ValueError(f"calibration must be an object, got {type(calibration).__name__}")
        model.calibration = Calibration.from_dict(calibration)
        scoring = config.scoring
        if model.calibration.target != scoring.target_false_reject or (
            not model.calibration.supported and model.calibration.margin != scoring.threshold_margin
        ):
            raise ValueError(
                "calibration target / margin differ from the config's target_false_reject / "
                "threshold_margin"
            )
        if model.calibration.threshold != model.threshold:
            raise ValueError(
                f"threshold {model.threshold!r} differs from its calibration's "
                f"{model.calibration.threshold!r}"
            )
    check_weights(config, model.dims, tensors)  # before any module is built from them
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
    model.library_gate = LibraryGate.from_parts(
        meta.get("library_gate"), tensors, model.dims, config.extractors.grid
    )
    return model
