"""Held-out check of the conformal guarantees (METHODS.md §7), used by ``evaluate``.

Per case (``case_check``): for every map and every α stored in the calibration file's
``conformal`` record, the miss rate = fraction of the case's ROI error voxels (prediction ≠
reference) not flagged by ``score > τ_α`` (0 when the case has no error, the loss the threshold
was fitted with); for every class and α, the outer margin's miss rate (fraction of the true organ
voxels outside the outer contour; 0 when the organ is absent) and the inner margin's
false-discovery proportion (1 − precision; 0 for an empty inner contour).

Across cases (``summarise``): the mean and its standard error (std / √n, n ≥ 2) per α, to be
compared with α: the guarantee is on the mean over exchangeable cases, not on each case.
"""

from __future__ import annotations

import math

import numpy as np


def case_check(calibration, maps: dict, seg, labels, roi, probs, class_names) -> dict | None:
    """One case's rates; None when the calibration file has no conformal record."""
    from ..calibration.conformal import case_margin_rates, case_miss_rate
    from ..calibration.thresholds import uncertainty_score

    rec = getattr(calibration, "conformal", None)
    if not rec:
        return None
    errors = (np.asarray(seg) != np.asarray(labels)) & np.asarray(roi, dtype=bool)
    out = {"n_errors": int(errors.sum()), "flags": {}, "margins": {}}
    for name, by_alpha in (rec.get("flags") or {}).items():
        if name not in maps:
            continue
        score = uncertainty_score(name, maps[name])
        out["flags"][name] = {}
        for key, th in by_alpha.items():
            m = case_miss_rate(score, errors, th["tau"])
            out["flags"][name][key] = 0.0 if m is None else m
    for c in range(1, len(class_names)):
        by_alpha = (rec.get("margins") or {}).get(class_names[c])
        if not by_alpha:
            continue
        out["margins"][class_names[c]] = {
            key: case_margin_rates(probs[c], labels == c, seg == c, th["outer"], th["inner"])
            for key, th in by_alpha.items()}
    return out


def _mean_se(vals) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in vals if x is not None], dtype=float)
    if v.size == 0:
        return None, None
    se = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return float(v.mean()), se


def summarise(calibration, case_checks: list) -> dict | None:
    """Mean ± standard error over cases per map / class and α (see module docstring)."""
    rec = getattr(calibration, "conformal", None)
    checks = [c for c in case_checks if c is not None]
    if not rec or not checks:
        return None
    from ..calibration.conformal import margin_guarantees, min_cases

    out = {"alpha": rec["alpha"], "n_cases": len(checks), "n_calibration_cases": rec.get("n_cases"),
           "min_cases": rec.get("min_cases") or min_cases(rec["alpha"]),
           "source": rec.get("source"), "flags": {}, "margins": {}, "margin_guarantees": margin_guarantees(rec)}
    for name, by_alpha in (rec.get("flags") or {}).items():
        rows = []
        for key, th in by_alpha.items():
            m, se = _mean_se([c["flags"].get(name, {}).get(key) for c in checks])
            if m is not None:
                rows.append({"alpha": float(key), "tau": th["tau"],
                             "trivial": th["trivial"] or th["tau"] is None or (th.get("c") or 0.0) <= 0,
                             "mean_miss": m, "se": se, "met": m <= float(key) + (se or 0.0)})
        out["flags"][name] = rows
    for cname, by_alpha in (rec.get("margins") or {}).items():
        rows = []
        for key, th in by_alpha.items():
            per = [c["margins"].get(cname, {}).get(key) for c in checks]
            per = [p for p in per if p is not None]
            if not per:
                continue
            mo, so = _mean_se([0.0 if p["outer_miss"] is None else p["outer_miss"] for p in per])
            mi, si = _mean_se([p["inner_fdp"] for p in per])
            rows.append({"alpha": float(key), "outer": th["outer"], "inner": th["inner"], "trivial": th["trivial"],
                         "mean_outer_miss": mo, "se_outer": so, "mean_inner_fdp": mi, "se_inner": si})
        out["margins"][cname] = rows
    return out


def report_lines(summary: dict | None, regions_map: str) -> list[str]:
    """Markdown lines for report.md. A trivial guarantee is stated as trivial, in bold, with the
    number of calibration cases a real one needs."""
    from ..calibration.conformal import guarantee_text

    if not summary:
        return []
    a = summary["alpha"]
    n_cal, need = summary["n_calibration_cases"], summary.get("min_cases")
    row = next((r for r in summary["flags"].get(regions_map, []) if abs(r["alpha"] - a) < 1e-12), None)
    trivial = bool(row and row["trivial"])
    lines = ["## Conformal guarantees (held-out check)", "",
             f"Thresholds fitted by {summary['source']} on {n_cal} calibration cases; "
             f"checked on {summary['n_cases']} held-out cases. The guarantee is on the mean over cases.", ""]
    if need and n_cal is not None and n_cal < need:
        lines += [f"**Every guarantee below is the trivial one**: {n_cal} calibration case(s), and α = {a:g} needs at "
                  f"least {need}; the flags then cover the errors only by flagging the whole ROI (miss rate 0 by "
                  f"construction), the outer margins are the whole image, the inner margins empty. Fit on {need} or "
                  "more calibration cases for a real guarantee.", ""]
    lines += [f"Regions map {regions_map} at α = {a:g}: **{guarantee_text(a, 'flags', trivial, n_cal)}**.", "",
              "| map | α | τ (score) | mean miss rate | SE | mean ≤ α + SE |", "|---|---|---|---|---|---|"]
    for name, rows in summary["flags"].items():
        for r in rows:
            tau = "whole ROI (trivial)" if r["trivial"] else f"{r['tau']:.4g}"
            se = "n/a" if r["se"] is None else f"{r['se']:.4f}"
            lines.append(f"| {name} | {r['alpha']:g} | {tau} | {r['mean_miss']:.4f} | {se} | "
                         f"{'yes' if r['met'] else 'NO'} |")
    if summary["margins"]:
        mg = summary.get("margin_guarantees") or {"outer": guarantee_text(a, "outer"),
                                                  "inner": guarantee_text(a, "inner")}
        lines += ["", f"Organ margins: {mg['outer']}; {mg['inner']}.", "",
                  "| class | α | outer p ≥ | mean outer miss | inner p > | mean inner 1 − precision |",
                  "|---|---|---|---|---|---|"]
        for cname, rows in summary["margins"].items():
            for r in rows:
                lines.append(f"| {cname} | {r['alpha']:g} | {r['outer']:.4g} | {r['mean_outer_miss']:.4f} | "
                             f"{r['inner']:.4g} | {r['mean_inner_fdp']:.4f} |")
    return lines + [""]
