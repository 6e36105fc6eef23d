"""Readable lines for a case's guarantees: per-organ quality intervals, contour-level guarantees,
review burden, and whether the guarantees apply (exchangeability). Qt-free and MRML-free: the Slicer
panel (``mrml.margins.guarantee_lines``), the organ table (``mrml.organ_table``), the review sheet
and the evaluation report all print these same sentences from a case's summary.json.
"""

from __future__ import annotations


def _ml(mm3) -> str:
    return "–" if mm3 is None else f"{float(mm3) / 1000.0:.3g} ml"


def void_reason(summary: dict) -> str | None:
    """Why the case's guarantees are void (None when they apply or were not checked)."""
    ex = (summary or {}).get("exchangeability") or {}
    if ex.get("exchangeable") is False:
        return f"case not exchangeable with the calibration cases (p = {ex['p_value']:.3g} ≤ {ex['delta']:g})"
    return None


def organ_rows(summary: dict) -> list[dict]:
    """One row per organ of summary.json's ``organ_quality`` ([] without it): organ, predicted Dice,
    its interval, surface Dice and interval, coverage, status (ok / trivial / VOID / not predicted), text."""
    block = (summary or {}).get("organ_quality") or {}
    rows = []
    void = block.get("void")
    for name, e in (block.get("organs") or {}).items():
        row = {"organ": name, "text": e.get("text", name), "coverage": block.get("coverage"),
               "tolerance_mm": block.get("tolerance_mm")}
        if e.get("predicted") and "dice" in e:
            d, s = e["dice"], e["surface_dice"]
            row.update(dice=d["predicted"], dice_lower=d["lower"], dice_upper=d["upper"],
                       surface_dice=s["predicted"], surface_dice_lower=s["lower"], surface_dice_upper=s["upper"],
                       status="VOID" if void else "trivial" if d.get("trivial") else "ok")
        else:
            row.update(dice=None, dice_lower=None, dice_upper=None, surface_dice=None, surface_dice_lower=None,
                       surface_dice_upper=None, status="not predicted" if not e.get("predicted") else "no interval")
        rows.append(row)
    return rows


def burden_line(summary: dict) -> str | None:
    """What the guarantee at the file's α costs the reviewer, which map costs least, and what a
    tighter α needs."""
    conf = (summary or {}).get("conformal") or {}
    burden = conf.get("burden") or {}
    if not burden:
        return None
    a = f"{conf['alpha']:g}"
    kind = conf.get("error", "voxel")
    flags = (burden.get("flags") or {}).get(kind) or {}
    rmap = (conf.get("flags") or {}).get("map")
    parts = []
    if rmap in flags and a in flags[rmap]:
        parts.append(f"flags ({rmap}) {_ml(flags[rmap][a]['total_mm3'])}")
    best = ((burden.get("smallest_flag_burden") or {}).get(kind) or {}).get(a)
    if best and best in flags:
        parts.append(f"smallest with {best}: {_ml(flags[best][a]['total_mm3'])}")
    margins = ((burden.get("margins") or {}).get(kind) or {}).get(a) or {}
    if margins:
        parts.append(f"margin bands {_ml(sum(m['total_mm3'] for m in margins.values()))}")
    if not parts:
        return None
    n = conf.get("n_calibration_cases") or conf.get("n_cases") or 0
    need = conf.get("cases_needed") or {}
    tighter = sorted((float(k), v) for k, v in need.items() if float(k) < conf["alpha"])
    more = ""
    if tighter:
        ta, tn = tighter[-1]
        more = (f"; a {100 * (1 - ta):.0f} % guarantee needs ≥ {tn} calibration cases (have {n})" if tn > n else
                f"; a {100 * (1 - ta):.0f} % guarantee is available with these {n} cases")
    what = "contour deviations" if kind == "contour" else "voxel errors"
    return (f"Review burden of the {100 * (1 - conf['alpha']):.0f} % guarantee ({what}): " + ", ".join(parts) + more)


def case_lines(summary: dict) -> list[str]:
    """Every guarantee line of a case beyond the voxel flags and margins: exchangeability, contour
    guarantees, per-organ quality, review burden ([] for a case without them)."""
    s = summary or {}
    lines = []
    ex = s.get("exchangeability")
    if ex:
        lines.append(("Exchangeability: " + ex["text"]) if ex.get("text") else "")
    conf = s.get("conformal") or {}
    void = void_reason(s)
    contour = conf.get("contour")
    if contour and contour.get("flags"):
        f = contour["flags"]
        what = "the whole ROI (too few calibration cases for α)" if f.get("trivial") else f["rule"]
        lines.append(f"Contour flags ({what}): {contour['guarantee']}." + (" VOID for this case." if void else ""))
    rows = organ_rows(s)
    if rows:
        lines.append("Organ quality (predicted [interval], coverage):")
        lines += [f"  {r['text']}" for r in rows]
    b = burden_line(s)
    if b:
        lines.append(b)
    return [line for line in lines if line]
