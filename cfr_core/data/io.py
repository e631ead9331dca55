"""Reading and writing the files of an MVTec 3D-AD style dataset.

Readers validate what they return (decodes, dtype, shape) and raise
:class:`~cfr_core.errors.DataError` naming the file; writers never leave a
half-written file behind (temp file in the same folder, then rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from cfr_core.errors import DataError

_HASH_CHUNK = 1 << 20
#: largest image / point cloud (pixels) any reader decodes; CFR_MAX_PIXELS overrides it
DEFAULT_MAX_PIXELS = 40_000_000
#: smallest side (pixels) of a usable scan: preprocessing fits the table plane on
#: 10-pixel border strips, which needs an interior
MIN_SCAN_SIDE = 32


def max_pixels() -> int:
    """The pixel cap: ``CFR_MAX_PIXELS`` or :data:`DEFAULT_MAX_PIXELS` (40 M, e.g. 6300×6300)."""
    raw = os.environ.get("CFR_MAX_PIXELS", "")
    try:
        value = int(raw) if raw else DEFAULT_MAX_PIXELS
    except ValueError:
        value = -1
    if value < 1:
        raise DataError(f"CFR_MAX_PIXELS={raw!r} is not a positive whole number of pixels")
    return value


def check_pixels(width: int, height: int, path: str | Path, what: str) -> None:
    """Refuse a header that announces more pixels than the cap, before decoding anything."""
    cap = max_pixels()
    if width * height > cap:
        raise DataError(
            f"{what} is {width}×{height} = {width * height:,} pixels, above the limit of {cap:,}",
            path,
            "scans are far smaller; if this one is real, raise CFR_MAX_PIXELS",
        )


def check_scan_size(height: int, width: int, path: str | Path | None) -> None:
    """The minimum scan size that fitting, scoring and `cfr data check` all apply."""
    if min(height, width) < MIN_SCAN_SIDE:
        raise DataError(
            f"scan is {width}×{height} pixels; at least {MIN_SCAN_SIDE}×{MIN_SCAN_SIDE} is needed",
            path,
            "export the full-resolution scan",
        )


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read file for hashing: {exc.strerror}", path) from exc
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    check_output_file(target)
    make_parent(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_file(target: Path) -> None:
    """Refuse a file output that is an existing folder (before any long work)."""
    if target.is_dir():
        raise DataError("is a folder; expected the path of a file to write", target)


def make_parent(target: Path) -> None:
    """Create ``target``'s parent folders, or say in one line why they cannot be."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise DataError(
            "cannot create the folder to write into: part of its path is a file",
            target.parent,
            "choose another output path",
        ) from exc


def check_output_folder(target: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing ``target`` unless ``overwrite`` (before any long work),
    and an output that is a symbolic link (replacing it would not replace what it points to)."""
    if target.is_symlink():
        raise DataError("output is a symbolic link", target, "give the real folder, or a new path")
    if target.exists() and not target.is_dir():
        raise DataError("output exists and is a file, not a folder", target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise DataError(
            "output folder exists and is not empty",
            target,
            "choose another folder or pass --overwrite",
        )


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``.

    A non-empty existing ``path`` is refused unless ``overwrite``; on any
    exception the temporary folder is deleted and ``path`` is untouched.
    """
    target = Path(path)
    check_output_folder(target, overwrite)
    make_parent(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual folder mode
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} file is missing", path, "check the path or re-copy the scan")
    if not path.is_file():
        raise DataError(f"{what} path is not a regular file", path)
    if path.stat().st_size == 0:
        raise DataError(f"{what} file is empty (0 bytes)", path, "re-copy the scan")


def load_image(path: str | Path, what: str, fix: str) -> Image.Image:
    """Open and fully decode an image file; a clear DataError when it is missing or corrupt."""
    path = Path(path)
    _require_file(path, what)
    try:
        with Image.open(path) as img:
            check_pixels(img.width, img.height, path, what)  # from the header, before decoding
            img.load()
            return img.copy()
    except Image.DecompressionBombError as exc:  # PIL refuses even to open it
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,}" if found else "too many"
        raise DataError(
            f"{what} header announces {count} pixels, above the limit of {max_pixels():,} "
            "(a decompression bomb)",
            path,
            "scans are far smaller; if this one is real, raise CFR_MAX_PIXELS",
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{what} does not decode ({exc})", path, fix) from exc


def read_rgb(path: str | Path) -> np.ndarray:
    """Read a colour image as uint8 H×W×3 (grey, palette and RGBA are converted)."""
    img = load_image(path, "RGB image", "re-export or re-copy the image")
    if img.mode not in ("RGB", "L", "RGBA", "P"):
        raise DataError(
            f"unsupported image mode {img.mode!r}; expected 8-bit colour",
            path,
            "save it as 8-bit RGB PNG",
        )
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DataError(f"RGB image has unusable shape {arr.shape}", path)
    return arr


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask PNG as a bool H×W array (any value > 0 is defect).

    Colour, palette and alpha masks are read by their grey level: a palette index or an
    opaque alpha channel is not a defect."""
    img = load_image(path, "ground-truth mask", "re-export the mask as PNG")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA").convert("RGB")  # the colours, without their opacity
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise DataError(f"mask has unusable shape {arr.shape}", path)
    return arr > 0


#: larger coordinates are not metres from a line scanner (they overflow the geometry maths)
MAX_COORDINATE = 1e4


def _check_xyz_header(tif: tifffile.TiffFile, path: Path) -> None:
    """Refuse, from the TIFF header alone, anything but one page of H×W×3 samples within
    the pixel cap: a multi-page or planar file would otherwise decode every page (50 M
    pixels from a 666 KB file) before its shape was seen."""
    pages = len(tif.pages)
    if pages != 1:
        raise DataError(
            f"point cloud TIFF holds {pages} pages; expected one page of H×W×3 coordinates",
            path,
            "export one organized point cloud per file",
        )
    shape = tuple(int(n) for n in (tif.series[0].shape if tif.series else ()))
    layout = "×".join(map(str, shape)) or "no image"
    if len(shape) == 3 and shape[2] == 3:
        check_pixels(shape[1], shape[0], path, "point cloud")
        return
    # another layout: the cap counts every sample the file would decode
    if shape and math.prod(shape) > 3 * max_pixels():
        raise DataError(
            f"point cloud TIFF announces {layout} = {math.prod(shape):,} samples, above the "
            f"limit of {max_pixels():,} pixels × 3 coordinates (nothing was decoded)",
            path,
            "scans are far smaller; if this one is real, raise CFR_MAX_PIXELS",
        )
    raise DataError(
        f"point cloud TIFF holds {layout} samples; expected H×W×3 (x, y, z interleaved per pixel)",
        path,
        "export the organized cloud as one float32 H×W×3 page (not planar, not a stack)",
    )


def read_xyz(path: str | Path) -> np.ndarray:
    """Read an organized point cloud TIFF as float32 H×W×3.

    Values are returned exactly as stored (NaN and inf included); use
    :func:`cfr_core.data.pointcloud.sanitize` to turn them into missing points.
    """
    path = Path(path)
    _require_file(path, "point cloud")
    try:
        with tifffile.TiffFile(path) as tif:
            _check_xyz_header(tif, path)  # every dimension, before decoding anything
            arr = tif.asarray(series=0)
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many unrelated types on corrupt input
        raise DataError(
            f"point cloud TIFF does not decode ({type(exc).__name__}: {exc})",
            path,
            "the file is probably truncated; re-copy it from the scanner",
        ) from exc
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"point cloud has shape {arr.shape}; expected H×W×3", path)
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DataError(f"point cloud has unusable shape {arr.shape}; expected H×W×3", path)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"point cloud has dtype {arr.dtype}; expected float32 metres", path)
    # the reach is read before the cast: a float64 coordinate beyond float32's range
    # would become inf there, i.e. a silently missing point
    with np.errstate(over="ignore", invalid="ignore"):
        reach = float(np.abs(arr[np.isfinite(arr)]).max(initial=0.0))
    if reach > MAX_COORDINATE:
        raise DataError(
            f"point cloud coordinates reach {reach:.3g}; expected metres, a part within "
            f"{MAX_COORDINATE:g} m of the sensor",
            path,
            "convert the scanner's export to metres (float32 H×W×3)",
        )
    return arr.astype(np.float32, copy=False)


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """Write uint8 H×W×3 as PNG, atomically."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"write_rgb expects uint8 H×W×3, got {rgb.dtype} {rgb.shape}", path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, "RGB").save(tmp, format="PNG")


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a bool/0-1 H×W mask as an 8-bit PNG with values 0 and 255, atomically."""
    if mask.ndim != 2:
        raise DataError(f"write_mask expects H×W, got {mask.shape}", path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), "L").save(tmp, format="PNG")


def write_xyz(path: str | Path, xyz: np.ndarray) -> None:
    """Write float H×W×3 as a float32 TIFF, atomically."""
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(f"write_xyz expects H×W×3, got {xyz.shape}", path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(xyz, dtype=np.float32), photometric="rgb")
