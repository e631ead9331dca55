"""Eyecandies → MVTec 3D-AD layout converter.

Eyecandies stores, per class and split, ``<Class>/<split>/data/<idx>_<item>``:
``image_0..5.png`` (six lightings), ``depth.png`` (16-bit, normalised),
``info_depth.yaml`` (``normalization: {min, max}``), ``pose.txt`` (4×4
camera-to-world) and, for ``test_public``, ``mask.png``.

The conversion (into a new folder; the source is only read):
* depth = min + png / 65535 · (max − min);
* back-projection with focal length 711.11 px and the principal point at the
  image centre ((W−1)/2, (H−1)/2), then the pose maps camera to world;
* background removal: the plane fitted by RANSAC to the border strips is zeroed
  (as in the MVTec preprocessing), so converted clouds hold only the part;
* ``image_4`` is the RGB; ``train`` → train/good, ``val`` → validation/good,
  ``test_public`` → test/good or test/bad by whether the mask has any defect
  pixel. ``test_private`` has no ground truth and is not converted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cfr_core.data.io import (
    atomic_folder,
    load_image,
    read_mask,
    read_rgb,
    write_mask,
    write_rgb,
    write_xyz,
)
from cfr_core.data.mvtec import is_safe_name
from cfr_core.data.pointcloud import PreprocessConfig, remove_background_plane
from cfr_core.errors import DataError, DatasetLayoutError

log = logging.getLogger(__name__)

FOCAL_LENGTH_PX = 711.11
RGB_IMAGE = "image_4"
SPLIT_MAP = {"train": "train", "val": "validation", "test_public": "test"}
_ITEM = re.compile(r"^(?P<idx>\d+)_(?P<item>[A-Za-z0-9_]+)\.(?P<ext>png|yaml|txt)$")


@dataclass(frozen=True)
class EyecandiesSample:
    cls: str
    split: str
    idx: str
    folder: Path

    def path(self, item: str, ext: str = "png") -> Path:
        return self.folder / f"{self.idx}_{item}.{ext}"


def read_depth(png: Path, info_yaml: Path) -> np.ndarray:
    """De-normalised depth (float64 H×W) from a 16-bit PNG and its ``info_depth.yaml``."""
    raw = np.asarray(load_image(png, "depth image", "re-copy it from the dataset"))
    if raw.ndim != 2 or raw.dtype not in (np.uint16, np.int32, np.uint8):
        raise DataError(
            f"depth image must be single-channel 16-bit, got {raw.dtype} {raw.shape}", png
        )
    if not info_yaml.is_file():
        raise DataError(
            "depth normalisation file is missing", info_yaml, "it comes with the dataset"
        )
    try:
        info = yaml.safe_load(info_yaml.read_text())
        lo, hi = float(info["normalization"]["min"]), float(info["normalization"]["max"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise DataError("expected 'normalization: {min: .., max: ..}'", info_yaml) from exc
    if not hi > lo:
        raise DataError(f"normalization max ({hi}) must exceed min ({lo})", info_yaml)
    scale = 65535.0 if raw.dtype != np.uint8 else 255.0
    return lo + raw.astype(np.float64) / scale * (hi - lo)


def read_pose(path: Path) -> np.ndarray:
    """4×4 camera-to-world matrix from ``pose.txt``."""
    try:
        pose = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise DataError(f"pose does not parse ({exc})", path) from exc
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        raise DataError(f"pose must be a finite 4×4 matrix, got shape {pose.shape}", path)
    return pose


def back_project(depth: np.ndarray, pose: np.ndarray, focal: float = FOCAL_LENGTH_PX) -> np.ndarray:
    """Organized world points (float32 H×W×3) from a depth map; depth <= 0 gives (0, 0, 0)."""
    h, w = depth.shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cam = np.stack([(cols - cx) * depth / focal, (rows - cy) * depth / focal, depth], axis=-1)
    world = cam @ pose[:3, :3].T + pose[:3, 3]
    world[~(depth > 0)] = 0.0
    return world.astype(np.float32)


def list_samples(src: Path, cls: str, split: str) -> list[EyecandiesSample]:
    folder = src / cls / split / "data"
    if not folder.is_dir():
        return []
    ids = sorted({m.group("idx") for p in folder.iterdir() if (m := _ITEM.match(p.name))})
    return [EyecandiesSample(cls, split, i, folder) for i in ids]


def list_classes(src: Path) -> list[str]:
    if not src.is_dir():
        raise DatasetLayoutError("Eyecandies root is not a folder", src)
    classes = sorted(
        p.name
        for p in src.iterdir()
        if p.is_dir() and any((p / s / "data").is_dir() for s in SPLIT_MAP)
    )
    if not classes:
        raise DatasetLayoutError(
            "no Eyecandies classes found (expected <Class>/train/data/000_image_4.png ...)", src
        )
    return classes


def convert_sample(sample: EyecandiesSample, config: PreprocessConfig | None = None):
    """(rgb, xyz, mask or None) for one Eyecandies sample."""
    rgb = read_rgb(sample.path(RGB_IMAGE))
    depth = read_depth(sample.path("depth"), sample.path("info_depth", "yaml"))
    if depth.shape != rgb.shape[:2]:
        raise DataError(
            f"depth {depth.shape} and {RGB_IMAGE} {rgb.shape[:2]} differ", sample.path("depth")
        )
    xyz = back_project(depth, read_pose(sample.path("pose", "txt")))
    xyz, _, _ = remove_background_plane(xyz, config)
    mask = read_mask(sample.path("mask")) if sample.split == "test_public" else None
    if mask is not None and mask.shape != rgb.shape[:2]:
        raise DataError(f"mask {mask.shape} and RGB {rgb.shape[:2]} differ", sample.path("mask"))
    return rgb, xyz, mask


def convert(
    src: str | Path,
    out: str | Path,
    classes: list[str] | None = None,
    overwrite: bool = False,
    config: PreprocessConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert an Eyecandies tree to the MVTec 3D-AD layout in ``out`` (atomically)."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve() or src.resolve() in out.resolve().parents:
        raise DataError("output must not be inside the source dataset", out)
    names = classes or list_classes(src)
    for name in names:
        if not is_safe_name(name):
            raise DatasetLayoutError("unsafe class folder name", src / name)
    jobs = [(c, s) for c in names for split in SPLIT_MAP for s in list_samples(src, c, split)]
    if not jobs:
        raise DatasetLayoutError("no samples found for the requested classes", src)
    with atomic_folder(out, overwrite) as tmp:
        for n, (cls, sample) in enumerate(jobs):
            rgb, xyz, mask = convert_sample(sample, config)
            split = SPLIT_MAP[sample.split]
            defect = "good" if mask is None or not mask.any() else "bad"
            folder = tmp / cls / split / defect
            write_rgb(folder / "rgb" / f"{sample.idx}.png", rgb)
            write_xyz(folder / "xyz" / f"{sample.idx}.tiff", xyz)
            if mask is not None:
                write_mask(folder / "gt" / f"{sample.idx}.png", mask)
            if progress is not None:
                progress(n + 1, len(jobs))
    log.info("converted %d Eyecandies samples from %s to %s", len(jobs), src, out)
    return out
