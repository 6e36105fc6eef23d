"""Distance-aware entropy (DAE), the project's own definition (METHODS.md §1).

    DAE(x) = w(d(x)) · H(p̄(x)),   w(d) = 1 − exp(−d² / (2σ²)),   σ = 2 mm by default.

It removes the one-to-two-voxel entropy shell that every softmax model draws along its own
contour and keeps uncertainty away from it. All distances are in millimetres (image spacing).

d(x), the distance from voxel x to the predicted surface, is defined here as follows (both
sides of a contour are treated alike):

- Each voxel belongs to the region of its own predicted label. The surface of that region lies
  on the faces between its voxels and voxels of another label. With two classes this is
  exactly the surface of the predicted foreground (inside and outside); with several classes
  the interfaces between two foreground classes count too (each class's own contour).
- d(x) = the exact distance from x's centre to the nearest voxel *box* of another label:
  min over voxels y of another label of sqrt(Σ_a max(|x_a − y_a|·h_a − h_a/2, 0)²),
  h = spacing (z, y, x). A voxel that shares a face with another label along axis a gets
  d = h_a/2: half a voxel, the distance from its centre to the face, on both sides and on
  anisotropic grids alike. (Earlier versions took the box of the voxel with the nearest *centre*,
  which on anisotropic grids overestimates d by up to about a voxel: with spacing
  2.5 × 0.8 × 0.8 mm a voxel sharing a z-face with the other label got 2.0 mm, not 1.25 mm.)
- No surface (the prediction has a single label, e.g. an empty prediction): d = +inf, w = 1,
  DAE = H (an info message says so).

Computation (exact): d² is a separable minimum, d²(x) = min_y Σ_a f_a(x_a − y_a) with
f_a(0) = 0 and f_a(k) = h_a²(|k| − 1/2)², so three 1-D passes (z, then y, then x) of a minimum
over offsets |k| ≤ W_a give it exactly (the minimising y is the same through the passes).
W_a = the axis length (exact everywhere) or, with a cutoff D, round(D / h_a + 1/2): every d ≤ D
is exact, larger ones are reported as some value > D or +inf. float32; each pass works on slabs
of at most ``slab_voxels`` voxels across the axis it runs along (memory: the box's d² plus two
slabs).

For speed on large images, distances are computed only where w < 1 in float32: beyond
``cutoff = 6σ`` (w = 1 − exp(−18), which is 1.0 in float32) the weight is exactly 1 and d may
be reported as +inf. Each foreground label's distances come from its bounding box padded by one
voxel (the nearest other-label voxel box always lies there: clamping any other-label voxel into
that box gives one of the pad's voxels, no farther on any axis), background distances from the
foreground's bounding box padded by the cutoff.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage

from .. import memory
from ..errors import InputError
from .streaming import DEFAULT_SLAB_VOXELS, z_slabs

log = logging.getLogger(__name__)

DEFAULT_SIGMA_MM = 2.0
CUTOFF_SIGMAS = 6.0


def check_spacing(spacing_zyx) -> tuple[float, float, float]:
    """Three positive finite spacings (z, y, x) in mm, or InputError."""
    try:
        sp = tuple(float(s) for s in spacing_zyx)
    except (TypeError, ValueError) as e:
        raise InputError(f"spacing must be three numbers (z, y, x) in mm, got {spacing_zyx!r}") from e
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing must be three positive finite numbers (z, y, x) in mm, got {spacing_zyx!r}")
    return sp


def _check_labels(labels) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise InputError(f"expected a 3-D (z, y, x) label volume, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        if np.issubdtype(lab.dtype, np.bool_):
            return lab.astype(np.uint8)
        raise InputError(f"labels must be an integer volume (predicted classes), got dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise InputError("labels must be >= 0 (0 = background)")
    return lab


def _padded_box(slices, pad_vox, shape):
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(slices, pad_vox, shape))


def _min_pass(g: np.ndarray, axis: int, h: float, width: int, slab_voxels: int) -> None:
    """In place: g(i) <- min(g(i), min_{1 ≤ |k| ≤ width} g(i + k) + h²(|k| − 1/2)²) along ``axis``,
    slab by slab across another axis (module docstring)."""
    n = g.shape[axis]
    width = min(int(width), n - 1)
    if width < 1:
        return
    across = 1 if axis == 0 else 0
    per = max(1, int(slab_voxels) // max(1, g.size // g.shape[across]))
    costs = [np.float32(h * h * (k - 0.5) ** 2) for k in range(1, width + 1)]
    for a0 in range(0, g.shape[across], per):
        index = [slice(None)] * 3
        index[across] = slice(a0, min(a0 + per, g.shape[across]))
        src = np.moveaxis(g[tuple(index)], axis, 0).copy()  # (n, ...) slab, the pass's input
        out = src.copy()
        tmp = np.empty_like(src)
        for k, c in zip(range(1, width + 1), costs):
            for dst, srs in ((slice(k, n), slice(0, n - k)), (slice(0, n - k), slice(k, n))):
                t = tmp[: n - k]
                np.add(src[srs], c, out=t)
                np.minimum(out[dst], t, out=out[dst])
        g[tuple(index)] = np.moveaxis(out, 0, axis)


def _box_distance_into(out, region_mask, box, spacing, max_mm, slab_voxels, backend=None):
    """For voxels where ``region_mask`` (a bool array over ``box``) is True, write into
    ``out[box]`` the exact distance (mm) to the nearest voxel box where it is False (module doc;
    exact up to ``max_mm``, None = everywhere). On a torch ``backend`` the passes run on its device."""
    if backend is not None and backend.is_torch:
        from .torch_kernels import box_distance

        g = box_distance(backend, region_mask, spacing, max_mm)
        sub = out[box]
        sub[region_mask] = g[region_mask]
        return
    g = np.where(region_mask, np.float32(np.inf), np.float32(0.0)).astype(np.float32, copy=False)
    for a in range(3):
        width = g.shape[a] - 1 if max_mm is None else int(math.floor(float(max_mm) / spacing[a] + 0.5))
        _min_pass(g, a, spacing[a], width, slab_voxels)
    np.sqrt(g, out=g)
    sub = out[box]
    sub[region_mask] = g[region_mask]


def surface_distance_mm(labels, spacing_zyx, max_distance_mm: float | None = None,
                        slab_voxels: int = DEFAULT_SLAB_VOXELS, out: np.ndarray | None = None,
                        backend=None) -> np.ndarray:
    """d(x) in mm from each voxel to the surface of its predicted label region (see module doc).

    ``labels``: integer (z, y, x) prediction. ``spacing_zyx``: mm, array order.
    ``max_distance_mm``: distances are exact up to this value; beyond it they may be +inf
    (None: exact everywhere). +inf everywhere when there is only one label (no surface).
    Returns float32 (z, y, x): ``out`` (a float32 volume of the labels' shape, overwritten) when given.
    ``backend``: a torch ``uncertainty.backend`` runs the distance passes on its device (the same values).
    """
    lab = _check_labels(labels)
    sp = check_spacing(spacing_zyx)
    if max_distance_mm is not None and not (max_distance_mm >= 0):
        raise InputError(f"max_distance_mm must be >= 0 mm or None, got {max_distance_mm!r}")
    if out is None:
        out = memory.full(lab.shape, np.inf, np.float32)
    else:
        _check_out(out, lab.shape)
        out.fill(np.inf)
    if lab.size == 0:
        return out
    counts = np.bincount(lab.ravel())
    present = np.flatnonzero(counts)
    if len(present) < 2:
        return out
    boxes = ndimage.find_objects(lab)
    # foreground labels: transform on their bounding box padded by one voxel
    for l in present:
        if l == 0:
            continue
        box = _padded_box(boxes[l - 1], (1, 1, 1), lab.shape)
        _box_distance_into(out, lab[box] == l, box, sp, max_distance_mm, slab_voxels, backend)
    if counts[0] == 0:
        return out
    # background: transform on the foreground bounding box padded by the cutoff
    fg_box = tuple(slice(min(boxes[l - 1][a].start for l in present if l),
                         max(boxes[l - 1][a].stop for l in present if l)) for a in range(3))
    if max_distance_mm is None:
        box = tuple(slice(0, n) for n in lab.shape)
    else:
        pad = [int(math.ceil(float(max_distance_mm) / h)) + 1 for h in sp]
        box = _padded_box(fg_box, pad, lab.shape)
    _box_distance_into(out, lab[box] == 0, box, sp, max_distance_mm, slab_voxels, backend)
    return out


def _check_out(out, shape) -> None:
    if not (isinstance(out, np.ndarray) and out.shape == tuple(shape) and out.dtype == np.float32
            and out.flags.c_contiguous and out.flags.writeable):
        raise InputError(f"out must be a writable C-contiguous float32 array of shape {tuple(shape)}")


def distance_weight(d_mm, sigma_mm: float = DEFAULT_SIGMA_MM) -> np.ndarray:
    """w(d) = 1 − exp(−d² / (2σ²)), float32; +inf maps to 1."""
    sigma = _check_sigma(sigma_mm)
    d = np.asarray(d_mm, dtype=np.float32)
    w = np.exp(d * d * np.float32(-1.0 / (2.0 * sigma * sigma)))
    return np.float32(1.0) - w


def _check_sigma(sigma_mm) -> float:
    try:
        sigma = float(sigma_mm)
    except (TypeError, ValueError) as e:
        raise InputError(f"DAE sigma must be a positive number of millimetres, got {sigma_mm!r}") from e
    if not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"DAE sigma must be a positive finite number of millimetres, got {sigma_mm!r}")
    return sigma


def distance_aware_entropy(entropy, labels, spacing_zyx, sigma_mm: float = DEFAULT_SIGMA_MM,
                           slab_voxels: int = DEFAULT_SLAB_VOXELS, out: np.ndarray | None = None,
                           backend=None) -> np.ndarray:
    """DAE = w(d) · H, float32 (z, y, x). ``entropy``: H(p̄) (the calibrated PE);
    ``labels``: the predicted labels (argmax of the same p̄); ``spacing_zyx`` in mm; ``out``: a
    float32 volume to write DAE into (overwritten; not the entropy itself), else a new one;
    ``backend``: a torch ``uncertainty.backend`` computes it on its device."""
    sigma = _check_sigma(sigma_mm)
    h = np.asarray(entropy)
    lab = _check_labels(labels)
    if h.shape != lab.shape:
        raise InputError(f"entropy shape {h.shape} differs from label shape {lab.shape}")
    if lab.size and np.bincount(lab.ravel()).astype(bool).sum() < 2:
        log.info("the prediction has a single label (no predicted surface): DAE uses d = +inf, "
                 "w = 1, so DAE equals the entropy")
    if out is not None and np.shares_memory(out, h):
        raise InputError("out must not be the entropy volume DAE reads")
    d = surface_distance_mm(lab, spacing_zyx, max_distance_mm=CUTOFF_SIGMAS * sigma, slab_voxels=slab_voxels,
                            out=out, backend=backend)
    for sl in z_slabs(lab.shape, slab_voxels):
        if backend is not None and backend.is_torch:
            from .torch_kernels import dae_weight_slab

            dae_weight_slab(backend, d[sl], h[sl], sigma, out=d[sl])
            continue
        w = distance_weight(d[sl], sigma)
        w *= h[sl]
        d[sl] = w
    return d
