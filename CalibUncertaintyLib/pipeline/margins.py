"""Organ margins with a conformal guarantee, written per case (METHODS.md §7).

For every foreground class k whose thresholds the calibration file's ``conformal`` record holds,
``margins_<Class>.nii.gz`` (uint8, the case's geometry) holds the nested levels

    3 = inner contour   {p_k > λ_in} (⊆ prediction)        precision ≥ 1 − α in expectation
    2 = prediction      argmax = k, outside the inner contour
    1 = outer band      {p_k ≥ λ_out} ∪ prediction, outside the prediction
    0 = outside the outer contour                           the outer holds ≥ 1 − α of the organ

so ``levels == 3`` is the inner, ``>= 2`` the prediction, ``>= 1`` the outer contour. p is the
calibrated probability and λ's come from ``calibration.conformal.margin_thresholds``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.images import write_image

MARGIN_PREFIX = "margins_"
LEVELS = {"inner": 3, "prediction": 2, "outer": 1}


def write_margins(folder: Path, probs, seg, calibration, class_names, geometry, file_names: dict) -> dict | None:
    """Write one margins file per class with stored thresholds; return summary.json's
    ``margins`` block ({"alpha", "guarantee", "classes": {name: {file, outer, inner, volumes_mm3}}})
    or None when the calibration file has no conformal margins."""
    from ..calibration.conformal import at_alpha, guarantee_text, margin_levels

    rec = getattr(calibration, "conformal", None) if calibration is not None else None
    if not rec or not rec.get("margins") or probs is None:
        return None
    a = rec["alpha"]
    voxel = geometry.voxel_volume_mm3
    out = {"alpha": a, "levels": dict(LEVELS),
           "guarantee": {"outer": guarantee_text(a, "outer"), "inner": guarantee_text(a, "inner")},
           "classes": {}}
    for c in range(1, probs.shape[0]):
        name = class_names[c]
        th = at_alpha(rec, "margins", name)
        if th is None:
            continue
        lv = margin_levels(probs[c], seg == c, th["outer"], th["inner"])
        fname = MARGIN_PREFIX + file_names[c]
        write_image(Path(folder) / fname, lv, geometry)
        out["classes"][name] = {
            "file": fname, "class_index": c, "outer_threshold": th["outer"], "inner_threshold": th["inner"],
            "trivial": th["trivial"],
            "volumes_mm3": {k: float(np.count_nonzero(lv >= v) * voxel) for k, v in LEVELS.items()}}
    return out
