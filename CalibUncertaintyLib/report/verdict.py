"""The one-line verdict printed when a case is finished: what the reviewer should look at.

Built from the case folder's ``summary.json`` (and ``regions.json``) alone, so it reads the same for
``maps``, ``predict`` and a folder written earlier. The line is made of parts, each a small function
``part(summary, regions) -> str | None`` in ``VERDICT_PARTS`` (None: nothing to say); add a function
to the list to extend it. Today's parts, in order:

1. ``regions_part``: the error regions the case has on its regions map at τ*: how many, their total
   volume, and the top-ranked one (volume, the structure it touches, centroid in RAS mm);
2. ``flagged_part``: the fraction of the predicted foreground flagged (above τ*) on that map;
3. ``atypical_part``: "ATYPICAL" when an atypicality aggregate is beyond every calibration case
   (p-value at its smallest, 1/(n + 1)), naming it; else the smallest p-value;
4. ``calibration_part``: "uncalibrated" without a calibration file, and "trivial guarantee" when
   the conformal flags only hold by flagging the whole ROI.
"""

from __future__ import annotations

import json
from pathlib import Path

#: aggregates of ``metrics.atypicality`` whose p-value says how typical the case is
ATYPICALITY_PS = ("organ_volume_atypicality", "high_entropy_body_fraction", "high_mi_body_fraction")


def _ml(mm3: float) -> str:
    ml = float(mm3) / 1000.0
    return f"{ml:.3g} ml" if ml >= 0.1 else f"{float(mm3):.0f} mm³"


def regions_part(summary: dict, regions: dict | None) -> str | None:
    rmap = summary.get("regions_map") or (regions or {}).get("map") or "map"
    found = (regions or {}).get("regions")
    if found is None:
        n = summary.get("n_regions")
        return None if n is None else f"{n} error region(s) on {rmap}"
    if not found:
        return f"no error region on {rmap} above τ*"
    total = sum(float(r.get("volume_mm3", 0.0)) for r in found)
    top = found[0]
    where = top.get("centroid_ras")
    at = f" at RAS ({', '.join(f'{float(c):.0f}' for c in where)}) mm" if where else ""
    touch = f" touching {top['class_name']}" if top.get("class_name") else ""
    return (f"{len(found)} error region(s) on {rmap} ({_ml(total)} in all); look first at region 1: "
            f"{_ml(top.get('volume_mm3', 0.0))}{touch}{at}")


def flagged_part(summary: dict, regions: dict | None) -> str | None:
    agg = summary.get("case_aggregates") or {}
    f = agg.get("fraction_fg_flagged")
    if f is None:
        return None
    return f"{100 * float(f):.0f} % of the predicted foreground flagged"


def atypical_part(summary: dict, regions: dict | None) -> str | None:
    agg = summary.get("case_aggregates") or {}
    n = ((summary.get("calibration") or {}).get("n_cases"))
    ps = {name: agg[f"{name}_p"] for name in ATYPICALITY_PS if isinstance(agg.get(f"{name}_p"), (int, float))}
    if not ps:
        return None
    name, p = min(ps.items(), key=lambda kv: kv[1])
    if n and p <= 1.0 / (int(n) + 1) + 1e-9:
        return f"ATYPICAL: {name} beyond every one of the {n} calibration cases (p = {p:.2g}); check the input"
    return f"typical of the calibration cases (smallest p = {p:.2g}, {name})"


def calibration_part(summary: dict, regions: dict | None) -> str | None:
    if not summary.get("calibration"):
        return "uncalibrated (no --calibration): default thresholds"
    conf = summary.get("conformal") or {}
    if conf.get("trivial"):
        n, need = conf.get("n_cases"), conf.get("min_cases")
        return (f"conformal flags: trivial guarantee ({n} calibration case(s)"
                + (f", {need} needed)" if need else ")"))
    return None


VERDICT_PARTS = [regions_part, flagged_part, atypical_part, calibration_part]


def case_verdict(summary: dict, regions: dict | None = None, parts=None) -> str:
    """``<case>: <part>; <part>; ...`` (module docstring)."""
    said = [t for part in (parts or VERDICT_PARTS) if (t := part(summary, regions))]
    return f"{summary.get('case', '?')}: " + ("; ".join(said) if said else "done")


def folder_verdict(case_dir) -> str:
    """``case_verdict`` of a finished case folder (its summary.json and regions.json)."""
    case_dir = Path(case_dir)
    summary = json.loads((case_dir / "summary.json").read_text())
    try:
        regions = json.loads((case_dir / "regions.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        regions = None
    return case_verdict(summary, regions)
