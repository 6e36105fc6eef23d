"""compute_maps: pool-then-calibrate temperature, map set, EBCU threshold, real OpenKBP labels."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from CalibUncertaintyLib.calibration.roi import roi_mask
from CalibUncertaintyLib.errors import GeometryMismatchError, InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.uncertainty import (MAP_DESCRIPTIONS, MAP_NAMES, EnsembleAccumulator,
                                             calibrated_mean_probs, compute_maps, segmentation)
from CalibUncertaintyLib.uncertainty.measures import entropy
from CalibUncertaintyLib.uncertainty.streaming import EPS


def blob_members(shape=(16, 18, 20), m=3, k=3, seed=0):
    """Members with a foreground ball (class 1), a smaller class-2 ball and member noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    c = np.array(shape) / 2
    r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    out = []
    for _ in range(m):
        logits = np.zeros((k,) + shape, dtype=np.float32)
        logits[1] = 2.0 * (5.0 - r) + rng.normal(0, 0.7, shape)
        if k > 2:
            logits[2] = 2.0 * (2.5 - np.abs(zz - 3.0) - np.abs(yy - 4.0)) + rng.normal(0, 0.7, shape)
        e = np.exp(logits - logits.max(axis=0))
        out.append((e / e.sum(axis=0)).astype(np.float32))
    return out


def make_acc(members):
    acc = EnsembleAccumulator(members[0].shape[0], members[0].shape[1:])
    for p in members:
        acc.add(p)
    return acc


def test_map_names_and_descriptions_match():
    assert len(MAP_NAMES) == 10 and set(MAP_DESCRIPTIONS) == set(MAP_NAMES)
    assert all(isinstance(v, str) and len(v) > 20 for v in MAP_DESCRIPTIONS.values())


def test_temperature_one_is_identity_and_larger_flattens():
    members = blob_members()
    acc = make_acc(members)
    pbar = acc.mean_probs()
    np.testing.assert_array_equal(calibrated_mean_probs(acc, None), pbar)
    np.testing.assert_array_equal(calibrated_mean_probs(acc, 1.0), pbar)
    # through the softmax formula itself: T = 1 (+ 1e-9) gives p̄ back
    np.testing.assert_allclose(calibrated_mean_probs(acc, 1.0 + 1e-9), pbar, atol=2e-6)
    ref = np.log(np.maximum(pbar.astype(np.float64), EPS)) / 2.5
    ref = np.exp(ref - ref.max(axis=0))
    ref /= ref.sum(axis=0)
    hot = calibrated_mean_probs(acc, 2.5)
    np.testing.assert_allclose(hot, ref, atol=2e-6)
    cold = calibrated_mean_probs(acc, 0.5)
    h_bar, h_hot, h_cold = entropy(pbar), entropy(hot), entropy(cold)
    assert (h_hot >= h_bar - 1e-6).all() and (h_hot - h_bar).mean() > 0.05
    assert (h_cold <= h_bar + 1e-6).all() and (h_bar - h_cold).mean() > 0.05
    np.testing.assert_array_equal(segmentation(hot), segmentation(pbar))
    assert (hot.max(axis=0) <= pbar.max(axis=0) + 1e-6).all()
    # compute_maps uses the calibrated mean for confidence/entropy but not for MI
    g = Geometry(acc.shape_zyx, (1.0, 1.0, 1.0))
    m1 = compute_maps(acc, g, names=["entropy", "mutual_information"])
    m2 = compute_maps(acc, g, temperature=2.5, names=["entropy", "mutual_information"])
    np.testing.assert_allclose(m2["entropy"], h_hot, atol=1e-6)
    np.testing.assert_array_equal(m1["mutual_information"], m2["mutual_information"])
    for bad in (0, -1.0, float("nan"), float("inf"), "warm"):
        with pytest.raises(InputError, match="temperature"):
            calibrated_mean_probs(acc, bad)


def test_compute_maps_all_and_subsets():
    acc = make_acc(blob_members())
    g = Geometry(acc.shape_zyx, (1.2, 0.9, 2.0), origin=(5.0, -3.0, 10.0))
    info = {}
    maps = compute_maps(acc, g, info=info)
    assert tuple(maps) == MAP_NAMES
    for name, arr in maps.items():
        assert arr.dtype == np.float32 and arr.shape == acc.shape_zyx, name
        assert np.isfinite(arr).all() and arr.min() >= 0, name
    assert (maps["dae"] <= maps["entropy"] + 1e-7).all()
    assert (maps["mutual_information"] <= maps["epkl"]).all()
    np.testing.assert_allclose(maps["entropy_norm"], maps["entropy"] / np.log(3), rtol=1e-6)
    # default EBCU threshold: the 0.95 quantile of entropy in the 15 mm prediction ROI
    seg = segmentation(acc.mean_probs())
    roi = roi_mask(seg, g.spacing_zyx, 15.0)
    assert info["ebcu_threshold"] == pytest.approx(float(np.quantile(maps["entropy"][roi], 0.95)))
    assert "15 mm prediction-derived ROI" in info["ebcu_threshold_source"]
    assert info["n_members"] == 3 and info["temperature"] is None
    sub = compute_maps(acc, g, names=["ebcu", "confidence"], ebcu_threshold=0.2, info=info)
    assert list(sub) == ["confidence", "ebcu"]
    assert info["ebcu_threshold"] == 0.2 and info["ebcu_threshold_source"] == "given"
    assert not np.array_equal(sub["ebcu"], maps["ebcu"])
    # a given ROI mask and a callable ROI
    small = np.zeros(acc.shape_zyx, bool)
    small[6:10, 6:10, 6:10] = True
    compute_maps(acc, g, names=["ebcu"], roi=small, info=info)
    assert info["ebcu_threshold"] == pytest.approx(float(np.quantile(maps["entropy"][small], 0.95)))
    compute_maps(acc, g, names=["ebcu"], roi=lambda s, sp: s > 0, info=info)
    assert info["ebcu_threshold"] == pytest.approx(float(np.quantile(maps["entropy"][seg > 0], 0.95)))


def test_compute_maps_bad_input():
    acc = make_acc(blob_members())
    g = Geometry(acc.shape_zyx, (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="unknown map name"):
        compute_maps(acc, g, names=["entropy", "variance"])
    with pytest.raises(GeometryMismatchError, match="shape"):
        compute_maps(acc, Geometry((16, 18, 21), (1.0, 1.0, 1.0)))
    with pytest.raises(InputError, match="no ensemble member"):
        compute_maps(EnsembleAccumulator(3, acc.shape_zyx), g)
    with pytest.raises(InputError, match="ROI mask shape"):
        compute_maps(acc, g, names=["ebcu"], roi=np.ones((2, 2, 2), bool))
    with pytest.raises(InputError, match="ebcu_threshold"):
        compute_maps(acc, g, names=["ebcu"], ebcu_threshold=float("nan"))
    with pytest.raises(InputError, match="EnsembleAccumulator"):
        compute_maps(acc.mean_probs(), g)
    with pytest.raises(InputError, match="K >= 2"):
        segmentation(np.ones((1, 2, 2, 2)))


def test_empty_prediction_keeps_entropy_and_says_so(caplog):
    shape = (10, 10, 10)
    p = np.zeros((2,) + shape, np.float32)
    p[0] = np.linspace(0.55, 0.99, 1000, dtype=np.float32).reshape(shape)
    p[1] = 1 - p[0]
    acc = make_acc([p])
    info = {}
    with caplog.at_level(logging.INFO):
        maps = compute_maps(acc, Geometry(shape, (1.0, 1.0, 1.0)), names=["entropy", "dae", "ebcu"], info=info)
    np.testing.assert_array_equal(maps["dae"], maps["entropy"])
    assert "whole image" in info["ebcu_threshold_source"]
    text = caplog.text
    assert "single label" in text and "ROI is empty" in text


def test_segmentation_is_argmax_uint8():
    p = np.zeros((3, 2, 2, 2), np.float32)
    p[0] = 0.2
    p[1] = np.array([0.5, 0.1] * 4).reshape(2, 2, 2)
    p[2] = 1 - p[0] - p[1]
    seg = segmentation(p)
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, np.where(p[1] > p[2], 1, 2))


def test_real_openkbp_labels(openkbp_dir):
    """Members derived from a real OpenKBP label map on its real anisotropic geometry."""
    labels, geom = read_image(sorted((openkbp_dir / "labelsTr").glob("*.nii.gz"))[0])
    box = ndimage.find_objects((labels > 0).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 4, 0), min(s.stop + 4, n)) for s, n in zip(box, labels.shape))
    lab = labels[box]
    start_zyx = np.array([s.start for s in box])
    g = Geometry(lab.shape, geom.spacing, tuple(geom.index_to_lps(start_zyx[::-1])), geom.direction)
    k = 6
    rng = np.random.default_rng(0)
    onehot = np.stack([(lab == c).astype(np.float32) for c in range(k)])
    acc = EnsembleAccumulator(k, lab.shape)
    for m in range(3):
        logits = ndimage.gaussian_filter(onehot, sigma=(0, 0.8 + 0.2 * m, 0.8, 0.8)) * 8.0
        logits += rng.normal(0, 0.3, logits.shape).astype(np.float32)
        e = np.exp(logits - logits.max(axis=0))
        acc.add(e / e.sum(axis=0))
    maps = compute_maps(acc, g, temperature=1.3)
    seg = segmentation(acc.mean_probs())
    assert set(np.unique(seg)) == set(range(k))
    # the one-voxel shell on both sides of every predicted contour
    shell = np.zeros(lab.shape, bool)
    for c in range(k):
        inside = seg == c
        shell |= inside & ndimage.binary_dilation(~inside)
    h, dae = maps["entropy"], maps["dae"]
    assert h[shell].mean() > 3 * h[~shell].mean()      # the softmax draws an entropy shell
    assert dae[shell].sum() < 0.5 * h[shell].sum()     # DAE removes most of it (mm-based σ = 2)
    assert (dae <= h + 1e-7).all()
    assert (maps["mutual_information"] <= maps["epkl"]).all()
    assert maps["mutual_information"].max() > 0.01


def test_release_sums_gives_the_same_maps_and_frees_the_accumulator():
    """``release_sums=True`` (what predict uses to lower peak memory) changes no map, and the
    released accumulator refuses to be read or extended instead of returning stale numbers."""
    members = blob_members()
    g = Geometry(members[0].shape[1:], (1.2, 0.9, 2.0))
    kept = compute_maps(make_acc(members), g)
    acc = make_acc(members)
    freed = compute_maps(acc, g, release_sums=True)
    for name in MAP_NAMES:
        np.testing.assert_array_equal(kept[name], freed[name], err_msg=name)
    assert acc.released and acc.n_members == len(members)
    with pytest.raises(InputError, match="released"):
        acc.mean_probs()
    with pytest.raises(InputError, match="released"):
        acc.add(members[0])
