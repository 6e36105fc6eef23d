"""Per-organ quality intervals, contour-level guarantees, review burden and the exchangeability
warning on held-out cases of a model (issue 18; definitions in docs/METHODS.md).

Runs on any nnU-Net v2 model folder (``--model-folder``; its members are computed through the
project's member cache, ``--member-cache``) or on member folders (``--members``), with an nnU-Net raw
images/labels pair and a case list (default: ``calibration_cases.json`` next to the model folder, the
cases no fold trained on).

1. **Calibration, the product path.** ``pipeline.fit.fit_calibration`` (fit-temperature: the default
   local temperature, τ*, conformal records at ``--alpha``, organ quality at ``--tolerance-mm``) on the
   calibration cases of the first random split. T is one small table fitted once; everything the
   guarantees need is refitted per split below.
2. **Per case, once**, with that calibration applied (``case_record``): the calibrated probability,
   segmentation, ROI and every map (as ``fit.threshold_case`` computes them, EBCU with the file's t);
   each organ's expected Dice / surface Dice and true Dice / surface Dice
   (``calibration.organ_quality.case_organ_rows``); the voxel errors (prediction ≠ reference in the ROI)
   and the contour errors (``metrics.contour``, beyond the tolerance, in the ROI) with every map's
   scores there; the voxel and contour margin loss curves; every ROI voxel's map scores and nearest
   organ (for the flagged volume); each organ's probabilities outside / inside its prediction (for the
   margin bands); the atypicality samples (entropy and MI over the body, predicted organ volumes).
3. **Random splits** (``--splits`` per ``--n-cal``): the cases are shuffled, the first n are the
   calibration cases and the rest held out. Per split, from the calibration cases only: conformal flag
   thresholds per map and margins per organ for both errors and every α (``calibration.conformal``,
   ``calibration.contour_conformal``), the per-organ intervals (``organ_quality.conformal_interval``),
   the atypicality reference (``metrics.atypicality``) and each held-out case's exchangeability p-value
   (``metrics.exchangeability``). Measured on the held-out cases: realised coverage and width of the
   intervals; the mean miss rate of the flags and margins against α; the review burden (flagged
   volume per case, total and per nearest organ; margin bands per organ); the warning rate.
4. **Shifted split ("new site")**: the cases sorted by ID; the calibration cases are the lowest
   ``--n-cal-shift`` IDs (a calibration file fitted on them, step 1 again), the held-out cases the
   rest; then the other way round. Per held-out case: warned or not, and whether any guarantee missed
   by more than α on it (voxel flags of the regions map, outer margins of any organ, an organ interval).

Writes ``<out>.md`` and ``<out>.json`` (default ``bench/results/organ_quality``), with the command.

    PYTHONPATH=. .venv/bin/python bench/organ_quality.py \\
        --model-folder ../shared/models/Dataset501_OpenKBP_HN_OAR/nnUNetTrainer__nnUNetPlansTiny__2d \\
        --data ../shared/data/openkbp --member-cache /tmp/calibu_members
    PYTHONPATH=. .venv/bin/python bench/organ_quality.py --smoke --workdir /tmp/oq_smoke   # tiny, synthetic
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

log = logging.getLogger("bench.organ_quality")
KINDS = ("voxel", "contour")
REGIONS_MAP = "dae"
ATYP_SAMPLE = 20_000


# --- inputs -------------------------------------------------------------------------------------

def _dataset(arg) -> Path:
    base = Path(arg) if arg else Path(os.environ.get("CALIBU_SHARED", REPO.parent / "shared")) / "data" / "openkbp"
    kids = sorted(p for p in base.glob("Dataset*") if (p / "dataset.json").is_file()) if base.is_dir() else []
    return kids[0] if (not (base / "imagesTr").is_dir() and len(kids) == 1) else base


def smoke_inputs(work: Path, n_cases: int = 10):
    """A phantom dataset with synthetic 3-member ensembles (no model): (member dirs, images, labels, cases)."""
    from CalibUncertaintyLib.synthetic.members import make_member_folders
    from CalibUncertaintyLib.synthetic.phantom import PhantomSpec, write_phantom_dataset

    ds = write_phantom_dataset(work / "raw", n_train=n_cases, n_test=0, seed=7, spec=PhantomSpec(shape_zyx=(16, 28, 28)))
    images, labels = work / "images", work / "labels"
    for d in (images, labels):
        d.mkdir(parents=True, exist_ok=True)
    for case in ds.train_cases:
        for link, src in ((images / f"{case}_0000.nii.gz", ds.image(case)), (labels / f"{case}.nii.gz", ds.label(case))):
            if not link.exists():
                link.symlink_to(src)
    (work / "dataset.json").write_text((ds.folder / "dataset.json").read_text())
    dirs = make_member_folders(labels, work / "members", list(ds.train_cases), n_members=3, seed=0)
    return [str(d) for d in dirs], images, labels, list(ds.train_cases)


def model_members(model_folder: Path, images: Path, cases: list, cache: Path, ensemble: str, tta: bool, device: str):
    from CalibUncertaintyLib.nnunet.member_cache import cached_member_dirs

    cm = cached_member_dirs(model_folder, ensemble, None, images, cache, device=device, tta=tta, cases=cases)
    log.info("%d members x %d cases: %d computed, %d reused (%s)", len(cm.members), len(cm.cases), len(cm.computed),
             len(cm.reused), cm.cache_root)
    return [str(d) for d in cm.member_dirs], cm.fingerprint


# --- per case -----------------------------------------------------------------------------------

def case_record(cf, cal, n_classes: int, opts, seed: int) -> dict:
    """Everything the resampling needs of one case with ``cal`` applied (module docstring, step 2)."""
    from CalibUncertaintyLib.calibration.conformal import margin_losses
    from CalibUncertaintyLib.calibration.contour_conformal import contour_margin_losses
    from CalibUncertaintyLib.calibration.organ_quality import case_organ_rows
    from CalibUncertaintyLib.calibration.roi import roi_mask
    from CalibUncertaintyLib.calibration.thresholds import uncertainty_score
    from CalibUncertaintyLib.metrics.contour import class_contour_errors, distance_to_mm
    from CalibUncertaintyLib.metrics.error_detection import error_mask
    from CalibUncertaintyLib.pipeline.dataset import read_label
    from CalibUncertaintyLib.pipeline.ensemble import accumulate, calibrated_probs, case_maps
    from CalibUncertaintyLib.pipeline.fit import reference_sample
    from CalibUncertaintyLib.uncertainty.ebcu import ebcu, effective_radius_mm
    from CalibUncertaintyLib.uncertainty.maps import MAP_NAMES, segmentation

    geo = cf.geometry
    sp = geo.spacing_zyx
    labels = read_label(cf, n_classes)
    acc = accumulate(cf.load_members(n_classes), cal, cal.ensemble_mode)
    probs = calibrated_probs(acc, cal, cal.ensemble_mode, sp)
    seg = segmentation(probs)
    roi = roi_mask(seg, sp, float(cal.roi["radius_mm"]), rule="prediction", allow_empty=True)
    names = [n for n in MAP_NAMES if n != "ebcu"]
    maps = case_maps(acc, probs, geo, cal, cal.ensemble_mode, names=names, dae_sigma_mm=opts.dae_sigma_mm, roi=roi)
    maps["ebcu"] = ebcu(maps["entropy"], sp, radius_mm=effective_radius_mm(opts.ebcu_radius_mm, sp),
                        threshold=cal.ebcu_threshold)
    del acc
    errors = error_mask(seg, labels, roi)
    contour = np.zeros(seg.shape, bool)
    vox_curves, con_curves, outside, inside = [], [], [], []
    for c in range(1, n_classes):
        pred, ref = seg == c, labels == c
        fn, fp = class_contour_errors(pred, ref, sp, opts.tolerance_mm)
        contour |= fn | fp
        vox_curves.append(margin_losses(probs[c], ref, pred))
        con_curves.append(contour_margin_losses(probs[c], fn, fp))
        v = probs[c][~pred]
        outside.append((np.sort(v[v >= 1e-6]).astype(np.float32), int(v.size)))
        inside.append(np.sort(probs[c][pred]).astype(np.float32))
    contour &= roi
    # nearest predicted organ of every ROI voxel (as pipeline.organ_case does)
    best = np.full(seg.shape, np.inf, np.float32)
    owner = np.zeros(seg.shape, np.uint8)
    for c in range(1, n_classes):
        if (seg == c).any():
            d = distance_to_mm(seg == c, sp, float(cal.roi["radius_mm"]) + max(sp))
            closer = d < best
            best[closer], owner[closer] = d[closer], c
    own = owner[roi]
    rec = {"case": cf.case, "voxel_mm3": float(geo.voxel_volume_mm3),
           "organ_rows": case_organ_rows(probs, seg, labels, sp, opts.tolerance_mm, float(cal.roi["radius_mm"])),
           "margin_curves": {"voxel": vox_curves, "contour": con_curves}, "outside": outside, "inside": inside,
           "scores": {}, "error_scores": {"voxel": {}, "contour": {}}}
    for name in MAP_NAMES:  # sorted, so that counts at any threshold are one searchsorted
        s = uncertainty_score(name, maps[name]).astype(np.float32)
        s_roi = s[roi]
        rec["scores"][name] = [np.sort(s_roi[own == c]) for c in range(n_classes)]  # by nearest organ (0: none)
        rec["error_scores"]["voxel"][name] = np.sort(s[errors])
        rec["error_scores"]["contour"][name] = np.sort(s[contour])
    rec["n_errors"] = {"voxel": int(errors.sum()), "contour": int(contour.sum())}
    kind, samples, vols = reference_sample(cf, maps, seed, seg, n_classes)
    rng = np.random.default_rng(seed)  # the bench keeps 20 000 of the product's ≤ 200 000 body samples per case
    samples = {m: (v if v.size <= ATYP_SAMPLE else v[np.sort(rng.choice(v.size, ATYP_SAMPLE, replace=False))])
               for m, v in samples.items()}
    rec["atypicality"] = {"domain": kind, "samples": samples, "volumes": vols}
    return rec


def case_records(pairing, cal, opts, cache_file: Path | None) -> list[dict]:
    """``case_record`` of every case (kept in ``cache_file`` for reruns with the same calibration)."""
    if cache_file is not None and cache_file.is_file():
        with open(cache_file, "rb") as f:
            stored = pickle.load(f)
        if stored["cases"] == [c.case for c in pairing.cases]:
            return stored["records"]
    recs = []
    for i, cf in enumerate(pairing.cases):
        t0 = time.perf_counter()
        recs.append(case_record(cf, cal, pairing.n_classes, opts, opts.seed + i))
        log.info("case %s: %.1f s (%d/%d)", cf.case, time.perf_counter() - t0, i + 1, len(pairing.cases))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"cases": [c.case for c in pairing.cases], "records": recs}, f)
        os.replace(tmp, cache_file)
    return recs


# --- one split ----------------------------------------------------------------------------------

def _exchangeability(recs, cal_idx, test_idx, delta, n_members):
    """Each held-out case's combined exchangeability p-value against this split's calibration cases."""
    from CalibUncertaintyLib.metrics.atypicality import fit_reference, volume_atypicality
    from CalibUncertaintyLib.metrics.exchangeability import case_exchangeability

    domains = {recs[i]["atypicality"]["domain"] for i in cal_idx}
    ref = fit_reference([recs[i]["atypicality"]["samples"] for i in cal_idx], domains.pop(), n_members,
                        volumes_per_case=[recs[i]["atypicality"]["volumes"] for i in cal_idx])
    out = []
    for i in test_idx:
        a = recs[i]["atypicality"]
        vals = {agg: float(np.mean(a["samples"][m] > ref["u_ref"][m]))
                for agg, m in (("high_entropy_body_fraction", "entropy"), ("high_mi_body_fraction", "mutual_information"))
                if m in ref["u_ref"]}
        vals["organ_volume_atypicality"] = volume_atypicality(a["volumes"], ref["volume_median_mm3"], ref["v0_mm3"])
        out.append(case_exchangeability(vals, ref, delta))
    return out


def evaluate_split(recs, cal_idx, test_idx, organs, maps, alphas, alpha, delta, n_members) -> dict:
    """Everything measured on the held-out cases of one split (module docstring, step 3)."""
    from CalibUncertaintyLib.calibration import conformal as cf
    from CalibUncertaintyLib.calibration.contour_conformal import contour_margin_thresholds
    from CalibUncertaintyLib.calibration.organ_quality import TARGETS, conformal_interval

    g = cf.PROB_GRID
    n_test = len(test_idx)
    res = {"flags": {}, "margins": {}, "intervals": {}, "per_case": [{"case": recs[i]["case"]} for i in test_idx]}
    for kind in KINDS:
        for m in maps:
            ths = cf.flag_thresholds([recs[i]["error_scores"][kind][m] for i in cal_idx], alphas)
            for a in alphas:
                th = ths[a]
                tau = th["tau"]
                miss, vol, per_organ = [], [], np.zeros(len(organs) + 1)
                for j, i in enumerate(test_idx):
                    r = recs[i]
                    e = r["error_scores"][kind][m]  # sorted: flagged = score > τ
                    miss.append(0.0 if e.size == 0 or tau is None else
                                float(np.searchsorted(e, np.float32(tau), side="right") / e.size))
                    counts = np.array([v.size if tau is None else v.size - np.searchsorted(v, np.float32(tau), side="right")
                                       for v in r["scores"][m]], dtype=np.float64) * r["voxel_mm3"]
                    vol.append(float(counts.sum()))
                    per_organ += counts / n_test
                    if m == REGIONS_MAP and a == alpha:
                        res["per_case"][j][f"flags_{kind}_miss"] = miss[-1]
                res["flags"][(kind, m, a)] = {"miss": float(np.mean(miss)), "burden_mm3": float(np.mean(vol)),
                                              "per_organ_mm3": per_organ[1:].tolist(), "trivial": th["trivial"]}
        for k, organ in enumerate(organs):
            for a in alphas:
                curves = [recs[i]["margin_curves"][kind][k] for i in cal_idx]
                th = cf.margin_thresholds(curves, a) if kind == "voxel" else contour_margin_thresholds(curves, a)
                jo, ji = int(np.searchsorted(g, th["outer"])), int(np.searchsorted(g, th["inner"]))
                inner_key = "inner_fdp_raw" if kind == "voxel" else "inner_cover"
                outer = [recs[i]["margin_curves"][kind][k]["outer_miss"][jo] for i in test_idx]
                inner = [recs[i]["margin_curves"][kind][k][inner_key][ji] for i in test_idx]
                band = []
                for i in test_idx:
                    vals, n_out = recs[i]["outside"][k]
                    ins = recs[i]["inside"][k]
                    ob = n_out if th["outer"] < 1e-6 else vals.size - np.searchsorted(vals, np.float32(th["outer"]), "left")
                    ib = np.searchsorted(ins, np.float32(max(th["inner"], cf.INNER_MIN)), "right")
                    band.append(float((ob + ib) * recs[i]["voxel_mm3"]))
                res["margins"][(kind, organ, a)] = {"outer_miss": float(np.mean(outer)), "inner": float(np.mean(inner)),
                                                    "band_mm3": float(np.mean(band)), "trivial": th["trivial"]}
                if a == alpha and kind == "voxel":
                    for j, v in enumerate(outer):
                        res["per_case"][j].setdefault("outer_miss", {})[organ] = float(v)
    for k, organ in enumerate(organs):
        pairs = [recs[i]["organ_rows"][k] for i in cal_idx]
        pairs = [p for p in pairs if p is not None]
        for t in TARGETS:
            x = [p[f"expected_{t}"] for p in pairs]
            y = [p[t] for p in pairs]
            for a in alphas:
                cov, wid, triv = [], [], []
                for j, i in enumerate(test_idx):
                    row = recs[i]["organ_rows"][k]
                    if row is None:
                        continue
                    iv = conformal_interval(x, y, row[f"expected_{t}"], a)
                    hit = iv["lower"] - 1e-9 <= row[t] <= iv["upper"] + 1e-9
                    cov.append(hit)
                    wid.append(iv["upper"] - iv["lower"])
                    triv.append(iv["trivial"])
                    if a == alpha:
                        res["per_case"][j].setdefault("intervals", []).append(f"{organ} {t}")
                        if not hit:
                            res["per_case"][j].setdefault("interval_missed", []).append(f"{organ} {t}")
                res["intervals"][(organ, t, a)] = {"coverage": float(np.mean(cov)) if cov else None, "n": len(cov),
                                                   "width": float(np.mean(wid)) if wid else None,
                                                   "trivial": bool(triv and all(triv))}
    for j, ex in enumerate(_exchangeability(recs, cal_idx, test_idx, delta, n_members)):
        res["per_case"][j]["p_exchangeable"] = ex["p_value"] if ex else None
        res["per_case"][j]["warned"] = bool(ex and ex["exchangeable"] is False)
        res["per_case"][j]["warning_possible"] = bool(ex and ex["testable"])
    for pc in res["per_case"]:  # per guarantee: did this case lose more than α?
        outer = list((pc.get("outer_miss") or {}).values())
        n_iv = len(pc.get("intervals") or [])
        pc["interval_miss_rate"] = len(pc.get("interval_missed") or []) / n_iv if n_iv else None
        pc["above_alpha"] = {"flags": pc.get("flags_voxel_miss", 0.0) > alpha,
                             "margins": bool(outer) and float(np.mean(outer)) > alpha,
                             "intervals": (pc["interval_miss_rate"] or 0.0) > alpha}
        pc["above_alpha"]["any"] = any(pc["above_alpha"].values())
    return res


def _mean_over(splits, part, key, field):
    vals = [s[part][key][field] for s in splits if s[part][key][field] is not None]
    return (float(np.mean(vals)), float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else None) \
        if vals else (None, None)


EVENTS = ("flags", "margins", "intervals", "any")
EVENT_LABEL = {"flags": "DAE voxel flags miss > α of the case's errors",
               "margins": "outer margins miss > α of the organs (mean over organs)",
               "intervals": "> α of the case's organ intervals miss", "any": "any of these"}


def warning_stats(cases: list[dict]) -> dict:
    """Does the warning precede a miss above α? Per event (``EVENTS``), counts over held-out cases."""
    n = len(cases)
    warned = [c for c in cases if c["warned"]]
    frac = (lambda a, b: len(a) / len(b) if b else None)
    out = {"n_cases": n, "n_warned": len(warned), "warning_rate": len(warned) / n if n else None,
           "warning_possible": all(c["warning_possible"] for c in cases) if cases else None, "events": {}}
    for e in EVENTS:
        missed = [c for c in cases if c["above_alpha"][e]]
        both = [c for c in warned if c["above_alpha"][e]]
        out["events"][e] = {"n_above_alpha": len(missed), "n_warned_and_above": len(both),
                            "p_warned_given_above": frac(both, missed), "p_above_given_warned": frac(both, warned),
                            "p_above_given_not_warned": frac([c for c in missed if not c["warned"]],
                                                             [c for c in cases if not c["warned"]])}
    return out


def warning_lines(w: dict) -> list[str]:
    lines = ["| event (per held-out case) | cases | warned among them | P(event ∣ warned) | P(event ∣ not warned) |",
             "|---|---|---|---|---|"]
    for e in EVENTS:
        v = w["events"][e]
        lines.append(f"| {EVENT_LABEL[e]} | {v['n_above_alpha']} of {w['n_cases']} | {v['n_warned_and_above']} "
                     f"({_f(v['p_warned_given_above'], 2)}) | {_f(v['p_above_given_warned'], 2)} | "
                     f"{_f(v['p_above_given_not_warned'], 2)} |")
    return lines


# --- main ---------------------------------------------------------------------------------------

def fit(pairing, cal_cases, alpha, tolerance, fingerprint, method=None, executor=None):
    """fit-temperature's calibration (``pipeline.fit.fit_calibration``, product defaults) on ``cal_cases``."""
    from dataclasses import replace

    from CalibUncertaintyLib.pipeline.fit import FitOptions, fit_calibration

    sub = replace(pairing, cases=[c for c in pairing.cases if c.case in cal_cases])
    opts = FitOptions(conformal_alpha=alpha, tolerance_mm=tolerance, **({"method": method} if method else {}))
    return fit_calibration(sub, opts, fingerprint=fingerprint, executor=executor), opts


def run(a, argv) -> dict:
    from CalibUncertaintyLib.calibration.conformal import ALPHA_GRID, check_alpha, min_cases
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases
    from CalibUncertaintyLib.uncertainty.maps import MAP_NAMES

    t0 = time.time()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    fingerprint = None
    if a.smoke:
        members, images, labels, cases = smoke_inputs(work, n_cases=8)
    else:
        data = _dataset(a.data)
        images, labels = Path(a.images or data / "imagesTr"), Path(a.labels or data / "labelsTr")
        if a.cases:
            cases = list(a.cases)
        else:
            cfile = Path(a.cases_file) if a.cases_file else Path(a.model_folder).parent / "calibration_cases.json"
            cases = list(json.loads(cfile.read_text()))
        if a.members:
            members = list(a.members)
        else:
            members, fingerprint = model_members(Path(a.model_folder), images, cases, Path(a.member_cache),
                                                 a.ensemble, a.tta, a.device)
    t_members = time.time() - t0
    pairing = pair_cases(members, str(images), str(labels), cases, require_labels=True)
    organs = list(pairing.class_names[1:])
    alpha = check_alpha(a.alpha)
    alphas = sorted({alpha, *ALPHA_GRID})
    rng = np.random.default_rng(a.seed)
    n_all = len(pairing.cases)
    ids = [c.case for c in pairing.cases]
    n_cals = [n for n in a.n_cal if 2 <= n <= n_all - 2]
    order0 = rng.permutation(n_all)
    cal0 = [ids[i] for i in order0[:max(n_cals)]]
    cal, opts = fit(pairing, cal0, alpha, a.tolerance_mm, fingerprint, a.method)
    recs = case_records(pairing, cal, opts, work / f"records_random_{a.tolerance_mm:g}.pkl")
    t_records = time.time() - t0 - t_members
    random = {}
    for n_cal in n_cals:
        splits, cases_seen = [], []
        for s in range(a.splits):
            perm = order0 if s == 0 else rng.permutation(n_all)
            res = evaluate_split(recs, list(perm[:n_cal]), list(perm[n_cal:]), organs, MAP_NAMES, alphas, alpha,
                                 a.delta, pairing.n_members)
            cases_seen += res["per_case"]
            splits.append(res)
        random[n_cal] = summarise_splits(splits, organs, MAP_NAMES, alphas)
        random[n_cal]["warnings"] = warning_stats(cases_seen)
        log.info("n_cal %d: %d splits done (%.0f s)", n_cal, a.splits, time.time() - t0)
    # shifted splits: lowest IDs calibrate, the rest are held out; then the other way round
    shifted = []
    by_id = sorted(range(n_all), key=lambda i: ids[i])
    n_shift = a.n_cal_shift or n_all // 2
    directions = (("low IDs calibrate", by_id[:n_shift]), ("high IDs calibrate", by_id[-n_shift:]))
    for direction, cal_pos in directions[:1 if a.smoke else 2]:
        cal_ids = [ids[i] for i in cal_pos]
        if a.shift_calibration == "refit":  # T (and τ*) fitted on the shifted calibration cases only
            cal_s, opts_s = fit(pairing, cal_ids, alpha, a.tolerance_mm, fingerprint, a.method)
            recs_s = case_records(pairing, cal_s, opts_s, work / f"records_{direction.split()[0]}_{a.tolerance_mm:g}.pkl")
        else:  # the first random split's T: cheaper, but it has seen some of the shifted held-out cases
            recs_s = recs
        test_pos = [i for i in range(n_all) if i not in cal_pos]
        res = evaluate_split(recs_s, cal_pos, test_pos, organs, MAP_NAMES, alphas, alpha, a.delta, pairing.n_members)
        shifted.append({"direction": direction, "calibration": cal_ids, "held_out": [ids[i] for i in test_pos],
                        "summary": summarise_splits([res], organs, MAP_NAMES, alphas),
                        "per_case": res["per_case"], "warnings": warning_stats(res["per_case"])})
    record = {
        "command": "PYTHONPATH=. .venv/bin/python bench/organ_quality.py " + shlex.join(argv),
        "smoke": bool(a.smoke), "model_folder": str(a.model_folder) if a.model_folder else None,
        "members": members, "n_members": pairing.n_members, "cases": ids, "organs": organs,
        "alpha": alpha, "alphas": alphas, "tolerance_mm": a.tolerance_mm, "delta": a.delta, "splits": a.splits,
        "n_cal": n_cals, "first_split_calibration": cal0, "shift_calibration": a.shift_calibration, "calibration_method": cal.method,
        "temperature": cal.temperature, "min_cases": {f"{x:g}": min_cases(x) for x in alphas},
        "random": {str(k): v for k, v in random.items()}, "shifted": shifted,
        "timings_s": {"members": round(t_members, 1), "records": round(t_records, 1),
                      "total": round(time.time() - t0, 1)},
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"}
    return record


def summarise_splits(splits, organs, maps, alphas) -> dict:
    from CalibUncertaintyLib.calibration.organ_quality import TARGETS

    out = {"flags": {}, "margins": {}, "intervals": {}, "smallest_burden": {}}
    for kind in KINDS:
        for m in maps:
            for a in alphas:
                key = (kind, m, a)
                miss, se = _mean_over(splits, "flags", key, "miss")
                burden, _ = _mean_over(splits, "flags", key, "burden_mm3")
                per_organ = np.mean([s["flags"][key]["per_organ_mm3"] for s in splits], axis=0).tolist()
                out["flags"][f"{kind}|{m}|{a:g}"] = {"miss": miss, "se": se, "burden_mm3": burden,
                                                     "per_organ_mm3": dict(zip(organs, per_organ)),
                                                     "trivial_share": float(np.mean([s["flags"][key]["trivial"] for s in splits]))}
        for a in alphas:
            ok = [m for m in maps if (out["flags"][f"{kind}|{m}|{a:g}"]["miss"] or 0) <= a]
            if ok:
                best = min(ok, key=lambda m: out["flags"][f"{kind}|{m}|{a:g}"]["burden_mm3"])
                out["smallest_burden"][f"{kind}|{a:g}"] = best
        for organ in organs:
            for a in alphas:
                key = (kind, organ, a)
                out["margins"][f"{kind}|{organ}|{a:g}"] = {f: _mean_over(splits, "margins", key, f)[0]
                                                           for f in ("outer_miss", "inner", "band_mm3")}
    for organ in organs:
        for t in TARGETS:
            for a in alphas:
                key = (organ, t, a)
                cov, se = _mean_over(splits, "intervals", key, "coverage")
                wid, _ = _mean_over(splits, "intervals", key, "width")
                out["intervals"][f"{organ}|{t}|{a:g}"] = {
                    "coverage": cov, "se": se, "width": wid, "n": int(np.mean([s["intervals"][key]["n"] for s in splits])),
                    "trivial_share": float(np.mean([s["intervals"][key]["trivial"] for s in splits]))}
    return out


# --- report -------------------------------------------------------------------------------------

def _f(v, d=3):
    return "–" if v is None else f"{v:.{d}f}"


def render(r: dict) -> str:
    from CalibUncertaintyLib.calibration.organ_quality import TARGETS, TARGET_LABEL

    a, alphas, organs = r["alpha"], r["alphas"], r["organs"]
    L = ["# Per-organ quality, contour-level guarantees and the exchangeability warning" +
         (" (SMOKE RUN: synthetic members, not a result)" if r["smoke"] else ""), "",
         "Produced by", "", "```", r["command"], "```", "",
         f"- Model: {r['model_folder'] or 'member folders given'} ({r['n_members']} members); {len(r['cases'])} cases: "
         f"{', '.join(r['cases'])}.",
         f"- Calibration (product default {r['calibration_method']}, global T = {_f(r['temperature'])}) fitted once on the "
         f"first random split's calibration cases; every guarantee is refitted per split on its calibration cases.",
         f"- α = {a:g} (and {', '.join(f'{x:g}' for x in alphas if x != a)}), tolerance t = {r['tolerance_mm']:g} mm, "
         f"exchangeability level δ = {r['delta']:g}; {r['splits']} random splits per calibration size.",
         f"- Wall time {r['timings_s']['total'] / 60:.1f} min ({r['machine']}).",
         f"- Fewest calibration cases for a non-trivial guarantee: " +
         ", ".join(f"α = {k}: {v}" for k, v in r["min_cases"].items()) + ".", ""]
    for n_cal, res in r["random"].items():
        n_test = len(r["cases"]) - int(n_cal)
        L += [f"## Random splits: {n_cal} calibration / {n_test} held-out cases", "",
              f"### Per-organ intervals at α = {a:g} (target coverage ≥ {1 - a:g})", "",
              "Realised coverage = fraction of held-out (case, organ) pairs whose true value lies in the interval, "
              "mean over splits (± SE over splits; splits share cases, so it is optimistic); width = mean interval width.", "",
              "| organ | " + " | ".join(f"{TARGET_LABEL[t]} coverage | {TARGET_LABEL[t]} width" for t in TARGETS) + " | held-out cases |",
              "|---|" + "---|---|" * len(TARGETS) + "---|"]
        for o in organs:
            cells = []
            for t in TARGETS:
                iv = res["intervals"][f"{o}|{t}|{a:g}"]
                cells += [f"{_f(iv['coverage'])} ± {_f(iv['se'])}" + (" (trivial)" if iv["trivial_share"] > 0.5 else ""),
                          _f(iv["width"])]
            L.append(f"| {o} | " + " | ".join(cells) + f" | {res['intervals'][f'{o}|dice|{a:g}']['n']} |")
        L += ["", "Coverage and width against α (all organs, Dice):", "",
              "| α | mean coverage | mean width |", "|---|---|---|"]
        for x in alphas:
            cv = [res["intervals"][f"{o}|dice|{x:g}"]["coverage"] for o in organs]
            wd = [res["intervals"][f"{o}|dice|{x:g}"]["width"] for o in organs]
            cv, wd = [v for v in cv if v is not None], [v for v in wd if v is not None]
            L.append(f"| {x:g} | {_f(np.mean(cv) if cv else None)} | {_f(np.mean(wd) if wd else None)} |")
        for kind, label in (("voxel", "voxel errors (prediction ≠ reference)"),
                            ("contour", f"contour deviations beyond {r['tolerance_mm']:g} mm")):
            L += ["", f"### Conformal flags, {label}: held-out miss rate and review burden", "",
                  "Miss = mean over held-out cases of the fraction of their ROI errors not flagged (guarantee: ≤ α in "
                  "expectation); burden = flagged volume per case in ml (ROI).", "",
                  "| map | " + " | ".join(f"α = {x:g} miss | burden ml" for x in alphas) + " |",
                  "|---|" + "---|---|" * len(alphas)]
            for m in [k.split("|")[1] for k in res["flags"] if k.startswith(f"{kind}|") and k.endswith(f"|{a:g}")]:
                cells = []
                for x in alphas:
                    fl = res["flags"][f"{kind}|{m}|{x:g}"]
                    cells += [_f(fl["miss"], 4) + (" (trivial)" if fl["trivial_share"] > 0.5 else ""),
                              _f(fl["burden_mm3"] / 1000 if fl["burden_mm3"] is not None else None, 1)]
                L.append(f"| {m} | " + " | ".join(cells) + " |")
            best = [(x, res["smallest_burden"].get(f"{kind}|{x:g}")) for x in alphas]
            L += ["", "Smallest burden among maps whose realised miss is ≤ α: " +
                  "; ".join(f"α = {x:g}: {m} ({_f(res['flags'][f'{kind}|{m}|{x:g}']['burden_mm3'] / 1000, 1)} ml)"
                            if m else f"α = {x:g}: none" for x, m in best) + "."]
            m = res["smallest_burden"].get(f"{kind}|{a:g}")
            if m:
                po = res["flags"][f"{kind}|{m}|{a:g}"]["per_organ_mm3"]
                L += ["", f"Per organ (nearest predicted organ), {m} at α = {a:g}: " +
                      ", ".join(f"{o} {v / 1000:.1f} ml" for o, v in po.items()) + "."]
            L += ["", f"Organ margins ({kind}): mean held-out outer miss / inner "
                  f"{'1 − precision' if kind == 'voxel' else 'share of the far over-segmentation kept'} / band volume (ml) per case:", "",
                  "| organ | " + " | ".join(f"α = {x:g}" for x in alphas) + " |", "|---|" + "---|" * len(alphas)]
            for o in organs:
                L.append(f"| {o} | " + " | ".join(
                    f"{_f(res['margins'][f'{kind}|{o}|{x:g}']['outer_miss'])} / {_f(res['margins'][f'{kind}|{o}|{x:g}']['inner'])}"
                    f" / {_f((res['margins'][f'{kind}|{o}|{x:g}']['band_mm3'] or 0) / 1000, 1)}" for x in alphas) + " |")
        w = res["warnings"]
        L += ["", "### Exchangeability warning on exchangeable (random) splits", "",
              f"Over all held-out cases of all splits ({w['n_cases']}): warned {w['n_warned']}, rate "
              f"{_f(w['warning_rate'])} (at most δ = {r['delta']:g} expected for exchangeable cases)"
              + ("" if w["warning_possible"] else "; too few calibration cases for the warning to fire") + ".", "",
              *warning_lines(w), ""]
    L += ["## Shifted splits (held-out patients from another ID range, a 'new site')", "",
          "A case 'misses above α' when the voxel flags of the regions map (DAE) miss more than α of its errors, an "
          "organ's outer margin misses more than α of the organ, or one of its organ intervals misses the true value. "
          "The guarantees and the exchangeability reference are fitted on the shifted calibration cases; the "
          "calibration (T) " + ("too." if r.get("shift_calibration") == "refit" else
                                "is the first random split's (it has seen some of these held-out cases)."), ""]
    for sh in r["shifted"]:
        w = sh["warnings"]
        L += [f"### {sh['direction']}: calibration {sh['calibration'][0]} … {sh['calibration'][-1]} "
              f"({len(sh['calibration'])}), held out {len(sh['held_out'])}", "",
              f"Warned {w['n_warned']} of {w['n_cases']}"
              + ("" if w["warning_possible"] else " (too few calibration cases for the warning to fire)") + ".", "",
              *warning_lines(w), "",
              "| case | p (exchangeability) | warned | DAE flags miss | mean outer miss (worst organ) | intervals missed |",
              "|---|---|---|---|---|---|"]
        for pc in sh["per_case"]:
            om = pc.get("outer_miss") or {}
            worst = max(om.items(), key=lambda kv: kv[1], default=(None, None))
            L.append(f"| {pc['case']} | {_f(pc['p_exchangeable'])} | {'yes' if pc['warned'] else 'no'} | "
                     f"{_f(pc.get('flags_voxel_miss'))} | {_f(float(np.mean(list(om.values()))) if om else None)} "
                     f"({worst[0] or '–'} {_f(worst[1])}) | {', '.join(pc.get('interval_missed') or []) or '–'} |")
        s = sh["summary"]
        cov = [s["intervals"][f"{o}|{t}|{a:g}"]["coverage"] for o in organs for t in TARGETS]
        cov = [c for c in cov if c is not None]
        L += ["", f"Interval coverage on this shifted split (all organs, both targets): {_f(np.mean(cov) if cov else None)}; "
              f"voxel flags (DAE) mean miss {_f(s['flags'][f'voxel|dae|{a:g}']['miss'], 4)}, contour flags (DAE) "
              f"{_f(s['flags'][f'contour|dae|{a:g}']['miss'], 4)} at α = {a:g}.", ""]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-folder", type=Path, help="nnU-Net v2 model folder (<Trainer>__<Plans>__<Config>)")
    src.add_argument("--members", nargs="+", help="member folders (nnU-Net --save_probabilities) instead of a model")
    p.add_argument("--data", default=None, help="nnU-Net raw dataset (default ../shared/data/openkbp)")
    p.add_argument("--images", default=None)
    p.add_argument("--labels", default=None)
    p.add_argument("--cases", nargs="+", default=None)
    p.add_argument("--cases-file", default=None, help="JSON list of case ids (default: calibration_cases.json "
                                                      "next to the model folder)")
    p.add_argument("--member-cache", default=None, help="member cache folder (--model-folder)")
    p.add_argument("--ensemble", default="deep")
    p.add_argument("--tta", action="store_true", help="mirroring TTA inside each member (off by default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--method", default=None, help="calibration method (default: fit-temperature's default)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--tolerance-mm", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=0.1, help="exchangeability level δ")
    p.add_argument("--n-cal", type=int, nargs="+", default=[10, 15, 20])
    p.add_argument("--n-cal-shift", type=int, default=None, help="calibration cases of the shifted split (default half)")
    p.add_argument("--shift-calibration", choices=("refit", "shared"), default="refit",
                   help="shifted splits: refit the calibration (T) on their calibration cases (default) or reuse "
                        "the first random split's")
    p.add_argument("--splits", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/calibu_organ_quality"))
    p.add_argument("--out", type=Path, default=None, help="results stem (default bench/results/organ_quality; "
                                                          "--smoke: <workdir>/organ_quality)")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic inputs, a few splits (CI)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.smoke:
        a.n_cal, a.splits, a.n_cal_shift = [5], min(a.splits, 2), 4
        a.method = a.method or "temperature"
        a.alpha = 0.2 if a.alpha == 0.1 else a.alpha
    elif not (a.model_folder or a.members):
        p.error("give --model-folder (or --members, or --smoke)")
    if a.model_folder and not a.member_cache:
        p.error("--model-folder needs --member-cache DIR (where the members' outputs are computed and kept)")
    record = run(a, argv)
    out = a.out or ((a.workdir / "organ_quality") if a.smoke else REPO / "bench" / "results" / "organ_quality")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=_jsonable))
    text = render(record)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
