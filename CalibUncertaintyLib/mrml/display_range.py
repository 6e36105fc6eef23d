"""How an overlay is shown by default: its threshold, shown range and colour window (no MRML).

Each statistic is computed over z slabs of the map, a bounded number of voxels at a time, by a
generator that yields after every slab (``case_loader.CaseLoader`` interleaves them with the rest
of a case's loading so that no single step holds Slicer's GUI thread long); the plain functions
(:func:`robust_max`, :func:`colour_window`, :func:`fallback_threshold`) run the same generators
to the end. Quantiles are exact - equal to ``numpy.quantile`` (linear method) of the selected
voxels - without ever copying or sorting all of them: the two order statistics the quantile needs
are found by narrowing a value interval over the slabs (counts under 1024 pivots per pass) until
its voxels are few enough to sort, or all equal.

- colour window: 0 to the robust max (the 0.995 quantile of the positive voxels) of the voxels at
  or above the threshold - the ones the reviewer sees - so they spread over the colour table;
- fallback threshold (a map the case folder gives no τ* for): the 0.95 quantile of the map's
  non-negligible voxels (value > 1 % of its maximum).
"""

from __future__ import annotations

from typing import Callable, Generator, Iterator

import numpy as np

ROBUST_MAX_QUANTILE = 0.995
FALLBACK_QUANTILE = 0.95
#: voxels per slab of one unit of work (about 8 MB of float32)
SLAB_VOXELS = 1 << 21
_PIVOTS = 1024
_GATHER = 1 << 20  # sort the remaining candidates once at most this many are left

Select = Callable[[np.ndarray], np.ndarray]
Work = Generator[None, None, object]


def slabs(array: np.ndarray, voxels: int = SLAB_VOXELS) -> Iterator[np.ndarray]:
    """Consecutive z slabs of a (z, y, x) array (views), about ``voxels`` voxels each."""
    a = np.asarray(array)
    if a.ndim == 0 or a.shape[0] == 0:
        return
    per = max(1, voxels // max(int(np.prod(a.shape[1:])), 1))
    for z in range(0, a.shape[0], per):
        yield a[z:z + per]


def min_max(array: np.ndarray, voxels: int = SLAB_VOXELS) -> Work:
    """-> (min, max) of the array as floats ((0.0, 0.0) when empty)."""
    lo, hi = np.inf, -np.inf
    for s in slabs(array, voxels):
        lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
        yield
    return (0.0, 0.0) if lo > hi else (lo, hi)


def _selected(s: np.ndarray, select: Select | None) -> np.ndarray:
    return s.reshape(-1) if select is None else s[select(s)]


def _count_min_max(array, select, voxels) -> Work:
    n, lo, hi = 0, np.inf, -np.inf
    for s in slabs(array, voxels):
        v = _selected(s, select)
        if v.size:
            n += v.size
            lo, hi = min(lo, v.min()), max(hi, v.max())
        yield
    return n, lo, hi


def _kth(array, select, k: int, n: int, lo, hi, voxels) -> Work:
    """-> the k-th smallest (0-based) of the n selected values, which lie in [lo, hi]."""
    below, a, b = 0, None, hi          # candidates: a < v <= b (no lower bound while a is None)
    inside = n
    if lo == hi:
        return lo
    for _ in range(64):
        if inside <= _GATHER:
            break
        pivots = np.linspace(lo if a is None else a, b, _PIVOTS + 1)[1:]
        pivots[-1] = b
        counts = np.zeros(_PIVOTS, np.int64)
        cmin, cmax = np.inf, -np.inf
        for s in slabs(array, voxels):
            v = _selected(s, select)
            v = v[(v <= b) if a is None else ((v > a) & (v <= b))]
            if v.size:
                counts += np.bincount(np.searchsorted(pivots, v, side="left"), minlength=_PIVOTS)[:_PIVOTS]
                cmin, cmax = min(cmin, v.min()), max(cmax, v.max())
            yield
        if cmin == cmax:
            return cmin
        cum = np.cumsum(counts)
        i = int(np.searchsorted(cum, k - below, side="right"))
        new_below = below + (int(cum[i - 1]) if i else 0)
        a_new = a if i == 0 else pivots[i - 1]
        a, b, below, inside = a_new, pivots[i], new_below, int(counts[i])
        lo = cmin if a is None else lo
    gathered = []
    for s in slabs(array, voxels):
        v = _selected(s, select)
        gathered.append(v[(v <= b) if a is None else ((v > a) & (v <= b))])
        yield
    v = np.concatenate(gathered) if gathered else np.empty(0)
    r = k - below
    return np.partition(v, r)[r]


def quantile(array: np.ndarray, q: float, select: Select | None = None, voxels: int = SLAB_VOXELS) -> Work:
    """-> ``numpy.quantile(selected, q)`` (linear method) of the voxels ``select(slab)`` picks
    (all when None), or None when none is selected. Never holds more than one slab's selection
    plus at most about a million candidates."""
    n, lo, hi = yield from _count_min_max(array, select, voxels)
    if n == 0:
        return None
    h = q * (n - 1)
    k1 = int(np.floor(h))
    k2 = min(k1 + 1, n - 1)
    s1 = yield from _kth(array, select, k1, n, lo, hi, voxels)
    s2 = s1 if k2 == k1 else (yield from _kth(array, select, k2, n, lo, hi, voxels))
    dtype = np.result_type(s1)
    # numpy's own interpolation of the two order statistics (the same gamma, the same formula)
    return float(np.quantile(np.array([s1, s2], dtype=dtype), h - k1))


def robust_max_work(array: np.ndarray, select: Select | None = None, voxels: int = SLAB_VOXELS) -> Work:
    """-> the ROBUST_MAX_QUANTILE quantile of the positive selected voxels, their max if that is
    0, 1.0 when none is positive."""
    def positive(s):
        m = s > 0
        return m if select is None else (m & select(s))

    hi = yield from quantile(array, ROBUST_MAX_QUANTILE, positive, voxels)
    if hi is None:
        return 1.0
    if hi > 0:
        return hi
    _, _, top = yield from _count_min_max(array, positive, voxels)
    return float(top)


def colour_window_work(array: np.ndarray, tau: float, voxels: int = SLAB_VOXELS) -> Work:
    """-> (0, hi): hi is the robust max of the voxels at or above ``tau`` (all voxels when none
    reach it, or tau is not finite), at least tau."""
    if not np.isfinite(tau):
        hi = yield from robust_max_work(array, None, voxels)
        return (0.0, hi)
    n, _, _ = yield from _count_min_max(array, lambda s: s >= tau, voxels)
    hi = yield from robust_max_work(array, (lambda s: s >= tau) if n else None, voxels)
    return (0.0, max(hi, float(tau)))


def fallback_threshold_work(array: np.ndarray, voxels: int = SLAB_VOXELS) -> Work:
    """-> FALLBACK_QUANTILE quantile of the voxels above 1 % of the map's maximum; 0 for a map
    without positive values."""
    _, top = yield from min_max(array, voxels)
    if top <= 0:
        return 0.0
    value = yield from quantile(array, FALLBACK_QUANTILE, lambda s: s > 0.01 * top, voxels)
    return float(value)


def finish(work: Work):
    """Run a generator of this module to its end; its result."""
    while True:
        try:
            next(work)
        except StopIteration as stop:
            return stop.value


def robust_max(array: np.ndarray, quantile_: float = ROBUST_MAX_QUANTILE) -> float:
    """Upper end of a map's colour window: the 0.995 quantile of its positive voxels, so a few
    outliers do not wash the colours out; the plain max if that is 0; 1.0 for an all-zero map."""
    if quantile_ != ROBUST_MAX_QUANTILE:
        pos = np.asarray(array)[np.asarray(array) > 0]
        return 1.0 if pos.size == 0 else (float(np.quantile(pos, quantile_)) or float(pos.max()))
    return float(finish(robust_max_work(np.asarray(array))))


def colour_window(array: np.ndarray, tau: float) -> tuple[float, float]:
    """Colour window (0, hi) of a map shown above ``tau`` (see :func:`colour_window_work`)."""
    return tuple(finish(colour_window_work(np.asarray(array), float(tau))))


def fallback_threshold(array: np.ndarray, quantile_: float = FALLBACK_QUANTILE) -> float:
    """Threshold for a map the case folder gives no τ* for (see :func:`fallback_threshold_work`)."""
    if quantile_ != FALLBACK_QUANTILE:
        a = np.asarray(array)
        top = float(a.max()) if a.size else 0.0
        return 0.0 if top <= 0 else float(np.quantile(a[a > 0.01 * top], quantile_))
    return float(finish(fallback_threshold_work(np.asarray(array))))


__all__ = ["ROBUST_MAX_QUANTILE", "FALLBACK_QUANTILE", "SLAB_VOXELS", "slabs", "min_max", "quantile",
           "robust_max_work", "colour_window_work", "fallback_threshold_work", "finish", "robust_max",
           "colour_window", "fallback_threshold"]
