"""The readable evaluation report (report.md) from the evaluation dict of ``pipeline.evaluate``.

It states, before any number: the calibration applied (T or vector scaling, ensemble mode,
fitting cases), the ROI rule and radius, which tables are inside the ROI and which over the
whole image, the Brier convention (multi-class sum over classes, twice sklearn's binary Brier
for K = 2) and the ECE binning. Then the calibration metrics before/after (mean over cases),
the pooled top-label ECE, Dice, error detection per map at τ*, case-level quality and the
figure files. Numbers are printed with 4 significant digits; a missing value is "–".
"""

from __future__ import annotations

import math


def _f(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return out


def _agg(evaluation: dict, stage: str, region: str) -> dict:
    for row in evaluation.get("aggregate", {}).get("metrics", []):
        if row.get("calibration") == stage and row.get("region") == region:
            return row
    return {}


def render_report(evaluation: dict) -> str:
    """Markdown text of the report (module docstring)."""
    from .tables import ece_from_table

    ev = evaluation
    cal, roi = ev["calibration"], ev["roi"]
    lines = ["# CalibUncertainty evaluation report", "",
             f"Created {ev['created']} by calib-uncertainty {ev['tool_version']}: {ev['n_cases']} case(s), "
             f"{ev['n_members']} ensemble member(s), classes {', '.join(ev['class_names'][1:])} "
             f"(background = {ev['class_names'][0]}).", ""]
    lines += ["## How to read these numbers", "",
              f"- **Calibration applied**: {cal['description']}.",
              f"- **Calibration fitted on**: {', '.join(cal['fitted_on_cases']) or '–'}.",
              f"- **ROI rule**: `{roi['rule']}`, {roi['radius_mm']:g} mm — {roi['description']}. "
              + ("It is derived from the prediction only, so it exists at deployment time."
                 if roi["rule"] == "prediction" else
                 "It uses the reference segmentation: research evaluation only."),
              "- **ROI vs whole image**: every table says which. 'ROI' numbers use only the voxels of "
              "the ROI above; 'whole image' numbers use every voxel, where the background far from "
              "any organ dominates and makes every model look well calibrated.",
              f"- **Brier convention**: {ev['conventions']['brier']}.",
              f"- **ECE**: {ev['conventions']['ece']}; pECE: {ev['conventions']['pece']}.",
              f"- **Error mask**: {ev['conventions']['error_mask']}; τ* per map comes from the "
              "calibration file (quantile thresholds are resolved on each case's ROI).", ""]
    if cal.get("other_ensemble_mode"):
        o = cal["other_ensemble_mode"]
        lines += [f"Both ensemble modes were fitted on the same voxels: the other mode, "
                  f"`{o['ensemble_mode']}`, gives T = {_f(o['temperature'])} (NLL {_f(o['nll_before'])} → "
                  f"{_f(o['nll_after'])}).", ""]
    if ev.get("notes"):
        lines += ["**Notes**", ""] + [f"- {n}" for n in ev["notes"]] + [""]
    lines += atypical_lines(ev.get("per_case") or [])

    lines += ["## Calibration before and after (mean over cases)", ""]
    keys = [("nll", "NLL"), ("brier_multiclass", "Brier (multi-class)"), ("ece_top", "ECE top-label"),
            ("mce_top", "MCE top-label"), ("ace_top", "ACE top-label"), ("pece", "pECE")]
    lines += ["'Inside the ROI': each stage on its own prediction's ROI. 'Shared ROI': both stages on the "
              "uncalibrated prediction's ROI (the same voxels; use it to compare before and after). They differ "
              "only where the calibration changed the segmentation.", ""]
    for region, label in (("roi", "Inside the ROI (each stage's own)"),
                          ("shared_roi", "Inside one shared ROI (the uncalibrated prediction's)"),
                          ("whole_image", "Whole image")):
        b, a = _agg(ev, "before", region), _agg(ev, "after", region)
        if not b:
            lines += [f"No case has a non-empty evaluation region ({label.lower()}).", ""]
            continue
        rows = [[name, b.get(f"{k}.mean"), a.get(f"{k}.mean"),
                 (a.get(f"{k}.mean") - b.get(f"{k}.mean")) if a.get(f"{k}.mean") is not None
                 and b.get(f"{k}.mean") is not None else None] for k, name in keys]
        lines += [f"### {label}", ""] + _table(["metric", "before", "after", "change"], rows) + [""]
    rel = ev.get("reliability", {})
    pooled = [[region, ece_from_table(rel.get(f"before_{region}", [])), ece_from_table(rel.get(f"after_{region}", []))]
              for region in ("roi", "whole_image")]
    lines += ["Top-label ECE with all cases' voxels pooled into one reliability table:", ""]
    lines += _table(["region", "before", "after"], pooled) + [""]

    from ..metrics.case_quality import review_order

    triage = ev.get("triage")
    prio = triage["priority"] if triage else "mean_u_roi"  # older evaluations: review_order's key
    lines += ["### Per case (ROI), in review order", "",
              f"Highest review priority first, by the case-level aggregate `{prio}` (the review priority; "
              "cases where it is undefined, e.g. nothing predicted, first).", ""]
    by_case = {rec["case"]: rec for rec in ev["per_case"]}
    ordered = [by_case[r["case"]] for r in triage["ranking"]] if triage else review_order(ev["per_case"])
    prio_of = {r["case"]: r["priority"] for r in triage["ranking"]} if triage else {}
    rows = []
    for rank, rec in enumerate(ordered, 1):
        b, a = rec["metrics"]["before"]["roi"], rec["metrics"]["after"]["roi"]
        q = rec.get("quality") or {}
        rows.append([rank, rec["case"], prio_of.get(rec["case"], q.get("mean_u_roi")), rec["mean_dice"],
                     b and b["nll"], a and a["nll"],
                     b and b["ece_top"], a and a["ece_top"], b and b["brier_multiclass"],
                     a and a["brier_multiclass"], rec["roi"]["n_voxels"]])
    lines += _table(["rank", "case", f"priority ({prio})", "mean Dice", "NLL before", "NLL after", "ECE before",
                     "ECE after", "Brier before", "Brier after", "ROI voxels"], rows) + [""]

    lines += ["## Segmentation (Dice per class)", "",
              "Dice of the segmentation (argmax of the calibrated probability); empty reference and "
              "empty prediction give 1 and are listed.", ""]
    names = ev["class_names"][1:]
    rows = [[rec["case"], *[rec["dice"].get(n) for n in names], rec["mean_dice"],
             rec["segmentation_unchanged"], " ".join(rec["dice_empty_reference"]) or "–"] for rec in ev["per_case"]]
    lines += _table(["case", *names, "mean", "same as uncalibrated", "empty reference"], rows) + [""]

    lines += ["## Uncertainty as an error detector (after calibration)", "",
              "Mean over cases at the calibration file's τ*: UEO = Dice({U > τ*}, errors), recall and "
              "precision of the flagged voxels, voxel AUROC, normalised area under the budget curve "
              "(top ≤ 5 % of ROI voxels flagged; oracle in brackets), and error recall split into "
              "errors within 1 voxel of the predicted contour and the rest.", ""]
    rows = []
    for row in ev.get("aggregate", {}).get("error_detection", []):
        if not row.get("ueo.n"):  # no case has a value: one member and a disagreement map
            rows.append([row["map"]] + ["not applicable (one member)"] + [None] * 7)
            continue
        rows.append([row["map"], row.get("tau_abs.mean"), row.get("ueo.mean"), row.get("recall.mean"),
                     row.get("precision.mean"), row.get("auroc.mean"),
                     f"{_f(row.get('budget_area.mean'))} ({_f(row.get('oracle_budget_area.mean'))})",
                     row.get("boundary_recall.mean"), row.get("non_boundary_recall.mean")])
    lines += _table(["map", "τ* (map units)", "UEO", "recall", "precision", "AUROC", "budget area",
                     "boundary recall", "non-boundary recall"], rows) + [""]

    lines += triage_lines(triage)

    from ..metrics.conformal_check import report_lines as conformal_lines

    lines += conformal_lines(ev.get("conformal"), (ev.get("options") or {}).get("regions_map", "dae"))
    from ..metrics.guarantee_check import report_lines as guarantee_lines

    lines += guarantee_lines(ev.get("guarantees"))  # per-organ intervals, contour-level guarantees
    lines += ["## Figures and tables", "",
              *(["- `conformal_miss_vs_alpha.png`: held-out miss rate of the conformal flags and margins "
                 "against α"] if ev.get("conformal") else []),
              *(["- `risk_coverage.png`, `risk_coverage.csv`, `triage.json`, `triage_cases.csv`: case triage "
                 "(review order, priority, risk–coverage curves)"] if triage else []),
              "- `reliability_roi.png`, `reliability_whole_image.png`: reliability diagrams before and after calibration",
              "- `ueo_vs_threshold.png`: UEO against the threshold per map; `budget_curves.png`: UEO under a review budget",
              "- `metrics_per_case.csv`, `metrics_aggregate.csv`, `dice_per_case.csv`, "
              "`error_detection_per_case.csv`, `error_detection_aggregate.csv`, `case_quality.csv`, "
              "`evaluation.json` (everything above, per case)", ""]
    return "\n".join(lines)


def atypical_lines(per_case: list[dict]) -> list[str]:
    """The report's section naming the cases unlike the calibration cases (``metrics.atypicality``;
    each record's ``atypicality``: aggregates and p-values against the calibration reference).
    [] when no case has an atypicality p-value (no reference in the calibration file)."""
    from ..metrics.atypicality import ATYPICAL_P, ATYPICALITY_AGGREGATES, atypical_cases

    records = [{"case": r["case"], "case_aggregates": r.get("atypicality") or {}} for r in per_case]
    if not any(f"{a}_p" in r["case_aggregates"] for r in records for a in ATYPICALITY_AGGREGATES):
        return []
    named = atypical_cases(records)
    lines = ["## Atypical cases (unlike the calibration cases)", "",
             f"A case is named when an atypicality aggregate's p-value against the calibration cases is ≤ "
             f"{ATYPICAL_P:g} (organ volumes: predicted organ volumes against the calibration cases'; body "
             "fractions: share of the body with entropy / mutual information above the calibration cases' 0.99 "
             "quantile). The calibration and the conformal guarantees assume cases like the calibration cases; "
             "for a named case they may not hold.", ""]
    if not named:
        return lines + [f"No case has an atypicality p-value ≤ {ATYPICAL_P:g}.", ""]
    return lines + [f"- **{c}**: {d}" for c, d in named] + [""]


def triage_lines(triage: dict | None) -> list[str]:
    """The report's case-triage section (``metrics.triage.triage_summary``)."""
    if not triage or not triage.get("aggregates"):
        return []
    lines = ["## Which cases to review first (case triage)", "",
             f"Review priority: `{triage['priority']}` (higher = review first; `--priority` chooses another "
             "aggregate). Per aggregate: its correlation with the mean Dice across cases (a useful aggregate "
             "correlates negatively; at least 3 cases) and the risk–coverage AURC (risk = 1 − mean Dice; "
             "coverage = fraction of cases accepted without review, lowest priority first; lower is better; "
             "the oracle's in brackets). The atypicality aggregates (out-of-distribution check, against the "
             "calibration cases): `high_*_body_fraction` = fraction of the body with uncertainty above the "
             "calibration cases' 0.99 quantile; `organ_volume_atypicality` = mean |log ratio| of the predicted "
             "organ volumes to the calibration cases' medians.", ""]
    rows = [[name + (" (priority)" if name == triage["priority"] else ""), v.get("pearson"), v.get("spearman"),
             f"{_f((v.get('risk_coverage') or {}).get('aurc'))} ({_f((v.get('risk_coverage') or {}).get('aurc_optimal'))})",
             v.get("n_undefined")] for name, v in triage["aggregates"].items()]
    lines += _table(["aggregate", "Pearson r", "Spearman ρ", "AURC (oracle)", "cases undefined"], rows) + [""]
    return lines
