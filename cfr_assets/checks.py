"""Blocking checks on the candidate model: a failing one stops deployed_bank in the same run.

Each check judges the evaluation_report version of its own run (never a
"latest" pointer) and carries ``partitions_def``: without it a run for one
category would load every category's artifact.
"""

import math
import warnings

import dagster as dg
import torch
from safetensors.torch import load_file

from cfr_assets.assets.evaluation import candidate_ref, evaluation_report
from cfr_assets.partitions import category_partitions
from cfr_assets.resources import CFRModelSettings, CFRStore
from cfr_core.io.artifacts import MODEL_JSON, WEIGHTS, load_model, read_json
from cfr_core.io.stages import REPORT_JSON
from cfr_core.memory.bank import coreset_size

# partitioned checks are a Dagster preview feature, on purpose (one check result per
# category); its warning would be the first line of every `cfr` command's output
warnings.filterwarnings(
    "ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=Warning
)


def _candidate(context, store: CFRStore):
    return load_model(candidate_ref(context, store).folder)


def candidate_report(context, store: CFRStore) -> dict:
    """The candidate's report.json (metrics, per-scan verdicts, calibration)."""
    return candidate_ref(context, store).json(REPORT_JSON)


@dg.asset_check(
    asset=evaluation_report,
    blocking=True,
    partitions_def=category_partitions,
    description="Every learned tensor (mappers, retriever, banks, standardisation) is finite.",
)
def finite_weights(context: dg.AssetCheckExecutionContext, store: CFRStore) -> dg.AssetCheckResult:
    # read from the files, not through load_model: a model whose weights are NaN also
    # has a NaN θ, which load_model refuses before this check could name the tensor
    folder = candidate_ref(context, store).folder
    tensors = load_file(str(folder / WEIGHTS))
    bad = [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    meta = read_json(folder / MODEL_JSON, "model.json")
    bad += [
        k
        for k in ("theta", "threshold", "gate_threshold")
        if isinstance(meta.get(k), float) and not math.isfinite(meta[k])
    ]
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={"non_finite": ", ".join(bad) or "none", "tensors": len(tensors)},
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
    tolerance = settings.tolerance
    if not (math.isfinite(tolerance) and tolerance >= 0):  # NaN would pass every candidate
        return dg.AssetCheckResult(
            passed=False,
            metadata={"reason": f"tolerance must be a finite number >= 0, got {tolerance!r}"},
        )
    worse = []
    for name, get in (
        ("image_auroc", lambda m: m["image_auroc"]),
        ("aupro@0.3", lambda m: m["aupro"]["0.3"]),
    ):
        old, cur = float(get(live.metrics)), float(get(new))
        if math.isnan(cur) and not math.isnan(old):
            worse.append(f"{name} is not a number (deployed v{live.version} {old:.3f})")
        elif not math.isnan(old) and cur < old - tolerance:
            worse.append(f"{name} {cur:.3f} < deployed v{live.version} {old:.3f} - {tolerance}")
    return dg.AssetCheckResult(
        passed=not worse,
        metadata={
            "deployed_version": live.version,
            "regressions": "; ".join(worse) or "none",
            "tolerance": settings.tolerance,
        },
    )


#: a candidate fails `line_false_reject` when this improbable under the rate it promises
LINE_CHECK_P = 0.05


def excess_false_rejects(n_good: int, rejected: int, beta: tuple[int, int]) -> float:
    """P(at least ``rejected`` of ``n_good`` good parts fail) when the threshold's false-reject
    rate is Beta(``beta``) distributed, as its calibration says (beta-binomial): small when
    the observed false rejects exceed what the calibration promised by more than chance,
    the calibration's own included, explains."""
    from scipy.stats import betabinom

    return float(betabinom.sf(rejected - 1, n_good, *beta)) if rejected > 0 else 1.0


@dg.asset_check(
    asset=evaluation_report,
    blocking=True,
    partitions_def=category_partitions,
    description="On the labelled good test scans, the candidate's false rejects at its line "
    "threshold stay within what its calibration promises: the threshold's false-reject rate "
    "is Beta(n+1-k, k) for n calibration scans, so the count on the test scans is "
    "beta-binomial; the check fails at p < 0.05.",
)
def line_false_reject(
    context: dg.AssetCheckExecutionContext, store: CFRStore
) -> dg.AssetCheckResult:
    model = _candidate(context, store)
    report = candidate_report(context, store)
    scans = [s for s in report.get("scans") or [] if s.get("defect") == "good"]
    if model.threshold is None or model.calibration is None or not scans:
        why = "no labelled good test scans" if not scans else "the candidate has no calibration"
        return dg.AssetCheckResult(passed=True, metadata={"reason": why})
    cal = model.calibration
    allowed = cal.expected_rate
    rejected = [s for s in scans if s["verdict"] == "FAIL"]
    p = excess_false_rejects(len(scans), len(rejected), cal.beta())

    def over(score: float) -> str:
        if model.threshold > 0 and math.isfinite(score):
            return f"{score / model.threshold - 1:+.0%} over the threshold"
        return f"threshold {model.threshold:.4g}"

    detail = "; ".join(
        f"{s['name']} {s['score']:.3f} ({over(s['score'])})"
        for s in sorted(rejected, key=lambda s: -s["score"])
    )
    passed = p >= LINE_CHECK_P
    summary = (
        f"{len(rejected)} of {len(scans)} good test scans rejected ({len(rejected) / len(scans):.1%})"
        f" at threshold {model.threshold:.4f}; the calibration promises <= {allowed:.1%} in "
        f"expectation (P = {p:.3f} of seeing this many or more)"
    )
    if not passed:
        context.log.error(f"{context.partition_key}: {summary}: {detail}")
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "summary": summary,
            "false_reject_rate": len(rejected) / len(scans),
            "allowed_rate": allowed,
            "p_value": p,
            "rejected good scans": detail or "none",
        },
    )


@dg.asset_check(
    asset=evaluation_report,
    partitions_def=category_partitions,
    description="The good scans the line threshold was calibrated on can support the target "
    "false-reject rate (WARN when too few: the threshold is then the highest score x (1 + "
    "margin), which the scans do not prove).",
)
def threshold_calibration(
    context: dg.AssetCheckExecutionContext, store: CFRStore
) -> dg.AssetCheckResult:
    cal = _candidate(context, store).calibration
    if cal is None:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"reason": "the candidate has no calibration record"},
        )
    return dg.AssetCheckResult(
        passed=cal.supported,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "calibration": cal.sentence(),
            "n": cal.n,
            "needed": cal.needed,
            "target": cal.target,
            "expected_false_reject_bound": cal.expected_rate,
            "bound_90pct": cal.confidence_bound,
        },
    )


checks = [finite_weights, bank_shape, no_regression, line_false_reject, threshold_calibration]
