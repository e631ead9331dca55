"""The training loop (one, shared) and the two things it trains: mappers and retriever.

Batch size 1 as in the paper: one shot image per step, shots visited in a
seeded random order each epoch, Adam. A non-finite loss raises
:class:`TrainingError` naming the stage, epoch and step (the reference code
calls ``exit()``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cfr_core.config import MapperConfig, RetrieverConfig
from cfr_core.engine.features import FeatureSet
from cfr_core.errors import CFRError
from cfr_core.memory.bank import Banks
from cfr_core.memory.search import topk_cosine
from cfr_core.models.mappers import CrossModalMappers, cosine_loss
from cfr_core.models.retriever import AttentionRetriever

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float], None]  # stage, epoch, epochs, mean loss


class TrainingError(CFRError):
    """Training diverged (non-finite loss) or cannot start."""


@dataclass
class History:
    """Mean loss per epoch of one training stage."""

    stage: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def run_training(
    stage: str,
    module: nn.Module,
    n_items: int,
    step_loss: Callable[[int, torch.Generator], torch.Tensor],
    lr: float,
    epochs: int,
    seed: int,
    progress: Progress | None = None,
) -> History:
    """Train ``module`` with Adam; each step's loss is ``step_loss(item, generator)``."""
    if n_items < 1:
        raise TrainingError(f"{stage}: nothing to train on")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    history = History(stage)
    start = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        for step, item in enumerate(torch.randperm(n_items, generator=gen).tolist()):
            loss = step_loss(item, gen)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{stage}: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    "check the features for NaN/inf or lower the learning rate"
                )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += float(loss.detach())
        history.losses.append(total / n_items)
        if progress is not None:
            progress(stage, epoch + 1, epochs, history.losses[-1])
    module.eval()
    history.seconds = time.perf_counter() - start
    log.info(
        "%s: %d epochs in %.1f s, final loss %.4f",
        stage,
        epochs,
        history.seconds,
        history.losses[-1],
    )
    return history


def _foreground_rows(features: FeatureSet, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    fg = features.foreground[i]
    return features.rgb[i][:, fg].T, features.points[i][:, fg].T


def train_mappers(
    features: FeatureSet,
    config: MapperConfig,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CrossModalMappers, History]:
    """Fit the crossmodal mappers on the foreground pixels of the shots (on ``device``;
    the mappers come back on the CPU)."""
    torch.manual_seed(config.seed)
    mappers = CrossModalMappers(features.rgb.shape[1], features.points.shape[1], config)
    mappers.to(device)
    rows = [
        tuple(t.to(device) for t in _foreground_rows(features, i)) for i in range(len(features))
    ]
    if all(r[0].shape[0] == 0 for r in rows):
        raise TrainingError("mappers: the shots have no foreground pixel (no valid 3D point)")
    rows = [r for r in rows if r[0].shape[0] > 0]

    def step(i: int, _: torch.Generator) -> torch.Tensor:
        return mappers.loss(*rows[i])

    history = run_training(
        "mappers", mappers, len(rows), step, config.lr, config.epochs, config.seed, progress
    )
    return mappers.cpu(), history


def _candidates(
    queries: torch.Tensor,
    banks: Banks,
    k: int,
    max_bank: int,
    pre: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Top-k key indices per query among a random subset of at most ``max_bank`` entries.

    ``pre`` holds each query's top candidates over the whole bank; the first k
    that survive the subset are exactly the subset's top-k. Rows where fewer than
    k survive are searched again inside the subset.
    """
    m = banks.keys.shape[0]
    if m <= max_bank:
        return pre[:, :k]
    keep = torch.zeros(m, dtype=torch.bool)
    keep[torch.randperm(m, generator=gen)[:max_bank]] = True
    alive = keep[pre]
    order = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :k]
    out = torch.gather(pre, 1, order)
    short = alive.sum(dim=1) < k
    if short.any():
        subset = torch.nonzero(keep).squeeze(1)
        _, local = topk_cosine(queries[short], banks.keys[subset], k)
        out[short] = subset[local]
    return out


def train_retriever(
    features: FeatureSet, banks: Banks, config: RetrieverConfig, progress: Progress | None = None
) -> tuple[AttentionRetriever, History]:
    """Teach the retriever to predict the real RGB feature of a shot pixel from its 3D feature."""
    torch.manual_seed(config.seed)
    retriever = AttentionRetriever(
        banks.keys.shape[1], banks.values.shape[1], config.d_model, config.top_k
    )
    gen = torch.Generator().manual_seed(config.seed)
    items = []
    spare = min(banks.keys.shape[0], config.top_k + 16)
    for i in range(len(features)):
        f_rgb, f_3d = _foreground_rows(features, i)
        if f_3d.shape[0] == 0:
            continue
        if f_3d.shape[0] > config.max_queries:  # one fixed draw of at most max_queries per image
            pick = torch.randperm(f_3d.shape[0], generator=gen)[: config.max_queries]
            f_rgb, f_3d = f_rgb[pick], f_3d[pick]
        _, pre = topk_cosine(f_3d, banks.keys, spare)
        items.append((f_rgb, f_3d, pre))
    if not items:
        raise TrainingError("retriever: the shots have no foreground pixel (no valid 3D point)")
    keys, values = banks.keys, banks.values

    def step(i: int, g: torch.Generator) -> torch.Tensor:
        target, query, pre = items[i]
        idx = _candidates(query, banks, config.top_k, config.max_bank, pre, g)
        return cosine_loss(retriever(query, idx, keys, values), target)

    history = run_training(
        "retriever", retriever, len(items), step, config.lr, config.epochs, config.seed, progress
    )
    return retriever, history
