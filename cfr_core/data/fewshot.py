"""Few-shot selection of normal samples, exactly as the published protocol.

Sort the train/good pairs, draw ``numpy.random.default_rng(seed).choice(N, k,
replace=False)``, sort the drawn indices. The chosen files are returned so that
lineage can record them (paths and, by the caller, their hashes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfr_core.data.mvtec import Sample
from cfr_core.errors import ConfigError, EmptyCategoryError

DEFAULT_FEWSHOT_SEED = 42


@dataclass(frozen=True)
class ShotSelection:
    """The k normal samples chosen out of N, with the indices into the sorted list."""

    k: int
    seed: int
    n_available: int
    indices: tuple[int, ...]
    samples: tuple[Sample, ...]


def select_shots(samples: list[Sample], k: int, seed: int = DEFAULT_FEWSHOT_SEED) -> ShotSelection:
    """Choose ``k`` of the normal ``samples`` (any order; they are sorted by stem first)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"shots must be a positive integer, got {k!r}")
    pool = sorted(samples, key=lambda s: (s.stem, str(s.rgb_path)))
    if not pool:
        raise EmptyCategoryError("no normal samples to choose shots from")
    if any(s.label != 0 for s in pool):
        raise ConfigError("few-shot selection takes normal (good) samples only")
    if k > len(pool):
        raise ConfigError(f"asked for {k} shots but only {len(pool)} normal samples exist")
    idx = np.sort(np.random.default_rng(seed).choice(len(pool), int(k), replace=False))
    return ShotSelection(
        k=int(k),
        seed=int(seed),
        n_available=len(pool),
        indices=tuple(int(i) for i in idx),
        samples=tuple(pool[i] for i in idx),
    )
