"""Names and paths that come from users or files, checked once, in one place.

Every category name and content id that reaches a path (CLI arguments, landing
folder names, registry rows, shot records) goes through :func:`check_name` or
:func:`check_content_id`; every path built from them goes through
:func:`inside` before anything is read, copied or deleted; symbolic links inside
the data and landing roots are refused (:func:`refuse_symlink`), so no file
from outside a root can enter the shot library or a model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cfr_core.errors import UnsafePathError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONTENT_ID = re.compile(r"^[0-9a-f]{20}$")
MAX_NAME = 120


def is_safe_name(name: str) -> bool:
    """A folder or file stem we accept: letters, digits, '.', '_', '-', no leading dot, no '..'."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_NAME
        and bool(_SAFE_NAME.fullmatch(name))
        and ".." not in name
    )


def check_name(name: str, what: str = "category") -> str:
    """``name`` if it is safe to use as one path component; else a clear error."""
    if not is_safe_name(name):
        raise UnsafePathError(
            f"unsafe {what} name {name!r}",
            fix=f"use letters, digits, '.', '_' and '-' (at most {MAX_NAME}, not starting with "
            "a dot, no '..')",
        )
    return name


def check_content_id(content_id: str) -> str:
    """A shot library id: 20 lowercase hex digits (what `cfr shots quarantine` lists)."""
    if not isinstance(content_id, str) or not _CONTENT_ID.fullmatch(content_id):
        raise UnsafePathError(
            f"{content_id!r} is not a scan id",
            fix="ids are 20 hex digits; list them with `cfr shots quarantine`",
        )
    return content_id


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved, after checking that it lies under ``root`` (both resolved).

    Raises :class:`UnsafePathError` naming the path when it escapes the root,
    through ``..`` or a symbolic link.
    """
    root_r = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != root_r and root_r not in resolved.parents:
        raise UnsafePathError(f"path leaves its root {root_r}", path)
    return resolved


def refuse_symlink(path: str | Path, what: str = "file") -> Path:
    """``path`` unless it is a symbolic link (which could pull bytes from outside the root)."""
    p = Path(path)
    if p.is_symlink():
        raise UnsafePathError(
            f"{what} is a symbolic link (to {os.readlink(p)}); links are refused",
            p,
            "copy the file itself into the folder",
        )
    return p
