"""Per-class and local (per-voxel) temperature scaling that never changes the segmentation
(METHODS.md §8 "Local temperature"; docs/METHODS.md of this repository gives the full definition).

Definition. The calibrated probability of voxel x is p(x) = softmax(log p̄(x) / T(x)) with one
temperature T(x) > 0 per voxel. Dividing every class's log-probability of a voxel by the same
positive number keeps their order, so argmax p(x) = argmax p̄(x) for every voxel, bit for bit
(the segmentation is computed from p̄ or from p(x) alike; ``apply_temperature_map`` is tested for it).

T(x) is a step function of what is known at deployment, all derived from the *predicted*
segmentation s = argmax p̄ and the image spacing:

- c(x) = s(x), the predicted class (background = outside every organ, c > 0 inside organ c);
- d(x) = distance in mm from the centre of x to the centre of the nearest *contour voxel*
  (a voxel with a face neighbour of another predicted label; contour voxels have d = 0), computed
  with ``scipy.ndimage.distance_transform_edt`` and the spacing; d = +inf when the prediction has
  no contour (a single label everywhere);
- b(x) = the distance bin: bin j holds edges[j] <= d < edges[j + 1], the last bin is open
  (d >= edges[-1], also the far background outside the fitting ROI).

Two calibrators, each a table of temperatures:

- ``ClassTemperatureScaler``: T(x) = T_c(x), one temperature per predicted class (K values).
- ``LocalTemperatureScaler``: T(x) = T_{c(x), b(x)}, one per (predicted class, distance bin)
  (K x B values; default edges 0, 2, 4, 6, 9, 12, 15 mm: B = 7).

Fit (pooling so that sparsely populated cells cannot overfit). Every table entry is fitted
on its own by a bounded 1-D search, in β = 1/T, of the convex objective

    F_cell(β) = Σ_{i in cell} nll_i(β) + m · NLL_parent(β),

nll_i(β) = logsumexp(β x_i) − β x_{i,y_i} (x = log p̄, clamped), m = ``pool_voxels`` pseudo-voxels
and NLL_parent the parent's own (pooled) objective as a mean per voxel: for a class,
NLL_parent = mean nll over all voxels; for a (class, bin) cell, NLL_parent =
(Σ_{i in class} nll_i + m · NLL_all) / (n_class + m). Each term is convex in β, so
F_cell is convex: its derivative in β is non-decreasing, and a safeguarded Newton iteration
(analytic first and second derivatives; bisection whenever a Newton step would leave the current
bracket) inside the bounds β in [1/20, 1/0.05] (T in [0.05, 20], as the global fit) finds the
minimiser, or the bound when the optimum lies beyond it. A cell
with n voxels is pulled towards its parent's temperature with weight m / (n + m): an empty cell
with n >> m gets its own; m -> inf gives the global T everywhere. A cell without any voxel takes
the T of the nearest distance bin of the same class that has voxels, and the class's T when the
class has no voxel at all, except the open last bin (d >= edges[-1]).

The open last bin. With the default edges its lower edge (15 mm) is the radius of the fitting ROI,
so it holds the voxels *beyond* the region the calibration voxels come from: the far background
and the deep inside of large organs. Calibration voxels sampled from the ROI almost never fall in
it. ``open_bin`` says what it gets then:

- ``"identity"`` (default): T = 1, the model's own probabilities. No calibration evidence there,
  so no change; in particular the confident far background is not flattened (or sharpened) by a
  temperature fitted near the organs, the known weakness of one global temperature fitted on the
  ROI, whose whole-image ECE gets worse than the uncalibrated model's;
- ``"nearest"``: the T of the nearest populated bin (the ROI's outer edge), an extrapolation.

When the caller passes calibration voxels from beyond the ROI too (rows with d >= edges[-1],
e.g. a uniform sample of the image outside the ROI), the open bin is fitted on them like any
other cell and ``open_bin`` does not matter. ``bench/openkbp_local.py`` compares the three by
leave-one-case-out NLL and ECE over whole calibration images. Parents: local cell -> its predicted class ->
the global temperature (the pool of all voxels, i.e. ordinary temperature scaling). The parent
term is evaluated on at most ``parent_rows`` voxels of the parent pool (a fixed-seed subsample).

``cross_validated_nll`` reports the leave-one-case-out NLL of a calibrator on the calibration
cases (fit on all other cases, NLL on the left-out case, mean over voxels of all cases).

scikit-learn-like shape: ``fit(x, labels, pred, dist_mm) -> self``, ``transform(x, pred, dist_mm)
-> probs``, ``temperatures(pred, dist_mm) -> T per row``; ``to_record()`` / ``from_record()`` give
the self-contained JSON record stored in the calibration file (``calibration_file.local``).
``volume_temperature(seg, spacing_zyx)`` gives T(x) on a whole volume.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import InputError
from .temperature import DEFAULT_T_BOUNDS, _row_logsumexp, safe_log, softmax

log = logging.getLogger(__name__)

DEFAULT_EDGES_MM = (0.0, 2.0, 4.0, 6.0, 9.0, 12.0, 15.0)
DEFAULT_POOL_VOXELS = 2000.0
OPEN_BIN_RULES = ("identity", "nearest")
DEFAULT_OPEN_BIN = "identity"
KINDS = ("class_temperature", "local_temperature")
_CHUNK = 1 << 17


# --- deployment-time features ------------------------------------------------------------------

def contour_mask(seg) -> np.ndarray:
    """Voxels of ``seg`` (z, y, x) with at least one face neighbour (6-connectivity) of another label."""
    s = np.asarray(seg)
    out = np.zeros(s.shape, bool)
    for ax in range(s.ndim):
        if s.shape[ax] < 2:
            continue
        a = [slice(None)] * s.ndim
        b = [slice(None)] * s.ndim
        a[ax], b[ax] = slice(1, None), slice(None, -1)
        diff = s[tuple(a)] != s[tuple(b)]
        out[tuple(a)] |= diff
        out[tuple(b)] |= diff
    return out


def contour_distance_mm(seg, spacing_zyx) -> np.ndarray:
    """d(x): distance in mm from each voxel centre to the nearest contour-voxel centre (0 on the
    contour), float32 (z, y, x); +inf everywhere when ``seg`` holds a single label."""
    from scipy.ndimage import distance_transform_edt

    c = contour_mask(seg)
    if not c.any():
        return np.full(c.shape, np.inf, np.float32)
    spacing = tuple(float(h) for h in spacing_zyx)
    if len(spacing) != c.ndim or not all(h > 0 and math.isfinite(h) for h in spacing):
        raise InputError(f"spacing must be {c.ndim} positive numbers (z, y, x) in mm, got {spacing_zyx}")
    return distance_transform_edt(~c, sampling=spacing).astype(np.float32)


def distance_bins(dist_mm, edges) -> np.ndarray:
    """Bin index of each distance: bin j holds edges[j] <= d < edges[j+1]; the last bin is open."""
    e = np.asarray(edges, dtype=np.float64)
    return np.clip(np.searchsorted(e, np.asarray(dist_mm, dtype=np.float64), side="right") - 1, 0, e.size - 1)


# --- NLL in β on rows ------------------------------------------------------------------------

def _nll_sum(x: np.ndarray, y: np.ndarray, beta: float) -> float:
    total = 0.0
    for a in range(0, x.shape[0], _CHUNK):
        z = x[a:a + _CHUNK] * beta
        ys = y[a:a + _CHUNK]
        total += float(np.sum(_row_logsumexp(z, axis=1)) - np.sum(z[np.arange(ys.size), ys]))
    return total


def _grad_hess(x: np.ndarray, y: np.ndarray, beta: float) -> tuple[float, float]:
    """d/dβ and d²/dβ² of Σ_i nll_i(β): Σ (E_p[x_i] − x_{i,y_i}) and Σ Var_p[x_i] (p = softmax(β x_i))."""
    g = h = 0.0
    for a in range(0, x.shape[0], _CHUNK):
        xs = x[a:a + _CHUNK]
        ys = y[a:a + _CHUNK]
        z = xs * beta
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        m1 = np.einsum("ij,ij->i", p, xs)
        m2 = np.einsum("ij,ij->i", p, xs * xs)
        g += float(np.sum(m1) - np.sum(xs[np.arange(ys.size), ys]))
        h += float(np.sum(m2 - m1 * m1))
    return g, h


def _fit_beta(terms, bounds) -> float:
    """argmin over β in ``bounds`` of Σ_terms w · Σ_rows nll(β) for terms (x, y, w).

    The objective is convex in β, so its derivative is non-decreasing: a safeguarded Newton
    iteration inside a shrinking bracket [lo, hi] (Newton step when it stays inside the bracket,
    else bisection) finds the minimiser, or the bound where the derivative does not change sign.
    """
    lo, hi = float(bounds[0]), float(bounds[1])
    terms = [(tx, ty, w) for tx, ty, w in terms if tx.shape[0] and w > 0]
    if not terms:
        raise InputError("no calibration voxels")

    def gh(b):
        g = h = 0.0
        for tx, ty, w in terms:
            gi, hi_ = _grad_hess(tx, ty, b)
            g += w * gi
            h += w * hi_
        return g, h

    beta = min(max(1.0, lo), hi)
    for _ in range(100):
        g, h = gh(beta)
        if g > 0:
            hi = beta
        else:
            lo = beta
        if hi - lo <= 1e-9 * max(beta, 1e-3) or g == 0:
            break
        step = beta - g / h if h > 0 else None
        new = step if step is not None and lo < step < hi else 0.5 * (lo + hi)
        if abs(new - beta) <= 1e-10 * max(beta, 1e-3):
            break
        beta = new
    return float(min(max(beta, bounds[0]), bounds[1]))


def _subsample(idx: np.ndarray, n: int, rng) -> np.ndarray:
    return idx if idx.size <= n else np.sort(rng.choice(idx, n, replace=False))


def apply_temperature_map(probs, tmap, axis: int = 0) -> np.ndarray:
    """softmax(log p / T(x)) with a per-voxel temperature ``tmap`` (the shape of ``probs`` without
    the class ``axis``); logs clamped as in ``apply_temperature``; float32 stays float32. Argmax unchanged."""
    lp = safe_log(probs)
    t = np.asarray(tmap, dtype=lp.dtype)
    if t.shape != lp.shape[:axis] + lp.shape[axis + 1:]:
        raise InputError(f"temperature map has shape {t.shape}, probabilities {lp.shape} (class axis {axis})")
    if not np.all(np.isfinite(t)) or not np.all(t > 0):
        raise InputError("every voxel temperature must be a positive finite number")
    return softmax(lp / np.expand_dims(t, axis), axis=axis)


# --- the calibrators -------------------------------------------------------------------------

class _TableTemperature:
    """Common machinery: a table T[class, bin] fitted cell by cell with pooling (module doc)."""

    kind = ""

    def __init__(self, edges_mm=DEFAULT_EDGES_MM, pool_voxels: float = DEFAULT_POOL_VOXELS,
                 t_bounds=DEFAULT_T_BOUNDS, parent_rows: int = 5_000, seed: int = 0,
                 open_bin: str = DEFAULT_OPEN_BIN):
        e = [float(v) for v in edges_mm]
        if not e or e[0] != 0.0 or any(b <= a for a, b in zip(e, e[1:])):
            raise InputError(f"distance edges must start at 0 mm and increase, got {edges_mm}")
        if not pool_voxels >= 0:
            raise InputError(f"pool_voxels must be >= 0, got {pool_voxels}")
        lo, hi = (float(v) for v in t_bounds)
        if not 0 < lo < hi:
            raise InputError(f"temperature bounds must satisfy 0 < low < high, got {t_bounds}")
        if open_bin not in OPEN_BIN_RULES:
            raise InputError(f"open_bin must be one of {', '.join(OPEN_BIN_RULES)}, got {open_bin!r}")
        self.edges_mm = tuple(e)
        self.open_bin = open_bin
        self.pool_voxels = float(pool_voxels)
        self.t_bounds = (lo, hi)
        self.parent_rows = int(parent_rows)
        self.seed = int(seed)

    # subclasses: how many distance bins the table has
    def _n_bins(self) -> int:
        raise NotImplementedError

    def _bins(self, dist_mm, n: int) -> np.ndarray:
        if self._n_bins() == 1:
            return np.zeros(n, np.int64)
        if dist_mm is None:
            raise InputError(f"{type(self).__name__} needs the distance to the predicted contour (dist_mm)")
        d = np.asarray(dist_mm).reshape(-1)
        if d.size != n:
            raise InputError(f"dist_mm has {d.size} entries for {n} rows")
        return distance_bins(d, self.edges_mm)

    def _check(self, x, labels=None, pred=None):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] < 2:
            raise InputError(f"log-probabilities must be (N, K) with K >= 2, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise InputError("log-probabilities hold NaN or inf (clamp with calibration.safe_log)")
        n, k = x.shape
        p = np.argmax(x, axis=1) if pred is None else np.asarray(pred).reshape(-1).astype(np.int64)
        if p.size != n or (n and (p.min() < 0 or p.max() >= k)):
            raise InputError(f"predicted classes must be {n} integers in [0, {k})")
        y = None
        if labels is not None:
            y = np.asarray(labels).reshape(-1).astype(np.int64)
            if y.size != n or (n and (y.min() < 0 or y.max() >= k)):
                raise InputError(f"labels must be {n} integers in [0, {k})")
        return x.astype(np.float64), y, p

    def fit(self, x, labels, pred=None, dist_mm=None) -> "_TableTemperature":
        """Fit on rows ``x`` (N, K) of log p̄ with reference ``labels`` (N,), the predicted class
        ``pred`` (N,) (default argmax x) and ``dist_mm`` (N,) (needed by the local calibrator)."""
        x, y, p = self._check(x, labels, pred)
        n, k = x.shape
        if n == 0:
            raise InputError("no calibration voxels")
        bins = self._bins(dist_mm, n)
        nb = self._n_bins()
        rng = np.random.default_rng(self.seed)
        bounds = (1.0 / self.t_bounds[1], 1.0 / self.t_bounds[0])
        m = self.pool_voxels
        g_idx = _subsample(np.arange(n), self.parent_rows, rng)
        # the parent pool "all voxels" as m pseudo-voxels: its mean nll, times m
        g_term = (x[g_idx], y[g_idx], m / g_idx.size)
        beta_global = _fit_beta([(x, y, 1.0)], bounds)
        self.global_temperature_ = 1.0 / beta_global
        table = np.full((k, nb), self.global_temperature_)
        counts = np.zeros((k, nb), np.int64)
        for c in range(k):
            in_c = np.flatnonzero(p == c)
            # class level: its voxels + m pseudo-voxels of the global pool
            beta_c = _fit_beta([(x[in_c], y[in_c], 1.0), g_term], bounds) if in_c.size else beta_global
            if nb == 1:
                table[c, 0] = 1.0 / beta_c
                counts[c, 0] = in_c.size
                continue
            # cell level: its voxels + m pseudo-voxels of the class's pooled objective
            # (class voxels + m global pseudo-voxels, normalised to a mean over n_c + m)
            c_idx = _subsample(in_c, self.parent_rows, rng)
            share = m / (in_c.size + m) if in_c.size + m > 0 else 0.0
            parent = [(x[c_idx], y[c_idx], share * in_c.size / max(c_idx.size, 1)),
                      (x[g_idx], y[g_idx], share * m / g_idx.size)]
            for b in range(nb):
                cell = in_c[bins[in_c] == b]
                counts[c, b] = cell.size
                if cell.size:
                    table[c, b] = 1.0 / _fit_beta([(x[cell], y[cell], 1.0), *parent], bounds)
            filled = np.flatnonzero(counts[c] > 0)
            for b in np.flatnonzero(counts[c] == 0):  # no voxel: the nearest populated bin, else the class T
                table[c, b] = table[c, filled[np.argmin(np.abs(filled - b))]] if filled.size else 1.0 / beta_c
            if counts[c, -1] == 0 and self.open_bin == "identity":  # beyond the fitted ROI: no change
                table[c, -1] = 1.0
        self.table_ = table
        self.counts_ = counts
        self.n_classes_ = int(k)
        self.n_samples_ = int(n)
        self.nll_before_ = _nll_sum(x, y, 1.0) / n
        self.nll_global_ = _nll_sum(x, y, beta_global) / n
        self.nll_after_ = self.nll(x, y, p, dist_mm)
        log.info("%s: NLL %.5f (uncalibrated) / %.5f (global T %.3f) -> %.5f on %d voxels", self.kind,
                 self.nll_before_, self.nll_global_, self.global_temperature_, self.nll_after_, n)
        return self

    def _fitted(self):
        if not hasattr(self, "table_"):
            raise InputError(f"{type(self).__name__} is not fitted yet: call fit(log_probs, labels, ...) first")

    def temperatures(self, pred, dist_mm=None) -> np.ndarray:
        """T of each row from its predicted class and distance (float64 (N,))."""
        self._fitted()
        p = np.asarray(pred).reshape(-1).astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.n_classes_):
            raise InputError(f"predicted classes must lie in [0, {self.n_classes_})")
        return self.table_[p, self._bins(dist_mm, p.size)]

    def transform(self, x, pred=None, dist_mm=None) -> np.ndarray:
        """Calibrated probabilities (N, K): softmax(x_i / T_i)."""
        self._fitted()
        x, _, p = self._check(x, None, pred)
        return softmax(x / self.temperatures(p, dist_mm)[:, None], axis=1)

    def nll(self, x, labels, pred=None, dist_mm=None) -> float:
        """Mean NLL of the calibrated rows."""
        x, y, p = self._check(x, labels, pred)
        z = x / self.temperatures(p, dist_mm)[:, None]
        return float(np.mean(_row_logsumexp(z, axis=1) - z[np.arange(y.size), y]))

    def volume_temperature(self, seg, spacing_zyx) -> np.ndarray:
        """T(x) (z, y, x) float32 for a predicted segmentation ``seg`` on a grid of ``spacing_zyx`` mm."""
        self._fitted()
        s = np.asarray(seg)
        d = contour_distance_mm(s, spacing_zyx) if self._n_bins() > 1 else None
        return self.temperatures(s.reshape(-1), None if d is None else d.reshape(-1)).reshape(s.shape) \
            .astype(np.float32)

    def transform_volume(self, probs, spacing_zyx) -> np.ndarray:
        """Calibrated (K, z, y, x) probabilities of a whole volume; seg = argmax ``probs``."""
        p = np.asarray(probs)
        return apply_temperature_map(p, self.volume_temperature(np.argmax(p, axis=0), spacing_zyx), axis=0)

    # --- record for the calibration file --------------------------------------------------------
    def to_record(self) -> dict:
        self._fitted()
        return {"kind": self.kind, "edges_mm": list(self.edges_mm), "pool_voxels": self.pool_voxels,
                "open_bin": self.open_bin,
                "t_bounds": list(self.t_bounds), "global_temperature": float(self.global_temperature_),
                "temperatures": self.table_.tolist(), "counts": self.counts_.tolist(),
                "n_voxels": self.n_samples_, "nll_before": float(self.nll_before_),
                "nll_global": float(self.nll_global_), "nll_after": float(self.nll_after_),
                "features": ("predicted class" if self.kind == "class_temperature" else
                             "predicted class x distance in mm to the predicted contour (bins edges_mm, last open)")}

    @staticmethod
    def from_record(rec: dict) -> "_TableTemperature":
        """Rebuild a fitted calibrator from ``to_record()`` (InputError when the record is invalid)."""
        if not isinstance(rec, dict) or rec.get("kind") not in KINDS:
            raise InputError(f"local calibration record must have kind one of {KINDS}, got "
                             f"{rec.get('kind') if isinstance(rec, dict) else rec!r}")
        cls = ClassTemperatureScaler if rec["kind"] == "class_temperature" else LocalTemperatureScaler
        try:
            obj = cls(edges_mm=rec.get("edges_mm", DEFAULT_EDGES_MM), pool_voxels=rec.get("pool_voxels", 0.0),
                      t_bounds=rec.get("t_bounds", DEFAULT_T_BOUNDS),
                      open_bin=rec.get("open_bin", "nearest"))  # records written before the rule: nearest
            table = np.asarray(rec["temperatures"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"local calibration record is invalid: {exc}") from exc
        if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] != obj._n_bins():
            raise InputError(f"{rec['kind']} record: temperatures must be a table (K >= 2 classes) x "
                             f"({obj._n_bins()} bins), got shape {table.shape}")
        lo, hi = obj.t_bounds
        if not np.all(np.isfinite(table)) or np.any(table < lo * (1 - 1e-6)) or np.any(table > hi * (1 + 1e-6)):
            raise InputError(f"{rec['kind']} record: temperatures must be finite and within [{lo:g}, {hi:g}]")
        obj.table_ = table
        obj.counts_ = np.asarray(rec.get("counts", np.zeros(table.shape)), dtype=np.int64)
        obj.n_classes_ = table.shape[0]
        obj.n_samples_ = int(rec.get("n_voxels", 0))
        obj.global_temperature_ = float(rec.get("global_temperature", float("nan")))
        for a in ("nll_before", "nll_global", "nll_after"):
            setattr(obj, a + "_", rec.get(a))
        return obj


class ClassTemperatureScaler(_TableTemperature):
    """One temperature per *predicted* class (argmax unchanged), pooled towards the global T."""

    kind = "class_temperature"

    def _n_bins(self) -> int:
        return 1


class LocalTemperatureScaler(_TableTemperature):
    """One temperature per (predicted class, distance-to-contour bin), pooled towards the class's
    temperature, which is pooled towards the global one (module doc)."""

    kind = "local_temperature"

    def _n_bins(self) -> int:
        return len(self.edges_mm)


def make_scaler(kind: str, **kwargs) -> _TableTemperature:
    if kind == "class_temperature":
        return ClassTemperatureScaler(**kwargs)
    if kind == "local_temperature":
        return LocalTemperatureScaler(**kwargs)
    raise InputError(f"unknown local calibrator {kind!r} (expected one of {', '.join(KINDS)})")


def cross_validated_nll(kind: str, x, labels, pred, dist_mm, case_index, extra=None, **kwargs) -> dict:
    """Leave-one-case-out NLL on the calibration rows: for each case, fit ``kind`` (or ``"global"``
    for one temperature) on the other cases' rows and take the NLL of the left-out case's rows.
    ``extra`` = (x, labels, pred, dist_mm, case_index) of rows used for fitting ``kind`` only, never
    scored and never given to ``"global"`` (the voxels sampled beyond the ROI for the open bin).
    Returns {"nll": mean over all rows, "per_case": [...], "n_cases": n}. Needs >= 2 cases."""
    x = np.asarray(x)
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(pred).reshape(-1)
    d = None if dist_mm is None else np.asarray(dist_mm).reshape(-1)
    ci = np.asarray(case_index).reshape(-1)
    cases = np.unique(ci)
    if cases.size < 2:
        raise InputError("cross-validation needs at least two calibration cases")
    total, per_case = 0.0, []
    for c in cases:
        test, train = ci == c, ci != c
        if kind == "global":
            m = ClassTemperatureScaler(pool_voxels=0.0, **kwargs)
            m.fit(x[train], y[train], np.zeros(int(train.sum()), np.int64))
            m.table_[:] = m.global_temperature_
            v = m.nll(x[test], y[test], np.zeros(int(test.sum()), np.int64))
        else:
            fit_rows = [x[train], y[train], p[train], None if d is None else d[train]]
            if extra is not None:
                ex, ey, ep, ed, ec = (np.asarray(a) for a in extra)
                keep = ec.reshape(-1) != c
                fit_rows = [np.concatenate([a, b[keep]]) for a, b in zip(fit_rows, (ex, ey.reshape(-1),
                                                                                    ep.reshape(-1), ed.reshape(-1)))]
            m = make_scaler(kind, **kwargs).fit(*fit_rows)
            v = m.nll(x[test], y[test], p[test], None if d is None else d[test])
        per_case.append(float(v))
        total += v * int(test.sum())
    return {"nll": total / y.size, "per_case": per_case, "n_cases": int(cases.size)}
