"""From raw files to the square, preprocessed scan that every extractor reads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfr_core.data.io import check_scan_size
from cfr_core.data.mvtec import Sample
from cfr_core.data.pointcloud import PreprocessConfig, pad_to_square, preprocess
from cfr_core.errors import DataError


@dataclass(frozen=True)
class PreparedScan:
    """A preprocessed scan: RGB and cloud padded to the same square, plus the table plane.

    ``mask`` is the ground truth padded like the images (all False for good parts).
    ``plane`` is (unit normal (3,), offset) of the removed table, or None when the
    cloud had no table left to fit (already background-free).
    ``surface`` is the cloud the quality gate's shape check reads: the table cleared only
    down to its own noise, so a thin part keeps its lower surface
    (:func:`cfr_core.data.pointcloud.preprocess`); None where a caller built the scan
    without it (``surface=False``), and such a scan gives no shape map: feature
    extraction refuses it rather than read the 5 mm cloud.
    """

    rgb: np.ndarray  # uint8 S×S×3
    xyz: np.ndarray  # float32 S×S×3, zeros = missing or removed
    mask: np.ndarray  # bool S×S
    plane: tuple[np.ndarray, float] | None
    key: str = ""
    surface: np.ndarray | None = None  # float32 S×S×3 like xyz


def prepare_arrays(
    rgb: np.ndarray,
    xyz: np.ndarray,
    mask: np.ndarray | None = None,
    config: PreprocessConfig | None = None,
    key: str = "",
    surface: bool = True,
) -> PreparedScan:
    """The prepared scan of the arrays; ``surface=False`` skips the surface view (one cluster
    step less) where only the method's cloud or the RGB image is read."""
    cfg = config or PreprocessConfig()
    check_scan_size(*xyz.shape[:2], None)
    result = preprocess(xyz, rgb, cfg, surface=surface)
    if mask is None:
        padded_mask = np.zeros(result.xyz.shape[:2], dtype=bool)
    else:
        padded_mask = pad_to_square(mask.astype(bool), cfg.pad_multiple)
    plane = None if result.plane is None else (result.plane.normal, result.plane.offset)
    return PreparedScan(
        rgb=result.rgb,
        xyz=result.xyz,
        mask=padded_mask,
        plane=plane,
        key=key,
        surface=result.surface,
    )


def prepare_sample(
    sample: Sample, config: PreprocessConfig | None = None, surface: bool = True
) -> PreparedScan:
    """Load and preprocess one sample; errors name the sample's xyz file."""
    rgb, xyz, mask = sample.load()
    try:
        return prepare_arrays(rgb, xyz, mask, config, key=sample.key, surface=surface)
    except DataError as exc:
        if exc.path is not None:
            raise
        raise DataError(exc.reason, sample.xyz_path, exc.fix) from exc
