"""The inference loop: features -> anomaly maps and image scores, for every method.

Only foreground pixels are reconstructed and searched (background is set to 0
before the blur anyway), and each image is processed on its own, so results do
not depend on how samples are batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfr_core.engine.features import FeatureSet
from cfr_core.engine.model import FittedModel
from cfr_core.errors import ShapeMismatchError
from cfr_core.memory.bank import joint_features
from cfr_core.memory.search import nearest_distance, topk_cosine
from cfr_core.scoring.maps import box_blur, discrepancy, image_scores


@dataclass
class InferenceResult:
    maps: torch.Tensor  # B×G×G raw anomaly maps (after blur)
    scores: torch.Tensor  # B image scores
    replaced: torch.Tensor  # B share of foreground pixels whose RGB reconstruction was replaced
    foreground: torch.Tensor  # B×G×G


def plausibility(pred_rgb: torch.Tensor, rgb_bank: torch.Tensor) -> torch.Tensor:
    """d = 1 - max cosine similarity of each reconstructed RGB feature to the RGB bank (N,)."""
    sims, _ = topk_cosine(pred_rgb, rgb_bank, 1)
    return 1.0 - sims[:, 0]


def replace_unreliable(
    model: FittedModel, p_rgb: torch.Tensor, f_rgb: torch.Tensor, f_3d: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Replace the rows of ``p_rgb`` whose plausibility d >= theta; return (rows, count)."""
    how = model.config.replacement
    if how is None or p_rgb.shape[0] == 0:
        return p_rgb, 0
    banks = model.banks
    unreliable = plausibility(p_rgb, banks.rgb) >= model.config.scoring.theta
    n = int(unreliable.sum())
    if n == 0:
        return p_rgb, 0
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
    return out, n


def _check_dims(model: FittedModel, features: FeatureSet) -> None:
    got = {"rgb": features.rgb.shape[1], "points": features.points.shape[1]}
    if got != model.dims:
        raise ShapeMismatchError(
            f"features have dims {got} but the model was fitted on {model.dims}; "
            "use the extractors recorded in the model"
        )


@torch.no_grad()
def infer(model: FittedModel, features: FeatureSet) -> InferenceResult:
    """Anomaly maps and scores of ``features`` under ``model``."""
    _check_dims(model, features)
    if model.norm is not None:
        features = model.norm.apply(features)
    fg_all = features.foreground
    maps = torch.zeros(fg_all.shape, dtype=torch.float32)
    replaced = torch.zeros(len(features))
    for i in range(len(features)):
        fg = fg_all[i]
        n_fg = int(fg.sum())
        if n_fg == 0:
            continue
        f_rgb, f_3d = features.rgb[i][:, fg].T, features.points[i][:, fg].T
        if model.config.method == "btf":
            values = nearest_distance(joint_features(f_rgb, f_3d), model.joint_bank)
        else:
            p_rgb, p_3d = model.mappers(f_rgb, f_3d)
            p_rgb, n_rep = replace_unreliable(model, p_rgb, f_rgb, f_3d)
            replaced[i] = n_rep / n_fg
            values = discrepancy(p_rgb, f_rgb) * discrepancy(p_3d, f_3d)
        maps[i][fg] = values.float()
    maps = box_blur(maps, model.config.scoring.blur)
    if model.config.method == "btf":
        scores = maps.reshape(len(features), -1).max(dim=1).values
    else:
        scores = image_scores(maps)
    return InferenceResult(maps=maps, scores=scores, replaced=replaced, foreground=fg_all)
