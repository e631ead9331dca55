"""Feature extraction for a list of samples, with an on-disk cache.

Features are rounded through float16 whether they come from the cache or not,
so a cached run and a fresh run give bit-identical results. The cache key is
(extractor lineage id, preprocessing settings, sha256 of the RGB and xyz files),
so a changed file, setting or weight never reuses a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from cfr_core.config import ExtractorConfig
from cfr_core.data.io import atomic_path, sha256_file
from cfr_core.data.mvtec import Sample
from cfr_core.data.pointcloud import PreprocessConfig, pad_to_square, resize_nearest
from cfr_core.data.prepare import PreparedScan, prepare_sample
from cfr_core.engine.surface import SHAPE_SETTINGS, shape_grid
from cfr_core.features.base import Extractor, create_extractor

log = logging.getLogger(__name__)

#: the feature cache's name for the shape maps: every setting they depend on, so a changed
#: setting (or SHAPE_VERSION, which counts changes to the computation) never reuses an entry
SHAPE_ID = "shape " + json.dumps(SHAPE_SETTINGS, sort_keys=True)


@dataclass
class FeatureSet:
    """Per-pixel features of B samples on a G×G grid."""

    rgb: torch.Tensor  # B×Cr×G×G
    points: torch.Tensor  # B×C3×G×G
    masks: torch.Tensor  # B×G×G bool ground truth (all False for good parts)
    keys: list[str]
    # B×3×G×G: the scan's own colour (RGB in [0, 1], area-averaged onto the grid), which the
    # quality gate's colour check reads (None where a caller built features without it)
    colour: torch.Tensor | None = None
    # B×2×G×G: the surface's principal curvatures (1/mm; NaN where the cloud cannot tell,
    # :mod:`cfr_core.engine.surface`), which the quality gate's shape check reads
    shape: torch.Tensor | None = None

    @property
    def foreground(self) -> torch.Tensor:
        """B×G×G: pixels whose 3D feature is non-zero."""
        return self.points.abs().sum(dim=1) > 0

    def __len__(self) -> int:
        return self.rgb.shape[0]

    def select(self, idx: Sequence[int]) -> FeatureSet:
        i = list(idx)
        colour = None if self.colour is None else self.colour[i]
        shape = None if self.shape is None else self.shape[i]
        return FeatureSet(
            self.rgb[i], self.points[i], self.masks[i], [self.keys[j] for j in i], colour, shape
        )


def build_extractors(config: ExtractorConfig) -> tuple[Extractor, Extractor]:
    rgb = create_extractor(config.rgb, grid=config.grid, **config.rgb_options)
    pts = create_extractor(config.points, grid=config.grid, **config.points_options)
    if rgb.modality != "rgb" or pts.modality != "points":
        raise ValueError(
            f"extractor modalities are {rgb.modality!r}/{pts.modality!r}; expected rgb/points"
        )
    return rgb, pts


class FeatureCache:
    """Safetensors files under ``root``, one per (sample files, extractor, preprocessing)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def file_hashes(sample: Sample) -> tuple[str, str]:
        """sha256 of the sample's RGB and xyz files (hash once, key both extractors)."""
        return sha256_file(sample.rgb_path), sha256_file(sample.xyz_path)

    def key(
        self, files: tuple[str, str], extractor: Extractor | str, preprocess: PreprocessConfig
    ) -> str:
        """The entry of one extractor's features of the files (or, for a string, of what
        that string names, such as :data:`SHAPE_ID`)."""
        blob = json.dumps(
            {
                "extractor": extractor if isinstance(extractor, str) else extractor.lineage_id,
                "preprocess": asdict(preprocess),
                "rgb": files[0],
                "xyz": files[1],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    @staticmethod
    def digest(key: str, features: torch.Tensor) -> str:
        """sha256 of the entry's key, shape, dtype and bytes (stored in the entry)."""
        t = features.detach().cpu().contiguous()
        h = hashlib.sha256(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        """The cached features of ``key``, or None: missing, unreadable, or not what was
        written (an entry edited in place, or one moved under another key) is recomputed,
        never trusted. The seal is a plain hash stored in the entry: it catches damage and
        careless edits, not a forger who re-seals; `cfr audit --recompute` catches that."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                recorded = (f.metadata() or {}).get("sha256")
                features = f.get_tensor("features")
        except Exception:  # safetensors raises several types on a damaged file
            log.warning("ignoring unreadable feature cache entry %s", path)
            return None
        if recorded != self.digest(key, features):
            log.warning(
                "ignoring feature cache entry %s: its content is not what was written", path
            )
            return None
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        features = features.contiguous()
        with atomic_path(self.path(key)) as tmp:
            save_file(
                {"features": features}, str(tmp), metadata={"sha256": self.digest(key, features)}
            )


def grid_mask(sample: Sample, preprocess: PreprocessConfig, grid: int) -> torch.Tensor:
    """The sample's ground truth padded like its scan and resized (nearest) to the grid."""
    if sample.gt_path is None:
        return torch.zeros(grid, grid, dtype=torch.bool)
    mask = pad_to_square(sample.load_mask(), preprocess.pad_multiple)
    return torch.from_numpy(resize_nearest(mask, grid))


def colour_grid(rgb: np.ndarray, grid: int) -> torch.Tensor:
    """3×G×G: a padded, square uint8 RGB image (as :class:`PreparedScan` holds it) averaged
    onto the feature grid, in [0, 1] (float32: the gate's colour check works at the scale
    of sensor noise, finer than float16 resolves)."""
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()[None] / 255.0
    return F.interpolate(image, size=(grid, grid), mode="area")[0]


def _sample_colour(sample: Sample, preprocess: PreprocessConfig, grid: int) -> torch.Tensor:
    """The sample's colour on the grid, padded like its scan (:func:`prepare_sample` pads RGB
    in edge mode), without the point-cloud preprocessing."""
    return colour_grid(pad_to_square(sample.load_rgb(), preprocess.pad_multiple, "edge"), grid)


def surface_of(scan: PreparedScan) -> np.ndarray:
    """The cloud the shape check reads: the scan's surface view (refused when the scan was
    prepared without one: its map would silently read the method's 5 mm cloud)."""
    if scan.surface is None:
        raise ValueError(
            f"scan {scan.key or '(unnamed)'} was prepared without its surface view, which the "
            "shape map reads: prepare it with surface=True (the default)"
        )
    return scan.surface


def features_of_scans(
    scans: Sequence[PreparedScan],
    extractors: tuple[Extractor, Extractor],
    keys: Sequence[str] | None = None,
    gate_maps: bool = True,
) -> FeatureSet:
    """Features of already prepared scans (no cache), rounded through float16 like cached ones;
    ``gate_maps=False`` leaves out the colour and shape maps that only the quality gate
    reads (a gate refuses such features)."""
    rgb_ex, pts_ex = extractors
    rgb = rgb_ex(list(scans)).detach().cpu().half().float()
    pts = pts_ex(list(scans)).detach().cpu().half().float()
    masks = torch.stack([torch.from_numpy(resize_nearest(s.mask, rgb_ex.grid)) for s in scans])
    colour = shape = None
    if gate_maps:
        colour = torch.stack([colour_grid(s.rgb, rgb_ex.grid) for s in scans])
        shape = torch.stack([shape_grid(surface_of(s), rgb_ex.grid) for s in scans])
    names = list(keys) if keys is not None else [s.key for s in scans]
    return FeatureSet(rgb, pts, masks, names, colour, shape)


def extract_features(
    samples: Sequence[Sample],
    extractors: tuple[Extractor, Extractor],
    preprocess: PreprocessConfig,
    cache: FeatureCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 4,
) -> FeatureSet:
    """Preprocess and extract both modalities for ``samples`` (cached where possible)."""
    rgb_ex, pts_ex = extractors
    grid = rgb_ex.grid
    rgb_maps: list[torch.Tensor | None] = [None] * len(samples)
    pts_maps: list[torch.Tensor | None] = [None] * len(samples)
    shape_maps: list[torch.Tensor | None] = [None] * len(samples)
    keys: dict[tuple[int, int], str] = {}
    todo = []
    for i, sample in enumerate(samples):
        if cache is not None:
            files = cache.file_hashes(sample)
            for m, (ex, store) in enumerate(
                ((rgb_ex, rgb_maps), (pts_ex, pts_maps), (f"{SHAPE_ID}:grid {grid}", shape_maps))
            ):
                keys[i, m] = cache.key(files, ex, preprocess)
                store[i] = cache.get(keys[i, m])
            cached = shape_maps[i]
            if cached is not None and (
                tuple(cached.shape) != (2, grid, grid) or cached.dtype != torch.float32
            ):
                shape_maps[i] = None  # not this grid's map: recomputed, never trusted
        if rgb_maps[i] is None or pts_maps[i] is None or shape_maps[i] is None:
            todo.append(i)
    done = len(samples) - len(todo)
    for s in range(0, len(todo), batch_size):
        chunk = todo[s : s + batch_size]
        # the surface view only where the shape map is to be computed
        scans = [prepare_sample(samples[i], preprocess, shape_maps[i] is None) for i in chunk]
        need_rgb = [j for j, i in enumerate(chunk) if rgb_maps[i] is None]
        need_pts = [j for j, i in enumerate(chunk) if pts_maps[i] is None]
        for need, ex, store, m in (
            (need_rgb, rgb_ex, rgb_maps, 0),
            (need_pts, pts_ex, pts_maps, 1),
        ):
            if not need:
                continue
            out = ex([scans[j] for j in need]).detach().cpu().half()
            for j, feat in zip(need, out, strict=True):
                store[chunk[j]] = feat
                if cache is not None:
                    cache.put(keys[chunk[j], m], feat)
        for j, i in enumerate(chunk):
            if shape_maps[i] is None:
                shape_maps[i] = shape_grid(surface_of(scans[j]), grid)
                if cache is not None:
                    cache.put(keys[i, 2], shape_maps[i])
        done += len(chunk)
        if progress is not None:
            progress(done, len(samples))
    return FeatureSet(
        rgb=torch.stack(rgb_maps).float(),
        points=torch.stack(pts_maps).float(),
        masks=torch.stack([grid_mask(s, preprocess, grid) for s in samples]),
        keys=[s.key for s in samples],
        colour=torch.stack([_sample_colour(s, preprocess, grid) for s in samples]),
        shape=torch.stack([m.float() for m in shape_maps]),
    )
