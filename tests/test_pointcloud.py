import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfr_core.data.mvtec import index_category
from cfr_core.data.pointcloud import (
    SURFACE_MIN_CLEARANCE,
    SURFACE_TABLE_SIGMAS,
    PreprocessConfig,
    border_mask,
    fit_plane_ransac,
    largest_cluster_mask,
    pad_to_square,
    preprocess,
    resize_nearest,
    sanitize,
    surface_clearance,
    table_noise,
    valid_mask,
)
from cfr_core.errors import DataError, ShapeMismatchError


def test_sanitize_and_valid_mask_treat_nan_inf_zero_as_missing():
    xyz = np.ones((2, 3, 3), np.float32)
    xyz[0, 0] = np.nan
    xyz[0, 1, 2] = np.inf
    xyz[1, 0] = 0.0
    xyz[1, 1, 0] = 0.0  # one zero coordinate is enough
    assert valid_mask(xyz).tolist() == [[False, False, True], [False, False, True]]
    clean = sanitize(xyz)
    assert np.isfinite(clean).all() and (clean[0, 0] == 0).all() and (clean[0, 1] == 0).all()
    assert np.isnan(xyz[0, 0]).all()  # input untouched
    with pytest.raises(ShapeMismatchError):
        valid_mask(np.ones((4, 4)))


@pytest.mark.parametrize(
    ("src", "dst"), [((37, 53), (224, 224)), ((800, 600), (224, 224)), ((10, 7), (3, 5))]
)
def test_resize_nearest_matches_torch_nearest(src, dst):
    arr = np.random.default_rng(0).normal(size=(*src, 3)).astype(np.float32)
    ours = resize_nearest(arr, dst)
    ref = F.interpolate(torch.from_numpy(arr).permute(2, 0, 1)[None], size=dst, mode="nearest")
    assert np.array_equal(ours, ref[0].permute(1, 2, 0).numpy())


def test_pad_to_square_keeps_rgb_and_xyz_aligned():
    rgb = np.arange(6 * 8 * 3).reshape(6, 8, 3)
    xyz = np.ones((6, 8, 3))
    p_rgb, p_xyz = pad_to_square(rgb, 5, "edge"), pad_to_square(xyz, 5, "constant")
    assert p_rgb.shape[:2] == p_xyz.shape[:2] == (10, 10)
    rows, cols = np.nonzero(valid_mask(p_xyz))
    assert np.array_equal(p_rgb[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], rgb)
    assert p_rgb[0, 0].tolist() == rgb[0, 0].tolist()  # edge mode repeats the border


def test_ransac_recovers_a_tilted_plane_despite_outliers():
    rng = np.random.default_rng(1)
    xy = rng.uniform(-0.05, 0.05, size=(2000, 2))
    z = 0.5 + 0.1 * xy[:, 0] - 0.05 * xy[:, 1] + rng.normal(0, 0.0005, 2000)
    pts = np.column_stack([xy, z])
    pts[:300, 2] -= rng.uniform(0.01, 0.03, 300)  # an object above the table
    plane = fit_plane_ransac(pts, 0.004, 500, np.random.default_rng(0))
    true_n = np.array([0.1, -0.05, -1.0]) / np.linalg.norm([0.1, -0.05, -1.0])
    assert abs(abs(plane.normal @ true_n) - 1) < 1e-4
    assert np.median(plane.distance(pts[300:])) < 0.001
    assert plane.n_inliers >= 1650


def _dbscan_reference(points, eps, min_points):
    """Textbook DBSCAN on a full distance matrix; border -> nearest core point."""
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    core = (d <= eps).sum(1) >= min_points
    label = -np.ones(len(points), int)
    current = 0
    for i in np.flatnonzero(core):
        if label[i] >= 0:
            continue
        stack, label[i] = [i], current
        while stack:
            j = stack.pop()
            for k in np.flatnonzero((d[j] <= eps) & core & (label < 0)):
                label[k] = current
                stack.append(k)
        current += 1
    for i in np.flatnonzero(~core):
        near = np.flatnonzero((d[i] <= eps) & core)
        if len(near):
            label[i] = label[near[np.argmin(d[i, near])]]
    sizes = np.bincount(label[label >= 0])
    return label == np.argmax(sizes)


@pytest.mark.parametrize("seed", range(5))
def test_largest_cluster_agrees_with_textbook_dbscan(seed):
    rng = np.random.default_rng(seed)
    big = rng.normal(0, 0.01, size=(500, 3))
    small = rng.normal(0, 0.004, size=(120, 3)) + [0.05, 0, 0]
    noise = rng.uniform(-0.08, 0.08, size=(60, 3))
    pts = np.concatenate([big, small, noise])
    for eps, m in [(0.006, 30), (0.004, 10), (0.01, 5)]:
        assert np.array_equal(largest_cluster_mask(pts, eps, m), _dbscan_reference(pts, eps, m))


def test_preprocess_removes_table_and_specks_without_touching_input(synth_root):
    sample = index_category(synth_root, "dome").split("train")[0]
    rgb, xyz, _ = sample.load()
    before = xyz.copy()
    out = preprocess(xyz, rgb)
    assert np.array_equal(xyz, before)
    assert out.xyz.shape == out.rgb.shape == (100, 100, 3)  # 96 -> multiple of 100, centred
    assert out.pad == (2, 2, 2, 2)
    kept = valid_mask(out.xyz)
    assert 0.05 < kept.mean() < 0.6  # the part survives, the table does not
    assert not kept[border_mask(kept.shape, 6)].any()
    assert out.n_plane_removed > out.n_valid_in // 2
    # kept points lie above the table plane, i.e. on the part
    heights = out.plane.distance(out.xyz[kept].astype(np.float64))
    assert heights.min() > PreprocessConfig().plane_clear_distance


def test_preprocess_non_square_and_already_clean_cloud(synth_root):
    sample = index_category(synth_root, "ribbed").split("train")[0]
    rgb, xyz, _ = sample.load()
    first = preprocess(xyz, rgb)
    assert first.xyz.shape[:2] == (100, 100) and first.pad == (14, 14, 2, 2)
    again = preprocess(first.xyz)  # no table left in the border: the plane step is skipped
    assert again.plane is None and again.n_plane_removed == 0
    assert np.array_equal(valid_mask(again.xyz), valid_mask(first.xyz))


def test_the_surface_view_keeps_a_thin_part_that_the_method_clears():
    """A 5 mm plate with 2.2 mm studs (synthetic studded, table noise 0.25 mm): the method's
    5 mm clearance erases much of the plate, and the cluster step then drops the studs that
    stood on the erased part; the surface view, cleared down to 5 table-noise deviations,
    keeps the whole plate and no table point. Neither changes the input."""
    from cfr_core.data.synth import render_sample

    scan = render_sample("studded", "good", 3, "train", 0, 128)
    before = scan.xyz.copy()
    out = preprocess(scan.xyz, scan.rgb, surface=True)
    assert np.array_equal(scan.xyz, before)
    assert preprocess(scan.xyz, scan.rgb).surface is None  # only made when asked
    noise = table_noise(scan.xyz, out.plane)
    assert noise == pytest.approx(0.00025, rel=0.15)  # what the generator draws
    clearance = surface_clearance(scan.xyz, out.plane)
    assert clearance == pytest.approx(SURFACE_TABLE_SIGMAS * noise)
    surface, prepared = valid_mask(out.surface), valid_mask(out.xyz)
    assert out.surface.shape == out.xyz.shape and (prepared <= surface).all()
    heights = out.plane.distance(out.surface[surface].astype(np.float64))
    assert heights.min() > clearance  # no table point
    # the points the method's clearance takes (the plate's lower half, the studs beyond it)
    lower = np.zeros_like(surface)
    lower[surface] = heights <= PreprocessConfig().plane_clear_distance
    assert lower.sum() > 0.3 * surface.sum() and not (lower & prepared).any()
    assert surface.sum() > 1.5 * prepared.sum()
    # and it keeps every raw point above its clearance, bar the specks the cluster step drops
    raw = pad_to_square(sanitize(scan.xyz), 100)
    above = valid_mask(raw)
    above[above] = out.plane.distance(raw[above].astype(np.float64)) > clearance
    assert surface.sum() >= 0.97 * above.sum()


def test_the_surface_clearance_follows_the_table_noise_within_bounds():
    """No noise: the floor; a table noisier than the method's clearance: that clearance; a
    cloud without a table in its border (already clean): the surface is the prepared cloud."""
    n = 80
    y, x = (np.mgrid[0:n, 0:n] - n / 2) * 0.0005
    rng = np.random.default_rng(0)
    inside = (np.abs(x) < 0.01) & (np.abs(y) < 0.01)
    for sigma, expected in ((0.0, SURFACE_MIN_CLEARANCE), (0.002, 0.005)):
        z = 0.3 - 0.012 * inside + rng.normal(0, sigma, size=x.shape) * ~inside
        xyz = np.stack([x, y, z], -1).astype(np.float32)
        out = preprocess(xyz, surface=True)
        assert surface_clearance(xyz, out.plane) == pytest.approx(expected)
    clean = preprocess(out.xyz, surface=True)
    assert clean.plane is None and np.array_equal(clean.surface, clean.xyz)


def _dome_on_table(n=256, pitch=0.0004, noise=0.0004, seed=0):
    """An organized cloud of a 10 mm dome on a 2 mm foot, on a table seen from 0.5 m, and
    the dome's footprint."""
    y, x = (np.mgrid[0:n, 0:n] - (n - 1) / 2) * pitch
    r = np.hypot(x, y)
    part = r < 0.02
    height = np.where(part, 0.002 + 0.008 * np.sqrt(np.clip(1 - (r / 0.02) ** 2, 0, 1)), 0)
    z = 0.5 - height + np.random.default_rng(seed).normal(0, noise, size=x.shape)
    return np.stack([x, y, z], -1), part


def test_the_surface_view_holds_no_table_from_coarse_depth_few_border_points_or_a_dip():
    """Depth stored in whole millimetres (a median deviation near 0): the clearance covers
    the step; a border with too few table points to tell: the method's clearance; a dip in
    the table below its plane: not part of the surface (the part's side only)."""
    xyz, part = _dome_on_table()
    pad = ((22, 22), (22, 22))

    def table_points(out):
        return int((valid_mask(out.surface) & ~np.pad(part, pad)).sum())

    coarse = xyz.copy()
    coarse[..., 2] = np.round(coarse[..., 2] / 0.001) * 0.001
    out = preprocess(coarse.astype(np.float32), surface=True)
    assert table_noise(coarse, out.plane) < 0.0001  # the median deviation is fooled
    assert surface_clearance(coarse, out.plane) >= 0.001 and table_points(out) == 0
    assert valid_mask(out.surface).sum() > 1.1 * valid_mask(out.xyz).sum()  # the 2 mm foot

    few = xyz.copy()
    border = border_mask(few.shape[:2], PreprocessConfig().border_width)
    rows, cols = np.nonzero(border)
    drop = np.random.default_rng(1).permutation(len(rows))[10:]  # 10 border points left
    few[rows[drop], cols[drop]] = 0.0
    out = preprocess(few.astype(np.float32), surface=True)
    assert table_noise(few, out.plane) is None
    assert surface_clearance(few, out.plane) == PreprocessConfig().plane_clear_distance
    assert np.array_equal(out.surface, out.xyz)

    dipped = xyz.copy()
    y, x = dipped[..., 1], dipped[..., 0]
    dip = (np.hypot(x - 0.03, y - 0.03) < 0.008) & ~part
    dipped[..., 2] += 0.003 * dip  # 3 mm below the table, away from the camera
    out = preprocess(dipped.astype(np.float32), surface=True)
    assert table_points(out) == 0


def test_preprocess_bad_clouds():
    with pytest.raises(DataError, match="no valid point"):
        preprocess(np.zeros((50, 50, 3), np.float32))
    with pytest.raises(DataError, match="no valid point"):
        preprocess(np.full((50, 50, 3), np.nan, np.float32))
    flat = np.ones((50, 50, 3), np.float32)
    flat[..., :2] = np.mgrid[0:50, 0:50].transpose(1, 2, 0) * 0.001 + 0.01
    with pytest.raises(DataError, match="no part left"):
        preprocess(flat)  # only a table, no part
    with pytest.raises(ShapeMismatchError):
        preprocess(flat, np.zeros((40, 50, 3), np.uint8))
