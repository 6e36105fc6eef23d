"""Dice per foreground class (METHODS.md §3): hand examples, the empty-vs-empty rule with its
flags, and a cross-check against scikit-learn's per-class F1 on a real OpenKBP label map."""

from __future__ import annotations

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.metrics import confusion_counts, dice_masks, dice_per_class, mean_dice


def test_dice_hand_example_and_empty_flags():
    pred = np.array([[[0, 1, 1, 2, 0, 0]]])
    ref = np.array([[[0, 1, 0, 0, 0, 3]]])
    d = dice_per_class(pred, ref, n_classes=5)
    assert d[1]["dice"] == pytest.approx(2 * 1 / (2 + 1))
    assert d[2] == {"dice": 0.0, "empty_reference": True, "empty_prediction": False, "n_pred": 1, "n_ref": 0}
    assert d[3]["dice"] == 0.0 and d[3]["empty_prediction"] and not d[3]["empty_reference"]
    # class 4 absent from both: 1.0 with both flags (METHODS: empty-vs-empty = 1, flagged)
    assert d[4]["dice"] == 1.0 and d[4]["empty_reference"] and d[4]["empty_prediction"]
    assert mean_dice(d) == pytest.approx((2 / 3 + 0 + 0 + 1) / 4)
    assert mean_dice(d, exclude_empty_reference=True) == pytest.approx((2 / 3 + 0) / 2)
    # n_classes inferred from the largest label
    assert sorted(dice_per_class(pred, ref)) == [1, 2, 3]


def test_dice_masks_and_roi():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert dice_masks(a, b)["dice"] == pytest.approx(2 * 16 / 64)
    roi = np.zeros_like(a)
    roi[1] = True  # inside the ROI both masks cover the same slice
    assert dice_masks(a, b, roi)["dice"] == 1.0
    e = dice_masks(np.zeros_like(a), np.zeros_like(b))
    assert e["dice"] == 1.0 and e["empty_reference"] and e["empty_prediction"]
    cm = confusion_counts(a.astype(int), b.astype(int), 2)
    assert cm.tolist() == [[16, 16], [16, 16]]


def test_dice_matches_sklearn_f1_on_openkbp(openkbp_dir):
    from sklearn.metrics import f1_score

    label_file = sorted((openkbp_dir / "labelsTr").glob("*.nii.gz"))[0]
    ref, _ = read_image(label_file)
    assert ref.max() >= 3
    zz, yy, xx = np.nonzero(ref)  # the organs' bounding box keeps sklearn fast
    ref = ref[zz.min():zz.max() + 1, yy.min():yy.max() + 1, xx.min():xx.max() + 1]
    pred = np.roll(ref, 2, axis=1)  # a 2-voxel shift in y
    pred[pred == 5] = 0            # and the mandible forgotten
    d = dice_per_class(pred, ref, n_classes=6)
    present = [c for c in range(1, 6) if (ref == c).any() or (pred == c).any()]
    sk = f1_score(ref.ravel(), pred.ravel(), labels=present, average=None)
    for c, v in zip(present, sk):
        assert d[c]["dice"] == pytest.approx(v, abs=1e-12)
    assert d[5]["dice"] == (0.0 if (ref == 5).any() else 1.0)
    assert 0 < d[present[0]]["dice"] < 1


def test_dice_bad_input():
    with pytest.raises(InputError, match="same voxel grid"):
        dice_per_class(np.zeros((2, 2, 2), int), np.zeros((2, 2, 3), int))
    with pytest.raises(InputError, match="integer"):
        dice_per_class(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), int))
    with pytest.raises(InputError, match="lie in"):
        dice_per_class(np.full((2, 2, 2), 3), np.zeros((2, 2, 2), int), n_classes=3)
