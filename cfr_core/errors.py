"""Exceptions raised by cfr_core.

Every error names what was wrong and, where possible, the file involved and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


class CFRError(Exception):
    """Base class of all errors raised by cfr_core."""


class DataError(CFRError):
    """Bad input data: a missing, unreadable or malformed file, or an unusable dataset."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.path = Path(path) if path is not None else None
        self.reason = message
        self.fix = fix
        text = f"{self.path}: {message}" if self.path is not None else message
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class DatasetLayoutError(DataError):
    """A dataset folder does not follow the expected MVTec 3D-AD / Eyecandies layout."""


class EmptyCategoryError(DataError):
    """A category or split holds no usable samples."""


class ShapeMismatchError(DataError):
    """Arrays that must agree in shape do not (RGB vs xyz vs mask, maps vs masks)."""


class UnsafePathError(DataError):
    """A name or path from a user or a file that would leave its root, or a symbolic link."""


class ConfigError(CFRError, ValueError):
    """An invalid configuration value."""


class MetricError(CFRError, ValueError):
    """Inputs for which a metric is undefined (one class only, mismatched shapes, NaN)."""


def finite_number(value: Any, what: str, or_null: bool = False) -> float | None:
    """``value`` read from a JSON file as a finite number (not a bool, not a string), or
    None where ``or_null`` allows it; otherwise a ValueError naming ``what``."""
    if value is None and or_null:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        kind = "a finite number or null" if or_null else "a finite number"
        raise ValueError(f"{what} must be {kind}, got {value!r}")
    return float(value)
