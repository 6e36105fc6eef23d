"""Per-organ quality, contour-level guarantees, review burden and the exchangeability check of one
case, collected while ``process_case`` streams it (docs/METHODS.md "Per-organ quality",
"Contour-level guarantees", "When a guarantee does not apply").

``OrganCaseCollector`` follows the case through ``process_case`` without holding anything of the
size of the class probabilities:

1. ``add_slab(sl, probs_slab, seg_slab)`` during the one pass over the calibrated probability's z
   slabs: each predicted organ's level indices (``calibration.organ_quality.level_index``, uint8) on
   its box (its bounding box padded by the ROI radius), and per organ, α and error kind (voxel /
   contour) the volume of its margin bands (outer contour ∖ prediction, prediction ∖ inner contour).
2. ``finish_slabs()``: the organ features (the model's expected Dice and surface Dice), then the
   boxes are dropped.
3. ``prepare_roi(seg, roi)``: each ROI voxel's nearest predicted organ (distance in mm to the organ,
   ``metrics.contour.distance_to_mm``, on the organ's box), a uint8 vector of the ROI's size.
4. ``add_map(name, roi_values)`` for each map as it streams by: the flagged volume at every stored α
   of the conformal flags (voxel and contour errors), in total and per nearest organ.
5. ``blocks(case_aggregates)``: summary.json's ``organ_quality`` and ``exchangeability`` blocks, and
   the additions to its ``conformal`` and ``margins`` blocks (contour guarantees, review burden,
   cases needed for a tighter α, void when the case is not exchangeable).
"""

from __future__ import annotations

import logging

import numpy as np

from ..calibration.conformal import INNER_MIN, min_cases

log = logging.getLogger(__name__)

KINDS = ("voxel", "contour")


def _flag_source(conf: dict, kind: str) -> dict:
    if kind == "voxel":
        return conf.get("flags") or {}
    return (conf.get("contour") or {}).get("flags") or {}


def _margin_source(conf: dict, kind: str) -> dict:
    if kind == "voxel":
        return conf.get("margins") or {}
    return (conf.get("contour") or {}).get("margins") or {}


class OrganCaseCollector:
    """See the module docstring. ``seg`` None (vector scaling: the segmentation comes from the
    calibrated slabs) disables the per-organ features (a note says so); the burdens still work."""

    def __init__(self, calibration, class_names, geometry, seg, roi_radius_mm: float):
        from scipy import ndimage

        from ..calibration.organ_quality import organ_box

        self.names = list(class_names)
        self.k = len(self.names)
        self.geometry = geometry
        self.radius = float(roi_radius_mm)
        self.quality = getattr(calibration, "organ_quality", None) if calibration is not None else None
        self.conf = (getattr(calibration, "conformal", None) or {}) if calibration is not None else {}
        self.reference = getattr(calibration, "case_reference", None) if calibration is not None else None
        self.notes: list[str] = []
        self.crops: dict[int, list] = {}
        self.features: dict[str, dict | None] = {}
        self.margin_th: dict[tuple, dict] = {}
        self.margin_counts: dict[tuple, np.ndarray] = {}
        self.flag_burden: dict = {}
        self.owner = None
        self.boxes = None
        if seg is not None:
            self.boxes = ndimage.find_objects(np.asarray(seg), max_label=self.k - 1)
        if self.quality:
            if seg is None:
                self.notes.append("per-organ quality needs the segmentation before the calibrated pass "
                                  "(not available with vector scaling): no per-organ intervals")
                self.quality = None
            else:
                for c in range(1, self.k):
                    if self.boxes[c - 1] is not None:
                        box = organ_box(self.boxes[c - 1], geometry.spacing_zyx, geometry.shape_zyx,
                                        self.quality.get("crop_mm", self.radius))
                        self.crops[c] = [box, np.zeros(tuple(s.stop - s.start for s in box), np.uint8)]
        for kind in KINDS:
            src = _margin_source(self.conf, kind)
            for c in range(1, self.k):
                for key, th in (src.get(self.names[c]) or {}).items():
                    self.margin_th.setdefault((kind, key), {})[c] = (float(th["outer"]), max(float(th["inner"]), INNER_MIN))
                    self.margin_counts[(kind, key, c)] = np.zeros(2, np.int64)

    @property
    def needs_slabs(self) -> bool:
        return bool(self.crops or self.margin_th)

    # --- the slab pass -------------------------------------------------------------------------
    def add_slab(self, sl: slice, probs_slab, seg_slab) -> None:
        from ..calibration.organ_quality import fill_level_crops

        fill_level_crops(self.crops, sl, probs_slab)
        by_class: dict[int, list] = {}
        for (kind, key), per in self.margin_th.items():
            for c, th in per.items():
                by_class.setdefault(c, []).append((kind, key, th))
        for c, entries in by_class.items():
            pred = seg_slab == c
            n_pred = int(np.count_nonzero(pred))
            # every band is counted on the voxels with p ≥ the lowest positive level (few, but for a
            # trivial outer contour p ≥ 0: the whole image outside the prediction, counted directly)
            lo = min([e[2][0] for e in entries if e[2][0] > 0] + [INNER_MIN])
            pc = probs_slab[c]
            sel = pc >= np.float32(lo)
            v, pr = pc[sel], pred[sel]
            for kind, key, (outer, inner) in entries:
                out_band = (pc.size - n_pred) if outer <= 0 else int(np.count_nonzero((v >= np.float32(outer)) & ~pr))
                kept = int(np.count_nonzero((v > np.float32(inner)) & pr))
                self.margin_counts[(kind, key, c)] += (out_band, n_pred - kept)

    def finish_slabs(self, seg) -> None:
        """The organ features from the level indices and the segmentation; the boxes are freed."""
        from ..calibration.organ_quality import organ_features

        if not self.quality:
            return
        tol = float(self.quality["tolerance_mm"])
        for c in range(1, self.k):
            name = self.names[c]
            if c not in self.crops:
                self.features[name] = None
                continue
            box, levels = self.crops.pop(c)
            pred = np.asarray(seg[box]) == c
            self.features[name] = organ_features(levels, pred, self.geometry.spacing_zyx, tol)
        self.crops.clear()

    # --- the maps ------------------------------------------------------------------------------
    def prepare_roi(self, seg, roi) -> None:
        """The nearest predicted organ of every ROI voxel (for the per-organ flagged volume)."""
        from .. import memory
        from ..metrics.contour import distance_to_mm

        if not any(_flag_source(self.conf, k) for k in KINDS) or not roi.any():
            return
        if self.boxes is None:  # vector scaling: the segmentation exists only now
            from scipy import ndimage

            self.boxes = ndimage.find_objects(np.asarray(seg), max_label=self.k - 1)
        sp = self.geometry.spacing_zyx
        pad = [int(np.ceil(self.radius / h)) + 1 for h in sp]
        best = memory.full(seg.shape, np.inf, np.float32)
        owner = memory.zeros(seg.shape, np.uint8 if self.k <= 256 else np.uint16)
        for c in range(1, self.k):
            b = self.boxes[c - 1]
            if b is None:
                continue
            box = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(b, pad, seg.shape))
            d = distance_to_mm(seg[box] == c, sp, self.radius + max(sp))
            closer = d < best[box]
            best[box][closer] = d[closer]
            owner[box][closer] = c
        self.owner = owner[roi]
        del best, owner

    def add_map(self, name: str, roi_values) -> None:
        """Flagged volume of the map at every stored α (voxel and contour flags), total and per organ."""
        from ..calibration.thresholds import uncertainty_score

        if self.owner is None:
            return
        score = None
        voxel = self.geometry.voxel_volume_mm3
        for kind in KINDS:
            by_alpha = _flag_source(self.conf, kind).get(name)
            if not by_alpha:
                continue
            if score is None:
                score = uncertainty_score(name, roi_values)
            out = self.flag_burden.setdefault(kind, {}).setdefault(name, {})
            for key, th in by_alpha.items():
                flagged = np.ones(score.shape, bool) if th["tau"] is None else score > np.float32(th["tau"])
                counts = np.bincount(self.owner[flagged], minlength=self.k)
                out[key] = {"total_mm3": round(float(counts.sum() * voxel), 3),
                            "per_organ_mm3": {self.names[c]: round(float(counts[c] * voxel), 3)
                                              for c in range(1, self.k)},
                            "trivial": bool(th.get("trivial"))}

    # --- summary.json --------------------------------------------------------------------------
    def blocks(self, case_aggregates: dict, regions_map: str | None = None) -> dict:
        """{"organ_quality", "exchangeability", "conformal_extra", "margins_extra"} for summary.json."""
        from ..metrics.exchangeability import DEFAULT_DELTA, case_exchangeability, void_reason

        delta = float(self.conf.get("exchangeability_delta", DEFAULT_DELTA))
        exch = case_exchangeability(case_aggregates or {}, self.reference, delta)
        void = void_reason(exch)
        return {"organ_quality": self._organ_block(void), "exchangeability": exch,
                "conformal_extra": self._conformal_extra(void, regions_map), "margins_void": void}

    def _organ_block(self, void: str | None) -> dict | None:
        from ..calibration.organ_quality import case_intervals, organ_line

        if not self.quality or not self.features:
            return None
        q = self.quality
        organs = case_intervals(q, self.features)
        for name, entry in organs.items():
            entry["text"] = organ_line(name, entry, q["alpha"], q["tolerance_mm"], void)
        n = q.get("n_cases", 0)
        return {"alpha": q["alpha"], "coverage": 1 - q["alpha"], "tolerance_mm": q["tolerance_mm"],
                "n_calibration_cases": n, "min_cases": q.get("min_cases"), "method": q.get("method"),
                "source": q.get("source"), "trivial": n < q.get("min_cases", 0), "void": void,
                "guarantee": (f"each organ's interval holds its true Dice (and surface Dice at {q['tolerance_mm']:g} mm) "
                              f"with probability ≥ {100 * (1 - q['alpha']):.0f} % over exchangeable cases"),
                "organs": organs}

    def _conformal_extra(self, void: str | None, regions_map: str | None) -> dict:
        from ..calibration.contour_conformal import guarantee_text as contour_text
        from .margins import selected_error

        conf = self.conf
        if not conf:
            return {}
        voxel = self.geometry.voxel_volume_mm3
        margins = {}
        for (kind, key, c), counts in self.margin_counts.items():
            margins.setdefault(kind, {}).setdefault(key, {})[self.names[c]] = {
                "outer_band_mm3": round(float(counts[0] * voxel), 3), "inner_band_mm3": round(float(counts[1] * voxel), 3),
                "total_mm3": round(float(counts.sum() * voxel), 3)}
        smallest = {}
        for kind, by_map in self.flag_burden.items():
            keys = sorted({k for v in by_map.values() for k in v}, key=float)
            smallest[kind] = {k: min((m for m in by_map if k in by_map[m]), key=lambda m: by_map[m][k]["total_mm3"])
                              for k in keys}
        n = conf.get("n_cases", 0)
        alphas = conf.get("alphas") or [conf["alpha"]]
        out = {"error": selected_error(conf), "void": void,
               "burden": {"unit": "mm³", "flags": self.flag_burden, "margins": margins,
                          "smallest_flag_burden": smallest,
                          "note": "flagged volume in the ROI per map and α (total, and per nearest predicted "
                                  "organ); margin bands per organ (outer ∖ prediction, prediction ∖ inner)"},
               "cases_needed": {f"{a:g}": min_cases(a) for a in alphas},
               "n_calibration_cases": n}
        contour = conf.get("contour")
        if contour:
            a, tol = conf["alpha"], contour["tolerance_mm"]
            from ..calibration.conformal import _flag_rule, at_alpha

            th = at_alpha({"alpha": a, "flags": contour.get("flags")}, "flags", regions_map) if regions_map else None
            out["contour"] = {"tolerance_mm": tol, "guarantee": contour_text(a, "flags", tol),
                              "flags": {"map": regions_map, "tau_score": th["tau"], "trivial": th["trivial"],
                                        "rule": _flag_rule(regions_map, th)} if th else None,
                              "margins": {"outer": contour_text(a, "outer", tol), "inner": contour_text(a, "inner", tol)}
                              if contour.get("margins") else None}
        return out


def apply_blocks(summary: dict, blocks: dict) -> None:
    """Put the collector's blocks into the case's summary dict (additive keys only)."""
    summary["organ_quality"] = blocks["organ_quality"]
    summary["exchangeability"] = blocks["exchangeability"]
    if summary.get("conformal") is not None:
        summary["conformal"].update(blocks["conformal_extra"])
    if summary.get("margins") is not None:
        summary["margins"]["void"] = blocks["margins_void"]
