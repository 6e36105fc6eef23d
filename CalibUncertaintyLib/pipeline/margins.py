"""Organ margins with a conformal guarantee, written per case (METHODS.md §7).

For every foreground class k whose thresholds the calibration file's ``conformal`` record holds,
``margins_<Class>.nii.gz`` (uint8, the case's geometry) holds the nested levels

    3 = inner contour   {p_k > λ_in} (⊆ prediction)        precision ≥ 1 − α in expectation
    2 = prediction      argmax = k, outside the inner contour
    1 = outer band      {p_k ≥ λ_out} ∪ prediction, outside the prediction
    0 = outside the outer contour                           the outer holds ≥ 1 − α of the organ

so ``levels == 3`` is the inner, ``>= 2`` the prediction, ``>= 1`` the outer contour. p is the
calibrated probability and λ's come from ``calibration.conformal.margin_thresholds``.

The levels of a voxel depend on that voxel alone, so ``MarginsWriter`` builds the files one z
slab of the calibrated probability at a time (``pipeline.case`` streams them beside the
probability files); ``write_margins`` does the same from a whole (K, z, y, x) volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.nifti_stream import NiftiStreamWriter

MARGIN_PREFIX = "margins_"
LEVELS = {"inner": 3, "prediction": 2, "outer": 1}


class MarginsWriter:
    """Margins files streamed slab by slab: ``write(sl, probs_slab, seg_slab)`` for consecutive z
    slabs of the calibrated probability (K, dz, y, x) and its labels, then ``close()`` -> the
    summary block (as ``write_margins``); ``abort()`` discards the files. ``classes`` is empty
    (and ``close()`` returns None) when the calibration file has no conformal margins."""

    def __init__(self, folder: Path, calibration, class_names, geometry, file_names: dict, error: str | None = None):
        from ..calibration.conformal import at_alpha

        self.folder, self.class_names, self.geometry = Path(folder), list(class_names), geometry
        self.rec = getattr(calibration, "conformal", None) if calibration is not None else None
        self.classes: dict[int, dict] = {}
        self._writers: dict[int, NiftiStreamWriter] = {}
        self._counts: dict[int, np.ndarray] = {}
        # which error the margins cover: voxel errors (default) or contour deviations beyond t mm
        self.error = selected_error(self.rec, error)
        source = self.rec if self.error == "voxel" or not self.rec else \
            {"alpha": self.rec["alpha"], "n_cases": (self.rec.get("contour") or {}).get("n_cases"),
             "margins": (self.rec.get("contour") or {}).get("margins")}
        self._source = source
        if not self.rec or not source.get("margins"):
            self.rec = None
            return
        for c in range(1, len(self.class_names)):
            th = at_alpha(source, "margins", self.class_names[c])
            if th is None:
                continue
            fname = MARGIN_PREFIX + file_names[c]
            self.classes[c] = {"file": fname, "th": th}
            self._writers[c] = NiftiStreamWriter(self.folder / fname, geometry, np.uint8)
            self._counts[c] = np.zeros(4, np.int64)

    def write(self, probs_slab, seg_slab) -> None:
        from ..calibration.conformal import margin_levels

        for c, w in self._writers.items():
            th = self.classes[c]["th"]
            lv = margin_levels(probs_slab[c], seg_slab == c, th["outer"], th["inner"])
            self._counts[c] += np.bincount(lv.reshape(-1), minlength=4)[:4]
            w.write(lv)

    def close(self) -> dict | None:
        from ..calibration.conformal import inner_is_trivial, margin_guarantees, outer_is_trivial

        if self.rec is None:
            return None
        for c in list(self._writers):
            self._writers.pop(c).close()
        a = self.rec["alpha"]
        voxel = self.geometry.voxel_volume_mm3
        # a trivial guarantee says so, with the cases a real one needs
        mg = margin_guarantees(self._source)
        if self.error == "contour":
            from ..calibration.conformal import trivial_text
            from ..calibration.contour_conformal import guarantee_text as contour_text

            tol, n = self.rec["contour"]["tolerance_mm"], self._source.get("n_cases")
            guarantee = {}
            for part in ("outer", "inner"):
                trivial = mg[f"trivial_{part}"]
                if trivial and len(trivial) == len(self._source["margins"]):
                    guarantee[part] = trivial_text(a, n, part)
                else:
                    guarantee[part] = contour_text(a, part, tol) + (
                        f" (trivial for {', '.join(trivial)}: {trivial_text(a, n, part)})" if trivial else "")
        else:
            guarantee = {"outer": mg["outer"], "inner": mg["inner"]}
        out = {"alpha": a, "levels": dict(LEVELS), "error": self.error, "guarantee": guarantee, "classes": {}}
        for c, info in self.classes.items():
            th, counts = info["th"], self._counts[c]
            out["classes"][self.class_names[c]] = {
                "file": info["file"], "class_index": c, "outer_threshold": th["outer"],
                "inner_threshold": th["inner"], "trivial": th["trivial"],
                "trivial_outer": outer_is_trivial(th), "trivial_inner": inner_is_trivial(th),
                "volumes_mm3": {k: float(counts[v:].sum() * voxel) for k, v in LEVELS.items()}}
        return out

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()
        self._writers.clear()


def selected_error(rec: dict | None, error: str | None = None) -> str:
    """The error the margins and flags of a case cover: ``error`` when given, else the conformal
    record's choice (``fit-temperature --conformal-error``), else "voxel". InputError for "contour"
    with a record that has no contour thresholds (fitted before they existed)."""
    from ..errors import InputError

    chosen = error or (rec or {}).get("error") or "voxel"
    if chosen not in ("voxel", "contour"):
        raise InputError(f"conformal error must be 'voxel' or 'contour', got {chosen!r}")
    if chosen == "contour" and rec and not rec.get("contour"):
        raise InputError("contour-level margins were asked for, but the calibration file has no contour "
                         "thresholds (fitted before they existed): refit it with fit-temperature")
    return chosen


def write_margins(folder: Path, probs, seg, calibration, class_names, geometry, file_names: dict) -> dict | None:
    """Write one margins file per class with stored thresholds; return summary.json's
    ``margins`` block ({"alpha", "guarantee", "classes": {name: {file, outer, inner, volumes_mm3}}})
    or None when the calibration file has no conformal margins."""
    from ..uncertainty.streaming import z_slabs

    if probs is None:
        return None
    w = MarginsWriter(folder, calibration, class_names, geometry, file_names)
    try:
        for sl in z_slabs(np.shape(seg)):
            w.write(np.asarray(probs[:, sl]), np.asarray(seg[sl]))
        return w.close()
    except BaseException:
        w.abort()
        raise
