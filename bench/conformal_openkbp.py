"""Conformal flags and organ margins on real OpenKBP labels: held-out miss rates, what the
finite-sample term costs, error detection per map, and a shifted split (issues 11 and 18).

Members, one of two sources:

- ``--model-folder DIR`` (issue 18): the members of a trained nnU-Net v2 model folder a user has
  (``bench/_stock_members.py``: the product's member cache, ``--member-cache``), on its held-out
  cases (``--cases``, default the ``calibration_cases.json`` beside the folder). Configurations
  ``single`` (first fold) and ``deep`` (all folds); calibration methods ``temperature`` (one global
  T) and ``local_temperature`` (the product default, T(x) by class and distance to the contour).
- otherwise **synthetic** members (``synthetic.members.make_member_folders``: over-confident
  softmax members built from each case's real label, 3 per case) on ``--n-cal + --n-test`` shuffled
  OpenKBP cases: exchangeable by construction, a check of the implementation on real anatomy.

For each configuration and method:

1. Product path on the first random split: ``calib-uncertainty fit-temperature --method M
   --conformal-alpha A`` on its calibration cases, ``calib-uncertainty evaluate`` on its test cases
   (the evaluation's conformal block and error detection per map).
2. Every case's losses once, with that calibration file's T applied (one scalar or table fitted on
   the first split's calibration cases, stated): the scores of its ROI error voxels and of all its
   ROI voxels per map, its margin loss curves per organ and the volume of every outer band on the
   probability grid, and the maps cropped to the ROI for error detection.
3. ``--splits`` random calibration / test splits (``--n-cal`` calibration cases, the rest test)
   refit per split, from the calibration cases only: the conformal flag threshold per map and α
   (``calibration.conformal.flag_threshold``), the organ margins per organ and α
   (``margin_thresholds``), the same thresholds *without* the finite-sample term (plug-in: largest
   threshold whose calibration mean loss is ≤ α), and τ* per map by mean UEO
   (``calibration.thresholds.calibrate_thresholds``). Measured on the test cases: mean miss rate,
   flagged ROI volume and outer-band volume (mL) per case, UEO at τ*, voxel AUROC. Means over
   splits estimate the expectations the guarantees are about.
4. What a tighter guarantee needs: with n calibration cases the bound n/(n+1)·R̂ + 1/(n+1) ≤ α
   allows a calibration mean miss of at most (α(n+1) − 1)/n; on the pooled loss curve of all
   held-out cases, the flagged volume that this allowance costs at n = 5 ... 200.
5. ``--model-folder`` only: a **shifted** split (``--n-cal`` lowest case ids calibrate, the others
   are tested: patients from another part of the cohort): product path as in 1.

Writes ``<results>/<name>.md`` and ``.json`` (``--name``: default ``conformal_openkbp`` for
synthetic members, ``conformal_stock`` with ``--model-folder``).

    PYTHONPATH=. .venv/bin/python bench/conformal_openkbp.py [--n-cal 15 --n-test 15 --alpha 0.1 --splits 500]
    PYTHONPATH=. .venv/bin/python bench/conformal_openkbp.py --model-folder MODEL --member-cache CACHE \\
        [--n-cal 10 --splits 200 --configs single deep --methods temperature local_temperature]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

MAPS = ("entropy", "mutual_information", "dae", "ebcu", "confidence")
DETECTION_MAPS = ("entropy", "mutual_information", "epkl", "dae", "ebcu", "confidence")
ENSEMBLE_ONLY = ("mutual_information", "epkl", "vote_disagreement", "fg_variance")
N_FOR_TIGHTER = (5, 10, 15, 20, 30, 50, 100, 200)


def _data(arg) -> Path:
    base = Path(arg) if arg else Path(os.environ.get("CALIBU_SHARED", REPO.parent / "shared")) / "data" / "openkbp"
    return base / "Dataset501_OpenKBP_HN_OAR" if (base / "Dataset501_OpenKBP_HN_OAR").is_dir() else base


# ----------------------------------------------------------------------------------------------
# per case, once
# ----------------------------------------------------------------------------------------------
def case_losses(cf, n_classes: int, cal, roi_mm: float, maps_wanted) -> dict:
    """One case with the calibration ``cal`` applied: everything the splits need (module docstring, step 2)."""
    from CalibUncertaintyLib.calibration.conformal import PROB_GRID
    from CalibUncertaintyLib.calibration.roi import roi_mask
    from CalibUncertaintyLib.calibration.thresholds import uncertainty_score
    from CalibUncertaintyLib.metrics.error_detection import error_mask, voxel_auroc
    from CalibUncertaintyLib.pipeline.dataset import read_label
    from CalibUncertaintyLib.pipeline.ensemble import accumulate, calibrated_probs, case_maps
    from CalibUncertaintyLib.pipeline.fit import case_margin_curves
    from CalibUncertaintyLib.uncertainty.ebcu import ebcu, effective_radius_mm
    from CalibUncertaintyLib.uncertainty.maps import segmentation

    mode = cal.ensemble_mode
    spacing = cf.geometry.spacing_zyx
    labels = read_label(cf, n_classes)
    acc = accumulate(cf.load_members(n_classes), cal, mode)
    n_members = acc.n_members
    probs = calibrated_probs(acc, cal, mode, spacing)
    seg = segmentation(probs)
    roi = roi_mask(seg, spacing, roi_mm, allow_empty=True)
    names = [m for m in maps_wanted if m != "ebcu" and not (n_members == 1 and m in ENSEMBLE_ONLY)]
    if "entropy" not in names:
        names.append("entropy")
    maps = case_maps(acc, probs, cf.geometry, cal, mode, names=names, roi=roi)
    if "ebcu" in maps_wanted:  # as the fit and the maps compute it
        maps["ebcu"] = ebcu(maps["entropy"], spacing, radius_mm=effective_radius_mm(4.0, spacing),
                            threshold=cal.ebcu_threshold)
    grid = np.asarray(PROB_GRID)
    bands = []
    for c in range(1, n_classes):
        outside = np.sort(probs[c][seg != c].astype(np.float64))
        bands.append((outside.size - np.searchsorted(outside, grid, side="left")).astype(np.int64))
    curves = case_margin_curves(probs, labels, seg)
    del acc, probs
    errs = error_mask(seg, labels, roi)
    out = {"case": cf.case, "voxel_ml": cf.geometry.voxel_volume_mm3 / 1000.0, "roi_voxels": int(roi.sum()),
           "n_errors": int(errs.sum()), "flags": {}, "roi_scores": {}, "auroc": {}, "margins": curves,
           "bands": bands, "crop": None}
    idx = np.nonzero(roi)
    if idx[0].size:
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in idx)
        out["crop"] = ({m: maps[m][box].copy() for m in maps}, errs[box].copy(), roi[box].copy())
    for m, u in maps.items():
        s = uncertainty_score(m, u)
        out["flags"][m] = s[errs & roi].astype(np.float32)
        out["roi_scores"][m] = np.sort(s[roi].astype(np.float32))
        out["auroc"][m] = voxel_auroc(s, errs, roi) if errs.any() else None
    return out


def all_case_losses(members, data: Path, cases, cal_path: Path, maps_wanted) -> tuple[list, list]:
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases

    cal = CalibrationFile.load(cal_path)
    pairing = pair_cases(members, str(data / "imagesTr"), str(data / "labelsTr"), cases, require_labels=True)
    out = []
    for cf in pairing.cases:
        t0 = time.time()
        out.append(case_losses(cf, pairing.n_classes, cal, float(cal.roi["radius_mm"]), maps_wanted))
        print(f"  losses of {cf.case}: {time.time() - t0:.0f} s", flush=True)
    return out, pairing.class_names[1:]


# ----------------------------------------------------------------------------------------------
# thresholds with and without the finite-sample term
# ----------------------------------------------------------------------------------------------
def plugin_flag_c(error_scores: list, alpha: float):
    """Largest candidate c with mean_i miss_i(c) ≤ α (no finite-sample term); None = flag everything."""
    cases = [np.sort(np.asarray(s, dtype=np.float32)) for s in error_scores]
    pooled = np.unique(np.concatenate(cases)) if any(c.size for c in cases) else np.zeros(0, np.float32)
    if not pooled.size:
        return None
    miss = np.zeros(pooled.size)
    for s in cases:
        if s.size:
            miss += np.searchsorted(s, pooled, side="left") / s.size
    miss /= len(cases)
    ok = miss <= alpha + 1e-12
    return float(pooled[np.flatnonzero(ok)[-1]]) if ok.any() else None


def _miss_at_c(scores, c) -> float:
    """Fraction of a case's error scores below c (not flagged by {s ≥ c}); 0 without errors or c None."""
    if scores.size == 0 or c is None:
        return 0.0
    return float(np.count_nonzero(scores < np.float32(c)) / scores.size)


def _flagged_ml(roi_scores, c, voxel_ml) -> float:
    if c is None:
        return roi_scores.size * voxel_ml
    return float((roi_scores.size - np.searchsorted(roi_scores, np.float32(c), side="left")) * voxel_ml)


def resample(data: list, organs: list, n_cal: int, alphas, splits: int, seed: int, maps,
             detection_splits: int = 20) -> dict:
    """Module docstring, step 3. Returns {part: {name: {alpha: {stat: mean over splits}}}} + detection."""
    from CalibUncertaintyLib.calibration import conformal as cf
    from CalibUncertaintyLib.calibration.thresholds import calibrate_thresholds, uncertainty_score
    from CalibUncertaintyLib.metrics.error_detection import detection_at_threshold

    rng = np.random.default_rng(seed)
    g = np.asarray(cf.PROB_GRID)
    n_all = len(data)
    flags = {m: {a: {k: [] for k in ("miss", "flagged_ml", "flagged_frac", "plugin_miss", "plugin_flagged_ml",
                                     "trivial")} for a in alphas} for m in maps}
    margins = {o: {a: {k: [] for k in ("outer_miss", "band_ml", "plugin_outer_miss", "plugin_band_ml",
                                       "inner_fdp")} for a in alphas} for o in organs}
    detect = {m: {"ueo": [], "recall": [], "precision": [], "flagged_frac": [], "auroc": []} for m in maps}
    det_maps = [m for m in maps if all(d["crop"] is None or m in d["crop"][0] for d in data)]
    for _ in range(splits):
        perm = rng.permutation(n_all)
        ci, ti = perm[:n_cal], perm[n_cal:]
        for m in maps:
            for a in alphas:
                th = cf.flag_threshold([data[i]["flags"][m] for i in ci], a)
                c = None if th["tau"] is None else th["c"]
                pc = plugin_flag_c([data[i]["flags"][m] for i in ci], a)
                rec = flags[m][a]
                rec["trivial"].append(bool(th["trivial"]))
                rec["miss"].append(np.mean([_miss_at_c(data[i]["flags"][m], c) for i in ti]))
                rec["plugin_miss"].append(np.mean([_miss_at_c(data[i]["flags"][m], pc) for i in ti]))
                rec["flagged_ml"].append(np.mean([_flagged_ml(data[i]["roi_scores"][m], c, data[i]["voxel_ml"])
                                                  for i in ti]))
                rec["flagged_frac"].append(np.mean([_flagged_ml(data[i]["roi_scores"][m], c, 1.0)
                                                    / max(data[i]["roi_scores"][m].size, 1) for i in ti]))
                rec["plugin_flagged_ml"].append(np.mean([_flagged_ml(data[i]["roi_scores"][m], pc, data[i]["voxel_ml"])
                                                         for i in ti]))
        for k, organ in enumerate(organs):
            for a in alphas:
                th = cf.margin_thresholds([data[i]["margins"][k] for i in ci], a)
                jo = int(np.searchsorted(g, th["outer"]))
                ji = int(np.searchsorted(g, th["inner"]))
                mean_outer = np.mean([data[i]["margins"][k]["outer_miss"] for i in ci], axis=0)
                ok = np.flatnonzero(mean_outer <= a + 1e-12)
                jp = int(ok[-1]) if ok.size else 0
                rec = margins[organ][a]
                rec["outer_miss"].append(np.mean([data[i]["margins"][k]["outer_miss"][jo] for i in ti]))
                rec["plugin_outer_miss"].append(np.mean([data[i]["margins"][k]["outer_miss"][jp] for i in ti]))
                rec["band_ml"].append(np.mean([data[i]["bands"][k][jo] * data[i]["voxel_ml"] for i in ti]))
                rec["plugin_band_ml"].append(np.mean([data[i]["bands"][k][jp] * data[i]["voxel_ml"] for i in ti]))
                rec["inner_fdp"].append(np.mean([data[i]["margins"][k]["inner_fdp_raw"][ji] for i in ti]))
        cal_crops = [data[i]["crop"] for i in ci if data[i]["crop"] is not None]
        if cal_crops and det_maps and len(detect[det_maps[0]]["ueo"]) < detection_splits:
            taus = calibrate_thresholds([{m: c[0][m] for m in det_maps} for c in cal_crops],
                                        [c[1] for c in cal_crops], [c[2] for c in cal_crops])
            for m in det_maps:
                vals = {"ueo": [], "recall": [], "precision": [], "flagged_frac": []}
                for i in ti:
                    if data[i]["crop"] is None:
                        continue
                    maps_c, errs, roi = data[i]["crop"]
                    s = uncertainty_score(m, maps_c[m])
                    tau = taus[m]["tau"]
                    if taus[m]["kind"] == "quantile":
                        tau = float(np.quantile(s[roi], taus[m]["q"]))
                    d = detection_at_threshold(s, errs, tau, roi)
                    vals["ueo"].append(d["ueo"])
                    if d.get("recall") is not None:
                        vals["recall"].append(d["recall"])
                    if d.get("precision") is not None:
                        vals["precision"].append(d["precision"])
                    vals["flagged_frac"].append(d["n_flagged"] / max(int(roi.sum()), 1))
                for key, v in vals.items():
                    if v:
                        detect[m][key].append(float(np.mean(v)))
                au = [data[i]["auroc"].get(m) for i in ti]
                au = [x for x in au if x is not None]
                if au:
                    detect[m]["auroc"].append(float(np.mean(au)))

    def summ(v):
        v = [float(x) for x in v]
        if not v:
            return None
        return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}

    return {"flags": {m: {f"{a:g}": {k: summ(v) for k, v in by.items()} for a, by in f.items()} for m, f in flags.items()},
            "margins": {o: {f"{a:g}": {k: summ(v) for k, v in by.items()} for a, by in f.items()}
                        for o, f in margins.items()},
            "detection": {m: {k: summ(v) for k, v in d.items()} for m, d in detect.items() if m in det_maps}}


def tighter(data: list, m: str, alphas, organs=None) -> dict:
    """Module docstring, step 4: pooled (all cases) mean miss and flagged volume as functions of the
    threshold; at each n the flagged volume (mL per case) of the largest threshold whose pooled mean
    miss is within the allowance (α(n + 1) − 1)/n, and at the allowance α itself (n → ∞)."""
    scores = [d["flags"][m] for d in data]
    cand = np.unique(np.concatenate([s for s in scores if s.size])) if any(s.size for s in scores) else None
    out = {"map": m, "rows": []}
    if cand is None:
        return out
    miss = np.mean([np.searchsorted(np.sort(s), cand, side="left") / s.size if s.size else np.zeros(cand.size)
                    for s in scores], axis=0)
    vol = np.mean([(d["roi_scores"][m].size - np.searchsorted(d["roi_scores"][m], cand, side="left")) * d["voxel_ml"]
                   for d in data], axis=0)
    roi_ml = float(np.mean([d["roi_scores"][m].size * d["voxel_ml"] for d in data]))

    def at(allow):
        ok = np.flatnonzero(miss <= allow + 1e-12)
        return (float(vol[ok[-1]]), float(miss[ok[-1]])) if ok.size and allow >= 0 else (roi_ml, 0.0)

    for a in alphas:
        inf_vol, _ = at(a)
        for n in N_FOR_TIGHTER:
            allow = (a * (n + 1) - 1) / n
            v, realised = at(allow)
            out["rows"].append({"alpha": a, "n": n, "allowed_mean_miss": max(allow, 0.0), "trivial": allow < 0,
                                "flagged_ml": v, "pooled_miss": realised, "flagged_ml_no_correction": inf_vol,
                                "roi_ml": roi_ml})
    return out


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def product_path(members, data: Path, split: dict, method: str, alpha: float, work: Path, tag: str) -> dict:
    """``calib-uncertainty fit-temperature`` on the split's calibration cases, then what ``calib-uncertainty
    evaluate`` computes on its test cases (``pipeline.evaluate.evaluate_cases``; its tables, not its
    figures) (module docstring, 1)."""
    from openkbp import cli

    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases
    from CalibUncertaintyLib.pipeline.evaluate import EvalOptions, detection_rows, evaluate_cases
    from CalibUncertaintyLib.report.tables import aggregate_rows

    common = ["--members", *[str(d) for d in members], "--images", str(data / "imagesTr"),
              "--labels", str(data / "labelsTr")]
    cal_path = work / f"calibration_{tag}.json"
    cli(["fit-temperature", *common, "--cases", *split["calibration"], "--method", method, "--conformal-alpha",
         str(alpha), "-o", str(cal_path)])
    pairing = pair_cases([str(d) for d in members], str(data / "imagesTr"), str(data / "labelsTr"), split["test"],
                         require_labels=True)
    ev = evaluate_cases(pairing, CalibrationFile.load(cal_path), EvalOptions())
    (work / f"evaluation_{tag}.json").write_text(json.dumps(ev, indent=1, default=str))
    det = {}
    for row in aggregate_rows(detection_rows(ev), ("map",), skip=("case", "kind", "source", "flag", "applicable",
                                                                   "not_applicable")):
        det[row["map"]] = {k: row.get(f"{k}.mean") for k in ("ueo", "recall", "precision", "auroc",
                                                             "non_boundary_recall")}
    calf = json.loads(cal_path.read_text())
    return {"calibration": str(cal_path), "temperature": calf["temperature"], "method": calf.get("method"),
            "held_out": ev["conformal"], "detection": det, "split": split}


def parse_args(argv=None):
    from _stock_members import add_model_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="OpenKBP folder (default ../shared/data/openkbp)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/calibu_conformal"))
    p.add_argument("--n-cal", type=int, default=None, help="calibration cases per split (default 15; 10 with "
                                                           "--model-folder)")
    p.add_argument("--n-test", type=int, default=15, help="synthetic members: test cases")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--splits", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="+", default=["single", "deep"], choices=("single", "deep"))
    p.add_argument("--methods", nargs="+", default=None, choices=("temperature", "local_temperature"),
                   help="calibration methods (default: temperature; with --model-folder also local_temperature)")
    p.add_argument("--no-shift", action="store_true", help="--model-folder: skip the shifted split")
    p.add_argument("--detection-splits", type=int, default=20,
                   help="error detection (τ* search per split) on the first N splits only (default 20)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default=None, help="report file stem (default conformal_openkbp / conformal_stock)")
    add_model_arguments(p)
    a = p.parse_args(argv)
    stock = a.model_folder is not None
    a.n_cal = a.n_cal or (10 if stock else 15)
    a.methods = a.methods or (["temperature", "local_temperature"] if stock else ["temperature"])
    a.name = a.name or ("conformal_stock" if stock else "conformal_openkbp")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from CalibUncertaintyLib.calibration.conformal import ALPHA_GRID, min_cases

    t0 = time.time()
    data = _data(a.data)
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    stock = a.model_folder is not None
    if stock:
        from _stock_members import model_cases, model_members, random_splits, shifted_split

        cases = model_cases(a)
        mem = model_members(a, data / "imagesTr", cases, work=work)
        sources = {c: mem[c] for c in a.configs}
        members_record = mem["record"]
        split0 = random_splits(cases, a.n_cal, 1, a.seed)[0]
    else:
        from CalibUncertaintyLib.synthetic.members import make_member_folders

        all_cases = sorted(f.name[:-len(".nii.gz")] for f in (data / "labelsTr").glob("*.nii.gz"))
        order = np.random.default_rng(a.seed).permutation(len(all_cases))
        cases = [all_cases[i] for i in order[: a.n_cal + a.n_test]]
        split0 = {"calibration": cases[: a.n_cal], "test": cases[a.n_cal:]}
        members = [str(d) for d in make_member_folders(data / "labelsTr", work / "members", cases, n_members=3, seed=0)]
        sources = {"synthetic": members}
        members_record = {"synthetic": True, "n_members": 3}
    (work / "split.json").write_text(json.dumps(split0, indent=1))
    t_members = time.time() - t0
    alphas = [x for x in ALPHA_GRID if min_cases(x) <= a.n_cal]
    runs = {}
    for cfg, members in sources.items():
        maps = [m for m in (DETECTION_MAPS if stock else MAPS) if not (len(members) == 1 and m in ENSEMBLE_ONLY)]
        for method in a.methods:
            key = f"{cfg}/{method}"
            tag = f"{cfg}_{method}"
            print(f"== {key}", flush=True)
            t1 = time.time()
            run = {"config": cfg, "method": method, "members": [Path(m).name for m in members],
                   "random": product_path(members, data, split0, method, a.alpha, work, tag)}
            if not stock and cfg == "synthetic" and method == a.methods[0]:  # ebcu_study.py reads these
                (work / "calibration.json").write_text(Path(run["random"]["calibration"]).read_text())
            losses, organs = all_case_losses(members, data, cases, Path(run["random"]["calibration"]), maps)
            run["resampled"] = resample(losses, organs, a.n_cal, alphas, a.splits, a.seed + 1, maps,
                                        a.detection_splits)
            run["tighter"] = [tighter(losses, m, alphas) for m in maps if m in ("entropy", "dae")]
            run["cases"] = [{k: d[k] for k in ("case", "roi_voxels", "n_errors", "voxel_ml")} for d in losses]
            if stock and not a.no_shift:
                run["shifted"] = product_path(members, data, shifted_split(cases, a.n_cal), method, a.alpha, work,
                                              tag + "_shifted")
            run["seconds"] = round(time.time() - t1, 1)
            runs[key] = run
            del losses
    command = "PYTHONPATH=. .venv/bin/python bench/conformal_openkbp.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    record = {"command": command.strip(), "wall_s": round(time.time() - t0, 1), "members_s": round(t_members, 1),
              "stock": stock, "members": members_record, "cases": cases, "n_cal": a.n_cal, "alpha": a.alpha,
              "alphas": alphas, "splits": a.splits, "detection_splits": min(a.detection_splits, a.splits), "runs": runs,
              "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, load average "
                         f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"}
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / f"{a.name}.json").write_text(json.dumps(record, indent=1))
    text = render(record)
    (a.results / f"{a.name}.md").write_text(text)
    print(text)
    return 0


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _m(s, d=4):
    if s is None:
        return "–"
    return f"{s['mean']:.{d}f}" + (f" ± {s['sd']:.{d}f}" if s.get("sd") else "")


def _v(s, d=1):
    return "–" if s is None else f"{s['mean']:.{d}f}"


def render(r) -> str:
    alphas = r["alphas"]
    n_cal = r["n_cal"]
    n_test = len(r["cases"]) - n_cal
    src = ("members of the model folder `" + str(r["members"].get("model_folder")) + "` (the product's member cache "
           f"`{r['members'].get('member_cache')}`, TTA {'on' if r['members'].get('tta') else 'off'})"
           if r["stock"] else "**synthetic** members (3 per case, `synthetic.members`, over-confident, built from "
                              "each case's real label on its real CT grid); no trained model")
    L = ["# Conformal flags and organ margins on real OpenKBP labels (held-out miss rates)", "",
         "Produced by", "", "```", r["command"], "```", "",
         f"- Wall time {r['wall_s'] / 60:.1f} min on {r['machine']}.",
         f"- Members: {src}.",
         f"- {len(r['cases'])} cases: {', '.join(r['cases'])}; every split: {n_cal} calibration / {n_test} test "
         f"cases; {r['splits']} random splits. α values needing more than {n_cal} calibration cases are left out.",
         "- Miss rate of a map's flags = fraction of a case's ROI error voxels (prediction ≠ reference, ROI = "
         "15 mm around the prediction) not flagged; outer miss = fraction of the organ's true voxels outside "
         "the outer contour; inner 1 − precision = fraction of the inner contour that is not organ. "
         "The guarantee (conformal risk control) is mean ≤ α over exchangeable cases. 'plug-in' = the same "
         "threshold search without the finite-sample term (largest threshold with calibration mean ≤ α; no "
         "guarantee): the difference is what the term costs. Flagged volume = mL of the ROI flagged per test "
         "case; band = mL of the outer margin outside the prediction per test case. Values: mean ± SD over "
         "splits.", ""]
    for key, run in r["runs"].items():
        ho = run["random"]
        L += [f"## {key} ({len(run['members'])} member(s)); T (first split) = {ho['temperature']:.3f}", "",
              f"### Flags against α ({r['splits']} splits, T and maps fixed from the first split's calibration)", "",
              "| map | α | test mean miss | plug-in miss | flagged mL / case | plug-in flagged mL | flagged share of ROI "
              "| trivial splits |", "|---|---|---|---|---|---|---|---|"]
        for m, by in run["resampled"]["flags"].items():
            for al in alphas:
                s = by[f"{al:g}"]
                triv = s["trivial"]["mean"] if s["trivial"] else 0
                L.append(f"| {m} | {al:g} | {_m(s['miss'])} | {_m(s['plugin_miss'])} | {_v(s['flagged_ml'])} | "
                         f"{_v(s['plugin_flagged_ml'])} | {_m(s['flagged_frac'], 3)} | {triv:.2f} |")
        L += ["", "### Organ margins against α", "",
              "| organ | α | outer miss | plug-in outer miss | band mL | plug-in band mL | inner 1 − precision |",
              "|---|---|---|---|---|---|---|"]
        for o, by in run["resampled"]["margins"].items():
            for al in alphas:
                s = by[f"{al:g}"]
                L.append(f"| {o} | {al:g} | {_m(s['outer_miss'])} | {_m(s['plugin_outer_miss'])} | "
                         f"{_v(s['band_ml'], 2)} | {_v(s['plugin_band_ml'], 2)} | {_m(s['inner_fdp'])} |")
        det = run["resampled"].get("detection") or {}
        if det:
            L += ["", f"### Error detection per map (τ* by mean UEO on each split's calibration cases; the first "
                      f"{r.get('detection_splits', r['splits'])} splits)", "",
                  "| map | UEO at τ* | recall | precision | flagged share of ROI | voxel AUROC | product `evaluate`, "
                  "first split: UEO / AUROC |", "|---|---|---|---|---|---|---|"]
            for m, s in det.items():
                pe = ho["detection"].get(m) or {}
                prod = "–" if pe.get("ueo") is None else f"{pe['ueo']:.3f} / {pe['auroc'] if pe.get('auroc') is None else round(pe['auroc'], 3)}"
                L.append(f"| {m} | {_m(s['ueo'], 3)} | {_m(s['recall'], 3)} | {_m(s['precision'], 3)} | "
                         f"{_m(s['flagged_frac'], 3)} | {_m(s['auroc'], 3)} | {prod} |")
        for t in run.get("tighter") or []:
            if not t["rows"]:
                continue
            L += ["", f"### What a tighter guarantee needs ({t['map']} flags; pooled curve of all "
                      f"{len(r['cases'])} cases, mean ROI {t['rows'][0]['roi_ml']:.0f} mL per case)", "",
                  "| α | n calibration cases | allowed calibration mean miss | flagged mL / case | pooled miss | "
                  "flagged mL without the term |", "|---|---|---|---|---|---|"]
            for row in t["rows"]:
                allow = "trivial (whole ROI)" if row["trivial"] else f"{row['allowed_mean_miss']:.4f}"
                L.append(f"| {row['alpha']:g} | {row['n']} | {allow} | {row['flagged_ml']:.1f} | "
                         f"{row['pooled_miss']:.4f} | {row['flagged_ml_no_correction']:.1f} |")
        for part, title in (("random", "first random split"), ("shifted", "shifted split")):
            p = run.get(part)
            if not p or not p.get("held_out"):
                continue
            sp = p["split"]
            L += ["", f"### Product path, {title}: `fit-temperature --conformal-alpha {r['alpha']:g}` then `evaluate`"
                      f" (T = {p['temperature']:.3f})", "",
                  f"Calibration: {', '.join(sp['calibration'])}" + (f" ({sp['rule']})" if sp.get("rule") else "")
                  + f"; test: {', '.join(sp['test'])}.", "",
                  "| map | α | held-out mean miss | SE |", "|---|---|---|---|"]
            for m, rows in p["held_out"]["flags"].items():
                for row in rows:
                    se = "–" if row["se"] is None else f"{row['se']:.4f}"
                    L.append(f"| {m} | {row['alpha']:g} | {row['mean_miss']:.4f} | {se} |")
            L += ["", "| organ | α | outer p ≥ | mean outer miss | inner p > | mean inner 1 − precision |",
                  "|---|---|---|---|---|---|"]
            for o, rows in p["held_out"]["margins"].items():
                for row in rows:
                    L.append(f"| {o} | {row['alpha']:g} | {row['outer']:.4g} | {row['mean_outer_miss']:.4f} | "
                             f"{row['inner']:.4g} | {row['mean_inner_fdp']:.4f} |")
        L.append("")
    eff = ", ".join(f"{max(x * (n_cal + 1) - 1, 0) / n_cal:.3f} at α = {x:g}" for x in alphas)
    L += ["## Reading", "",
          f"- With n = {n_cal} calibration cases the bound n/(n+1)·R̂ + 1/(n+1) ≤ α allows a calibration mean "
          f"miss R̂ ≤ (α(n+1) − 1)/n: {eff}. Exchangeable test cases then miss about that much, well below α: "
          "the flags cover far more than α asks, and the 'flagged mL' against 'plug-in flagged mL' columns say "
          "what that costs the reviewer. The 'tighter guarantee' tables give the calibration cases that bring "
          "the allowance close to α.",
          "- A map that is exactly 0 at some calibration errors can only cover them by flagging every voxel ≥ 0, "
          "i.e. the whole ROI: the guarantee holds, trivially.",
          "- The guarantee is for cases exchangeable with the calibration cases; the shifted split (another part "
          "of the cohort by case id) shows what happens when they are not."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
