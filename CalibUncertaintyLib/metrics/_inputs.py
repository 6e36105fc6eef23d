"""Input checks shared by the metric modules: probability volumes, label maps, masks, flat arrays.

Every metric accepts either class probabilities ``(K, z, y, x)`` (or any ``(K, ...)``) with an
integer label map ``(z, y, x)`` and an optional boolean mask of the same shape (the voxels to
evaluate, e.g. the ROI), or flat 1-D arrays. These helpers turn both into flat arrays and raise
``InputError`` with a specific message when the input cannot mean what the caller intended.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

#: Tolerance on probabilities: values may exceed [0, 1] or sum to 1 by this much (float32 rounding).
PROB_TOL = 1e-3


def finite_number(value, name: str, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """``value`` as a float, or InputError when it is not a finite number in [low, high]
    (``low_open``: (low, high]). A NaN parameter would otherwise make every comparison false
    and a metric quietly report 'nothing flagged'."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise InputError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {v:g}")
    if high is not None and v > high:
        raise InputError(f"{name} must be <= {high:g}, got {v:g}")
    return v


def flat_mask(mask, shape, name: str = "mask") -> np.ndarray | None:
    """Boolean mask of ``shape`` (or None), flattened; raises InputError on a shape mismatch."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise InputError(f"{name} has shape {mask.shape} but the data have shape {tuple(shape)}; "
                         "pass a mask on the same voxel grid")
    return as_bool(mask, name).reshape(-1)


def probs_and_labels(probs, labels, mask=None, check_sum: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``probs (K, ...)`` and ``labels (...)`` and return ``(P (K, N), y (N,))`` inside ``mask``.

    Labels must be integers in ``[0, K)``; probabilities finite, within ``[0, 1]`` and (if
    ``check_sum``) summing to 1 over the class axis within ``PROB_TOL``. An empty selection
    raises InputError, because every metric here is a mean over voxels.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != labels.ndim + 1:
        raise InputError(f"probabilities must be (K, ...) with one more axis than the labels; got "
                         f"probabilities {probs.shape} and labels {labels.shape}")
    if probs.shape[1:] != labels.shape:
        raise InputError(f"probabilities {probs.shape} and labels {labels.shape} are not on the same "
                         "voxel grid (compare the shapes after the class axis)")
    k = probs.shape[0]
    if k < 2:
        raise InputError(f"need at least 2 classes (background + one structure), got K={k}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise InputError(f"probabilities must be floating point, got dtype {probs.dtype}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise InputError(f"labels must be integers (class indices), got dtype {labels.dtype}")
    m = flat_mask(mask, labels.shape)
    p = probs.reshape(k, -1)
    y = labels.reshape(-1)
    if m is not None:
        p = p[:, m]
        y = y[m]
    if y.size == 0:
        raise InputError("no voxels to evaluate: the mask (ROI) is empty")
    y = y.astype(np.int64, copy=False)
    if y.min() < 0 or y.max() >= k:
        raise InputError(f"labels must lie in [0, {k - 1}] for K={k} probability channels; found "
                         f"values {int(y.min())}..{int(y.max())}")
    check_probability_values(p, "probabilities")
    if check_sum:
        s = p.sum(axis=0, dtype=np.float64)
        worst = float(np.max(np.abs(s - 1.0)))
        if worst > PROB_TOL:
            raise InputError(f"probabilities must sum to 1 over the class axis; the worst voxel sums to "
                             f"{float(s[np.argmax(np.abs(s - 1.0))]):.6f}. Pass softmax outputs, not logits")
    return p, y


def check_probability_values(p: np.ndarray, name: str) -> None:
    """Raise InputError unless every value is finite and within ``[-PROB_TOL, 1 + PROB_TOL]``."""
    if p.size == 0:
        return
    if not np.all(np.isfinite(p)):
        raise InputError(f"{name} contain NaN or infinite values")
    lo, hi = float(p.min()), float(p.max())
    if lo < -PROB_TOL or hi > 1.0 + PROB_TOL:
        raise InputError(f"{name} must lie in [0, 1]; found {lo:.6g}..{hi:.6g}")


def flat_confidence(conf, correct, name: str = "confidence") -> tuple[np.ndarray, np.ndarray]:
    """Validate flat ``conf`` (probabilities in [0, 1]) and ``correct`` (0/1 or soft labels in [0, 1]).

    Returns float64 copies, ``conf`` clipped to exactly ``[0, 1]`` (float32 rounding can put a
    maximum at 1.0000001). Any shape is accepted and flattened; the two must have the same size.
    """
    conf = np.asarray(conf)
    correct = np.asarray(correct)
    if conf.shape != correct.shape:
        raise InputError(f"{name} {conf.shape} and correctness {correct.shape} must have the same shape")
    conf = conf.reshape(-1).astype(np.float64)
    correct = correct.reshape(-1).astype(np.float64)
    if conf.size == 0:
        raise InputError(f"no voxels to evaluate: {name} is empty")
    check_probability_values(conf, name)
    check_probability_values(correct, "correctness (or soft labels)")
    np.clip(conf, 0.0, 1.0, out=conf)
    np.clip(correct, 0.0, 1.0, out=correct)
    return conf, correct


def same_grid(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    """Raise InputError unless ``a`` and ``b`` have the same shape."""
    if np.shape(a) != np.shape(b):
        raise InputError(f"{name_a} {np.shape(a)} and {name_b} {np.shape(b)} are not on the same voxel grid")


def as_bool(a, name: str) -> np.ndarray:
    """Boolean view of a mask given as bool or as 0/1 numbers; raises InputError for other values."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise InputError(f"{name} must be a binary mask (bool or 0/1), got dtype {a.dtype}")
    if a.size and not np.all((a == 0) | (a == 1)):
        raise InputError(f"{name} must be a binary mask (bool or 0/1), found values {a.min()}..{a.max()}")
    return a != 0
