import itertools

import numpy as np
import pytest
from scipy import ndimage

from cfr_core.errors import MetricError
from cfr_core.metrics import (
    MetricReport,
    aupro,
    aupro_multi,
    compute_report,
    image_auroc,
    pixel_auroc,
    pro_curve,
)

# ---------------------------------------------------------------- slow, obviously-correct references


def slow_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def slow_pro_points(maps, masks, thresholds):
    """(fpr, pro) at each threshold by direct counting, region by region."""
    regions = []
    for m, mask in zip(maps, masks, strict=True):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [m[lab == r] for r in range(1, n + 1)]
    ok = np.concatenate([m[~mask] for m, mask in zip(maps, masks, strict=True)])
    points = [(0.0, 0.0)]
    for t in sorted(thresholds, reverse=True):
        fpr = float(np.mean(ok >= t))
        pro = float(np.mean([np.mean(r >= t) for r in regions]))
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    return points


def slow_area(points, limit):
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def slow_aupro(maps, masks, limit):
    return slow_area(slow_pro_points(maps, masks, np.unique(maps)), limit)


# ---------------------------------------------------------------- ROC


def test_auroc_hand_cases():
    assert image_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(
        0.75
    )
    assert image_auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert image_auroc(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_pairwise_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=60), 1)  # many ties
    labels = rng.random(60) > 0.6
    assert image_auroc(scores, labels) == pytest.approx(slow_auroc(scores, labels), abs=1e-12)


def test_pixel_auroc_flattens_all_images():
    rng = np.random.default_rng(0)
    maps, masks = rng.random((3, 8, 9)), rng.random((3, 8, 9)) > 0.8
    assert pixel_auroc(maps, masks) == pytest.approx(slow_auroc(maps.ravel(), masks.ravel()))


def test_auroc_rejects_undefined_inputs():
    with pytest.raises(MetricError, match="both classes"):
        image_auroc(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(MetricError, match="NaN"):
        image_auroc(np.array([np.nan, 0.2]), np.array([0, 1]))
    with pytest.raises(MetricError, match="N×H×W"):
        pixel_auroc(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))


# ---------------------------------------------------------------- AUPRO, hand-computed


def test_aupro_perfect_map_is_exactly_one():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:12, 10:11] = True
    for limit in (0.3, 0.1, 0.05, 0.01):
        assert aupro(masks.astype(float), masks, limit) == 1.0
        assert aupro(masks.astype(float), masks, limit, thresholds=99) == 1.0


def test_aupro_one_component_hand_computed():
    # one row: two single-pixel regions (not 8-adjacent), three defect-free pixels
    maps = np.array([[[0.9, 0.8, 0.7, 0.6, 0.5]]])
    masks = np.array([[[1, 0, 1, 0, 0]]], bool)
    assert aupro(maps, masks, 0.3) == pytest.approx(0.5)
    assert aupro(maps, masks, 1.0) == pytest.approx(5 / 6)


def test_aupro_regions_of_different_size_are_weighted_equally():
    masks = np.array([[[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]]], bool)
    maps = np.array([[[0.9, 0.4, 0.8, 0.3], [0.4, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]])
    # fpr 0..1/8 at PRO 1/6 (1 of 3 pixels of the big region), then PRO 1
    assert aupro(maps, masks, 0.3) == pytest.approx((1 / 8 * 1 / 6 + (0.3 - 1 / 8)) / 0.3)
    assert aupro(maps, masks, 0.1) == pytest.approx(1 / 6)


def test_aupro_image_without_defect_adds_false_positive_room():
    maps = np.array([[[0.9, 0.8, 0.7, 0.6, 0.5]], [[0.0, 0.0, 0.0, 0.0, 0.0]]])
    masks = np.array([[[1, 0, 1, 0, 0]], [[0, 0, 0, 0, 0]]], bool)
    # 8 defect-free pixels now: the first false positive costs 1/8 of FPR
    assert aupro(maps, masks, 0.3) == pytest.approx((1 / 8 * 0.5 + (0.3 - 1 / 8)) / 0.3)


def test_aupro_ties():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 1:3, 1:3] = True
    const = np.full((1, 6, 6), 0.7)
    assert aupro(const, masks, 0.3) == pytest.approx(0.15)  # a single step (0,0)->(1,1)
    tie = np.array([[[0.5, 0.5, 0.0]]])
    assert aupro(tie, np.array([[[1, 0, 0]]], bool), 0.3) == pytest.approx(0.3)


def test_aupro_never_exceeds_one_and_is_monotone_in_quality():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 20, 20), bool)
    masks[:, 5:9, 5:12] = True
    noise = rng.random((4, 20, 20))
    good = noise + 2 * masks
    weak = noise + 0.3 * masks
    assert 0 < aupro(weak, masks) < aupro(good, masks) <= 1.0


# ---------------------------------------------------------------- AUPRO vs the slow reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantize", [False, True])
def test_aupro_exact_matches_slow_reference(seed, quantize):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 24, 24), bool)
    for i in range(3):
        for _ in range(rng.integers(0, 4)):
            r, c = rng.integers(0, 20, 2)
            masks[i, r : r + rng.integers(1, 5), c : c + rng.integers(1, 5)] = True
    masks[0, 0, 0] = True  # at least one region
    maps = rng.random((3, 24, 24)) + 0.5 * masks * rng.random()
    if quantize:
        maps = np.round(maps * 8) / 8  # heavy ties between defect and defect-free pixels
    for limit in (0.3, 0.1, 0.05, 0.01):
        assert aupro(maps, masks, limit) == pytest.approx(slow_aupro(maps, masks, limit), abs=1e-6)


def test_threshold_variants():
    rng = np.random.default_rng(11)
    masks = np.zeros((5, 30, 30), bool)
    masks[:, 10:16, 8:20] = True
    maps = ndimage.gaussian_filter(rng.random((5, 30, 30)), (0, 1, 1)) + 0.2 * masks
    exact = aupro(maps, masks, 0.3)
    # every distinct score as an explicit threshold list is the exact curve
    assert aupro(maps, masks, 0.3, thresholds=np.unique(maps)) == pytest.approx(exact, abs=1e-12)
    # 99 evenly spaced thresholds: equal to the reference at those thresholds, close to exact
    ok_sorted = np.sort(maps[~masks])
    thr = ok_sorted[np.round(np.linspace(0, ok_sorted.size - 1, 99)).astype(int)]
    thr = np.append(thr, np.nextafter(ok_sorted[-1], np.inf))
    coarse = aupro(maps, masks, 0.3, thresholds=99)
    assert coarse == pytest.approx(
        slow_area(slow_pro_points(maps, masks, np.unique(thr)), 0.3), abs=1e-9
    )
    assert abs(coarse - exact) < 0.03
    fpr, _ = pro_curve(maps, masks, 99)
    assert np.all(np.diff(fpr) >= 0) and fpr[0] == 0 and fpr[-1] == 1


def test_aupro_multi_and_report():
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 16, 16), bool)
    masks[2:, 4:9, 4:9] = True
    maps = rng.random((4, 16, 16)) + masks
    multi = aupro_multi(maps, masks)
    assert set(multi) == {0.3, 0.1, 0.05, 0.01}
    assert multi[0.3] == pytest.approx(aupro(maps, masks, 0.3))
    scores, labels = maps.reshape(4, -1).max(1), np.array([0, 0, 1, 1])
    report = compute_report(scores, labels, maps, masks)
    d = report.to_dict()
    assert list(d["aupro"]) == ["0.3", "0.1", "0.05", "0.01"]
    assert d["n_test"] == 4 and d["n_defective"] == 2
    assert MetricReport.from_dict(d) == report
    assert "AUPRO@0.3" in report.summary()


def test_aupro_rejects_undefined_inputs():
    with pytest.raises(MetricError, match="at least one defect"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool))
    with pytest.raises(MetricError, match="NaN"):
        aupro(np.full((1, 4, 4), np.nan), np.ones((1, 4, 4), bool))
    with pytest.raises(MetricError, match="limit"):
        aupro(np.zeros((1, 2, 2)), np.array([[[1, 0], [0, 0]]], bool), limit=0)
