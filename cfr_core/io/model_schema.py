"""What a ``model.json`` may hold: every field's type and range, checked before it is used.

A model folder's manifest proves which bytes were saved, not that whoever saved them
(or recomputed the manifest after editing them) wrote sensible values. A field outside
its range would change verdicts silently (a NaN or negative θ replaces everything or
nothing), a wrong type would end in a traceback deep inside torch, and an unknown field
would be ignored. :func:`check_model_fields` refuses each with one line that names the
field and what it must be; :func:`check_method_tensors` refuses a method whose tensors
the weights lack.
"""

from __future__ import annotations

import math
from typing import Any

from cfr_core.paths import is_safe_name

#: replacement θ compares with d = 1 − a cosine similarity, which lies in [0, 2]
THETA_RANGE = (0.0, 2.0)

STRINGS = ("threshold_source", "theta_source", "code_version")
OBJECTS = ("config", "extractor_ids", "dims", "history", "extra", "lineage", "library_gate")
FIELDS = frozenset(
    {
        "format",
        "category",
        "threshold",
        "gate_threshold",
        "theta",
        "calibration",
        "shots",
        *STRINGS,
        *OBJECTS,
    }
)
REQUIRED = ("format", "category", "config", "extractor_ids", "dims")
SHOT_FIELDS = ("key", "rgb_path", "xyz_path", "rgb_sha256", "xyz_sha256")


class ModelFieldError(ValueError):
    """One field of model.json has the wrong type or is out of range."""

    def __init__(self, name: str, problem: str):
        self.field = name
        super().__init__(f"field {name!r} {problem}")


def _number(meta: dict, name: str, low: float, high: float, what: str) -> None:
    value = meta.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelFieldError(
            name, f"must be a number or null, got {type(value).__name__} {value!r}"
        )
    try:
        inside = math.isfinite(value) and low <= value <= high
    except OverflowError:  # an integer too large for a float
        inside = False
    if not inside:
        raise ModelFieldError(name, f"must be {what}, got {value!r}")


def check_model_fields(meta: dict[str, Any], fmt: str) -> None:
    """Raise :class:`ModelFieldError` for the first field of ``meta`` that is unknown,
    missing, of the wrong type or out of range (the nested config, calibration and
    library gate are checked where they are built)."""
    unknown = sorted(set(meta) - FIELDS)
    if unknown:
        raise ModelFieldError(
            unknown[0], f"is not a model.json field (known: {', '.join(sorted(FIELDS))})"
        )
    for name in REQUIRED:
        if name not in meta:
            raise ModelFieldError(name, "is missing")
    if meta["format"] != fmt:
        raise ModelFieldError("format", f"must be {fmt!r}, got {meta['format']!r}")
    category = meta["category"]
    if not isinstance(category, str) or not is_safe_name(category):
        raise ModelFieldError("category", f"must be a plain folder name, got {category!r}")
    for name in STRINGS:
        if not isinstance(meta.get(name, ""), str):
            raise ModelFieldError(name, f"must be a string, got {type(meta[name]).__name__}")
    for name in OBJECTS:
        if name in meta and not isinstance(meta[name], dict):
            if name == "library_gate" and meta[name] is None:
                continue
            raise ModelFieldError(name, f"must be an object, got {type(meta[name]).__name__}")
    # thresholds compare with image scores (>= 0); θ with 1 − a cosine (in [0, 2])
    _number(meta, "threshold", 0.0, math.inf, "a finite number >= 0")
    _number(meta, "gate_threshold", 0.0, math.inf, "a finite number >= 0")
    _number(meta, "theta", *THETA_RANGE, "a number in [0, 2] (θ compares with 1 − a cosine)")
    if meta.get("calibration") is not None and not isinstance(meta["calibration"], dict):
        raise ModelFieldError("calibration", "must be an object or null")
    dims = meta["dims"]
    if set(dims) != {"rgb", "points"} or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in dims.values()
    ):
        raise ModelFieldError("dims", f"must be {{'rgb': n, 'points': n}} with n > 0, got {dims}")
    for name in ("extractor_ids", "lineage"):
        if not all(isinstance(v, str) for v in meta.get(name, {}).values()):
            raise ModelFieldError(name, "must map names to strings")
    for name, values in meta.get("history", {}).items():
        if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise ModelFieldError("history", f"{name!r} must be a list of numbers")
    shots = meta.get("shots", [])
    if not isinstance(shots, list):
        raise ModelFieldError("shots", f"must be a list, got {type(shots).__name__}")
    for i, shot in enumerate(shots):
        if (
            not isinstance(shot, dict)
            or set(shot) != set(SHOT_FIELDS)
            or not all(isinstance(v, str) for v in shot.values())
        ):
            raise ModelFieldError(
                "shots", f"entry {i} must hold exactly the strings {', '.join(SHOT_FIELDS)}"
            )


#: what each part of a method needs in the weights (tensor-name prefix, what it is)
def required_tensors(config) -> list[tuple[str, str]]:
    """(tensor-name prefix, what it is) for each part that ``config``'s method scores with."""
    if config.method == "btf":
        return [("bank.joint", "the joint bank")]
    need = [("mappers.", "the crossmodal mappers")]
    if config.replacement is not None or config.bank_novelty:
        need += [
            ("bank.rgb", "the RGB bank"),
            ("bank.keys", "the key bank"),
            ("bank.values", "the value bank"),
        ]
    if config.replacement == "attention":
        need.append(("retriever.", "the attention retriever"))
    return need


def check_method_tensors(config, names) -> None:
    """Raise :class:`ModelFieldError` when the weights lack a part the method needs."""
    names = list(names)
    for prefix, what in required_tensors(config):
        if not any(n == prefix or n.startswith(prefix) for n in names):
            raise ModelFieldError(
                "config",
                f"says method {config.method!r}, which needs {what} ({prefix}*), but the "
                "weights hold none: the folder mixes two models",
            )


def _expected_shapes(module_factory) -> dict[str, tuple[int, ...]]:
    """The state's tensor shapes of a module, built on the meta device (no memory, so huge
    dims in an edited model.json cost nothing before they are refused)."""
    import torch

    with torch.device("meta"):
        module = module_factory()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_weights(config, dims: dict[str, int], tensors: dict) -> None:
    """Refuse weights that would load but score wrongly or crash: a method tensor that is
    not float32 or not finite, mappers or retriever of other widths than ``dims``, banks of
    the wrong width or without rows, key and value banks of different lengths, and a
    missing or unusable standardisation. Raises ValueError naming the tensor."""
    import torch

    from cfr_core.models.mappers import CrossModalMappers
    from cfr_core.models.retriever import AttentionRetriever

    rgb, pts = dims["rgb"], dims["points"]
    for name, t in tensors.items():
        if name.split(".")[0] in ("mappers", "retriever", "bank", "norm"):
            if t.dtype != torch.float32:
                raise ValueError(f"tensor {name} is {t.dtype}; expected float32")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"tensor {name} holds NaN or infinite values")
    expected: dict[str, tuple[int, ...]] = {}
    if any(n.startswith("mappers.") for n in tensors):
        made = _expected_shapes(lambda: CrossModalMappers(rgb, pts, config.mappers))
        expected.update({f"mappers.{k}": v for k, v in made.items()})
    if any(n.startswith("retriever.") for n in tensors):
        r = config.retriever
        made = _expected_shapes(lambda: AttentionRetriever(pts, rgb, r.d_model, r.top_k))
        expected.update({f"retriever.{k}": v for k, v in made.items()})
    for name, want in expected.items():
        if name in tensors and tuple(tensors[name].shape) != want:
            raise ValueError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}, the widths in "
                f"model.json (rgb {rgb}, points {pts}) need {want}"
            )
    widths = {"bank.rgb": rgb, "bank.keys": pts, "bank.values": rgb, "bank.joint": rgb + pts}
    for name, width in widths.items():
        if name in tensors:
            shape = tuple(tensors[name].shape)
            if len(shape) != 2 or shape[1] != width or shape[0] == 0:
                raise ValueError(f"tensor {name} has shape {shape}; expected (rows > 0, {width})")
    if "bank.keys" in tensors and "bank.values" in tensors:
        k, v = tensors["bank.keys"].shape[0], tensors["bank.values"].shape[0]
        if k != v:
            raise ValueError(f"the key bank has {k} rows but the value bank {v}: pairs are lost")
    norm = {
        n: tensors.get(f"norm.{n}") for n in ("rgb_mean", "rgb_std", "points_mean", "points_std")
    }
    present = [n for n, t in norm.items() if t is not None]
    if config.extractors.standardized and len(present) < len(norm):
        missing = [f"norm.{n}" for n, t in norm.items() if t is None]
        raise ValueError(f"the config standardises features but {', '.join(missing)} is missing")
    if present and len(present) < len(norm):
        raise ValueError(f"the standardisation is incomplete (only {', '.join(present)})")
    for n, t in norm.items():
        if t is not None:
            width = rgb if n.startswith("rgb") else pts
            if tuple(t.shape) != (width,):
                raise ValueError(f"tensor norm.{n} has shape {tuple(t.shape)}; expected ({width},)")
            if n.endswith("std") and not bool((t > 0).all()):
                raise ValueError(f"tensor norm.{n} has values <= 0")


__all__ = [
    "FIELDS",
    "THETA_RANGE",
    "ModelFieldError",
    "check_method_tensors",
    "check_model_fields",
    "check_weights",
    "required_tensors",
]
