"""Contours in millimetres: distances to a voxel set, border voxels, surface Dice at a tolerance, and
the contour-deviation errors a planner recognises (docs/METHODS.md "Per-organ quality" and
"Contour-level guarantees").

One distance convention everywhere (the one DAE uses, ``uncertainty.distance_aware``): the
distance from voxel x to a set S is the exact distance in mm from x's *centre* to the nearest
voxel *box* of S,

    d(x, S) = min_{y ∈ S} sqrt(Σ_a max(|x_a − y_a|·h_a − h_a/2, 0)²),   h = spacing (z, y, x),

0 inside S, h_a/2 for a voxel sharing a face with S along axis a, +inf for an empty S. The contour
of S lies on the faces of its voxels, so d(x, S) is how far x's centre lies outside S's contour.

- **Contour deviation beyond t mm** of class k, prediction P_k and reference G_k: the voxels of the
  symmetric difference whose centre lies farther than t from the other contour,
  FN_t(k) = {x ∈ G_k ∖ P_k : d(x, P_k) > t} (organ missed by more than t) and
  FP_t(k) = {x ∈ P_k ∖ G_k : d(x, G_k) > t} (prediction beyond the organ by more than t).
  The case's contour-error mask is the union over the foreground classes. A one-voxel shift of a
  contour on a grid coarser than 2t is not an error; a shift by more than t is.
- **Border voxels** B(S): voxels of S with a face neighbour outside S (the image border counts as
  outside).
- **Surface Dice at tolerance τ** (the voxel version of Nikolov et al.'s surface DSC, with the
  distance above): (|{x ∈ B(P) : d(x, B(G)) ≤ τ}| + |{x ∈ B(G) : d(x, B(P)) ≤ τ}|) / (|B(P)| + |B(G)|);
  1 when both sets are empty, 0 when exactly one is. Compared with surfel-based implementations it
  tolerates half a voxel more (it measures to the other border voxel's box, not its centre).

"≤ τ" and "> t" are evaluated with ``ROUND_MM`` = 1e-4 mm of slack in favour of "within", so a
distance equal to the tolerance in exact arithmetic (e.g. 1.5 × 2 mm at t = 3 mm) counts as within
whatever the float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

ROUND_MM = 1e-4


def _spacing(spacing_zyx) -> tuple:
    from ..uncertainty.distance_aware import check_spacing

    return check_spacing(spacing_zyx)


def check_tolerance(tolerance_mm) -> float:
    try:
        t = float(tolerance_mm)
    except (TypeError, ValueError):
        raise InputError(f"tolerance must be a distance in mm >= 0, got {tolerance_mm!r}") from None
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"tolerance must be a distance in mm >= 0 (e.g. 3), got {tolerance_mm!r}")
    return t


def distance_to_mm(target, spacing_zyx, max_mm: float | None = None) -> np.ndarray:
    """d(x, target) in mm for every voxel (module docstring), float32; exact up to ``max_mm``
    (None: everywhere), beyond it some value > ``max_mm`` or +inf."""
    from ..uncertainty.distance_aware import _min_pass
    from ..uncertainty.streaming import DEFAULT_SLAB_VOXELS

    t = np.asarray(target, dtype=bool)
    if t.ndim != 3:
        raise InputError(f"expected a 3-D (z, y, x) mask, got shape {t.shape}")
    sp = _spacing(spacing_zyx)
    g = np.where(t, np.float32(0.0), np.float32(np.inf)).astype(np.float32, copy=False)
    if not t.any() or t.all():
        return g
    for a in range(3):
        width = g.shape[a] - 1 if max_mm is None else int(math.floor(float(max_mm) / sp[a] + 0.5))
        _min_pass(g, a, sp[a], width, DEFAULT_SLAB_VOXELS)
    return np.sqrt(g, out=g)


def border(mask) -> np.ndarray:
    """B(S): voxels of ``mask`` with a face neighbour outside it (the image border is outside)."""
    m = np.asarray(mask, dtype=bool)
    inner = m.copy()  # erosion by the 6 face neighbours, by slicing (several times faster than ndimage's)
    for a in range(m.ndim):
        lo = [slice(None)] * m.ndim
        hi = [slice(None)] * m.ndim
        lo[a], hi[a] = slice(1, None), slice(None, -1)
        inner[tuple(lo)] &= m[tuple(hi)]
        inner[tuple(hi)] &= m[tuple(lo)]
        edge = [slice(None)] * m.ndim
        for i in (0, -1):
            edge[a] = i
            inner[tuple(edge)] = False
    return m & ~inner


def _box(mask, pad, shape):
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    return tuple(slice(max(int(i.min()) - p, 0), min(int(i.max()) + 1 + p, n)) for i, p, n in zip(idx, pad, shape))


def _pad_vox(tolerance_mm, spacing) -> tuple:
    return tuple(int(math.ceil(float(tolerance_mm) / h)) + 1 for h in spacing)


def surface_dice(pred, ref, spacing_zyx, tolerance_mm: float) -> float:
    """Surface Dice of two masks at ``tolerance_mm`` (module docstring; both empty: 1.0)."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if p.shape != g.shape:
        raise InputError(f"surface Dice needs masks on one grid, got {p.shape} and {g.shape}")
    tol = check_tolerance(tolerance_mm)
    sp = _spacing(spacing_zyx)
    box = _box(p | g, _pad_vox(tol, sp), p.shape)
    if box is None:
        return 1.0
    p, g = p[box], g[box]
    if not p.any() or not g.any():
        return 0.0
    return surface_dice_from_border(border(p), g, sp, tol)


def surface_dice_from_border(bp, g, spacing, tol: float, d_bp=None) -> float:
    """Surface Dice given B(P) (and optionally d(·, B(P))) on a box that holds P and G padded by the
    tolerance (the caller's crop)."""
    bg = border(g)
    n = int(bp.sum()) + int(bg.sum())
    if n == 0:
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    lim = tol + ROUND_MM
    if d_bp is None:
        d_bp = distance_to_mm(bp, spacing, tol + max(spacing))
    # d(·, B(G)) is needed at B(P) only, within the tolerance: on the box of B(P) padded by it
    box = _box(bp, _pad_vox(tol, spacing), bp.shape)
    d_bg = distance_to_mm(bg[box], spacing, tol + max(spacing))
    return float((np.count_nonzero(d_bg[bp[box]] <= lim) + np.count_nonzero(d_bp[bg] <= lim)) / n)


def class_contour_errors(pred_k, ref_k, spacing_zyx, tolerance_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(FN_t, FP_t) of one class as bool volumes of the input grid (module docstring)."""
    p, g = np.asarray(pred_k, dtype=bool), np.asarray(ref_k, dtype=bool)
    if p.shape != g.shape or p.ndim != 3:
        raise InputError(f"contour errors need two 3-D masks on one grid, got {p.shape} and {g.shape}")
    tol = check_tolerance(tolerance_mm)
    sp = _spacing(spacing_zyx)
    fn, fp = np.zeros(p.shape, bool), np.zeros(p.shape, bool)
    box = _box(p | g, (0, 0, 0), p.shape)  # every voxel of P and G lies in it: distances to them are exact there
    if box is None:
        return fn, fp
    pb, gb = p[box], g[box]
    lim = tol + ROUND_MM
    miss = gb & ~pb
    if miss.any():
        fn[box] = miss & (distance_to_mm(pb, sp, tol + max(sp)) > lim)
    extra = pb & ~gb
    if extra.any():
        fp[box] = extra & (distance_to_mm(gb, sp, tol + max(sp)) > lim)
    return fn, fp


def contour_error_mask(seg, labels, spacing_zyx, tolerance_mm: float, n_classes: int | None = None,
                       roi=None) -> np.ndarray:
    """The case's contour-error mask: ∪_k FN_t(k) ∪ FP_t(k) over the foreground classes, within
    ``roi`` when given (module docstring)."""
    s, y = np.asarray(seg), np.asarray(labels)
    if s.shape != y.shape:
        raise InputError(f"segmentation {s.shape} and reference {y.shape} are on different grids")
    k = int(n_classes) if n_classes is not None else int(max(s.max(initial=0), y.max(initial=0))) + 1
    out = np.zeros(s.shape, bool)
    for c in range(1, k):
        fn, fp = class_contour_errors(s == c, y == c, spacing_zyx, tolerance_mm)
        out |= fn
        out |= fp
    if roi is not None:
        out &= np.asarray(roi, dtype=bool)
    return out
