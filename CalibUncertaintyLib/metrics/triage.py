"""Case triage: a review priority per case from its case-level aggregates (METHODS.md §6), the
risk–coverage curve of that priority on held-out cases, and the correlations of every aggregate
with the case's Dice.

- Priority: one named aggregate (``PRIORITIES``; default ``DEFAULT_PRIORITY`` = ``fraction_fg_flagged``,
  the fraction of the predicted foreground the regions map flags at τ*); higher = review first. A case whose aggregate is undefined
  (nothing predicted: empty ROI / no foreground; or no CT for a body aggregate) gets priority +∞:
  it is reviewed first. Ties keep the input order in the ranking.
- Rank: 1 = the first case to review.
- Risk of a case: 1 − its mean Dice over the foreground classes (``RISK``).
- Risk–coverage: coverage = fraction of cases accepted *without* review, taken lowest priority
  first; the risk at coverage k/n is the mean risk of the k accepted cases; AURC = the mean of the
  n points (``case_quality.risk_coverage``: ties count at their group's mean risk; the oracle
  ranks by the true risk; e-AURC = AURC − oracle AURC ≥ 0). Undefined aggregates count as +∞
  here too (never accepted before a defined case).
- Correlations: Pearson r and Spearman ρ of each aggregate with the mean Dice (``case_quality.
  correlations``; cases with an undefined aggregate left out). A useful aggregate correlates negatively.
"""

from __future__ import annotations

import math

from ..errors import InputError
from .atypicality import ATYPICALITY_AGGREGATES
from .case_quality import AGGREGATES, correlations, risk_coverage

PRIORITIES = (*AGGREGATES, *ATYPICALITY_AGGREGATES)
#: chosen on the stock OpenKBP model's held-out cases (bench/results/triage_openkbp_stock.md: the lowest
#: AURC, 0.533 against mean_u_roi's 0.543, and the abdominal CT reviewed first in every split, where
#: mean_u_roi put it 14th of 16)
DEFAULT_PRIORITY = "fraction_fg_flagged"
RISK = "1 - mean Dice over the foreground classes"


def check_priority(name: str) -> str:
    if name not in PRIORITIES:
        raise InputError(f"unknown review priority {name!r}; choose from {', '.join(PRIORITIES)}")
    return name


def priority_value(aggregates: dict | None, name: str) -> float:
    """The case's priority under aggregate ``name``: its value, +inf when undefined (review first)."""
    v = (aggregates or {}).get(name)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.inf
    return float(v)


def rank_cases(case_ids, aggregates_per_case, name: str = DEFAULT_PRIORITY) -> list[dict]:
    """``[{"rank", "case", "priority", "undefined"}]`` in review order (rank 1 first; ties keep input order)."""
    check_priority(name)
    case_ids = list(case_ids)
    if len(case_ids) != len(aggregates_per_case):
        raise InputError(f"{len(case_ids)} case ids but {len(aggregates_per_case)} aggregate records")
    vals = [priority_value(a, name) for a in aggregates_per_case]
    order = sorted(range(len(vals)), key=lambda i: -vals[i])  # stable: ties keep the input order
    return [{"rank": r + 1, "case": case_ids[i], "priority": None if math.isinf(vals[i]) else vals[i],
             "undefined": math.isinf(vals[i])} for r, i in enumerate(order)]


def triage_summary(case_ids, aggregates_per_case, dice_per_case, priority: str = DEFAULT_PRIORITY) -> dict:
    """Ranking by ``priority``, and for every aggregate present: correlations with Dice and its
    risk–coverage curve (module docstring). JSON-ready."""
    check_priority(priority)
    if len(aggregates_per_case) != len(dice_per_case):
        raise InputError(f"{len(aggregates_per_case)} cases of aggregates but {len(dice_per_case)} Dice values")
    ranking = rank_cases(case_ids, aggregates_per_case, priority)
    dice_of = dict(zip(case_ids, dice_per_case))
    for row in ranking:
        d = dice_of[row["case"]]
        row["mean_dice"] = d
        row["risk"] = None if d is None else 1.0 - float(d)
    per_agg = {}
    for name in PRIORITIES:
        if not any(a and name in a for a in aggregates_per_case):
            continue
        raw = [(a or {}).get(name) for a in aggregates_per_case]
        pv = [priority_value(a, name) for a in aggregates_per_case]
        keep = [i for i, d in enumerate(dice_per_case) if d is not None]
        rc = risk_coverage([pv[i] for i in keep], [dice_per_case[i] for i in keep]) if keep else None
        per_agg[name] = {**correlations(raw, dice_per_case), "risk_coverage": rc,
                         "n_undefined": int(sum(v is None for v in raw))}
    known = [d for d in dice_per_case if d is not None]
    oracle = risk_coverage([1.0 - float(d) for d in known], known) if known else None
    return {"priority": priority, "risk": RISK, "ranking": ranking, "aggregates": per_agg, "oracle": oracle,
            "coverage_rule": "coverage = fraction of cases accepted without review, lowest priority first; "
                             "undefined aggregates count as +inf (reviewed first)"}


def curve_rows(summary: dict) -> list[dict]:
    """Long table of every aggregate's risk–coverage curve: aggregate, coverage, risk, oracle risk."""
    rows = []
    for name, v in summary["aggregates"].items():
        rc = v.get("risk_coverage")
        if not rc:
            continue
        for cov, r in zip(rc["coverage"], rc["risk"]):
            rows.append({"aggregate": name, "is_priority": name == summary["priority"], "coverage": cov, "risk": r})
    oracle = summary.get("oracle")
    for cov, r in zip(*(((oracle or {}).get(k) or []) for k in ("coverage", "risk"))):
        rows.append({"aggregate": "oracle (true risk)", "is_priority": False, "coverage": cov, "risk": r})
    return rows
