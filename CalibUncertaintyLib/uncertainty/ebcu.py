"""Excess-ball cumulative uncertainty (EBCU), the project's own definition (METHODS.md §1).

    EBCU(x) = (1/|B_r|) Σ_{y ∈ B_r(x)} (U(y) − t)₊

the mean over the ball B_r(x) of radius r mm (default 4; the maps use at least two voxels of the
coarsest axis, ``effective_radius_mm``) of the excess of an uncertainty map U
(default PE) over a high threshold t (default: the 0.95 quantile of U inside the ROI, see
``default_threshold``). The ball is built from the spacing: voxel offsets o with
Σ_a (o_a·h_a)² ≤ r², an ellipsoid in voxels on anisotropic grids; its centre is always in it.
Voxels outside the image count as zero excess (the mean still divides by the full ball size).
A thin contour shell fills a small fraction of a ball, a blob of real doubt fills it.

Computation (exact, float32): (U − t)₊ is sparse (about 5 % of the ROI by construction), so
the work is limited to the bounding box of its non-zero voxels padded by the ball radius, and
inside it one of two exact methods is used, whichever costs fewer operations:

- "sparse": every non-zero excess voxel scatters its value to the |B| voxels of its ball
  (one vectorised gather/add per ball offset, n_nonzero·|B| operations);
- "rows": the ball is split into rows along x; a 1-D box sum along x is computed once per
  distinct row length and shift-added once per (dz, dy) row (box·(rows + lengths) operations).
Both give the same numbers as a direct correlation with the ball (see tests).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .. import memory
from ..errors import InputError
from .distance_aware import check_spacing

DEFAULT_RADIUS_MM = 4.0
DEFAULT_QUANTILE = 0.95
#: the maps' ball is at least this many voxels of the coarsest axis in radius (``effective_radius_mm``)
MIN_RADIUS_VOXELS = 2.0
EBCU_METHODS = ("auto", "sparse", "rows")
_SPARSE_COST_FACTOR = 40.0  # measured: a scattered add costs 15-200 ns, a row-pass voxel 1-3 ns


def effective_radius_mm(radius_mm: float, spacing_zyx) -> float:
    """The radius the maps use: max(r, MIN_RADIUS_VOXELS × the largest spacing).

    Why (issue 11, ``bench/results/ebcu_study.md``): with r = 4 mm on CT of ~3.9 mm voxels the ball
    is 7 voxels (the voxel and its 6 face neighbours), so a one-voxel contour shell fills half of
    it as a blob would, and EBCU only smooths the thresholded entropy; on the calibration cases a
    ball of two voxels in radius (8 mm there) doubled the recall of non-boundary errors at the
    same review budget. On fine grids (≤ 2 mm) the 4 mm default is unchanged. ``ebcu()`` itself
    uses the radius it is given."""
    sp = check_spacing(spacing_zyx)
    return max(float(radius_mm), MIN_RADIUS_VOXELS * max(sp))


def ball_offsets(radius_mm: float, spacing_zyx) -> np.ndarray:
    """Integer voxel offsets (n, 3) in (z, y, x) of the ball of ``radius_mm`` mm: Σ (o·h)² ≤ r²."""
    r = float(radius_mm)
    if not (math.isfinite(r) and r >= 0):
        raise InputError(f"EBCU radius must be a finite number of millimetres >= 0, got {radius_mm!r}")
    sp = check_spacing(spacing_zyx)
    ext = [int(math.floor(r / h + 1e-9)) for h in sp]
    grids = np.meshgrid(*[np.arange(-e, e + 1) for e in ext], indexing="ij")
    d2 = sum((g * h) ** 2 for g, h in zip(grids, sp))
    keep = d2 <= r * r * (1 + 1e-9)
    return np.stack([g[keep] for g in grids], axis=1).astype(np.int64)


def ball_kernel(radius_mm: float, spacing_zyx) -> np.ndarray:
    """The ball as a boolean (2ez+1, 2ey+1, 2ex+1) kernel (for reference computations)."""
    off = ball_offsets(radius_mm, spacing_zyx)
    ext = np.abs(off).max(axis=0)
    k = np.zeros(tuple(2 * ext + 1), dtype=bool)
    k[tuple((off + ext).T)] = True
    return k


def default_threshold(u, roi=None, quantile: float = DEFAULT_QUANTILE) -> float:
    """The default EBCU threshold t: the ``quantile`` (0.95) quantile of U inside ``roi``
    (a boolean mask of U's shape; None = the whole image). InputError for an empty ROI."""
    u = np.asarray(u)
    q = float(quantile)
    if not 0.0 <= q <= 1.0:
        raise InputError(f"quantile must be in [0, 1], got {quantile!r}")
    if roi is None:
        vals = u.ravel()
    else:
        roi = np.asarray(roi)
        if roi.shape != u.shape:
            raise InputError(f"ROI shape {roi.shape} differs from the uncertainty map shape {u.shape}")
        vals = u[roi.astype(bool, copy=False)]
    if vals.size == 0:
        raise InputError("the ROI is empty, so the EBCU threshold (a quantile of U inside the ROI) "
                         "is undefined; pass a threshold or a non-empty ROI")
    if not np.isfinite(vals).all():
        raise InputError("the uncertainty map has non-finite values inside the ROI")
    return float(np.quantile(vals, q))


def ebcu(u, spacing_zyx, radius_mm: float = DEFAULT_RADIUS_MM, threshold: float = 0.0,
         method: str = "auto", out: np.ndarray | None = None, backend=None) -> np.ndarray:
    """EBCU of map ``u`` (z, y, x): mean over the ``radius_mm`` ball of (u − threshold)₊.

    ``spacing_zyx`` in mm (array order). ``method``: "auto" (cheaper of the two), "sparse"
    or "rows" (see module doc; identical results). Returns float32 (z, y, x): ``out`` (a
    float32 volume of ``u``'s shape that is not ``u``, overwritten) when given. ``backend``: a torch
    ``uncertainty.backend`` sums the balls on its device (by rows; the same numbers to float32 rounding).
    """
    u = np.asarray(u)
    if u.ndim != 3:
        raise InputError(f"EBCU expects a 3-D (z, y, x) uncertainty map, got shape {u.shape}")
    if method not in EBCU_METHODS:
        raise InputError(f"unknown EBCU method {method!r}; choose one of {', '.join(EBCU_METHODS)}")
    t = float(threshold)
    if not math.isfinite(t):
        raise InputError(f"EBCU threshold must be a finite number, got {threshold!r}")
    offsets = ball_offsets(radius_mm, spacing_zyx)
    ext = np.abs(offsets).max(axis=0)
    if not np.isfinite(u).all():
        raise InputError("the uncertainty map has non-finite values (NaN or inf); EBCU needs a finite map")
    if out is None:
        out = memory.zeros(u.shape, np.float32)
    else:
        if not (isinstance(out, np.ndarray) and out.shape == u.shape and out.dtype == np.float32
                and out.flags.writeable) or np.shares_memory(out, u):
            raise InputError(f"out must be a writable float32 array of shape {u.shape}, not the map itself")
        out.fill(0.0)

    # excess and its padded bounding box
    nz_z = np.flatnonzero((u > t).any(axis=(1, 2)))
    if nz_z.size == 0:
        return out
    nz_y = np.flatnonzero((u[nz_z[0]:nz_z[-1] + 1] > t).any(axis=(0, 2)))
    nz_x = np.flatnonzero((u[nz_z[0]:nz_z[-1] + 1, nz_y[0]:nz_y[-1] + 1] > t).any(axis=(0, 1)))
    lo = [int(a[0]) for a in (nz_z, nz_y, nz_x)]
    hi = [int(a[-1]) + 1 for a in (nz_z, nz_y, nz_x)]
    src = u[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    # working box: the excess box padded by the ball extent (zero padding outside the image)
    pad_lo = ext
    pad_hi = ext
    ex = np.zeros(tuple(h - l + 2 * e for l, h, e in zip(lo, hi, ext)), dtype=np.float32)
    core = tuple(slice(e, e + h - l) for l, h, e in zip(lo, hi, ext))
    ex[core] = src
    ex -= np.float32(t)
    np.maximum(ex, 0, out=ex)

    rows = _rows(offsets)
    n_nonzero = int(np.count_nonzero(ex))
    cost_sparse = _SPARSE_COST_FACTOR * n_nonzero * len(offsets)
    cost_rows = ex.size * (len(rows) + len({a for _, _, a in rows}))
    use_sparse = method == "sparse" or (method == "auto" and cost_sparse < cost_rows)
    if backend is not None and backend.is_torch:
        from .torch_kernels import ball_sum

        acc = ball_sum(backend, ex, rows)
    else:
        acc = _sum_sparse(ex, offsets) if use_sparse else _sum_rows(ex, rows)
    acc *= np.float32(1.0 / len(offsets))

    # copy the part of the padded box that lies inside the image
    dst, srcs = [], []
    for a in range(3):
        g0 = max(lo[a] - pad_lo[a], 0)
        g1 = min(hi[a] + pad_hi[a], u.shape[a])
        dst.append(slice(g0, g1))
        srcs.append(slice(g0 - (lo[a] - pad_lo[a]), g1 - (lo[a] - pad_lo[a])))
    out[tuple(dst)] = acc[tuple(srcs)]
    return out


def _rows(offsets: np.ndarray):
    """Ball rows along x: list of (dz, dy, a) with the row covering dx in [-a, a]."""
    rows = {}
    for dz, dy, dx in offsets:
        key = (int(dz), int(dy))
        rows[key] = max(rows.get(key, 0), abs(int(dx)))
    return [(dz, dy, a) for (dz, dy), a in sorted(rows.items())]


def _shift_slices(n: int, d: int):
    """Slices (dst, src) with dst[i] receiving src[i + d] for a length-n axis."""
    if d >= 0:
        return slice(0, n - d), slice(d, n)
    return slice(-d, n), slice(0, n + d)


def _sum_rows(ex: np.ndarray, rows) -> np.ndarray:
    """Σ over ball offsets of ex(x + o), by row decomposition (the box is zero-padded)."""
    out = np.zeros_like(ex)
    by_len = {}
    for dz, dy, a in rows:
        by_len.setdefault(a, []).append((dz, dy))
    for a, pairs in by_len.items():
        width = 2 * a + 1
        if a == 0:
            box = ex
        else:
            box = ndimage.uniform_filter1d(ex, size=width, axis=2, mode="constant", cval=0.0)
            box *= np.float32(width)
        for dz, dy in pairs:
            dz_dst, dz_src = _shift_slices(ex.shape[0], dz)
            dy_dst, dy_src = _shift_slices(ex.shape[1], dy)
            out[dz_dst, dy_dst] += box[dz_src, dy_src]
    return out


def _sum_sparse(ex: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Σ over ball offsets of ex(x + o), scattering each non-zero voxel into its ball."""
    out = np.zeros(ex.size, dtype=np.float32)
    idx = np.flatnonzero(ex)
    vals = ex.ravel()[idx]
    strides = np.array([ex.shape[1] * ex.shape[2], ex.shape[2], 1], dtype=np.int64)
    # the padded box has room for every offset, so flat shifts never wrap
    for off in offsets:
        out[idx - int(off @ strides)] += vals
    return out.reshape(ex.shape)
