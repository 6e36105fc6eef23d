"""Vector scaling and Platt scaling (METHODS.md §2: "Platt / vector scaling (per-class scale and
bias on logits)"; temperature scaling stays the default).

Definition: z'_c = w_c · x_c + b_c, p = softmax(z'), with x the logits or the clamped
log-probabilities log max(p, 1e-12). Unlike temperature scaling, this is *not* the same from
logits and from log-probabilities (a per-voxel constant added to x is multiplied by w_c, which
differs per class), and it can change the argmax. The calibration file fits and applies it on
log-probabilities of the pooled ensemble.

Fit: minimise the mean NLL −mean_i log softmax(z'_i)_{y_i} + λ‖b‖² (λ = ``l2_bias``, default 0)
over (w, b) with SciPy L-BFGS-B and the analytic gradient
∂/∂w_c = mean_i (p_ic − [y_i = c]) x_ic, ∂/∂b_c = mean_i (p_ic − [y_i = c]) (+ 2λ b_c).
The NLL is convex in (w, b) (an affine map into the log-softmax loss). w is kept in
``w_bounds`` (positive by default) and b in ``b_bounds``. With λ = 0 only differences of b are
identifiable; the reported b is shifted so that b_0 = 0 (background as reference), which
changes no probability.

``PlattScaler`` is the same model for K = 2 (the name used for binary problems).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize

from ..errors import InputError
from .temperature import _as_float, _check_pooled, _row_logsumexp, safe_log, softmax

log = logging.getLogger(__name__)

_CHUNK_ROWS = 1 << 18


def apply_vector_scaling(probs, w, b, axis: int = 0) -> np.ndarray:
    """softmax(w ⊙ log p + b) along the class ``axis`` (default 0: (K, ...)), clamped logs."""
    lp = safe_log(probs)
    w = np.asarray(w, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    k = lp.shape[axis]
    if w.shape != (k,) or b.shape != (k,):
        raise InputError(f"vector scaling parameters must have {k} entries (one per class), "
                         f"got w {w.shape}, b {b.shape}")
    shape = [1] * lp.ndim
    shape[axis] = k
    z = lp * w.reshape(shape).astype(lp.dtype) + b.reshape(shape).astype(lp.dtype)
    return softmax(z, axis=axis)


class VectorScaler:
    """Per-class scale and bias on logits / log-probabilities, fitted by NLL (see module doc).

    ``fit(x (N, K), labels (N,)) -> self``; then ``w_``, ``b_`` (b_0 = 0 when ``l2_bias`` is 0),
    ``nll_before_`` (w = 1, b = 0), ``nll_after_`` (NLL without the penalty), ``n_samples_``,
    ``n_classes_``, ``converged_``. ``transform(x) -> probs (N, K)``.
    """

    def __init__(self, l2_bias: float = 0.0, w_bounds=(1e-3, 100.0), b_bounds=(-100.0, 100.0),
                 maxiter: int = 500):
        if l2_bias < 0:
            raise InputError(f"l2_bias must be >= 0, got {l2_bias}")
        self.l2_bias = float(l2_bias)
        self.w_bounds = tuple(w_bounds)
        self.b_bounds = tuple(b_bounds)
        self.maxiter = int(maxiter)

    def _check_k(self, k: int) -> None:
        """Hook for subclasses that only accept some class counts."""

    def fit(self, x, labels) -> "VectorScaler":
        x, y = _check_pooled(x, labels)
        n, k = x.shape
        self._check_k(k)
        missing = np.setdiff1d(np.arange(k), np.unique(y))
        if missing.size:
            log.warning("vector scaling: classes %s absent from the calibration labels; their bias "
                        "is not identifiable and will sit near its bound", missing.tolist())

        def objective(theta):
            w, b = theta[:k], theta[k:]
            loss = 0.0
            gw = np.zeros(k)
            gb = np.zeros(k)
            for a in range(0, n, _CHUNK_ROWS):
                xs = x[a:a + _CHUNK_ROWS].astype(np.float64)
                ys = y[a:a + _CHUNK_ROWS]
                rows = np.arange(ys.size)
                z = xs * w + b
                lse = _row_logsumexp(z, axis=1)
                loss += float(np.sum(lse) - np.sum(z[rows, ys]))
                g = np.exp(z - lse[:, None])
                g[rows, ys] -= 1.0
                gw += np.sum(g * xs, axis=0)
                gb += np.sum(g, axis=0)
            loss /= n
            gw /= n
            gb /= n
            if self.l2_bias:
                loss += self.l2_bias * float(b @ b)
                gb = gb + 2 * self.l2_bias * b
            return loss, np.concatenate([gw, gb])

        theta0 = np.concatenate([np.ones(k), np.zeros(k)])
        bounds = [self.w_bounds] * k + [self.b_bounds] * k
        res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": self.maxiter})
        w, b = res.x[:k].copy(), res.x[k:].copy()
        if not self.l2_bias:
            b -= b[0]
        self.w_ = w
        self.b_ = b
        self.converged_ = bool(res.success)
        if not res.success:
            log.warning("vector scaling did not converge: %s", res.message)
        self.n_samples_ = int(n)
        self.n_classes_ = int(k)
        self.nll_before_ = _nll(x, y, np.ones(k), np.zeros(k))
        self.nll_after_ = _nll(x, y, w, b)
        log.info("vector scaling: NLL %.5f -> %.5f on %d voxels", self.nll_before_, self.nll_after_, n)
        return self

    def transform(self, x) -> np.ndarray:
        if not hasattr(self, "w_"):
            raise InputError(f"{type(self).__name__} is not fitted yet: call fit(log_probs, labels) first")
        x = _as_float(x, "log-probabilities/logits (N, K)", ndim=2)
        if x.shape[1] != self.n_classes_:
            raise InputError(f"fitted on {self.n_classes_} classes, got {x.shape[1]}")
        return softmax(x * self.w_ + self.b_, axis=-1)

    def fit_transform(self, x, labels) -> np.ndarray:
        return self.fit(x, labels).transform(x)


class PlattScaler(VectorScaler):
    """Vector scaling for two classes (background / foreground): Platt scaling on the logits."""

    def _check_k(self, k: int) -> None:
        if k != 2:
            raise InputError(f"PlattScaler is for two classes, got {k}; use VectorScaler")


def _nll(x, y, w, b) -> float:
    total = 0.0
    for a in range(0, x.shape[0], _CHUNK_ROWS):
        z = x[a:a + _CHUNK_ROWS].astype(np.float64) * w + b
        ys = y[a:a + _CHUNK_ROWS]
        total += float(np.sum(_row_logsumexp(z, axis=1)) - np.sum(z[np.arange(ys.size), ys]))
    return total / x.shape[0]
