"""Conformal flags and organ margins for contour deviations beyond a tolerance t in mm
(docs/METHODS.md "Contour-level guarantees"; the errors are ``metrics.contour``).

The same conformal risk control as ``calibration.conformal`` (Angelopoulos et al., ICLR 2024,
Theorem 1, B = 1, the case as the exchangeable unit: E[L_test(λ̂)] ≤ α), with the error a planner
recognises instead of every voxel of prediction ≠ reference:

- **flags** of a map (score s, higher = more uncertain), flagged set {s ≥ c} in the ROI: the loss of
  a case is the fraction of its ROI contour-error voxels (∪_k FN_t(k) ∪ FP_t(k)) with s < c —
  ``conformal.flag_threshold`` on those voxels' scores.
- **outer margin** of class k, {p_k ≥ λ} ∪ P_k: loss = fraction of FN_t(k) (organ missed by more
  than t) outside it, i.e. with p_k < λ (FN_t(k) lies outside P_k); monotone, the largest grid λ
  meeting the bound is taken.
- **inner margin** of class k, {p_k > λ} ∩ P_k, λ ≥ 0.5: loss = fraction of FP_t(k) (prediction
  beyond the organ by more than t, ⊆ P_k) that the inner contour still contains (p_k > λ);
  non-increasing in λ, so no envelope is needed (unlike the voxel inner margin's FDP); the
  smallest grid λ ≥ 0.5 meeting the bound is taken.

So, in expectation over cases, the outer contour holds ≥ 1 − α of the organ's far misses and the
band between inner and prediction holds ≥ 1 − α of its far over-segmentation: the band between
inner and outer is where the contour deviations beyond t are. A class that has no such error in a
case contributes loss 0 for that case.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .conformal import ALPHA_GRID, INNER_MIN, PROB_GRID, check_alpha, crc_bound, flag_threshold, min_cases


def contour_margin_losses(prob_k, fn_far_k, fp_far_k, grid=PROB_GRID) -> dict:
    """Per-case loss curves of one class on ``grid``: {"outer_miss", "inner_cover", "n_fn", "n_fp"}."""
    p = np.asarray(prob_k, dtype=np.float32)
    return contour_margin_losses_at(p[np.asarray(fn_far_k, dtype=bool)], p[np.asarray(fp_far_k, dtype=bool)], grid)


def contour_margin_losses_at(p_fn, p_fp, grid=PROB_GRID) -> dict:
    """``contour_margin_losses`` from the class probability at the far false negatives (``p_fn``)
    and the far false positives (``p_fp``) alone, in any order."""
    g = np.asarray(grid, dtype=np.float64)
    p_fn = np.asarray(p_fn, dtype=np.float32)
    p_fp = np.asarray(p_fp, dtype=np.float32)
    n_fn, n_fp = int(p_fn.size), int(p_fp.size)
    outer = (np.searchsorted(np.sort(p_fn.astype(np.float64)), g, side="left") / n_fn) if n_fn else np.zeros(g.size)
    if n_fp:
        vals = np.sort(p_fp.astype(np.float64))
        inner = (vals.size - np.searchsorted(vals, g, side="right")) / n_fp  # fraction with p > λ
    else:
        inner = np.zeros(g.size)
    return {"outer_miss": outer, "inner_cover": inner, "n_fn": n_fn, "n_fp": n_fp}


def contour_margin_thresholds(curves: list, alpha: float, grid=PROB_GRID) -> dict:
    """Outer and inner thresholds of one class from its per-case ``contour_margin_losses``."""
    a = check_alpha(alpha)
    n = len(curves)
    if n == 0:
        raise InputError("contour margins need at least one calibration case")
    g = np.asarray(grid, dtype=np.float64)
    outer = np.mean([c["outer_miss"] for c in curves], axis=0)
    inner = np.mean([c["inner_cover"] for c in curves], axis=0)
    ok_o = (n * outer + 1.0) / (n + 1) <= a + 1e-12
    ok_i = ((n * inner + 1.0) / (n + 1) <= a + 1e-12) & (g >= INNER_MIN)
    jo = int(np.flatnonzero(ok_o)[-1]) if ok_o.any() else None
    ji = int(np.flatnonzero(ok_i)[0]) if ok_i.any() else None
    return {"alpha": a, "n_cases": n, "trivial": jo is None or ji is None,
            "outer": float(g[jo]) if jo is not None else 0.0,
            "outer_mean_miss": float(outer[jo]) if jo is not None else 0.0,
            "outer_bound": crc_bound(outer[jo] if jo is not None else 0.0, n),
            "inner": float(g[ji]) if ji is not None else 1.0,
            "inner_mean_cover": float(inner[ji]) if ji is not None else 0.0,
            "inner_bound": crc_bound(inner[ji] if ji is not None else 0.0, n)}


def build_contour_record(alpha: float, tolerance_mm: float, flag_scores: dict, margin_curves: dict,
                         alphas=ALPHA_GRID) -> dict:
    """The ``conformal["contour"]`` record: {"tolerance_mm", "alphas", "n_cases", "min_cases",
    "flags": {map: {α: flag_threshold}}, "margins": {class: {α: thresholds}}}."""
    a = check_alpha(alpha)
    levels = sorted({a, *[check_alpha(x) for x in alphas]})
    n = len(next(iter(flag_scores.values()))) if flag_scores else (
        len(next(iter(margin_curves.values()))) if margin_curves else 0)
    return {"tolerance_mm": float(tolerance_mm), "alphas": levels, "n_cases": n, "min_cases": min_cases(a),
            "error": "contour deviations beyond the tolerance (metrics.contour)",
            "flags": {m: {f"{x:g}": flag_threshold(s, x) for x in levels} for m, s in flag_scores.items()},
            "margins": {c: {f"{x:g}": contour_margin_thresholds(cv, x) for x in levels}
                        for c, cv in margin_curves.items()}}


def guarantee_text(alpha: float, what: str, tolerance_mm: float) -> str:
    pct = f"{100 * (1 - float(alpha)):.0f} %"
    t = f"{float(tolerance_mm):g} mm"
    if what == "flags":
        return f"flags cover ≥ {pct} of the contour deviations beyond {t} in expectation"
    if what == "outer":
        return f"outer contour holds ≥ {pct} of the organ missed by more than {t} in expectation"
    return f"inner contour excludes ≥ {pct} of the prediction beyond the organ by more than {t} in expectation"
