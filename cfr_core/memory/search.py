"""Exact chunked cosine search: memory stays bounded whatever the bank size.

Queries go through the bank in chunks of rows. With low-dimensional features
writing the similarity matrix, not the matmul, is the cost, so chunks of
``NARROW_ROWS`` queries keep it in cache (2-4x faster for 39-d features against
5k-50k rows on 2 cores, bench/results/speed.md); wide features are compute
bound and take the largest chunk the ``budget`` allows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

#: similarity-matrix elements computed at once at most (64 Mi floats = 256 MiB)
DEFAULT_BUDGET = 1 << 26
#: features narrower than this are searched NARROW_ROWS queries at a time (measured on
#: 2 cores, 9k queries against 20k rows: 152-d 0.55 s -> 0.36 s with 64 rows and amax;
#: 768-d is compute bound and gains nothing from small chunks)
NARROW_DIM = 256
NARROW_ROWS = 64


def _check(queries: torch.Tensor, bank: torch.Tensor) -> None:
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != bank dim {bank.shape[1]}")


def _chunk_rows(dim: int, bank_rows: int, budget: int) -> int:
    """Query rows per block: ``budget`` similarity elements at most, and NARROW_ROWS for
    features narrower than NARROW_DIM (their cost is writing the block, not the matmul)."""
    rows = max(1, budget // max(1, bank_rows))
    return min(rows, NARROW_ROWS) if dim < NARROW_DIM else rows


def _similarity_chunks(q: torch.Tensor, b: torch.Tensor, budget: int) -> Iterator[torch.Tensor]:
    """q @ b.T, a block of query rows at a time."""
    rows = _chunk_rows(q.shape[1], b.shape[0], budget)
    for s in range(0, q.shape[0], rows):
        yield q[s : s + rows] @ b.T


def topk_cosine(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    budget: int = DEFAULT_BUDGET,
    bank_is_unit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each Q×k, of the ``k`` most cosine-similar bank rows per query.

    ``queries`` Q×D and ``bank`` M×D; the Q×M similarity matrix is never built whole.
    """
    _check(queries, bank)
    k = min(k, bank.shape[0])
    q = F.normalize(queries.float(), dim=1)
    b = bank.float() if bank_is_unit else F.normalize(bank.float(), dim=1)
    sims, idxs = [], []
    for block in _similarity_chunks(q, b, budget):
        if k == 1:  # max is about twice as fast as topk
            values, indices = block.max(dim=1, keepdim=True)
        else:
            values, indices = torch.topk(block, k, dim=1)
        sims.append(values)
        idxs.append(indices)
    if not sims:
        empty = torch.empty(0, k, device=queries.device)
        return empty, empty.long()
    return torch.cat(sims), torch.cat(idxs)


def nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, budget: int = DEFAULT_BUDGET
) -> torch.Tensor:
    """Euclidean distance (Q,) from each query to its nearest bank row, chunked."""
    _check(queries, bank)
    b = bank.float()
    b_sq = (b**2).sum(dim=1)
    q = queries.float()
    q_sq = (q * q).sum(dim=1)
    out = []
    start = 0
    for block in _similarity_chunks(q, b, budget):
        rows = slice(start, start + block.shape[0])
        start += block.shape[0]
        d2 = (b_sq - 2.0 * block).amin(dim=1) + q_sq[rows]
        out.append(d2.clamp_min(0.0).sqrt())
    return torch.cat(out) if out else torch.empty(0, device=queries.device)


def _max_cosine(q: torch.Tensor, b: torch.Tensor, budget: int) -> torch.Tensor:
    parts = [block.amax(dim=1) for block in _similarity_chunks(q, b, budget)]
    return torch.cat(parts) if parts else torch.empty(0, device=q.device)


def max_cosine(
    queries: torch.Tensor,
    bank: torch.Tensor,
    budget: int = DEFAULT_BUDGET,
    bank_is_unit: bool = False,
) -> torch.Tensor:
    """(Q,) the highest cosine similarity of each query to any bank row: the values of
    ``topk_cosine(queries, bank, 1)`` without the indices (``amax`` is ~1.1-2x faster)."""
    _check(queries, bank)
    q = F.normalize(queries.float(), dim=1)
    return _max_cosine(
        q, bank.float() if bank_is_unit else F.normalize(bank.float(), dim=1), budget
    )


def any_similar(
    queries: torch.Tensor,
    bank: torch.Tensor,
    min_sim: float,
    head: int = 2048,
    budget: int = DEFAULT_BUDGET,
    bank_is_unit: bool = False,
) -> torch.Tensor:
    """(Q,) bool: whether some bank row has cosine similarity >= ``min_sim`` to each query.

    Exact, in two passes: every query against the first ``head`` rows, then only
    the undecided queries against the rest. A coreset bank is stored in
    selection order, so its first rows already cover the feature space and most
    plausible queries are decided by the cheap first pass.
    """
    _check(queries, bank)
    q = F.normalize(queries.float(), dim=1)
    b = bank.float() if bank_is_unit else F.normalize(bank.float(), dim=1)
    found = _max_cosine(q, b[:head], budget) >= min_sim
    undecided = torch.nonzero(~found).squeeze(1)
    if head < b.shape[0] and undecided.numel():
        found[undecided] = _max_cosine(q[undecided], b[head:], budget) >= min_sim
    return found


def max_cosine_pair(
    queries: tuple[torch.Tensor, torch.Tensor],
    banks: tuple[torch.Tensor, torch.Tensor],
    budget: int = DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For two feature sets of the same query pixels and of the same bank pixels (e.g. RGB
    and 3D): each query's highest cosine to any bank row in the first set, in the second,
    and the highest *mean* of the two cosines to one bank row (how well the pair matches).

    One pass over the bank gives all three (the pair needs no third search). Rows need
    not be unit length; ``banks`` must have as many rows as each other."""
    (qa, qb), (ba, bb) = queries, banks
    _check(qa, ba)
    _check(qb, bb)
    if qa.shape[0] != qb.shape[0] or ba.shape[0] != bb.shape[0]:
        raise ValueError(
            f"paired rows differ: queries {qa.shape[0]} / {qb.shape[0]}, "
            f"bank {ba.shape[0]} / {bb.shape[0]}"
        )
    qa, qb = F.normalize(qa.float(), dim=1), F.normalize(qb.float(), dim=1)
    ba, bb = F.normalize(ba.float(), dim=1), F.normalize(bb.float(), dim=1)
    rows = _chunk_rows(max(qa.shape[1], qb.shape[1]), 2 * ba.shape[0], budget)  # two blocks
    best_a, best_b, best_pair = [], [], []
    for s in range(0, qa.shape[0], rows):
        sa, sb = qa[s : s + rows] @ ba.T, qb[s : s + rows] @ bb.T
        best_a.append(sa.amax(dim=1))
        best_b.append(sb.amax(dim=1))
        best_pair.append(sa.add_(sb).amax(dim=1) * 0.5)
    if not best_a:
        empty = torch.empty(0, device=qa.device)
        return empty, empty, empty
    return torch.cat(best_a), torch.cat(best_b), torch.cat(best_pair)
