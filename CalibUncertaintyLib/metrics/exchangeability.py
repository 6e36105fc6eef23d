"""Is a case exchangeable with the calibration cases? (docs/METHODS.md "When a guarantee does not apply")

Every conformal guarantee of this project (flags, margins, per-organ intervals) assumes that the new
case is exchangeable with the calibration cases. This module tests that assumption per case with the
atypicality aggregates of ``metrics.atypicality`` (organ volume atypicality; with the CT, the
high-entropy and high-MI body fractions), whose values on the calibration cases the calibration file
keeps (``case_reference.scores``).

Combined conformal p-value (one test for several aggregates, valid whatever their dependence):
the bag is the n calibration cases plus the new case. For each aggregate j and each member m of
the bag, q_mj = #{l in the bag : v_lj ≥ v_mj} / (n + 1) (its upper-tail rank p-value within the
bag); the member's combined score is T_m = −Σ_j log q_mj (Fisher's form: large when extreme on
any aggregate, larger when on several). The case's p-value is

    p = #{m in the bag : T_m ≥ T_new} / (n + 1).

T is a symmetric function of the bag, so for an exchangeable case P(p ≤ δ) ≤ δ; with one aggregate
p equals that aggregate's own p-value (1 + #{r_i ≥ s}) / (n + 1). The case is declared **not
exchangeable** when p ≤ δ (``DEFAULT_DELTA`` = 0.1, stored with the conformal record): then every
guarantee shown for it is void. At most a fraction δ of exchangeable cases are voided by mistake.
The smallest p is 1/(n + 1), so with n < ⌈1/δ⌉ − 1 calibration cases (9 for δ = 0.1) the test cannot
reject anything: the result says ``testable: false``. A p above δ is no proof of exchangeability:
the aggregates see shifts that change the uncertainty or the organ volumes, not every shift.

Aggregates undefined for the case or missing for a calibration case are left out (listed).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_DELTA = 0.1


def min_cases(delta: float) -> int:
    """Fewest calibration cases with which p ≤ δ is possible (1/(n + 1) ≤ δ)."""
    return max(int(math.ceil(1.0 / float(delta) - 1.0 - 1e-12)), 1)


def combined_p_value(case_values: dict, reference_scores: dict) -> dict:
    """{"p_value", "aggregates" (used), "left_out", "n_cases"} (module docstring); p None when no
    aggregate can be used."""
    used, left_out, cols = [], [], []
    for name, ref in (reference_scores or {}).items():
        v = case_values.get(name)
        if v is None or ref is None or any(r is None for r in ref) or not ref:
            left_out.append(name)
            continue
        used.append(name)
        cols.append(np.append(np.asarray(ref, dtype=np.float64), float(v)))
    if not cols:
        return {"p_value": None, "aggregates": [], "left_out": left_out, "n_cases": 0}
    ns = {c.size for c in cols}
    if len(ns) != 1:
        left = [u for u, c in zip(used, cols) if c.size != max(ns)]
        keep = [(u, c) for u, c in zip(used, cols) if c.size == max(ns)]
        used, cols, left_out = [u for u, _ in keep], [c for _, c in keep], left_out + left
    v = np.stack(cols, axis=1)  # (n + 1, J), the new case last
    m = v.shape[0]
    q = (v[None, :, :] >= v[:, None, :]).sum(axis=1) / m  # q[l, j] = #{l' : v[l', j] >= v[l, j]} / m
    t = -np.log(q).sum(axis=1)
    p = float(np.count_nonzero(t >= t[-1] - 1e-12) / m)
    return {"p_value": p, "aggregates": used, "left_out": left_out, "n_cases": m - 1}


def case_exchangeability(case_values: dict, reference: dict | None, delta: float = DEFAULT_DELTA) -> dict | None:
    """summary.json's ``exchangeability`` block of a case from its atypicality aggregates
    (``case_aggregates``) and the calibration file's ``case_reference``; None without a reference."""
    if not reference or not reference.get("scores"):
        return None
    res = combined_p_value(case_values, reference["scores"])
    n, p = res["n_cases"], res["p_value"]
    testable = p is not None and n >= min_cases(delta)
    exch = None if p is None else (p > delta)
    out = {"p_value": p, "delta": float(delta), "exchangeable": exch, "testable": testable,
           "n_cases": n, "aggregates": res["aggregates"], "left_out": res["left_out"],
           "per_aggregate_p": {a: case_values.get(f"{a}_p") for a in res["aggregates"]},
           "min_cases": min_cases(delta)}
    out["text"] = exchangeability_text(out)
    return out


def exchangeability_text(block: dict | None) -> str:
    if not block:
        return "exchangeability with the calibration cases: not checked (no calibration reference)"
    p = block.get("p_value")
    if p is None:
        return "exchangeability with the calibration cases: not checked (no atypicality aggregate for this case)"
    what = ", ".join(block["aggregates"])
    if block["exchangeable"] is False:
        return (f"NOT exchangeable with the {block['n_cases']} calibration cases (p = {p:.3g} ≤ δ = "
                f"{block['delta']:g}; {what}): every guarantee below is void for this case")
    note = "" if block["testable"] else (f"; with {block['n_cases']} calibration cases the check cannot reject "
                                         f"(needs ≥ {block['min_cases']} at δ = {block['delta']:g})")
    return f"exchangeable with the calibration cases as far as checked (p = {p:.3g} > δ = {block['delta']:g}; {what}{note})"


def void_reason(block: dict | None) -> str | None:
    """Why the guarantees of a case are void (None when they are not)."""
    if block and block.get("exchangeable") is False:
        return f"case not exchangeable with the calibration cases (p = {block['p_value']:.3g} ≤ {block['delta']:g})"
    return None
