"""The line's threshold rule and the verdict numbers a factory reads (cfr_core.scoring.verdict)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfr_core.scoring.verdict import (
    MAX_TIMES_MARGIN,
    ORDER_STATISTIC,
    Calibration,
    calibrate_threshold,
    needed_scans,
    oracle_escape_rate,
    rate_bound,
    threshold_table,
    verdicts,
)


def test_needed_scans_is_the_smallest_n_whose_order_statistic_exists():
    for target in (0.01, 0.05, 0.1, 0.2, 0.25):
        n = needed_scans(target)
        assert calibrate_threshold(np.arange(1.0, n + 1), target, 0.0).supported
        assert not calibrate_threshold(np.arange(1.0, n), target, 0.0).supported
    assert needed_scans(0.05) == 19 and needed_scans(0.1) == 9


def test_supported_threshold_is_the_conformal_order_statistic():
    scores = np.arange(1.0, 40.0)  # n = 39
    cal = calibrate_threshold(scores, 0.05, margin=0.5)
    assert cal.rule == ORDER_STATISTIC and cal.supported
    assert cal.k == 38 and cal.threshold == 38.0  # ceil(40 * 0.95) = 38
    assert cal.expected_rate == pytest.approx(2 / 40)
    assert cal.expected_rate <= 0.05 < cal.confidence_bound < 0.2


def test_too_few_scans_fall_back_loudly_to_the_highest_score_times_the_margin():
    scores = [0.7, 0.9, 0.8, 1.3, 0.75, 1.1, 0.95, 0.85]
    cal = calibrate_threshold({"validation/good": scores}, 0.05, margin=0.25)
    assert cal.rule == MAX_TIMES_MARGIN and not cal.supported
    assert cal.threshold == pytest.approx(1.3 * 1.25)
    assert cal.n == 8 and cal.needed == 19 and cal.k == 8
    assert cal.expected_rate == pytest.approx(1 / 9)
    assert cal.confidence_bound == pytest.approx(1 - 0.1 ** (1 / 8))
    text = cal.sentence()
    assert "TARGET NOT SUPPORTED" in text and "8 validation/good" in text and "19" in text


def test_the_rule_keeps_its_promise_on_simulated_lines():
    """Over many lines, the share of new good parts rejected averages at most the target
    (supported) or at most 1/(n+1) (not supported), whatever the score distribution."""
    rng = np.random.default_rng(0)
    for n, target in ((30, 0.1), (60, 0.05), (8, 0.05)):
        rates = []
        for _ in range(3000):
            scores = rng.lognormal(0.0, 0.6, size=n)
            cal = calibrate_threshold(scores, target, margin=0.0)
            new = rng.lognormal(0.0, 0.6, size=200)
            rates.append(float((new > cal.threshold).mean()))
        assert np.mean(rates) <= cal.expected_rate + 0.01
        assert cal.expected_rate <= target or not cal.supported
        # the stated 90 % bound holds on at least ~90 % of lines
        assert np.mean(np.array(rates) <= cal.confidence_bound + 0.02) >= 0.85


def test_rate_bound_matches_the_closed_form_for_the_maximum():
    for n in (1, 4, 12, 45):
        assert rate_bound(n, n) == pytest.approx(1 - 0.1 ** (1 / n))


@pytest.mark.parametrize(
    "bad", [[], [1.0, float("nan")], [float("inf"), 1.0]], ids=["empty", "nan", "inf"]
)
def test_unusable_scores_are_refused(bad):
    with pytest.raises(ValueError):
        calibrate_threshold(bad, 0.05, 0.1)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_a_target_outside_zero_one_is_refused(target):
    with pytest.raises(ValueError, match="target"):
        calibrate_threshold([1.0, 2.0], target, 0.1)


def test_calibration_round_trips_and_refuses_edits():
    cal = calibrate_threshold({"validation/good": [1.0, 2.0, 3.0]}, 0.05, 0.1)
    assert Calibration.from_dict(cal.to_dict()) == cal
    for edit, match in (
        ({"threshold": float("nan")}, "finite"),
        ({"threshold": "1.0"}, "number"),
        ({"n": -1}, "whole number"),
        ({"rule": "whatever"}, "rule"),
        ({"target": 0.0}, "target"),
        ({"extra_field": 1}, "unknown"),
        ({"scores": {"a": ["3"]}}, "scores"),
        ({"scores": {"a": [1.0, float("nan"), 2.0]}}, "scores"),
        ({"scores": {"a": [1.0, 2.0]}}, "differs"),
    ):
        with pytest.raises(ValueError, match=match):
            Calibration.from_dict({**cal.to_dict(), **edit})


def test_verdicts_count_false_rejects_and_escapes_per_defect():
    scores = [0.5, 0.9, 1.2, 2.0, 0.8, 3.0, 1.1, 0.6]
    defects = ["good", "good", "good", "crack", "crack", "stain", "stain", "good"]
    names = [f"{d}/{i:03d}" for i, d in enumerate(defects)]
    v = verdicts(scores, defects, names, threshold=1.0)
    assert (v.n_good, v.n_defective) == (4, 4)
    assert v.false_rejects == 1 and v.false_reject_rate == 0.25  # 1.2
    assert v.escapes == 1 and v.escape_rate == 0.25  # crack 0.8
    assert v.per_defect["crack"] == {"n": 2, "escaped": 1, "rate": 0.5}
    assert v.per_defect["stain"] == {"n": 2, "escaped": 0, "rate": 0.0}
    assert v.per_defect["good"] == {"n": 4, "rejected": 1, "rate": 0.25}
    assert [s["verdict"] for s in v.scans] == [
        "PASS", "PASS", "FAIL", "FAIL", "PASS", "FAIL", "FAIL", "PASS"
    ]  # fmt: skip
    assert v.scans[2] == {"name": "good/002", "defect": "good", "score": 1.2, "verdict": "FAIL"}
    # the oracle at 25 % false rejects: a threshold at 0.9 lets the 0.8 crack through too
    assert v.oracle_escape_rate == 0.25
    text = v.summary()
    assert "false rejects 1/4" in text and "crack" in text


def test_oracle_finds_a_better_threshold_when_the_calibrated_one_is_too_high():
    good = np.array([0.5, 0.6, 0.7, 0.8])
    bad = np.array([0.9, 1.0, 1.5])
    assert oracle_escape_rate(good, bad, 0.0) == 0.0  # a threshold at 0.8 catches all
    v = verdicts([*good, *bad], ["good"] * 4 + ["dent"] * 3, list("abcdefg"), threshold=1.2)
    assert v.false_reject_rate == 0.0 and v.escape_rate == pytest.approx(2 / 3)
    assert v.oracle_escape_rate == 0.0


def test_without_a_threshold_every_verdict_is_unknown():
    v = verdicts([1.0, 2.0], ["good", "dent"], ["a", "b"], None)
    assert v.false_reject_rate is None and v.escape_rate is None
    assert {s["verdict"] for s in v.scans} == {"UNKNOWN"}
    assert "no threshold" in v.summary()


def test_threshold_table_trades_false_rejects_for_escapes():
    scores = [0.5, 0.9, 1.2, 2.0, 0.8, 3.0]
    defects = ["good", "good", "good", "dent", "dent", "dent"]
    rows = threshold_table(scores, defects, [0.7, 1.0, 2.5])
    frr = [r[1] for r in rows]
    esc = [r[2] for r in rows]
    assert frr == sorted(frr, reverse=True) and esc == sorted(esc)
    assert rows[1] == (1.0, pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert all(not math.isnan(x) for r in rows for x in r[1:])
