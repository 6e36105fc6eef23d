"""Why EBCU does not beat entropy on non-boundary errors, and which parameters fix it (issue 11, item 6).

Uses the member folders and calibration file that ``bench/conformal_openkbp.py`` left in its work
folder (synthetic members on real OpenKBP labels and CT grids; run that first). For every case:
the calibrated predictive entropy PE, DAE, the ROI, the error mask and the contour zone (the
predicted labels' one-voxel contour, ``metrics.error_detection.contour_zone``). Then, for EBCU
with threshold t = the q-quantile of the pooled calibration ROI PE and radius r mm, and for
entropy and DAE:

- τ* by mean UEO on the calibration cases (``calibration.thresholds.calibrate_thresholds``,
  exactly as ``fit-temperature``) and the held-out non-boundary error recall at τ*, plus the
  share of ROI voxels flagged (a map flagging more finds more);
- the held-out non-boundary error recall at an equal budget (each map flags its top 2 % of ROI
  voxels), which takes the threshold search out of the comparison;
- the share of calibration ROI voxels where EBCU is exactly 0.

Parameters are chosen on the calibration cases only (largest mean non-boundary recall at the
2 % budget); the held-out columns check the choice.

    PYTHONPATH=. .venv/bin/python bench/ebcu_study.py [--workdir /tmp/calibu_conformal]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

QUANTILES = (0.5, 0.8, 0.9, 0.95)
RADII_MM = (4.0, 6.0, 8.0)
BUDGET = 0.02


def case_data(cf, pairing, cal, pad_mm):
    from CalibUncertaintyLib.calibration.roi import roi_mask
    from CalibUncertaintyLib.metrics.error_detection import contour_zone, error_mask
    from CalibUncertaintyLib.pipeline.dataset import read_label
    from CalibUncertaintyLib.pipeline.ensemble import accumulate, calibrated_probs, case_maps
    from CalibUncertaintyLib.uncertainty.maps import segmentation

    labels = read_label(cf, pairing.n_classes)
    acc = accumulate(cf.load_members(pairing.n_classes), cal, cal.ensemble_mode)
    probs = calibrated_probs(acc, cal, cal.ensemble_mode)
    seg = segmentation(probs)
    roi = roi_mask(seg, cf.geometry.spacing_zyx, float(cal.roi["radius_mm"]), allow_empty=True)
    maps = case_maps(acc, probs, cf.geometry, cal, cal.ensemble_mode, names=["entropy", "dae"], roi=roi)
    idx = np.nonzero(roi)
    pad = [int(math.ceil(pad_mm / h)) + 1 for h in cf.geometry.spacing_zyx]
    box = tuple(slice(max(int(a.min()) - p, 0), min(int(a.max()) + 1 + p, s)) for a, p, s in zip(idx, pad, roi.shape))
    zone = contour_zone(seg)[box]
    return {"pe": maps["entropy"][box], "dae": maps["dae"][box], "roi": roi[box],
            "err": error_mask(seg, labels, roi)[box], "zone": zone, "spacing": cf.geometry.spacing_zyx}


def nb_recall_budget(u, d, budget=BUDGET):
    vals = u[d["roi"]]
    k = max(1, int(round(budget * vals.size)))
    tau = np.partition(vals, vals.size - k)[vals.size - k]
    flagged = (u >= tau) & d["roi"]
    nb = d["err"] & ~d["zone"]
    return float((flagged & nb).sum() / nb.sum()) if nb.any() else None


def nb_recall_tau(u, d, tau):
    flagged = (u > tau) & d["roi"]
    nb = d["err"] & ~d["zone"]
    return (float((flagged & nb).sum() / nb.sum()) if nb.any() else None), float(flagged.sum() / d["roi"].sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/calibu_conformal"))
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--data", type=Path, default=None,
                   help="the OpenKBP dataset folder conformal_openkbp.py read (default ../shared/data/openkbp)")
    a = p.parse_args(argv)
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.calibration.thresholds import calibrate_thresholds
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases
    from CalibUncertaintyLib.uncertainty.ebcu import ebcu

    t0 = time.time()
    from conformal_openkbp import _data

    rec = json.loads((a.workdir / "split.json").read_text())  # written by conformal_openkbp.py
    cal = CalibrationFile.load(a.workdir / "calibration.json")
    members = sorted(str(d) for d in (a.workdir / "members").iterdir() if d.is_dir())
    data = _data(a.data)
    split = {"calibration": rec["calibration"], "held_out": rec["test"]}
    cases = {}
    for part, ids in split.items():
        pairing = pair_cases(members, str(data / "imagesTr"), str(data / "labelsTr"), ids, require_labels=True)
        cases[part] = [case_data(cf, pairing, cal, max(RADII_MM)) for cf in pairing.cases]
    pooled = np.concatenate([d["pe"][d["roi"]] for d in cases["calibration"]])
    rows = []
    variants = [("entropy", None, None), ("dae", None, None)] + [("ebcu", q, r) for q in QUANTILES for r in RADII_MM]
    for name, q, r in variants:
        for d in cases["calibration"] + cases["held_out"]:
            if name == "ebcu":
                d["u"] = ebcu(d["pe"], d["spacing"], radius_mm=r, threshold=float(np.quantile(pooled, q)))
            else:
                d["u"] = d["pe"] if name == "entropy" else d["dae"]
        cc = cases["calibration"]
        tau = calibrate_thresholds([{"u": d["u"]} for d in cc], [d["err"] for d in cc], [d["roi"] for d in cc],
                                   kinds={"u": "absolute"})["u"]["tau"]
        row = {"map": name, "q": q, "radius_mm": r, "tau_star": tau}
        for part, ds in cases.items():
            at = [nb_recall_tau(d["u"], d, tau) for d in ds]
            row[f"{part}_nb_recall_tau"] = float(np.mean([x[0] for x in at if x[0] is not None]))
            row[f"{part}_flagged_tau"] = float(np.mean([x[1] for x in at]))
            row[f"{part}_nb_recall_budget"] = float(np.mean([v for v in (nb_recall_budget(d["u"], d) for d in ds)
                                                             if v is not None]))
            row[f"{part}_zero_share"] = float(np.mean([np.mean(d["u"][d["roi"]] == 0) for d in ds]))
        rows.append(row)
        print(row, flush=True)
    ebcus = [r for r in rows if r["map"] == "ebcu"]
    best = max(ebcus, key=lambda r: r["calibration_nb_recall_budget"])
    command = "PYTHONPATH=. .venv/bin/python bench/ebcu_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = {"command": command.strip(), "wall_s": round(time.time() - t0, 1), "rows": rows, "chosen": best,
           "n_calibration": len(cases["calibration"]), "n_held_out": len(cases["held_out"]), "budget": BUDGET}
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "ebcu_study.json").write_text(json.dumps(out, indent=1))
    L = ["# EBCU parameters: non-boundary error recall (synthetic members on real OpenKBP labels)", "",
         "Produced by (after `bench/conformal_openkbp.py`, whose members and calibration file it reuses)", "",
         "```", out["command"], "```", "",
         f"{out['n_calibration']} calibration / {out['n_held_out']} held-out cases, wall time {out['wall_s'] / 60:.1f} min. "
         "t = q-quantile of the pooled calibration ROI entropy; τ* by mean UEO on the calibration cases; "
         f"'budget' = each map flags its top {100 * BUDGET:g} % of ROI voxels. Non-boundary = errors outside the "
         "predicted contour zone. Members are synthetic: these numbers say how the definitions behave, not "
         "how a trained nnU-Net behaves.", "",
         "| map | q | r (mm) | τ* | cal. zero share | cal. nb recall @budget | held-out nb recall @budget | "
         "held-out nb recall @τ* | held-out flagged @τ* |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['map']} | {r['q'] if r['q'] is not None else '–'} | {r['radius_mm'] or '–'} | "
                 f"{r['tau_star']:.4g} | {r['calibration_zero_share']:.3f} | {r['calibration_nb_recall_budget']:.3f} | "
                 f"{r['held_out_nb_recall_budget']:.3f} | {r['held_out_nb_recall_tau']:.3f} | {r['held_out_flagged_tau']:.3f} |")
    L += ["", f"Largest non-boundary recall at the budget on the calibration cases: q = {best['q']}, "
          f"r = {best['radius_mm']} mm.", "",
          "## Why EBCU underperforms, and what changed", "",
          "- **Radius.** On these grids (about 3.9 × 3.9 × 2.5 mm) a 4 mm ball is 7 voxels: the voxel and its six "
          "face neighbours. A one-voxel contour shell then fills about half of every ball along it, as a blob "
          "would, and EBCU is just a slightly smoothed, thresholded entropy (the same non-boundary recall as "
          "entropy). The radius is what separates blobs from shells: at 8 mm (two voxels) the calibration "
          "cases' non-boundary recall at the budget doubles for every t. Hence the change: the maps use a "
          "ball of at least two voxels of the coarsest axis (`uncertainty.ebcu.effective_radius_mm`; fine "
          "grids keep 4 mm).",
          "- **Threshold t.** At the 0.95 quantile most ROI voxels have EBCU exactly 0 (the 'zero share' "
          "column, 0.85 at r = 4 mm); lowering t to the median changes little at a fixed budget once the "
          "ball is large enough, so t stays.",
          "- **τ\\* on a map that is 0 almost everywhere.** The UEO search can end at τ\\* = 0 (it did for the issue's single model; "
          "flag every voxel within r of any excess: a thick band along the contours), and a conformal "
          "threshold that must cover errors where the map is 0 flags the whole ROI. Both follow from the "
          "map, not the search; a larger ball lowers the zero share.",
          "- **Even so EBCU stays far below DAE** on non-boundary errors here (and in the issue's held-out "
          "real-CT evaluation). DAE is the map for errors away from the contour; EBCU is documented as a "
          "blob detector, not recommended for that.", ""]
    (a.results / "ebcu_study.md").write_text("\n".join(L))
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
