"""Per-stage wall-clock timing for the benchmarks (a no-op unless asked for).

``infer(model, features, timer=StageTimer())`` adds the seconds spent in each
inference stage to ``timer.seconds``. On a GPU the device is synchronised at
each stage boundary, otherwise asynchronous kernels would be billed to the
wrong stage.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates seconds per named stage."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def total(self) -> float:
        return sum(self.seconds.values())


class _NoTimer:
    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        yield


NO_TIMER = _NoTimer()
