"""Preprocess a whole MVTec 3D-AD style tree into a new folder (inputs are never written)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cfr_core.data.io import atomic_folder, check_scan_size, write_mask, write_rgb, write_xyz
from cfr_core.data.mvtec import index_category, list_categories
from cfr_core.data.pointcloud import PreprocessConfig, pad_to_square, preprocess
from cfr_core.errors import DataError, DatasetLayoutError


def preprocess_tree(
    root: str | Path,
    out: str | Path,
    categories: list[str] | None = None,
    config: PreprocessConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Apply :func:`~cfr_core.data.pointcloud.preprocess` to every sample of ``root``.

    Layout problems (orphan files, missing masks) stop the run before anything is
    written: run ``cfr data check`` to list them.
    """
    cfg = config or PreprocessConfig()
    root, out = Path(root), Path(out)
    if root.resolve() == out.resolve():
        raise DataError(
            "output must differ from the input dataset (preprocessing never writes in place)", out
        )
    samples = []
    for cat in categories or list_categories(root):
        index = index_category(root, cat)
        if index.issues:
            first = index.issues[0]
            raise DatasetLayoutError(
                f"{first.reason} ({len(index.issues)} layout problem(s) in {cat})",
                first.path,
                f"run `cfr data check {root} -c {cat}`",
            )
        samples += index.all_samples()
    with atomic_folder(out, overwrite) as tmp:
        for n, sample in enumerate(samples):
            rgb, xyz, mask = sample.load()
            try:
                check_scan_size(*xyz.shape[:2], None)  # the minimum every other door applies
                result = preprocess(xyz, rgb, cfg)
            except DataError as exc:
                raise DataError(exc.reason, sample.xyz_path, exc.fix) from exc
            folder = tmp / sample.category / sample.split / sample.defect
            write_rgb(folder / "rgb" / sample.rgb_path.name, result.rgb)
            write_xyz(folder / "xyz" / f"{sample.stem}.tiff", result.xyz)
            if sample.gt_path is not None:
                write_mask(
                    folder / "gt" / sample.gt_path.name, pad_to_square(mask, cfg.pad_multiple)
                )
            if progress is not None:
                progress(n + 1, len(samples))
        (tmp / "preprocess.json").write_text(
            json.dumps({"source": str(root.resolve()), "config": asdict(cfg)}, indent=2) + "\n"
        )
    return out
