"""MVTec 3D-AD layout: indexing categories and loading samples.

Layout (also produced by the Eyecandies converter and the synthetic generator)::

    <root>/<category>/train/good/{rgb/*.png, xyz/*.tiff}
    <root>/<category>/validation/good/{rgb, xyz}
    <root>/<category>/test/<good|defect type>/{rgb, xyz, gt}

A sample is the pair of files sharing a stem in ``rgb/`` and ``xyz/``; defect
samples also have ``gt/<stem>.png``. Defect types are whatever folders exist
under ``test/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cfr_core.data.io import read_mask, read_rgb, read_xyz
from cfr_core.errors import DatasetLayoutError, EmptyCategoryError, ShapeMismatchError
from cfr_core.paths import check_name, is_safe_name, refuse_symlink

SPLITS = ("train", "validation", "test")
GOOD = "good"
RGB_SUFFIXES = (".png",)
XYZ_SUFFIXES = (".tiff", ".tif")
MASK_SUFFIXES = (".png",)


@dataclass(frozen=True)
class Sample:
    """One scan: an RGB image and its organized point cloud (and mask for defects)."""

    category: str
    split: str
    defect: str
    stem: str
    rgb_path: Path
    xyz_path: Path
    gt_path: Path | None = None

    @property
    def label(self) -> int:
        """0 for good parts, 1 for defective ones."""
        return 0 if self.defect == GOOD else 1

    @property
    def key(self) -> str:
        return f"{self.category}/{self.split}/{self.defect}/{self.stem}"

    def load_rgb(self) -> np.ndarray:
        return read_rgb(self.rgb_path)

    def load_xyz(self) -> np.ndarray:
        return read_xyz(self.xyz_path)

    def load_mask(self) -> np.ndarray:
        """Bool H×W ground truth; all False for good samples without a mask file."""
        if self.gt_path is None:
            if self.label == 1:
                raise DatasetLayoutError("defect sample has no ground-truth mask", self.rgb_path)
            h, w = self.load_rgb().shape[:2]
            return np.zeros((h, w), dtype=bool)
        return read_mask(self.gt_path)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rgb uint8 H×W×3, xyz float32 H×W×3, mask bool H×W), sizes checked."""
        rgb, xyz = self.load_rgb(), self.load_xyz()
        if rgb.shape[:2] != xyz.shape[:2]:
            raise ShapeMismatchError(
                f"RGB is {rgb.shape[1]}×{rgb.shape[0]} but point cloud is {xyz.shape[1]}×{xyz.shape[0]}",
                self.xyz_path,
                "RGB and xyz must come from the same scan",
            )
        if self.gt_path is None:
            mask = np.zeros(rgb.shape[:2], dtype=bool)
        else:
            mask = read_mask(self.gt_path)
            if mask.shape != rgb.shape[:2]:
                raise ShapeMismatchError(
                    f"mask is {mask.shape[1]}×{mask.shape[0]} but RGB is {rgb.shape[1]}×{rgb.shape[0]}",
                    self.gt_path,
                )
        return rgb, xyz, mask


@dataclass
class LayoutIssue:
    """A problem found while indexing (an orphan file, an unsafe name, ...)."""

    path: Path
    reason: str


@dataclass
class CategoryIndex:
    """All samples of one category, by split, plus what could not be paired."""

    root: Path
    category: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    issues: list[LayoutIssue] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        return self.samples.get(name, [])

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect for s in self.split("test") if s.defect != GOOD})

    def all_samples(self) -> list[Sample]:
        return [s for split in SPLITS for s in self.split(split)]

    def require_train(self) -> list[Sample]:
        train = self.split("train")
        if not train:
            raise EmptyCategoryError(
                "no train/good samples (rgb/*.png with matching xyz/*.tiff)",
                self.root / self.category / "train" / GOOD,
            )
        return train


def manifest_samples(manifest: dict) -> list[Sample]:
    """The shots a pipeline ``shots.json`` manifest records, as train/good samples."""
    return [
        Sample(
            manifest["category"], "train", GOOD, s["stem"], Path(s["rgb_path"]), Path(s["xyz_path"])
        )
        for s in manifest["shots"]
    ]


def list_categories(root: str | Path) -> list[str]:
    """Category folders under ``root`` (those with a ``train`` or ``test`` folder), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(
            "dataset root is not a folder", root, "pass the folder holding the categories"
        )
    found = sorted(
        p.name for p in root.iterdir() if p.is_dir() and any((p / s).is_dir() for s in SPLITS)
    )
    if not found:
        raise DatasetLayoutError(
            "no category folders found (expected <root>/<category>/train/good/rgb ...)", root
        )
    return found


def _files_by_stem(
    folder: Path, suffixes: tuple[str, ...], issues: list[LayoutIssue]
) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if folder.is_symlink():
        issues.append(LayoutIssue(folder, "symbolic link refused (copy the folder itself in)"))
        return out
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # hidden files (editor swap files, our own temp files)
        if path.is_symlink():
            issues.append(LayoutIssue(path, "symbolic link refused (copy the file itself in)"))
            continue
        if path.suffix.lower() not in suffixes or not path.is_file():
            issues.append(
                LayoutIssue(
                    path, f"unexpected entry in {folder.name}/ (expected {'/'.join(suffixes)})"
                )
            )
            continue
        if not is_safe_name(path.stem):
            issues.append(
                LayoutIssue(path, "unsafe file name (use letters, digits, '.', '_', '-')")
            )
            continue
        if path.stem in out:
            issues.append(
                LayoutIssue(path, f"duplicate stem {path.stem!r} (also {out[path.stem].name})")
            )
            continue
        out[path.stem] = path
    return out


def _index_defect_folder(
    root: Path, category: str, split: str, defect: str, issues: list[LayoutIssue]
) -> list[Sample]:
    folder = root / category / split / defect
    rgb = _files_by_stem(folder / "rgb", RGB_SUFFIXES, issues)
    xyz = _files_by_stem(folder / "xyz", XYZ_SUFFIXES, issues)
    gt = _files_by_stem(folder / "gt", MASK_SUFFIXES, issues) if split == "test" else {}
    for stem in sorted(set(rgb) - set(xyz)):
        issues.append(
            LayoutIssue(rgb[stem], f"RGB image has no point cloud (missing xyz/{stem}.tiff)")
        )
    for stem in sorted(set(xyz) - set(rgb)):
        issues.append(
            LayoutIssue(xyz[stem], f"point cloud has no RGB image (missing rgb/{stem}.png)")
        )
    samples = []
    for stem in sorted(set(rgb) & set(xyz)):
        gt_path = gt.get(stem)
        if defect != GOOD and gt_path is None:
            issues.append(
                LayoutIssue(rgb[stem], f"defect sample has no mask (missing gt/{stem}.png)")
            )
            continue
        samples.append(Sample(category, split, defect, stem, rgb[stem], xyz[stem], gt_path))
    if not rgb and not xyz:
        issues.append(LayoutIssue(folder, "folder holds no rgb/ + xyz/ pairs"))
    return samples


def index_category(root: str | Path, category: str) -> CategoryIndex:
    """Index every sample of ``category``; layout problems are collected, not raised.

    Raises :class:`DatasetLayoutError` only when the category folder itself is missing.
    """
    root = Path(root)
    cat_dir = root / check_name(category)
    refuse_symlink(cat_dir, "category folder")
    if not cat_dir.is_dir():
        raise DatasetLayoutError(
            f"category {category!r} not found",
            cat_dir,
            f"available: {', '.join(list_categories(root))}",
        )
    index = CategoryIndex(root=root, category=category)
    for split in SPLITS:
        split_dir = cat_dir / split
        if split_dir.is_symlink():
            index.issues.append(LayoutIssue(split_dir, "symbolic link refused"))
            continue
        if not split_dir.is_dir():
            if split != "validation":
                index.issues.append(LayoutIssue(split_dir, f"missing {split}/ folder"))
            continue
        defects = sorted(
            p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        samples: list[Sample] = []
        for defect in defects:
            if not is_safe_name(defect):
                index.issues.append(LayoutIssue(split_dir / defect, "unsafe folder name"))
                continue
            if (split_dir / defect).is_symlink():
                index.issues.append(LayoutIssue(split_dir / defect, "symbolic link refused"))
                continue
            if split != "test" and defect != GOOD:
                index.issues.append(
                    LayoutIssue(
                        split_dir / defect, f"{split}/ may only hold good/ (normal samples)"
                    )
                )
                continue
            samples += _index_defect_folder(root, category, split, defect, index.issues)
        index.samples[split] = samples
    return index
