"""Held-out check of the per-organ quality intervals, the contour-level guarantees and the
exchangeability check (docs/METHODS.md), used by ``evaluate`` (and the same definitions as
``bench/organ_quality.py``).

Per case (``case_check``), with the calibration file's records:

- per predicted organ and target (Dice, surface Dice at the file's tolerance): the interval at the
  file's α (``calibration.organ_quality``), the true value against the reference, covered or not,
  the width;
- contour errors (``metrics.contour``, within the ROI): for every map and stored α the flags' miss
  rate (fraction of the case's contour-error voxels not flagged; 0 without such errors, the loss
  the threshold was fitted with); per class and α the outer margin's miss rate of FN_t and the
  inner margin's share of FP_t it still holds;
- the case's exchangeability block (``metrics.exchangeability``) from its atypicality aggregates.

Across cases (``summarise``): realised coverage and mean width per organ and target (overall, and
split by the exchangeability verdict), mean miss rates ± standard error against α.
"""

from __future__ import annotations

import math

import numpy as np


def case_check(calibration, maps: dict, seg, labels, roi, probs, class_names, spacing_zyx,
               atypicality: dict | None = None) -> dict | None:
    """One case's held-out record; None when the calibration file has neither record."""
    from ..calibration.organ_quality import case_organ_rows, conformal_interval
    from ..calibration.thresholds import uncertainty_score
    from .contour import class_contour_errors
    from .exchangeability import DEFAULT_DELTA, case_exchangeability

    oq = getattr(calibration, "organ_quality", None)
    conf = getattr(calibration, "conformal", None) or {}
    contour = conf.get("contour")
    if not oq and not contour:
        return None
    names = list(class_names)
    out = {"organs": {}, "contour": None, "exchangeability": None}
    delta = float(conf.get("exchangeability_delta", DEFAULT_DELTA))
    out["exchangeability"] = case_exchangeability(atypicality or {}, getattr(calibration, "case_reference", None),
                                                  delta)
    if oq:
        rows = case_organ_rows(probs, seg, labels, spacing_zyx, oq["tolerance_mm"], oq.get("crop_mm", 15.0))
        for c, row in enumerate(rows, start=1):
            cal = (oq.get("classes") or {}).get(names[c])
            if row is None or cal is None:
                out["organs"][names[c]] = None
                continue
            entry = {}
            for t in ("dice", "surface_dice"):
                iv = conformal_interval(cal[f"x_{t}"], cal[f"y_{t}"], row[f"expected_{t}"], oq["alpha"],
                                        oq.get("ridge_lambda", 1.0))
                entry[t] = {**iv, "actual": row[t], "covered": bool(iv["lower"] - 1e-9 <= row[t] <= iv["upper"] + 1e-9),
                            "width": iv["upper"] - iv["lower"]}
            out["organs"][names[c]] = entry
    if contour:
        tol = contour["tolerance_mm"]
        errors = np.zeros(np.shape(seg), bool)
        margins = {}
        for c in range(1, len(names)):
            fn, fp = class_contour_errors(seg == c, labels == c, spacing_zyx, tol)
            errors |= fn | fp
            by_alpha = (contour.get("margins") or {}).get(names[c])
            if by_alpha:
                p = np.asarray(probs[c])
                n_fn, n_fp = int(fn.sum()), int(fp.sum())
                margins[names[c]] = {key: {
                    "outer_miss": float(np.count_nonzero(p[fn] < np.float32(th["outer"])) / n_fn) if n_fn else 0.0,
                    "inner_cover": float(np.count_nonzero(p[fp] > np.float32(max(th["inner"], 0.5))) / n_fp)
                    if n_fp else 0.0} for key, th in by_alpha.items()}
        errors &= np.asarray(roi, dtype=bool)
        n_err = int(errors.sum())
        flags = {}
        for name, by_alpha in (contour.get("flags") or {}).items():
            if name not in maps:
                continue
            s = uncertainty_score(name, maps[name])[errors]
            flags[name] = {key: (0.0 if n_err == 0 else 0.0 if th["tau"] is None else
                                 float(np.count_nonzero(~(s > np.float32(th["tau"]))) / n_err))
                           for key, th in by_alpha.items()}
        out["contour"] = {"tolerance_mm": tol, "n_errors": n_err, "flags": flags, "margins": margins}
    return out


def _mean_se(vals):
    v = np.asarray([x for x in vals if x is not None], dtype=float)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else None)


def summarise(calibration, checks: list) -> dict | None:
    """Realised coverage / width per organ and target, contour miss rates against α (module docstring)."""
    checks = [c for c in checks if c is not None]
    oq = getattr(calibration, "organ_quality", None)
    conf = getattr(calibration, "conformal", None) or {}
    if not checks:
        return None
    out = {"n_cases": len(checks), "organ_quality": None, "contour": None, "exchangeability": None}
    ex = [c.get("exchangeability") for c in checks]
    verdicts = [None if e is None else e.get("exchangeable") for e in ex]
    out["exchangeability"] = {"n_checked": sum(v is not None for v in verdicts),
                              "n_not_exchangeable": sum(v is False for v in verdicts),
                              "delta": next((e["delta"] for e in ex if e), None)}
    if oq:
        organs = {}
        for name in oq.get("classes", {}):
            per = [(c["organs"].get(name), v) for c, v in zip(checks, verdicts)]
            per = [(e, v) for e, v in per if e is not None]
            row = {}
            for t in ("dice", "surface_dice"):
                cov = [e[t]["covered"] for e, _ in per]
                row[t] = {"n": len(cov), "coverage": float(np.mean(cov)) if cov else None,
                          "mean_width": float(np.mean([e[t]["width"] for e, _ in per])) if per else None,
                          "coverage_exchangeable": _frac([e[t]["covered"] for e, v in per if v is not False]),
                          "coverage_not_exchangeable": _frac([e[t]["covered"] for e, v in per if v is False]),
                          "trivial": any(e[t]["trivial"] for e, _ in per)}
            organs[name] = row
        all_cov = [e[t]["covered"] for c in checks for e in c["organs"].values() if e for t in ("dice", "surface_dice")]
        out["organ_quality"] = {"alpha": oq["alpha"], "tolerance_mm": oq["tolerance_mm"],
                                "n_calibration_cases": oq.get("n_cases"), "organs": organs,
                                "coverage_all": _frac(all_cov)}
    contour = conf.get("contour")
    if contour and any(c.get("contour") for c in checks):
        cc = [c["contour"] for c in checks if c.get("contour")]
        flags = {}
        for name, by_alpha in (contour.get("flags") or {}).items():
            rows = []
            for key, th in by_alpha.items():
                m, se = _mean_se([c["flags"].get(name, {}).get(key) for c in cc])
                if m is not None:
                    rows.append({"alpha": float(key), "tau": th["tau"], "trivial": th["trivial"], "mean_miss": m,
                                 "se": se, "met": m <= float(key) + (se or 0.0)})
            flags[name] = rows
        margins = {}
        for cname, by_alpha in (contour.get("margins") or {}).items():
            rows = []
            for key, th in by_alpha.items():
                per = [c["margins"].get(cname, {}).get(key) for c in cc]
                per = [p for p in per if p is not None]
                if per:
                    mo, _ = _mean_se([p["outer_miss"] for p in per])
                    mi, _ = _mean_se([p["inner_cover"] for p in per])
                    rows.append({"alpha": float(key), "outer": th["outer"], "inner": th["inner"],
                                 "trivial": th["trivial"], "mean_outer_miss": mo, "mean_inner_cover": mi})
            margins[cname] = rows
        out["contour"] = {"alpha": conf["alpha"], "tolerance_mm": contour["tolerance_mm"], "flags": flags,
                          "margins": margins}
    return out


def _frac(vals):
    return float(np.mean(vals)) if vals else None


def report_lines(summary: dict | None) -> list[str]:
    """Markdown lines for report.md ([] without a summary)."""
    if not summary:
        return []

    def f(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"

    lines = []
    ex = summary.get("exchangeability") or {}
    oq = summary.get("organ_quality")
    if oq:
        pct = f"{100 * (1 - oq['alpha']):.0f} %"
        lines += ["## Per-organ quality intervals (held-out check)", "",
                  f"Each predicted organ gets a predicted Dice and surface Dice ({oq['tolerance_mm']:g} mm) with a "
                  f"{pct} full-conformal interval fitted on {oq['n_calibration_cases']} calibration cases; the "
                  f"interval should hold the true value in ≥ {pct} of exchangeable cases (per organ, not all organs "
                  f"at once). Realised here on {summary['n_cases']} held-out cases "
                  f"({ex.get('n_not_exchangeable', 0)} flagged as not exchangeable at δ = {ex.get('delta')}).", "",
                  "| organ | target | cases | coverage | mean width | coverage (exchangeable) | coverage (flagged) |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in oq["organs"].items():
            for t, label in (("dice", "Dice"), ("surface_dice", "surface Dice")):
                r = row[t]
                lines.append(f"| {name} | {label}{' (trivial)' if r['trivial'] else ''} | {r['n']} | "
                             f"{f(r['coverage'])} | {f(r['mean_width'])} | {f(r['coverage_exchangeable'])} | "
                             f"{f(r['coverage_not_exchangeable'])} |")
        lines += ["", f"All organs and targets together: coverage {f(oq['coverage_all'])} (target ≥ {1 - oq['alpha']:g}).", ""]
    ct = summary.get("contour")
    if ct:
        lines += [f"## Contour-level guarantees (deviations beyond {ct['tolerance_mm']:g} mm, held-out check)", "",
                  "Error = voxels of the symmetric difference of prediction and reference whose centre lies farther "
                  f"than {ct['tolerance_mm']:g} mm from the other contour, inside the ROI. Mean over cases of the "
                  "fraction missed, against α.", "",
                  "| map | α | mean miss | SE | mean ≤ α + SE |", "|---|---|---|---|---|"]
        for name, rows in ct["flags"].items():
            for r in rows:
                se = "n/a" if r["se"] is None else f"{r['se']:.4f}"
                lines.append(f"| {name} | {r['alpha']:g} | {r['mean_miss']:.4f} | {se} | {'yes' if r['met'] else 'NO'} |")
        if ct["margins"]:
            lines += ["", "| class | α | outer p ≥ | mean far-miss outside outer | inner p > | mean far-extra inside inner |",
                      "|---|---|---|---|---|---|"]
            for cname, rows in ct["margins"].items():
                for r in rows:
                    lines.append(f"| {cname} | {r['alpha']:g} | {r['outer']:.4g} | {r['mean_outer_miss']:.4f} | "
                                 f"{r['inner']:.4g} | {r['mean_inner_cover']:.4f} |")
        lines.append("")
    return lines
