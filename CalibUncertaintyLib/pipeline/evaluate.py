"""Evaluate an ensemble before and after calibration on held-out cases (``calib-uncertainty evaluate``).

Per case (METHODS.md §2–§6; definitions restated in the functions used):

- before = p̄ = (1/M) Σ_m p_m (uncalibrated); after = the calibration file applied (pool then
  calibrate: softmax(log p̄ / T); per member: mean of softmax(log p_m / T); vector scaling).
- Segmentation = argmax of the calibrated probability (identical to argmax p̄ for temperature
  scaling in pool-then-calibrate mode; ``segmentation_unchanged`` says whether it is).
- ROI: the calibration file's rule and radius unless overridden: voxels within R mm of the
  predicted foreground ("prediction") or of reference ∪ prediction ("gt_union_prediction").
  Each stage is measured on **its own** prediction's ROI (region "roi": "before" on the ROI of
  argmax p̄, "after" on the ROI of the calibrated segmentation), and both stages also on **one
  shared ROI** (region "shared_roi": the uncalibrated prediction's ROI, the same voxels for
  both, for comparisons). They differ only when the calibrator changes the segmentation (vector
  scaling, per-member scaling); error detection and case quality use the "after" ROI.
- Calibration metrics (``metrics.summary.calibration_summary``) inside the ROI and over the
  whole image, both labelled: NLL = mean −log p_y; Brier = mean over voxels of
  Σ_c (p_c − y_c)² (multi-class; for K = 2 also the binary Brier, half of it); top-label ECE,
  MCE, ACE with 15 equal-width bins, foreground ECE per class, pECE (λ = 2, 10 bins).
- Dice per foreground class (empty-vs-empty = 1, flagged).
- Error detection per map with the calibration file's τ* (quantile entries resolved on the
  case): UEO, error recall and precision, voxel AUROC, budget curve (top k % of ROI voxels,
  k ≤ 5 %) and its normalised area, boundary / non-boundary error recall
  (``metrics.error_detection.error_detection_report``). The error mask is prediction ≠
  reference inside the ROI.
- Conformal guarantees (METHODS.md §7; ``metrics.conformal_check``): per map and α the
  held-out miss rate of the conformal flags, per class and α the outer margin's miss rate and the
  inner margin's 1 − precision; mean ± standard error over cases against α.
- Case quality (METHODS.md §6) from the regions map (default DAE): mean U in the ROI, Σ U over
  the foreground, largest region, fraction of foreground flagged; across cases their Pearson /
  Spearman correlation with the mean Dice and the risk–coverage AURC.
- Case triage (``metrics.triage``): per case the aggregates above plus the atypicality aggregates
  of the whole body (``metrics.atypicality``: fraction of the body with entropy / mutual information
  above the calibration cases' 0.99 quantile, and its p-value against the calibration cases; only
  with a calibration file that holds a ``case_reference``); the review priority is the aggregate
  ``EvalOptions.priority`` (default ``metrics.triage.DEFAULT_PRIORITY``); ranking, risk–coverage curve of every
  aggregate (risk = 1 − mean Dice) and correlations with Dice.

UEO-against-τ curves for the plots are computed on a uniform random subsample of at most
``curve_max_voxels`` ROI voxels per case (fixed seed), lowered for large cohorts so that all cases
together keep at most ``CURVE_TOTAL_VOXELS`` (these samples travel back to the driver; at least
``CURVE_MIN_VOXELS`` per case); every number in the tables uses all voxels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..io.nnunet_outputs import Pairing
from .dataset import read_label
from ..metrics.triage import DEFAULT_PRIORITY
from .ensemble import accumulate, calibrated_probs, case_maps

log = logging.getLogger(__name__)

STAGES = ("before", "after")
REGIONS = ("roi", "whole_image")  # regions with reliability tables and plots
METRIC_REGIONS = ("roi", "shared_roi", "whole_image")  # regions of the metric tables
N_TAU = 60
CURVE_TOTAL_VOXELS = 4_000_000
CURVE_MIN_VOXELS = 10_000


@dataclass
class EvalOptions:
    """Options of ``evaluate_cases`` (distances in mm). None = take it from the calibration file."""

    roi_radius_mm: float | None = None
    roi_rule: str | None = None
    n_bins: int = 15
    regions_map: str = "dae"
    dae_sigma_mm: float = 2.0
    ebcu_radius_mm: float = 4.0
    min_region_mm3: float = 10.0
    curve_max_voxels: int = 200_000
    seed: int = 0
    priority: str = DEFAULT_PRIORITY  # review priority: an aggregate of metrics.triage.PRIORITIES


def _metrics_block(summary: dict | None, class_names: list[str]) -> dict | None:
    if summary is None:
        return None
    return {"n_voxels": summary["n_voxels"], "nll": summary["nll"], "brier_multiclass": summary["brier_multiclass"],
            "brier_binary": summary["brier_binary"], "ece_top": summary["ece_top"], "mce_top": summary["mce_top"],
            "ace_top": summary["ace_top"], "pece": summary["pece"],
            "ece_fg": {class_names[int(c)]: v for c, v in summary["ece_fg"].items()}}


def evaluate_case(cf, pairing: Pairing, calibration, opts: EvalOptions) -> tuple[dict, dict]:
    """One case -> (record for tables/JSON, plot data: reliability tables and curve samples)."""
    from ..calibration.roi import roi_mask
    from ..calibration.thresholds import threshold_entry, threshold_for_case, uncertainty_score
    from ..metrics.case_quality import case_aggregates
    from ..metrics.dice import dice_per_class, mean_dice
    from ..metrics.error_detection import error_detection_report, error_mask
    from ..metrics.summary import calibration_summary
    from ..regions.components import component_volumes, find_regions
    from ..uncertainty.maps import ENSEMBLE_ONLY_MAPS, MAP_NAMES, segmentation
    from ..metrics.conformal_check import case_check as conformal_case_check
    from .case import map_threshold_info

    t0 = time.perf_counter()
    k, names = pairing.n_classes, pairing.class_names
    mode = calibration.ensemble_mode
    labels = read_label(cf, k)
    acc = accumulate(cf.load_members(k), n_members=len(cf.member_dirs))
    p_before = acc.mean_probs()
    if mode == "per_member":
        acc = accumulate(cf.load_members(k), calibration, mode, n_members=len(cf.member_dirs))
    p_after = calibrated_probs(acc, calibration, mode, cf.geometry.spacing_zyx)
    seg_before, seg = segmentation(p_before), segmentation(p_after)
    rule = opts.roi_rule or calibration.roi["rule"]
    radius = opts.roi_radius_mm if opts.roi_radius_mm is not None else float(calibration.roi["radius_mm"])
    roi = roi_mask(seg, cf.geometry.spacing_zyx, radius, reference=labels, rule=rule, allow_empty=True)
    unchanged = bool(np.array_equal(seg, seg_before))
    roi_before = roi if unchanged else roi_mask(seg_before, cf.geometry.spacing_zyx, radius, reference=labels,
                                                rule=rule, allow_empty=True)
    stage_roi = {"before": roi_before, "after": roi}
    notes = []
    if not labels.any():
        notes.append("empty reference label: Dice of every class follows the empty-reference "
                     "convention and every predicted foreground voxel is an error")
    if not roi.any():
        notes.append("empty ROI (nothing predicted" + ("" if rule == "prediction" else " nor in the reference")
                     + "): ROI metrics and error detection are undefined for this case")

    metrics, reliability = {}, {}
    for stage, p in (("before", p_before), ("after", p_after)):
        metrics[stage] = {}
        own = stage_roi[stage]
        for region, mask in (("roi", own), ("shared_roi", roi_before), ("whole_image", None)):
            if region == "shared_roi" and own is roi_before:  # the same voxels: the same numbers
                metrics[stage][region] = metrics[stage]["roi"]
                continue
            if mask is not None and not mask.any():
                metrics[stage][region] = None
                continue
            s = calibration_summary(p, labels, mask, n_bins=opts.n_bins)
            metrics[stage][region] = _metrics_block(s, names)
            if region in REGIONS:
                reliability[(stage, region)] = s["reliability_top"]
    del p_before

    dice = dice_per_class(seg, labels, k)
    record = {
        "case": cf.case, "n_members": acc.n_members, "ensemble_mode": mode,
        "roi": {"rule": rule, "radius_mm": radius, "n_voxels": int(roi.sum()),
                "n_voxels_before": int(roi_before.sum())},
        "segmentation_unchanged": unchanged,
        "dice": {names[c]: d["dice"] for c, d in dice.items()},
        "dice_empty_reference": [names[c] for c, d in dice.items() if d["empty_reference"]],
        "mean_dice": mean_dice(dice),
        "metrics": metrics, "error_detection": {}, "quality": None, "notes": notes,
    }
    if not record["segmentation_unchanged"]:
        record["dice_before"] = {names[c]: d["dice"] for c, d in dice_per_class(seg_before, labels, k).items()}

    plot = {"reliability": reliability, "curves": {}}
    record["atypicality"] = {}
    if not roi.any():
        record["atypicality"] = case_atypicality(cf, calibration, seg, k, acc=acc, p_after=p_after, mode=mode)
    if roi.any():
        map_info: dict = {}
        maps = case_maps(acc, p_after, cf.geometry, calibration, mode, names=list(MAP_NAMES),
                         dae_sigma_mm=opts.dae_sigma_mm, ebcu_radius_mm=opts.ebcu_radius_mm, roi=roi,
                         info=map_info)
        acc_members = acc.n_members
        record["conformal"] = conformal_case_check(calibration, maps, seg, labels, roi, p_after, names)
        record["atypicality"] = case_atypicality(cf, calibration, seg, k, maps)
        from ..metrics.guarantee_check import case_check as guarantee_case_check

        record["guarantees"] = guarantee_case_check(calibration, maps, seg, labels, roi, p_after, names,
                                                    cf.geometry.spacing_zyx, record["atypicality"])
        del acc, p_after
        # Every error-detection number only looks at ROI voxels and (for the contour zone) their
        # 26-neighbours, so it is computed on the ROI bounding box grown by 2 voxels: exact, cheaper.
        box = _roi_box(roi, pad=2)
        seg_b, lab_b, roi_b = seg[box], labels[box], roi[box]
        errors = error_mask(seg_b, lab_b, roi_b)
        rng = np.random.default_rng(opts.seed)
        vox = np.flatnonzero(roi_b.ravel())
        if vox.size > opts.curve_max_voxels:
            vox = np.sort(rng.choice(vox, opts.curve_max_voxels, replace=False))
        err_sample = errors.ravel()[vox]
        single = acc_members == 1
        for name in MAP_NAMES:
            if single and name in ENSEMBLE_ONLY_MAPS:
                record["error_detection"][name] = {"applicable": False, "not_applicable": NOT_APPLICABLE_ONE_MEMBER}
                continue
            entry = threshold_entry(name, calibration.thresholds)
            info = map_threshold_info(name, entry, threshold_for_case(entry, maps[name], roi))
            score = uncertainty_score(name, maps[name][box])
            rep = error_detection_report(score, seg_b, lab_b, info["tau_score"], roi_b)
            at, bs, budget = rep["at_tau"], rep["boundary_split"], rep["budget"]
            record["error_detection"][name] = {
                "kind": info["kind"], "source": info["source"], "tau_score": info["tau_score"],
                "tau_abs": info["tau_abs"], "flag": info["flag"], "ueo": at["ueo"], "recall": at["recall"],
                "precision": at["precision"], "auroc": rep["auroc"], "n_errors": at["n_errors"],
                "n_flagged": at["n_flagged"], "budget_area": budget["normalised_area"],
                "oracle_budget_area": budget["oracle_normalised_area"],
                "boundary_recall": bs["boundary"]["recall"], "non_boundary_recall": bs["non_boundary"]["recall"],
                "boundary_error_fraction": bs["boundary_error_fraction"], "applicable": True}
            plot["curves"][name] = {"score": score.ravel()[vox].astype(np.float32), "errors": err_sample,
                                    "tau_score": info["tau_score"],
                                    "budget": {"fractions": budget["fractions"], "ueo": budget["ueo"],
                                               "oracle_ueo": budget["oracle_ueo"]}}
        rmap = opts.regions_map
        r = record["error_detection"][rmap]
        if not r["applicable"]:
            notes.append(f"regions map {rmap} is {NOT_APPLICABLE_ONE_MEMBER}: no case-level quality")
            record["ebcu_threshold"] = map_info.get("ebcu_threshold")
            record["time_s"] = round(time.perf_counter() - t0, 3)
            return record, plot
        score = uncertainty_score(rmap, maps[rmap])
        regions = find_regions(score, r["tau_score"], roi, seg, cf.geometry, class_names=names,
                               min_volume_mm3=opts.min_region_mm3)
        record["quality"] = {"map": rmap, **case_aggregates(score, roi, seg > 0, r["tau_score"],
                                                           component_volumes(regions),
                                                           cf.geometry.voxel_volume_mm3),
                             "n_regions": len(regions)}
        record["ebcu_threshold"] = map_info.get("ebcu_threshold")
    record["time_s"] = round(time.perf_counter() - t0, 3)
    return record, plot


def check_priority_available(priority: str, calibration) -> None:
    """Refuse, before any work, a review priority this calibration file cannot give."""
    from ..metrics.atypicality import ATYPICALITY_AGGREGATES
    from ..metrics.triage import check_priority

    check_priority(priority)
    if priority in ATYPICALITY_AGGREGATES and priority not in ((calibration.case_reference or {}).get("scores") or {}):
        why = ("has no atypicality reference (fitted before it existed): refit it with fit-temperature"
               if not calibration.case_reference else "was fitted on one member (no mutual information)")
        raise InputError(f"review priority {priority} needs the calibration cases' reference, but the calibration "
                         f"file {why}")


def case_atypicality(cf, calibration, seg, n_classes: int, maps: dict | None = None, acc=None, p_after=None,
                     mode=None) -> dict:
    """The case's atypicality aggregates (``metrics.atypicality``) against the calibration file's
    ``case_reference`` ({} without one). ``seg``: the segmentation (its predicted volume per class);
    ``maps`` holds the entropy and MI when already computed, else they are computed from ``acc``
    and ``p_after``."""
    from ..metrics.atypicality import OOD_AGGREGATES, case_atypicality as atyp, read_case_domain

    ref = calibration.case_reference
    if not ref:
        return {}
    if maps is None or any(m not in maps for m in OOD_AGGREGATES.values()):
        maps = case_maps(acc, p_after, cf.geometry, calibration, mode, names=list(OOD_AGGREGATES.values()))
    dom = read_case_domain(cf.image_paths[0] if cf.image_paths else None, cf.geometry.shape_zyx, ref["domain"])
    vols = np.bincount(seg.ravel(), minlength=n_classes)[1:n_classes] * cf.geometry.voxel_volume_mm3
    return atyp(maps, dom, ref, volumes_mm3=vols)


NOT_APPLICABLE_ONE_MEMBER = "not applicable with one member (members cannot disagree)"


def _roi_box(roi: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Bounding box of ``roi`` grown by ``pad`` voxels per side (clipped to the image)."""
    idx = [np.flatnonzero(roi.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + 1 + pad, n)) for i, n in zip(idx, roi.shape))


def _ueo_curve(scores: np.ndarray, errors: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """UEO(τ) = 2|{s > τ} ∩ E| / (|{s > τ}| + |E|) on one case's sample (1 when both are empty)."""
    order = np.sort(scores)
    err_sorted = np.sort(scores[errors])
    n_f = scores.size - np.searchsorted(order, taus, side="right")
    tp = err_sorted.size - np.searchsorted(err_sorted, taus, side="right")
    denom = n_f + int(errors.sum())
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)


def _pooled_curves(plots: list[dict]) -> tuple[dict, dict]:
    """Mean UEO-vs-τ and mean budget curve per map over the cases that have them."""
    from ..calibration.thresholds import LOWER_IS_UNCERTAIN
    from ..uncertainty.maps import MAP_NAMES

    ueo_curves, budget_curves = {}, {}
    for name in MAP_NAMES:
        parts = [p["curves"][name] for p in plots if name in p["curves"]]
        if not parts:
            continue
        pooled = np.concatenate([c["score"] for c in parts])
        lo, hi = float(pooled.min()), float(pooled.max())
        taus = np.linspace(lo, hi if hi > lo else lo + 1e-6, N_TAU)
        mean = np.mean([_ueo_curve(c["score"], c["errors"], taus) for c in parts], axis=0)
        stars = [c["tau_score"] for c in parts if c["tau_score"] is not None]
        below = name in LOWER_IS_UNCERTAIN
        ueo_curves[name] = {"label": f"{name} (score = 1 − map)" if below else name,
                            "tau": taus.tolist(), "ueo": mean.tolist(),
                            "tau_star": float(np.mean(stars)) if stars else None}
        fr = parts[0]["budget"]["fractions"]
        u = np.mean([c["budget"]["ueo"] for c in parts], axis=0)
        o = np.mean([c["budget"]["oracle_ueo"] for c in parts], axis=0)
        area = float(np.trapezoid(np.concatenate(([0.0], u)), np.concatenate(([0.0], fr))) / fr[-1])
        budget_curves[name] = {"fractions": fr, "ueo": u.tolist(), "oracle_ueo": o.tolist(), "normalised_area": area}
    return ueo_curves, budget_curves


@dataclass
class EvalJob:
    """What every case of an evaluation shares (sent once to each Ray worker)."""

    pairing: Pairing
    calibration: object
    opts: EvalOptions


def evaluate_one(job: EvalJob, cf) -> tuple[dict, dict]:
    """The per-case function of every executor: ``evaluate_case`` of one ``CaseFiles``."""
    return evaluate_case(cf, job.pairing, job.calibration, job.opts)


def evaluate_cases(pairing: Pairing, calibration, opts: EvalOptions | None = None, inputs: dict | None = None,
                   executor=None) -> dict:
    """Evaluate every paired case; returns the evaluation dict (JSON-ready, see ``write_evaluation``).

    Map–reduce: ``evaluate_one`` per case (local loop or Ray tasks, ``executor``), then in case
    order, whatever order they finished in: the per-case tables are concatenated, the reliability
    tables pooled by summing bin counts (``report.tables.merge_reliability_tables``; the cohort
    ECE is computed from those sums, not averaged), the UEO and budget curves averaged over
    cases, and the case-quality correlations computed over the per-case aggregates. Every one of
    these is exact under the merge (sums and per-case values, no approximation), so the result
    equals the local executor's. A case that fails is listed under ``cohort.failed`` and in the
    notes; the others are evaluated (InputError when none is).
    """
    from ..calibration.roi import describe_roi
    from ..cohort.executor import run_cohort
    from ..metrics.case_quality import case_quality_summary
    from ..metrics.conformal_check import summarise as conformal_summary
    from ..metrics.guarantee_check import summarise as guarantee_summary
    from ..report.tables import ece_from_table, merge_reliability_tables

    opts = opts or EvalOptions()
    check_priority_available(opts.priority, calibration)
    if any(cf.label_path is None for cf in pairing.cases):
        raise InputError("evaluation needs reference labels for every case (--labels)")
    n_all = max(len(pairing.cases), 1)
    cap = max(CURVE_MIN_VOXELS, CURVE_TOTAL_VOXELS // n_all)
    opts = replace(opts, curve_max_voxels=min(opts.curve_max_voxels, cap))
    job = EvalJob(Pairing([], pairing.n_classes, pairing.class_names, pairing.dataset_json), calibration, opts)
    result = run_cohort(evaluate_one, job, [(cf.case, cf) for cf in pairing.cases], executor, desc="evaluate")
    if not result.results:
        raise result.error(resumable=False)
    done = [cf for cf in pairing.cases if cf.case in result.results]
    overlap = sorted(set(calibration.case_ids) & {cf.case for cf in done})
    records = [result.results[cf.case][0] for cf in done]
    plots = [result.results[cf.case][1] for cf in done]
    n = len(done)
    rule = opts.roi_rule or calibration.roi["rule"]
    radius = opts.roi_radius_mm if opts.roi_radius_mm is not None else float(calibration.roi["radius_mm"])
    reliability = {f"{stage}_{region}": merge_reliability_tables([p["reliability"][(stage, region)] for p in plots
                                                                 if (stage, region) in p["reliability"]])
                   for stage in STAGES for region in REGIONS}
    ueo_curves, budget_curves = _pooled_curves(plots)
    from ..metrics.triage import triage_summary

    triage = triage_summary([r["case"] for r in records], [case_triage_aggregates(r) for r in records],
                            [r["mean_dice"] for r in records], opts.priority)
    with_quality = [r for r in records if r["quality"] is not None]
    quality = case_quality_summary([r["quality"] for r in with_quality], [r["mean_dice"] for r in with_quality]) \
        if with_quality else {}
    notes = list(pairing.notes)
    for case, err in result.failed.items():
        notes.append(f"case {case} failed and is not in this evaluation: {err}")
    if overlap:
        notes.append(f"{len(overlap)} evaluated case(s) were also used to fit the calibration "
                     f"({', '.join(overlap)}): their 'after' numbers are not held-out")
    return {
        "format": "calib-uncertainty-evaluation", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__, "inputs": dict(inputs or {}),
        "class_names": pairing.class_names, "n_members": pairing.n_members, "n_cases": n,
        "calibration": {"path": calibration.source_path, "description": calibration.describe(),
                        "method": calibration.method, "ensemble_mode": calibration.ensemble_mode,
                        "temperature": calibration.temperature, "vector": calibration.vector,
                        "fitted_on_cases": calibration.case_ids, "ebcu_threshold": calibration.ebcu_threshold,
                        "roi": calibration.roi, "other_ensemble_mode": calibration.extra.get("other_ensemble_mode")},
        "roi": {"rule": rule, "radius_mm": radius, "description": describe_roi(rule, radius)},
        "conventions": {
            "brier": "multi-class Brier: mean over voxels of sum_c (p_c - y_c)^2 (for K = 2 this is twice "
                     "the binary Brier of scikit-learn, also given as brier_binary)",
            "ece": f"{opts.n_bins} equal-width bins, last bin closed at 1.0; top-label (conf = max_c p_c) "
                   "and foreground per class (conf = p_c)",
            "pece": "pixel-wise ECE with false-positive penalty, lambda = 2, 10 bins, foreground view",
            "regions": "'roi' = inside the ROI described above, each stage on its own prediction's ROI "
                       "('before': ROI of the uncalibrated argmax; 'after': ROI of the calibrated segmentation); "
                       "'shared_roi' = both stages on one shared ROI, the uncalibrated prediction's (identical "
                       "voxels: use it to compare the stages); the two differ only where the calibration changed "
                       "the segmentation; 'whole_image' = every voxel of the image",
            "error_mask": "prediction != reference inside the ROI",
        },
        "options": asdict(opts), "held_out_overlap": overlap, "notes": notes,
        "per_case": records, "reliability": reliability, "ueo_curves": ueo_curves,
        "budget_curves": budget_curves, "case_quality": quality, "triage": triage,
        "cohort_ece": {key: ece_from_table(table) for key, table in reliability.items()},
        "conformal": conformal_summary(calibration, [r.get("conformal") for r in records]),
        "guarantees": guarantee_summary(calibration, [r.get("guarantees") for r in records]),
        "cohort": result.record(),
    }


def metric_rows(evaluation: dict) -> list[dict]:
    """Long table: one row per case × calibration (before/after) × region (roi/whole_image)."""
    rows = []
    for rec in evaluation["per_case"]:
        for stage in STAGES:
            for region in METRIC_REGIONS:
                m = rec["metrics"][stage].get(region)
                if m is None:
                    continue
                row = {"case": rec["case"], "calibration": stage, "region": region}
                row.update({k: v for k, v in m.items() if k != "ece_fg"})
                row.update({f"ece_fg_{c}": v for c, v in m["ece_fg"].items()})
                rows.append(row)
    return rows


def detection_rows(evaluation: dict) -> list[dict]:
    """One row per case × map (error detection at τ*)."""
    return [{"case": rec["case"], "map": name, **vals}
            for rec in evaluation["per_case"] for name, vals in rec["error_detection"].items()]


def dice_rows(evaluation: dict) -> list[dict]:
    return [{"case": rec["case"], **{f"dice_{c}": v for c, v in rec["dice"].items()}, "mean_dice": rec["mean_dice"],
             "segmentation_unchanged": rec["segmentation_unchanged"],
             "empty_reference": " ".join(rec["dice_empty_reference"])} for rec in evaluation["per_case"]]


def case_triage_aggregates(rec: dict) -> dict:
    """Every case-level aggregate of one evaluated case: §6 (regions map) and atypicality."""
    from ..metrics.case_quality import AGGREGATES

    q = rec.get("quality") or {}
    return {**{a: q.get(a) for a in AGGREGATES}, **(rec.get("atypicality") or {})}


def quality_rows(evaluation: dict) -> list[dict]:
    """One row per case with §6 aggregates, in the triage's review order, with its rank."""
    by_case = {rec["case"]: rec for rec in evaluation["per_case"]}
    order = [r["case"] for r in evaluation["triage"]["ranking"]] if evaluation.get("triage") else list(by_case)
    recs = [by_case[c] for c in order if by_case[c]["quality"] is not None]
    return [{"review_rank": i + 1, "case": rec["case"], "mean_dice": rec["mean_dice"], **rec["quality"]}
            for i, rec in enumerate(recs)]


def triage_rows(evaluation: dict) -> list[dict]:
    """triage_cases.csv: every case in review order (rank 1 first), its priority value, risk and aggregates."""
    from ..metrics.triage import PRIORITIES

    t = evaluation["triage"]
    by_case = {rec["case"]: rec for rec in evaluation["per_case"]}
    rows = []
    for r in t["ranking"]:
        aggs = case_triage_aggregates(by_case[r["case"]])
        rows.append({"review_rank": r["rank"], "case": r["case"], "priority_aggregate": t["priority"],
                     "priority": "undefined (review first)" if r["undefined"] else r["priority"],
                     "mean_dice": r["mean_dice"], "risk": r["risk"],
                     **{a: aggs.get(a) for a in PRIORITIES if a in aggs},
                     **{k: v for k, v in aggs.items() if k.endswith("_p")}})
    return rows


def write_evaluation(out_dir, evaluation: dict) -> list[Path]:
    """Write the evaluation's files into ``out_dir`` (each atomically); returns their paths.

    metrics_per_case.csv, metrics_aggregate.csv (mean/std/median/min/max over cases per
    calibration × region), dice_per_case.csv, error_detection_per_case.csv,
    error_detection_aggregate.csv, case_quality.csv, triage_cases.csv (review order and priority),
    risk_coverage.csv, triage.json, risk_coverage.png (the triage), evaluation.json, reliability_roi.png,
    reliability_whole_image.png, ueo_vs_threshold.png, budget_curves.png,
    conformal_miss_vs_alpha.png (when the calibration file holds conformal thresholds), report.md.
    """
    from ..io.atomic import write_json, write_text
    from ..report import plots
    from ..report.tables import aggregate_rows, write_csv
    from ..report.text import render_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m_rows, d_rows = metric_rows(evaluation), detection_rows(evaluation)
    evaluation["aggregate"] = {"metrics": aggregate_rows(m_rows, ("calibration", "region")),
                               "error_detection": aggregate_rows(d_rows, ("map",), skip=(
                                   "case", "kind", "source", "flag", "applicable", "not_applicable")),
                               "dice": aggregate_rows(dice_rows(evaluation), (), skip=("case", "empty_reference"))}
    files = [write_csv(out / "metrics_per_case.csv", m_rows),
             write_csv(out / "metrics_aggregate.csv", evaluation["aggregate"]["metrics"]),
             write_csv(out / "dice_per_case.csv", dice_rows(evaluation)),
             write_csv(out / "error_detection_per_case.csv", d_rows),
             write_csv(out / "error_detection_aggregate.csv", evaluation["aggregate"]["error_detection"]),
             write_csv(out / "case_quality.csv", quality_rows(evaluation))]
    if evaluation.get("triage"):
        from ..metrics.triage import curve_rows

        files += [write_csv(out / "triage_cases.csv", triage_rows(evaluation)),
                  write_csv(out / "risk_coverage.csv", curve_rows(evaluation["triage"])),
                  write_json(out / "triage.json", evaluation["triage"]),
                  plots.risk_coverage_plot(out / "risk_coverage.png", evaluation["triage"],
                                           title=f"Case triage, {len(evaluation['triage']['ranking'])} cases "
                                                 f"(risk = 1 − mean Dice)")]
    rel = evaluation["reliability"]
    for region in REGIONS:
        label = "ROI" if region == "roi" else "whole image"
        files.append(plots.reliability_diagram(
            out / f"reliability_{region}.png",
            {f"before calibration ({label})": rel[f"before_{region}"],
             f"after calibration ({label})": rel[f"after_{region}"]},
            title=f"Top-label reliability, {len(evaluation['per_case'])} cases pooled ({label})"))
    if evaluation["ueo_curves"]:
        files.append(plots.ueo_threshold_plot(out / "ueo_vs_threshold.png", evaluation["ueo_curves"],
                                              title="UEO against threshold (score scale), mean over cases"))
        files.append(plots.budget_curve_plot(out / "budget_curves.png", evaluation["budget_curves"],
                                             title="Error detection under a review budget"))
    if evaluation.get("conformal"):
        files.append(plots.conformal_plot(out / "conformal_miss_vs_alpha.png", evaluation["conformal"],
                                          title="Conformal flags and margins on held-out cases"))
    files.append(write_json(out / "evaluation.json", evaluation))
    files.append(write_text(out / "report.md", render_report(evaluation)))
    return files
