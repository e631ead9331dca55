"""The quality gate's library check: does a new scan look like any good scan we already hold?

The deployed model compares a scan with the 1–4 shots it was fitted on, and four
shots rarely show every finish and pose a category's good parts take: good scans
unlike the shots score high, so a gate on the model's score alone must either
quarantine good parts or let weak defects through (bench/results/gate.md). The
library check adds what the shop floor already has: **the good scans of the
library** (the pool the shots are drawn from, plus validation scans; up to
``ScoringConfig.library_gate_scans`` of them, see below).

* Its bank: the raw RGB and 3D features of every ``GATE_STRIDE``-th foreground
  pixel of each library scan, standardised per channel on the library (unit rows).
* A scan's **novelty** per modality: 1 − the largest cosine similarity of each
  sampled pixel to that modality's bank, box-blurred (``GATE_BLUR``); its peak.
* Its **pairing novelty**: the same with both modalities at once, 1 − the largest
  *mean* of the RGB and 3D cosines to one library pixel. Each modality alone can
  look like some good pixel while the pair does not (paint where the part has no
  stud): only this check, of the library's, compares the modalities.
* Its **colour novelty**: the distance of each sampled pixel's own colour (the
  image averaged onto the feature grid, as rg chromaticity: brightness, shading and
  camera gain divide out) to the nearest colour of any library pixel, blurred the
  same way; its peak. A stain in a colour no good scan shows can sit on a busy print
  whose deep features vary from part to part anyway (speckled's chips): the deep
  RGB check then allows it, the colour check does not.
* Its **shape novelty**: the distance of each sampled pixel's principal curvatures
  (the depth smoothed over 2 mm, :mod:`cfr_core.engine.surface`) to the nearest
  curvatures of any library pixel, blurred the same way; its peak. A dent a few
  millimetres across bends the surface far more than a good part does at that scale,
  while the 3D features, which compare normals a few points apart, see it as little
  more than the scanner's noise (a dent on a flat plate). Pixels where the cloud
  cannot tell (holes, shadows at steep walls, the outline) are skipped.
* Its **limits**: each library scan's peak against the bank of the *other*
  library scans (leave-one-out: a good scan the bank has not seen), the highest
  of them × (1 + ``ScoringConfig.library_gate_margin``), one margin for the three
  feature checks; × (1 + ``ScoringConfig.colour_gate_margin``) for the colour check
  and × (1 + ``ScoringConfig.shape_gate_margin``) for the shape check.
* A library larger than ``ScoringConfig.library_gate_scans`` is cut to that many
  scans, the **most varied** ones (:func:`most_varied`): each next scan is the one
  least like those already kept. Without the cut the bank and each landing check
  grow with the library and the leave-one-out build with its square; with it they
  stop growing, and only the choice (one search per scan and step) grows, linearly.
  The kept scans are the most unlike each other, so past the cap the limits stop
  tightening as the library grows (bench/results/gate_scale.md).

A scan enters the library only when its model score is within the model's gate
threshold, the five novelty peaks are within their limits *and* it has at least half
the foreground of the smallest library scan and (with a shape check) a readable
curvature on at least a quarter of the share of the least-read library scan: holes or
scattered point loss must not blind the shape check unseen (:func:`gate_decision`).
Stride, blur, the checks and the margins were chosen on the development
categories (bench/gate.py, bench/results/gate.md). Needs at least two library
scans (leave-one-out); with fewer the gate uses the model's score alone. A model
saved before the pairing, the colour or the shape check existed keeps the checks it
has. A library whose scans all show one colour (a grey-scale camera: every pixel has
the same chromaticity) gets no colour check, and one whose clouds cannot tell a
curvature anywhere (too sparse or full of holes) gets no shape check; both say so.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from cfr_core.config import ScoringConfig
from cfr_core.data.pointcloud import SURFACE_TABLE_SIGMAS
from cfr_core.engine.features import FeatureSet
from cfr_core.engine.surface import (
    SHAPE_DESCRIPTOR,
    SHAPE_SCALE_MM,
    SHAPE_SETTINGS,
    SHAPE_SUPPORT,
    SHAPE_VERSION,
)
from cfr_core.errors import CFRError, DataError, finite_number
from cfr_core.memory import max_cosine_pair
from cfr_core.scoring.maps import box_blur
from cfr_core.scoring.overlay import overlay

#: a scan with less than this share of the smallest library scan's foreground fails
#: (the blur averages novelty with the empty background, so a scan of a few pixels would
#: otherwise look familiar: a hostile-input guard, not tuned; no benchmark scan is near it)
FOREGROUND_MISSING_LIMIT = 0.5
#: every GATE_STRIDE-th pixel of the feature grid (both axes) is in the bank and is queried
GATE_STRIDE = 2
#: blur of the (strided) novelty map before its peak is taken
GATE_BLUR = ((5, 5),)
MODALITIES = ("rgb", "points")
PAIRING = "pairing"
COLOUR = "colour"
SHAPE = "shape"
#: the library's checks: one per modality, both modalities together, the raw colour and
#: the surface's shape
CHECKS = (*MODALITIES, PAIRING, COLOUR, SHAPE)
LABELS = {
    "rgb": "RGB novelty",
    "points": "3D novelty",
    PAIRING: "RGB-3D pairing novelty",
    COLOUR: "colour novelty",
    SHAPE: "3D shape novelty",
}
#: the colour check's space: (r + f, g + f) / (r + g + b + 3f) of the grid-averaged colour
#: in [0, 1]; the floor f keeps the hue of near-black pixels (mostly sensor noise) close
#: to grey. Not tuned: every floor from 0 to 0.2 gave the same development result.
COLOUR_SPACE = "rg chromaticity"
DARK_FLOOR = 0.05
#: colour novelty is a distance in chromaticity: at most sqrt(2) between two points of [0, 1]²
_MAX_COLOUR_DISTANCE = math.sqrt(2.0)
#: a library whose highest leave-one-out colour novelty is below this shows one colour:
#: float32 rounding alone moves a grey pixel's chromaticity by ~6e-8, and a limit at that
#: scale would quarantine scans for rounding (the benchmark's lowest limit is ~1e-4)
ONE_COLOUR_SPREAD = 1e-6
#: shape novelty is a distance between curvature pairs (1/mm); a limit above this would
#: pass every dent (a curvature of 1/mm is a radius of 1 mm, sharper than a surface smoothed
#: over 2 mm shows; the benchmark's limits are 0.0009-0.0045, its dents' peaks up to 0.3)
_MAX_SHAPE_DISTANCE = 1.0
#: a scan whose curvature can be read on less than a quarter of the share of the library's
#: least-read scan fails (holes or scattered point loss leave the shape check nothing to
#: compare: it must not pass such a scan unseen). A hostile-input guard, not tuned to stop
#: defects; not 0.5 like FOREGROUND_MISSING_LIMIT because the share varies a lot between
#: good scans of a part with steep walls (development: a good ribbed test scan reached 0.49,
#: the highest; every other category's stayed below 0.24)
SHAPE_UNREAD_LIMIT = 0.75
FOREGROUND_CHECK = "foreground missing"
SHAPE_UNREAD_CHECK = "3D shape unread"


class NoLibraryCheck(CFRError, ValueError):
    """The library cannot calibrate a check: fewer than 2 different good scans."""


@dataclass
class LibraryGate:
    """Banks, standardisation and limits of the library check (saved with the model)."""

    # modality -> N×C standardised unit rows (float16); COLOUR -> N×2 chromaticity (float32);
    # SHAPE -> M×2 principal curvatures (float32) of the library pixels that have them
    banks: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]  # modality -> 2×C (mean, std)
    limits: dict[str, float]  # check (CHECKS) -> novelty peak limit
    loo_peaks: dict[str, list[float]]  # check -> leave-one-out peak of each library scan
    scans: list[str]  # keys of the library scans the check holds
    margin: float
    min_foreground: int  # sampled foreground pixels of the library's smallest scan
    library_size: int = 0  # different good scans offered (more than ``scans`` when cut)
    colour_margin: float | None = None  # None: no colour check
    shape_margin: float | None = None  # None: no shape check
    # the smallest share of a library scan's sampled foreground with a curvature (shape check)
    min_shape_read: float | None = None
    # the descriptor version of a shape check dropped on load (an older code built it)
    shape_outdated: int | None = None
    # built on first use; not init fields, so dataclasses.replace() never carries a tree
    # that belongs to another bank
    _colour_tree: cKDTree | None = field(default=None, init=False, repr=False, compare=False)
    _shape_tree: cKDTree | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.library_size = max(self.library_size, len(self.scans))

    def colour_tree(self) -> cKDTree:
        """Nearest-colour search over the colour bank (built once per gate)."""
        if self._colour_tree is None:
            self._colour_tree = cKDTree(self.banks[COLOUR].double().numpy())
        return self._colour_tree

    def shape_tree(self) -> cKDTree:
        """Nearest-curvature search over the shape bank (built once per gate)."""
        if self._shape_tree is None:
            self._shape_tree = cKDTree(self.banks[SHAPE].double().numpy())
        return self._shape_tree

    @property
    def checks(self) -> tuple[str, ...]:
        """The checks this gate holds: CHECKS, less the pairing check in a model saved
        before it existed, the colour check in one saved before it existed or built on
        a library of one colour, and the shape check in one saved before it existed or
        built on clouds that show no curvature."""
        return tuple(c for c in CHECKS if c in self.limits)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"gate.{m}": self.banks[m] for m in MODALITIES}
        out.update({f"gate.{m}_stats": self.stats[m] for m in MODALITIES})
        for check in (COLOUR, SHAPE):
            if check in self.banks:
                out[f"gate.{check}"] = self.banks[check]
        return out

    def metadata(self) -> dict[str, Any]:
        extra = {
            check: {**_SETTINGS[check][0], "margin": margin}
            for check, margin in ((COLOUR, self.colour_margin), (SHAPE, self.shape_margin))
            if margin is not None
        }
        return {
            "limits": self.limits,
            "loo_peaks": self.loo_peaks,
            "scans": self.scans,
            "margin": self.margin,
            "min_foreground": self.min_foreground,
            **({} if self.min_shape_read is None else {"min_shape_read": self.min_shape_read}),
            "library_size": self.library_size,
            "stride": GATE_STRIDE,
            "blur": [list(b) for b in GATE_BLUR],
            **extra,
        }

    @classmethod
    def from_parts(
        cls,
        meta: dict[str, Any] | None,
        tensors: dict[str, torch.Tensor],
        dims: dict[str, int] | None = None,
        grid: int | None = None,
    ) -> LibraryGate | None:
        """The gate of a saved model, or None (no library check was built for it).

        Everything is checked, because a hand-edited gate must not pass every scan:
        limits are numbers in (0, 2] (novelty is 1 − a cosine; the colour check's in
        (0, √2], a distance between chromaticities) equal to the stored leave-one-out
        peaks × (1 + their margin), banks are finite float rows of the model's feature
        ``dims``, each with its (mean, std) standardisation, the colour bank float32
        chromaticity rows in [0, 1], one per library pixel, of this code's colour space, and
        the shape bank float32 curvature pairs (larger first, no more rows than library
        pixels) of this code's descriptor, with a limit in (0, 1/mm] and the share of the
        least-read library scan in (0, 1] (``grid``: the feature grid's side, which bounds the
        shape bank at the library's sampled pixels; without it, the bank's size is not checked).

        A shape check that an older version of the descriptor built is dropped, not
        refused (its curvatures are not comparable with what this code computes, and the
        gate's other checks still hold): ``shape_outdated`` then names that version and
        :func:`gate_summary` says to refit."""
        if meta is None:
            if any(k.startswith("gate.") for k in tensors):
                raise ValueError("gate tensors without library_gate in model.json")
            return None
        if not isinstance(meta, dict):
            raise ValueError(f"library_gate must be an object, got {type(meta).__name__}")
        meta, tensors, outdated = _without_outdated_shape(meta, tensors)
        if (meta.get("stride"), meta.get("blur")) != (
            GATE_STRIDE,
            [list(b) for b in GATE_BLUR],
        ):
            raise ValueError("library_gate was built with another stride or blur than this code")
        margin = finite_number(meta.get("margin"), "library_gate margin")
        if margin < 0:
            raise ValueError(f"library_gate margin must be >= 0, got {margin}")
        scans = meta.get("scans")
        if not isinstance(scans, list) or len(scans) < 2:
            raise ValueError("library_gate scans must be a list of at least 2 scan keys")
        smallest = meta.get("min_foreground")
        if isinstance(smallest, bool) or not isinstance(smallest, int) or smallest < 1:
            raise ValueError(
                f"library_gate min_foreground must be a positive integer, got {smallest!r}"
            )
        size = meta.get("library_size", len(scans))  # older models: every scan was kept
        if isinstance(size, bool) or not isinstance(size, int) or size < len(scans):
            raise ValueError(
                f"library_gate library_size must be an integer >= its {len(scans)} scans, "
                f"got {size!r}"
            )
        limits, loo = {}, {}
        if not isinstance(meta.get("limits"), dict) or not isinstance(meta.get("loo_peaks"), dict):
            raise ValueError("library_gate limits and loo_peaks must be objects")
        names = set(meta["limits"])
        if names != set(meta["loo_peaks"]) or not set(MODALITIES) <= names <= set(CHECKS):
            raise ValueError(
                f"library_gate needs limits and leave-one-out peaks of {list(MODALITIES)} "
                f"(and {PAIRING!r} since it exists), nothing else; got limits of "
                f"{sorted(map(str, names))} and peaks of {sorted(map(str, meta['loo_peaks']))}"
            )
        colour_margin = _check_margin(meta, COLOUR, COLOUR in names)
        shape_margin = _check_margin(meta, SHAPE, SHAPE in names)
        for m in [c for c in CHECKS if c in names]:
            limits[m] = finite_number(meta["limits"][m], f"library_gate limit of {m}")
            if not isinstance(meta["loo_peaks"][m], list):
                raise ValueError(f"library_gate loo_peaks of {m} must be a list of numbers")
            loo[m] = [
                finite_number(x, f"library_gate loo_peaks of {m}") for x in meta["loo_peaks"][m]
            ]
            if m == COLOUR:  # a distance in chromaticity, limited by its own margin
                top, m_margin = _MAX_COLOUR_DISTANCE, colour_margin
                # no two chromaticities are farther apart than sqrt(2): a higher limit (or
                # one of 0) could never be exceeded (or always would be)
                if not all(0 <= x <= top for x in loo[m]) or not 0 < limits[m] <= top:
                    raise ValueError(
                        f"library_gate colour peaks and limit must be in [0, {top:.4f}] "
                        f"(the limit above 0), got a limit of {limits[m]}"
                    )
            elif m == SHAPE:  # a distance between curvature pairs (1/mm)
                top, m_margin = _MAX_SHAPE_DISTANCE, shape_margin
                if not all(0 <= x <= top for x in loo[m]) or not 0 < limits[m] <= top:
                    raise ValueError(
                        f"library_gate shape peaks and limit must be in [0, {top:g}] 1/mm "
                        f"(the limit above 0), got a limit of {limits[m]}"
                    )
            else:  # novelty is 1 − a cosine
                m_margin = margin
                if not 0 < limits[m] <= 2:
                    raise ValueError(
                        f"library_gate limit of {m} must be in (0, 2], got {limits[m]}"
                    )
            if len(loo[m]) != len(scans) or not math.isclose(
                limits[m], novelty_limit(loo[m], m_margin), rel_tol=1e-6
            ):
                raise ValueError(
                    f"library_gate limit of {m} ({limits[m]}) is not the highest of its "
                    f"{len(scans)} leave-one-out peaks × (1 + margin {m_margin})"
                )
        banks, stats = {}, {}
        for m in MODALITIES:
            missing = [k for k in (f"gate.{m}", f"gate.{m}_stats") if k not in tensors]
            if missing:
                raise ValueError(f"library_gate without its tensors {missing}")
            bank, stat = tensors[f"gate.{m}"], tensors[f"gate.{m}_stats"]
            width = dims[m] if dims is not None else stat.shape[-1]
            if not bank.is_floating_point() or bank.ndim != 2 or bank.shape[0] == 0:
                raise ValueError(
                    f"gate.{m} must be a non-empty 2-D float tensor, got "
                    f"{tuple(bank.shape)} {bank.dtype}"
                )
            if bank.shape[1] != width or tuple(stat.shape) != (2, width):
                raise ValueError(
                    f"gate.{m} is {tuple(bank.shape)} with stats {tuple(stat.shape)}; the model's "
                    f"{m} features are {width}-d"
                )
            if not (bool(torch.isfinite(bank).all()) and bool(torch.isfinite(stat).all())):
                raise ValueError(f"gate.{m} holds non-finite values")
            if not bool((stat[1] > 0).all()):
                raise ValueError(f"gate.{m}_stats has a standard deviation <= 0")
            banks[m], stats[m] = bank, stat.float()
        if banks["rgb"].shape[0] != banks["points"].shape[0]:
            raise ValueError(
                f"gate.rgb has {banks['rgb'].shape[0]} rows and gate.points "
                f"{banks['points'].shape[0]}: each row is one library pixel of both modalities"
            )
        bank = _own_bank(tensors, COLOUR, colour_margin is not None)
        if bank is not None:
            key = f"gate.{COLOUR}"
            if bank.dtype != torch.float32 or tuple(bank.shape) != (banks["rgb"].shape[0], 2):
                raise ValueError(
                    f"{key} must be float32 rows of (r, g) chromaticity, one per library pixel "
                    f"({banks['rgb'].shape[0]}), got {tuple(bank.shape)} {bank.dtype}"
                )
            if not (bool(torch.isfinite(bank).all()) and bool(((bank >= 0) & (bank <= 1)).all())):
                raise ValueError(f"{key} holds values outside [0, 1] (chromaticity)")
            banks[COLOUR] = bank
        bank = _own_bank(tensors, SHAPE, shape_margin is not None)
        if bank is not None:
            key = f"gate.{SHAPE}"
            if (
                bank.dtype != torch.float32
                or bank.ndim != 2
                or bank.shape[0] < 1
                or bank.shape[1] != 2
            ):
                raise ValueError(
                    f"{key} must be float32 rows of two principal curvatures, got "
                    f"{tuple(bank.shape)} {bank.dtype}"
                )
            if not bool(torch.isfinite(bank).all()) or bool((bank[:, 0] < bank[:, 1]).any()):
                raise ValueError(
                    f"{key} holds non-finite curvatures or rows whose first is not the larger"
                )
            # the check reads every GATE_STRIDE-th pixel of each library scan's grid
            most = math.inf if grid is None else len(scans) * math.ceil(grid / GATE_STRIDE) ** 2
            if bank.shape[0] > most:
                raise ValueError(
                    f"{key} has {bank.shape[0]} rows, more than the library's {most} sampled pixels"
                )
            banks[SHAPE] = bank
        shape_read = meta.get("min_shape_read")
        if shape_margin is None and shape_read is not None:
            raise ValueError("library_gate has min_shape_read without a shape check")
        if shape_margin is not None:
            shape_read = finite_number(shape_read, "library_gate min_shape_read")
            if not 0 < shape_read <= 1:
                raise ValueError(
                    f"library_gate min_shape_read must be a share in (0, 1], got {shape_read}"
                )
        return cls(
            banks,
            stats,
            limits,
            loo,
            [str(s) for s in scans],
            margin,
            smallest,
            size,
            colour_margin,
            shape_margin,
            shape_read,
            outdated,
        )


#: descriptor versions that saved models hold and this code no longer computes (3: the
#: shape check read the method's cloud, before the surface view); no other version shipped
_OUTDATED_SHAPE_VERSIONS = (3,)


def _without_outdated_shape(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], int | None]:
    """A saved gate without its shape check when an older version of this code's
    descriptor built it (and that version); otherwise the gate as it is, and None."""
    spec = meta.get(SHAPE)
    if not isinstance(spec, dict):
        return meta, tensors, None
    version = spec.get("version")
    if not (
        spec.get("descriptor") == SHAPE_DESCRIPTOR
        and isinstance(version, int)
        and not isinstance(version, bool)
        and version in _OUTDATED_SHAPE_VERSIONS
    ):
        return meta, tensors, None
    meta = {k: v for k, v in meta.items() if k not in (SHAPE, "min_shape_read")}
    for key in ("limits", "loo_peaks"):
        if isinstance(meta.get(key), dict):
            meta[key] = {c: v for c, v in meta[key].items() if c != SHAPE}
    return meta, {k: v for k, v in tensors.items() if k != f"gate.{SHAPE}"}, version


def _own_bank(tensors: dict[str, torch.Tensor], check: str, has_limit: bool):
    """The saved bank of the colour or shape check (None when the gate has no such check);
    a bank without its limit, or a limit without its bank, is refused."""
    key = f"gate.{check}"
    if not has_limit:
        if key in tensors:
            raise ValueError(f"{key} without a {check} limit in library_gate")
        return None
    if key not in tensors:
        raise ValueError(f"library_gate has a {check} limit but no {key} tensor")
    return tensors[key]


#: what a saved colour or shape check must have been built with: this code's settings, and
#: the words an error uses for them
_SETTINGS = {
    COLOUR: (
        {"space": COLOUR_SPACE, "dark_floor": DARK_FLOOR},
        f"another colour space than this code's ({COLOUR_SPACE}, dark floor {DARK_FLOOR})",
    ),
    SHAPE: (
        SHAPE_SETTINGS,
        f"another descriptor than this code's ({SHAPE_DESCRIPTOR} v{SHAPE_VERSION} over "
        f"{SHAPE_SCALE_MM} mm, support {SHAPE_SUPPORT}, the table cleared down to "
        f"{SURFACE_TABLE_SIGMAS:g} times its noise)",
    ),
}


def _check_margin(meta: dict[str, Any], check: str, has_limit: bool) -> float | None:
    """The colour or shape check's margin from a saved gate's metadata (None: the model has
    no such check); refused when it was built with other settings than this code's."""
    spec = meta.get(check)
    if spec is None and not has_limit:
        return None
    if spec is None or not has_limit:
        raise ValueError(
            f"library_gate has a {check} limit without its {check} settings, or settings "
            "without the limit"
        )
    settings, other = _SETTINGS[check]
    if not isinstance(spec, dict) or {k: spec.get(k) for k in settings} != settings:
        raise ValueError(f"library_gate's {check} check was built in {other}: refit the category")
    margin = finite_number(spec.get("margin"), f"library_gate {check} margin")
    if margin < 0:
        raise ValueError(f"library_gate {check} margin must be >= 0, got {margin}")
    return margin


def novelty_limit(loo_peaks: list[float], margin: float) -> float:
    """A modality's limit: the library's highest leave-one-out novelty peak × (1 + margin)."""
    return max(loo_peaks) * (1.0 + margin)


def _sampled_mask(features: FeatureSet, i: int) -> torch.Tensor:
    """The pixels of sample ``i`` the check reads: its foreground on every GATE_STRIDE-th
    row and column."""
    fg = features.foreground[i]
    return fg & _stride_grid(fg)


def _stride_grid(like: torch.Tensor) -> torch.Tensor:
    """True on every GATE_STRIDE-th row and column of a grid shaped like ``like``."""
    grid = torch.zeros_like(like, dtype=torch.bool)
    grid[::GATE_STRIDE, ::GATE_STRIDE] = True
    return grid


def chromaticity(colour: torch.Tensor) -> torch.Tensor:
    """N×2 (r, g) chromaticity (COLOUR_SPACE, DARK_FLOOR) of N×3 colours in [0, 1]."""
    colour = colour.float()
    return (colour[:, :2] + DARK_FLOOR) / (colour.sum(dim=1, keepdim=True) + 3 * DARK_FLOOR)


def _sampled_rows(features: FeatureSet, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Raw features of sample ``i`` at its strided foreground pixels (and their
    chromaticity and curvatures when the features carry the scan's colour and shape
    maps), and that pixel mask."""
    mask = _sampled_mask(features, i)
    rows = {
        "rgb": features.rgb[i][:, mask].T.float(),
        "points": features.points[i][:, mask].T.float(),
    }
    if features.colour is not None:
        rows[COLOUR] = chromaticity(_at_pixels(features.colour, i, mask, COLOUR))
    if features.shape is not None:
        at = _shape_mask(features, i, mask)
        rows[SHAPE] = _at_pixels(features.shape, i, at, SHAPE)  # NaN: no curvature there
        rows[_SHAPE_PIXELS] = at
    return rows, mask


#: the key under which a sample's shape-check pixels travel with its rows
_SHAPE_PIXELS = "shape pixels"


def _shape_mask(features: FeatureSet, i: int, mask: torch.Tensor) -> torch.Tensor:
    """The pixels the shape check reads: the sampled foreground ``mask`` and, on the same
    stride, every pixel where the scan's surface view shows a curvature (the lower surface
    of a thin part, which the method's preprocessing clears and the 3D features never see)."""
    _check_grid(features.shape, mask, SHAPE)
    return mask | (_stride_grid(mask) & torch.isfinite(features.shape[i]).all(dim=0))


def _on_foreground(rows: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """A sample's curvature rows at its sampled foreground ``mask`` only (its shape rows
    cover the shape check's pixels, which hold that mask)."""
    return rows[SHAPE][mask[rows[_SHAPE_PIXELS]]]


def _pixels(rows: dict[str, torch.Tensor], mask: torch.Tensor, check: str) -> torch.Tensor:
    """The pixel mask of ``check``'s values in a sample's ``rows``."""
    return rows[_SHAPE_PIXELS] if check == SHAPE else mask


def _at_pixels(maps: torch.Tensor, i: int, mask: torch.Tensor, check: str) -> torch.Tensor:
    """Rows of sample ``i``'s colour or shape map at the ``mask`` pixels (the map must be on
    the feature grid)."""
    _check_grid(maps, mask, check)
    return maps[i][:, mask].T.float()


def _check_grid(maps: torch.Tensor, mask: torch.Tensor, check: str) -> None:
    """Refuse colour or shape maps that are not on the feature grid of ``mask``."""
    if tuple(maps.shape[-2:]) != tuple(mask.shape):
        raise ValueError(
            f"the {check} map is {tuple(maps.shape[-2:])}, the feature grid {tuple(mask.shape)}"
        )


def _standardise(rows: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return (rows - stats[0]) / stats[1]


def _unit_rows(rows: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]):
    """A sample's rows per modality, standardised on the library, unit length (and its
    chromaticity and curvature rows as they are)."""
    out = {m: F.normalize(_standardise(rows[m], stats[m]), dim=1) for m in MODALITIES}
    for key in (COLOUR, SHAPE, _SHAPE_PIXELS):
        if key in rows:
            out[key] = rows[key]
    return out


def _novelties(
    queries: dict[str, torch.Tensor],
    banks: dict[str, torch.Tensor],
    colour_tree: cKDTree | None = None,
    shape_tree: cKDTree | None = None,
) -> dict[str, torch.Tensor]:
    """Per check, 1 − the best cosine of each query pixel to the bank: per modality, and
    for the pairing the best *mean* of both modalities' cosines to one bank pixel (each
    modality weighs the same, whatever its width); with a ``colour_tree`` (over the bank's
    chromaticity rows), the distance of each query pixel's chromaticity to the nearest;
    with a ``shape_tree`` (over the bank's curvature rows), the distance of each query
    pixel's curvatures to the nearest (0 where the scan has none: nothing to compare)."""
    rgb, points, pair = max_cosine_pair(
        (queries["rgb"], queries["points"]), (banks["rgb"], banks["points"])
    )
    out = {"rgb": 1.0 - rgb, "points": 1.0 - points, PAIRING: 1.0 - pair}
    if colour_tree is not None:
        if COLOUR not in queries:
            raise _without_maps(COLOUR)
        distance, _ = colour_tree.query(queries[COLOUR].double().numpy(), k=1)
        out[COLOUR] = torch.from_numpy(np.asarray(distance, dtype=np.float32).reshape(-1))
    if shape_tree is not None:
        if SHAPE not in queries:
            raise _without_maps(SHAPE)
        out[SHAPE] = _shape_distances(queries[SHAPE], shape_tree)
    return out


def _without_maps(check: str) -> ValueError:
    """The error for a scan checked without the maps a colour or shape check reads."""
    return ValueError(
        f"the library check has a {check} check but the scan's features carry no {check} "
        "map (build them with extract_features or features_of_scans)"
    )


def _shape_distances(rows: torch.Tensor, tree: cKDTree) -> torch.Tensor:
    """Distance of each curvature row to the nearest in ``tree``; 0 for a NaN row."""
    out = np.zeros(rows.shape[0], dtype=np.float32)
    known = _finite(rows).numpy()
    if known.any():
        distance, _ = tree.query(rows[known].double().numpy(), k=1)
        out[known] = np.asarray(distance, dtype=np.float32).reshape(-1)
    return torch.from_numpy(out)


def _finite(rows: torch.Tensor) -> torch.Tensor:
    """Which curvature rows are numbers (where the cloud could tell)."""
    return torch.isfinite(rows).all(dim=1)


def _known(rows: torch.Tensor) -> torch.Tensor:
    """The curvature rows that are numbers."""
    return rows[_finite(rows)]


def _read_share(rows: torch.Tensor) -> float:
    """The share of a scan's sampled pixels whose curvature could be read."""
    return float(_finite(rows).float().mean()) if len(rows) else 0.0


def shape_unread(gate: LibraryGate, features: FeatureSet, i: int = 0) -> float:
    """How much less of sample ``i``'s shape could be read than of the library's least-read
    scan: 0 when as much or more, 1 when nothing (the shape check then has nothing to
    compare, and must not pass the scan unseen)."""
    if gate.min_shape_read is None:
        raise ValueError("this gate has no shape check")
    if features.shape is None:
        raise _without_maps(SHAPE)
    # the share is read on the sampled foreground, the pixels every scan has, whatever
    # else its surface view shows (a readable rim must not make up for an unread part);
    # only the shape map there (not every feature row _sampled_rows gathers)
    rows = _at_pixels(features.shape, i, _sampled_mask(features, i), SHAPE)
    return max(0.0, 1.0 - _read_share(rows) / gate.min_shape_read)


def _blurred(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The blurred novelty map on the strided grid (background 0)."""
    full = torch.zeros(mask.shape, dtype=torch.float32)
    full[mask] = values.float()
    return box_blur(full[::GATE_STRIDE, ::GATE_STRIDE][None], GATE_BLUR)[0]


def _peak(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Peak of the blurred novelty map."""
    return float(_blurred(values, mask).max())


def _library_rows(library: FeatureSet):
    """Per-channel (mean, std) of the library's foreground features per modality, and each
    scan's (standardised unit rows, sampled pixel mask)."""
    fg = library.foreground
    stats = {}
    for m, fmap in (("rgb", library.rgb), ("points", library.points)):
        rows = fmap.permute(0, 2, 3, 1)[fg].float()
        stats[m] = torch.stack([rows.mean(0), rows.std(0).clamp_min(1e-3)])
    pieces = []
    for i in range(len(library)):
        rows, mask = _sampled_rows(library, i)
        pieces.append((_unit_rows(rows, stats), mask))
    return stats, pieces


def most_varied(pieces: list, keep: int) -> list[int]:
    """Indices (ascending) of ``keep`` of the sampled library scans ``pieces`` ((unit rows,
    mask) each), chosen farthest-first: the first scan, then each time the scan whose
    pairing novelty peak against the scans kept so far is the highest (the one least like
    them, in the check's own measure). Each scan's best match to the kept scans is
    updated with the newest only, so the choice costs one search per scan and step."""
    n = len(pieces)
    if keep < 1:
        raise ValueError(f"most_varied needs keep >= 1, got {keep}")
    if keep >= n:
        return list(range(n))
    kept, best = [0], [None] * n  # best: per pixel, the highest pairing similarity so far
    peaks = torch.full((n,), -math.inf)
    while len(kept) < keep:
        newest = pieces[kept[-1]][0]
        for j in range(n):
            if j in kept:
                continue
            rows, mask = pieces[j]
            _, _, found = max_cosine_pair(
                (rows["rgb"], rows["points"]), (newest["rgb"], newest["points"])
            )
            best[j] = found if best[j] is None else torch.maximum(best[j], found)
            peaks[j] = _peak(1.0 - best[j], mask)
        peaks[kept] = -math.inf
        kept.append(int(peaks.argmax()))
    return sorted(kept)


def _grey(colour: torch.Tensor) -> bool:
    """Whether every pixel of these B×3×G×G colour maps has r = g = b (a grey-scale image,
    converted to RGB, stays exactly so through the area average)."""
    return bool(torch.equal(colour[:, 0], colour[:, 1]) and torch.equal(colour[:, 1], colour[:, 2]))


def build_library_gate(
    library: FeatureSet,
    margin: float,
    max_scans: int | None = None,
    colour_margin: float | None = ScoringConfig.colour_gate_margin,
    shape_margin: float | None = ScoringConfig.shape_gate_margin,
) -> LibraryGate:
    """The library check from the features of every good library scan (at least two
    different ones), cut to the ``max_scans`` most varied (:func:`most_varied`) when there
    are more. A scan whose features equal an earlier one's (the same files under two names)
    is counted once: its twin would give it a leave-one-out peak of 0.

    The colour check is built with ``colour_margin`` (None: without it) and needs the
    scans' colour in ``library``; a library of one colour (a grey-scale camera) gets none.
    The shape check likewise with ``shape_margin`` and the scans' shape maps; a library
    in which fewer than two scans show a curvature anywhere, or whose leave-one-out shape
    peaks are all 0, gets none."""
    for name, margin_, have in (
        ("colour", colour_margin, library.colour),
        ("shape", shape_margin, library.shape),
    ):
        if margin_ is None:
            continue
        if have is None:
            raise ValueError(
                f"the {name} check needs the library scans' {name} maps: build the features "
                f"with extract_features or features_of_scans (or pass {name}_margin=None)"
            )
        if not math.isfinite(margin_) or margin_ < 0:
            raise ValueError(f"{name}_margin must be a finite number >= 0, got {margin_}")
    if max_scans is not None and (
        isinstance(max_scans, bool) or not isinstance(max_scans, int) or max_scans < 2
    ):
        raise ValueError(f"max_scans must be an integer >= 2, got {max_scans!r}")
    n = len(library)
    for i in range(n):
        if not _sampled_mask(library, i).any():
            raise DataError(
                f"library scan {library.keys[i]} has no foreground pixel where the check "
                f"samples (every {GATE_STRIDE}-th row and column of the feature map): an empty "
                "or nearly empty point cloud",
                None,
                "remove that scan (from the shot library: shots/library/CATEGORY/ID in the "
                "pipeline's store; or from the dataset) and refit",
            )
        if not (
            bool(torch.isfinite(library.rgb[i]).all())
            and bool(torch.isfinite(library.points[i]).all())
            and (library.colour is None or bool(torch.isfinite(library.colour[i]).all()))
        ):
            raise DataError(
                f"library scan {library.keys[i]} has non-finite features",
                None,
                "check its image and point cloud (`cfr data check`) or remove it",
            )
    seen, keep = set(), []
    for i in range(n):
        digest = hashlib.sha256(
            library.rgb[i].numpy().tobytes() + library.points[i].numpy().tobytes()
        ).hexdigest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    if len(keep) < 2:
        raise NoLibraryCheck(
            f"the library check needs at least 2 different good scans, got {len(keep)} "
            f"(of {n} library scans)"
        )
    library = library.select(keep) if len(keep) < n else library
    size = len(library)
    stats, pieces = _library_rows(library)
    # the foreground check compares with the library's smallest scan, kept or not (the
    # cut prefers large scans: a small one blurs its novelty with more background)
    smallest = min(int(mask.sum()) for _, mask in pieces)
    shape_read = None
    if shape_margin is not None:  # the least-read library scan that shows a curvature at all
        shape_read = min(
            (
                r
                for r in (_read_share(_on_foreground(rows, mask)) for rows, mask in pieces)
                if r > 0
            ),
            default=0,
        )
    if max_scans is not None and size > max_scans:
        # the check is then exactly the check of the kept scans (standardised on them)
        library = library.select(most_varied(pieces, max_scans))
        stats, pieces = _library_rows(library)
    if shape_margin is not None and (
        not shape_read or sum(len(_known(p[0][SHAPE])) > 0 for p in pieces) < 2
    ):
        # no leave-one-out: the clouds show a curvature nowhere, or (a flat or thin part)
        # only off the part, where no scan's share read could be compared with
        shape_margin = shape_read = None
    checks = [
        c
        for c in CHECKS
        if not (c == COLOUR and colour_margin is None) and not (c == SHAPE and shape_margin is None)
    ]
    loo: dict[str, list[float]] = {c: [] for c in checks}
    for i, (rows, mask) in enumerate(pieces):
        others = {
            m: torch.cat([p[0][m] for j, p in enumerate(pieces) if j != i]) for m in MODALITIES
        }
        tree = shape_tree = None
        if colour_margin is not None:
            others_colour = torch.cat([p[0][COLOUR] for j, p in enumerate(pieces) if j != i])
            tree = cKDTree(others_colour.double().numpy())
        if shape_margin is not None:
            # at least one other scan shows a curvature (two do, checked above)
            others_shape = torch.cat([_known(p[0][SHAPE]) for j, p in enumerate(pieces) if j != i])
            shape_tree = cKDTree(others_shape.double().numpy())
        for c, values in _novelties(rows, others, tree, shape_tree).items():
            # colour distances are small (sensor-noise scale): keep more decimals
            loo[c].append(round(_peak(values, _pixels(rows, mask, c)), 9 if c == COLOUR else 6))
    if colour_margin is not None and (
        _grey(library.colour) or max(loo[COLOUR]) < ONE_COLOUR_SPREAD
    ):
        # every library pixel has one chromaticity (a grey-scale camera): nothing to compare
        del loo[COLOUR]
        colour_margin = None
    if shape_margin is not None and max(loo[SHAPE]) <= 0:
        del loo[SHAPE]  # every library scan's curvatures are found in another: no spread
        shape_margin = shape_read = None
    limits = {c: novelty_limit(loo[c], margin) for c in loo if c not in (COLOUR, SHAPE)}
    if not all(v > 0 for v in limits.values()):
        raise NoLibraryCheck(
            "the library's good scans are too alike to calibrate on (every leave-one-out "
            "novelty is 0)"
        )
    banks = {m: torch.cat([p[0][m] for p in pieces]).half().contiguous() for m in MODALITIES}
    if colour_margin is not None:
        limits[COLOUR] = novelty_limit(loo[COLOUR], colour_margin)
        banks[COLOUR] = torch.cat([p[0][COLOUR] for p in pieces]).float().contiguous()
    if shape_margin is not None:
        limits[SHAPE] = novelty_limit(loo[SHAPE], shape_margin)
        banks[SHAPE] = torch.cat([_known(p[0][SHAPE]) for p in pieces]).float().contiguous()
    return LibraryGate(
        banks,
        stats,
        limits,
        loo,
        list(library.keys),
        float(margin),
        smallest,
        size,
        None if colour_margin is None else float(colour_margin),
        None if shape_margin is None else float(shape_margin),
        None if shape_read is None else round(float(shape_read), 6),
    )


def novelty_maps(gate: LibraryGate, features: FeatureSet, i: int = 0) -> dict[str, torch.Tensor]:
    """Blurred novelty maps of sample ``i`` per check (``gate.checks``), on the feature grid
    (each value repeated over its GATE_STRIDE² pixels); their maxima are :func:`novelty_peaks`."""
    rows, mask = _sampled_rows(features, i)
    if not mask.any():  # nothing to compare: never passes
        return {c: torch.full(mask.shape, float("inf")) for c in gate.checks}
    out = {}
    tree = gate.colour_tree() if COLOUR in gate.checks else None
    shape_tree = gate.shape_tree() if SHAPE in gate.checks else None
    values = _novelties(_unit_rows(rows, gate.stats), gate.banks, tree, shape_tree)
    for m in gate.checks:
        coarse = _blurred(values[m], _pixels(rows, mask, m))
        grid = coarse.repeat_interleave(GATE_STRIDE, 0).repeat_interleave(GATE_STRIDE, 1)
        out[m] = grid[: mask.shape[0], : mask.shape[1]]
    return out


def foreground_missing(gate: LibraryGate, features: FeatureSet, i: int = 0) -> float:
    """The share of the library's smallest foreground (sampled pixels) that sample ``i``
    lacks: 0 when it has as many or more, 1 when it has none."""
    return max(0.0, 1.0 - int(_sampled_mask(features, i).sum()) / gate.min_foreground)


def novelty_peaks(gate: LibraryGate, features: FeatureSet) -> list[dict[str, float]]:
    """Per sample, the novelty peak of each check against the library bank."""
    return [
        {m: float(v.max()) for m, v in novelty_maps(gate, features, i).items()}
        for i in range(len(features))
    ]


@dataclass
class GateDecision:
    """The gate's checks of one scan: name -> (value, limit); it passes when none exceeds."""

    checks: dict[str, tuple[float, float]] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # check name -> novelty map

    @property
    def passed(self) -> bool:
        return not self.failed()

    @property
    def ratio(self) -> float:
        """The largest value / limit (≤ 1 passes): one number to sort a quarantine by
        (a value that is not a number, or above a limit of 0, counts as infinitely far)."""
        ratios = [
            v / lim if lim > 0 and not math.isnan(v) else (0.0 if v <= lim else math.inf)
            for v, lim in self.checks.values()
        ]
        return max(ratios, default=0.0)

    def failed(self) -> list[str]:
        """Names of the checks not within their limits (a NaN value fails)."""
        return [name for name, (v, lim) in self.checks.items() if not v <= lim]

    def describe(self) -> str:
        """'RGB novelty 0.61 > 0.48, model score 1.2 <= 2.9, 3D novelty 0.0251 > 0.025'
        (failed checks first; 4 significant digits, so small limits stay readable)."""
        order = self.failed() + [k for k in self.checks if k not in self.failed()]
        parts = []
        for name in order:
            value, limit = self.checks[name]
            sign = "<=" if value <= limit else ">"
            parts.append(f"{name} {value:.4g} {sign} {limit:.4g}")
        return ", ".join(parts)


def gate_heatmap(decision: GateDecision, scanned) -> tuple[np.ndarray, str]:
    """(picture, caption) of what stopped a scan: the first failed library check's novelty
    map over the scan (its limit at mid-scale, so what exceeds it is bright), else the
    model's anomaly map. ``scanned`` is the scan's :class:`~cfr_core.engine.score.ScanScore`."""
    for name in decision.failed():
        if name in decision.maps:
            limit = decision.checks[name][1]
            picture = overlay(scanned.scan.rgb, decision.maps[name].numpy(), 2.0 * limit)
            return picture, f"{name} (limit = mid-scale)"
    return scanned.heatmap(), "model anomaly map"


def gate_decision(model, score: float, features: FeatureSet) -> GateDecision:
    """The quality gate on one scan: the model's score against its gate threshold and,
    when the model holds a library check, the scan's foreground and its novelty per
    modality, of the RGB-3D pairing, of its own colour and of its shape against their
    limits (and, with a shape check, how much of its shape could be read). A model without
    a threshold cannot gate (it fails closed: an error, never a pass)."""
    limit = model.gate_threshold if model.gate_threshold is not None else model.threshold
    if limit is None:
        raise DataError(
            f"the {model.category} model has no threshold to gate new scans on",
            None,
            "refit the category (`cfr pipeline run`) so its model is calibrated",
        )
    decision = GateDecision()
    decision.checks["model score"] = (float(score), float(limit))
    gate = model.library_gate
    if gate is not None:
        decision.checks[FOREGROUND_CHECK] = (
            foreground_missing(gate, features),
            FOREGROUND_MISSING_LIMIT,
        )
        for m, nmap in novelty_maps(gate, features).items():
            decision.checks[LABELS[m]] = (float(nmap.max()), gate.limits[m])
            decision.maps[LABELS[m]] = nmap
        if SHAPE in gate.checks:
            decision.checks[SHAPE_UNREAD_CHECK] = (
                shape_unread(gate, features),
                SHAPE_UNREAD_LIMIT,
            )
    return decision


def gate_summary(model) -> str:
    """One line on a model's library check (for `cfr fit` and the pipeline's metadata)."""
    gate = model.library_gate
    if gate is None:
        return "no library check (it needs 2 good library scans)"
    limits = ", ".join(f"{LABELS[c]} <= {gate.limits[c]:.4g}" for c in gate.checks)
    older = "" if PAIRING in gate.checks else " (no pairing check: refit to add it)"
    if COLOUR not in gate.checks:
        older += (
            " (no colour check: the model predates it, or every library scan shows one "
            "colour, as from a grey-scale camera)"
        )
    if gate.shape_outdated is not None:
        older += (
            f" (no shape check: it was built by version {gate.shape_outdated} of the "
            f"curvature descriptor, this code reads version {SHAPE_VERSION}: refit to restore it)"
        )
    elif SHAPE not in gate.checks:
        older += (
            " (no shape check: the model predates it, or the library's clouds show no "
            "curvature, too sparse or full of holes, or none that differs between them)"
        )
    held = f"{len(gate.scans)} good scans"
    if gate.library_size > len(gate.scans):
        held = f"the {len(gate.scans)} most varied of {gate.library_size} good scans"
    return f"library check on {held}: {limits}{older}"
