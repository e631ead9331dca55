"""The line's threshold rule and the verdict numbers a factory reads (cfr_core.scoring.verdict)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfr_core.scoring.verdict import (
    LEAVE_ONE_OUT,
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
    assert "TARGET NOT SUPPORTED" in text and "8 validation/good" in text and "needs 19" in text


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


def test_calibration_round_trips_and_refuses_every_edit():
    cal = calibrate_threshold({"validation/good": [1.0, 2.0, 3.0]}, 0.05, 0.1)
    assert Calibration.from_dict(cal.to_dict()) == cal
    supported = calibrate_threshold({"validation/good": list(np.arange(1.0, 21.0))}, 0.05, 0.0)
    assert Calibration.from_dict(supported.to_dict()) == supported
    for record, edit, match in (
        (cal, {"threshold": float("nan")}, "edited"),
        (cal, {"threshold": 100.0}, "threshold 100.0 is not what"),
        (cal, {"threshold": "3.3"}, "edited"),
        (cal, {"n": -1}, "edited"),
        (cal, {"n": 4}, "edited"),
        (cal, {"k": 0}, "edited"),
        (cal, {"supported": True}, "supported True is not"),
        (cal, {"needed": 1}, "edited"),
        (cal, {"expected_rate": 0.0}, "edited"),
        (cal, {"confidence_bound": 0.05}, "edited"),
        (cal, {"rule": "whatever"}, "edited"),
        (cal, {"margin": -0.1}, "finite and >= 0"),
        (cal, {"target": 0.0}, "target"),
        (cal, {"target": "0.05"}, "number"),
        (cal, {"extra_field": 1}, "unknown"),
        (cal, {"scores": {}}, "non-empty"),
        (cal, {"scores": {"a": ["3"]}}, "scores"),
        (cal, {"scores": {"a": [1.0, float("nan"), 2.0]}}, "scores"),
        (cal, {"scores": {"validation/good": [1.0, 2.0, 3.5]}}, "threshold"),
        (supported, {"margin": 0.5}, "margin must be 0"),
    ):
        with pytest.raises(ValueError, match=match):
            Calibration.from_dict({**record.to_dict(), **edit})
    lacking = cal.to_dict()
    del lacking["scores"]
    with pytest.raises(ValueError, match="lacks"):
        Calibration.from_dict(lacking)


def test_leave_one_out_scores_raise_the_maximum_but_never_count_as_exchangeable():
    """The shots' leave-one-out scores come from banks with one shot fewer: they may raise
    the highest score, but n, the supported decision and the bounds read only the scans
    the model never saw."""
    unseen = list(np.linspace(1.0, 2.0, 8))
    cal = calibrate_threshold(
        {"validation/good": unseen, LEAVE_ONE_OUT: [0.5, 0.6, 2.5, 0.7]}, 0.1, 0.25
    )
    assert cal.n == 8 and not cal.supported and cal.needed == 9  # 12 scores, 8 exchangeable
    assert cal.threshold == pytest.approx(2.5 * 1.25)
    assert cal.expected_rate == pytest.approx(1 / 9)
    only_loo = calibrate_threshold({LEAVE_ONE_OUT: [0.5, 0.9]}, 0.05, 0.25)
    assert only_loo.n == 0 and only_loo.expected_rate == 1.0 and only_loo.confidence_bound == 1.0
    assert only_loo.threshold == pytest.approx(0.9 * 1.25)
    assert "there are 0" in only_loo.sentence()


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


def test_a_score_that_is_not_a_number_never_passes():
    v = verdicts([float("nan"), 0.5, float("nan")], ["good", "good", "dent"], list("abc"), 1.0)
    assert [s["verdict"] for s in v.scans] == ["FAIL", "PASS", "FAIL"]
    assert v.false_rejects == 1 and v.escapes == 0 and v.per_defect["good"]["rejected"] == 1


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
