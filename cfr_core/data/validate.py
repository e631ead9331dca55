"""Validation of every file of an MVTec 3D-AD style dataset.

``check_sample`` opens each file of one sample and reports every problem it
finds (not only the first); ``check_dataset`` does so for whole categories and
adds the layout problems found while indexing. Errors make a dataset unusable;
warnings (a few NaN points, a mask on a good sample) are reported but tolerated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfr_core.data.io import check_scan_size, read_mask, read_rgb, read_xyz
from cfr_core.data.mvtec import GOOD, SPLITS, Sample, index_category, list_categories
from cfr_core.data.pointcloud import valid_mask
from cfr_core.errors import DataError

ERROR = "error"
WARNING = "warning"

#: a cloud with fewer valid (measured, finite, non-zero) points than this share is unusable
DEFAULT_MIN_VALID_FRACTION = 0.01


@dataclass(frozen=True)
class Problem:
    path: Path
    severity: str
    reason: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7s} {self.path}: {self.reason}"


@dataclass(frozen=True)
class SampleStats:
    """What a valid sample looks like (used for the check summary)."""

    height: int
    width: int
    valid_fraction: float


def _load(reader: Callable, path: Path, problems: list[Problem]):
    try:
        return reader(path)
    except DataError as exc:
        problems.append(Problem(path, ERROR, exc.reason + (f" ({exc.fix})" if exc.fix else "")))
        return None


def check_xyz_values(xyz: np.ndarray, path: Path, min_valid_fraction: float) -> list[Problem]:
    """Problems in the values of a decoded cloud: NaN/inf, too few measured points."""
    problems: list[Problem] = []
    n_pix = xyz.shape[0] * xyz.shape[1]
    if n_pix == 0:
        return [Problem(path, ERROR, f"the cloud has no point (shape {xyz.shape})")]
    finite = np.isfinite(xyz)
    n_nonfinite = int((~finite.all(axis=2)).sum())
    valid = valid_mask(xyz)
    frac = float(valid.sum()) / n_pix
    if n_nonfinite == n_pix:
        problems.append(
            Problem(path, ERROR, "every point is NaN/inf: the scan holds no measurement")
        )
        return problems
    if n_nonfinite:
        problems.append(
            Problem(
                path, WARNING, f"{n_nonfinite} of {n_pix} points are NaN/inf (treated as missing)"
            )
        )
    if valid.sum() == 0:
        problems.append(Problem(path, ERROR, "all points are zero: the scan holds no measurement"))
    elif frac < min_valid_fraction:
        problems.append(
            Problem(
                path,
                ERROR,
                f"only {frac:.2%} of points are valid (minimum {min_valid_fraction:.2%}); re-scan the part",
            )
        )
    return problems


def check_scan_arrays(
    rgb: np.ndarray | None,
    xyz: np.ndarray,
    rgb_path: Path,
    xyz_path: Path,
    min_valid_fraction: float,
) -> list[Problem]:
    """What the landing folder and `cfr data check` ask of a decoded scan: the cloud's
    values, the minimum size, and RGB and cloud of the same size (fit, evaluate, score and
    serve apply the same minimum size in :func:`cfr_core.data.prepare.prepare_arrays`, and
    refuse mismatched sizes and unusable clouds there)."""
    problems = check_xyz_values(xyz, xyz_path, min_valid_fraction)
    try:
        check_scan_size(*xyz.shape[:2], xyz_path)
    except DataError as exc:
        problems.append(Problem(xyz_path, ERROR, exc.reason))
    if rgb is not None and rgb.shape[:2] != xyz.shape[:2]:
        problems.append(
            Problem(
                xyz_path,
                ERROR,
                f"size {xyz.shape[1]}×{xyz.shape[0]} differs from RGB {rgb.shape[1]}×"
                f"{rgb.shape[0]} ({rgb_path.name}); both must come from the same scan",
            )
        )
    return problems


def check_sample(
    sample: Sample, min_valid_fraction: float = DEFAULT_MIN_VALID_FRACTION
) -> tuple[list[Problem], SampleStats | None]:
    """Open every file of ``sample``; return all problems and, if usable, its stats."""
    problems: list[Problem] = []
    rgb = _load(read_rgb, sample.rgb_path, problems)
    xyz = _load(read_xyz, sample.xyz_path, problems)
    mask = _load(read_mask, sample.gt_path, problems) if sample.gt_path is not None else None
    if xyz is not None:  # rgb None: it did not load, and that problem is listed
        problems += check_scan_arrays(
            rgb, xyz, sample.rgb_path, sample.xyz_path, min_valid_fraction
        )
    if mask is not None and rgb is not None and mask.shape != rgb.shape[:2]:
        problems.append(
            Problem(
                sample.gt_path,
                ERROR,
                f"mask size {mask.shape[1]}×{mask.shape[0]} differs from RGB {rgb.shape[1]}×{rgb.shape[0]}",
            )
        )
    if mask is not None and sample.label == 1 and not mask.any():
        problems.append(Problem(sample.gt_path, WARNING, "defect sample has an empty mask"))
    if mask is not None and sample.defect == GOOD and mask.any():
        problems.append(Problem(sample.gt_path, WARNING, "good sample has a non-empty defect mask"))
    stats = None
    if rgb is not None and xyz is not None and not any(p.severity == ERROR for p in problems):
        stats = SampleStats(rgb.shape[0], rgb.shape[1], float(valid_mask(xyz).mean()))
    return problems, stats


@dataclass
class CategoryReport:
    category: str
    n_samples: dict[str, int]
    defect_types: list[str]
    problems: list[Problem]
    sizes: set[tuple[int, int]]
    mean_valid_fraction: float

    @property
    def n_errors(self) -> int:
        return sum(p.severity == ERROR for p in self.problems)

    @property
    def n_warnings(self) -> int:
        return sum(p.severity == WARNING for p in self.problems)


def check_category(
    root: str | Path,
    category: str,
    min_valid_fraction: float = DEFAULT_MIN_VALID_FRACTION,
    progress: Callable[[int, int], None] | None = None,
) -> CategoryReport:
    """Validate every file of one category (layout and contents).

    A category that cannot be opened at all (an unsafe folder name, a symbolic link)
    is one error of its report, so that the other categories are still checked.
    """
    try:
        index = index_category(root, category)
    except DataError as exc:
        where = exc.path if exc.path is not None else Path(root) / category
        return CategoryReport(
            category, dict.fromkeys(SPLITS, 0), [], [Problem(where, ERROR, exc.reason)], set(), 0.0
        )
    problems = [Problem(i.path, ERROR, i.reason) for i in index.issues]
    samples = index.all_samples()
    sizes: set[tuple[int, int]] = set()
    fractions = []
    for i, sample in enumerate(samples):
        found, stats = check_sample(sample, min_valid_fraction)
        problems += found
        if stats is not None:
            sizes.add((stats.height, stats.width))
            fractions.append(stats.valid_fraction)
        if progress is not None:
            progress(i + 1, len(samples))
    if not index.split("train"):
        problems.append(
            Problem(
                Path(root) / category / "train" / GOOD,
                ERROR,
                "no train/good samples: nothing to learn from",
            )
        )
    if not index.split("test"):
        problems.append(
            Problem(Path(root) / category / "test", WARNING, "no test samples: cannot evaluate")
        )
    return CategoryReport(
        category=category,
        n_samples={s: len(index.split(s)) for s in ("train", "validation", "test")},
        defect_types=index.defect_types,
        problems=problems,
        sizes=sizes,
        mean_valid_fraction=float(np.mean(fractions)) if fractions else 0.0,
    )


def check_dataset(
    root: str | Path,
    categories: Iterable[str] | None = None,
    min_valid_fraction: float = DEFAULT_MIN_VALID_FRACTION,
) -> list[CategoryReport]:
    """Validate the given categories (all categories under ``root`` by default)."""
    cats = list(categories) if categories else list_categories(root)
    return [check_category(root, c, min_valid_fraction) for c in cats]
