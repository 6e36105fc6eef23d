"""Dice overlap per foreground class (METHODS.md §3).

Dice(A, B) = 2 |A ∩ B| / (|A| + |B|). When both A and B are empty the overlap is undefined;
METHODS fixes it to 1.0 and every result carries the flags ``empty_reference`` and
``empty_prediction`` so a table can show (or exclude) those cases.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._inputs import as_bool, flat_mask, same_grid


def dice_from_counts(intersection: int, size_a: int, size_b: int) -> float:
    """2·|A∩B| / (|A| + |B|), and 1.0 when both sets are empty (METHODS §3)."""
    denom = size_a + size_b
    return 1.0 if denom == 0 else 2.0 * intersection / denom


def dice_masks(pred, ref, mask=None) -> dict:
    """Dice of two binary masks (inside ``mask`` if given).

    Returns ``{"dice", "empty_reference", "empty_prediction", "n_pred", "n_ref", "n_intersection"}``;
    ``dice`` is 1.0 with both flags set when both masks are empty.
    """
    pred = as_bool(pred, "prediction mask")
    ref = as_bool(ref, "reference mask")
    same_grid("prediction", pred, "reference", ref)
    m = flat_mask(mask, pred.shape)
    a, b = pred.reshape(-1), ref.reshape(-1)
    if m is not None:
        a, b = a[m], b[m]
    n_a, n_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    inter = int(np.count_nonzero(a & b))
    return {"dice": dice_from_counts(inter, n_a, n_b), "empty_reference": n_b == 0,
            "empty_prediction": n_a == 0, "n_pred": n_a, "n_ref": n_b, "n_intersection": inter}


def confusion_counts(pred, ref, n_classes: int, mask=None) -> np.ndarray:
    """(n_classes, n_classes) voxel counts, row = predicted class, column = reference class."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    same_grid("prediction", pred, "reference", ref)
    for name, a in (("prediction", pred), ("reference", ref)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise InputError(f"{name} label map must hold integer class indices, got dtype {a.dtype}")
    m = flat_mask(mask, pred.shape)
    a, b = pred.reshape(-1), ref.reshape(-1)
    if m is not None:
        a, b = a[m], b[m]
    a = a.astype(np.int64, copy=False)
    b = b.astype(np.int64, copy=False)
    for name, v in (("prediction", a), ("reference", b)):
        if v.size and (v.min() < 0 or v.max() >= n_classes):
            raise InputError(f"{name} labels must lie in [0, {n_classes - 1}], found {int(v.min())}..{int(v.max())}")
    return np.bincount(a * n_classes + b, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def dice_per_class(pred, ref, n_classes: int | None = None, mask=None) -> dict[int, dict]:
    """Dice of every foreground class 1..K-1 between two label maps (METHODS §3).

    ``n_classes`` defaults to 1 + the largest label found in either map. Returns
    ``{class_index: {"dice", "empty_reference", "empty_prediction", "n_pred", "n_ref"}}``;
    empty-vs-empty gives dice 1.0 with both flags True. One pass over the voxels (bincount).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if n_classes is None:
        hi = max(int(pred.max()) if pred.size else 0, int(ref.max()) if ref.size else 0)
        n_classes = max(hi + 1, 2)
    cm = confusion_counts(pred, ref, n_classes, mask)
    out = {}
    for c in range(1, n_classes):
        n_p, n_r, inter = int(cm[c, :].sum()), int(cm[:, c].sum()), int(cm[c, c])
        out[c] = {"dice": dice_from_counts(inter, n_p, n_r), "empty_reference": n_r == 0,
                  "empty_prediction": n_p == 0, "n_pred": n_p, "n_ref": n_r}
    return out


def mean_dice(per_class: dict[int, dict], exclude_empty_reference: bool = False) -> float | None:
    """Mean of ``dice_per_class`` values; optionally leave out classes absent from the reference.

    Returns None when nothing is left to average.
    """
    vals = [r["dice"] for r in per_class.values()
            if not (exclude_empty_reference and r["empty_reference"])]
    return float(np.mean(vals)) if vals else None
