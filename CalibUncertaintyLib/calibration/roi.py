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
    a few planes whatever the volume.
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
    for z in range(lo[0], hi[0]):
        near = [zp for zp in range(max(z - reach, 0), min(z + reach + 1, pred.shape[0])) if has_fg[zp]]
        for zp in near:
            if zp not in planes:
                planes[zp] = ndimage.distance_transform_edt(~fg[zp, rows, cols], sampling=spacing[1:])
        hit = np.zeros((hi[1] - lo[1], hi[2] - lo[2]), dtype=bool)
        for zp in near:
            left = radius_mm * radius_mm - ((z - zp) * spacing[0]) ** 2
            if left >= 0:
                hit |= planes[zp] <= math.sqrt(left)
        out[z, rows, cols] = hit
        for zp in [zp for zp in planes if zp <= z - reach]:
            del planes[zp]
    return out


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
