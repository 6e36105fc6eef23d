"""The three commands end to end on real OpenKBP CT (128³): fit on 3 cases, maps and evaluate on 3 others.

Members are synthetic (synthetic/members.py), deliberately over-confident, in nnU-Net
--save_probabilities layout next to the real images and labels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.mrml.case_folder import read_case_folder
from CalibUncertaintyLib.synthetic.members import make_member_folders
from CalibUncertaintyLib.uncertainty.maps import MAP_NAMES

FIT = ["OKBP_train_001", "OKBP_train_002", "OKBP_train_004"]
HELD_OUT = ["OKBP_train_009", "OKBP_train_012", "OKBP_train_013"]
REGION_KEYS = {"rank", "n_voxels", "volume_mm3", "mean_u", "max_u", "class_index", "class_name",
               "centroid_ras", "centroid_zyx", "bbox_zyx_min", "bbox_zyx_max", "score"}


@pytest.fixture(scope="module")
def run(openkbp_dir, tmp_path_factory):
    """Members for 6 cases, then fit-temperature, maps (with and without calibration) and evaluate."""
    root = tmp_path_factory.mktemp("cli_real_ct")
    members = [str(d) for d in make_member_folders(openkbp_dir / "labelsTr", root / "pred", FIT + HELD_OUT,
                                                   n_members=3, seed=0)]
    images, labels = str(openkbp_dir / "imagesTr"), str(openkbp_dir / "labelsTr")
    cal = root / "calibration.json"
    rc = {}
    rc["fit"] = main(["fit-temperature", "--members", *members, "--images", images, "--labels", labels,
                      "--cases", *FIT, "--roi-radius-mm", "15", "--conformal-alpha", "0.3", "--method", "temperature",
                      "-o", str(cal)])
    rc["maps"] = main(["maps", "--members", *members, "--images", images, "--calibration", str(cal),
                       "--cases", *HELD_OUT, "-o", str(root / "maps")])
    rc["maps_raw"] = main(["maps", "--members", *members, "--images", images, "--cases", HELD_OUT[0],
                           "-o", str(root / "maps_raw")])
    rc["evaluate"] = main(["evaluate", "--members", *members, "--images", images, "--labels", labels,
                           "--calibration", str(cal), "--cases", *HELD_OUT, "-o", str(root / "eval")])
    return {"root": root, "members": members, "images": images, "labels": labels, "cal": cal, "rc": rc,
            "openkbp": openkbp_dir}


def test_commands_succeed(run):
    assert run["rc"] == {"fit": 0, "maps": 0, "maps_raw": 0, "evaluate": 0}


def test_calibration_file_fixes_over_confidence(run):
    cal = json.loads(run["cal"].read_text())
    assert cal["temperature"] > 1.5  # the synthetic members are over-confident
    assert cal["nll_after"] < cal["nll_before"]
    assert cal["case_ids"] == FIT and cal["roi"] == {"rule": "prediction", "radius_mm": 15.0}
    assert set(cal["thresholds"]) == set(MAP_NAMES) and cal["ebcu_threshold"] > 0
    assert cal["fingerprint"]["plans_dataset_sha256"]  # from the member folders' plans/dataset.json
    assert cal["extra"]["other_ensemble_mode"]["ensemble_mode"] == "per_member"
    assert cal["class_names"][5] == "Mandible"


def test_held_out_roi_nll_and_ece_improve(run):
    ev = json.loads((run["root"] / "eval" / "evaluation.json").read_text())
    assert [r["case"] for r in ev["per_case"]] == HELD_OUT and ev["held_out_overlap"] == []
    for rec in ev["per_case"]:
        before, after = rec["metrics"]["before"]["roi"], rec["metrics"]["after"]["roi"]
        assert after["nll"] < before["nll"], rec["case"]
        assert after["ece_top"] < before["ece_top"], rec["case"]
        assert rec["segmentation_unchanged"]
        assert rec["metrics"]["after"]["whole_image"]["n_voxels"] == 128 ** 3
        assert set(rec["error_detection"]) == set(MAP_NAMES)
        assert 0.5 < rec["error_detection"]["entropy"]["auroc"] <= 1
    report = (run["root"] / "eval" / "report.md").read_text()
    for phrase in ("ROI rule", "within 15 mm of the predicted foreground", "Whole image", "Inside the ROI",
                   "Brier convention", "twice the binary Brier"):
        assert phrase in report
    for png in ("reliability_roi.png", "reliability_whole_image.png", "ueo_vs_threshold.png", "budget_curves.png"):
        data = (run["root"] / "eval" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    header = (run["root"] / "eval" / "metrics_per_case.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["case", "calibration", "region"] and "ece_fg_Mandible" in header
    agg = (run["root"] / "eval" / "metrics_aggregate.csv").read_text()
    assert "nll.mean" in agg and agg.count("\n") == 7  # header + before/after x roi/shared_roi/whole_image


def test_outputs_on_the_image_grid_and_contract(run):
    import SimpleITK as sitk

    for case in HELD_OUT:
        img = sitk.ReadImage(str(run["openkbp"] / "imagesTr" / f"{case}_0000.nii.gz"))
        d = run["root"] / "maps" / case
        files = sorted(d.glob("*.nii.gz"))
        assert len(files) == 1 + 5 + len(MAP_NAMES) + 5  # seg, 5 probabilities, maps, 5 organ margins
        for f in files:
            out = sitk.ReadImage(str(f))
            assert out.GetSize() == img.GetSize() and out.GetSpacing() == img.GetSpacing(), f.name
            assert out.GetOrigin() == img.GetOrigin() and out.GetDirection() == img.GetDirection(), f.name
        regions = json.loads((d / "regions.json").read_text())
        assert regions["case"] == case and regions["map"] == "dae"
        assert regions["threshold_source"] == "calibration file calibration.json"
        assert all(set(r) >= REGION_KEYS for r in regions["regions"])
        data = read_case_folder(d)  # the Slicer side reads it
        assert data.case_id == case and len(data.maps) == len(MAP_NAMES)
    raw = run["root"] / "maps_raw" / HELD_OUT[0]  # the same case without calibration
    seg_cal, _ = read_image(run["root"] / "maps" / HELD_OUT[0] / "seg.nii.gz")
    seg_raw, _ = read_image(raw / "seg.nii.gz")
    assert np.array_equal(seg_cal, seg_raw)  # temperature scaling never changes the segmentation
    p_cal, _ = read_image(run["root"] / "maps" / HELD_OUT[0] / "prob_Mandible.nii.gz")
    p_raw, _ = read_image(raw / "prob_Mandible.nii.gz")
    assert not np.allclose(p_cal, p_raw)
    assert json.loads((raw / "regions.json").read_text())["threshold_source"].startswith("default")
    top = json.loads((run["root"] / "maps" / "summary.json").read_text())
    assert [c["case"] for c in top["cases"]] == HELD_OUT


def test_console_script(run, tmp_path):
    """The installed `calib-uncertainty` entry point runs a command and reports errors with code 2."""
    exe = Path(sys.executable).parent / "calib-uncertainty"
    assert exe.is_file(), f"console script not installed at {exe}"
    out = tmp_path / "maps"
    args = [str(exe), "maps", "--members", *run["members"], "--images", run["images"], "--calibration",
            str(run["cal"]), "--cases", HELD_OUT[0], "-o", str(out)]
    res = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, _ = read_image(out / HELD_OUT[0] / "map_dae.nii.gz")
    b, _ = read_image(run["root"] / "maps" / HELD_OUT[0] / "map_dae.nii.gz")
    assert np.array_equal(a, b)
    res = subprocess.run([str(exe), "maps", "--members", *run["members"], "--calibration",
                          str(tmp_path / "missing.json"), "-o", str(tmp_path / "x")],
                         capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: calibration file not found")
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("command", ["fit-temperature", "maps", "evaluate"])
def test_help_explains_options_with_units(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--members" in text and "millimetres" in text
    for opt in {"fit-temperature": ["--roi-radius-mm", "--roi-rule", "--method", "--ensemble-mode", "--max-voxels",
                                    "--seed"],
                "maps": ["--dae-sigma-mm", "--ebcu-radius-mm", "--min-region-mm3", "--regions-map", "--calibration"],
                "evaluate": ["--labels", "--calibration", "--roi-radius-mm"]}[command]:
        assert opt in text


def test_conformal_flags_and_margins(run):
    """α = 0.3 needs ≥ 3 calibration cases (B/(n+1) ≤ α): the thresholds are not the trivial ones."""
    cal = json.loads(run["cal"].read_text())
    conf = cal["conformal"]
    assert conf["alpha"] == 0.3 and conf["n_cases"] == 3 and "Conformal Risk Control" in conf["source"]
    assert set(conf["flags"]) == set(MAP_NAMES)
    dae = conf["flags"]["dae"]["0.3"]
    assert not dae["trivial"] and dae["bound"] <= 0.3 and dae["bound"] == (3 * dae["mean_miss"] + 1) / 4
    assert conf["flags"]["dae"]["0.1"]["trivial"]  # 3 cases cannot give 90 %
    mand = conf["margins"]["Mandible"]["0.3"]
    assert 0 <= mand["outer"] <= 0.5 <= mand["inner"] <= 1
    case_dir = run["root"] / "maps" / HELD_OUT[0]
    summary = json.loads((case_dir / "summary.json").read_text())
    assert summary["conformal"]["flags"]["guarantee"] == "flags cover ≥ 70 % of errors in expectation"
    assert summary["conformal"]["flags"]["tau_score"] == dae["tau"]
    seg, _ = read_image(case_dir / "seg.nii.gz")
    names = cal["class_names"]
    for name, m in summary["margins"]["classes"].items():
        levels, geo = read_image(case_dir / m["file"])
        c = names.index(name)
        assert set(np.unique(levels)) <= {0, 1, 2, 3}
        assert np.array_equal(levels >= 2, seg == c)  # the prediction is the middle level
        v = m["volumes_mm3"]
        assert v["inner"] <= v["prediction"] <= v["outer"]
    ev = json.loads((run["root"] / "eval" / "evaluation.json").read_text())
    rows = {r["alpha"]: r for r in ev["conformal"]["flags"]["dae"]}
    assert set(rows) == {0.05, 0.1, 0.2, 0.3} and rows[0.1]["mean_miss"] == 0.0  # trivial: whole ROI
    assert 0 <= rows[0.3]["mean_miss"] <= 1
    assert (run["root"] / "eval" / "conformal_miss_vs_alpha.png").stat().st_size > 0
    report = (run["root"] / "eval" / "report.md").read_text()
    assert "flags cover ≥ 70 % of errors in expectation" in report


# --- the review as Slicer draws it, on real CT (issue 16) -----------------------------------------
@pytest.fixture(scope="module")
def real_review(run):
    """A held-out real CT case loaded as the module loads it, with one offscreen Slicer slice view."""
    import slicer

    from CalibUncertaintyLib.mrml.nodes import load_case_outputs, load_volume_file
    from CalibUncertaintyLib.mrml.review import ReviewController
    from CalibUncertaintyLib.mrml.slice_views import SliceViews

    case_id = HELD_OUT[2]
    scene = slicer.vtkMRMLScene()
    ct = load_volume_file(scene, Path(run["images"]) / f"{case_id}_0000.nii.gz")
    case = load_case_outputs(scene, run["root"] / "maps" / case_id, ct)
    with SliceViews(scene) as views:
        yield views, scene, case, ReviewController(scene, case)


def test_real_ct_overlay_and_contours_through_slicers_views(real_review):
    import view_pixels

    views, _scene, case, ctl = real_review
    layer = case.regions_doc["map"]
    assert case.margins is not None and case.regions
    view_pixels.overlay_visible_inside_an_organ(views, case, ctl, layer)
    view_pixels.nothing_above_an_out_of_range_threshold(views, case, ctl, layer)
    view_pixels.every_view_centred_after_next(views, case, ctl)
    view_pixels.legend_equals_display(case, ctl, layer)


def test_real_ct_review_sheet_reads_at_a_glance(real_review):
    """Views fitted to the body (not the whole slice), Slicer's drawing, a legend equal to what
    is drawn, a table without sub-voxel or background regions, the calibrator named."""
    from CalibUncertaintyLib.mrml.review_sheet import sheet_content, voxel_volume_mm3

    views, scene, case, ctl = real_review
    ctl.set_foreground_map(case.regions_doc["map"])
    content = sheet_content(scene, case, top_n=1, controller=ctl, views=views)
    assert content.fallback is None and content.legend.range == ctl.legend().range
    axial = dict(content.rows[0][1])["Axial"]
    grey = axial.astype(int)
    body = (grey.min(axis=2) > 60) & (np.ptp(grey, axis=2) < 12)      # soft tissue / bone, not overlay
    cols = np.flatnonzero(body.sum(axis=0) > 3)
    width = (cols.max() - cols.min() + 1) / axial.shape[1]
    assert 0.7 < width < 0.97, f"the body spans {width:.0%} of the view's width"
    vmin = voxel_volume_mm3(case.geometry)
    listed = [r for r in case.regions if f"R{r.rank}" in {row[0] for row in content.table}]
    assert listed and all(r.volume_mm3 >= vmin - 1e-6 and r.class_index != 0 for r in listed)
    assert "calibration: temperature scaling, T = " in "\n".join(content.lines)
