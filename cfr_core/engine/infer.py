"""The inference loop: features -> anomaly maps and image scores, for every method.

Only foreground pixels are reconstructed and searched (background is set to 0
before the blur anyway), and each image is processed on its own, so results do
not depend on how samples are batched. ``scoring.stride`` > 1 evaluates every
stride-th foreground pixel and interpolates the map between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cfr_core.engine.features import FeatureSet
from cfr_core.engine.model import FittedModel
from cfr_core.engine.timing import NO_TIMER, StageTimer
from cfr_core.errors import ConfigError, ShapeMismatchError
from cfr_core.memory.bank import joint_features
from cfr_core.memory.search import max_cosine, nearest_distance, topk_cosine
from cfr_core.scoring.maps import box_blur, discrepancy, image_scores


@dataclass
class InferenceResult:
    maps: torch.Tensor  # B×G×G raw anomaly maps (after blur)
    scores: torch.Tensor  # B image scores
    replaced: torch.Tensor  # B share of foreground pixels whose RGB reconstruction was replaced
    foreground: torch.Tensor  # B×G×G


def plausibility(pred_rgb: torch.Tensor, rgb_bank: torch.Tensor) -> torch.Tensor:
    """d = 1 - max cosine similarity of each reconstructed RGB feature to the RGB bank (N,)."""
    return 1.0 - max_cosine(pred_rgb, rgb_bank)


def replacement_theta(model: FittedModel) -> float:
    """θ in force: the model's fitted θ, else the config's number."""
    if model.theta is not None:
        return model.theta
    if model.config.scoring.theta == "auto":
        raise ConfigError("the model's θ was never calibrated; refit it")
    return float(model.config.scoring.theta)


def _above(x: float) -> float:
    """The smallest float32 greater than ``x`` (so that ``>=`` on it means ``>`` on x)."""
    return float(torch.nextafter(torch.tensor(x), torch.tensor(2.0)))


def replace_unreliable(
    model: FittedModel,
    p_rgb: torch.Tensor,
    f_rgb: torch.Tensor,
    f_3d: torch.Tensor,
    timer: StageTimer | None = None,
) -> tuple[torch.Tensor, int]:
    """Replace the rows of ``p_rgb`` whose plausibility d >= theta; return (rows, count)."""
    how = model.config.replacement
    if how is None or p_rgb.shape[0] == 0:
        return p_rgb, 0
    timer = timer or NO_TIMER
    banks = model.banks
    with timer("bank search"):
        # d = 1 - max cos >= theta  <=>  no bank row with cos > 1 - theta
        # exact; the pruned index skips the bank rows that cannot reach the limit
        unreliable = ~banks.index("rgb").any_similar(p_rgb, _above(1.0 - replacement_theta(model)))
        n = int(unreliable.sum())
    if n == 0:
        return p_rgb, 0
    with timer("replacement"):
        return _replacement(model, how, p_rgb, f_rgb, f_3d, unreliable, n), n


def _replacement(
    model: FittedModel,
    how: str,
    p_rgb: torch.Tensor,
    f_rgb: torch.Tensor,
    f_3d: torch.Tensor,
    unreliable: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """``p_rgb`` with its ``unreliable`` rows (``n`` of them) replaced by retrieval."""
    banks = model.banks
    query = f_3d[unreliable]
    if how == "attention":
        _, idx = topk_cosine(query, banks.keys, model.retriever.top_k)
        new = model.retriever(query, idx, banks.keys, banks.values)
    elif how == "nn":
        _, idx = topk_cosine(query, banks.keys, 1)
        new = banks.values[idx[:, 0]]
    else:  # cond: among the top-k appearances valid for this geometry, the closest to what we see
        _, idx = topk_cosine(query, banks.keys, model.config.scoring.cond_top_k)
        cand = banks.values[idx]  # n×k×D
        sim = torch.nn.functional.cosine_similarity(cand, f_rgb[unreliable].unsqueeze(1), dim=-1)
        new = cand[torch.arange(n), sim.argmax(dim=1)]
    out = p_rgb.clone()
    out[unreliable] = new
    return out


def _check_dims(model: FittedModel, features: FeatureSet) -> None:
    got = {"rgb": features.rgb.shape[1], "points": features.points.shape[1]}
    if got != model.dims:
        raise ShapeMismatchError(
            f"features have dims {got} but the model was fitted on {model.dims}; "
            "use the extractors recorded in the model"
        )


def pixel_values(
    model: FittedModel, f_rgb: torch.Tensor, f_3d: torch.Tensor, timer: StageTimer | None = None
) -> tuple[torch.Tensor, int]:
    """Anomaly values (N,) of N foreground pixels' features, and how many were replaced."""
    timer = timer or NO_TIMER
    if model.config.method == "btf":
        with timer("bank search"):
            return nearest_distance(joint_features(f_rgb, f_3d), model.joint_bank), 0
    with timer("mapping"):
        p_rgb, p_3d = model.mappers(f_rgb, f_3d)
    p_rgb, n_rep = replace_unreliable(model, p_rgb, f_rgb, f_3d, timer)
    with timer("scoring"):
        values = discrepancy(p_rgb, f_rgb) * discrepancy(p_3d, f_3d)
    if model.config.bank_novelty:
        with timer("bank search"):
            values = values * bank_novelty(model, f_rgb, f_3d)
    return values, n_rep


def bank_novelty(model: FittedModel, f_rgb: torch.Tensor, f_3d: torch.Tensor) -> torch.Tensor:
    """(N,) novelty of observed features: (1 - max cos to the RGB bank) + (1 - max cos to the
    key bank). Near 0 for what the shots showed, larger for appearance or geometry never seen."""
    banks = model.banks
    return (1.0 - banks.index("rgb").max_cosine(f_rgb)) + (
        1.0 - banks.index("keys").max_cosine(f_3d)
    )


def upsample_samples(coarse: torch.Tensor, stride: int, size: int) -> torch.Tensor:
    """Bilinear interpolation of values sampled at full-grid pixels (stride·j, stride·k).

    ``coarse`` is m×m with m = ceil(size / stride); the output is size×size,
    equal to ``coarse`` at the sampled pixels, and the last (size-1) % stride
    rows and columns repeat the nearest sampled value.
    """
    m = coarse.shape[-1]
    span = stride * (m - 1) + 1
    if m == 1:
        return coarse.reshape(1, 1).expand(size, size).clone()
    up = F.interpolate(coarse[None, None], size=(span, span), mode="bilinear", align_corners=True)
    up = up[0, 0]
    if span < size:
        up = F.pad(up[None], (0, size - span, 0, size - span), mode="replicate")[0]
    return up[:size, :size]


def _strided_map(
    model: FittedModel, rgb: torch.Tensor, pts: torch.Tensor, fg: torch.Tensor, timer: StageTimer
) -> tuple[torch.Tensor, float]:
    """G×G map of one sample computed on every ``stride``-th pixel and interpolated.

    Interpolation only mixes foreground samples (normalised by their weights), so
    the background never dilutes the border; the few foreground pixels with no
    foreground sample around them are computed exactly.
    """
    s, size = model.config.scoring.stride, fg.shape[-1]
    out = torch.zeros(fg.shape, dtype=torch.float32, device=fg.device)
    if s == 1:
        values, n_rep = pixel_values(model, rgb[:, fg].T, pts[:, fg].T, timer)
        out[fg] = values.float()
        return out, n_rep / max(1, int(fg.sum()))
    sampled = fg[::s, ::s]
    coarse = torch.zeros(sampled.shape, dtype=torch.float32, device=fg.device)
    values, n_rep = pixel_values(
        model, rgb[:, ::s, ::s][:, sampled].T, pts[:, ::s, ::s][:, sampled].T, timer
    )
    coarse[sampled] = values.float()
    with timer("scoring"):
        weight = upsample_samples(sampled.float(), s, size)
        num = upsample_samples(coarse, s, size)
        covered = fg & (weight > 1e-6)
        out[covered] = num[covered] / weight[covered]
    orphans = fg & ~covered
    n_queries = int(sampled.sum())
    if orphans.any():
        extra, n_extra = pixel_values(model, rgb[:, orphans].T, pts[:, orphans].T, timer)
        out[orphans] = extra.float()
        n_rep, n_queries = n_rep + n_extra, n_queries + int(orphans.sum())
    return out, n_rep / max(1, n_queries)


@torch.no_grad()
def infer(
    model: FittedModel, features: FeatureSet, timer: StageTimer | None = None
) -> InferenceResult:
    """Anomaly maps and scores of ``features`` under ``model``.

    With ``scoring.stride`` s > 1 the mappers and banks see every s-th pixel
    of the foreground and the map is interpolated between them (s² times less
    work; see bench/results/speed.md for what it costs in accuracy).
    ``timer`` (benchmarks) collects the seconds of each stage: standardise,
    mapping, bank search, replacement (retrieval of the unreliable pixels) and
    scoring.
    """
    _check_dims(model, features)
    timer = timer or NO_TIMER
    if model.norm is not None:
        with timer("standardise"):
            features = model.norm.apply(features)
    fg_all = features.foreground
    maps = torch.zeros(fg_all.shape, dtype=torch.float32, device=fg_all.device)
    replaced = torch.zeros(len(features))
    for i in range(len(features)):
        if fg_all[i].any():
            maps[i], replaced[i] = _strided_map(
                model, features.rgb[i], features.points[i], fg_all[i], timer
            )
    with timer("scoring"):
        maps = box_blur(maps, model.config.scoring.blur)
        if model.config.method == "btf":
            scores = maps.reshape(len(features), -1).max(dim=1).values
        else:
            scores = image_scores(maps)
    return InferenceResult(maps=maps, scores=scores, replaced=replaced, foreground=fg_all)
