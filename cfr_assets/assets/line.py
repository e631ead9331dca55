"""line_summary: what the line did with each deployed model (`cfr serve`'s verdict log).

Per category, for the deployed model (its hash): how many parts it judged, PASS / FAIL
counts, the FAIL rate against the rate its calibration predicts for good parts, and how
the line's scores sit against the calibration scores (drift). The ``line_fail_rate``
check warns when a category fails more parts than good parts alone explain.
"""

import statistics
from pathlib import Path

import dagster as dg

from cfr_assets.partitions import OWNERS
from cfr_assets.resources import CFRStore
from cfr_core.errors import CFRError
from cfr_core.io.artifacts import MODEL_JSON, read_json
from cfr_core.line_log import LineLog
from cfr_core.scoring.verdict import Calibration

LINE = "line"
#: fewest verdicts before the FAIL rate is judged
MIN_VERDICTS = 10
#: the check warns when the FAIL count is this improbable for good parts alone
FAIL_RATE_P = 0.01


def summarise_category(registry, log: LineLog, category: str) -> dict | None:
    """One category's line summary for its deployed model; None when nothing is deployed.
    A deployment whose model.json cannot be read is summarised with ``unreadable`` set."""
    from scipy.stats import betabinom

    record = registry.deployed(category)
    if record is None:
        return None
    rows = log.rows(category)
    mine = [r for r in rows if r.model_hash == record.model_hash]
    n = len(mine)
    fails = sum(r.verdict == "FAIL" for r in mine)
    out = {
        "category": category,
        "version": record.version,
        "verdicts": n,
        "other_models": len(rows) - n,  # answered by another model (before a swap, a refusal)
        "pass": sum(r.verdict == "PASS" for r in mine),
        "fail": fails,
        "fail_rate": fails / n if n else None,
        "predicted_good_fail_rate": None,
        "p_value": None,
        "median_score": statistics.median(r.score for r in mine) if mine else None,
        "calibration_median": None,
        "drift": None,
        "above_calibration_max": None,
        "unreadable": "",
    }
    try:
        meta = read_json(Path(record.model_path) / MODEL_JSON, "model.json")
        cal = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
    except (CFRError, ValueError, TypeError, KeyError) as exc:
        out["unreadable"] = str(exc)
        return out
    if cal is None:
        return out
    out["predicted_good_fail_rate"] = cal.expected_rate
    if mine:
        scores = cal.all_scores()
        out["calibration_median"] = statistics.median(scores)
        if out["calibration_median"] > 0:
            out["drift"] = out["median_score"] / out["calibration_median"]
        out["above_calibration_max"] = sum(r.score > max(scores) for r in mine) / n
        # the calibrated threshold's false-reject rate is Beta-distributed: the FAIL count of
        # good parts alone is beta-binomial
        out["p_value"] = float(betabinom.sf(fails - 1, n, *cal.beta())) if fails else 1.0
    return out


def departs(summary: dict) -> bool:
    """More FAILs than good parts alone explain (enough verdicts to judge)."""
    return (
        summary["verdicts"] >= MIN_VERDICTS
        and summary["p_value"] is not None
        and summary["p_value"] < FAIL_RATE_P
    )


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@dg.asset(
    group_name=LINE,
    owners=OWNERS,
    kinds={"sql"},
    description="""What the line did with each deployed model, from the verdicts `cfr serve`
records: parts judged, PASS / FAIL, the FAIL rate against what calibration predicts for
good parts, and the line's median score against the calibration scores' (drift: 1.0 =
same). Warned by the `line_fail_rate` check.""",
)
def line_summary(context: dg.AssetExecutionContext, store: CFRStore) -> dg.MaterializeResult:
    registry = store.registry()
    log = LineLog(registry.engine)
    summaries = [
        s for c in registry.categories() if (s := summarise_category(registry, log, c)) is not None
    ]
    lines = [
        "| category | version | parts | PASS | FAIL | FAIL rate | good parts predicted | "
        "median score / calibration's | above calibration max | by other models | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['category']} | {s['version']} | {s['verdicts']} | {s['pass']} | {s['fail']} | "
            f"{_fmt(s['fail_rate'], '.1%')} | <= {_fmt(s['predicted_good_fail_rate'], '.1%')} | "
            f"{_fmt(s['drift'], '.2f')} | {_fmt(s['above_calibration_max'], '.1%')} | "
            f"{s['other_models']} | {s['unreadable'] or ''} |"
        )
    return dg.MaterializeResult(
        metadata={
            "line": dg.MetadataValue.md("\n".join(lines)),
            "parts judged": sum(s["verdicts"] for s in summaries),
            "parts failed": sum(s["fail"] for s in summaries),
            "categories departing": ", ".join(s["category"] for s in summaries if departs(s))
            or "none",
            "unreadable deployments": ", ".join(s["category"] for s in summaries if s["unreadable"])
            or "none",
        }
    )


@dg.asset_check(
    asset=line_summary,
    description="WARN when a category's FAIL rate on the line is higher than its calibration "
    f"predicts for good parts (beta-binomial, p < {FAIL_RATE_P}, at least {MIN_VERDICTS} "
    "verdicts): defects, or a line that drifted from the scans the model was fitted on.",
)
def line_fail_rate(store: CFRStore) -> dg.AssetCheckResult:
    registry = store.registry()
    log = LineLog(registry.engine)
    bad = []
    for category in registry.categories():
        s = summarise_category(registry, log, category)
        if s is not None and departs(s):
            drift = "-" if s["drift"] is None else f"{s['drift']:.2f}x"
            bad.append(
                f"{category}: {s['fail']}/{s['verdicts']} failed ({s['fail_rate']:.1%}) where "
                f"good parts fail <= {s['predicted_good_fail_rate']:.1%} "
                f"(p = {s['p_value']:.2g}; median score {drift} calibration's)"
            )
    return dg.AssetCheckResult(
        passed=not bad,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"departing": "; ".join(bad) or "none"},
    )
