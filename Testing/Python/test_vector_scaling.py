"""Vector / Platt scaling (METHODS.md §2): z' = w ⊙ x + b fitted by NLL recovers known w and b.

Data: calibrated logits z (labels drawn from softmax(z)); the scaler sees x = (z − b0) / w0, so
the fit must return w = w0 and b = b0 (b only up to a constant: reported with b_0 = 0).
"""

from __future__ import annotations

import numpy as np
import pytest

from CalibUncertaintyLib.calibration import (PlattScaler, TemperatureScaler, VectorScaler, apply_vector_scaling,
                                             safe_log, softmax)
from CalibUncertaintyLib.errors import InputError


def draw(n, k, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, k))
    y = (softmax(z).cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, y


def test_recovers_per_class_scale_and_bias():
    z, y = draw(60_000, 3, seed=0)
    w0 = np.array([1.0, 2.0, 0.5])
    b0 = np.array([0.0, -1.0, 0.7])
    v = VectorScaler().fit((z - b0) / w0, y)
    assert v.converged_
    np.testing.assert_allclose(v.w_, w0, atol=0.05)
    np.testing.assert_allclose(v.b_, b0, atol=0.06)
    assert v.b_[0] == 0.0
    assert v.nll_after_ < v.nll_before_ - 0.05
    # a single temperature cannot undo class-specific scales: vector scaling fits better
    t = TemperatureScaler().fit((z - b0) / w0, y)
    assert v.nll_after_ < t.nll_after_ - 0.01


def test_transform_matches_volume_form():
    z, y = draw(5_000, 4, seed=1)
    p = softmax(z)
    v = VectorScaler().fit(safe_log(p) * 1.5, y)
    rows = v.transform(safe_log(p))
    vol = apply_vector_scaling(p.T.reshape(4, 50, 100), v.w_, v.b_, axis=0)  # (K, ...) layout
    np.testing.assert_allclose(vol.reshape(4, -1).T, rows, atol=1e-10)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)
    with pytest.raises(InputError, match="one per class"):
        apply_vector_scaling(p.T, v.w_[:3], v.b_[:3])


def test_platt_two_classes():
    z, y = draw(40_000, 2, seed=2)
    v = PlattScaler().fit(3.0 * z + np.array([0.0, 1.0]), y)
    np.testing.assert_allclose(v.w_, [1 / 3, 1 / 3], atol=0.02)
    assert v.b_[1] == pytest.approx(-1 / 3, abs=0.04)
    z3, y3 = draw(100, 3, seed=3)
    with pytest.raises(InputError, match="two classes"):
        PlattScaler().fit(z3, y3)


def test_l2_on_bias_shrinks_it():
    z, y = draw(5_000, 3, seed=4)
    x = z - np.array([0.0, 2.0, -2.0])
    free = VectorScaler().fit(x, y)
    tied = VectorScaler(l2_bias=1.0).fit(x, y)
    spread = lambda b: np.ptp(b)  # noqa: E731  (gauge-free size of the bias)
    assert spread(tied.b_) < 0.5 * spread(free.b_)
    assert tied.nll_after_ >= free.nll_after_ - 1e-9
    with pytest.raises(InputError, match="l2_bias"):
        VectorScaler(l2_bias=-1)


def test_unfitted_and_wrong_width():
    z, y = draw(200, 3, seed=5)
    with pytest.raises(InputError, match="not fitted"):
        VectorScaler().transform(z)
    v = VectorScaler().fit(z, y)
    with pytest.raises(InputError, match="fitted on 3 classes"):
        v.transform(z[:, :2])
