"""``calib-uncertainty predict`` end to end on a tiny REAL nnU-Net model folder (tiny_nnunet.py).

Input: blocks of real OpenKBP CTs with an oblique direction, a non-zero origin and a spacing
different from the plans'; every output must be on that exact grid.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.progress import parse_progress_line

from tiny_nnunet import build_tiny_model_folder, write_test_ct

SHAPE = (18, 40, 36)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, openkbp_dir):
    root = tmp_path_factory.mktemp("cli_predict")
    model = build_tiny_model_folder(root / "model", folds=(0, 1), snapshots=2)
    other = build_tiny_model_folder(root / "other", folds=(0, 1), seed=7)  # same plans, other weights
    cts = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[:2]
    images = root / "images"
    write_test_ct(images / "hn_a_0000.nii.gz", source_ct=cts[0], shape_zyx=SHAPE)
    write_test_ct(images / "hn_b_0000.nii.gz", source_ct=cts[1], shape_zyx=SHAPE, rotation_deg=-40.0,
                  origin=(-80.0, 5.0, -300.0))
    return {"root": root, "model": model, "other": other, "images": images}


def _predict(setup, out, *extra, image=None):
    src = setup["images"] if image is None else image
    return main(["predict", "-i", str(src), "-m", str(setup["model"]), "-o", str(out), "--no-tta",
                 "--device", "cpu", *extra])


def _check_case(out_case, image_path, n_members, ensemble):
    _, geometry = read_image(image_path)
    seg, g_seg = read_image(out_case / "seg.nii.gz")
    assert g_seg.mismatch(geometry) is None
    for name in ("prob_Organ", "prob_Tumour", "map_entropy", "map_mutual_information", "map_dae"):
        _, g = read_image(out_case / f"{name}.nii.gz")
        assert g.mismatch(geometry) is None, name
    summary = json.loads((out_case / "summary.json").read_text())
    pred = summary["prediction"]
    assert summary["n_members"] == n_members and len(pred["members"]) == n_members
    assert pred["ensemble"] == ensemble and pred["tta"] is False and pred["device"] == "cpu"
    t = pred["timings_s"]
    assert len(t["members_s"]) == n_members and t["inference_s"] == pytest.approx(sum(t["members_s"]), abs=1e-3)
    assert t["preprocess_s"] > 0 and summary["timings_s"]["total_s"] > 0
    assert summary["geometry"] == geometry.to_dict()
    return seg, summary


def test_deep_ensemble_on_a_folder_of_cases(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CALIBU_PROGRESS", "1")  # progress lines only when asked (the Slicer runner sets it)
    out = tmp_path / "deep"
    assert _predict(setup, out) == 0
    err = capsys.readouterr().err
    for case in ("hn_a", "hn_b"):
        _, summary = _check_case(out / case, setup["images"] / f"{case}_0000.nii.gz", 2, "deep")
        mi = read_image(out / case / "map_mutual_information.nii.gz")[0]
        assert mi.max() > 1e-3  # two different members disagree somewhere
    top = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in top["cases"]] == ["hn_a", "hn_b"] and top["ensemble"] == "deep"
    events = [e for e in map(parse_progress_line, err.splitlines()) if e and e["stage"] == "inference"]
    assert {(e["case"], e["member"]) for e in events} >= {("hn_a", 1), ("hn_a", 2), ("hn_b", 1), ("hn_b", 2)}


def test_checkpoint_ensemble_single_file(setup, tmp_path):
    out = tmp_path / "ckpt"
    image = setup["images"] / "hn_b_0000.nii.gz"
    assert _predict(setup, out, "--ensemble", "checkpoint", image=image) == 0
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["hn_b"]
    _, summary = _check_case(out / "hn_b", image, 2, "checkpoint")
    assert summary["prediction"]["members"] == ["fold_0/snapshot_1", "fold_0/snapshot_2"]


def test_single_model_matches_nnunet_and_cuda_falls_back(setup, tmp_path, caplog):
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out = tmp_path / "single"
    image = setup["images"] / "hn_a_0000.nii.gz"
    with caplog.at_level(logging.WARNING):
        rc = main(["predict", "-i", str(image), "-m", str(setup["model"]), "-o", str(out), "--no-tta",
                   "--ensemble", "single", "--folds", "1", "--device", "cuda"])
    assert rc == 0
    if not torch.cuda.is_available():
        assert "CUDA was requested" in caplog.text and "running on the CPU" in caplog.text
    seg, summary = _check_case(out / "hn_a", image, 1, "single")
    assert summary["prediction"]["members"] == ["fold_1/checkpoint_final"]
    assert float(read_image(out / "hn_a" / "map_mutual_information.nii.gz")[0].max()) == 0.0
    p = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(setup["model"]), (1,), "checkpoint_final.pth")
    img = sitk.ReadImage(str(image))
    ref = p.predict_single_npy_array(sitk.GetArrayFromImage(img)[None].astype(np.float32),
                                     {"spacing": list(img.GetSpacing())[::-1]})
    assert len(np.unique(ref)) >= 2
    np.testing.assert_array_equal(seg, ref)


def test_calibration_file_of_this_model_is_used_and_another_models_refused(setup, tmp_path, capsys):
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.calibration.fingerprint import fingerprint_model_folder

    image = setup["images"] / "hn_a_0000.nii.gz"
    names = ["background", "Organ", "Tumour"]
    # with an atypicality reference (u_ref given here), predict measures the input CT's body
    ref = {"domain": "body", "q": 0.99, "u_ref": {"entropy": 0.05},
           "scores": {"high_entropy_body_fraction": [0.0] * 10}}
    mine = CalibrationFile(temperature=3.0, class_names=names, n_cases=1, case_reference=ref,
                           fingerprint=fingerprint_model_folder(setup["model"])).save(tmp_path / "mine.json")
    theirs = CalibrationFile(temperature=3.0, class_names=names, n_cases=1,
                             fingerprint=fingerprint_model_folder(setup["other"])).save(tmp_path / "theirs.json")

    refused = tmp_path / "refused"
    assert _predict(setup, refused, "--calibration", str(theirs), image=image) == 2
    assert "theirs.json was fitted on model" in capsys.readouterr().err
    assert not refused.exists()  # refused before anything was written

    plain, calibrated = tmp_path / "plain", tmp_path / "cal"
    assert _predict(setup, plain, "--ensemble", "single", image=image) == 0
    capsys.readouterr()
    assert _predict(setup, calibrated, "--ensemble", "single", "--calibration", str(mine), image=image) == 0
    # the input's body is doubted more than every one of the 10 calibration cases': p = 1/11, named at the end
    assert "hn_a (high-entropy body fraction p = 0.091)" in capsys.readouterr().out
    summary = json.loads((calibrated / "hn_a" / "summary.json").read_text())
    assert summary["calibration"]["temperature"] == 3.0
    body = read_image(image)[0] >= -500
    entropy = read_image(calibrated / "hn_a" / "map_entropy.nii.gz")[0]
    aggs = summary["case_aggregates"]
    assert 0 < body.sum() < body.size
    assert aggs["high_entropy_body_fraction"] == pytest.approx(float((entropy[body] > 0.05).mean()))
    assert aggs["high_entropy_body_fraction_p"] == pytest.approx(1 / 11)  # no calibration value is >= it
    assert aggs["map"] == "dae" and "mean_u_roi" in aggs
    p0 = read_image(plain / "hn_a" / "prob_Organ.nii.gz")[0]
    p1 = read_image(calibrated / "hn_a" / "prob_Organ.nii.gz")[0]
    assert np.abs(p0 - p1).max() > 0.05  # T = 3 softens the probabilities
    np.testing.assert_array_equal(read_image(plain / "hn_a" / "seg.nii.gz")[0],
                                  read_image(calibrated / "hn_a" / "seg.nii.gz")[0])


@pytest.mark.parametrize("extra, message", [
    (["--folds", "0", "5"], "fold 5 has no checkpoint_final.pth"),
    (["--ensemble", "single", "--checkpoint", "checkpoint_best.pth"], "no fold of"),
    (["--probabilities", "Liver"], "--probabilities: no foreground class 'Liver' to write probabilities for; "
                                   "classes: Organ, Tumour"),
])
def test_bad_model_requests_fail_with_a_clear_message(setup, tmp_path, capsys, extra, message):
    assert _predict(setup, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before any inference or output


def test_not_a_model_folder_and_wrong_channel_count(setup, tmp_path, capsys):
    rc = main(["predict", "-i", str(setup["images"]), "-m", str(setup["images"]), "-o", str(tmp_path / "o")])
    assert rc == 2 and "is not an nnU-Net v2 trained model folder: missing plans.json" in capsys.readouterr().err
    two = build_tiny_model_folder(tmp_path / "two", folds=(0,), n_channels=2)
    rc = main(["predict", "-i", str(setup["images"]), "-m", str(two), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "case hn_a has 1 channel file(s) (_0000) but the model expects 2" in err
