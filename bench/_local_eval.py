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
CALIBRATORS = ("uncalibrated", "global", "class", "local", "local_nearest", "local_beyond", "vector")
#: the open-bin rules compared by leave-one-case-out on whole calibration images (local_temperature doc):
#: local = library default (T = 1 beyond the fitted ROI), local_nearest = the ROI's outer bin extrapolated,
#: local_beyond = open bin fitted on a uniform sample of voxels beyond the ROI
LOCAL_VARIANTS = ("local", "local_nearest", "local_beyond")
ROI_MM = 15.0
FLAG_QUANTILE = 0.95


_EXPECTED_ENTROPY: dict = {}
#: ``keep_in_memory``: (member folders, case) -> (p̄, spacing, mean member entropy), so repeated splits
#: of the same cases read each case's members once
_MEMORY: dict | None = None


def keep_in_memory(on: bool) -> None:
    """Keep every loaded case in memory (on) or not, emptying what is kept either way."""
    global _MEMORY
    _MEMORY = {} if on else None


def load_case(dirs, case: str):
    """Pooled p̄ (K, z, y, x) float32 of the members and the spacing (z, y, x) in mm. The members'
    mean entropy (for the mutual information) is kept in ``_EXPECTED_ENTROPY[case]``."""
    key = (tuple(str(d) for d in dirs), case)
    if _MEMORY is not None and key in _MEMORY:
        pbar, spacing, eh = _MEMORY[key]
        _EXPECTED_ENTROPY.clear()
        _EXPECTED_ENTROPY[case] = eh
        return pbar, spacing
    pbar, spacing = _load_case(dirs, case)
    if _MEMORY is not None:
        _MEMORY[key] = (pbar, spacing, _EXPECTED_ENTROPY[case])
    return pbar, spacing


def _load_case(dirs, case: str):
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


def check_learned(dirs, labels_dir, cal_ids, class_names, min_dice, name) -> dict:
    """Per-organ Dice of the pooled members on the calibration cases (organs present in the reference);
    raises CalibUncertaintyError when the mean is below ``min_dice`` (the models learned nothing)."""
    from CalibUncertaintyLib.errors import CalibUncertaintyError

    per = {}
    for case in cal_ids:
        pbar, _ = load_case(dirs, case)
        lab = _label(labels_dir, case)
        for c, v in dice_per_class(np.argmax(pbar, axis=0), lab, pbar.shape[0]).items():
            if not v["empty_reference"]:
                per.setdefault(c, []).append(v["dice"])
    per_class = {class_names[c] if c < len(class_names) else str(c): round(float(np.mean(v)), 3)
                 for c, v in sorted(per.items())}
    mean = float(np.mean(list(per_class.values()))) if per_class else 0.0
    log.info("%s: mean organ Dice %.3f on the calibration cases (%s)", name, mean,
             ", ".join(f"{k} {v:.3f}" for k, v in per_class.items()))
    if mean < min_dice:
        raise CalibUncertaintyError(f"{name}: mean organ Dice {mean:.3f} on the calibration cases is below "
                                    f"{min_dice:g}: the models did not learn (train longer or check the data)")
    return {"mean_dice": mean, "per_class": per_class}


def _case_rows(pbar, spacing, lab, max_vox, seed):
    """ROI rows (stratified by reference class) and beyond-ROI rows (uniform) of one case:
    {"roi": (x, y, pred, dist), "beyond": (...)}, or None when nothing is predicted."""
    seg = np.argmax(pbar, axis=0)
    roi = roi_mask(seg, spacing, ROI_MM, allow_empty=True)
    if not roi.any():
        return None
    dist = contour_distance_mm(seg, spacing)
    vox = np.flatnonzero(roi.ravel())
    vox = vox[stratified_sample_indices(lab.ravel()[vox], max_vox, seed=seed)]
    out_vox = np.flatnonzero(~roi.ravel())
    if out_vox.size > max_vox:
        out_vox = np.sort(np.random.default_rng(seed + 10_000).choice(out_vox, max_vox, replace=False))
    flat = pbar.reshape(pbar.shape[0], -1)

    def rows(v):
        return (safe_log(flat[:, v].T).astype(np.float64), lab.ravel()[v], seg.ravel()[v], dist.ravel()[v])

    return {"roi": rows(vox), "beyond": rows(out_vox)}


def _fit_variants(roi_rows, beyond_rows):
    """Global T and the three local variants fitted on ``roi_rows`` (+ ``beyond_rows`` for local_beyond)."""
    x, y, p, d = roi_rows
    near = LocalTemperatureScaler(open_bin="nearest").fit(x, y, p, d)
    ident = LocalTemperatureScaler(open_bin="identity")
    for a in ("table_", "counts_", "n_classes_", "n_samples_", "global_temperature_", "nll_before_", "nll_global_",
              "nll_after_"):
        setattr(ident, a, getattr(near, a).copy() if a in ("table_", "counts_") else getattr(near, a))
    ident.table_[ident.counts_[:, -1] == 0, -1] = 1.0  # what fit(open_bin="identity") gives, without a refit
    xb, yb, pb, db = (np.concatenate([a, b]) for a, b in zip(roi_rows, beyond_rows))
    beyond = LocalTemperatureScaler(open_bin="identity").fit(xb, yb, pb, db)
    return {"global": TemperatureScaler().fit(x, y), "local": ident, "local_nearest": near, "local_beyond": beyond}


def fit_all(dirs, labels_dir, cal_ids, max_vox, seed, loco: bool = True):
    rows, kept = [], []
    for ci, case in enumerate(cal_ids):
        pbar, spacing = load_case(dirs, case)
        r = _case_rows(pbar, spacing, _label(labels_dir, case), max_vox, seed + ci)
        if r is not None:
            rows.append(r)
            kept.append(case)
    if not rows:
        return None, None
    x, y, p, d = (np.concatenate([r["roi"][i] for r in rows]) for i in range(4))
    c = np.concatenate([np.full(r["roi"][1].size, i) for i, r in enumerate(rows)])
    beyond = tuple(np.concatenate([r["beyond"][i] for r in rows]) for i in range(4))
    fitted = {**_fit_variants((x, y, p, d), beyond), "class": ClassTemperatureScaler().fit(x, y, p),
              "vector": VectorScaler().fit(x, y)}
    cv = {name: cross_validated_nll(kind, x, y, p, d, c)
          for name, kind in (("global", "global"), ("class", "class_temperature"), ("local", "local_temperature"))}
    cv["uncalibrated"] = {"nll": float(np.mean(-x[np.arange(y.size), y]))}
    info = {"n_voxels": int(y.size), "n_beyond_voxels": int(beyond[1].size), "cv_nll": cv,
            "cv_volumes": loco_volumes(dirs, labels_dir, kept, rows) if loco else {},
            "global_T": float(fitted["global"].temperature_),
            "class_T": fitted["class"].table_[:, 0].tolist(),
            "local_T": fitted["local"].table_.tolist(), "local_counts": fitted["local"].counts_.tolist(),
            "local_beyond_T": fitted["local_beyond"].table_.tolist(),
            "local_beyond_counts": fitted["local_beyond"].counts_.tolist(),
            "edges_mm": list(fitted["local"].edges_mm),
            "vector": {"w": fitted["vector"].w_.tolist(), "b": fitted["vector"].b_.tolist()}}
    info["records"] = {"global_T": float(fitted["global"].temperature_),
                       **{k: fitted[k].to_record() for k in ("class", *LOCAL_VARIANTS)},
                       "vector": info["vector"], "calibration_cases": kept}
    return fitted, info


def loco_volumes(dirs, labels_dir, cases, rows) -> dict:
    """Leave-one-case-out on the calibration cases, measured on the whole left-out volume: fit global T
    and the local variants on the other cases' rows, then ROI (the uncalibrated prediction's) and
    whole-image NLL and top-label ECE of the left-out case. Means over the cases (the selection
    criterion of the open-bin rule; no test case is used)."""
    names = ("uncalibrated", "global", *LOCAL_VARIANTS)
    acc = {n: {k: [] for k in ("roi_nll", "roi_ece", "image_nll", "image_ece")} for n in names}
    if len(cases) < 2:
        return {}
    for i, case in enumerate(cases):
        others = [r for j, r in enumerate(rows) if j != i]
        roi_rows = tuple(np.concatenate([r["roi"][a] for r in others]) for a in range(4))
        beyond = tuple(np.concatenate([r["beyond"][a] for r in others]) for a in range(4))
        fitted = _fit_variants(roi_rows, beyond)
        pbar, spacing = load_case(dirs, case)
        lab = _label(labels_dir, case)
        roi = roi_mask(np.argmax(pbar, axis=0), spacing, ROI_MM, allow_empty=True)
        for n in names:
            q = calibrate(n, fitted, pbar, spacing)
            acc[n]["roi_nll"].append(nll(q, lab, roi))
            acc[n]["roi_ece"].append(top_label_ece(q, lab, roi))
            acc[n]["image_nll"].append(nll(q, lab, None))
            acc[n]["image_ece"].append(top_label_ece(q, lab, None))
        log.info("leave-one-case-out on %s done", case)
    return {n: {k: float(np.mean(v)) for k, v in m.items()} for n, m in acc.items()} | {"n_cases": len(cases)}


def calibrate(name, fitted, pbar, spacing):
    if name == "uncalibrated":
        return pbar
    if name == "global":
        return apply_temperature(pbar, fitted["global"].temperature_)
    if name in ("class", *LOCAL_VARIANTS):
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


def evaluate_configuration(dirs, labels_dir, cal_ids, test_ids, ood_id, max_vox, default, seed=0,
                           loco: bool = True) -> dict:
    fitted, info = fit_all(dirs, labels_dir, cal_ids, max_vox, seed, loco)
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
        rec["organ_dice"] = {int(c): v["dice"] for c, v in dice_per_class(seg0, lab, k).items()
                             if not v["empty_reference"]}
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
    organs = sorted({c for r in per_case for c in r["organ_dice"]})
    organ_dice = {c: float(np.mean([r["organ_dice"][c] for r in per_case if c in r["organ_dice"]])) for c in organs}
    records = info.pop("records")
    return {"fit": info, "mean": mean, "per_case": per_case, "triage": triage, "n_test": len(per_case),
            "test_organ_dice": organ_dice, "fitted_records": records}
