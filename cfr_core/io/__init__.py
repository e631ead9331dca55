"""Artifacts: model folders as safetensors + JSON + content-hash manifest (never pickles)."""

from cfr_core.io.artifacts import ArtifactError, code_version, load_model, save_model, verify_model

__all__ = ["ArtifactError", "code_version", "load_model", "save_model", "verify_model"]
