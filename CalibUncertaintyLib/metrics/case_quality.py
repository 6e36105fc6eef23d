"""Case-level quality: per-case uncertainty aggregates, their correlation with Dice and the
risk–coverage AURC (METHODS.md §6).

Aggregates of one case (all "higher = more doubtful"):

- ``mean_u_roi``: mean of U over the ROI voxels;
- ``sum_u_fg``: Σ U over the predicted foreground voxels × voxel volume (U·mm³; equals the plain
  voxel sum with the default voxel volume 1);
- ``largest_region_mm3``: the largest error-region volume (the regions module supplies the
  list of region volumes; 0 when there is none);
- ``fraction_fg_flagged``: |{U > τ} ∩ predicted foreground| / |predicted foreground|
  (None when nothing is predicted).

Correlation with Dice across cases: Pearson r and Spearman ρ (scipy), None when fewer than 3
cases or either side is constant. A useful aggregate correlates *negatively* with Dice.

Risk–coverage: risk = 1 − Dice. Cases are ranked by the aggregate (lowest = most trusted
first); at coverage k/n the k most trusted cases are kept and the risk is their mean risk.
AURC = (1/n) Σ_{k=1..n} risk(k). Cases with tied aggregates are ordered at random in
expectation: since risk(k) is linear in the kept risks, each member of a tie group
contributes the group's mean risk. The oracle (ranking by true risk) gives the minimum
``aurc_optimal``; ``e_aurc = aurc − aurc_optimal`` ≥ 0.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from ._inputs import as_bool, finite_number, same_grid

AGGREGATES = ("mean_u_roi", "sum_u_fg", "largest_region_mm3", "fraction_fg_flagged")


def case_aggregates(u, roi, pred_fg, tau: float, region_volumes_mm3=(), voxel_volume_mm3: float = 1.0) -> dict:
    """The four aggregates of one case (module docstring); ``roi``/``pred_fg`` boolean volumes."""
    tau = finite_number(tau, "threshold tau")
    u = np.asarray(u, dtype=np.float64)
    roi = as_bool(roi, "ROI")
    pred_fg = as_bool(pred_fg, "predicted foreground")
    same_grid("uncertainty map", u, "ROI", roi)
    same_grid("uncertainty map", u, "predicted foreground", pred_fg)
    if not np.all(np.isfinite(u)):
        raise InputError("uncertainty map contains NaN or infinite values")
    n_roi, n_fg = int(roi.sum()), int(pred_fg.sum())
    vols = [float(v) for v in region_volumes_mm3]
    if any(v < 0 for v in vols):
        raise InputError("region volumes must be non-negative (mm³)")
    return {
        "mean_u_roi": float(u[roi].mean()) if n_roi else None,
        "sum_u_fg": float(u[pred_fg].sum() * voxel_volume_mm3),
        "largest_region_mm3": max(vols) if vols else 0.0,
        "fraction_fg_flagged": float(np.count_nonzero(u[pred_fg] > tau) / n_fg) if n_fg else None,
    }


def _pairs(values, dice) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=object)
    y = np.asarray(dice, dtype=object)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"need one aggregate and one Dice per case, got {x.shape} and {y.shape}")
    keep = np.array([a is not None and b is not None for a, b in zip(x, y)], dtype=bool)
    return x[keep].astype(np.float64), y[keep].astype(np.float64)


def correlations(values, dice) -> dict:
    """Pearson and Spearman correlation of an aggregate with Dice across cases (None entries dropped)."""
    from scipy import stats

    x, y = _pairs(values, dice)
    out = {"n": int(x.size), "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    out.update(pearson=float(pr.statistic), pearson_p=float(pr.pvalue),
               spearman=float(sr.statistic), spearman_p=float(sr.pvalue))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def risk_coverage(values, dice) -> dict:
    """Risk–coverage curve and AURC, ranking cases by ``values`` (low = kept first; module docstring).

    Returns ``{"coverage", "risk", "aurc", "aurc_optimal", "e_aurc", "n"}``.
    """
    x, y = _pairs(values, dice)
    if x.size == 0:
        raise InputError("risk-coverage needs at least one case with both an aggregate and a Dice")
    risk = 1.0 - y

    def curve(score, r):
        order = np.argsort(score, kind="stable")
        s, rr = score[order], r[order]
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        sizes = np.diff(np.append(starts, s.size))
        group_mean = np.add.reduceat(rr, starts) / sizes
        rr = np.repeat(group_mean, sizes)
        k = np.arange(1, s.size + 1)
        return np.cumsum(rr) / k

    rc = curve(x, risk)
    opt = curve(risk, risk)
    n = x.size
    aurc, aurc_opt = float(rc.mean()), float(opt.mean())
    return {"coverage": (np.arange(1, n + 1) / n).tolist(), "risk": rc.tolist(), "aurc": aurc,
            "aurc_optimal": aurc_opt, "e_aurc": aurc - aurc_opt, "n": int(n)}


def case_quality_summary(aggregates_per_case: list[dict], dice_per_case) -> dict:
    """For each aggregate in AGGREGATES present in the cases: correlations with Dice and AURC."""
    if len(aggregates_per_case) != len(dice_per_case):
        raise InputError(f"{len(aggregates_per_case)} cases of aggregates but {len(dice_per_case)} Dice values")
    out = {}
    for name in AGGREGATES:
        if not all(name in a for a in aggregates_per_case):
            continue
        vals = [a[name] for a in aggregates_per_case]
        x, _ = _pairs(vals, dice_per_case)
        out[name] = {**correlations(vals, dice_per_case),
                     "risk_coverage": risk_coverage(vals, dice_per_case) if x.size else None}
    return out


def review_order(per_case: list[dict]) -> list[dict]:
    """The per-case records in review priority: cases with no ROI (nothing predicted) first, then by
    the regions map's mean uncertainty in the ROI (case-level aggregate ``mean_u_roi``), highest
    first; ties keep the input order."""
    def key(rec):
        q = rec.get("quality")
        u = q.get("mean_u_roi") if q else None
        return (0, 0.0) if u is None else (1, -float(u))

    return sorted(per_case, key=key)
