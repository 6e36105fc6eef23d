"""NLL, Brier, ECE/MCE/ACE, reliability table and pECE: hand-computed examples and cross-checks
against scikit-learn, torchmetrics and netcal (METHODS.md §3), with their documented differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.metrics import (adaptive_calibration_error, bin_index, binary_brier, brier,
                                         calibration_summary, expected_calibration_error, foreground_ece,
                                         maximum_calibration_error, nll, pece, pece_from_confidences,
                                         reliability_table, top_label_confidence, top_label_ece)


def _edge_free_probs(rng, n, k, sharp=1.5):
    """Dirichlet probabilities (K, n) whose top-label and per-class values avoid every 10- and
    15-bin edge by at least 1e-4 (so binning conventions cannot matter), with labels drawn from
    the probabilities themselves (roughly calibrated data)."""
    p = rng.dirichlet(np.full(k, sharp), size=4 * n).T
    edges = np.unique(np.concatenate((np.arange(11) / 10, np.arange(16) / 15)))

    def far(v):
        return np.min(np.abs(v[..., None] - edges), axis=-1) > 1e-4

    keep = far(p.max(axis=0)) & np.all(far(p), axis=0)
    p = p[:, keep][:, :n]
    assert p.shape[1] == n
    u = rng.random(n)
    y = (u[None, :] > np.cumsum(p, axis=0)).sum(axis=0)
    return p, np.minimum(y, k - 1)


# --- hand-computed ----------------------------------------------------------------------------

def test_ece_mce_ace_hand_example():
    conf = np.array([0.2, 0.4, 0.6, 0.9])
    correct = np.array([0, 1, 1, 1])
    # two bins: {0.2, 0.4}: conf 0.3, acc 0.5 ; {0.6, 0.9}: conf 0.75, acc 1.0
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.25)
    assert maximum_calibration_error(conf, correct, n_bins=2) == pytest.approx(0.25)
    assert adaptive_calibration_error(conf, correct, n_bins=2) == pytest.approx((0.2 + 0.25) / 2)
    # equal-mass bins differ from equal-width ones when the mass is uneven
    conf2 = np.array([0.1, 0.2, 0.3, 0.9])
    cor2 = np.array([0, 0, 1, 1])
    # width bins: {0.1,0.2,0.3} conf .2 acc 1/3 ; {0.9} acc 1 -> 0.75*0.1333 + 0.25*0.1
    assert expected_calibration_error(conf2, cor2, 2) == pytest.approx(0.75 * (1 / 3 - 0.2) + 0.25 * 0.1)
    # mass bins: {0.1,0.2} conf .15 acc 0 ; {0.3,0.9} conf .6 acc 1 -> mean(.15, .4)
    assert adaptive_calibration_error(conf2, cor2, 2) == pytest.approx((0.15 + 0.4) / 2)


def test_binning_edges_left_closed_last_bin_closed():
    b = 15
    edges = np.arange(b + 1) / b
    np.testing.assert_array_equal(bin_index(edges, b), list(range(b)) + [b - 1])
    # just below an edge stays in the lower bin; floor(conf * B) would get this one wrong
    c = math.nextafter(0.9, 0.0)
    assert math.floor(c * 10) == 9
    assert bin_index(np.array([c]), 10)[0] == 8
    assert bin_index(np.array([0.9]), 10)[0] == 9


def test_reliability_table_rows():
    conf = np.array([0.05, 0.1, 0.55, 0.95, 1.0])
    correct = np.array([0, 1, 1, 0, 1])
    rows = reliability_table(conf, correct, n_bins=10)
    assert len(rows) == 10 and sum(r["count"] for r in rows) == 5
    assert rows[0]["count"] == 1 and rows[1]["count"] == 1 and rows[5]["count"] == 1 and rows[9]["count"] == 2
    assert rows[3]["count"] == 0 and rows[3]["accuracy"] is None and rows[3]["gap"] is None
    assert rows[9]["mean_confidence"] == pytest.approx(0.975) and rows[9]["accuracy"] == pytest.approx(0.5)
    assert rows[9]["gap"] == pytest.approx(0.475)  # over-confident: positive gap
    assert rows[9]["lo"] == pytest.approx(0.9) and rows[9]["hi"] == 1.0
    ece = sum(r["count"] / 5 * abs(r["gap"]) for r in rows if r["count"])
    assert ece == pytest.approx(expected_calibration_error(conf, correct, 10))


def test_soft_labels_equal_to_confidence_give_zero_ece():
    conf = np.array([0.0, 0.25, 0.25, 0.5, 0.75, 1.0])
    assert expected_calibration_error(conf, conf, 15) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(conf, 1 - conf, 15) > 0.3


def test_pece_hand_example_and_lambda_zero():
    # binary fg/bg: p_fg = 1 - p_0 ; 10 bins
    p_fg = np.array([0.15, 0.15, 0.85, 0.85])
    is_fg = np.array([0, 0, 1, 0])
    # bin 1: conf .15 acc 0, FP conf .15 -> |.15 + 2*.15| = .45 ; bin 8: conf .85 acc .5, FP .85 -> |.35 + 1.7|
    expected = 0.5 * 0.45 + 0.5 * (0.35 + 1.7)
    assert pece_from_confidences(p_fg, is_fg) == pytest.approx(expected)
    probs = np.stack([1 - p_fg, p_fg]).reshape(2, 1, 2, 2)
    assert pece(probs, is_fg.reshape(1, 2, 2)) == pytest.approx(expected)
    # a bin without background voxels has no FP term
    assert pece_from_confidences([0.85, 0.85], [1, 1]) == pytest.approx(0.15)
    # lambda = 0 reduces pECE to the foreground ECE (10 bins) of p_fg
    rng = np.random.default_rng(3)
    p, y = _edge_free_probs(rng, 5000, 3)
    fg = 1 - p[0]
    assert pece(p, y, lam=0.0) == pytest.approx(expected_calibration_error(fg, y != 0, 10))
    assert pece(p, y) > pece(p, y, lam=0.0)
    # per class view: class 2 against the rest
    assert pece(p, y, lam=0.0, cls=2) == pytest.approx(expected_calibration_error(p[2], y == 2, 10))


# --- scikit-learn -------------------------------------------------------------------------------

def test_nll_and_brier_against_sklearn():
    from sklearn.metrics import brier_score_loss, log_loss

    rng = np.random.default_rng(0)
    p, y = _edge_free_probs(rng, 4000, 4)
    vol64 = p.reshape(4, 10, 20, 20)
    vol = vol64.astype(np.float32)
    lab = y.reshape(10, 20, 20)
    mask = rng.random((10, 20, 20)) < 0.6
    ref = log_loss(lab[mask], vol64[:, mask].T, labels=[0, 1, 2, 3])
    assert nll(vol, lab, mask) == pytest.approx(ref, rel=1e-5)
    onehot = np.eye(4)[lab[mask]].T
    assert brier(vol, lab, mask) == pytest.approx(np.mean(np.sum((vol[:, mask] - onehot) ** 2, axis=0)), rel=1e-5)
    # K = 2: the multi-class Brier is twice sklearn's binary Brier
    p2, y2 = _edge_free_probs(rng, 3000, 2)
    sk = brier_score_loss(y2, p2[1])
    assert brier(p2, y2) == pytest.approx(2 * sk, rel=1e-9)
    assert binary_brier(p2, y2) == pytest.approx(sk, rel=1e-9)


def test_nll_clamps_zero_probability():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])  # (K=2, N=2)
    labels = np.array([1, 1])
    assert nll(probs, labels) == pytest.approx(-math.log(1e-12) / 2)


# --- torchmetrics -------------------------------------------------------------------------------

def test_ece_against_torchmetrics_multiclass_and_binary():
    import torch
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    rng = np.random.default_rng(1)
    p, y = _edge_free_probs(rng, 20000, 3)
    tp, ty = torch.from_numpy(p.T.copy()), torch.from_numpy(y)
    for nb in (10, 15):
        ref = float(multiclass_calibration_error(tp, ty, num_classes=3, n_bins=nb, norm="l1"))
        assert top_label_ece(p, y, n_bins=nb) == pytest.approx(ref, abs=1e-6)
        ref_max = float(multiclass_calibration_error(tp, ty, num_classes=3, n_bins=nb, norm="max"))
        conf, cor = top_label_confidence(p, y)
        assert maximum_calibration_error(conf, cor, nb) == pytest.approx(ref_max, abs=1e-6)
    # binary: torchmetrics bins p(y=1), i.e. our foreground flavour for class 1, not top-label
    p2, y2 = _edge_free_probs(rng, 20000, 2, sharp=0.7)
    ref_bin = float(binary_calibration_error(torch.from_numpy(p2[1].copy()), torch.from_numpy(y2), n_bins=15))
    assert foreground_ece(p2, y2)[1] == pytest.approx(ref_bin, abs=1e-6)
    assert abs(top_label_ece(p2, y2) - ref_bin) > 1e-3


def test_torchmetrics_puts_one_in_an_extra_bin():
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    conf = np.array([1.0, 0.98])
    correct = np.array([0, 1])
    # ours: both in the last bin (closed at 1.0): conf 0.99, acc 0.5
    assert expected_calibration_error(conf, correct, 15) == pytest.approx(0.49)
    # torchmetrics: 0.98 alone (gap 0.02) and 1.0 alone in bin 16 (gap 1.0)
    ref = float(binary_calibration_error(torch.tensor(conf), torch.tensor(correct), n_bins=15))
    assert ref == pytest.approx(0.51)


# --- netcal ---------------------------------------------------------------------------------------

def test_ece_against_netcal():
    from netcal.metrics import ECE

    rng = np.random.default_rng(2)
    p, y = _edge_free_probs(rng, 20000, 3)
    for nb in (10, 15):
        ref = ECE(bins=nb).measure(p.T, y)
        assert top_label_ece(p, y, n_bins=nb) == pytest.approx(ref, abs=1e-6)
    # binary input: netcal bins the positive-class probability (our foreground flavour)
    p2, y2 = _edge_free_probs(rng, 20000, 2, sharp=0.7)
    ref2 = ECE(bins=10).measure(p2[1], y2)
    assert foreground_ece(p2, y2, n_bins=10)[1] == pytest.approx(ref2, abs=1e-6)


# --- volumes, masks, errors, speed -----------------------------------------------------------------

def test_summary_on_volume_with_roi():
    rng = np.random.default_rng(4)
    p, y = _edge_free_probs(rng, 8000, 3)
    vol = p.reshape(3, 20, 20, 20).astype(np.float32)
    lab = y.reshape(20, 20, 20)
    roi = np.zeros((20, 20, 20), bool)
    roi[5:15] = True
    s = calibration_summary(vol, lab, roi)
    assert s["n_voxels"] == 4000
    assert s["ece_top"] == pytest.approx(top_label_ece(vol, lab, roi))
    assert s["ece_fg"][2] == pytest.approx(foreground_ece(vol, lab, roi)[2])
    assert s["brier_binary"] is None
    assert 0 <= s["ace_top"] <= 1 and s["mce_top"] >= s["ece_top"]
    assert s["ece_top"] != pytest.approx(top_label_ece(vol, lab))  # ROI changes the number


@pytest.mark.parametrize("probs,labels,msg", [
    (np.full((2, 4), 0.7), np.zeros(4, int), "sum to 1"),
    (np.full((2, 4), 0.5), np.array([0, 1, 2, 0]), "labels must lie"),
    (np.full((2, 4), 0.5), np.zeros(5, int), "same voxel grid"),
    (np.full((2, 4), 0.5), np.zeros(4, float), "integers"),
    (np.array([[0.5, np.nan], [0.5, 0.5]]), np.zeros(2, int), "NaN"),
])
def test_bad_inputs_raise(probs, labels, msg):
    with pytest.raises(InputError, match=msg):
        top_label_ece(probs, labels)


def test_empty_mask_and_bad_bins_raise():
    with pytest.raises(InputError, match="empty"):
        nll(np.full((2, 4), 0.5), np.zeros(4, int), np.zeros(4, bool))
    with pytest.raises(InputError, match="n_bins"):
        expected_calibration_error([0.5], [1], n_bins=0)
    with pytest.raises(InputError, match="must lie in"):
        expected_calibration_error([1.5], [1])


def test_millions_of_voxels_fast():
    import time

    rng = np.random.default_rng(5)
    n = 2_000_000
    p1 = rng.random(n).astype(np.float32)
    probs = np.stack([1 - p1, p1]).reshape(2, 125, 125, 128)
    labels = (rng.random(n) < p1).astype(np.uint8).reshape(125, 125, 128)
    t = time.perf_counter()
    e = top_label_ece(probs, labels)
    f = foreground_ece(probs, labels)[1]
    dt = time.perf_counter() - t
    assert e < 0.01 and f < 0.01  # labels drawn from p: calibrated
    assert dt < 8.0, f"ECE on 2M voxels took {dt:.1f} s"
