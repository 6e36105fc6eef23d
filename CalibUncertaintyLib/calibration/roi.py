"""Region of interest for calibration and evaluation (METHODS.md §2 "ROI").

The ROI is the set of voxels within ``radius_mm`` millimetres (default 15) of the predicted
foreground (labels > 0). Distances are Euclidean, between voxel centres, measured with the
image spacing (``scipy.ndimage.distance_transform_edt(..., sampling=spacing_zyx)``), so the
radius means the same physical size on anisotropic grids. The foreground itself is inside the
ROI (distance 0).

Rules (say which one in every report, ``describe_roi`` gives the sentence):

- ``"prediction"`` (default): derived from the prediction only, so it exists at deployment time.
- ``"gt_union_prediction"``: reference ∪ prediction foreground, for research evaluation only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .. import memory
from ..errors import InputError

ROI_RULES = ("prediction", "gt_union_prediction")
DEFAULT_RADIUS_MM = 15.0


def describe_roi(rule: str, radius_mm: float) -> str:
    """One sentence naming the ROI rule and radius, for reports and summary files."""
    _check_rule(rule)
    if rule == "prediction":
        what = "the predicted foreground (prediction-derived ROI, available at deployment)"
    else:
        what = ("the union of the reference and the predicted foreground "
                "(GT ∪ prediction ROI, research evaluation only)")
    return f"voxels within {float(radius_mm):g} mm of {what}"


def roi_mask(pred_labels, spacing_zyx, radius_mm: float = DEFAULT_RADIUS_MM, reference=None,
             rule: str = "prediction", allow_empty: bool = False) -> np.ndarray:
    """Boolean (z, y, x) mask of voxels within ``radius_mm`` mm of the foreground.

    ``pred_labels``: integer label volume (z, y, x), foreground = labels > 0.
    ``spacing_zyx``: voxel spacing in mm in array order (``Geometry.spacing_zyx``).
    ``reference``: reference label volume, required for ``rule="gt_union_prediction"``.
    When the foreground the rule uses is empty an ``InputError`` is raised, unless
    ``allow_empty=True``, which returns an all-False mask.

    Distances are Euclidean between voxel centres in mm, exact. They are only computed on the
    foreground's bounding box padded by the radius (in voxels per axis): every voxel outside it
    is farther than ``radius_mm`` along one axis alone. Inside the box they come from in-plane
    distance transforms combined across the slices within reach (see the code), so memory stays
    a few planes whatever the volume. Each plane is first decided on coarse blocks of
    ``BLOCK`` × ``BLOCK`` voxels, with exact bounds on every voxel's distance: blocks surely inside
    or surely outside the radius need no fine transform, so labels scattered over the image (nearly
    every block surely inside) cost a transform of a plane 16 times smaller instead of a full one.
    """
    _check_rule(rule)
    pred = np.asarray(pred_labels)
    if pred.ndim != 3:
        raise InputError(f"roi_mask expects a 3-D (z, y, x) label volume, got shape {pred.shape}")
    spacing = _check_spacing(spacing_zyx)
    radius_mm = float(radius_mm)
    if not math.isfinite(radius_mm) or radius_mm < 0:
        raise InputError(f"ROI radius must be a finite number of millimetres >= 0, got {radius_mm}")

    fg = pred > 0
    if rule == "gt_union_prediction":
        if reference is None:
            raise InputError("ROI rule 'gt_union_prediction' needs the reference labels "
                             "(pass reference=...), or use rule='prediction'")
        ref = np.asarray(reference)
        if ref.shape != pred.shape:
            raise InputError(f"reference shape {ref.shape} differs from prediction shape {pred.shape}")
        fg = fg | (ref > 0)

    if not fg.any():
        if allow_empty:
            return np.zeros(pred.shape, dtype=bool)
        source = "prediction" if rule == "prediction" else "reference and prediction"
        raise InputError(f"empty mask: the {source} has no foreground voxel (labels > 0), so the "
                         f"{radius_mm:g} mm ROI is empty; check the prediction or pass allow_empty=True")

    # Bounding box of the foreground padded by the radius in voxels per axis.
    lo, hi = [], []
    for axis in range(3):
        c = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        pad = int(math.ceil(radius_mm / spacing[axis])) + 1
        lo.append(max(int(c[0]) - pad, 0))
        hi.append(min(int(c[-1]) + pad + 1, pred.shape[axis]))
    out = memory.zeros(pred.shape, bool)
    # Exact distances from 2-D transforms, one slice at a time: the squared distance (mm²) from
    # a voxel of slice z to the foreground is the minimum over slices z' of ((z − z')·s_z)² + d_z'²,
    # with d_z' the in-plane distance to the foreground of slice z' (scipy's 2-D transform, exact
    # inside the box because the box holds all the foreground). Only slices with |z − z'|·s_z <= R
    # can reach, so ROI(z) = OR over them of d_z' <= sqrt(R² − ((z − z')·s_z)²). Memory: one
    # plane's transform per reachable slice, never a 3-D transform.
    rows, cols = slice(lo[1], hi[1]), slice(lo[2], hi[2])
    reach = int(math.floor(radius_mm / spacing[0]))
    has_fg = fg[:, rows, cols].any(axis=(1, 2))
    planes: dict[int, np.ndarray] = {}
    coarse: dict[int, np.ndarray] = {}
    shape2 = (hi[1] - lo[1], hi[2] - lo[2])
    for z in range(lo[0], hi[0]):
        near = [zp for zp in range(max(z - reach, 0), min(z + reach + 1, pred.shape[0])) if has_fg[zp]]
        limits = {zp: math.sqrt(left) for zp in near
                  if (left := radius_mm * radius_mm - ((z - zp) * spacing[0]) ** 2) >= 0}
        # decided on coarse blocks first (exact bounds, _coarse_bounds): a plane whose every block is
        # surely in or surely out needs no transform (labels scattered over the image: nearly all in)
        sure, maybe = np.zeros(_blocks(shape2), bool), np.zeros(_blocks(shape2), bool)
        for zp, t in limits.items():
            if zp not in coarse:
                coarse[zp] = _coarse_distance(fg[zp, rows, cols], spacing[1:])
            sure |= coarse[zp] + _HALF_DIAG_FACTOR * _half_diag(spacing[1:]) <= t - _MARGIN_MM
            maybe |= coarse[zp] - _HALF_DIAG_FACTOR * _half_diag(spacing[1:]) <= t + _MARGIN_MM
        undecided = maybe & ~sure
        hit = _fine(sure, shape2)
        if undecided.mean() > WINDOWED_FRACTION:  # many undecided blocks: whole-plane transforms, kept
            exact = np.zeros(shape2, dtype=bool)  # for the next slices within reach
            for zp, t in limits.items():
                if zp not in planes:
                    planes[zp] = ndimage.distance_transform_edt(~fg[zp, rows, cols], sampling=spacing[1:])
                exact |= planes[zp] <= t
            hit |= exact & _fine(undecided, shape2)
        elif undecided.any():  # a few: transforms of windows around them only
            plane_rows, plane_cols = np.arange(lo[1], hi[1]), np.arange(lo[2], hi[2])
            for win in ndimage.find_objects(ndimage.label(undecided)[0]):
                box = _window(win, shape2, max(limits.values()), spacing[1:])
                exact = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
                for zp, t in limits.items():
                    plane = fg[zp, plane_rows[box[0]][:, None], plane_cols[box[1]][None, :]]
                    exact |= ndimage.distance_transform_edt(~plane, sampling=spacing[1:]) <= t
                sub = hit[box]
                sub |= exact & _fine(undecided, shape2)[box]
        out[z, rows, cols] = hit
        for zp in [zp for zp in planes if zp <= z - reach]:
            del planes[zp]
        for zp in [zp for zp in coarse if zp <= z - reach]:
            del coarse[zp]
    return out


BLOCK = 4
"""Voxels per side of the coarse in-plane blocks on which ``roi_mask`` decides what it can without
a fine distance transform."""
_HALF_DIAG_FACTOR = 2.0
_MARGIN_MM = 1e-6


WINDOWED_FRACTION = 0.05
"""Below this fraction of undecided blocks a plane's undecided voxels get transforms of windows
around them (the blocks padded by the radius: every foreground voxel within the radius of them
lies inside, so the test d <= r is exact there); above it, whole-plane transforms, kept for the
next slices within reach."""


def _window(win, shape2, radius_mm: float, spacing_yx) -> tuple[slice, slice]:
    """The voxels of coarse blocks ``win`` (slices on the block grid), padded by ``radius_mm``."""
    out = []
    for a in range(2):
        pad = int(math.ceil(radius_mm / spacing_yx[a])) + 1
        out.append(slice(max(win[a].start * BLOCK - pad, 0), min(win[a].stop * BLOCK + pad, shape2[a])))
    return tuple(out)


def _blocks(shape2) -> tuple[int, int]:
    return (-(-shape2[0] // BLOCK), -(-shape2[1] // BLOCK))


def _half_diag(spacing_yx) -> float:
    """The largest distance (mm) from a coarse block's centre to the centre of one of its voxels."""
    return math.hypot((BLOCK - 1) / 2 * spacing_yx[0], (BLOCK - 1) / 2 * spacing_yx[1])


def _coarse_distance(fg_plane: np.ndarray, spacing_yx) -> np.ndarray:
    """Distance (mm) from each coarse block's centre to the nearest centre of a block holding
    foreground. For a voxel v of block b and the plane's foreground F, the true distance d(v, F)
    lies within this ± 2 half-diagonals (``_half_diag``): triangle inequality through the two
    block centres. Blocks at the edge are padded (the padding holds no foreground)."""
    nb = _blocks(fg_plane.shape)
    pad = np.zeros((nb[0] * BLOCK, nb[1] * BLOCK), bool)
    pad[:fg_plane.shape[0], :fg_plane.shape[1]] = fg_plane
    has = pad.reshape(nb[0], BLOCK, nb[1], BLOCK).any(axis=(1, 3))
    if has.all():
        return np.zeros(nb)
    return ndimage.distance_transform_edt(~has, sampling=(BLOCK * spacing_yx[0], BLOCK * spacing_yx[1]))


def _fine(block_mask: np.ndarray, shape2) -> np.ndarray:
    """A coarse block mask on the plane's voxels."""
    return np.repeat(np.repeat(block_mask, BLOCK, axis=0), BLOCK, axis=1)[:shape2[0], :shape2[1]]


def _check_rule(rule: str) -> None:
    if rule not in ROI_RULES:
        raise InputError(f"unknown ROI rule {rule!r}; choose one of {', '.join(ROI_RULES)}")


def _check_spacing(spacing_zyx) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(s) for s in spacing_zyx)
    except TypeError as exc:
        raise InputError(f"spacing must be three numbers (z, y, x) in mm, got {spacing_zyx!r}") from exc
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be three positive finite numbers (z, y, x) in mm, got {spacing_zyx!r}")
    return spacing
