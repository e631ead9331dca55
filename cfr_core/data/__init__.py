"""Datasets: MVTec 3D-AD / Eyecandies readers, point-cloud preprocessing, few-shot
selection, validation and a synthetic MVTec-3D-layout generator."""

from cfr_core.data.fewshot import DEFAULT_FEWSHOT_SEED, ShotSelection, select_shots
from cfr_core.data.io import (
    read_mask,
    read_rgb,
    read_xyz,
    sha256_file,
    write_mask,
    write_rgb,
    write_xyz,
)
from cfr_core.data.mvtec import GOOD, SPLITS, CategoryIndex, Sample, index_category, list_categories
from cfr_core.data.pointcloud import (
    PreprocessConfig,
    PreprocessResult,
    pad_to_square,
    preprocess,
    resize_nearest,
    sanitize,
    valid_mask,
)
from cfr_core.data.validate import Problem, check_category, check_dataset, check_sample

__all__ = [
    "DEFAULT_FEWSHOT_SEED",
    "GOOD",
    "SPLITS",
    "CategoryIndex",
    "PreprocessConfig",
    "PreprocessResult",
    "Problem",
    "Sample",
    "ShotSelection",
    "check_category",
    "check_dataset",
    "check_sample",
    "index_category",
    "list_categories",
    "pad_to_square",
    "preprocess",
    "read_mask",
    "read_rgb",
    "read_xyz",
    "resize_nearest",
    "sanitize",
    "select_shots",
    "sha256_file",
    "valid_mask",
    "write_mask",
    "write_rgb",
    "write_xyz",
]
