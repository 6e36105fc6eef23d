"""Distance-aware entropy and EBCU (METHODS.md §1, the project's own definitions), in mm."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.uncertainty import EnsembleAccumulator, compute_maps
from CalibUncertaintyLib.uncertainty.distance_aware import (distance_aware_entropy, distance_weight,
                                                            surface_distance_mm)
from CalibUncertaintyLib.uncertainty.ebcu import ball_kernel, ball_offsets, default_threshold, ebcu


# --- phantoms -------------------------------------------------------------------------------

def sphere_phantom(spacing_zyx, size_mm=40.0, radius_mm=12.0, blob_radius_mm=3.0, width_mm=0.7):
    """K=2 probabilities of a sphere: p_fg = sigmoid(-signed distance / width) (an entropy shell
    along the contour) plus an interior blob at the centre where p_fg = 0.6 (high entropy, still
    predicted foreground). Voxel centres at index × spacing mm. Returns (probs, coords_mm)."""
    axes = [np.arange(int(round(size_mm / h)) + 1) * h for h in spacing_zyx]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    c = size_mm / 2
    r = np.sqrt((zz - c) ** 2 + (yy - c) ** 2 + (xx - c) ** 2)
    p_fg = 1.0 / (1.0 + np.exp((r - radius_mm) / width_mm))
    p_fg[r <= blob_radius_mm] = 0.6
    probs = np.stack([1 - p_fg, p_fg]).astype(np.float32)
    return probs, r


def dae_of(probs, spacing_zyx):
    acc = EnsembleAccumulator(2, probs.shape[1:])
    acc.add(probs)
    return compute_maps(acc, Geometry(probs.shape[1:], spacing_zyx[::-1]), names=["entropy", "dae", "ebcu"],
                        ebcu_threshold=0.3)


# --- surface distance -----------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, 2])
def test_face_neighbours_are_half_a_voxel_on_both_sides(axis):
    spacing = (2.5, 0.8, 1.2)
    lab = np.zeros((6, 7, 8), np.uint8)
    index = [slice(None)] * 3
    index[axis] = slice(3, None)
    lab[tuple(index)] = 1
    d = surface_distance_mm(lab, spacing)
    h = spacing[axis]
    along = np.moveaxis(d, axis, 0)[:, 2, 2]
    np.testing.assert_allclose(along[1:5], [1.5 * h, 0.5 * h, 0.5 * h, 1.5 * h], rtol=1e-6)


def _brute_box_distance(lab, spacing):
    """min over every voxel of another label of the distance from the centre to its box."""
    spacing = np.asarray(spacing, float)
    pts = np.indices(lab.shape).reshape(3, -1).T
    labf = lab.ravel()
    out = np.empty(labf.size)
    for i in range(labf.size):
        v = np.abs(pts[labf != labf[i]] - pts[i]) * spacing
        out[i] = np.sqrt((np.maximum(v - spacing / 2, 0) ** 2).sum(1)).min() if v.size else np.inf
    return out.reshape(lab.shape)


@pytest.mark.parametrize("spacing", [(1.5, 0.7, 1.0), (2.5, 0.8, 0.8), (0.6, 3.0, 1.1)])
def test_surface_distance_equals_brute_force_box_distance(spacing):
    rng = np.random.default_rng(0)
    lab = (ndimage.uniform_filter(rng.random((7, 8, 9)), 3) * 6).astype(np.uint8) % 3
    assert len(np.unique(lab)) == 3
    np.testing.assert_allclose(surface_distance_mm(lab, spacing), _brute_box_distance(lab, spacing), rtol=1e-5)


def test_surface_distance_is_not_the_nearest_centre_box():
    """The issue's example: spacing 2.5 × 0.8 × 0.8 mm, a voxel with the other label across its
    z-face is 1.25 mm from the surface, even when an in-plane voxel of the other label has a
    nearer centre (its box is 1.6 mm away)."""
    lab = np.zeros((3, 7, 7), np.uint8)
    lab[0] = 1            # the slice below: across the z-face
    lab[1, 3, 0] = 1      # centre 2.4 mm away in x (nearer than 2.5 mm), box 2.0 mm
    d = surface_distance_mm(lab, (2.5, 0.8, 0.8))
    assert d[1, 3, 3] == pytest.approx(1.25)
    assert d[1, 3, 2] == pytest.approx(1.2)  # here the in-plane box is nearer (1.5 voxels × 0.8 mm)
    np.testing.assert_allclose(d, _brute_box_distance(lab, (2.5, 0.8, 0.8)), rtol=1e-5)


def test_surface_distance_cutoff_is_exact_below_it():
    lab = np.zeros((20, 30, 30), np.uint8)
    lab[5:12, 8:20, 10:15] = 1
    lab[7:9, 10:12, 11:13] = 2
    full = surface_distance_mm(lab, (2.0, 0.9, 0.9))
    cut = surface_distance_mm(lab, (2.0, 0.9, 0.9), max_distance_mm=5.0)
    near = full <= 5.0
    np.testing.assert_array_equal(cut[near], full[near])
    assert (cut[~near] > 5.0).all() and np.isinf(cut).any()


def test_single_label_has_no_surface(caplog):
    lab = np.zeros((4, 5, 6), np.uint8)
    assert np.isinf(surface_distance_mm(lab, (1, 1, 1))).all()
    h = np.random.default_rng(1).random(lab.shape).astype(np.float32)
    with caplog.at_level(logging.INFO):
        np.testing.assert_array_equal(distance_aware_entropy(h, lab + 3, (1, 1, 1)), h)
    assert "single label" in caplog.text


def test_distance_weight_formula():
    d = np.array([0.0, 1.0, 2.0, 4.0, np.inf], np.float32)
    np.testing.assert_allclose(distance_weight(d, 2.0), 1 - np.exp(-(d ** 2) / 8), rtol=1e-6)
    assert distance_weight(np.float32(12.0), 2.0) == 1.0  # 6σ: exactly 1 in float32
    for bad in (0, -1, np.nan, "wide"):
        with pytest.raises(InputError, match="sigma"):
            distance_weight(d, bad)


# --- DAE on the phantom ----------------------------------------------------------------------

def test_dae_removes_contour_shell_keeps_interior_blob():
    spacing = (1.0, 1.0, 1.0)
    probs, r = sphere_phantom(spacing)
    maps = dae_of(probs, spacing)
    h, dae = maps["entropy"], maps["dae"]
    shell = np.abs(r - 12.0) <= 1.0
    blob = r <= 2.0
    assert h[shell].mean() > 0.5 and h[blob].min() > 0.6   # both are uncertain in entropy
    assert dae[shell].mean() < 0.25 * h[shell].mean()      # the contour shell is removed
    np.testing.assert_allclose(dae[blob], h[blob], rtol=1e-4)  # the interior blob stays (9 mm = 4.5σ)


@pytest.mark.parametrize("coarse", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_same_physical_phantom_at_two_spacings_gives_same_pattern(coarse):
    fine = (0.5, 0.5, 0.5)
    pc, rc = sphere_phantom(coarse)
    pf, rf = sphere_phantom(fine)
    mc, mf = dae_of(pc, coarse), dae_of(pf, fine)
    # the fine voxel at index × (coarse / fine) is the same physical point as the coarse voxel
    sub = tuple(slice(None, None, int(round(c / f))) for c, f in zip(coarse, fine))
    np.testing.assert_allclose(rf[sub], rc)
    # surface distances in mm agree up to the coarse grid's discretisation of the contour
    dc = surface_distance_mm((pc[1] > pc[0]).astype(np.uint8), coarse)
    df = surface_distance_mm((pf[1] > pf[0]).astype(np.uint8), fine)
    assert np.abs(df[sub] - dc).max() <= 0.5 * max(coarse) + 1e-5
    assert np.abs(dc - np.abs(rc - 12.0)).max() <= 0.5 * np.linalg.norm(coarse) + 1e-5
    # the interior blob is kept identically, the contour shell removed to the same extent
    np.testing.assert_allclose(mf["dae"][sub][rc <= 2.0], mc["dae"][rc <= 2.0], rtol=1e-4)
    kept = [m["dae"][np.abs(r - 12.0) <= 1.5].sum() / m["entropy"][np.abs(r - 12.0) <= 1.5].sum()
            for m, r in ((mc, rc), (mf, rf))]
    assert kept[0] < 0.3 and kept[1] < 0.3 and abs(kept[0] - kept[1]) < 0.1
    # EBCU: the same peak place (the blob) and about the same values around it
    for m, r in ((mc, rc), (mf, rf)):
        assert r.flat[np.argmax(m["ebcu"])] <= 1.0
    # (the coarse grid samples the 3 mm blob and the 4 mm ball with few voxels: 20 % tolerance)
    assert mf["ebcu"].max() == pytest.approx(mc["ebcu"].max(), rel=0.2)
    np.testing.assert_allclose(mf["ebcu"][sub][rc <= 6], mc["ebcu"][rc <= 6], atol=0.03)


# --- EBCU --------------------------------------------------------------------------------------

def reference_ebcu(u, spacing, radius, t):
    k = ball_kernel(radius, spacing).astype(np.float64)
    ex = np.maximum(u.astype(np.float64) - t, 0)
    return ndimage.correlate(ex, k, mode="constant", cval=0.0) / k.sum()


@pytest.mark.parametrize("method", ["auto", "sparse", "rows"])
def test_ebcu_equals_direct_ball_mean(method):
    rng = np.random.default_rng(2)
    spacing = (2.0, 0.8, 1.1)
    u = rng.random((14, 30, 25)).astype(np.float32)
    u[0, 0, 0] = 1.0  # an excess voxel in the image corner: the ball sticks out of the image
    got = ebcu(u, spacing, radius_mm=3.5, threshold=0.9, method=method)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_ebcu(u, spacing, 3.5, 0.9), atol=1e-6)
    assert got[0, 0, 0] > 0


def test_ball_is_built_in_mm():
    off = ball_offsets(4.0, (1.0, 1.0, 1.0))
    zz, yy, xx = np.mgrid[-4:5, -4:5, -4:5]
    assert len(off) == int((zz ** 2 + yy ** 2 + xx ** 2 <= 16).sum())
    aniso = ball_offsets(4.0, (2.0, 1.0, 0.5))  # an ellipsoid in voxels
    np.testing.assert_array_equal(np.abs(aniso).max(axis=0), [2, 4, 8])
    assert ((aniso * [2.0, 1.0, 0.5]) ** 2).sum(axis=1).max() <= 16 + 1e-9
    assert len(ball_offsets(0.3, (1.0, 1.0, 1.0))) == 1  # radius below a voxel: the voxel itself


def test_ebcu_ranks_blob_above_contour_shell_of_equal_total():
    shape = (40, 40, 40)
    r = np.sqrt(((np.indices(shape) - 20.0) ** 2).sum(axis=0))
    u = np.zeros(shape, np.float32)
    shell = np.abs(r - 14.0) < 0.5
    blob = r < 3.0
    u[shell] = 0.1
    u[blob] = 0.1 * shell.sum() / blob.sum()   # the same total uncertainty in both
    assert u[shell].sum() == pytest.approx(u[blob].sum(), rel=1e-5)
    e = ebcu(u, (1.0, 1.0, 1.0), radius_mm=4.0, threshold=0.05)
    assert e[blob].max() > 5 * e[shell].max()


def test_default_threshold_and_errors():
    u = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    roi = np.zeros(u.shape, bool)
    roi[:5] = True
    assert default_threshold(u, roi) == pytest.approx(np.quantile(np.arange(500), 0.95))
    assert default_threshold(u) == pytest.approx(np.quantile(np.arange(1000), 0.95))
    with pytest.raises(InputError, match="ROI is empty"):
        default_threshold(u, np.zeros(u.shape, bool))
    with pytest.raises(InputError, match="ROI shape"):
        default_threshold(u, roi[:3])
    with pytest.raises(InputError, match="quantile"):
        default_threshold(u, roi, quantile=95)
    bad = u.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        ebcu(bad, (1, 1, 1), threshold=10)
    with pytest.raises(InputError, match="radius"):
        ebcu(u, (1, 1, 1), radius_mm=-1)
    with pytest.raises(InputError, match="spacing"):
        ebcu(u, (1, 0, 1))
    with pytest.raises(InputError, match="threshold"):
        ebcu(u, (1, 1, 1), threshold=np.inf)
    with pytest.raises(InputError, match="method"):
        ebcu(u, (1, 1, 1), method="fft")
    with pytest.raises(InputError, match="integer"):
        surface_distance_mm(u, (1, 1, 1))
    with pytest.raises(InputError, match="entropy shape"):
        distance_aware_entropy(u[:2], np.zeros(u.shape, np.uint8), (1, 1, 1))
    assert not ebcu(u, (1, 1, 1), threshold=5000).any()  # nothing above t: all zero


def test_maps_use_a_ball_of_at_least_two_coarse_voxels():
    """On a coarse grid (3.9 mm, like OpenKBP) the 4 mm ball would be 7 voxels, so the maps use
    2 × 3.9 mm; on a fine grid the 4 mm radius stays (ebcu.effective_radius_mm)."""
    from CalibUncertaintyLib.uncertainty.ebcu import effective_radius_mm

    assert effective_radius_mm(4.0, (2.5, 3.9, 3.9)) == pytest.approx(7.8)
    assert effective_radius_mm(4.0, (1.0, 0.8, 0.8)) == 4.0
    assert len(ball_offsets(4.0, (2.5, 3.9, 3.9))) == 7
    coarse = (2.5, 3.9, 3.9)
    probs, _ = sphere_phantom(coarse, size_mm=60.0)
    acc = EnsembleAccumulator(2, probs.shape[1:])
    acc.add(probs)
    maps = compute_maps(acc, Geometry(probs.shape[1:], coarse[::-1]), names=["entropy", "ebcu"], ebcu_threshold=0.3)
    np.testing.assert_allclose(maps["ebcu"], ebcu(maps["entropy"], coarse, radius_mm=7.8, threshold=0.3), atol=1e-6)
