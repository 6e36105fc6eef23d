"""ROI in millimetres (METHODS.md §2 "ROI") and class-stratified subsampling ("Subsample the ROI")."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from CalibUncertaintyLib.calibration import ROI_RULES, describe_roi, roi_mask, stratified_sample_indices
from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.images import read_image


def brute_force_roi(fg, spacing, radius):
    """Voxel in ROI iff some foreground voxel centre lies within radius mm (direct formula)."""
    pts = np.argwhere(fg) * np.asarray(spacing)
    grid = np.indices(fg.shape).reshape(3, -1).T * np.asarray(spacing)
    d, _ = cKDTree(pts).query(grid)
    return (d <= radius).reshape(fg.shape)


def test_radius_is_in_mm_on_anisotropic_spacing():
    spacing = (2.5, 1.0, 0.5)  # z, y, x mm
    pred = np.zeros((21, 31, 41), np.uint8)
    pred[10, 15, 20] = 2
    roi = roi_mask(pred, spacing, radius_mm=5.0)
    assert roi[10 + 2, 15, 20] and not roi[10 + 3, 15, 20]  # 5.0 mm in, 7.5 mm out
    assert roi[10, 15 + 5, 20] and not roi[10, 15 + 6, 20]  # 5 mm in, 6 mm out
    assert roi[10, 15, 20 + 10] and not roi[10, 15, 20 + 11]  # 5 mm in, 5.5 mm out
    np.testing.assert_array_equal(roi, brute_force_roi(pred > 0, spacing, 5.0))


def test_cropped_transform_equals_full_transform():
    rng = np.random.default_rng(0)
    pred = (ndimage.gaussian_filter(rng.random((30, 40, 50)), 2) > 0.56).astype(np.int16)
    pred[pred > 0] = rng.integers(1, 4, int(pred.sum()))
    assert 0 < pred.astype(bool).sum() < pred.size // 5
    spacing = (3.0, 0.8, 1.2)
    full = ndimage.distance_transform_edt(pred == 0, sampling=spacing) <= 7.0
    np.testing.assert_array_equal(roi_mask(pred, spacing, radius_mm=7.0), full)


def test_rules_and_errors():
    pred = np.zeros((10, 10, 10), np.uint8)
    pred[2, 2, 2] = 1
    ref = np.zeros_like(pred)
    ref[8, 8, 8] = 3
    only_pred = roi_mask(pred, (1, 1, 1), radius_mm=1.0)
    union = roi_mask(pred, (1, 1, 1), radius_mm=1.0, reference=ref, rule="gt_union_prediction")
    assert only_pred.sum() == 7 and union.sum() == 14 and union[8, 8, 8] and not only_pred[8, 8, 8]
    assert roi_mask(pred, (1, 1, 1), radius_mm=0).sum() == 1
    with pytest.raises(InputError, match="needs the reference"):
        roi_mask(pred, (1, 1, 1), rule="gt_union_prediction")
    with pytest.raises(InputError, match="reference shape"):
        roi_mask(pred, (1, 1, 1), reference=ref[:5], rule="gt_union_prediction")
    with pytest.raises(InputError, match="unknown ROI rule"):
        roi_mask(pred, (1, 1, 1), rule="gt")
    with pytest.raises(InputError, match="spacing"):
        roi_mask(pred, (1, 0, 1))
    with pytest.raises(InputError, match="radius"):
        roi_mask(pred, (1, 1, 1), radius_mm=-2)
    with pytest.raises(InputError, match="3-D"):
        roi_mask(pred[0], (1, 1, 1))
    empty = np.zeros_like(pred)
    with pytest.raises(InputError, match="empty mask"):
        roi_mask(empty, (1, 1, 1))
    out = roi_mask(empty, (1, 1, 1), allow_empty=True)
    assert out.dtype == bool and out.shape == pred.shape and not out.any()


def test_describe_roi():
    assert ROI_RULES == ("prediction", "gt_union_prediction")
    text = describe_roi("prediction", 15.0)
    assert "15 mm" in text and "predicted foreground" in text
    assert "reference" in describe_roi("gt_union_prediction", 7.5) and "7.5 mm" in describe_roi("prediction", 7.5)


def test_roi_on_real_openkbp_labels(openkbp_dir):
    labels, geo = read_image(sorted((openkbp_dir / "labelsTr").glob("*.nii.gz"))[0])
    assert len(set(geo.spacing)) > 1  # anisotropic: a voxel radius would be wrong here
    roi = roi_mask(labels, geo.spacing_zyx, radius_mm=15.0)
    assert roi[labels > 0].all()
    assert labels.astype(bool).sum() < roi.sum() < roi.size
    # independent check on a random subset of voxels: KD-tree distance in mm to the foreground
    pts = np.argwhere(labels > 0) * np.asarray(geo.spacing_zyx)
    rng = np.random.default_rng(0)
    near = np.argwhere(ndimage.binary_dilation(roi, iterations=3) ^ ndimage.binary_erosion(roi, iterations=3))
    sample = near[rng.choice(len(near), 2000, replace=False)]  # voxels around the ROI border
    d, _ = cKDTree(pts).query(sample * np.asarray(geo.spacing_zyx))
    np.testing.assert_array_equal(roi[tuple(sample.T)], d <= 15.0)


# --- stratified sampling -------------------------------------------------------------------------

def make_labels(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(200_000, np.uint8)
    labels[:40_000] = 1
    labels[40_000:40_300] = 2  # rare class
    rng.shuffle(labels)
    return labels


def test_sampling_all_when_small():
    labels = make_labels()
    np.testing.assert_array_equal(stratified_sample_indices(labels, max_voxels=10 ** 6), np.arange(labels.size))


def test_sampling_is_deterministic_and_proportional():
    labels = make_labels()
    a = stratified_sample_indices(labels, max_voxels=20_000, seed=3)
    b = stratified_sample_indices(labels, max_voxels=20_000, seed=3)
    c = stratified_sample_indices(labels, max_voxels=20_000, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.size == 20_000 and np.unique(a).size == a.size and np.all(np.diff(a) > 0)
    counts = np.bincount(labels[a], minlength=3)
    # the rare class (share 30) keeps min(300, 1000) = all 300; the rest is split 159700 : 40000
    assert counts[2] == 300
    assert counts[0] == pytest.approx((20_000 - 300) * 159_700 / 199_700, abs=1)
    assert counts[1] == pytest.approx((20_000 - 300) * 40_000 / 199_700, abs=1)


def test_sampling_minimum_for_rare_class_and_errors():
    labels = make_labels()
    idx = stratified_sample_indices(labels, max_voxels=2_000, seed=0, min_per_class=100)
    counts = np.bincount(labels[idx], minlength=3)
    assert idx.size == 2_000 and counts[2] >= 100  # proportional share alone would be 3
    assert counts[0] > counts[1] > counts[2]
    with pytest.raises(InputError, match="max_voxels"):
        stratified_sample_indices(labels, max_voxels=0)


def test_roi_from_plane_transforms_equals_3d_transform():
    """The ROI combines 2-D transforms of the slices within reach (memory of a few planes): it must
    equal scipy's 3-D transform on random anisotropic grids, radii and blobs (some touching the
    volume's border, some slices without foreground)."""
    rng = np.random.default_rng(3)
    for trial in range(8):
        shape = tuple(int(n) for n in rng.integers((20, 12, 10), (45, 30, 26)))
        labels = np.zeros(shape, np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            z, y, x = (int(v) for v in rng.integers(0, shape))
            labels[max(z - 2, 0):z + 2, max(y - 2, 0):y + 2, max(x - 2, 0):x + 2] = rng.integers(1, 3)
        spacing = tuple(float(v) for v in rng.uniform(0.6, 3.0, 3))
        radius = float(rng.choice([0.0, 2.5, 6.0, 15.0]))
        full = ndimage.distance_transform_edt(labels == 0, sampling=spacing) <= radius
        np.testing.assert_array_equal(roi_mask(labels, spacing, radius_mm=radius), full,
                                      err_msg=f"trial {trial}: shape {shape}, spacing {spacing}, radius {radius}")
