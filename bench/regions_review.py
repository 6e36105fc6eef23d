"""Error regions as places to look, measured on real CT with a stock model (issue 16, item 8).

What a reviewer gets from "Next": how much of the true error volume the top regions hold, how
much of it lies in the view each jump opens, and how far the views move between consecutive
regions; before (whole connected components, the views jumping to each component's centroid) and
after (components cut to fit one view, ``--max-extent-mm``; the views jumping to each region's
most uncertain part), both from the same calibrated maps and threshold (METHODS.md §4-5).

Steps, as a user would run them, every input read from the shared data (nothing copied):

1. Cases: ``--cases-json`` (default the model folder's ``calibration_cases.json``, cases no fold
   saw); the first ``--n-fit`` fit the calibration, the next ``--n-test`` are predicted.
2. Members: every fold of the nnU-Net model folder on those CTs, through the project's member
   cache (``nnunet.member_cache.cached_member_dirs``, no TTA, nnU-Net's tile step 0.5), reused
   from ``--member-cache`` when it holds them.
3. ``pipeline.fit.fit_calibration`` on the fit cases (temperature, τ* per map by UEO), then
   ``pipeline.maps_job.run_maps`` on the test cases (regions of the ``--regions-map``, default DAE,
   cut at ``--max-extent-mm``).
4. Per test case, from the written ``seg``, map and ``regions.json`` threshold, and the reference
   label: errors E = (prediction ≠ reference) ∩ ROI (the case's 15 mm ROI); regions before
   (``max_extent_mm=None``) and after (the same call the pipeline made; checked equal to
   ``regions.json``). For the top ``--top`` regions:
   - *held*: |E ∩ regions| / |E|; *precision*: |E ∩ regions| / |regions|;
   - *in view*: |E ∩ views| / |E|, a view being the cube of side ``--view-mm`` centred on the
     point the views jump to (before: the centroid; after: the jump point);
   - *jump inside*: share of jump points that are voxels of their region;
   - *step*: distance (mm) between consecutive jump points R1 → R2 → ... (mean, median, max) and
     their sum;
   - *extent*: the largest box side (mm) among the top regions, and the share fitting one view.
   Pooled over cases: sums of voxels for held / in view / precision; steps pooled.
5. Report: ``bench/results/regions_review.md`` and ``.json`` (the command, the machine, the cases).

``--smoke``: the same steps on a tiny phantom dataset (``synthetic.phantom``) with synthetic
members (``synthetic.members``) instead of the model and the plain temperature instead of the
default local one; a few seconds; report in the workdir.

    .venv/bin/python bench/regions_review.py [--model-folder ../shared/models/Dataset501_OpenKBP_HN_OAR/nnUNetTrainer__nnUNetPlansTiny__2d]
        [--data ../shared/data/openkbp] [--n-fit 3 --n-test 3] [--member-cache DIR] [--workdir DIR]
        [--max-extent-mm 50] [--view-mm 50] [--top 10] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
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

log = logging.getLogger("bench.regions_review")
SHARED = Path(os.environ.get("CALIBU_SHARED", REPO.parent / "shared"))
DEFAULT_MODEL = SHARED / "models" / "Dataset501_OpenKBP_HN_OAR" / "nnUNetTrainer__nnUNetPlansTiny__2d"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-folder", type=Path, default=DEFAULT_MODEL, help="nnU-Net v2 trained model folder")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "openkbp",
                   help="nnU-Net raw dataset (or the folder holding one) with imagesTr/ and labelsTr/")
    p.add_argument("--cases-json", type=Path, default=None,
                   help="JSON list of case ids no fold saw (default <model folder>/../calibration_cases.json)")
    p.add_argument("--n-fit", type=int, default=3, help="cases the calibration is fitted on (the first ones)")
    p.add_argument("--n-test", type=int, default=3, help="cases predicted and measured (the next ones)")
    p.add_argument("--member-cache", type=Path, default=None,
                   help="member cache folder (default <workdir>/member_cache); outputs there are reused")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/calibu_regions_review"))
    p.add_argument("--regions-map", default="dae")
    p.add_argument("--max-extent-mm", type=float, default=50.0, help="the regions' max extent after the change")
    p.add_argument("--view-mm", type=float, default=50.0, help="side (mm) of the cube a jump shows")
    p.add_argument("--top", type=int, default=10, help="regions a reviewer steps through")
    p.add_argument("--results", type=Path, default=None,
                   help="report folder (default bench/results; with --smoke the workdir)")
    p.add_argument("--name", default="regions_review", help="report file stem under --results")
    p.add_argument("--smoke", action="store_true",
                   help="tiny phantom cases with synthetic members instead of the model: checks the bench runs")
    args = p.parse_args(argv)
    if args.n_fit < 1 or args.n_test < 1 or args.top < 1:
        raise InputError("--n-fit, --n-test and --top must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def _dataset(data: Path) -> Path:
    if (data / "dataset.json").is_file():
        return data
    found = sorted(d for d in data.iterdir() if d.is_dir() and (d / "dataset.json").is_file()) if data.is_dir() else []
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


def model_inputs(args) -> tuple[list, Path, Path, list, list, str]:
    """(member folders, images, labels, fit ids, test ids, how the members were got) of the stock
    model on its unseen cases."""
    from CalibUncertaintyLib.nnunet.member_cache import cached_member_dirs

    cases_json = args.cases_json or args.model_folder.parent / "calibration_cases.json"
    cases = json.loads(Path(cases_json).read_text())
    if len(cases) < args.n_fit + args.n_test:
        raise InputError(f"{cases_json} lists {len(cases)} cases; --n-fit + --n-test asks for {args.n_fit + args.n_test}")
    fit_ids, test_ids = cases[:args.n_fit], cases[args.n_fit:args.n_fit + args.n_test]
    ds = _dataset(args.data)
    ids = fit_ids + test_ids
    images = _link_folder(args.workdir / "images", {f"{c}_0000.nii.gz": ds / "imagesTr" / f"{c}_0000.nii.gz" for c in ids})
    labels = _link_folder(args.workdir / "labels", {f"{c}.nii.gz": ds / "labelsTr" / f"{c}.nii.gz" for c in ids})
    cache = args.member_cache or args.workdir / "member_cache"
    t = time.time()
    members = cached_member_dirs(args.model_folder, "deep", None, images, cache, device=args.device, tta=False,
                                 cases=ids)
    log.info("members of %d cases ready in %.0f s (%s: %d computed, %d reused)", len(ids), time.time() - t,
             cache, len(members.computed), len(members.reused))
    note = (f"member cache {cache}: {len(members.computed)} member outputs computed now, "
            f"{len(members.reused)} reused")
    return list(members.member_dirs), images, labels, fit_ids, test_ids, note


def smoke_inputs(args) -> tuple[list, Path, Path, list, list, str]:
    """The same on a tiny phantom: 2 fit + 1 test case, 3 synthetic members."""
    from CalibUncertaintyLib.synthetic.members import make_member_folders
    from CalibUncertaintyLib.synthetic.phantom import write_phantom_dataset

    ds = write_phantom_dataset(args.workdir / "raw", n_train=2, n_test=3, seed=3)
    fit_ids, test_ids = list(ds.test_cases[:2]), list(ds.test_cases[2:])
    images = ds.folder / "imagesTs"
    labels = ds.folder / "labelsTs"
    dirs = make_member_folders(labels, args.workdir / "members", cases=fit_ids + test_ids, n_members=3, seed=1)
    return dirs, images, labels, fit_ids, test_ids, "synthetic members from the phantom's labels"


# ----------------------------------------------------------------------------------------------
# measures
# ----------------------------------------------------------------------------------------------
def review_measures(ranks: np.ndarray, regions: list, points_zyx: list, errors: np.ndarray, spacing_zyx,
                    top: int, view_mm: float) -> dict:
    """The measures of the module doc for the top ``top`` regions (``ranks``: each voxel's region
    rank, 0 none; ``points_zyx``: where the views jump, one per region)."""
    shown = regions[:top]
    pts = np.asarray(points_zyx[:top], dtype=np.int64).reshape(-1, 3)
    sp = np.asarray(spacing_zyx, dtype=float)
    in_top = (ranks > 0) & (ranks <= len(shown))
    view = np.zeros(errors.shape, bool)
    half = np.floor(view_mm / 2.0 / sp).astype(int)
    for p in pts:
        view[tuple(slice(max(c - h, 0), c + h + 1) for c, h in zip(p, half))] = True
    steps = np.linalg.norm(np.diff(pts * sp, axis=0), axis=1) if len(pts) > 1 else np.zeros(0)
    extents = [max(r.extent_mm) for r in shown]
    return {
        "n_regions": len(regions), "n_errors": int(errors.sum()), "n_in_top": int(in_top.sum()),
        "errors_in_top": int((errors & in_top).sum()), "errors_in_any": int((errors & (ranks > 0)).sum()),
        "errors_in_view": int((errors & view).sum()),
        "jump_inside": [bool(ranks[tuple(p)] == r.rank) for p, r in zip(pts, shown)],
        "steps_mm": [float(s) for s in steps],
        "max_extent_mm": max(extents) if extents else None,
        "fit_view": [bool(e <= view_mm + 1e-9) for e in extents],
        "top": [{"rank": r.rank, "class": r.class_name, "volume_mm3": round(r.volume_mm3, 1),
                 "extent_mm": [round(v, 1) for v in r.extent_mm]} for r in shown],
    }


def measure_case(case_dir: Path, label_path: Path, args) -> dict:
    from CalibUncertaintyLib.calibration.roi import roi_mask
    from CalibUncertaintyLib.calibration.thresholds import uncertainty_score
    from CalibUncertaintyLib.io.images import read_image
    from CalibUncertaintyLib.regions import find_regions_and_labels

    doc = json.loads((case_dir / "regions.json").read_text())
    seg, geo = read_image(case_dir / "seg.nii.gz")
    ref, _ = read_image(label_path)
    u, _ = read_image(case_dir / f"map_{doc['map']}.nii.gz")
    score = uncertainty_score(doc["map"], u)
    roi = roi_mask(seg, geo.spacing_zyx, doc["roi"]["radius_mm"], rule="prediction", allow_empty=True)
    errors = (seg != ref) & roi
    tau = doc["threshold_score"]
    names = doc.get("class_names")
    out = {"case": case_dir.name, "threshold_score": tau, "voxel_mm3": geo.voxel_volume_mm3}
    for name, extent in (("before", None), ("after", doc.get("max_extent_mm"))):
        regions, ranks = find_regions_and_labels(score, tau, roi, seg, geo, class_names=names,
                                                 min_volume_mm3=doc.get("min_region_mm3", 10.0), max_extent_mm=extent)
        if name == "after":  # the bench measures what the pipeline wrote
            written = [(r["rank"], r["n_voxels"], r["jump_zyx"]) for r in doc["regions"]]
            if written != [(r.rank, r.n_voxels, list(r.jump_zyx)) for r in regions]:
                raise InputError(f"{case_dir}: regions.json differs from find_regions on its own map and threshold")
            points = [r.jump_zyx for r in regions]
        else:  # before: "Next" went to the component's centroid
            points = [tuple(int(round(c)) for c in r.centroid_zyx) for r in regions]
        out[name] = review_measures(ranks, regions, points, errors, geo.spacing_zyx, args.top, args.view_mm)
    return out


def pooled(cases: list, name: str) -> dict:
    rows = [c[name] for c in cases]
    n_err = sum(r["n_errors"] for r in rows)
    steps = [s for r in rows for s in r["steps_mm"]]
    inside = [j for r in rows for j in r["jump_inside"]]
    fits = [f for r in rows for f in r["fit_view"]]

    def frac(a, b):
        return a / b if b else None

    return {
        "held": frac(sum(r["errors_in_top"] for r in rows), n_err),
        "held_any": frac(sum(r["errors_in_any"] for r in rows), n_err),
        "precision": frac(sum(r["errors_in_top"] for r in rows), sum(r["n_in_top"] for r in rows)),
        "in_view": frac(sum(r["errors_in_view"] for r in rows), n_err),
        "jump_inside": frac(sum(inside), len(inside)),
        "fit_view": frac(sum(fits), len(fits)),
        "max_extent_mm": max((r["max_extent_mm"] for r in rows if r["max_extent_mm"] is not None), default=None),
        "step_mean_mm": float(np.mean(steps)) if steps else None,
        "step_median_mm": float(np.median(steps)) if steps else None,
        "step_max_mm": float(np.max(steps)) if steps else None,
        "path_mean_mm": float(np.mean([sum(r["steps_mm"]) for r in rows])),
        "n_regions_mean": float(np.mean([r["n_regions"] for r in rows])),
    }


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def render(run: dict) -> str:
    b, a = run["pooled"]["before"], run["pooled"]["after"]
    top, view = run["options"]["top"], run["options"]["view_mm"]
    rows = [
        (f"true error volume held by the top {top} regions", _f(b["held"]), _f(a["held"])),
        ("true error volume held by all regions", _f(b["held_any"]), _f(a["held_any"])),
        (f"share of the top {top} regions' voxels that are errors", _f(b["precision"]), _f(a["precision"])),
        (f"true error volume within the {view:g} mm views the jumps open", _f(b["in_view"]), _f(a["in_view"])),
        ("jump points inside their region", _f(b["jump_inside"]), _f(a["jump_inside"])),
        (f"top regions fitting a {view:g} mm view", _f(b["fit_view"]), _f(a["fit_view"])),
        ("largest box side among the top regions (mm)", _f(b["max_extent_mm"], "{:.0f}"), _f(a["max_extent_mm"], "{:.0f}")),
        ("step between consecutive regions, mean (mm)", _f(b["step_mean_mm"], "{:.1f}"), _f(a["step_mean_mm"], "{:.1f}")),
        ("step between consecutive regions, median (mm)", _f(b["step_median_mm"], "{:.1f}"), _f(a["step_median_mm"], "{:.1f}")),
        ("step between consecutive regions, max (mm)", _f(b["step_max_mm"], "{:.1f}"), _f(a["step_max_mm"], "{:.1f}")),
        (f"path R1 → R{top}, mean over cases (mm)", _f(b["path_mean_mm"], "{:.0f}"), _f(a["path_mean_mm"], "{:.0f}")),
        ("regions per case, mean", _f(b["n_regions_mean"], "{:.1f}"), _f(a["n_regions_mean"], "{:.1f}")),
    ]
    o = run["options"]
    lines = [
        "# Error regions as places to look (issue 16, item 8)" + (" — smoke run" if o["smoke"] else ""),
        "",
        f"Command: `{run['command']}`",
        "",
        f"Machine: {run['machine']}. Wall time {run['wall_s']:.0f} s (members {run['seconds']['members']:.0f} s, "
        f"calibration {run['seconds']['fit']:.0f} s"
        f"{' (fitted by an earlier run in the same --workdir, reused)' if run['calibration_reused'] else ''}, "
        f"maps {run['seconds']['maps']:.0f} s, measures "
        f"{run['seconds']['measures']:.0f} s).",
        "",
        f"Model: `{run['model']}` ({run['n_members']} members, no TTA; {run['members']}). Calibration ({run['calibration']}) fitted on "
        f"{', '.join(run['fit_cases'])}; measured on {', '.join(run['test_cases'])}. Regions map "
        f"{o['regions_map']} at the calibrated τ* (score {', '.join(_f(c['threshold_score'], '{:.4g}') for c in run['cases'])}), "
        f"ROI 15 mm, minimum region 10 mm³. Before: whole 26-connected components, the views jump to "
        f"each one's centroid. After: components cut to fit {o['max_extent_mm']:g} mm "
        f"(`--region-max-extent-mm`, METHODS.md §5), the views jump to each region's most uncertain "
        f"part. Errors: prediction ≠ reference label inside the ROI. A view: the {view:g} mm cube "
        f"centred on the jump. Shares pooled over the test cases' voxels.",
        "",
        "| measure | before | after |",
        "|---|---:|---:|",
        *[f"| {m} | {x} | {y} |" for m, x, y in rows],
        "",
        "Per case (before → after):",
        "",
        "| case | errors (voxels) | regions | held by top | in views | step median (mm) | largest side (mm) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in run["cases"]:
        bb, aa = c["before"], c["after"]
        n = max(bb["n_errors"], 1)
        med = [float(np.median(x["steps_mm"])) if x["steps_mm"] else None for x in (bb, aa)]
        lines.append(f"| {c['case']} | {bb['n_errors']} | {bb['n_regions']} → {aa['n_regions']} | "
                     f"{bb['errors_in_top'] / n:.3f} → {aa['errors_in_top'] / n:.3f} | "
                     f"{bb['errors_in_view'] / n:.3f} → {aa['errors_in_view'] / n:.3f} | "
                     f"{_f(med[0], '{:.0f}')} → {_f(med[1], '{:.0f}')} | "
                     f"{_f(bb['max_extent_mm'], '{:.0f}')} → {_f(aa['max_extent_mm'], '{:.0f}')} |")
    lines += ["", "Top regions of the first test case (after):", ""]
    first = run["cases"][0]["after"]["top"]
    lines += [f"- R{r['rank']} {r['class']} {r['volume_mm3']:.0f} mm³, box {' × '.join(f'{v:.0f}' for v in r['extent_mm'])} mm"
              for r in first]
    return "\n".join(lines) + "\n"


def _calibration(dirs, images, labels, fit_ids, fit_opts, workdir: Path):
    """The calibration fitted on the fit cases, reused from an earlier run of this script in the
    same workdir when its inputs (member files, cases, options) are the same."""
    from dataclasses import asdict

    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases
    from CalibUncertaintyLib.pipeline.fit import fit_calibration

    files = sorted(p for d in dirs for c in fit_ids for p in Path(d).glob(f"{c}.np[z]"))
    key = {"members": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files], "cases": list(fit_ids),
           "options": json.loads(json.dumps(asdict(fit_opts), default=str))}
    key_path, cal_path = workdir / "calibration_key.json", workdir / "calibration.json"
    if key_path.is_file() and cal_path.is_file() and json.loads(key_path.read_text()) == key:
        log.info("calibration of an earlier run reused (%s)", cal_path)
        return CalibrationFile.load(cal_path), True
    key_path.unlink(missing_ok=True)
    cal = fit_calibration(pair_cases(dirs, images, labels, fit_ids, require_labels=True), fit_opts)
    cal.save(cal_path)
    write_json(key_path, key)
    return cal, False


def main(argv=None) -> int:
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases
    from CalibUncertaintyLib.pipeline.case import CaseOptions
    from CalibUncertaintyLib.pipeline.fit import FitOptions
    from CalibUncertaintyLib.pipeline.maps_job import run_maps

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    command = " ".join(shlex.quote(x) for x in [".venv/bin/python", "bench/regions_review.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    t0 = time.time()
    args.workdir.mkdir(parents=True, exist_ok=True)
    dirs, images, labels, fit_ids, test_ids, members_note = (smoke_inputs if args.smoke else model_inputs)(args)
    t_members = time.time() - t0
    # the project's default calibration; the smoke run fits the plain temperature (seconds, not a minute)
    fit_opts = FitOptions(method="temperature") if args.smoke else FitOptions()
    cal, reused = _calibration(dirs, images, labels, fit_ids, fit_opts, args.workdir)
    t_fit = time.time() - t0 - t_members
    maps_dir = args.workdir / f"maps_{args.max_extent_mm:g}mm"
    shutil.rmtree(maps_dir, ignore_errors=True)  # computed afresh: the regions are what is measured
    opts = CaseOptions(regions_map=args.regions_map, max_region_extent_mm=args.max_extent_mm,
                       probability_classes=())
    result = run_maps(pair_cases(dirs, images, None, test_ids), cal, opts, maps_dir)
    if result.failed:
        raise result.error()
    t_maps = time.time() - t0 - t_members - t_fit
    cases = [measure_case(maps_dir / c, labels / f"{c}.nii.gz", args) for c in test_ids]
    t_measure = time.time() - t0 - t_members - t_fit - t_maps
    run = {"command": command, "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}",
           "wall_s": time.time() - t0,
           "seconds": {"members": t_members, "fit": t_fit, "maps": t_maps, "measures": t_measure},
           "model": "synthetic members (smoke)" if args.smoke else str(args.model_folder.name),
           "n_members": len(dirs), "fit_cases": fit_ids, "test_cases": test_ids, "calibration": cal.method,
           "calibration_reused": reused, "members": members_note,
           "options": {"top": args.top, "view_mm": args.view_mm, "max_extent_mm": args.max_extent_mm,
                       "regions_map": args.regions_map, "smoke": args.smoke},
           "cases": cases, "pooled": {k: pooled(cases, k) for k in ("before", "after")}}
    text = render(run)
    print(text)
    results = args.results or (args.workdir if args.smoke else REPO / "bench" / "results")
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / f"{args.name}.json", run)
    write_text(results / f"{args.name}.md", text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CalibUncertaintyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
