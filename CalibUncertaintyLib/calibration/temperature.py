"""Temperature scaling of segmentation probabilities (METHODS.md §2 "Temperature scaling").

Definition: the calibrated probability is p_T = softmax(z / T) with one T > 0 per model. Since
softmax is unchanged by adding a constant to every class, softmax(log p / T) = softmax(z / T)
for p = softmax(z): T is fitted and applied equally from logits or from saved probabilities
(nnU-Net ``--save_probabilities``), except where p underflowed. Logs are natural and clamped,
log max(p, EPS) with EPS = 1e-12 (the project's constant; defined here too to avoid an import
cycle with ``uncertainty.streaming``).

Fitting minimises the mean negative log-likelihood NLL(T) = mean_i [logsumexp(x_i / T) − x_i,y_i / T]
over ROI voxels of held-out calibration cases, within bounds on T (default [0.05, 20]). Never an
unconstrained LBFGS on T. If the optimum sits on a bound a warning is logged (``at_bound_`` says
which bound).

- Pool then calibrate: NLL is convex in β = 1/T. With d_i = x_i − max_c x_i,c (≤ 0, computed
  once) and g_i = max_c x_i,c − x_i,y_i, NLL(β) = mean_i [β g_i + log Σ_c exp(β d_i,c)], whose
  first and second derivatives are mean_i [g_i + E_β d_i] and mean_i Var_β d_i (mean and
  variance of d_i under softmax(β x_i)). The fit is a safeguarded Newton iteration on β inside
  the bounds (bisection whenever a step leaves the bracket of the sign change of the
  derivative), about 5 passes over the data in float32 with float64 means (``_PooledNewton``),
  to |Δβ| ≤ 1e-6 β. Before, the fit was the grid + bounded search below on this NLL in float64
  (22 passes; 13.7 s for 5 million voxels with K = 6 on one core): both give the same T to
  within that search's own tolerance (|Δ log T| ≤ 2e-4, Testing/Python/test_temperature.py), and
  NLL(T) agrees to 1e-6.
- Per member: the NLL of the pooled scaled members need not be convex in β; the fit is a bounded
  1-D search on log T: a coarse grid over the bounds and then
  ``scipy.optimize.minimize_scalar(method="bounded")`` between the grid neighbours of the best
  grid point.

T > 1 flattens (fixes an over-confident model), T < 1 sharpens (fixes an under-confident one).

Ensembles (METHODS.md §2 "Ensemble"):

- ``"pool_then_calibrate"`` (default): members are averaged first, p̄ = (1/M) Σ_m p_m, and the
  calibrated ensemble is softmax(log p̄ / T). Inputs are (N, K) rows of log p̄ (or logits).
- ``"per_member"``: one T shared by all members, applied to each member before pooling:
  p_T = (1/M) Σ_m softmax(log p_m / T). T minimises the NLL of that pooled average,
  −mean_i log p_T(y_i); inputs are (M, N, K) member log-probabilities. This NLL need not be
  convex in β, which is why the fit starts from a grid over the whole bounded range before the
  bounded refinement.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from ..errors import InputError
from .sampling import DEFAULT_MIN_PER_CLASS, stratified_sample_indices

log = logging.getLogger(__name__)

EPS = 1e-12  # same value as uncertainty.streaming.EPS (METHODS.md notation)
ENSEMBLE_MODES = ("pool_then_calibrate", "per_member")
DEFAULT_T_BOUNDS = (0.05, 20.0)
DEFAULT_LOG_T_BOUNDS = (math.log(DEFAULT_T_BOUNDS[0]), math.log(DEFAULT_T_BOUNDS[1]))
_CHUNK_ROWS = 1 << 18


# --- elementwise helpers ---------------------------------------------------------------------

def safe_log(probs) -> np.ndarray:
    """log max(p, EPS) (natural log), keeping a floating input's dtype."""
    p = np.asarray(probs)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    return np.log(np.maximum(p, p.dtype.type(EPS)))


def softmax(z, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (max subtracted before exp)."""
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    e = np.exp(z - np.max(z, axis=axis, keepdims=True))
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def log_softmax(z, axis: int = -1) -> np.ndarray:
    """z − logsumexp(z) along ``axis``: log-probabilities from logits."""
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    return z - logsumexp(z, axis=axis, keepdims=True).astype(z.dtype, copy=False)


def apply_temperature(probs, T: float, axis: int = 0) -> np.ndarray:
    """Calibrated probabilities softmax(log p / T) along the class ``axis`` (default 0: (K, ...)).

    Logs are clamped (log max(p, 1e-12)). float32 input stays float32. The argmax is unchanged
    for any T > 0.
    """
    T = check_temperature(T)
    lp = safe_log(probs)
    return softmax(lp / lp.dtype.type(T), axis=axis)


def apply_temperature_logits(logits, T: float, axis: int = 0) -> np.ndarray:
    """softmax(z / T) along the class ``axis`` (default 0: (K, ...))."""
    T = check_temperature(T)
    z = np.asarray(logits)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    return softmax(z / z.dtype.type(T), axis=axis)


def check_temperature(T) -> float:
    """Return T as float or raise InputError when it is not a positive finite number."""
    try:
        T = float(T)
    except (TypeError, ValueError) as exc:
        raise InputError(f"temperature must be a positive number, got {T!r}") from exc
    if not math.isfinite(T) or T <= 0:
        raise InputError(f"temperature must be a positive finite number, got {T}")
    return T


# --- NLL -------------------------------------------------------------------------------------

def temperature_nll(x, labels, T: float = 1.0) -> float:
    """Mean NLL of softmax(x / T) for rows x (N, K) of logits or log-probabilities."""
    x, y = _check_pooled(x, labels)
    return _nll_pooled(x, y, check_temperature(T))


def per_member_nll(member_x, labels, T: float = 1.0) -> float:
    """Mean NLL of (1/M) Σ_m softmax(x_m / T) for member rows (M, N, K)."""
    xm, y = _check_members(member_x, labels)
    return _nll_members(xm, y, check_temperature(T))


def _row_logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """logsumexp along ``axis`` for finite input (max-shifted; faster than scipy's general one)."""
    m = np.max(z, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(z - m), axis=axis))


def _nll_pooled(x: np.ndarray, y: np.ndarray, T: float) -> float:
    total = 0.0
    inv_t = 1.0 / T
    for a in range(0, x.shape[0], _CHUNK_ROWS):
        xs = x[a:a + _CHUNK_ROWS].astype(np.float64) * inv_t
        ys = y[a:a + _CHUNK_ROWS]
        total += float(np.sum(_row_logsumexp(xs, axis=1)) - np.sum(xs[np.arange(ys.size), ys]))
    return total / x.shape[0]


def _nll_members(xm: np.ndarray, y: np.ndarray, T: float) -> float:
    m, n, _ = xm.shape
    total = 0.0
    inv_t = 1.0 / T
    log_m = math.log(m)
    for a in range(0, n, _CHUNK_ROWS):
        xs = xm[:, a:a + _CHUNK_ROWS].astype(np.float64) * inv_t
        ys = y[a:a + _CHUNK_ROWS]
        lp_y = xs[:, np.arange(ys.size), ys] - _row_logsumexp(xs, axis=2)  # (M, n) log p_m,T(y)
        total -= float(np.sum(_row_logsumexp(lp_y, axis=0) - log_m))
    return total / n


class _PooledNewton:
    """NLL(β) of pool-then-calibrate and its first two derivatives in β = 1/T (module doc).

    Holds d = x − rowmax as float32 (N, K) and mean_i g_i; each ``eval(beta)`` is one pass over d
    in row chunks (cache-sized temporaries), float32 arithmetic with float64 sums."""

    CHUNK = 1 << 14

    def __init__(self, x: np.ndarray, y: np.ndarray):
        n, k = x.shape
        self.n = n
        self.chunks = []  # d transposed per row chunk: (K, rows) float32, sums over K run elementwise
        g_sum = 0.0
        for a in range(0, n, self.CHUNK):
            xs = np.asarray(x[a:a + self.CHUNK], dtype=np.float32).T
            d = xs - xs.max(axis=0)
            g_sum -= float(d[y[a:a + self.CHUNK], np.arange(d.shape[1])].sum(dtype=np.float64))
            self.chunks.append(np.ascontiguousarray(d))
        self.g_mean = g_sum / n
        self.n_evals = 0

    def eval(self, beta: float):
        """(NLL, dNLL/dβ, d²NLL/dβ²) at β."""
        b = np.float32(beta)
        log_s = mu = var = 0.0
        self.n_evals += 1
        for d in self.chunks:
            e = d * b
            np.exp(e, out=e)
            s = e.sum(axis=0)
            e *= d
            m1 = e.sum(axis=0)
            e *= d
            m2 = e.sum(axis=0)
            m1 /= s
            m2 /= s
            log_s += float(np.log(s).sum(dtype=np.float64))
            mu += float(m1.sum(dtype=np.float64))
            m1 *= m1
            m2 -= m1
            var += float(m2.sum(dtype=np.float64))
        n = self.n
        return beta * self.g_mean + log_s / n, self.g_mean + mu / n, max(var / n, 0.0)


def _fit_pooled_newton(x: np.ndarray, y: np.ndarray, log_t_bounds, rtol: float = 1e-6, max_iter: int = 60):
    """Minimise the pooled NLL over T in exp(log_t_bounds): (log T, NLL(T), NLL(1)).

    Safeguarded Newton on β (module doc): the bracket [a, b] of β always holds the minimiser; a
    Newton step that leaves it, or does not shrink it fast enough, is replaced by its geometric
    midpoint. Stops when the step is below ``rtol`` β, or at a bound whose derivative points out."""
    f = _PooledNewton(x, y)
    lo_t, hi_t = (math.exp(v) for v in log_t_bounds)
    beta_min, beta_max = 1.0 / hi_t, 1.0 / lo_t
    a, b = beta_min, beta_max  # the minimiser lies in [a, b]
    beta = min(max(1.0, a), b)
    nll_one, best, tried = None, None, set()
    for _ in range(max_iter):
        val, g, h = f.eval(beta)
        if beta == 1.0:
            nll_one = val
        if best is None or val < best[1]:
            best = (beta, val)
        if g > 0:
            b = beta
        else:
            a = beta
        if g == 0 or b - a <= rtol * beta:
            break  # converged, or at a bound whose derivative points out of the range
        step = beta - g / h if h > 0 else math.nan
        if not (a < step < b):
            bound = beta_max if not step < b else beta_min if not step > a else None
            if bound is not None and bound in (a, b) and bound not in tried:
                step = bound  # try the bound itself once (optimum at or beyond it)
                tried.add(bound)
            else:
                step = math.sqrt(a * b)
        if abs(step - beta) <= rtol * beta:
            val2 = f.eval(step)[0]
            if val2 < best[1]:
                best = (step, val2)
            break
        beta = step
    if nll_one is None:
        nll_one = f.eval(1.0)[0]
    log.debug("pooled temperature fit: %d passes over the data", f.n_evals)
    return -math.log(best[0]), best[1], nll_one


# --- the scaler ------------------------------------------------------------------------------

class TemperatureScaler:
    """Fit one temperature T on calibration voxels by a bounded 1-D search on log T.

    ``fit(x, labels)``: ``x`` (N, K) logits or log-probabilities (use ``safe_log`` on
    probabilities) in ``"pool_then_calibrate"`` mode, or (M, N, K) member log-probabilities in
    ``"per_member"`` mode; ``labels`` (N,) integer classes in [0, K).
    After fitting: ``temperature_``, ``log_temperature_``, ``nll_before_`` (T = 1),
    ``nll_after_`` (both exactly ``temperature_nll`` / ``per_member_nll`` at that T), ``n_samples_``, ``n_members_`` and ``at_bound_`` (None, "lower" or "upper").
    ``transform(x)`` returns calibrated probabilities (N, K) (members pooled after scaling in
    per-member mode). See the module docstring for the definitions.
    """

    def __init__(self, log_t_bounds=DEFAULT_LOG_T_BOUNDS, ensemble_mode: str = "pool_then_calibrate",
                 n_grid: int = 13, xatol: float = 1e-4):
        lo, hi = (float(b) for b in log_t_bounds)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"log_t_bounds must be two finite numbers lo < hi, got {log_t_bounds!r}")
        if ensemble_mode not in ENSEMBLE_MODES:
            raise InputError(f"unknown ensemble mode {ensemble_mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}")
        if n_grid < 3:
            raise InputError("n_grid must be at least 3")
        self.log_t_bounds = (lo, hi)
        self.ensemble_mode = ensemble_mode
        self.n_grid = int(n_grid)
        self.xatol = float(xatol)

    # sklearn-like API
    def fit(self, x, labels) -> "TemperatureScaler":
        lo, hi = self.log_t_bounds
        if self.ensemble_mode == "per_member":
            data, y = _check_members(x, labels)
            self.n_members_ = data.shape[0]
            s, best, nll_one = self._grid_search(lambda T: _nll_members(data, y, T))
        else:
            data, y = _check_pooled(x, labels)
            self.n_members_ = None
            s = min(max(_fit_pooled_newton(data, y, self.log_t_bounds)[0], lo), hi)
            # the NLLs reported are temperature_nll's own (float64) at the fitted T and at T = 1,
            # not the float32 Newton passes' values (which differ in the 6th digit)
            best, nll_one = _nll_pooled(data, y, math.exp(s)), _nll_pooled(data, y, 1.0)

        self.log_temperature_ = s
        self.temperature_ = math.exp(s)
        self.nll_before_ = nll_one
        self.nll_after_ = best
        self.n_samples_ = int(y.size)
        self.n_classes_ = int(data.shape[-1])
        tol = max(100 * self.xatol, 1e-3)
        self.at_bound_ = "lower" if s - lo < tol else "upper" if hi - s < tol else None
        if self.at_bound_:
            log.warning("temperature fit stopped at the %s bound T = %.4g (bounds %.4g..%.4g): the "
                        "model may be badly mis-calibrated or the calibration voxels unrepresentative; "
                        "widen log_t_bounds or check the inputs", self.at_bound_, self.temperature_,
                        math.exp(lo), math.exp(hi))
        log.info("temperature scaling (%s): T = %.4f, NLL %.5f -> %.5f on %d voxels",
                 self.ensemble_mode, self.temperature_, self.nll_before_, self.nll_after_, self.n_samples_)
        return self

    def _grid_search(self, nll):
        """Bounded search on log T (module doc): (log T, NLL(T), NLL(1))."""
        lo, hi = self.log_t_bounds
        f = lambda s: nll(math.exp(s))  # noqa: E731
        grid = np.linspace(lo, hi, self.n_grid)
        values = np.array([f(s) for s in grid])
        i = int(np.argmin(values))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, self.n_grid - 1)]
        res = minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": self.xatol})
        s, best = (float(res.x), float(res.fun)) if res.fun <= values[i] else (float(grid[i]), float(values[i]))
        return s, best, nll(1.0)

    def transform(self, x) -> np.ndarray:
        T = self._fitted_t()
        if self.ensemble_mode == "per_member":
            xm = _as_float(x, "member log-probabilities", ndim=3)
            return np.mean(softmax(xm / T, axis=-1), axis=0)
        return softmax(_as_float(x, "log-probabilities", ndim=2) / T, axis=-1)

    def fit_transform(self, x, labels) -> np.ndarray:
        return self.fit(x, labels).transform(x)

    def _fitted_t(self) -> float:
        if not hasattr(self, "temperature_"):
            raise InputError("TemperatureScaler is not fitted yet: call fit(log_probs, labels) first")
        return self.temperature_


# --- input checks ----------------------------------------------------------------------------

def _as_float(x, what: str, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim:
        raise InputError(f"{what} must have {ndim} dimensions, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return x


def _check_labels(labels, n: int, k: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size != n:
        raise InputError(f"labels must be a 1-D array of {n} class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise InputError("labels must be integer class indices")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= k):
        raise InputError(f"labels must lie in [0, {k - 1}] for {k} classes, got {y.min()}..{y.max()}")
    return y


def _check_pooled(x, labels):
    x = _as_float(x, "log-probabilities/logits (N, K)", ndim=2)
    if x.shape[0] == 0 or x.shape[1] < 2:
        raise InputError(f"need at least one voxel and two classes, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError("log-probabilities/logits contain NaN or inf; clamp probabilities with safe_log()")
    return x, _check_labels(labels, x.shape[0], x.shape[1])


def _check_members(x, labels):
    x = _as_float(x, "member log-probabilities (M, N, K)", ndim=3)
    if x.shape[0] < 1 or x.shape[1] == 0 or x.shape[2] < 2:
        raise InputError(f"need at least one member, one voxel and two classes, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError("member log-probabilities contain NaN or inf; clamp probabilities with safe_log()")
    return x, _check_labels(labels, x.shape[1], x.shape[2])


# --- collecting calibration voxels -----------------------------------------------------------

def collect_calibration_samples(cases, kind: str = "probs", ensemble_mode: str = "pool_then_calibrate",
                                max_voxels_per_case: int = 200_000, seed: int = 0,
                                min_per_class: int = DEFAULT_MIN_PER_CLASS, sum_tol: float = 1e-3):
    """Stack a class-stratified subsample of ROI voxels from each case, ready for ``fit``.

    ``cases``: an iterable (a generator is fine: one case is held at a time) of
    ``(x, labels, roi)`` where ``x`` is (K, z, y, x) pooled probabilities (``kind="probs"``) or
    logits (``kind="logits"``), or (M, K, z, y, x) member outputs in ``"per_member"`` mode;
    ``labels`` (z, y, x) reference classes; ``roi`` (z, y, x) bool or None (whole image).
    At most ``max_voxels_per_case`` ROI voxels are kept per case (``stratified_sample_indices``
    with seed ``seed + case_index``), so memory is bounded by cases × that number.

    Returns ``(log_probs, labels)``: float32 (N, K) (or (M, N, K)) log-probabilities — clamped
    logs of probabilities, or log-softmax of logits — and int64 (N,) labels.
    """
    if kind not in ("probs", "logits"):
        raise InputError(f"kind must be 'probs' or 'logits', got {kind!r}")
    if ensemble_mode not in ENSEMBLE_MODES:
        raise InputError(f"unknown ensemble mode {ensemble_mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}")
    per_member = ensemble_mode == "per_member"
    xs, ys = [], []
    n_classes = None
    for ci, case in enumerate(cases):
        try:
            x, labels, roi = case
        except (TypeError, ValueError) as exc:
            raise InputError(f"case {ci}: expected a (x, labels, roi) tuple") from exc
        x = np.asarray(x)
        want = 5 if per_member else 4
        if x.ndim != want:
            layout = "(M, K, z, y, x)" if per_member else "(K, z, y, x)"
            raise InputError(f"case {ci}: {kind} must be {layout} in {ensemble_mode} mode, got shape {x.shape}")
        k = x.shape[-4]
        if n_classes is None:
            n_classes = k
        elif k != n_classes:
            raise InputError(f"case {ci}: {k} classes, earlier cases had {n_classes}")
        spatial = x.shape[-3:]
        labels = np.asarray(labels)
        if labels.shape != spatial:
            raise InputError(f"case {ci}: labels shape {labels.shape} differs from the {kind} grid {spatial}")
        if roi is None:
            vox = np.arange(int(np.prod(spatial)), dtype=np.int64)
        else:
            roi = np.asarray(roi)
            if roi.shape != spatial:
                raise InputError(f"case {ci}: ROI shape {roi.shape} differs from the {kind} grid {spatial}")
            vox = np.flatnonzero(roi.astype(bool, copy=False).ravel())
        if vox.size == 0:
            log.warning("case %d: empty ROI, no calibration voxels taken", ci)
            continue
        y = labels.reshape(-1)[vox].astype(np.int64)
        if y.min() < 0 or y.max() >= k:
            raise InputError(f"case {ci}: labels {y.min()}..{y.max()} outside [0, {k - 1}]")
        keep = stratified_sample_indices(y, max_voxels_per_case, seed=seed + ci, min_per_class=min_per_class)
        vox, y = vox[keep], y[keep]
        if per_member:
            vals = x.reshape(x.shape[0], k, -1)[:, :, vox].transpose(0, 2, 1)  # (M, n, K)
        else:
            vals = x.reshape(k, -1)[:, vox].T  # (n, K)
        vals = vals.astype(np.float64)
        if not np.all(np.isfinite(vals)):
            raise InputError(f"case {ci}: {kind} contain NaN or inf inside the ROI")
        if kind == "probs":
            sums = vals.sum(axis=-1)
            if np.any(np.abs(sums - 1.0) > sum_tol) or vals.min() < 0:
                raise InputError(f"case {ci}: probabilities must be >= 0 and sum to 1 over classes "
                                 f"(tol {sum_tol}); got sums {sums.min():.4f}..{sums.max():.4f}. "
                                 "Pass kind='logits' for raw network outputs")
            vals = safe_log(vals)
        else:
            vals = log_softmax(vals, axis=-1)
        xs.append(vals.astype(np.float32))
        ys.append(y)
    if not xs:
        raise InputError("no calibration voxels: every case was empty or had an empty ROI")
    axis = 1 if per_member else 0
    return np.concatenate(xs, axis=axis), np.concatenate(ys)
