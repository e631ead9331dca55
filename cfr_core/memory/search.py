"""Chunked top-k cosine search: memory stays bounded whatever the bank size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: similarity-matrix elements computed at once (64 Mi floats = 256 MiB)
DEFAULT_BUDGET = 1 << 26


def topk_cosine(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    budget: int = DEFAULT_BUDGET,
    bank_is_unit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each Q×k, of the ``k`` most cosine-similar bank rows per query.

    ``queries`` Q×D and ``bank`` M×D; the Q×M similarity matrix is never built
    whole: queries go in chunks of ``budget // M`` rows.
    """
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != bank dim {bank.shape[1]}")
    k = min(k, bank.shape[0])
    q = F.normalize(queries.float(), dim=1)
    b = bank.float() if bank_is_unit else F.normalize(bank.float(), dim=1)
    rows = max(1, budget // max(1, bank.shape[0]))
    sims, idxs = [], []
    for s in range(0, q.shape[0], rows):
        top = torch.topk(q[s : s + rows] @ b.T, k, dim=1)
        sims.append(top.values)
        idxs.append(top.indices)
    if not sims:
        empty = torch.empty(0, k, device=queries.device)
        return empty, empty.long()
    return torch.cat(sims), torch.cat(idxs)


def nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, budget: int = DEFAULT_BUDGET
) -> torch.Tensor:
    """Euclidean distance (Q,) from each query to its nearest bank row, chunked."""
    rows = max(1, budget // max(1, bank.shape[0]))
    b_sq = (bank.float() ** 2).sum(dim=1)
    out = []
    for s in range(0, queries.shape[0], rows):
        q = queries[s : s + rows].float()
        d2 = (q * q).sum(dim=1, keepdim=True) - 2.0 * q @ bank.float().T + b_sq
        out.append(d2.min(dim=1).values.clamp_min(0.0).sqrt())
    return torch.cat(out) if out else torch.empty(0, device=queries.device)
