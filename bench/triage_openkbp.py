"""Case triage and the out-of-distribution check on held-out OpenKBP cases (issue 11, item 5).

Reads the member predictions that ``bench/openkbp_local.py`` wrote (``<members-root>/<ensemble>/<member>/``
with ``<case>.npz`` + ``<case>.pkl`` for the calibration cases, the test cases and the OOD CT, case id
``OOD_abdomen``) and, for each configuration (single = the first deep-ensemble member, deep,
checkpoint, tta when present), runs the library as a user would:

1. ``pipeline.fit.fit_calibration`` on the **calibration cases** with their CT (global temperature,
   the project's default): T, τ* per map, and the atypicality reference (``metrics.atypicality``:
   the 0.99 quantile u_ref of the entropy / MI over the calibration cases' bodies and their
   high-U body fractions). Nothing below is chosen on a test case.
2. ``pipeline.maps_job.run_maps`` on the **test cases and the OOD CT**: each case's
   ``summary.json`` ``case_aggregates`` (METHODS §6 aggregates of the regions map DAE, and the
   atypicality aggregates with their p-values against the calibration cases: high-entropy / high-MI
   body fractions, organ volume atypicality).
3. The §6 aggregates with U = entropy and U = mutual information (ensembles) instead of DAE, from
   the written maps with the same definitions (``metrics.case_quality.case_aggregates``, τ = the
   calibration file's τ* of that map, regions ``regions.components.find_regions``).
4. Risk of a test case = 1 − mean organ Dice of the written segmentation (``seg.nii.gz``) against its
   label. Per candidate aggregate: the OOD case's rank among test cases + OOD (1 = reviewed first),
   whether it is above every test case, Spearman ρ and Pearson r with Dice on the test cases, and
   the risk–coverage AURC on the test cases (``metrics.case_quality.risk_coverage``; undefined
   aggregates count as +∞, ``metrics.triage``), with the oracle AURC.
5. ``--evaluate``: also ``pipeline.evaluate.evaluate_cases`` on the test cases (what
   ``calib-uncertainty evaluate`` computes), its triage for the default priority, and the largest
   difference between its per-case aggregates and the maps' (they must agree).

    .venv/bin/python bench/triage_openkbp.py --members-root /tmp/calibu_openkbp_local/split_XXX/members \\
        --split /tmp/calibu_openkbp_local/split_XXX/split.json [--evaluate]

Report: ``bench/results/triage_openkbp.md`` and ``.json`` (the command and everything printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

from CalibUncertaintyLib.errors import CalibUncertaintyError, InputError  # noqa: E402
from CalibUncertaintyLib.io.atomic import write_json, write_text  # noqa: E402
from openkbp import run_cli  # noqa: E402

log = logging.getLogger("bench.triage_openkbp")
OOD_ID = "OOD_abdomen"
CONFIGS = ("single", "deep", "checkpoint", "tta")
SECTION6 = ("mean_u_roi", "sum_u_fg", "largest_region_mm3", "fraction_fg_flagged")
ATYPICAL = ("high_entropy_body_fraction", "high_mi_body_fraction", "organ_volume_atypicality")


def default_data() -> Path:
    return Path(os.environ.get("CALIBU_SHARED", REPO.parent / "shared")) / "data" / "openkbp"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members-root", type=Path, default=None,
                   help="folder with one subfolder per ensemble (deep, checkpoint, tta) of member folders "
                        "(or --model-folder)")
    p.add_argument("--split", type=Path, default=None,
                   help="split.json with 'calibration' and 'test' case ids (with --members-root)")
    p.add_argument("--n-cal", type=int, default=10, help="--model-folder: calibration cases per split (default 10)")
    p.add_argument("--splits", type=int, default=5, help="--model-folder: random splits (default 5)")
    p.add_argument("--seed", type=int, default=0, help="--model-folder: seed of the splits (default 0)")
    p.add_argument("--method", default=None, help="calibration method of the fit (default: the product's "
                                                   "fit-temperature default, pipeline.fit.DEFAULT_METHOD)")
    p.add_argument("--data", type=Path, default=default_data(), help="OpenKBP folder (labels and CT)")
    p.add_argument("--ood", type=Path, default=default_data().parent / "ood_ct" / "abdomen_ct_3mm.nii.gz")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/calibu_triage_openkbp"))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--evaluate", action="store_true", help="also run evaluate_cases on the test cases")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default=None, help="report file stem under --results (default triage_openkbp; "
                                                 "triage_stock with --model-folder)")
    from _stock_members import add_model_arguments

    add_model_arguments(p)
    a = p.parse_args(argv)
    if (a.model_folder is None) == (a.members_root is None):
        p.error("give either --model-folder or --members-root (with --split)")
    if a.members_root is not None and a.split is None:
        p.error("--members-root needs --split")
    a.name = a.name or ("triage_stock" if a.model_folder else "triage_openkbp")
    if a.model_folder is not None and a.configs == list(CONFIGS):
        a.configs = ["single", "deep"]
    return a


def _dataset(data: Path) -> Path:
    if (data / "dataset.json").is_file():
        return data
    found = sorted(d for d in data.iterdir() if d.is_dir() and (d / "dataset.json").is_file())
    if len(found) != 1:
        raise InputError(f"no single nnU-Net dataset folder under {data}")
    return found[0]


def _link_folder(folder: Path, links: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        p = folder / name
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(Path(target).resolve())
    return folder


def member_dirs(root: Path, cfg: str) -> list[Path]:
    ens = "deep" if cfg == "single" else cfg
    d = root / ens
    if not d.is_dir():
        return []
    dirs = sorted(x for x in d.iterdir() if x.is_dir() and any(x.glob("*.npz")))
    return dirs[:1] if cfg == "single" else dirs


def extra_aggregates(case_dir: Path, summary: dict, name: str) -> dict:
    """§6 aggregates of map ``name`` from the written maps (same definitions as the library's)."""
    from CalibUncertaintyLib.calibration.roi import roi_mask
    from CalibUncertaintyLib.calibration.thresholds import uncertainty_score
    from CalibUncertaintyLib.io.images import read_image
    from CalibUncertaintyLib.metrics.case_quality import case_aggregates
    from CalibUncertaintyLib.regions.components import find_regions

    seg, g = read_image(case_dir / "seg.nii.gz")
    u, _ = read_image(case_dir / f"map_{name}.nii.gz")
    roi = roi_mask(seg, g.spacing_zyx, float(summary["roi"]["radius_mm"]), allow_empty=True)
    tau = summary["thresholds"][name]["tau_score"]
    if tau is None or not roi.any():
        return {a: None for a in SECTION6}
    score = uncertainty_score(name, u)
    regions = find_regions(score, tau, roi, seg, g, min_volume_mm3=10.0)
    return case_aggregates(score, roi, seg > 0, tau, [r.volume_mm3 for r in regions], g.voxel_volume_mm3)


def case_dice(case_dir: Path, label_path: Path, k: int) -> float:
    from CalibUncertaintyLib.io.images import read_image
    from CalibUncertaintyLib.metrics.dice import dice_per_class, mean_dice

    seg, _ = read_image(case_dir / "seg.nii.gz")
    lab, _ = read_image(label_path)
    return float(mean_dice(dice_per_class(np.asarray(seg).astype(np.int64), np.asarray(lab).astype(np.int64), k)))


def candidate_table(values: dict, test_ids: list, dice: dict, ood: str = OOD_ID) -> dict:
    """Per candidate: OOD rank, above every test case, correlations with Dice and AURC on the test cases."""
    from CalibUncertaintyLib.metrics.case_quality import correlations, risk_coverage

    out = {}
    for cand, per_case in values.items():
        test_raw = [per_case.get(c) for c in test_ids]
        pv = {c: math.inf if v is None else float(v) for c, v in per_case.items()}  # undefined: review first
        ood_v = pv.get(ood)
        rank = None if ood_v is None else 1 + sum(pv[c] > ood_v for c in test_ids)
        ties = 0 if ood_v is None else sum(pv[c] == ood_v for c in test_ids)
        rc = risk_coverage([pv[c] for c in test_ids], [dice[c] for c in test_ids])
        out[cand] = {"ood": per_case.get(ood), "max_test": max((v for v in test_raw if v is not None), default=None),
                     "ood_rank": rank, "ood_ties": ties,
                     "ood_first": bool(ood_v is not None and all(ood_v > pv[c] for c in test_ids)),
                     "ood_p": None, **correlations(test_raw, [dice[c] for c in test_ids]),
                     "aurc": rc["aurc"], "aurc_optimal": rc["aurc_optimal"], "risk_curve": rc["risk"],
                     "n_undefined": int(sum(v is None for v in test_raw))}
    return out


def _work_key(dirs, split, args) -> dict:
    """What a configuration's calibration and evaluation depend on: member files (size, mtime), split, OOD."""
    files = sorted(p for d in dirs for p in Path(d).glob("*.np[z]"))
    return {"members": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
            "split": {k: split[k] for k in ("calibration", "test")}, "ood": str(args.ood), "script": 1,
            "method": args.method}


def run_config(cfg: str, dirs: list, args, ds: Path, split: dict) -> dict:
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases
    from CalibUncertaintyLib.pipeline.case import CaseOptions
    from CalibUncertaintyLib.pipeline.fit import FitOptions, fit_calibration
    from CalibUncertaintyLib.pipeline.maps_job import run_maps

    work = args.workdir / cfg
    cal_ids, test_ids = list(split["calibration"]), list(split["test"])
    images = _link_folder(args.workdir / "images", {**{f"{c}_0000.nii.gz": ds / "imagesTr" / f"{c}_0000.nii.gz"
                                                        for c in cal_ids + test_ids},
                                                     f"{args.ood_id}_0000.nii.gz": args.ood})
    labels = _link_folder(args.workdir / "labels", {f"{c}.nii.gz": ds / "labelsTr" / f"{c}.nii.gz"
                                                    for c in cal_ids + test_ids})
    t0 = time.time()
    pairing = pair_cases(dirs, images, labels, cal_ids, require_labels=True)
    work.mkdir(parents=True, exist_ok=True)
    key = _work_key(dirs, split, args)
    reused = (work / "key.json").is_file() and json.loads((work / "key.json").read_text()) == key \
        and (work / "calibration.json").is_file()
    if reused:  # the same members and split: the calibration of an earlier run of this script
        from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile

        cal = CalibrationFile.load(work / "calibration.json")
    else:
        (work / "key.json").unlink(missing_ok=True)
        cal = fit_calibration(pairing, FitOptions(method=args.method) if args.method else FitOptions())
        cal.save(work / "calibration.json")
        write_json(work / "key.json", key)
    t_fit = time.time() - t0
    log.info("%s: calibration fitted in %.0f s (T = %.3f)", cfg, t_fit, cal.temperature)
    cases = test_ids + [args.ood_id]
    pairing = pair_cases(dirs, images, None, cases)
    result = run_maps(pairing, cal, CaseOptions(), work / "maps")
    if result.failed:
        raise result.error()
    t_maps = time.time() - t0 - t_fit
    log.info("%s: maps of %d cases in %.0f s", cfg, len(cases), t_maps)
    k = pairing.n_classes
    multi = len(dirs) > 1
    values: dict = {}
    summaries = {c: json.loads((work / "maps" / c / "summary.json").read_text()) for c in cases}
    for c in cases:
        s = summaries[c]
        agg = s["case_aggregates"]
        for a in SECTION6:
            values.setdefault(f"{a}[dae]", {})[c] = agg.get(a)
        for a in ATYPICAL:
            if a in agg:
                values.setdefault(a, {})[c] = agg[a]
                values.setdefault(f"{a}_p", {})[c] = agg.get(f"{a}_p")
        for m in ("entropy", "mutual_information") if multi else ("entropy",):
            extra = extra_aggregates(work / "maps" / c, s, m)
            for a in SECTION6:
                values.setdefault(f"{a}[{m}]", {})[c] = extra[a]
    pvals = {a: values.pop(f"{a}_p") for a in ATYPICAL if f"{a}_p" in values}
    dice = {c: case_dice(work / "maps" / c, labels / f"{c}.nii.gz", k) for c in test_ids}
    table = candidate_table(values, test_ids, dice, args.ood_id)
    for a, p in pvals.items():
        table[a]["ood_p"] = p.get(args.ood_id)
        table[a]["test_p_min"] = min((v for c, v in p.items() if c != args.ood_id and v is not None), default=None)
        table[a]["test_p"] = {c: v for c, v in p.items() if c != args.ood_id}
    out = {"members": [d.name for d in dirs], "reused_calibration": reused, "temperature": cal.temperature, "reference": cal.case_reference,
           "dice": dice, "values": values, "candidates": table, "seconds": {"fit": round(t_fit, 1),
                                                                             "maps": round(t_maps, 1)},
           "ood_predicted_mm3": summaries[args.ood_id].get("predicted_volume_mm3"),
           "ood_roi_voxels": summaries[args.ood_id]["roi"]["n_voxels"]}
    if args.evaluate and reused and (work / "evaluate.json").is_file():
        out["evaluate"] = {**json.loads((work / "evaluate.json").read_text()), "reused": True}
    elif args.evaluate:
        from CalibUncertaintyLib.pipeline.evaluate import EvalOptions, case_triage_aggregates, evaluate_cases

        t1 = time.time()
        ev = evaluate_cases(pair_cases(dirs, images, labels, test_ids, require_labels=True), cal, EvalOptions())
        diffs = []
        for rec in ev["per_case"]:
            a = case_triage_aggregates(rec)
            for key in ("mean_u_roi", "fraction_fg_flagged", *ATYPICAL):
                mine = summaries[rec["case"]]["case_aggregates"].get(key)
                if a.get(key) is not None and mine is not None:
                    diffs.append(abs(a[key] - mine) / max(abs(mine), 1e-12))
        t = ev["triage"]
        rc = t["aggregates"][t["priority"]]["risk_coverage"]
        out["evaluate"] = {"priority": t["priority"], "aurc": rc["aurc"], "aurc_optimal": rc["aurc_optimal"],
                           "order": [r["case"] for r in t["ranking"]],
                           "max_rel_diff_vs_maps": max(diffs) if diffs else None,
                           "mean_dice": float(np.mean([r["mean_dice"] for r in ev["per_case"]])),
                           "seconds": round(time.time() - t1, 1)}
        write_json(work / "evaluate.json", out["evaluate"])
        log.info("%s: evaluate in %.0f s", cfg, time.time() - t1)
    return out


def _f(v, d=3):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{d}g}" if abs(v) >= 1000 else f"{v:.{d}f}"
    return str(v)


def render(run: dict) -> str:
    s = ["# Case triage and the out-of-distribution CT on held-out OpenKBP cases", "",
         f"Command: `{run['command']}`", "",
         f"- Members: `{run['members_root']}` (written by `bench/openkbp_local.py`); split `{run['split_path']}`: "
         f"{len(run['split']['calibration'])} calibration cases ({', '.join(run['split']['calibration'])}), "
         f"{len(run['split']['test'])} test cases; OOD CT `{run['ood']}` (abdomen, given to the head-and-neck models).",
         "- Calibration (global temperature), τ* per map and the atypicality reference come from the calibration "
         "cases only; nothing is tuned on the test cases. Candidates: the METHODS §6 aggregates of U = DAE (the "
         "library's regions map), U = entropy and U = mutual information (ensembles), and the atypicality "
         "aggregates `high_entropy_body_fraction` / `high_mi_body_fraction` (fraction of the body, CT ≥ −500 HU, "
         "with U above the calibration cases' 0.99 quantile) and `organ_volume_atypicality` (mean over organs of "
         "|ln((V + 1 ml) / (calibration median + 1 ml))| of the predicted volumes); `metrics/atypicality.py`, "
         "p-values against the calibration cases.",
         "- Every candidate and its parameters (q = 0.99, body ≥ −500 HU, v0 = 1 ml, the library's default "
         "regions map and τ*) were fixed before the first run on these members; none was chosen after seeing them.",
         "- OOD rank: 1 = reviewed before every test case (ties count against it: rank 1 needs a strictly "
         "larger value). Risk = 1 − mean organ Dice; AURC over the test cases (lower is better), oracle in brackets. "
         "ρ = Spearman with Dice (a useful aggregate is negative).",
         f"- Wall time {run['wall_s']:.0f} s on {run['machine']}.", ""]
    for cfg, r in run["configurations"].items():
        if r.get("skipped"):
            s += [f"## {cfg}", "", f"Not run: {r['skipped']}", ""]
            continue
        dice = list(r["dice"].values())
        s += [f"## {cfg} ({len(r['members'])} member(s): {', '.join(r['members'])})", "",
              f"T = {r['temperature']:.3f}; test mean Dice {np.mean(dice):.3f} (min {min(dice):.3f}, max "
              f"{max(dice):.3f}); OOD predicted volume (mm³): "
              + ", ".join(f"{k} {v:.0f}" for k, v in (r.get("ood_predicted_mm3") or {}).items())
              + f"; OOD ROI voxels {r['ood_roi_voxels']}."
              + (" Calibration and evaluation reused from an earlier run of this command on the same member "
                 "files (workdir)." if r.get("reused_calibration") else ""), ""]
        ref = r.get("reference") or {}
        if ref:
            s += ["Atypicality reference (calibration cases): u_ref = " + ", ".join(
                f"{m} {v:.4f}" for m, v in ref["u_ref"].items()) + "; the calibration cases' own values: "
                + "; ".join(f"{a}: " + ", ".join(f"{x:.4f}" for x in v) for a, v in ref["scores"].items()), ""]
        s += ["| candidate | OOD value | max over test cases | OOD rank (of " + str(len(dice) + 1) + ") | OOD first "
              "| p-value OOD (min over test) | Spearman ρ | Pearson r | AURC (oracle) |",
              "|---|---|---|---|---|---|---|---|---|"]
        for cand, v in r["candidates"].items():
            p = "–" if v.get("ood_p") is None else f"{v['ood_p']:.3f} ({_f(v.get('test_p_min'))})"
            s.append(f"| {cand} | {_f(v['ood'], 4)} | {_f(v['max_test'], 4)} | {_f(v['ood_rank'])}"
                     f"{' (tied with ' + str(v['ood_ties']) + ')' if v.get('ood_ties') else ''} | {_f(v['ood_first'])} | "
                     f"{p} | {_f(v.get('spearman'), 2)} | {_f(v.get('pearson'), 2)} | "
                     f"{_f(v['aurc'])} ({_f(v['aurc_optimal'])}) |")
        first = [c for c, v in r["candidates"].items() if v["ood_first"]]
        s += ["", "Ranks the OOD CT above every test case: " + (", ".join(first) if first else "**none**") + ".", ""]
        if r.get("evaluate"):
            e = r["evaluate"]
            s += [f"`evaluate_cases` on the test cases (priority {e['priority']}): AURC {e['aurc']:.3f} (oracle "
                  f"{e['aurc_optimal']:.3f}), mean Dice {e['mean_dice']:.3f}; largest relative difference between its "
                  f"per-case aggregates and the maps' summary.json: {_f(e['max_rel_diff_vs_maps'], 2)}; review order "
                  + ", ".join(e["order"]) + ".", ""]
    return "\n".join(s) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    t0 = time.time()
    command = " ".join(shlex.quote(x) for x in [".venv/bin/python", "bench/triage_openkbp.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    ds = _dataset(args.data)
    if not args.ood.is_file():
        raise InputError(f"OOD CT not found: {args.ood}")
    if args.model_folder is not None:
        return main_model_folder(args, ds, command, t0)
    args.ood_id = OOD_ID
    split = json.loads(args.split.read_text())
    configs = {}
    for cfg in args.configs:
        dirs = member_dirs(args.members_root, cfg)
        if not dirs:
            configs[cfg] = {"skipped": f"no member folders under {args.members_root / ('deep' if cfg == 'single' else cfg)}"}
            continue
        try:
            configs[cfg] = run_config(cfg, dirs, args, ds, split)
        except CalibUncertaintyError as exc:
            configs[cfg] = {"skipped": f"{type(exc).__name__}: {exc}"}
            log.warning("%s: %s", cfg, exc)
    import platform

    run = {"command": command, "members_root": str(args.members_root), "split_path": str(args.split),
           "split": {k: split[k] for k in ("calibration", "test")}, "ood": str(args.ood),
           "wall_s": time.time() - t0,
           "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}", "configurations": configs}
    text = render(run)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / f"{args.name}.json", run)
    write_text(args.results / f"{args.name}.md", text)
    return 0


# ----------------------------------------------------------------------------------------------
# --model-folder: repeated splits of the model's held-out cases
# ----------------------------------------------------------------------------------------------
def main_model_folder(args, ds: Path, command: str, t0: float) -> int:
    """The members of ``--model-folder`` (product member cache) on its held-out cases and the OOD CT;
    ``--splits`` random calibration / test splits, each run as ``run_config`` does; the candidates'
    AURC, Spearman ρ and OOD rank summarised over the splits."""
    from _stock_members import machine, model_cases, model_members, ood_id, random_splits

    cases = model_cases(args)
    work_root = args.workdir
    mem = model_members(args, ds / "imagesTr", cases, ood_files=[args.ood], work=work_root)
    args.ood_id = ood_id(args.ood)
    splits = random_splits(cases, args.n_cal, args.splits, args.seed)
    configs = {}
    for cfg in args.configs:
        per_split = []
        for i, split in enumerate(splits):
            args.workdir = work_root / f"split_{i}"
            t1 = time.time()
            try:
                r = run_config(cfg, mem[cfg], args, ds, split)
            except CalibUncertaintyError as exc:
                log.warning("%s split %d: %s", cfg, i, exc)
                r = {"skipped": f"{type(exc).__name__}: {exc}"}
            r["split"] = split
            r["seconds_total"] = round(time.time() - t1, 1)
            per_split.append(r)
            log.info("%s: split %d of %d done in %.0f s", cfg, i + 1, len(splits), time.time() - t1)
        ok = [r for r in per_split if not r.get("skipped")]
        configs[cfg] = {"members": [Path(d).name for d in mem[cfg]], "splits": per_split,
                        "summary": summarise_splits(ok), "naming": naming_rates(ok) if ok else None}
    args.workdir = work_root
    run = {"command": command, "model_folder": str(args.model_folder), "member_cache": mem["record"],
           "cases": cases, "n_cal": args.n_cal, "n_splits": len(splits), "seed": args.seed, "ood": str(args.ood),
           "ood_id": args.ood_id, "wall_s": time.time() - t0, "machine": machine(), "configurations": configs}
    text = render_model_folder(run)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / f"{args.name}.json", run)
    write_text(args.results / f"{args.name}.md", text)
    return 0


def summarise_splits(per_split: list) -> dict:
    """Per candidate over the splits: mean and SD of AURC, excess AURC (AURC − oracle), Spearman ρ;
    the OOD rank (mean, worst) and the share of splits that rank it first; how often each candidate
    had the lowest AURC."""
    if not per_split:
        return {}
    cands = list(per_split[0]["candidates"])
    best = {c: 0 for c in cands}
    for r in per_split:
        aurcs = {c: r["candidates"][c]["aurc"] for c in cands if r["candidates"][c]["aurc"] is not None}
        if aurcs:
            best[min(aurcs, key=aurcs.get)] += 1
    out = {}
    for c in cands:
        rows = [r["candidates"][c] for r in per_split]

        def ms(vals):
            v = [float(x) for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
            return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                    "n": len(v)} if v else None

        ranks = [x["ood_rank"] for x in rows if x["ood_rank"] is not None]
        out[c] = {"aurc": ms([x["aurc"] for x in rows]),
                  "excess_aurc": ms([x["aurc"] - x["aurc_optimal"] for x in rows if x["aurc"] is not None]),
                  "spearman": ms([x.get("spearman") for x in rows]),
                  "ood_rank_mean": float(np.mean(ranks)) if ranks else None,
                  "ood_rank_worst": max(ranks) if ranks else None,
                  "ood_first_share": float(np.mean([bool(x["ood_first"]) for x in rows])),
                  "ood_p_mean": (float(np.mean([x["ood_p"] for x in rows if x.get("ood_p") is not None]))
                                 if any(x.get("ood_p") is not None for x in rows) else None),
                  "best_aurc_splits": best[c]}
    return out


def _ms(x, d=3) -> str:
    return "–" if x is None else f"{x['mean']:.{d}f} ± {x['sd']:.{d}f}"


def naming_rates(per_split: list) -> dict:
    """How often ``metrics.atypicality`` names a case atypical (a p-value ≤ ATYPICAL_P): per aggregate and
    for any of them, the share of test cases (like the calibration cases) named and whether the OOD CT is."""
    from CalibUncertaintyLib.metrics.atypicality import ATYPICAL_P, ATYPICALITY_AGGREGATES

    test_named = {a: [] for a in (*ATYPICALITY_AGGREGATES, "any")}
    ood_named = {a: [] for a in (*ATYPICALITY_AGGREGATES, "any")}
    for r in per_split:
        cands = r["candidates"]
        have = [a for a in ATYPICALITY_AGGREGATES if a in cands and cands[a].get("test_p") is not None]
        if not have:
            continue
        tests = list(cands[have[0]]["test_p"])
        anyt = {c: False for c in tests}
        anyo = False
        for a in have:
            named = {c: (p is not None and p <= ATYPICAL_P) for c, p in cands[a]["test_p"].items()}
            test_named[a].append(sum(named.values()) / max(len(named), 1))
            o = cands[a].get("ood_p")
            ood_named[a].append(bool(o is not None and o <= ATYPICAL_P))
            anyo = anyo or ood_named[a][-1]
            for c, v in named.items():
                anyt[c] = anyt[c] or v
        test_named["any"].append(sum(anyt.values()) / max(len(anyt), 1))
        ood_named["any"].append(anyo)
    return {"level": ATYPICAL_P,
            "test_share": {a: (sum(v) / len(v) if v else None) for a, v in test_named.items()},
            "ood_share": {a: (sum(v) / len(v) if v else None) for a, v in ood_named.items()}}


def render_model_folder(run: dict) -> str:
    n_test = len(run["cases"]) - run["n_cal"]
    s = ["# Case triage and the out-of-distribution CT on a model folder's held-out cases", "",
         "Produced by", "", "```", run["command"], "```", "",
         f"- Model: `{run['model_folder']}`; members from the product's member cache "
         f"(`{run['member_cache'].get('member_cache')}`, TTA {'on' if run['member_cache'].get('tta') else 'off'}).",
         f"- {len(run['cases'])} held-out cases ({', '.join(run['cases'])}); {run['n_splits']} random splits (seed "
         f"{run['seed']}) into {run['n_cal']} calibration and {n_test} test cases; OOD CT `{run['ood']}` "
         f"(case `{run['ood_id']}`) ranked against each split's test cases.",
         "- Per split, as a user would run it: `fit_calibration` (the product default: local temperature, τ* per "
         "map, conformal record, atypicality reference) on the calibration cases, `run_maps` (what "
         "`calib-uncertainty maps` runs) on the test cases and the OOD CT; each case's `summary.json` "
         "`case_aggregates` (METHODS §6 aggregates of the regions map DAE; the atypicality aggregates and their "
         "p-values against the calibration cases) and the §6 aggregates of the entropy and mutual information "
         "maps (same definitions, the file's τ*). Risk of a test case = 1 − mean organ Dice of `seg.nii.gz`.",
         "- AURC: area under the risk–coverage curve on the test cases, cases accepted in increasing order of the "
         "candidate (undefined = +∞, reviewed first); lower is better; excess = AURC − the oracle's (ordering by "
         "the true risk). ρ = Spearman with Dice (negative = higher value, worse case). OOD rank: 1 = reviewed "
         f"before every test case (ties count against it), of {n_test + 1}.",
         f"- Wall time {run['wall_s'] / 60:.1f} min on {run['machine']}.", ""]
    for cfg, r in run["configurations"].items():
        ok = [x for x in r["splits"] if not x.get("skipped")]
        s += [f"## {cfg} ({len(r['members'])} member(s): {', '.join(r['members'])})", ""]
        if not ok:
            s += ["Not run: " + "; ".join(x["skipped"] for x in r["splits"]), ""]
            continue
        dice = [v for x in ok for v in x["dice"].values()]
        temps = [x["temperature"] for x in ok]
        s += [f"Test mean Dice over splits {np.mean(dice):.3f} (case range {min(dice):.3f}–{max(dice):.3f}); global T "
              f"of the fits {min(temps):.3f}–{max(temps):.3f}; OOD predicted volume (first split, mm³): "
              + ", ".join(f"{k} {v:.0f}" for k, v in (ok[0].get("ood_predicted_mm3") or {}).items()) + ".", "",
              "| candidate | AURC (mean ± SD) | excess AURC | Spearman ρ | lowest AURC in splits | OOD rank mean "
              "(worst) | OOD first (share of splits) | OOD p-value (mean) |",
              "|---|---|---|---|---|---|---|---|"]
        summ = r["summary"]
        order = sorted(summ, key=lambda c: (summ[c]["aurc"] or {"mean": math.inf})["mean"])
        for c in order:
            v = summ[c]
            rank = "–" if v["ood_rank_mean"] is None else f"{v['ood_rank_mean']:.1f} ({v['ood_rank_worst']})"
            p_ood = "–" if v["ood_p_mean"] is None else f"{v['ood_p_mean']:.3f}"
            s.append(f"| {c} | {_ms(v['aurc'])} | {_ms(v['excess_aurc'])} | {_ms(v['spearman'], 2)} | "
                     f"{v['best_aurc_splits']} of {len(ok)} | {rank} | {v['ood_first_share']:.2f} | {p_ood} |")
        nm = r.get("naming")
        if nm:
            f = lambda x: "–" if x is None else f"{x:.2f}"
            s += ["", f"Named atypical (`metrics.atypicality`: a p-value ≤ {nm['level']:g} against the split's "
                  "calibration cases), share over splits:", "",
                  "| aggregate | test cases named (like the calibration cases) | OOD CT named |", "|---|---|---|"]
            for a in nm["test_share"]:
                s.append(f"| {a} | {f(nm['test_share'][a])} | {f(nm['ood_share'][a])} |")
        s.append("")
    return "\n".join(s) + "\n"


if __name__ == "__main__":
    run_cli(main)
