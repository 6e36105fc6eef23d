"""Uncertainty as an error detector: error mask, UEO, recall/precision, AUROC, budget curve and
boundary split (METHODS.md §4).

- Error mask E = (prediction ≠ reference) ∩ ROI.
- Flagged set F(τ) = {U > τ} ∩ ROI (strictly greater).
- UEO(τ) = Dice(F(τ), E) = 2|F∩E| / (|F| + |E|); 1.0 when both are empty (the Dice convention
  of METHODS §3). Error recall = |F∩E| / |E|, error precision = |F∩E| / |F| (None when the
  denominator is 0).
- Voxel AUROC of U for E inside the ROI: the Mann–Whitney statistic
  (R_E − n_E(n_E + 1)/2) / (n_E · n_¬E), R_E the sum of the ranks of the error voxels among all
  ROI voxels ranked by U, tied values sharing their average rank. One sort, O(N log N); None
  when the ROI holds only errors or no error.
- Budget curve: UEO when flagging the n_k = max(1, round(k · N)) most uncertain ROI voxels,
  for k on a grid in (0, k_max], default k_max = 5 % and 50 points k_i = i·k_max/50. Voxels
  tied at the cut are shared in expectation (each tied voxel counts as the group's error
  fraction), so the curve does not depend on voxel order. Normalised area = trapezoid area
  under UEO(k) from (0, 0) to k_max, divided by k_max (range 0..1); the same area for an oracle
  that flags errors first is reported next to it.
- Boundary split: the *contour zone* is the set of voxels whose 3×3×3 neighbourhood (the voxel
  and its 26 neighbours) contains a different predicted label, i.e. the voxels on either side of
  any predicted interface (foreground/background and between classes), a shell about one voxel
  thick on each side. Errors in the contour zone are "within 1 voxel of the predicted contour";
  the others are non-boundary errors. Error recall at τ is reported separately for the two
  groups. The image border does not count as a contour (edge voxels are compared only with
  neighbours inside the image).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._inputs import as_bool, finite_number, flat_mask, same_grid
from .dice import dice_from_counts

BUDGET_MAX_FRACTION = 0.05
BUDGET_POINTS = 50


def error_mask(pred, ref, roi=None) -> np.ndarray:
    """E = (pred ≠ ref) ∩ roi as a boolean volume (roi None: the whole image)."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    same_grid("prediction", pred, "reference", ref)
    e = pred != ref
    if roi is not None:
        roi = as_bool(roi, "ROI")
        same_grid("prediction", pred, "ROI", roi)
        e &= roi
    return e


def _in_roi(u, errors, roi) -> tuple[np.ndarray, np.ndarray]:
    """Flat (U, E) inside the ROI, validated."""
    u = np.asarray(u)
    errors = as_bool(errors, "error mask")
    same_grid("uncertainty map", u, "error mask", errors)
    if not np.issubdtype(u.dtype, np.number) or np.issubdtype(u.dtype, np.complexfloating):
        raise InputError(f"uncertainty map must be real-valued, got dtype {u.dtype}")
    m = flat_mask(roi, u.shape, "ROI")
    uf, ef = u.reshape(-1), errors.reshape(-1)
    if m is not None:
        uf, ef = uf[m], ef[m]
    if uf.size and not np.all(np.isfinite(uf)):
        raise InputError("uncertainty map contains NaN or infinite values inside the ROI")
    return uf, ef


def detection_at_threshold(u, errors, tau: float, roi=None) -> dict:
    """UEO, error recall and error precision of F = {U > τ} ∩ ROI against E ∩ ROI (τ finite)."""
    tau = finite_number(tau, "threshold tau")
    uf, ef = _in_roi(u, errors, roi)
    flagged = uf > tau
    n_f, n_e = int(np.count_nonzero(flagged)), int(np.count_nonzero(ef))
    tp = int(np.count_nonzero(flagged & ef))
    return {"tau": float(tau), "ueo": dice_from_counts(tp, n_f, n_e),
            "recall": tp / n_e if n_e else None, "precision": tp / n_f if n_f else None,
            "n_flagged": n_f, "n_errors": n_e, "n_true_positive": tp, "n_roi": int(uf.size)}


def ueo(u, errors, tau: float, roi=None) -> float:
    """UEO(τ) = Dice({U > τ} ∩ ROI, E ∩ ROI); 1.0 when both sets are empty."""
    return detection_at_threshold(u, errors, tau, roi)["ueo"]


def voxel_auroc(u, errors, roi=None) -> float | None:
    """Rank-based AUROC of U for E inside the ROI, ties averaged (module docstring)."""
    uf, ef = _in_roi(u, errors, roi)
    n = uf.size
    n_pos = int(np.count_nonzero(ef))
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(uf, kind="stable")
    s = uf[order]
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    ends = np.append(starts[1:], n)
    avg_rank = (starts + 1 + ends) / 2.0  # ranks are 1-based: positions starts+1 .. ends
    pos_per_group = np.add.reduceat(ef[order].astype(np.int64), starts)
    r_pos = float(np.dot(avg_rank, pos_per_group))
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _descending_groups(uf: np.ndarray, ef: np.ndarray):
    """Sort by U descending; return tie-group starts/ends and cumulative errors at group starts."""
    order = np.argsort(-uf.astype(np.float64), kind="stable")
    s = uf[order]
    e = ef[order].astype(np.int64)
    n = s.size
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    ends = np.append(starts[1:], n)
    errs = np.add.reduceat(e, starts) if n else np.zeros(0, np.int64)
    cum_before = np.concatenate(([0], np.cumsum(errs)[:-1]))
    return starts, ends, errs, cum_before


def expected_true_positives(uf: np.ndarray, ef: np.ndarray, n_flag: np.ndarray) -> np.ndarray:
    """Expected |F ∩ E| when flagging the ``n_flag`` largest U values, ties shared in expectation."""
    starts, ends, errs, cum_before = _descending_groups(uf, ef)
    n_flag = np.asarray(n_flag, dtype=np.int64)
    g = np.searchsorted(starts, n_flag, side="left") - 1  # group holding position n_flag - 1
    g = np.clip(g, 0, len(starts) - 1)
    take = n_flag - starts[g]
    return cum_before[g] + take * errs[g] / (ends[g] - starts[g])


def budget_curve(u, errors, roi=None, fractions=None, max_fraction: float = BUDGET_MAX_FRACTION,
                 n_points: int = BUDGET_POINTS) -> dict:
    """UEO when flagging the top k of ROI voxels by U, k in (0, max_fraction] (module docstring).

    Returns ``{"fractions", "n_flagged", "ueo", "normalised_area", "oracle_ueo",
    "oracle_normalised_area", "n_roi", "n_errors"}`` (lists, JSON-ready).
    """
    uf, ef = _in_roi(u, errors, roi)
    if uf.size == 0:
        raise InputError("budget curve needs a non-empty ROI")
    if fractions is None:
        if not 0 < max_fraction <= 1 or n_points < 1:
            raise InputError("max_fraction must lie in (0, 1] and n_points be >= 1")
        fractions = max_fraction * np.arange(1, n_points + 1) / n_points
    fractions = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if fractions.size == 0 or not np.all(np.isfinite(fractions)) or fractions.min() <= 0 or fractions.max() > 1 or np.any(np.diff(fractions) <= 0):
        raise InputError("budget fractions must be increasing values in (0, 1]")
    n = uf.size
    n_e = int(np.count_nonzero(ef))
    n_flag = np.maximum(1, np.rint(fractions * n).astype(np.int64))
    tp = expected_true_positives(uf, ef, n_flag)
    curve = 2.0 * tp / (n_flag + n_e)
    oracle = 2.0 * np.minimum(n_flag, n_e) / (n_flag + n_e)

    def area(y):
        return float(np.trapezoid(np.concatenate(([0.0], y)), np.concatenate(([0.0], fractions))) / fractions[-1])

    return {"fractions": fractions.tolist(), "n_flagged": n_flag.tolist(), "ueo": curve.tolist(),
            "normalised_area": area(curve), "oracle_ueo": oracle.tolist(),
            "oracle_normalised_area": area(oracle), "n_roi": int(n), "n_errors": n_e}


def contour_zone(pred) -> np.ndarray:
    """Voxels whose 3×3×3 neighbourhood holds a different predicted label (module docstring)."""
    from scipy import ndimage

    pred = np.asarray(pred)
    if pred.ndim != 3:
        raise InputError(f"predicted label map must be 3-D (z, y, x), got shape {pred.shape}")
    hi = ndimage.maximum_filter(pred, size=3, mode="nearest")
    lo = ndimage.minimum_filter(pred, size=3, mode="nearest")
    return hi != lo


def boundary_split(u, pred, errors, tau: float, roi=None) -> dict:
    """Error recall at τ for errors in the contour zone ("boundary") and for the rest ("non_boundary").

    Each part: ``{"n_errors", "n_detected", "recall"}`` (recall None without errors), plus
    ``"boundary_error_fraction"`` = share of the ROI errors that lie in the contour zone.
    """
    u = np.asarray(u)
    errors = as_bool(errors, "error mask")
    same_grid("uncertainty map", u, "predicted labels", pred)
    same_grid("uncertainty map", u, "error mask", errors)
    zone = contour_zone(pred)
    if roi is not None:
        roi = as_bool(roi, "ROI")
        same_grid("uncertainty map", u, "ROI", roi)
    err = errors if roi is None else errors & roi
    detected = err & (u > finite_number(tau, "threshold tau"))
    out = {}
    for name, sel in (("boundary", zone), ("non_boundary", ~zone)):
        n_e = int(np.count_nonzero(err & sel))
        n_d = int(np.count_nonzero(detected & sel))
        out[name] = {"n_errors": n_e, "n_detected": n_d, "recall": n_d / n_e if n_e else None}
    total = out["boundary"]["n_errors"] + out["non_boundary"]["n_errors"]
    out["boundary_error_fraction"] = out["boundary"]["n_errors"] / total if total else None
    return out


def error_detection_report(u, pred, ref, tau: float, roi=None, fractions=None) -> dict:
    """Everything METHODS §4 reports for one map and one case at threshold τ.

    ``{"at_tau": detection_at_threshold, "auroc", "budget": budget_curve, "boundary_split"}``.
    """
    e = error_mask(pred, ref, roi)
    return {"at_tau": detection_at_threshold(u, e, tau, roi), "auroc": voxel_auroc(u, e, roi),
            "budget": budget_curve(u, e, roi, fractions=fractions),
            "boundary_split": boundary_split(u, pred, e, tau, roi)}
