"""PASS / FAIL on the line: the threshold rule, and what a factory reads at a threshold.

A factory reads two numbers at the deployed threshold: the **false-reject rate**
(good parts failed) and the **escape rate** (defective parts passed). This module
computes both from scored, labelled scans (:func:`verdicts`), the lowest escape
rate any threshold reaches at the same false-reject rate on the same scans (the
*oracle*: calibration quality apart from detector quality), and sets the line's
threshold from good scans' scores to a stated false-reject rate
(:func:`calibrate_threshold`).

The rule's statistical basis: for n good scans whose scores are exchangeable with
a new good part's, the share of good parts scoring above the k-th smallest score
S_(k) is Beta(n+1-k, k) distributed (mean (n+1-k)/(n+1)). The threshold S_(k) with
k = ceil((n+1)(1-target)) therefore rejects at most ``target`` of good parts in
expectation (split conformal), whatever the score's distribution. When n is too
small for that (k > n), no order statistic can promise the target: the threshold
is then the highest score times (1 + margin), the calibration says so, and the
only promise left is the one the highest score makes (expected rate <= 1/(n+1)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.special import betaincinv

GOOD = "good"
#: the confidence of the upper bound stated beside the expected false-reject rate
CONFIDENCE = 0.9
ORDER_STATISTIC = "order statistic"
MAX_TIMES_MARGIN = "highest score x (1 + margin)"


def needed_scans(target: float) -> int:
    """The fewest good scans whose order statistic supports ``target`` (k <= n)."""
    return max(1, math.ceil((1.0 - target) / target - 1e-9))


def rate_bound(n: int, k: int, confidence: float = CONFIDENCE) -> float:
    """Upper ``confidence`` bound on the false-reject rate of the threshold S_(k) of n scores."""
    return float(betaincinv(n + 1 - k, k, confidence))


#: the source name of the shots' leave-one-out scores: recorded and read for the highest
#: score, never counted as exchangeable with new parts (their banks hold one shot fewer)
LEAVE_ONE_OUT = "leave-one-out shots"


@dataclass(frozen=True)
class Calibration:
    """How the line's threshold was set: the rule, from how many good scans, what it promises.

    ``n`` counts the scans exchangeable with new good parts (every source but
    :data:`LEAVE_ONE_OUT`); only they decide whether the target is supported and what the
    bounds are. A record is accepted on load only if recomputing the rule from its own
    scores, target and margin gives every one of its fields back.
    """

    threshold: float
    rule: str  # ORDER_STATISTIC or MAX_TIMES_MARGIN
    target: float  # the stated false-reject rate
    n: int  # exchangeable good scans it was set on
    k: int  # the order statistic (1-based) the threshold is, or is above (k = n)
    supported: bool  # n supports the target (k <= n)
    needed: int  # scans the target needs
    expected_rate: float  # expected false-reject rate is at most this
    confidence_bound: float  # ... and at most this with CONFIDENCE
    margin: float = 0.0  # MAX_TIMES_MARGIN only
    # every good score it read, by source (validation/good, other good scans, the shots'
    # leave-one-out scores): what the line's scores are compared with for drift
    scores: dict[str, list[float]] = field(default_factory=dict)

    @property
    def sources(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.scores.items()}

    def all_scores(self) -> list[float]:
        return sorted(x for v in self.scores.values() for x in v)

    def beta(self) -> tuple[int, int]:
        """(a, b): the threshold's false-reject rate is at most Beta(a, b) distributed for good
        parts exchangeable with the n scans (exactly so for the order statistic)."""
        return self.n + 1 - self.k, max(self.k, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """A stored record, refused (ValueError naming the field) unless it is exactly what
        the rule gives for its own scores, target and margin."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"calibration has unknown fields {sorted(unknown)}")
        missing = known - set(data)
        if missing:
            raise ValueError(f"calibration lacks {sorted(missing)}")
        for name in ("target", "margin"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"calibration {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"calibration {name} must be finite and >= 0, got {value!r}")
        if not 0.0 < data["target"] < 1.0:
            raise ValueError(f"calibration target must be in (0, 1), got {data['target']!r}")
        scores = data["scores"]
        if (
            not isinstance(scores, dict)
            or not scores
            or not all(
                isinstance(k, str)
                and isinstance(v, list)
                and v
                and all(
                    isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                    for x in v
                )
                for k, v in scores.items()
            )
        ):
            raise ValueError(
                "calibration scores must map sources to non-empty lists of finite numbers"
            )
        derived = calibrate_threshold(scores, float(data["target"]), float(data["margin"]))
        if derived.rule == ORDER_STATISTIC and data["margin"] != 0.0:
            raise ValueError("calibration margin must be 0 when the order statistic is used")
        for name, value in derived.to_dict().items():
            if name in ("scores", "margin"):
                continue
            if data[name] != value or type(data[name]) is not type(value):
                raise ValueError(
                    f"calibration {name} {data[name]!r} is not what its own scores give "
                    f"({value!r}): the record was edited"
                )
        return derived

    def sentence(self) -> str:
        """One line for logs, reports and `cfr fit`."""
        where = ", ".join(f"{v} {k}" for k, v in self.sources.items() if v) or "no scans"
        promise = (
            f"an expected false-reject rate <= {self.expected_rate:.1%} "
            f"(<= {self.confidence_bound:.1%} with {CONFIDENCE:.0%} confidence)"
        )
        if self.supported:
            return (
                f"threshold {self.threshold:.4f} = good score {self.k} of {self.n} ({where}) "
                f"for a {self.target:.1%} target: {promise}"
            )
        return (
            f"threshold {self.threshold:.4f} = highest good score ({where}) x "
            f"{1 + self.margin:.2f}: TARGET NOT SUPPORTED ({self.target:.1%} needs "
            f"{self.needed} good scans the model was not fitted on, there are {self.n}); "
            f"the scans alone promise only {promise}"
        )


def calibrate_threshold(
    scores: Sequence[float] | dict[str, Sequence[float]], target: float, margin: float
) -> Calibration:
    """The line's threshold from good scans' scores, for a ``target`` false-reject rate.

    ``scores``: a list, or lists by source (kept with the calibration). The scans of every
    source but :data:`LEAVE_ONE_OUT` are the exchangeable ones (n). Supported (n at least
    :func:`needed_scans`): their k-th smallest score, k = ceil((n+1)(1-target)).
    Otherwise the highest score of every source x (1 + ``margin``), ``supported=False``.
    Non-finite scores are refused: they would silently shrink n.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target false-reject rate must be in (0, 1), got {target!r}")
    if isinstance(margin, bool) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"threshold margin must be finite and >= 0, got {margin!r}")
    by_source = dict(scores) if isinstance(scores, dict) else {"good scans": scores}
    by_source = {k: [float(x) for x in v] for k, v in by_source.items() if len(v)}
    every = np.asarray([x for v in by_source.values() for x in v], dtype=float)
    if every.size == 0:
        raise ValueError("no good scan's score to calibrate a threshold on")
    if not np.isfinite(every).all():
        raise ValueError("a good scan's score is not finite: the threshold cannot be calibrated")
    exchangeable = np.sort(
        [x for k, v in by_source.items() if k != LEAVE_ONE_OUT for x in v]
    ).astype(float)
    n = len(exchangeable)
    k = math.ceil((n + 1) * (1.0 - target) - 1e-9)
    common = {
        "target": float(target),
        "n": n,
        "needed": needed_scans(target),
        "scores": by_source,
    }
    if n and k <= n:
        return Calibration(
            threshold=float(exchangeable[k - 1]),
            rule=ORDER_STATISTIC,
            k=k,
            supported=True,
            expected_rate=(n + 1 - k) / (n + 1),
            confidence_bound=rate_bound(n, k),
            **common,
        )
    return Calibration(
        threshold=float(every.max()) * (1.0 + margin),
        rule=MAX_TIMES_MARGIN,
        k=n,
        supported=False,
        expected_rate=1.0 / (n + 1),
        confidence_bound=rate_bound(n, n) if n else 1.0,
        margin=float(margin),
        **common,
    )


# ----------------------------------------------------------------------------- verdicts


def verdict_of(score: float, threshold: float | None) -> str:
    """PASS / FAIL against the threshold (FAIL when the score is above it); UNKNOWN without one."""
    if threshold is None:
        return "UNKNOWN"
    return "PASS" if score <= threshold else "FAIL"  # a NaN score never passes


def _rates(good: np.ndarray, bad: np.ndarray, threshold: float) -> tuple[float, float]:
    frr = float((~(good <= threshold)).mean()) if good.size else float("nan")
    esc = float((bad <= threshold).mean()) if bad.size else float("nan")
    return frr, esc


def oracle_escape_rate(good: np.ndarray, bad: np.ndarray, false_reject_rate: float) -> float:
    """The lowest escape rate any threshold reaches on these scans at a false-reject rate no
    higher than ``false_reject_rate``: the threshold just at or above the good score that
    leaves that share rejected."""
    if not bad.size:
        return float("nan")
    if not good.size:
        return 0.0
    ordered = np.sort(good)
    allowed = math.floor(false_reject_rate * len(ordered) + 1e-9)  # good scans it may reject
    t = ordered[len(ordered) - 1 - allowed] if allowed < len(ordered) else -math.inf
    return float((bad <= t).mean())


@dataclass
class Verdicts:
    """What the line does with labelled scans at one threshold."""

    threshold: float | None
    n_good: int
    n_defective: int
    false_rejects: int | None
    escapes: int | None
    false_reject_rate: float | None
    escape_rate: float | None
    oracle_escape_rate: float | None
    per_defect: dict[str, dict[str, Any]]
    scans: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line_numbers(self) -> dict[str, Any]:
        """The rates, confusion counts and per-defect counts (what metrics JSON stores)."""
        return {
            "false_reject_rate": self.false_reject_rate,
            "escape_rate": self.escape_rate,
            "oracle_escape_rate": self.oracle_escape_rate,
            "confusion": {
                "good": self.n_good,
                "defective": self.n_defective,
                "false_rejects": self.false_rejects,
                "escapes": self.escapes,
            },
            "per_defect": self.per_defect,
        }

    def summary(self) -> str:
        if self.threshold is None:
            return "verdicts: no threshold (the model was never calibrated)"
        lines = [
            f"at threshold {self.threshold:.4f}: false rejects {self.false_rejects}/{self.n_good}"
            f" ({_pct(self.false_reject_rate)}), escapes {self.escapes}/{self.n_defective}"
            f" ({_pct(self.escape_rate)}); the best threshold at that false-reject rate "
            f"lets {_pct(self.oracle_escape_rate)} escape",
        ]
        for defect, d in self.per_defect.items():
            if defect == GOOD:
                continue
            lines.append(f"  {defect:<14} escaped {d['escaped']}/{d['n']} ({_pct(d['rate'])})")
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1%}"


def verdicts(
    scores: Sequence[float],
    defects: Sequence[str],
    names: Sequence[str],
    threshold: float | None,
) -> Verdicts:
    """Confusion counts, false-reject and escape rates (overall and per defect type), the
    oracle's escape rate and each scan's verdict. ``defects`` is ``"good"`` for good parts."""
    s = np.asarray(scores, dtype=float)
    kinds = list(defects)
    if not (len(s) == len(kinds) == len(names)):
        raise ValueError("scores, defects and names must have one entry per scan")
    is_good = np.array([d == GOOD for d in kinds], dtype=bool)
    good, bad = s[is_good], s[~is_good]
    scans = [
        {"name": n, "defect": d, "score": float(v), "verdict": verdict_of(float(v), threshold)}
        for n, d, v in zip(names, kinds, s, strict=True)
    ]
    per: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(kinds):
        vals = s[np.array([d == kind for d in kinds])]
        entry: dict[str, Any] = {"n": int(vals.size)}
        if threshold is not None:
            if kind == GOOD:
                entry["rejected"] = int((~(vals <= threshold)).sum())
                entry["rate"] = entry["rejected"] / vals.size
            else:
                entry["escaped"] = int((vals <= threshold).sum())
                entry["rate"] = entry["escaped"] / vals.size
        per[kind] = entry
    if threshold is None:
        return Verdicts(None, len(good), len(bad), None, None, None, None, None, per, scans)
    frr, esc = _rates(good, bad, threshold)
    return Verdicts(
        threshold=float(threshold),
        n_good=int(good.size),
        n_defective=int(bad.size),
        false_rejects=int((~(good <= threshold)).sum()),
        escapes=int((bad <= threshold).sum()),
        false_reject_rate=None if math.isnan(frr) else frr,
        escape_rate=None if math.isnan(esc) else esc,
        oracle_escape_rate=(
            None if math.isnan(frr) or not bad.size else oracle_escape_rate(good, bad, frr)
        ),
        per_defect=per,
        scans=scans,
    )


def threshold_table(
    scores: Sequence[float], defects: Sequence[str], thresholds: Sequence[float]
) -> list[tuple[float, float | None, float | None]]:
    """(threshold, false-reject rate, escape rate) at each candidate threshold."""
    s = np.asarray(scores, dtype=float)
    is_good = np.array([d == GOOD for d in defects], dtype=bool)
    out = []
    for t in thresholds:
        frr, esc = _rates(s[is_good], s[~is_good], float(t))
        out.append((float(t), None if math.isnan(frr) else frr, None if math.isnan(esc) else esc))
    return out
