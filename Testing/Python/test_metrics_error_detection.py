"""Uncertainty as an error detector (METHODS.md §4): error mask, UEO, recall/precision, AUROC
(against scikit-learn), budget curve and its area, boundary split."""

from __future__ import annotations

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.metrics import (boundary_split, budget_curve, contour_zone, detection_at_threshold,
                                         error_detection_report, error_mask, ueo, voxel_auroc)


def test_error_mask_is_inside_roi():
    pred = np.array([[[0, 1, 1, 2]]])
    ref = np.array([[[1, 1, 0, 0]]])
    roi = np.array([[[True, True, True, False]]])
    np.testing.assert_array_equal(error_mask(pred, ref, roi), [[[True, False, True, False]]])
    np.testing.assert_array_equal(error_mask(pred, ref), [[[True, False, True, True]]])


def test_ueo_recall_precision_hand_example():
    u = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.05, 0.95]).reshape(1, 1, 7)
    e = np.array([1, 1, 0, 1, 0, 0, 1], bool).reshape(1, 1, 7)
    roi = np.array([1, 1, 1, 1, 1, 1, 0], bool).reshape(1, 1, 7)  # the last voxel is outside
    r = detection_at_threshold(u, e, 0.5, roi)
    # flagged {0.9, 0.8, 0.7}, errors {0, 1, 3}: TP 2
    assert (r["n_flagged"], r["n_errors"], r["n_true_positive"]) == (3, 3, 2)
    assert r["ueo"] == pytest.approx(2 * 2 / 6)
    assert r["recall"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(2 / 3)
    assert ueo(u, e, 0.9, roi) == pytest.approx(0.0)  # strictly greater: nothing flagged but errors exist
    none = detection_at_threshold(u, np.zeros_like(e), 1.0, roi)
    assert none["ueo"] == 1.0 and none["recall"] is None and none["precision"] is None


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    shape = (12, 30, 30)
    e = rng.random(shape) < 0.1
    u = np.round(rng.random(shape) * 0.6 + 0.3 * e, 1)  # coarse values: many ties
    roi = rng.random(shape) < 0.7
    ref = roc_auc_score(e[roi], u[roi])
    assert voxel_auroc(u, e, roi) == pytest.approx(ref, abs=1e-12)
    assert voxel_auroc(u, e) == pytest.approx(roc_auc_score(e.ravel(), u.ravel()), abs=1e-12)
    assert voxel_auroc(np.ones(shape), e, roi) == pytest.approx(0.5)
    assert voxel_auroc(u, np.zeros(shape, bool), roi) is None


def test_budget_curve_perfect_reversed_and_tied():
    n, n_err = 2000, 40
    e = np.zeros((1, 1, n), bool)
    e[0, 0, :n_err] = True
    u = np.linspace(1.0, 0.0, n).reshape(1, 1, n)  # errors are the most uncertain voxels
    bc = budget_curve(u, e)
    assert len(bc["fractions"]) == 50 and bc["fractions"][-1] == pytest.approx(0.05)
    assert bc["n_flagged"][0] == 2 and bc["n_flagged"][-1] == 100
    np.testing.assert_allclose(bc["ueo"], bc["oracle_ueo"])
    assert bc["ueo"][19] == pytest.approx(1.0)  # 2 % of 2000 = 40 flagged = the 40 errors
    assert bc["normalised_area"] == pytest.approx(bc["oracle_normalised_area"])
    # hand trapezoid of the oracle curve over (0, 0), k_i
    k = np.concatenate(([0], bc["fractions"]))
    y = np.concatenate(([0], bc["oracle_ueo"]))
    assert bc["oracle_normalised_area"] == pytest.approx(np.trapezoid(y, k) / 0.05)
    # reversed map: nothing found within the budget
    rev = budget_curve(1.0 - u, e)
    assert max(rev["ueo"]) == 0.0 and rev["normalised_area"] == 0.0
    # a constant map: every flagged voxel finds errors at the base rate (ties shared)
    flat = budget_curve(np.zeros_like(u), e)
    n_flag = np.array(flat["n_flagged"])
    np.testing.assert_allclose(flat["ueo"], 2 * n_flag * n_err / n / (n_flag + n_err))


def test_budget_curve_rejects_bad_fractions():
    u = np.zeros((1, 1, 10))
    e = np.zeros((1, 1, 10), bool)
    with pytest.raises(InputError, match="fractions"):
        budget_curve(u, e, fractions=[0.0, 0.01])
    with pytest.raises(InputError, match="non-empty ROI"):
        budget_curve(u, e, roi=np.zeros((1, 1, 10), bool))


def test_contour_zone_of_a_cube():
    pred = np.zeros((10, 10, 10), np.uint8)
    pred[3:7, 3:7, 3:7] = 1
    zone = contour_zone(pred)
    # 3x3x3 neighbourhood holds the other label: the 6^3 dilated cube minus the 2^3 eroded core
    assert zone.sum() == 6 ** 3 - 2 ** 3
    assert not zone[5, 5, 5] and not zone[0, 0, 0] and zone[3, 3, 3] and zone[2, 2, 2]
    # the image border is not a contour
    full = np.ones((5, 5, 5), np.uint8)
    assert not contour_zone(full).any()


def test_boundary_split_recall():
    pred = np.zeros((12, 12, 12), np.uint8)
    pred[2:10, 2:10, 2:10] = 1
    ref = pred.copy()
    ref[2, 2:10, 2:10] = 0            # a boundary error slab (64 voxels in the contour zone)
    ref[5:7, 5:7, 5:7] = 0            # an interior hole: 8 non-boundary errors
    e = error_mask(pred, ref)
    u = np.zeros(pred.shape)
    u[5:7, 5:7, 5:7] = 1.0            # the map finds the hole only
    bs = boundary_split(u, pred, e, tau=0.5)
    assert bs["boundary"] == {"n_errors": 64, "n_detected": 0, "recall": 0.0}
    assert bs["non_boundary"] == {"n_errors": 8, "n_detected": 8, "recall": 1.0}
    assert bs["boundary_error_fraction"] == pytest.approx(64 / 72)
    rep = error_detection_report(u, pred, ref, 0.5)
    assert rep["at_tau"]["recall"] == pytest.approx(8 / 72)
    assert rep["boundary_split"] == bs and 0.5 < rep["auroc"] <= 1.0


def test_shape_mismatch_and_nan_raise():
    with pytest.raises(InputError, match="same voxel grid"):
        ueo(np.zeros((2, 2, 2)), np.zeros((2, 2, 3), bool), 0.1)
    u = np.zeros((2, 2, 2))
    u[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        voxel_auroc(u, np.zeros((2, 2, 2), bool))


def test_nan_parameters_are_refused_not_read_as_nothing_flagged():
    """A NaN threshold made every comparison false (UEO 0, recall 0, no error); a NaN budget
    fraction gave a NaN area; eps = 0 gave an infinite NLL. Each is now an InputError."""
    from CalibUncertaintyLib.metrics.case_quality import case_aggregates
    from CalibUncertaintyLib.metrics.nll_brier import nll
    from CalibUncertaintyLib.metrics.pece import pece

    rng = np.random.default_rng(0)
    u = rng.random((4, 5, 6))
    pred, ref = (u > 0.5).astype(np.int64), (u > 0.6).astype(np.int64)
    errors = pred != ref
    for bad in (float("nan"), float("inf"), None, "x"):
        with pytest.raises(InputError, match="threshold tau"):
            detection_at_threshold(u, errors, bad)
        with pytest.raises(InputError, match="threshold tau"):
            boundary_split(u, pred, errors, bad)
        with pytest.raises(InputError, match="threshold tau"):
            error_detection_report(u, pred, ref, bad)
        with pytest.raises(InputError, match="threshold tau"):
            case_aggregates(u, np.ones(u.shape, bool), pred > 0, bad)
    with pytest.raises(InputError, match="budget fractions"):
        budget_curve(u, errors, fractions=[0.01, float("nan")])
    probs = np.stack([np.ones(u.shape), np.zeros(u.shape)])  # fully confident background: wrong where ref = 1
    for eps in (0.0, -1e-12, float("nan"), 1.5):
        with pytest.raises(InputError, match="eps"):
            nll(probs, ref, eps=eps)
    assert np.isfinite(nll(probs, ref))
    p = np.stack([1 - u, u])
    with pytest.raises(InputError, match="lambda"):
        pece(p, ref, lam=float("nan"))
