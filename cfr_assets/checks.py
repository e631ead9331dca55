"""Blocking checks on the candidate model: a failing one stops deployed_bank in the same run.

Each check judges the evaluation_report version of its own run (never a
"latest" pointer) and carries ``partitions_def``: without it a run for one
category would load every category's artifact.
"""

import math

import dagster as dg
import torch

from cfr_assets.assets.evaluation import candidate_ref, evaluation_report
from cfr_assets.partitions import category_partitions
from cfr_assets.resources import CFRModelSettings, CFRStore
from cfr_core.io.artifacts import load_model
from cfr_core.memory.bank import coreset_size


def _candidate(context, store: CFRStore):
    return load_model(candidate_ref(context, store).folder)


@dg.asset_check(
    asset=evaluation_report,
    blocking=True,
    partitions_def=category_partitions,
    description="Every learned tensor (mappers, retriever, banks, standardisation) is finite.",
)
def finite_weights(context: dg.AssetCheckExecutionContext, store: CFRStore) -> dg.AssetCheckResult:
    model = _candidate(context, store)
    bad = [name for name, t in model.tensors().items() if not torch.isfinite(t).all()]
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={"non_finite": ", ".join(bad) or "none", "tensors": len(model.tensors())},
    )


@dg.asset_check(
    asset=evaluation_report,
    blocking=True,
    partitions_def=category_partitions,
    description=(
        "Banks have the feature dimensions of the extractors, at most the coreset size "
        "of the shots, and as many values as keys."
    ),
)
def bank_shape(context: dg.AssetCheckExecutionContext, store: CFRStore) -> dg.AssetCheckResult:
    model = _candidate(context, store)
    dims, cfg = model.dims, model.config
    problems = []
    if model.banks is not None:
        expected = coreset_size(len(model.shots) * cfg.extractors.grid**2, cfg.banks.coreset_ratio)
        for name, t, d in (
            ("rgb", model.banks.rgb, dims["rgb"]),
            ("keys", model.banks.keys, dims["points"]),
            ("values", model.banks.values, dims["rgb"]),
        ):
            if t.ndim != 2 or t.shape[1] != d:
                problems.append(f"{name} bank has shape {tuple(t.shape)}, expected (*, {d})")
            elif not 0 < t.shape[0] <= expected:  # fewer only when the shots repeat rows
                problems.append(f"{name} bank has {t.shape[0]} entries, expected 1..{expected}")
        if model.banks.keys.shape[0] != model.banks.values.shape[0]:
            problems.append("key and value banks differ in length")
    if model.joint_bank is not None and model.joint_bank.shape[1] != dims["rgb"] + dims["points"]:
        problems.append(f"joint bank has width {model.joint_bank.shape[1]}")
    if cfg.needs_banks and model.banks is None:
        problems.append(f"{cfg.method} needs banks but has none")
    sizes = (
        {} if model.banks is None else {k: list(v.shape) for k, v in model.banks.tensors().items()}
    )
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"problems": "; ".join(problems) or "none", "sizes": dg.MetadataValue.json(sizes)},
    )


@dg.asset_check(
    asset=evaluation_report,
    blocking=True,
    partitions_def=category_partitions,
    description="Test metrics are not worse than the deployed version's beyond the tolerance.",
)
def no_regression(
    context: dg.AssetCheckExecutionContext, settings: CFRModelSettings, store: CFRStore
) -> dg.AssetCheckResult:
    new = _candidate(context, store).extra.get("metrics") or {}
    live = store.registry().deployed(context.partition_key)
    if live is None or not live.metrics or not new:
        reason = "first deployment" if live is None else "no metrics to compare"
        return dg.AssetCheckResult(passed=True, metadata={"reason": reason})
    worse = []
    for name, get in (
        ("image_auroc", lambda m: m["image_auroc"]),
        ("aupro@0.3", lambda m: m["aupro"]["0.3"]),
    ):
        old, cur = float(get(live.metrics)), float(get(new))
        if not math.isnan(old) and cur < old - settings.tolerance:
            worse.append(
                f"{name} {cur:.3f} < deployed v{live.version} {old:.3f} - {settings.tolerance}"
            )
    return dg.AssetCheckResult(
        passed=not worse,
        metadata={
            "deployed_version": live.version,
            "regressions": "; ".join(worse) or "none",
            "tolerance": settings.tolerance,
        },
    )


checks = [finite_weights, bank_shape, no_regression]
