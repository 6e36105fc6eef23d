"""Evaluation of ``bench/openkbp_local.py``: fit every calibrator on the calibration cases, measure
them on the test cases, case triage and the OOD rank (see that script's docstring)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from CalibUncertaintyLib.calibration.local_temperature import (ClassTemperatureScaler, LocalTemperatureScaler,
                                                                contour_distance_mm, cross_validated_nll)
from CalibUncertaintyLib.calibration.roi import roi_mask
from CalibUncertaintyLib.calibration.sampling import stratified_sample_indices
from CalibUncertaintyLib.calibration.temperature import TemperatureScaler, apply_temperature, safe_log
from CalibUncertaintyLib.calibration.vector_scaling import VectorScaler, apply_vector_scaling
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.metrics.case_quality import AGGREGATES, case_aggregates, case_quality_summary
from CalibUncertaintyLib.metrics.dice import dice_per_class, mean_dice
from CalibUncertaintyLib.metrics.ece import foreground_ece, top_label_ece
from CalibUncertaintyLib.metrics.nll_brier import brier, nll

log = logging.getLogger("bench.openkbp_local.eval")
CALIBRATORS = ("uncalibrated", "global", "class", "local", "vector")
ROI_MM = 15.0
FLAG_QUANTILE = 0.95


_EXPECTED_ENTROPY: dict = {}


def load_case(dirs, case: str):
    """Pooled p̄ (K, z, y, x) float32 of the members and the spacing (z, y, x) in mm. The members'
    mean entropy (for the mutual information) is kept in ``_EXPECTED_ENTROPY[case]``."""
    acc = None
    eh = 0.0
    for d in dirs:
        with np.load(Path(d) / f"{case}.npz") as z:
            p = z["probabilities"].astype(np.float32)
        eh = eh + _entropy(p)
        acc = p if acc is None else acc + p
    _EXPECTED_ENTROPY.clear()
    _EXPECTED_ENTROPY[case] = eh / len(dirs)
    pbar = acc / len(dirs)
    with open(Path(dirs[0]) / f"{case}.pkl", "rb") as f:
        spacing = tuple(float(s) for s in pickle.load(f)["spacing"])
    return pbar, spacing


def _label(labels_dir: Path, case: str) -> np.ndarray:
    arr, _ = read_image(labels_dir / f"{case}.nii.gz")
    return np.asarray(arr).astype(np.int64)


def fit_all(dirs, labels_dir, cal_ids, max_vox, seed):
    xs, ys, ps, ds, cs = [], [], [], [], []
    for ci, case in enumerate(cal_ids):
        pbar, spacing = load_case(dirs, case)
        lab = _label(labels_dir, case)
        seg = np.argmax(pbar, axis=0)
        roi = roi_mask(seg, spacing, ROI_MM, allow_empty=True)
        if not roi.any():
            continue
        dist = contour_distance_mm(seg, spacing)
        vox = np.flatnonzero(roi.ravel())
        vox = vox[stratified_sample_indices(lab.ravel()[vox], max_vox, seed=seed + ci)]
        xs.append(safe_log(pbar.reshape(pbar.shape[0], -1)[:, vox].T).astype(np.float64))
        ys.append(lab.ravel()[vox])
        ps.append(seg.ravel()[vox])
        ds.append(dist.ravel()[vox])
        cs.append(np.full(vox.size, ci))
    if not xs:
        return None, None
    x, y, p, d, c = (np.concatenate(a) for a in (xs, ys, ps, ds, cs))
    fitted = {"global": TemperatureScaler().fit(x, y),
              "class": ClassTemperatureScaler().fit(x, y, p),
              "local": LocalTemperatureScaler().fit(x, y, p, d),
              "vector": VectorScaler().fit(x, y)}
    cv = {name: cross_validated_nll(kind, x, y, p, d, c)
          for name, kind in (("global", "global"), ("class", "class_temperature"), ("local", "local_temperature"))}
    cv["uncalibrated"] = {"nll": float(np.mean(-x[np.arange(y.size), y]))}
    info = {"n_voxels": int(y.size), "cv_nll": cv,
            "global_T": float(fitted["global"].temperature_),
            "class_T": fitted["class"].table_[:, 0].tolist(),
            "local_T": fitted["local"].table_.tolist(), "local_counts": fitted["local"].counts_.tolist(),
            "edges_mm": list(fitted["local"].edges_mm),
            "vector": {"w": fitted["vector"].w_.tolist(), "b": fitted["vector"].b_.tolist()}}
    return fitted, info


def calibrate(name, fitted, pbar, spacing):
    if name == "uncalibrated":
        return pbar
    if name == "global":
        return apply_temperature(pbar, fitted["global"].temperature_)
    if name in ("class", "local"):
        return fitted[name].transform_volume(pbar, spacing)
    return apply_vector_scaling(pbar, fitted["vector"].w_, fitted["vector"].b_).astype(np.float32)


def _metrics(q, lab, mask, k):
    if mask is not None and not mask.any():  # nothing predicted: no ROI, ROI metrics undefined
        return None
    fg = foreground_ece(q, lab, mask)
    return {"nll": nll(q, lab, mask), "ece": top_label_ece(q, lab, mask),
            "ece_class": float(np.mean([fg[c] for c in range(1, k) if fg.get(c) is not None])),
            "brier": brier(q, lab, mask)}


def _entropy(q):
    return -np.sum(q * safe_log(q), axis=0)


def _aggregates(q, spacing, tau, pbar=None, case=None):
    from scipy import ndimage

    seg = np.argmax(q, axis=0)
    roi = roi_mask(seg, spacing, ROI_MM, allow_empty=True)
    u = _entropy(q)
    vv = float(np.prod(spacing))
    lab, n = ndimage.label((u > tau) & roi, structure=np.ones((3, 3, 3)))
    vols = (np.bincount(lab.ravel())[1:] * vv).tolist() if n else []
    out = case_aggregates(u, roi, seg > 0, tau, vols, vv)
    out["roi_voxels"] = int(roi.sum())
    if case in _EXPECTED_ENTROPY and pbar is not None:  # mutual information of the members (0 for one)
        mi = _entropy(pbar) - _EXPECTED_ENTROPY[case]
        out["mean_mi_roi"] = float(mi[roi].mean()) if roi.any() else None
    out["predicted_fg_mm3"] = float((seg > 0).sum() * vv)
    return out


def evaluate_configuration(dirs, labels_dir, cal_ids, test_ids, ood_id, max_vox, default, seed=0) -> dict:
    fitted, info = fit_all(dirs, labels_dir, cal_ids, max_vox, seed)
    if fitted is None:
        return {"skipped": "the ensemble predicts no organ on any calibration case (no ROI, nothing to calibrate): "
                           "the model learned nothing"}
    # flag threshold for triage: pooled ROI entropy quantile of the default calibrator on the cal cases
    ents = []
    for case in cal_ids:
        pbar, spacing = load_case(dirs, case)
        q = calibrate(default, fitted, pbar, spacing)
        roi = roi_mask(np.argmax(pbar, axis=0), spacing, ROI_MM, allow_empty=True)
        ents.append(_entropy(q)[roi])
    tau = float(np.quantile(np.concatenate(ents), FLAG_QUANTILE))
    per_case = []
    for case in test_ids:
        pbar, spacing = load_case(dirs, case)
        lab = _label(labels_dir, case)
        k = pbar.shape[0]
        seg0 = np.argmax(pbar, axis=0)
        roi = roi_mask(seg0, spacing, ROI_MM, allow_empty=True)
        rec = {"case": case, "roi_voxels": int(roi.sum())}
        for name in CALIBRATORS:
            q = calibrate(name, fitted, pbar, spacing)
            seg = np.argmax(q, axis=0)
            own = roi_mask(seg, spacing, ROI_MM, allow_empty=True)
            rec[name] = {"roi": _metrics(q, lab, roi, k), "image": _metrics(q, lab, None, k),
                         "own_roi_nll": nll(q, lab, own) if own.any() else None,
                         "dice": mean_dice(dice_per_class(seg, lab, k)),
                         "seg_changed_voxels": int(np.count_nonzero(seg != seg0)),
                         "seg_changed_roi_voxels": int(np.count_nonzero((seg != seg0) & roi))}
            if name == default:
                rec["triage"] = _aggregates(q, spacing, tau, pbar, case)
        per_case.append(rec)
        log.info("test case %s done", case)
    dice = [r["uncalibrated"]["dice"] for r in per_case]
    triage = {"tau": tau, "tau_rule": f"{FLAG_QUANTILE} quantile of the calibrated entropy in the calibration "
                                      f"cases' ROIs ({default} calibrator)",
              "summary": case_quality_summary([r["triage"] for r in per_case], dice)}
    if len(dirs) > 1:
        from CalibUncertaintyLib.metrics.case_quality import correlations, risk_coverage

        mi = [r["triage"].get("mean_mi_roi") for r in per_case]
        triage["summary"]["mean_mi_roi"] = {**correlations(mi, dice), "risk_coverage": risk_coverage(mi, dice)}
    if ood_id:
        pbar, spacing = load_case(dirs, ood_id)
        ood = _aggregates(calibrate(default, fitted, pbar, spacing), spacing, tau, pbar, ood_id)
        ranks = {}
        for a in (*AGGREGATES, "mean_mi_roi"):
            vals = [r["triage"][a] for r in per_case]
            o = ood[a]
            ranks[a] = {"ood": o, "max_test": max((v for v in vals if v is not None), default=None),
                        "above_every_test_case": (o is not None and all(v is None or o > v for v in vals))}
        triage["ood"] = {"case": ood_id, "aggregates": ood, "ranks": ranks}
    mean = {}
    for name in CALIBRATORS:
        m = {}
        for region in ("roi", "image"):
            for key in ("nll", "ece", "ece_class", "brier"):
                vals = [r[name][region][key] for r in per_case if r[name][region] is not None]
                m[f"{region}_{key}"] = float(np.mean(vals)) if vals else None
        own = [r[name]["own_roi_nll"] for r in per_case if r[name]["own_roi_nll"] is not None]
        m["own_roi_nll"] = float(np.mean(own)) if own else None
        m["n_cases_with_roi"] = int(sum(r[name]["roi"] is not None for r in per_case))
        m["dice"] = float(np.mean([r[name]["dice"] for r in per_case]))
        m["seg_changed_voxels"] = int(sum(r[name]["seg_changed_voxels"] for r in per_case))
        m["seg_changed_roi_voxels"] = int(sum(r[name]["seg_changed_roi_voxels"] for r in per_case))
        m["cases_unchanged"] = int(sum(r[name]["seg_changed_voxels"] == 0 for r in per_case))
        mean[name] = m
    return {"fit": info, "mean": mean, "per_case": per_case, "triage": triage, "n_test": len(per_case)}
