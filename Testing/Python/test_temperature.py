"""Temperature scaling (METHODS.md §2): recovery of a known T, NLL, argmax, bounds, ensemble modes.

Direction used throughout: draw calibrated logits z (labels sampled from softmax(z)), present
x = z / T0 to the scaler. The fitted T must undo it, x / T = z, i.e. T = 1 / T0:
T0 = 0.5 gives sharpened (over-confident) inputs and T = 2; T0 = 2 flattened ones and T = 0.5.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from CalibUncertaintyLib.calibration import (EPS, TemperatureScaler, apply_temperature, apply_temperature_logits,
                                             collect_calibration_samples, log_softmax, per_member_nll, safe_log,
                                             softmax, temperature_nll)
from CalibUncertaintyLib.errors import InputError


def calibrated_logits(n=60_000, k=4, scale=2.5, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, k))
    y = (softmax(z).cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, y


@pytest.mark.parametrize("t0", [0.5, 2.0])
def test_recovers_known_temperature(t0):
    z, y = calibrated_logits()
    s = TemperatureScaler().fit(z / t0, y)
    assert s.temperature_ == pytest.approx(1.0 / t0, rel=0.02)
    assert s.nll_after_ <= s.nll_before_
    assert s.nll_before_ - s.nll_after_ > 0.01  # the mis-scaled input really was worse
    # the fitted NLL is (almost) that of the true calibrated logits
    assert s.nll_after_ == pytest.approx(temperature_nll(z, y, 1.0), abs=2e-3)
    assert s.n_samples_ == y.size and s.at_bound_ is None


def test_fit_from_log_probs_equals_fit_from_logits():
    z, y = calibrated_logits(n=20_000, seed=1)
    x = 2.0 * z
    t_logits = TemperatureScaler().fit(x, y).temperature_
    t_logp = TemperatureScaler().fit(log_softmax(x), y).temperature_
    assert t_logp == pytest.approx(t_logits, rel=1e-6)
    # from saved float32 probabilities (nnU-Net npz), clamped logs: same up to float32 rounding
    p32 = softmax(x).astype(np.float32)
    t_probs = TemperatureScaler().fit(safe_log(p32), y).temperature_
    assert t_probs == pytest.approx(t_logits, rel=1e-3)


def test_apply_temperature_keeps_argmax_and_matches_logit_form():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, (5, 6, 7, 8)).astype(np.float32)
    p = softmax(z, axis=0)
    for t in (0.3, 1.0, 3.0):
        q = apply_temperature(p, t)
        assert q.dtype == np.float32 and q.shape == p.shape
        np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(q.argmax(axis=0), p.argmax(axis=0))
        np.testing.assert_allclose(q, apply_temperature_logits(z, t), atol=1e-5)
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-6)
    # T > 1 flattens: the max probability can only go down
    assert np.all(apply_temperature(p, 2.0).max(axis=0) <= p.max(axis=0) + 1e-6)


def test_apply_temperature_clamps_zero_probabilities():
    p = np.array([[1.0, 0.0], [0.0, 1.0]]).T  # (K=2, 2 voxels) with exact zeros
    q = apply_temperature(p, 2.0)
    assert np.all(np.isfinite(q))
    # softmax(log p / T) with log 0 clamped to log EPS: p_small = EPS^(1/T) / (1 + EPS^(1/T))
    small = EPS ** 0.5 / (1 + EPS ** 0.5)
    np.testing.assert_allclose(q.min(axis=0), small, rtol=1e-6)


def test_bound_warnings(caplog):
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, (5000, 3))
    # labels always the argmax: the model is under-confident without limit -> T at the lower bound
    with caplog.at_level(logging.WARNING, logger="CalibUncertaintyLib.calibration.temperature"):
        s = TemperatureScaler().fit(z, z.argmax(axis=1))
    assert s.at_bound_ == "lower" and s.temperature_ == pytest.approx(0.05, rel=1e-2)
    assert "lower bound" in caplog.text
    caplog.clear()
    # labels independent of very confident logits: flatten as far as allowed -> upper bound
    with caplog.at_level(logging.WARNING, logger="CalibUncertaintyLib.calibration.temperature"):
        s = TemperatureScaler().fit(50 * z, rng.integers(0, 3, 5000))
    assert s.at_bound_ == "upper" and "upper bound" in caplog.text


def test_invalid_inputs_raise_clear_errors():
    z, y = calibrated_logits(n=100)
    for bad_t in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(InputError, match="temperature"):
            apply_temperature(softmax(z, axis=1).T, bad_t)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 3\]"):
        TemperatureScaler().fit(z, y + 4)
    with pytest.raises(InputError, match="NaN"):
        TemperatureScaler().fit(np.where(z > 0, np.nan, z), y)
    with pytest.raises(InputError, match="1-D array of 100"):
        TemperatureScaler().fit(z, y[:50])
    with pytest.raises(InputError, match="not fitted"):
        TemperatureScaler().transform(z)
    with pytest.raises(InputError, match="ensemble mode"):
        TemperatureScaler(ensemble_mode="average")


def test_per_member_mode():
    z, y = calibrated_logits(n=20_000, k=3, seed=4)
    rng = np.random.default_rng(5)
    members = np.stack([log_softmax(2.0 * (z + rng.normal(0, 0.3, z.shape))) for _ in range(3)])
    s = TemperatureScaler(ensemble_mode="per_member").fit(members, y)
    assert s.n_members_ == 3 and s.nll_after_ <= s.nll_before_
    assert s.temperature_ > 1.2  # sharpened members need flattening
    # the fit is the minimum of the documented objective: pooled softmax(log p_m / T) NLL
    grid = np.exp(np.linspace(np.log(s.temperature_) - 0.05, np.log(s.temperature_) + 0.05, 11))
    assert s.nll_after_ <= min(per_member_nll(members, y, t) for t in grid) + 1e-9
    p = s.transform(members)
    assert p.shape == (20_000, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(p, np.mean(softmax(members / s.temperature_, axis=-1), axis=0))
    # with a single member the two modes are the same model
    one = TemperatureScaler(ensemble_mode="per_member").fit(members[:1], y).temperature_
    assert one == pytest.approx(TemperatureScaler().fit(members[0], y).temperature_, rel=1e-4)
    # per-member mode refuses pooled (N, K) input
    with pytest.raises(InputError, match=r"\(M, N, K\)"):
        s.fit(members[0], y)


def _case(rng, k=3, shape=(6, 10, 12)):
    z = rng.normal(0, 2, (k, *shape)).astype(np.float32)
    p = softmax(z, axis=0)
    labels = p.argmax(axis=0).astype(np.uint8)
    roi = np.zeros(shape, bool)
    roi[1:5, 2:8, 3:11] = True
    return z, p, labels, roi


def test_collect_calibration_samples():
    rng = np.random.default_rng(6)
    cases = [_case(rng) for _ in range(3)]
    x, y = collect_calibration_samples(((p, lab, roi) for _, p, lab, roi in cases), max_voxels_per_case=100)
    assert x.shape == (300, 3) and y.shape == (300,) and x.dtype == np.float32
    np.testing.assert_array_equal(x.argmax(axis=1), y)  # rows and labels stay paired
    # every row is a clamped log-probability of a voxel inside that case's ROI
    first = {tuple(np.round(r, 5)) for r in safe_log(cases[0][1]).reshape(3, -1)[:, cases[0][3].ravel()].T}
    assert all(tuple(np.round(r, 5)) in first for r in x[:100])
    # the same from logits (log-softmax) and deterministic for the seed
    xl, yl = collect_calibration_samples([(z, lab, roi) for z, _, lab, roi in cases], kind="logits",
                                         max_voxels_per_case=100)
    np.testing.assert_array_equal(yl, y)
    np.testing.assert_allclose(xl, x, atol=1e-4)
    # no ROI: every voxel when under the cap
    xa, _ = collect_calibration_samples([(cases[0][1], cases[0][2], None)])
    assert xa.shape == (6 * 10 * 12, 3)
    # per-member layout (M, K, z, y, x) -> (M, N, K)
    mem = np.stack([cases[0][1], cases[0][1]])
    xm, ym = collect_calibration_samples([(mem, cases[0][2], cases[0][3])], ensemble_mode="per_member",
                                         max_voxels_per_case=50)
    assert xm.shape == (2, 50, 3) and ym.shape == (50,)


def test_collect_calibration_samples_rejects_bad_cases():
    rng = np.random.default_rng(7)
    z, p, lab, roi = _case(rng)
    with pytest.raises(InputError, match="sum to 1"):
        collect_calibration_samples([(p * 1.1, lab, roi)])
    with pytest.raises(InputError, match="labels shape"):
        collect_calibration_samples([(p, lab[:-1], roi)])
    with pytest.raises(InputError, match="no calibration voxels"):
        collect_calibration_samples([(p, lab, np.zeros_like(roi))])
    with pytest.raises(InputError, match="classes, earlier cases had"):
        collect_calibration_samples([(p, lab, roi), (p[:2] / p[:2].sum(0), np.minimum(lab, 1), roi)])


# --- the pooled fit is a safeguarded Newton iteration on β = 1/T (calibration/temperature.py) ---

def _pooled_case(n, k, scale, seed, shift=3.0):
    from CalibUncertaintyLib.calibration.temperature import log_softmax

    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.standard_normal((n, k)) * 2.0
    z[np.arange(n), y] += shift
    return log_softmax(z * scale, axis=1).astype(np.float32), y


@pytest.mark.parametrize("scale,k,seed", [(2.0, 6, 0), (0.4, 6, 1), (1.0, 2, 2), (3.5, 14, 3), (60.0, 3, 4),
                                          (0.01, 4, 5)])
def test_newton_fit_matches_the_bounded_search(scale, k, seed):
    """Same T as the former grid + bounded search on the float64 NLL (to that search's own
    tolerance), same NLL, including optima on a bound (scale 60: T at the upper bound 20 is not
    enough; scale 0.01: the lower bound)."""
    import math

    from CalibUncertaintyLib.calibration.temperature import TemperatureScaler, _nll_pooled

    x, y = _pooled_case(20_000, k, scale, seed)
    new = TemperatureScaler().fit(x, y)
    ref = TemperatureScaler()
    s_ref, nll_ref, nll_one = ref._grid_search(lambda T: _nll_pooled(x, y, T))
    assert abs(new.log_temperature_ - s_ref) <= 2e-4, (new.temperature_, math.exp(s_ref))
    assert abs(new.nll_after_ - nll_ref) <= 1e-6 * max(1.0, abs(nll_ref))
    assert new.nll_after_ <= nll_ref + 1e-6
    assert abs(new.nll_before_ - nll_one) <= 1e-6 * max(1.0, abs(nll_one))
    assert abs(new.nll_after_ - _nll_pooled(x, y, new.temperature_)) <= 1e-6


def test_newton_fit_few_passes_and_bounds(caplog):
    """A handful of passes over the data (the former search took 22); a bound is reported."""
    from CalibUncertaintyLib.calibration import temperature as tm

    x, y = _pooled_case(50_000, 6, 2.0, 7)
    f = tm._PooledNewton(x, y)
    orig = tm._PooledNewton
    try:
        tm._PooledNewton = lambda *a: f
        s = tm.TemperatureScaler().fit(x, y)
    finally:
        tm._PooledNewton = orig
    assert 1.5 < s.temperature_ < 4 and s.at_bound_ is None
    assert f.n_evals <= 10, f.n_evals
    hi = tm.TemperatureScaler(log_t_bounds=(np.log(0.5), np.log(1.2))).fit(x, y)
    assert hi.at_bound_ == "upper" and abs(hi.temperature_ - 1.2) < 1e-5


@pytest.mark.parametrize("mode", ["pool_then_calibrate", "per_member"])
def test_reported_nlls_are_the_nll_at_the_fitted_temperature(mode):
    """``nll_after_`` / ``nll_before_`` are exactly temperature_nll (per_member_nll) at the fitted T
    and at T = 1 (issue 19: the pooled fit reported its float32 Newton pass's value, 2e-6 low)."""
    z, y = calibrated_logits(n=30_000, k=5, seed=9)
    x = (z / 0.6).astype(np.float32)
    if mode == "per_member":
        rng = np.random.default_rng(2)
        x = np.stack([log_softmax(x + rng.normal(0, 0.2, x.shape)).astype(np.float32) for _ in range(2)])
    s = TemperatureScaler(ensemble_mode=mode).fit(x, y)
    nll = per_member_nll if mode == "per_member" else temperature_nll
    assert s.nll_after_ == nll(x, y, s.temperature_)
    assert s.nll_before_ == nll(x, y, 1.0)
    assert s.nll_after_ < s.nll_before_
