"""Calibration file and model fingerprint (METHODS.md §2 "The calibration file").

Model folders are real nnU-Net trained-model folders written by ``tiny_nnunet`` (random weights);
the prediction-folder copies of plans.json / dataset.json are written with the same function
nnU-Net's predictor uses (``batchgenerators ... save_json``), which re-formats them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import save_json
from tiny_nnunet import build_tiny_model_folder

from CalibUncertaintyLib.calibration import (CalibrationFile, TemperatureScaler, VectorScaler, apply_temperature,
                                             apply_vector_scaling, compare_fingerprints, fingerprint_model_folder,
                                             fingerprint_prediction_folder, safe_log, short_hash, softmax)
from CalibUncertaintyLib.errors import CalibrationMismatchError, InputError, ModelFolderError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    a = build_tiny_model_folder(root / "a", folds=(0, 1), seed=0)
    b = build_tiny_model_folder(root / "b", folds=(0, 1), seed=7)  # same plans, other weights
    return a, b


def fitted_scaler(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (3000, 3))
    y = (softmax(z).cumsum(1) > rng.random((3000, 1))).argmax(1)
    return TemperatureScaler().fit(1.7 * z, y), z, y


def test_model_fingerprint(models):
    a, b = models
    fa, fb = fingerprint_model_folder(a), fingerprint_model_folder(b)
    assert fa["source"] == "model_folder" and fa["n_classes"] == 3
    assert sorted(fa["checkpoints"]) == ["fold_0/checkpoint_final.pth", "fold_1/checkpoint_final.pth"]
    assert fa == fingerprint_model_folder(a)  # deterministic
    assert fa["plans_dataset_sha256"] == fb["plans_dataset_sha256"]
    assert fa["checkpoints_sha256"] != fb["checkpoints_sha256"]
    assert compare_fingerprints(fa, fa) is None
    reason = compare_fingerprints(fa, fb)
    assert reason.startswith("checkpoint files differ") and "fold_0/checkpoint_final.pth" in reason
    with pytest.raises(ModelFolderError, match="no plans.json"):
        fingerprint_model_folder(a / "fold_0")


def test_prediction_folder_fingerprint_matches_model(models, tmp_path):
    a, _ = models
    fa = fingerprint_model_folder(a)
    members = []
    for fold in (0, 1):
        out = tmp_path / f"pred_fold{fold}"
        out.mkdir()
        # as nnUNetv2_predict does: load and re-dump (indent 4, key order kept) into the output folder
        save_json(json.loads((a / "dataset.json").read_text()), str(out / "dataset.json"), sort_keys=False)
        save_json(json.loads((a / "plans.json").read_text()), str(out / "plans.json"), sort_keys=False)
        members.append(out)
    assert (members[0] / "plans.json").read_bytes() != (a / "plans.json").read_bytes()
    fp = fingerprint_prediction_folder(members)
    assert fp["source"] == "prediction_folder" and fp["checkpoints_sha256"] is None
    assert fp["plans_dataset_sha256"] == fa["plans_dataset_sha256"]
    assert compare_fingerprints(fa, fp) is None
    # another model's plans: refused
    plans = json.loads((a / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [8, 16, 16]
    save_json(plans, str(members[1] / "plans.json"))
    assert compare_fingerprints(fa, fingerprint_prediction_folder(members[1])) == "plans.json/dataset.json differ"


def test_member_names_fallback(tmp_path):
    folders = []
    for name in ("fold_1", "fold_0"):
        d = tmp_path / name
        d.mkdir()
        np.savez_compressed(d / "case_000.npz", probabilities=np.full((4, 2, 3, 3), 0.25, np.float32))
        folders.append(d)
    fp = fingerprint_prediction_folder(folders)
    assert fp["source"] == "member_names" and fp["weak"] is True
    assert fp["n_classes"] == 4 and fp["member_names"] == ["fold_0", "fold_1"]
    assert fp == fingerprint_prediction_folder(folders[::-1])  # member order does not matter
    assert compare_fingerprints(fp, fingerprint_prediction_folder(folders[:1])) is not None
    assert compare_fingerprints(fp, {**fp, "n_classes": 3}).startswith("class counts differ")
    with pytest.raises(InputError, match="pass n_classes"):
        fingerprint_prediction_folder(tmp_path)  # no npz, no json


def test_round_trip_and_transform(models, tmp_path):
    scaler, z, _ = fitted_scaler()
    fp = fingerprint_model_folder(models[0])
    cal = CalibrationFile.from_scaler(
        scaler, roi_rule="prediction", radius_mm=15.0, case_ids=["c1", "c2"], class_names=["bg", "a", "b"],
        fingerprint=fp, thresholds={"entropy": {"tau": 0.4, "kind": "absolute", "mean_ueo": 0.31}},
        ebcu_threshold=0.52)
    path = cal.save(tmp_path / "calibration.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "calib-uncertainty-calibration" and raw["schema_version"] == 1
    assert raw["temperature"] == pytest.approx(scaler.temperature_) and "source_path" not in raw
    back = CalibrationFile.load(path)
    assert back == cal and back.source_path == str(path)
    assert back.n_cases == 2 and back.n_voxels == 3000 and back.nll_after <= back.nll_before
    assert "15 mm" in back.describe() and "pool_then_calibrate" in back.describe()
    probs = softmax(z[:24].T.reshape(3, 2, 3, 4), axis=0).astype(np.float32)
    np.testing.assert_array_equal(back.transform_probs(probs), apply_temperature(probs, scaler.temperature_))
    with pytest.raises(InputError, match="3 classes"):
        back.transform_probs(probs[:2])
    back.check_fingerprint(fingerprint_model_folder(models[0]))  # same model: accepted


def test_vector_method_round_trip(tmp_path):
    _, z, y = fitted_scaler(1)
    v = VectorScaler().fit(safe_log(softmax(2 * z)), y)
    cal = CalibrationFile.from_scaler(v, case_ids=["c1"], class_names=["bg", "a", "b"],
                                      fingerprint={"n_classes": 3, "plans_dataset_sha256": "ab" * 32})
    back = CalibrationFile.load(cal.save(tmp_path / "vec.json"))
    assert back.method == "vector" and back.vector["fitted_on"] == "log_probs"
    p = softmax(2 * z[:10]).T
    np.testing.assert_allclose(back.transform_probs(p), apply_vector_scaling(p, v.w_, v.b_))


def test_refuses_another_models_fingerprint(models, tmp_path):
    scaler, _, _ = fitted_scaler()
    fa, fb = fingerprint_model_folder(models[0]), fingerprint_model_folder(models[1])
    path = CalibrationFile.from_scaler(scaler, case_ids=["c"], fingerprint=fa).save(tmp_path / "cal.json")
    cal = CalibrationFile.load(path)
    with pytest.raises(CalibrationMismatchError) as exc:
        cal.check_fingerprint(fb)
    msg = str(exc.value)
    key = "checkpoints_sha256"
    assert f"model {short_hash(fa, key)}" in msg and f"this model is {short_hash(fb, key)}" in msg
    assert short_hash(fa, key) != short_hash(fb, key)
    assert "cal.json" in msg and "refit" in msg
    with pytest.raises(CalibrationMismatchError, match="missing"):
        cal.check_fingerprint({})


def test_refuses_corrupt_or_foreign_files(tmp_path):
    scaler, _, _ = fitted_scaler()
    good = CalibrationFile.from_scaler(scaler, case_ids=["c"], fingerprint={"n_classes": 3})
    path = good.save(tmp_path / "cal.json")
    text = path.read_text()
    with pytest.raises(InputError, match="not found"):
        CalibrationFile.load(tmp_path / "missing.json")
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="not valid JSON"):
        CalibrationFile.load(tmp_path / "trunc.json")
    (tmp_path / "other.json").write_text(json.dumps({"temperature": 1.5}))
    with pytest.raises(InputError, match="not a CalibUncertainty calibration file"):
        CalibrationFile.load(tmp_path / "other.json")
    d = json.loads(text)
    for change, match in (({"schema_version": 99}, "schema version 99"), ({"temperature": -1.0}, "temperature"),
                          ({"roi": {"rule": "x", "radius_mm": 15}}, "roi must be"),
                          ({"method": "isotonic"}, "unknown method")):
        (tmp_path / "bad.json").write_text(json.dumps({**d, **change}))
        with pytest.raises(InputError, match=match):
            CalibrationFile.load(tmp_path / "bad.json")
    # a failed save never half-overwrites the existing file
    broken = CalibrationFile.load(path)
    broken.extra = {"not_json": object()}
    with pytest.raises(TypeError):
        broken.save(path)
    assert path.read_text() == text
    broken.extra, broken.temperature = {}, 0.0
    with pytest.raises(InputError, match="temperature"):
        broken.save(path)
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))== []


def test_temperature_range_empty_labels_and_ensemble_record(tmp_path):
    scaler, _, _ = fitted_scaler()
    good = CalibrationFile.from_scaler(scaler, case_ids=["c"], fingerprint={"n_classes": 3},
                                       label_foreground_voxels=10,
                                       ensemble={"kind": "deep", "members": ["fold_0/checkpoint_final",
                                                                             "fold_1/checkpoint_final"], "tta": True})
    path = good.save(tmp_path / "cal.json")
    cal = CalibrationFile.load(path)
    assert cal.check_ensemble("deep", ["fold_0_checkpoint_final", "fold_1_checkpoint_final"], True) is None
    # another TTA setting is refused, naming the option that matches the fit
    with pytest.raises(CalibrationMismatchError, match=r"TTA \(nnU-Net's mirroring\): on when fitted, off now\); "
                                                       r"run with --tta as when it was fitted"):
        cal.check_ensemble("deep", ["fold_0/checkpoint_final", "fold_1/checkpoint_final"], False)
    with pytest.raises(CalibrationMismatchError, match="fitted on deep, applied to checkpoint.*run with --ensemble deep"):
        cal.check_ensemble("checkpoint", ["fold_0/snapshot_1", "fold_0/snapshot_2"], True)
    with pytest.raises(CalibrationMismatchError, match="members: fitted on fold_0_checkpoint_final.*--folds 0 1"):
        cal.check_ensemble("deep", ["fold_0/checkpoint_final", "fold_2/checkpoint_final"], True)
    with pytest.raises(CalibrationMismatchError, match=r"2 member\(s\) .* 1 \(fold_0_checkpoint_final\) now.*--folds 0 1"):
        cal.check_ensemble("deep", ["fold_0/checkpoint_final"], True)
    assert cal.check_ensemble(None, ["a", "b"], None) is None  # folder names vs model members: not comparable
    doc = json.loads(path.read_text())
    for t in (1e-30, 0.04, 25.0):
        path.write_text(json.dumps({**doc, "temperature": t}))
        with pytest.raises(InputError, match=r"outside \[0.05, 20\]"):
            CalibrationFile.load(path)
    path.write_text(json.dumps({**doc, "label_foreground_voxels": 0}))
    with pytest.raises(InputError, match="all background"):
        CalibrationFile.load(path)
    old = {k: v for k, v in doc.items() if k not in ("label_foreground_voxels", "ensemble")}
    path.write_text(json.dumps(old))  # a file from before these fields: accepted, nothing to compare
    assert CalibrationFile.load(path).check_ensemble("single", ["fold_0/checkpoint_final"], False) is None


def test_dropout_passes_and_member_folder_tta_must_match(tmp_path):
    """A calibration fitted on 10 MC-dropout passes is refused for 5, naming --passes 10; one fitted
    on member folders computed without TTA (their markers say so) is refused with TTA on."""
    scaler, _, _ = fitted_scaler()
    names = [f"fold_0/checkpoint_final/dropout_{i}" for i in range(1, 11)]
    cal = CalibrationFile.from_scaler(scaler, case_ids=["c"], fingerprint={"n_classes": 3}, label_foreground_voxels=10,
                                      ensemble={"kind": "dropout", "members": names, "tta": False})
    cal.check_ensemble("dropout", [n.replace("/", "_") for n in names], False)  # the same members: accepted
    with pytest.raises(CalibrationMismatchError, match=r"10 member\(s\).*5 .*now.*run with --folds 0 --passes 10"):
        cal.check_ensemble("dropout", names[:5], False)
    folders = CalibrationFile.from_scaler(scaler, case_ids=["c"], fingerprint={"n_classes": 3},
                                          label_foreground_voxels=10,
                                          ensemble={"kind": None, "members": ["m0", "m1"], "tta": False})
    with pytest.raises(CalibrationMismatchError, match="off when fitted, on now.*--no-tta"):
        folders.check_ensemble(None, ["m0", "m1"], True)
    assert folders.check_ensemble(None, ["m0", "m1"], None) is None  # folders without a marker: not compared
