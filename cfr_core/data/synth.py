"""A synthetic benchmark in the MVTec 3D-AD layout, built for what CFR is about.

Each sample is a part lying on a tilted table, seen by an RGB-D sensor from
above: an organized cloud in metres (zeros where nothing was measured: shadows
at steep walls, dropout holes, isolated misses; plus sensor noise and a few
floating specks) and a colour image rendered from albedo and surface normals.

Categories (see :data:`CATEGORIES`):

* ``dome``     — plain control: a beige puck with a domed top.
* ``candy``    — one-to-many *across* samples: the same gummy shape made in four colours.
* ``speckled`` — one-to-many *within* a sample: a flat cookie whose printed chips sit
  at different places on every part, so flat geometry maps to two appearances.
* ``ribbed``   — appearance and geometry must agree: raised ribs at varying places,
  each painted blue. The ``mismatch`` defect moves the paint off its rib: each
  modality alone still looks normal, only their disagreement is a defect.
  Rendered 3:4 (non-square), like MVTec's tire.

Four more categories, of the same three kinds, keep the benchmark honest: every
default is chosen on the *development* categories (:data:`DEV_CATEGORIES`) and
only measured on the *report* categories (:data:`REPORT_CATEGORIES`):

* ``knob``     — one-to-many across samples (development): a knurled knob made in
  three finishes (anodised blue, turned steel with concentric marks, matte black rubber).
* ``capsule``  — one-to-many across samples (report): a two-part capsule whose two
  colours come in three combinations.
* ``checker``  — one-to-many within a sample (report): a flat tile printed with a
  checkerboard whose phase varies from part to part.
* ``studded``  — crossmodal (report): a plate with raised studs, each with a dark
  painted top. ``bare`` (a stud without its paint) and ``ghost`` (paint without a
  stud) are defects only in the agreement of the two modalities.

Defects: ``stain`` (RGB only), ``dent`` (3D only: the colour image is taken
under diffuse light, so shallow dents do not show), ``crack`` (both), and the
crossmodal ``mismatch`` (ribbed), ``bare`` and ``ghost`` (studded).

Everything is deterministic per seed: each sample draws from its own
generator seeded by (seed, category, split, index), so a sample does not change
when other categories or counts change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from cfr_core.data.io import atomic_folder, write_mask, write_rgb, write_xyz
from cfr_core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "synth-2"
SCENE_SPAN_M = 0.10  # the long image side covers 10 cm of table
SENSOR_DISTANCE_M = 0.55

CATEGORIES: dict[str, str] = {
    "dome": "plain control: one shape, one colour",
    "candy": "one-to-many across samples: same shape in four colours",
    "speckled": "one-to-many within a sample: chips printed at varying places on flat geometry",
    "ribbed": "crossmodal agreement: paint must sit on the ribs (3:4 image)",
    "knob": "one-to-many across samples: a knurled knob in three finishes",
    "capsule": "one-to-many across samples: a two-part capsule in three colour pairs",
    "checker": "one-to-many within a sample: a checkerboard print whose phase varies",
    "studded": "crossmodal agreement: every raised stud carries a dark painted top",
}
#: what each category tests: control, one-to-many across / within samples, crossmodal
KINDS: dict[str, str] = {
    "dome": "control",
    "candy": "across",
    "speckled": "within",
    "ribbed": "crossmodal",
    "knob": "across",
    "capsule": "across",
    "checker": "within",
    "studded": "crossmodal",
}
ONE_TO_MANY_KINDS = ("across", "within")
#: the demo's categories (and `cfr data synth`'s default)
DEMO_CATEGORIES = ("dome", "candy", "speckled", "ribbed")
#: every default is chosen on these ...
DEV_CATEGORIES = ("dome", "candy", "speckled", "ribbed", "knob")
#: ... and only measured on these
REPORT_CATEGORIES = ("capsule", "checker", "studded")
DEFECTS: dict[str, tuple[str, ...]] = {
    "dome": ("stain", "dent", "crack"),
    "candy": ("stain", "dent", "crack"),
    "speckled": ("stain", "dent", "crack"),
    "ribbed": ("stain", "dent", "crack", "mismatch"),
    "knob": ("stain", "dent", "crack"),
    "capsule": ("stain", "dent", "crack"),
    "checker": ("stain", "dent", "crack"),
    "studded": ("stain", "dent", "crack", "bare", "ghost"),
}
DEFECT_MODALITY = {
    "stain": "rgb",
    "dent": "3d",
    "crack": "both",
    "mismatch": "crossmodal",
    "bare": "crossmodal",
    "ghost": "crossmodal",
}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
_CANDY_COLOURS = np.array(
    [[0.85, 0.12, 0.10], [0.22, 0.68, 0.16], [0.95, 0.80, 0.12], [0.97, 0.50, 0.08]]
)
_STAIN_COLOURS = {
    "dome": (0.35, 0.22, 0.12),
    "candy": (0.28, 0.25, 0.72),
    "speckled": (0.36, 0.52, 0.30),
    "ribbed": (0.72, 0.36, 0.12),
    "knob": (0.74, 0.58, 0.22),
    "capsule": (0.33, 0.24, 0.15),
    "checker": (0.55, 0.25, 0.60),
    "studded": (0.25, 0.35, 0.62),
}
_KNOB_FINISHES = ("anodised", "turned", "rubber")
_CAPSULE_COLOURS = (
    ((0.86, 0.16, 0.12), (0.93, 0.91, 0.86)),
    ((0.16, 0.30, 0.80), (0.95, 0.80, 0.16)),
    ((0.10, 0.52, 0.30), (0.62, 0.86, 0.56)),
)
_STUD_PAINT = (0.46, 0.08, 0.08)
_STUD_PLATE = (0.70, 0.75, 0.70)
_STUD_RADIUS = 0.0028


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. ``size`` is the long image side in pixels."""

    categories: tuple[str, ...] = DEMO_CATEGORIES
    seed: int = 0
    size: int = 256
    n_train: int = 8
    n_validation: int = 4
    n_test_good: int = 10
    n_test_per_defect: int = 5

    def __post_init__(self) -> None:
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown:
            raise ConfigError(
                f"unknown synthetic categories {unknown}; choose from {list(CATEGORIES)}"
            )
        if not self.categories:
            raise ConfigError("at least one category is needed")
        if self.size < 64:
            raise ConfigError(f"size must be >= 64 pixels, got {self.size}")
        if min(self.n_train, self.n_test_good, self.n_test_per_defect) < 1 or self.n_validation < 0:
            raise ConfigError("sample counts must be >= 1 (validation >= 0)")


@dataclass
class Scan:
    """One rendered sample."""

    rgb: np.ndarray  # uint8 H×W×3
    xyz: np.ndarray  # float32 H×W×3, zeros = missing
    mask: np.ndarray  # bool H×W
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field_ - field_.mean()) / (field_.std() + 1e-12)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass
class _Frame:
    """Pixel grid in table coordinates (metres) and the part's local frame."""

    h: int
    w: int
    pitch: float
    x: np.ndarray
    y: np.ndarray
    u: np.ndarray
    v: np.ndarray


def _frame(h: int, w: int, rng: np.random.Generator, rotation_deg: float) -> _Frame:
    pitch = SCENE_SPAN_M / max(h, w)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    x = (cols - (w - 1) / 2) * pitch
    y = (rows - (h - 1) / 2) * pitch
    angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
    dx, dy = rng.uniform(-0.004, 0.004, size=2)
    scale = rng.uniform(0.97, 1.03)
    c, s = np.cos(angle), np.sin(angle)
    u = (c * (x - dx) + s * (y - dy)) / scale
    v = (-s * (x - dx) + c * (y - dy)) / scale
    return _Frame(h, w, pitch, x, y, u, v)


def _texture(
    rng: np.random.Generator, shape: tuple[int, int], fine: float, coarse: float
) -> np.ndarray:
    return 1.0 + fine * _smooth_noise(rng, shape, 0.8) + coarse * _smooth_noise(rng, shape, 12.0)


# --------------------------------------------------------------------------- parts
# Each part returns (height map in metres, albedo H×W×3, footprint bool, extras dict).


def _part_dome(f: _Frame, rng: np.random.Generator):
    r = np.sqrt((f.u / 0.030) ** 2 + (f.v / 0.025) ** 2)
    foot = r < 1.0
    wall = _smoothstep((1.0 - r) / 0.06)
    height = (0.008 + 0.011 * np.sqrt(np.clip(1.0 - r**2, 0, 1))) * wall
    albedo = np.empty((f.h, f.w, 3))
    albedo[:] = (0.80, 0.68, 0.50)
    albedo *= _texture(rng, (f.h, f.w), 0.03, 0.04)[..., None]
    return height, albedo, foot, {}


def _part_candy(f: _Frame, rng: np.random.Generator):
    blobs = [  # centre u, v, radius u, v (metres): body, head, ears, arms, legs
        (0.0, 0.008, 0.017, 0.021),
        (0.0, -0.020, 0.013, 0.011),
        (-0.010, -0.030, 0.005, 0.005),
        (0.010, -0.030, 0.005, 0.005),
        (-0.017, 0.000, 0.008, 0.005),
        (0.017, 0.000, 0.008, 0.005),
        (-0.011, 0.027, 0.007, 0.008),
        (0.011, 0.027, 0.007, 0.008),
    ]
    field_ = np.zeros((f.h, f.w))
    for cu, cv, ru, rv in blobs:
        field_ += np.exp(-(((f.u - cu) / ru) ** 2 + ((f.v - cv) / rv) ** 2))
    foot = field_ > 0.5
    height = (0.006 + 0.012 * np.sqrt(_smoothstep((field_ - 0.5) / 1.2))) * _smoothstep(
        (field_ - 0.5) / 0.08
    )
    colour_id = int(rng.integers(len(_CANDY_COLOURS)))
    albedo = np.empty((f.h, f.w, 3))
    albedo[:] = _CANDY_COLOURS[colour_id]
    albedo *= _texture(rng, (f.h, f.w), 0.02, 0.05)[..., None]
    return height, albedo, foot, {"colour": colour_id}


def _part_speckled(f: _Frame, rng: np.random.Generator):
    r = np.hypot(f.u, f.v) / 0.031
    foot = r < 1.0
    height = (
        0.010 * _smoothstep((1.0 - r) / 0.10) + 0.0003 * _smooth_noise(rng, (f.h, f.w), 2.0) * foot
    )
    albedo = np.empty((f.h, f.w, 3))
    albedo[:] = (0.86, 0.72, 0.52)
    chips = np.zeros((f.h, f.w), dtype=bool)
    n_chips = int(rng.integers(6, 11))
    wobble = _smooth_noise(rng, (f.h, f.w), 3.0)
    for _ in range(n_chips):
        rad = rng.uniform(0.0, 0.022)
        ang = rng.uniform(0, 2 * np.pi)
        size = rng.uniform(0.0025, 0.004)
        d = np.hypot(f.u - rad * np.cos(ang), f.v - rad * np.sin(ang)) / size
        chips |= d + 0.25 * wobble < 1.0
    albedo[chips] = (0.30, 0.17, 0.08)
    albedo *= _texture(rng, (f.h, f.w), 0.03, 0.03)[..., None]
    return height, albedo, foot, {"n_chips": n_chips}


def _place(n: int, draw: Callable, apart: Callable, attempts: int = 2000) -> list:
    """``n`` draws that are pairwise ``apart``, by rejection sampling.

    Sequential placement can jam (no room is left for the last one); after
    ``attempts`` rejected draws it starts over, so it always ends and a draw
    sequence that never jams gives the same result as plain rejection.
    """
    placed: list = []
    rejected = 0
    while len(placed) < n:
        c = draw()
        if all(apart(c, o) for o in placed):
            placed.append(c)
        else:
            rejected += 1
            if rejected >= attempts:
                placed, rejected = [], 0
    return placed


def _rib_profile(u: np.ndarray, centre: float, half_width: float = 0.0028) -> np.ndarray:
    return _smoothstep((half_width - np.abs(u - centre)) / 0.0012)


def _part_ribbed(f: _Frame, rng: np.random.Generator):
    half_u, half_v = 0.034, 0.024
    edge = np.minimum(half_u - np.abs(f.u), half_v - np.abs(f.v))
    foot = edge > 0
    plate = _smoothstep(edge / 0.0015)
    n_ribs = int(rng.integers(3, 6))
    centres = _place(
        n_ribs,
        lambda: rng.uniform(-half_u + 0.006, half_u - 0.006),
        lambda c, o: abs(c - o) > 0.009,
    )
    ribs = np.zeros((f.h, f.w))
    for c in centres:
        ribs = np.maximum(ribs, _rib_profile(f.u, c))
    ribs *= plate
    height = 0.008 * plate + 0.004 * ribs
    albedo = np.empty((f.h, f.w, 3))
    albedo[:] = (0.72, 0.74, 0.76)
    paint = ribs > 0.5
    albedo[paint] = (0.15, 0.25, 0.62)
    albedo *= _texture(rng, (f.h, f.w), 0.02, 0.03)[..., None]
    return height, albedo, foot, {"rib_centres": centres}


def _part_knob(f: _Frame, rng: np.random.Generator):
    radius = 0.028
    r_m = np.hypot(f.u, f.v)
    r = r_m / radius
    foot = r < 1.0
    angle = np.arctan2(f.v, f.u)
    knurl = 0.5 + 0.5 * np.cos(36 * angle)
    rim = _smoothstep((r - 0.78) / 0.06)
    height = (0.009 + 0.002 * np.clip(1.0 - r**2, 0, 1) + 0.0007 * knurl * rim) * _smoothstep(
        (1.0 - r) / 0.05
    )
    notch = (np.abs(f.v) < 0.0009) & (f.u > 0.004) & (f.u < 0.018)  # the pointer groove
    height = height - 0.0012 * notch
    finish = int(rng.integers(len(_KNOB_FINISHES)))
    albedo = np.empty((f.h, f.w, 3))
    if _KNOB_FINISHES[finish] == "anodised":
        albedo[:] = (0.20, 0.36, 0.78)
        albedo *= _texture(rng, (f.h, f.w), 0.015, 0.03)[..., None]
    elif _KNOB_FINISHES[finish] == "turned":  # concentric marks of the lathe
        rings = ndimage.gaussian_filter1d(rng.standard_normal(4096), 1.2)
        rings /= rings.std() + 1e-12
        marks = np.interp(r_m / f.pitch * 3.0, np.arange(4096), rings)
        albedo[:] = (0.64, 0.65, 0.67)
        albedo *= (1.0 + 0.09 * marks)[..., None] * _texture(rng, (f.h, f.w), 0.01, 0.02)[..., None]
    else:
        albedo[:] = (0.13, 0.13, 0.14)
        albedo *= _texture(rng, (f.h, f.w), 0.08, 0.03)[..., None]
    return height, albedo, foot, {"finish": _KNOB_FINISHES[finish]}


def _part_capsule(f: _Frame, rng: np.random.Generator):
    half, radius = 0.016, 0.011
    dx = np.maximum(np.abs(f.u) - half, 0.0)
    d = np.hypot(dx, f.v) / radius
    foot = d < 1.0
    seam = 0.002
    groove = _smoothstep(1.0 - np.abs(f.u - seam) / 0.0006)
    height = (0.002 + 0.010 * np.sqrt(np.clip(1.0 - d**2, 0, 1)) - 0.0005 * groove) * (
        _smoothstep((1.0 - d) / 0.08)
    )
    pair = int(rng.integers(len(_CAPSULE_COLOURS)))
    cap, body = (np.asarray(c) for c in _CAPSULE_COLOURS[pair])
    albedo = np.where((f.u < seam)[..., None], cap, body)
    albedo = albedo * _texture(rng, (f.h, f.w), 0.015, 0.03)[..., None]
    return height, albedo, foot, {"colours": pair}


def _plate(f: _Frame, half_u: float, half_v: float) -> tuple[np.ndarray, np.ndarray]:
    """(footprint, 0..1 plate profile with softened edges) of a rectangular plate."""
    edge = np.minimum(half_u - np.abs(f.u), half_v - np.abs(f.v))
    return edge > 0, _smoothstep(edge / 0.0015)


def _part_checker(f: _Frame, rng: np.random.Generator):
    foot, plate = _plate(f, 0.031, 0.031)
    period = 0.008
    du, dv = rng.uniform(0.0, 2 * period, size=2)
    wave = np.sin(np.pi * (f.u - du) / period) * np.sin(np.pi * (f.v - dv) / period)
    dark = _smoothstep(0.5 + wave / 0.3)  # soft print edges
    light, ink = np.asarray((0.86, 0.84, 0.78)), np.asarray((0.20, 0.23, 0.33))
    albedo = light + (ink - light) * dark[..., None]
    albedo *= _texture(rng, (f.h, f.w), 0.02, 0.03)[..., None]
    height = 0.006 * plate + 0.00015 * _smooth_noise(rng, (f.h, f.w), 3.0) * foot
    return height, albedo, foot, {"phase": [float(du), float(dv)]}


def _stud_cap(f: _Frame, cu: float, cv: float, radius: float = _STUD_RADIUS) -> np.ndarray:
    d = np.hypot(f.u - cu, f.v - cv) / radius
    return np.sqrt(np.clip(1.0 - d**2, 0.0, 1.0))


def _part_studded(f: _Frame, rng: np.random.Generator):
    half_u, half_v = 0.034, 0.025
    foot, plate = _plate(f, half_u, half_v)
    studs = _place(
        int(rng.integers(4, 8)),
        lambda: (
            rng.uniform(-half_u + 0.006, half_u - 0.006),
            rng.uniform(-half_v + 0.006, half_v - 0.006),
        ),
        lambda c, o: np.hypot(c[0] - o[0], c[1] - o[1]) > 0.010,
    )
    height = 0.005 * plate
    albedo = np.empty((f.h, f.w, 3))
    albedo[:] = _STUD_PLATE
    for cu, cv in studs:
        cap = _stud_cap(f, cu, cv)
        height = height + 0.0022 * cap
        albedo[cap > 0.35] = _STUD_PAINT
    albedo *= _texture(rng, (f.h, f.w), 0.02, 0.03)[..., None]
    return height, albedo, foot, {"studs": [[float(a), float(b)] for a, b in studs]}


_PARTS: dict[str, Callable] = {
    "dome": _part_dome,
    "candy": _part_candy,
    "speckled": _part_speckled,
    "ribbed": _part_ribbed,
    "knob": _part_knob,
    "capsule": _part_capsule,
    "checker": _part_checker,
    "studded": _part_studded,
}


# --------------------------------------------------------------------------- defects


def _defect_site(
    f: _Frame, foot: np.ndarray, rng: np.random.Generator, margin_px: int
) -> tuple[int, int]:
    inner = ndimage.binary_erosion(foot, iterations=max(margin_px, 1))
    rows, cols = np.nonzero(inner if inner.any() else foot)
    k = int(rng.integers(len(rows)))
    return int(rows[k]), int(cols[k])


def _apply_defect(kind, category, f, height, albedo, foot, extras, rng):
    """Modify height/albedo in place; return (gt mask, height used for shading)."""
    px = f.pitch
    shading_height = height  # what the colour camera sees
    if kind == "stain":
        r0, c0 = _defect_site(f, foot, rng, int(0.006 / px))
        rad = rng.uniform(0.003, 0.0055)
        d = np.hypot(f.x - f.x[r0, c0], f.y - f.y[r0, c0]) / rad
        region = (d + 0.35 * _smooth_noise(rng, (f.h, f.w), 2.5) < 1.0) & foot
        albedo[region] = (
            np.asarray(_STAIN_COLOURS[category])
            * _texture(rng, (f.h, f.w), 0.04, 0.0)[region, None]
        )
        return region, shading_height
    if kind == "dent":
        r0, c0 = _defect_site(f, foot, rng, int(0.006 / px))
        sigma = rng.uniform(0.0025, 0.004)
        depth = rng.uniform(0.0025, 0.004) * rng.choice([-1.0, 1.0])
        bump = (
            depth
            * np.exp(-0.5 * (np.hypot(f.x - f.x[r0, c0], f.y - f.y[r0, c0]) / sigma) ** 2)
            * foot
        )
        shading_height = height.copy()  # diffuse light: the nominal surface is what RGB shows
        height += bump
        return (np.abs(bump) > 0.0005) & foot, shading_height
    if kind == "crack":
        r0, c0 = _defect_site(f, foot, rng, int(0.008 / px))
        length = rng.uniform(0.012, 0.022)
        theta = rng.uniform(0, np.pi)
        t = np.linspace(-0.5, 0.5, 200)[:, None] * length
        bend = rng.uniform(-0.15, 0.15) / length
        pts_x = f.x[r0, c0] + t * np.cos(theta) - bend * t**2 * np.sin(theta)
        pts_y = f.y[r0, c0] + t * np.sin(theta) + bend * t**2 * np.cos(theta)
        line = np.zeros((f.h, f.w), dtype=bool)
        cols = np.clip(np.round(pts_x / px + (f.w - 1) / 2).astype(int), 0, f.w - 1)
        rows = np.clip(np.round(pts_y / px + (f.h - 1) / 2).astype(int), 0, f.h - 1)
        line[rows, cols] = True
        width_px = max(1, round(rng.uniform(0.0007, 0.0011) / px))
        region = ndimage.binary_dilation(line, iterations=width_px) & foot
        groove = ndimage.gaussian_filter(region.astype(float), 0.7)
        height -= 0.003 * groove * foot
        albedo *= (1.0 - 0.65 * np.clip(groove * 1.5, 0, 1))[..., None]
        return region, height
    if kind == "mismatch":
        centres = extras["rib_centres"]
        base = np.asarray((0.72, 0.74, 0.76))
        paint = np.asarray((0.15, 0.25, 0.62))
        victim = centres[int(rng.integers(len(centres)))]
        unpainted = (_rib_profile(f.u, victim) > 0.5) & foot
        free = [
            c for c in np.linspace(-0.029, 0.029, 59) if all(abs(c - o) > 0.0062 for o in centres)
        ]
        if not free:
            raise DataError("no flat place left for a misplaced paint band")
        band = (_rib_profile(f.u, float(rng.choice(free))) > 0.5) & foot
        shade = _texture(rng, (f.h, f.w), 0.02, 0.0)
        albedo[unpainted] = base * shade[unpainted, None]
        albedo[band] = paint * shade[band, None]
        return unpainted | band, shading_height
    if kind == "bare":  # one stud lost its paint: the geometry alone looks normal
        cu, cv = extras["studs"][int(rng.integers(len(extras["studs"])))]
        region = (_stud_cap(f, cu, cv) > 0.35) & foot
        albedo[region] = (
            np.asarray(_STUD_PLATE) * _texture(rng, (f.h, f.w), 0.02, 0.0)[region, None]
        )
        return region, shading_height
    if kind == "ghost":  # paint where there is no stud: the colour alone looks normal
        for _ in range(200):
            r0, c0 = _defect_site(f, foot, rng, int(0.006 / px))
            cu, cv = f.u[r0, c0], f.v[r0, c0]
            if all(np.hypot(cu - a, cv - b) > 0.008 for a, b in extras["studs"]):
                break
        else:
            raise DataError("no free place on the plate for a ghost paint spot")
        region = (_stud_cap(f, cu, cv) > 0.35) & foot
        albedo[region] = (
            np.asarray(_STUD_PAINT) * _texture(rng, (f.h, f.w), 0.02, 0.0)[region, None]
        )
        return region, shading_height
    raise ConfigError(f"unknown defect {kind!r}")


# --------------------------------------------------------------------------- sensor


def _render_rgb(
    f: _Frame, height: np.ndarray, albedo: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    gy, gx = np.gradient(height, f.pitch)
    normal = np.stack([-gx, -gy, np.ones_like(height)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = np.array([-0.35 + rng.uniform(-0.05, 0.05), -0.45 + rng.uniform(-0.05, 0.05), 1.0])
    light /= np.linalg.norm(light)
    lambert = np.clip(normal @ light, 0.0, None) / light[2]
    shade = 0.62 + 0.38 * lambert
    gain = rng.uniform(0.95, 1.05)
    rows, cols = np.mgrid[0 : f.h, 0 : f.w]
    vignette = 1.0 - 0.12 * (((rows - f.h / 2) / f.h) ** 2 + ((cols - f.w / 2) / f.w) ** 2) * 4
    img = albedo * (shade * gain * vignette)[..., None]
    img += rng.normal(0.0, 0.012, size=img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _scan_xyz(
    f: _Frame, height: np.ndarray, foot: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    tilt_x, tilt_y = np.deg2rad(rng.uniform(-6, 6, size=2))
    rx = np.array(
        [[1, 0, 0], [0, np.cos(tilt_x), -np.sin(tilt_x)], [0, np.sin(tilt_x), np.cos(tilt_x)]]
    )
    ry = np.array(
        [[np.cos(tilt_y), 0, np.sin(tilt_y)], [0, 1, 0], [-np.sin(tilt_y), 0, np.cos(tilt_y)]]
    )
    z_obj = -height + rng.normal(0.0, 0.00025, size=height.shape)
    pts = np.stack([f.x, f.y, z_obj], axis=-1) @ (ry @ rx).T
    pts[..., 2] += SENSOR_DISTANCE_M + rng.uniform(-0.02, 0.02)

    missing = rng.random(height.shape) < 0.004  # isolated misses
    slope = np.hypot(*np.gradient(height, f.pitch))
    missing |= (slope > 1.5) & (rng.random(height.shape) < 0.7)  # shadows at steep walls
    for _ in range(int(rng.integers(1, 4))):  # dropout holes
        r0, c0 = rng.integers(0, f.h), rng.integers(0, f.w)
        a, b = rng.uniform(1.5, 5.0, size=2) * f.h / 256
        rows, cols = np.ogrid[0 : f.h, 0 : f.w]
        missing |= ((rows - r0) / a) ** 2 + ((cols - c0) / b) ** 2 < 1.0
    # floating specks (dust, multipath) away from the part: removed by the cluster step
    off_part = ~ndimage.binary_dilation(foot, iterations=max(3, f.h // 25))
    off_rows, off_cols = np.nonzero(off_part[f.h // 8 : -f.h // 8, f.w // 8 : -f.w // 8])
    for _ in range(int(rng.integers(0, 3))):
        if len(off_rows) == 0:
            break
        k = int(rng.integers(len(off_rows)))
        r0, c0 = off_rows[k] + f.h // 8, off_cols[k] + f.w // 8
        pts[r0 : r0 + 3, c0 : c0 + 4, 2] -= rng.uniform(0.015, 0.03)
    pts[missing] = 0.0
    return pts.astype(np.float32)


def render_sample(
    category: str,
    defect: str,
    seed: int,
    split: str,
    index: int,
    size: int,
    apply_defect: bool = True,
) -> Scan:
    """Render one sample; ``defect`` is ``"good"`` or a defect type of the category.

    The part, the lighting and the sensor draw from one generator and the defect
    from another, so ``apply_defect=False`` renders the defect sample's good
    twin: the same scan without the defect (what tests use to prove that a
    stain leaves the geometry untouched and a dent leaves the colour untouched).
    """
    if category not in CATEGORIES:
        raise ConfigError(f"unknown synthetic category {category!r}")
    if defect != "good" and defect not in DEFECTS[category]:
        raise ConfigError(f"category {category!r} has no defect {defect!r}")
    cat_id = list(CATEGORIES).index(category)
    defect_id = 0 if defect == "good" else 1 + DEFECTS[category].index(defect)
    key = [seed, cat_id, _SPLIT_IDS[split], defect_id, index]
    rng = np.random.default_rng(key)
    defect_rng = np.random.default_rng([*key, 1])
    h, w = (round(size * 0.75), size) if category == "ribbed" else (size, size)
    f = _frame(h, w, rng, rotation_deg=25.0 if category != "ribbed" else 6.0)
    height, albedo, foot, extras = _PARTS[category](f, rng)
    background = np.empty((h, w, 3))
    background[:] = (0.24, 0.25, 0.27)
    background *= _texture(rng, (h, w), 0.05, 0.08)[..., None]
    albedo = np.where(foot[..., None], albedo, background)
    mask = np.zeros((h, w), dtype=bool)
    shading_height = height
    if defect != "good" and apply_defect:
        mask, shading_height = _apply_defect(
            defect, category, f, height, albedo, foot, extras, defect_rng
        )
    rgb = _render_rgb(f, shading_height, np.clip(albedo, 0, 1), rng)
    xyz = _scan_xyz(f, height, foot, rng)
    info = {"category": category, "defect": defect, "split": split, "index": index, **extras}
    return Scan(rgb=rgb, xyz=xyz, mask=mask, info=info)


# --------------------------------------------------------------------------- dataset


def _plan(cfg: SynthConfig) -> list[tuple[str, str, str, int]]:
    jobs = []
    for cat in cfg.categories:
        jobs += [(cat, "train", "good", i) for i in range(cfg.n_train)]
        jobs += [(cat, "validation", "good", i) for i in range(cfg.n_validation)]
        jobs += [(cat, "test", "good", i) for i in range(cfg.n_test_good)]
        for d in DEFECTS[cat]:
            jobs += [(cat, "test", d, i) for i in range(cfg.n_test_per_defect)]
    return jobs


def generate(
    out: str | Path,
    config: SynthConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the synthetic dataset to ``out`` (MVTec 3D-AD layout) and return it.

    The tree is built in a temporary sibling folder and renamed into place, so a
    failure never leaves a half-written dataset. An existing non-empty ``out``
    is only replaced with ``overwrite=True``.
    """
    cfg = config or SynthConfig()
    jobs = _plan(cfg)
    with atomic_folder(out, overwrite) as tmp:
        for n, (cat, split, defect, i) in enumerate(jobs):
            scan = render_sample(cat, defect, cfg.seed, split, i, cfg.size)
            folder = tmp / cat / split / defect
            stem = f"{i:03d}"
            write_rgb(folder / "rgb" / f"{stem}.png", scan.rgb)
            write_xyz(folder / "xyz" / f"{stem}.tiff", scan.xyz)
            if split == "test":
                write_mask(folder / "gt" / f"{stem}.png", scan.mask)
            if progress is not None:
                progress(n + 1, len(jobs))
        manifest = {
            "generator": GENERATOR_VERSION,
            "config": {**asdict(cfg), "categories": list(cfg.categories)},
            "categories": {
                c: {
                    "about": CATEGORIES[c],
                    "kind": KINDS[c],
                    "split": "development" if c in DEV_CATEGORIES else "report",
                    "defects": {d: DEFECT_MODALITY[d] for d in DEFECTS[c]},
                }
                for c in cfg.categories
            },
        }
        (tmp / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %d synthetic samples to %s", len(jobs), out)
    return out
