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


__all__ = [
    "FIELDS",
    "THETA_RANGE",
    "ModelFieldError",
    "check_method_tensors",
    "check_model_fields",
    "required_tensors",
]
