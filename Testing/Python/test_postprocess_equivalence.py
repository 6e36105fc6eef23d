"""The post-processing's faster paths (issue 9, item 2) give the numbers of the straightforward ones.

Each test computes a result both ways on a small volume and asserts equality (bit for bit where
the fast path promises it): a failure means an optimisation changed an output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from CalibUncertaintyLib.calibration.thresholds import DEFAULT_THRESHOLDS, threshold_for_case
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.pipeline.ensemble import mean_argmax
from CalibUncertaintyLib.regions.components import find_regions
from CalibUncertaintyLib.uncertainty.measures import argmax_classes
from CalibUncertaintyLib.uncertainty.streaming import EPS, EnsembleAccumulator


@pytest.mark.parametrize("k", [2, 3, 7, 300])
def test_argmax_classes_equals_numpy_argmax_with_ties(k):
    rng = np.random.default_rng(k)
    p = rng.integers(0, 4, size=(k, 3, 9, 11)).astype(np.float32)  # many exact ties
    expected = np.argmax(p, axis=0)
    got = argmax_classes(p)
    assert got.dtype == (np.uint8 if k <= 256 else np.uint16)
    np.testing.assert_array_equal(got, expected)


def _members(k, m, shape, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(m):
        x = rng.normal(size=(k,) + shape).astype(np.float32) * 3
        x[:, 0, 0, :3] = -60.0  # probabilities below EPS: the clamps are exercised
        x[0, 0, 0, :3] = 0.0
        p = np.exp(x - x.max(axis=0))
        out.append((p / p.sum(axis=0)).astype(np.float32))
    return out


def test_mean_argmax_equals_argmax_of_mean():
    members = _members(4, 3, (5, 6, 7))
    acc = EnsembleAccumulator(4, (5, 6, 7))
    for p in members:
        acc.add(p)
    np.testing.assert_array_equal(mean_argmax(acc), np.argmax(acc.mean_probs(), axis=0))


@pytest.mark.parametrize("m", [2, 3, 4])
def test_log_gap_update_is_the_straightforward_float32_formula(m):
    """L_c after each member equals the update written out term by term (the form before the
    buffers were reused and the second member's exact shortcuts taken), bit for bit."""
    k, shape = 3, (4, 5, 6)
    members = _members(k, m, shape, seed=m)
    acc = EnsembleAccumulator(k, shape, slab_voxels=40)  # several slabs
    eps = np.float32(EPS)
    s = np.zeros((k,) + shape, np.float32)
    gap = np.zeros((k,) + shape, np.float32)
    for n_old, p in enumerate(members):
        acc.add(p)
        if n_old:
            inv_old, inv_new, n_new = np.float32(1.0 / n_old), np.float32(1.0 / (n_old + 1)), np.float32(n_old + 1)
            for c in range(k):
                g = gap[c].astype(np.float32)
                g += np.log(np.maximum(p[c], eps))
                new = np.log(np.maximum((s[c] + p[c]) * inv_new, eps))
                new *= n_new
                g -= new
                old = np.log(np.maximum(s[c] * inv_old, eps))
                old *= np.float32(n_old)
                g += old
                gap[c] = g
        s += p
        np.testing.assert_array_equal(acc.log_gap, gap)
    np.testing.assert_array_equal(acc.sum_probs, s)


def test_threshold_from_roi_values_equals_whole_map():
    rng = np.random.default_rng(3)
    u = rng.random((6, 7, 8), dtype=np.float32)
    roi = rng.random(u.shape) > 0.6
    for entry in (DEFAULT_THRESHOLDS["confidence"], {"kind": "quantile", "q": 0.9, "score": "map"},
                  DEFAULT_THRESHOLDS["entropy"]):
        assert threshold_for_case(entry, u, roi, roi_values=u[roi]) == threshold_for_case(entry, u, roi)
    empty = np.zeros(u.shape, bool)
    assert threshold_for_case(DEFAULT_THRESHOLDS["confidence"], u, empty, roi_values=u[empty]) == math.inf


@pytest.mark.parametrize("where", ["inside", "edges"])
def test_regions_on_the_flagged_box_equal_whole_image_components(where):
    """find_regions labels only the flagged voxels' box; every region's voxels, volume, box,
    maximum, mean and centroid are those of the 26-connected components of the whole image
    (whole components: ``max_extent_mm=None``; single voxels are never regions)."""
    rng = np.random.default_rng(7)
    shape = (12, 30, 28)
    u = ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)
    roi = np.zeros(shape, bool)
    if where == "inside":
        roi[3:9, 6:22, 5:20] = True
    else:
        roi[:, :, :] = True
    labels = (u > np.quantile(u, 0.7)).astype(np.uint8) + (u > np.quantile(u, 0.9)).astype(np.uint8)
    geo = Geometry(shape_zyx=shape, spacing=(0.8, 0.7, 2.5))
    tau = float(np.quantile(u[roi], 0.8))
    regions = find_regions(u, tau, roi, labels, geo, min_volume_mm3=0.0, max_extent_mm=None)

    comp, n = ndimage.label((u > tau) & roi, structure=np.ones((3, 3, 3), bool))
    assert len(regions) == int(np.count_nonzero(np.bincount(comp.ravel())[1:] >= 2)) > 3
    boxes = ndimage.find_objects(comp)
    for r in regions:
        # the component with this region's box and size
        cands = [j for j in range(1, n + 1)
                 if tuple(s.start for s in boxes[j - 1]) == tuple(r.bbox_zyx_min)
                 and tuple(s.stop - 1 for s in boxes[j - 1]) == tuple(r.bbox_zyx_max)
                 and np.count_nonzero(comp == j) == r.n_voxels]
        assert cands, r
        j = cands[0]
        vals = u[comp == j].astype(np.float64)
        assert r.max_u == float(vals.max())
        assert r.mean_u == pytest.approx(float(vals.mean()), rel=1e-12)
        np.testing.assert_allclose(r.centroid_zyx, np.argwhere(comp == j).mean(axis=0), rtol=1e-12)
        assert r.volume_mm3 == pytest.approx(r.n_voxels * geo.voxel_volume_mm3)
        near = labels[ndimage.binary_dilation(comp == j, structure=np.ones((3, 3, 3), bool))]
        near = near[near > 0]
        assert r.class_index == (int(np.argmax(np.bincount(near))) if near.size else 0)
    ranks = [r.rank for r in regions]
    assert ranks == list(range(1, len(regions) + 1))
    assert all(a.score >= b.score for a, b in zip(regions, regions[1:]))


def test_maps_computed_into_spare_volumes_equal_fresh_ones():
    """iter_maps writes each map but the entropy into the volume ``spare_volume`` hands it (a map
    already written, full of old values): every voxel is overwritten, so the maps are those of
    fresh volumes, and the entropy, which DAE and EBCU read afterwards, is never handed out."""
    from CalibUncertaintyLib.uncertainty.maps import MAP_NAMES, iter_maps

    k, shape = 3, (6, 20, 18)
    acc = EnsembleAccumulator(k, shape)
    for p in _members(k, 3, shape, seed=11):
        acc.add(p)
    geo = Geometry(shape_zyx=shape, spacing=(0.9, 0.8, 2.5))
    fresh = {n: v.copy() for n, v in iter_maps(acc, geo, temperature=1.3)}
    handed = []

    def spare():
        buf = np.full(shape, np.float32(7.5))  # stale values everywhere
        handed.append(buf)
        return buf

    got = {}
    for n, v in iter_maps(acc, geo, temperature=1.3, spare_volume=spare):
        got[n] = v.copy()
        if n != "entropy":
            assert any(v is b for b in handed), n
    assert sorted(got) == sorted(MAP_NAMES)
    for n in MAP_NAMES:
        np.testing.assert_array_equal(got[n], fresh[n], err_msg=n)
    assert len(handed) == len(MAP_NAMES) - 1


class _OnDemand:
    """A member computed per z slab on demand (as nnunet.member_probabilities gives them)."""

    ndim, dtype = 4, np.dtype(np.float32)

    def __init__(self, array, valid=True, fail_at=None):
        self.array, self.shape, self.valid_probabilities = array, array.shape, valid
        self.reads, self.fail_at = [], fail_at

    def slab(self, sl):
        import threading

        self.reads.append((sl.start, threading.current_thread().name))
        if self.fail_at is not None and sl.start == self.fail_at:
            raise RuntimeError("slab failed")
        return self.array[:, sl].copy()


@pytest.mark.parametrize("valid", [True, False])
def test_members_read_ahead_in_a_worker_give_the_same_sums(valid):
    """An on-demand member's next slab is computed in a worker thread while the current one is
    accumulated: the slabs are read in order, once per pass, and the sums equal those of the
    same member given as an array."""
    k, shape = 3, (7, 5, 6)
    members = _members(k, 3, shape, seed=5)
    plain = EnsembleAccumulator(k, shape, slab_voxels=30)
    ahead = EnsembleAccumulator(k, shape, slab_voxels=30)
    for p in members:
        plain.add(p)
        m = _OnDemand(p, valid)
        ahead.add(m)
        starts = [s for s, _ in m.reads]  # worker threads may start neighbouring slabs in either order
        assert sorted(starts) == sorted(list(range(7)) * (1 if valid else 2))
        if not valid:  # every slab validated before any is accumulated
            assert sorted(starts[:7]) == list(range(7))
        assert all(name.startswith("calibu-slab") for _, name in m.reads)
    for a, b in ((plain.sum_probs, ahead.sum_probs), (plain.log_gap, ahead.log_gap),
                 (plain.sum_entropy, ahead.sum_entropy), (plain.fg_sq_dev, ahead.fg_sq_dev),
                 (plain.fg_votes, ahead.fg_votes)):
        np.testing.assert_array_equal(a, b)


def test_a_failing_slab_read_ahead_propagates_and_validation_leaves_the_sums():
    k, shape = 2, (6, 4, 5)
    p = _members(k, 1, shape)[0]
    acc = EnsembleAccumulator(k, shape, slab_voxels=20)
    acc.add(p)
    before = acc.sum_probs.copy()
    with pytest.raises(RuntimeError, match="slab failed"):
        acc.add(_OnDemand(p, valid=False, fail_at=3))  # fails in the validation pass
    np.testing.assert_array_equal(acc.sum_probs, before)
    assert acc.n_members == 1


@pytest.mark.parametrize("temperature", [None, 1.3])
def test_release_sums_frees_each_sum_after_its_last_map(temperature):
    """With release_sums the maps of the members come first (foreground variance and votes, then
    EE, MI, EPKL) and each sum is freed after the last map that reads it, so only p̄'s sums are
    left when the entropy volume is allocated, none after the confidence pass; the maps equal
    those computed with every sum kept. Uncalibrated, the confidence and the entropy H(p̄) come
    before EE, MI and EPKL, which read H(p̄) from it (issue 19); the sums go after EPKL."""
    from CalibUncertaintyLib.errors import InputError
    from CalibUncertaintyLib.uncertainty.maps import YIELD_ORDER, YIELD_ORDER_UNCALIBRATED, compute_maps, iter_maps

    k, shape = 3, (5, 12, 10)
    members = _members(k, 3, shape, seed=2)
    kept, freed = EnsembleAccumulator(k, shape), EnsembleAccumulator(k, shape)
    for p in members:
        kept.add(p)
        freed.add(p)
    geo = Geometry(shape_zyx=shape, spacing=(0.9, 0.8, 2.5))
    expected = compute_maps(kept, geo, temperature=temperature)
    order = []
    for name, v in iter_maps(freed, geo, temperature=temperature, release_sums=True):
        order.append(name)
        np.testing.assert_array_equal(v, expected[name], err_msg=name)
        if name == "fg_variance":
            with pytest.raises(InputError, match="released"):
                freed.fg_sq_dev
        if name == "epkl":  # the members' maps are done: their own sums are gone, p̄'s stays
            with pytest.raises(InputError, match="released"):
                freed.log_gap
            with pytest.raises(InputError, match="released"):
                freed.sum_entropy
            assert not freed.released
        if name == "confidence":  # calibrated: every sum freed before the entropy maps, DAE and EBCU
            assert freed.released == (temperature is not None)
        if name == "entropy_norm":
            assert freed.released
    assert tuple(order) == (YIELD_ORDER if temperature else YIELD_ORDER_UNCALIBRATED)
    with pytest.raises(InputError):
        freed.release_part("sum_p")


@pytest.mark.parametrize("kind", ["scattered", "compact"])
def test_roi_decided_on_coarse_blocks_equals_the_3d_transform(kind):
    """roi_mask decides coarse blocks by exact distance bounds and transforms a plane only where a
    block is undecided (issue 19): the mask is the 3-D distance transform's, voxel for voxel."""
    from CalibUncertaintyLib.calibration.roi import roi_mask

    rng = np.random.default_rng(4)
    if kind == "scattered":
        n = ndimage.gaussian_filter(rng.standard_normal((10, 90, 86)), 2)
        lab = np.digitize(n, np.quantile(n, [0.5, 0.8])).astype(np.uint8)
    else:
        lab = np.zeros((14, 90, 86), np.uint8)
        lab[5:8, 30:41, 20:33] = 1
        lab[6, 70, 75] = 2
    for spacing in ((5.0, 0.976, 0.976), (2.0, 1.7, 0.6)):
        reference = ndimage.distance_transform_edt(lab == 0, sampling=spacing)
        for radius in (15.0, 4.0, 0.5):
            np.testing.assert_array_equal(roi_mask(lab, spacing, radius), reference <= radius,
                                          err_msg=f"{kind} {spacing} {radius}")


@pytest.mark.parametrize("m", [1, 2, 4])
def test_last_member_gives_epkl_gap_as_it_is_added(m):
    """accumulate(..., n_members=M) adds the last member with last=True: EPKL's gap G comes out of
    its add (the gap volumes are not written by it; for M = 2 never touched) and equals
    reduce_log_gap's bit for bit, as do the maps."""
    from CalibUncertaintyLib.pipeline.ensemble import accumulate
    from CalibUncertaintyLib.uncertainty.maps import compute_maps

    k, shape = 4, (5, 9, 8)
    members = _members(k, m, shape, seed=20 + m)
    plain, fused = accumulate(members), accumulate(members, n_members=m)
    assert fused.reduced and plain.reduced
    for sl in plain.slabs():
        np.testing.assert_array_equal(fused.epkl_gap_slab(sl), plain.epkl_gap_slab(sl))
    np.testing.assert_array_equal(fused.sum_probs, plain.sum_probs)
    geo = Geometry(shape_zyx=shape, spacing=(0.9, 0.8, 2.5))
    a, b = compute_maps(plain, geo), compute_maps(fused, geo)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    from CalibUncertaintyLib.errors import InputError

    with pytest.raises(InputError, match="more members than"):
        accumulate(members + members[:1], n_members=m)
