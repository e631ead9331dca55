"""Exact max-cosine search that skips the bank rows that cannot win.

A bank's unit rows are grouped around ``C`` ≈ √M centres (its first rows: a coreset bank
is stored in selection order, so they are spread over the feature space). Each group
keeps its angular radius r (the widest angle between a member and its centre). The
angle between unit vectors is a metric, so a query at angle α from a centre is at
least α − r from every member, and no member can be more similar than cos(max(0, α − r)).

A query's best so far starts at its most similar centre (a bank row itself); a group is
searched only for the queries whose bound beats their best so far, and the nearest
group of each query goes first so that the bound prunes early. The answer is the same
maximum as a full search (up to float rounding of the same dot products): the bounds
are computed from cosines widened by ``SLACK`` on both sides, never narrowed.

On good parts most queries lie close to a few groups, and the search touches a small
share of the bank (bench/results/serve.md); a query far from everything (a defect)
costs about a full search.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cfr_core.memory.search import any_similar, max_cosine, topk_cosine

#: cosines (float32 dot products of unit rows) are trusted to within this much; the
#: bounds widen by it so that rounding can never prune a row that would have won
SLACK = 1e-4
#: banks smaller than this are searched whole (grouping would cost more than it saves)
MIN_ROWS = 4096
#: features narrower than this are searched whole: on the 38-d FPFH key bank (histograms,
#: every cosine high) the groups overlap and pruning saved too little to be worth its
#: bookkeeping (bench/results/serve.md); the 152-d RGB bank is searched 4-9x faster
MIN_DIM = 64


class CosineIndex:
    """A bank's unit rows, grouped for :meth:`max_cosine` and :meth:`any_similar`."""

    def __init__(self, bank: torch.Tensor, groups: int | None = None) -> None:
        unit = F.normalize(bank.float(), dim=1)
        m = unit.shape[0]
        self.size = m
        self.dim = unit.shape[1]
        self.whole = unit if m < MIN_ROWS or self.dim < MIN_DIM else None
        if self.whole is not None:
            return
        c = groups or max(1, int(math.sqrt(m)))
        self.centres = unit[:c].clone()  # not a view: it would keep all of ``unit`` alive
        sim, owner = (t[:, 0] for t in topk_cosine(unit, self.centres, 1, bank_is_unit=True))
        order = torch.argsort(owner, stable=True)
        self.rows = unit[order].contiguous()
        counts = torch.bincount(owner, minlength=c)
        self.offsets = [0, *torch.cumsum(counts, 0).tolist()]
        # the widest angle of a member from its centre, widened for rounding
        lowest = torch.full((c,), 1.0, dtype=torch.float64, device=unit.device)
        lowest.scatter_reduce_(0, owner, sim.double(), reduce="amin")
        self.radius = torch.arccos((lowest - SLACK).clamp(-1.0, 1.0))

    def _bounds(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q×C upper bounds of any member's cosine per group, Q×C centre cosines)."""
        s = q @ self.centres.T
        alpha = torch.arccos((s.double() + SLACK).clamp(-1.0, 1.0))
        ub = torch.cos((alpha - self.radius).clamp_min(0.0)) + SLACK
        return ub, s

    def _group(self, j: int) -> torch.Tensor:
        return self.rows[self.offsets[j] : self.offsets[j + 1]]

    def max_cosine(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q,) each query's highest cosine similarity to any bank row."""
        if self.whole is not None:
            return max_cosine(queries, self.whole, bank_is_unit=True)
        q = F.normalize(queries.float(), dim=1)
        if q.shape[0] == 0:
            return torch.empty(0)
        ub, s = self._bounds(q)
        best, first = s.max(dim=1)
        # nearest group first: it holds the likely winner and tightens every bound
        for j in torch.unique(first).tolist():
            who = torch.nonzero(first == j).squeeze(1)
            best[who] = torch.maximum(best[who], (q[who] @ self._group(j).T).amax(dim=1))
        ub[torch.arange(q.shape[0]), first] = -math.inf
        for j in range(len(self.offsets) - 1):
            who = torch.nonzero(ub[:, j] > best.double()).squeeze(1)
            if who.numel() and self.offsets[j + 1] > self.offsets[j]:
                best[who] = torch.maximum(best[who], (q[who] @ self._group(j).T).amax(dim=1))
        return best

    def any_similar(self, queries: torch.Tensor, min_sim: float) -> torch.Tensor:
        """(Q,) bool: whether some bank row has cosine similarity >= ``min_sim``."""
        if self.whole is not None:
            return any_similar(queries, self.whole, min_sim, bank_is_unit=True)
        q = F.normalize(queries.float(), dim=1)
        if q.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool)
        ub, s = self._bounds(q)
        found = s.amax(dim=1) >= min_sim
        reachable = ub >= min_sim
        for j in range(len(self.offsets) - 1):
            who = torch.nonzero(reachable[:, j] & ~found).squeeze(1)
            if who.numel() and self.offsets[j + 1] > self.offsets[j]:
                found[who] = (q[who] @ self._group(j).T).amax(dim=1) >= min_sim
        return found
