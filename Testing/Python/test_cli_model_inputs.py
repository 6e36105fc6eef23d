"""``fit-temperature`` and ``evaluate`` straight from an nnU-Net model folder (``--model``).

A tiny REAL nnU-Net model folder (tiny_nnunet.py, random weights, 2 folds) is run on small
CT-like images with an oblique direction; its member outputs are cached and reused; the
calibration file carries the model folder's fingerprint, so ``predict`` accepts it for this model
and refuses it for another one.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from CalibUncertaintyLib.calibration.fingerprint import fingerprint_model_folder
from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.io.images import read_image, write_image
from CalibUncertaintyLib.io.nnunet_outputs import load_member_probs
from CalibUncertaintyLib.nnunet.member_cache import MARKER, model_cache_key
from CalibUncertaintyLib.nnunet.model_folder import ModelFolder
from CalibUncertaintyLib.progress import parse_progress_line

from tiny_nnunet import build_tiny_model_folder, write_test_ct

SHAPE = (14, 36, 32)
FIT_CASES = ["c0", "c1"]
TEST_CASES = ["c2"]
RUN = ["--no-tta", "--device", "cpu"]


def _label(shape, seed):
    """Class 1: an ellipsoid, class 2: a box, placed by ``seed``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    cz, cy, cx = (np.array(shape) // 2 + rng.integers(-2, 3, 3))
    lab = np.zeros(shape, np.uint8)
    lab[((z - cz) / 4.0) ** 2 + ((y - cy) / 9.0) ** 2 + ((x - cx) / 8.0) ** 2 < 1] = 1
    lab[4:9, 5:12, 20:28] = 2
    return lab


@pytest.fixture(scope="module")
def member_cache(tmp_path_factory):
    """The default member cache (CALIBU_CACHE_DIR/members) of this module's runs."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("calibu_cache")
        mp.setenv("CALIBU_CACHE_DIR", str(d))
        yield d / "members"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, member_cache):
    root = tmp_path_factory.mktemp("model_inputs")
    model = build_tiny_model_folder(root / "model", folds=(0, 1))
    other = build_tiny_model_folder(root / "other", folds=(0, 1), seed=7)  # same plans, other weights
    images, labels = root / "images", root / "labels"
    for i, case in enumerate(FIT_CASES + TEST_CASES):
        ct = write_test_ct(images / f"{case}_0000.nii.gz", shape_zyx=SHAPE, rotation_deg=20.0 + 15 * i,
                           origin=(10.0 * i, -30.0, 5.0 - 7.0 * i))
        _, geometry = read_image(ct)
        write_image(labels / f"{case}.nii.gz", _label(SHAPE, i), geometry)
    cal = root / "fit" / "calibration.json"
    first = main(["fit-temperature", "-m", str(model), "--images", str(images), "--labels", str(labels),
                  "--cases", *FIT_CASES, *RUN, "-o", str(cal)])
    return {"root": root, "model": model, "other": other, "images": images, "labels": labels, "cal": cal,
            "first_rc": first, "cache": member_cache}


def _member_dirs(cache_root, model, tta=False):
    key = model_cache_key(ModelFolder.open(model), fingerprint_model_folder(model))
    return sorted((cache_root / key / ("tta" if tta else "notta")).iterdir())


def _error(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if parse_progress_line(ln) is None]
    assert "Traceback" not in err
    return lines[-1] if lines else ""


def test_fit_from_model_records_the_model_fingerprint(setup):
    assert setup["first_rc"] == 0
    cal = json.loads(setup["cal"].read_text())
    fp = fingerprint_model_folder(setup["model"])
    assert cal["fingerprint"]["source"] == "model_folder"
    assert cal["fingerprint"]["checkpoints_sha256"] == fp["checkpoints_sha256"]
    assert sorted(cal["fingerprint"]["checkpoints"]) == ["fold_0/checkpoint_final.pth", "fold_1/checkpoint_final.pth"]
    assert sorted(cal["case_ids"]) == FIT_CASES and cal["temperature"] > 0
    # per-organ quality from a real network's members: 2 cases are too few for α = 0.1 (the intervals are trivial)
    q = cal["organ_quality"]
    assert q["n_cases"] == 2 and q["min_cases"] == 9 and all(c["n_predicted"] <= 2 for c in q["classes"].values())
    inputs = cal["extra"]["inputs"]
    assert inputs["model_folder"] == str(setup["model"]) and inputs["members"] == ["fold_0/checkpoint_final",
                                                                                   "fold_1/checkpoint_final"]
    # the default cache (shared by fit-temperature and evaluate), one --save_probabilities folder per member
    dirs = _member_dirs(setup["cache"], setup["model"])
    assert [d.name for d in dirs] == ["fold_0_checkpoint_final", "fold_1_checkpoint_final"]
    for d in dirs:
        assert sorted(p.name for p in d.glob("*.npz")) == ["c0.npz", "c1.npz"]
        assert json.loads((d / "plans.json").read_text()) == json.loads((setup["model"] / "plans.json").read_text())
        marker = json.loads((d / MARKER).read_text())
        assert marker["tta"] is False and sorted(marker["cases"]) == FIT_CASES
        probs, geometry = load_member_probs(d, "c0")
        assert geometry.mismatch(read_image(setup["images"] / "c0_0000.nii.gz")[1]) is None
        assert probs.shape == (3, *SHAPE)
    a, _ = load_member_probs(dirs[0], "c0")
    b, _ = load_member_probs(dirs[1], "c0")
    assert np.abs(a - b).max() > 1e-2  # two different folds


def test_second_run_reuses_the_cache_and_members_path_agrees(setup, tmp_path, capsys):
    dirs = _member_dirs(setup["cache"], setup["model"])
    stamps = {p: p.stat().st_mtime_ns for d in dirs for p in d.glob("*.npz")}
    again = setup["cal"].parent / "again.json"
    capsys.readouterr()
    assert main(["fit-temperature", "--model", str(setup["model"]), "--images", str(setup["images"]),
                 "--labels", str(setup["labels"]), "--cases", *FIT_CASES, *RUN, "-o", str(again)]) == 0
    out, err = capsys.readouterr()
    assert "0 output(s) computed, 4 reused" in out
    assert not [e for e in map(parse_progress_line, err.splitlines()) if e and e["stage"] == "inference"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    first, second = json.loads(setup["cal"].read_text()), json.loads(again.read_text())
    assert second["temperature"] == first["temperature"]
    # the cached folders are ordinary --members input: same temperature, plans-level fingerprint
    via_members = tmp_path / "via_members.json"
    assert main(["fit-temperature", "--members", *map(str, dirs), "--images", str(setup["images"]),
                 "--labels", str(setup["labels"]), "--cases", *FIT_CASES, "-o", str(via_members)]) == 0
    m = json.loads(via_members.read_text())
    assert m["temperature"] == pytest.approx(first["temperature"], rel=1e-6)
    assert m["fingerprint"]["plans_dataset_sha256"] == first["fingerprint"]["plans_dataset_sha256"]


def test_changed_image_is_recomputed_only_for_that_case(setup, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["fit-temperature", "-m", str(setup["model"]), "--labels", str(setup["labels"]), "--cases", *FIT_CASES,
            "--member-cache", str(cache), *RUN]
    assert main([*args, "--images", str(setup["images"]), "-o", str(tmp_path / "a.json")]) == 0
    assert "4 output(s) computed on cpu, 0 reused" in capsys.readouterr().out
    images2 = tmp_path / "images2"
    shutil.copytree(setup["images"], images2)
    ct, geometry = read_image(images2 / "c1_0000.nii.gz")
    write_image(images2 / "c1_0000.nii.gz", (ct + 150).astype(np.int16), geometry)  # same case id, new content
    dirs = _member_dirs(cache, setup["model"])
    c0 = {d: (d / "c0.npz").stat().st_mtime_ns for d in dirs}
    assert main([*args, "--images", str(images2), "-o", str(tmp_path / "b.json")]) == 0
    assert "2 output(s) computed on cpu, 2 reused" in capsys.readouterr().out
    assert {d: (d / "c0.npz").stat().st_mtime_ns for d in dirs} == c0


def test_evaluate_from_model(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "-m", str(setup["model"]), "--images", str(setup["images"]), "--labels",
                 str(setup["labels"]), "--cases", *TEST_CASES, "--calibration", str(setup["cal"]), *RUN,
                 "--progress", "-o", str(out)]) == 0
    text = capsys.readouterr()
    assert "2 output(s) computed on cpu, 0 reused" in text.out
    assert {"members"} == {e["stage"] for e in map(parse_progress_line, text.err.splitlines())
                           if e and e.get("member")}
    assert (out / "report.md").is_file()
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["n_members"] == 2 and [r["case"] for r in ev["per_case"]] == TEST_CASES
    assert ev["inputs"]["model_folder"] == str(setup["model"]) and ev["inputs"]["ensemble"] == "deep"
    assert ev["calibration"]["temperature"] == json.loads(setup["cal"].read_text())["temperature"]
    assert [d.name for d in _member_dirs(setup["cache"], setup["model"])] == ["fold_0_checkpoint_final",
                                                                              "fold_1_checkpoint_final"]


def test_evaluate_reuses_what_fit_temperature_cached_by_default(setup, tmp_path, capsys):
    """Both commands default to one member cache: evaluating the fitted cases computes nothing."""
    capsys.readouterr()
    assert main(["evaluate", "-m", str(setup["model"]), "--images", str(setup["images"]), "--labels",
                 str(setup["labels"]), "--cases", *FIT_CASES, "--calibration", str(setup["cal"]), *RUN,
                 "-o", str(tmp_path / "eval_fit_cases")]) == 0
    assert "0 output(s) computed, 4 reused" in capsys.readouterr().out
    assert not (tmp_path / "eval_fit_cases" / "members").exists()


def test_evaluate_refuses_another_models_calibration_before_inference(setup, tmp_path, capsys):
    out = tmp_path / "eval_other"
    assert main(["evaluate", "-m", str(setup["other"]), "--images", str(setup["images"]), "--labels",
                 str(setup["labels"]), "--cases", *TEST_CASES, "--calibration", str(setup["cal"]), *RUN,
                 "-o", str(out)]) == 2
    err = _error(capsys)
    assert err.startswith("error: calibration file calibration.json was fitted on model")
    assert "checkpoint files differ" in err
    assert not out.exists()


def test_predict_accepts_the_file_for_this_model_only(setup, tmp_path, capsys):
    image = setup["images"] / "c2_0000.nii.gz"
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(image), "-m", str(setup["model"]), "--calibration", str(setup["cal"]),
                 *RUN, "-o", str(out)]) == 0
    summary = json.loads((out / "c2" / "summary.json").read_text())
    assert summary["calibration"]["temperature"] == json.loads(setup["cal"].read_text())["temperature"]
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["predict", "-i", str(image), "-m", str(setup["other"]), "--calibration", str(setup["cal"]),
                 *RUN, "-o", str(refused)]) == 2
    assert "was fitted on model" in _error(capsys) and not refused.exists()


def test_members_and_model_exclusive_and_model_needs_images(setup, tmp_path, capsys):
    base = ["fit-temperature", "--labels", str(setup["labels"]), "-o", str(tmp_path / "c.json")]
    with pytest.raises(SystemExit) as e:
        main([*base, "--members", str(setup["images"]), "--model", str(setup["model"])])
    assert e.value.code == 2 and "argument -m/--model: not allowed with argument --members" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(base)
    assert e.value.code == 2 and "one of the arguments --members -m/--model -d/--dataset is required" in \
        capsys.readouterr().err
    assert main([*base, "--model", str(setup["model"])]) == 2
    assert _error(capsys).startswith("error: --model needs --images DIR")
    assert main([*base, "--members", str(setup["images"]), "--ensemble", "single", "--no-tta"]) == 2
    assert "--ensemble, --tta/--no-tta only apply with --model or -d" in _error(capsys)
    assert not (tmp_path / "c.json").exists()


def test_unlabelled_case_and_bad_member_request_fail_before_inference(setup, tmp_path, capsys):
    labels = tmp_path / "labels"
    shutil.copytree(setup["labels"], labels)
    (labels / "c1.nii.gz").unlink()
    cache = tmp_path / "cache"
    base = ["fit-temperature", "-m", str(setup["model"]), "--images", str(setup["images"]), "--member-cache",
            str(cache), *RUN, "-o", str(tmp_path / "c.json")]
    assert main([*base, "--labels", str(labels)]) == 2
    assert "case(s) c1 have an image but no label" in _error(capsys)
    assert main([*base, "--labels", str(setup["labels"]), "--folds", "0", "3"]) == 2
    assert "fold 3 has no checkpoint_final.pth" in _error(capsys)
    assert main([*base, "--labels", str(setup["labels"]), "--cases", "c0", "nope"]) == 2
    assert "case(s) nope have no image" in _error(capsys)
    assert not cache.exists()


def test_demo_write_members_moved_and_reused(setup, tmp_path):
    from CalibUncertaintyLib import demo
    from CalibUncertaintyLib.nnunet import member_cache

    assert demo.write_members is member_cache.write_members
    cases = {"c0": [setup["images"] / "c0_0000.nii.gz"]}
    dirs = demo.write_members(setup["model"], "single", cases, tmp_path / "m", "cpu", False)
    assert [d.name for d in dirs] == ["fold_0_checkpoint_final"]
    assert (dirs[0] / "c0.npz").is_file() and (dirs[0] / "dataset.json").is_file()
    stamp = (dirs[0] / "c0.npz").stat().st_mtime_ns
    assert demo.write_members(setup["model"], "single", cases, tmp_path / "m", "cpu", False) == dirs
    assert (dirs[0] / "c0.npz").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("command", ["fit-temperature", "evaluate"])
def test_help_explains_the_model_options(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--members", "--model", "--images", "--ensemble", "--folds", "--checkpoint", "--device",
                "--no-tta", "--member-cache"):
        assert opt in text, opt
    assert "reused" in text and "fingerprint" in text


def test_member_outputs_of_another_image_are_refused(setup, tmp_path, capsys):
    """Cached member folders record the sha256 of the image each case came from: given as
    --members with another image of that case (same grid, other voxels), evaluate refuses."""
    dirs = _member_dirs(setup["cache"], setup["model"])
    images = tmp_path / "images"
    for case in FIT_CASES:
        arr, geo = read_image(setup["images"] / f"{case}_0000.nii.gz")
        write_image(images / f"{case}_0000.nii.gz", arr + (50 if case == "c0" else 0), geo)  # c0: another scan
    base = ["evaluate", "--members", *map(str, dirs), "--images", str(images), "--labels", str(setup["labels"]),
            "--cases", *FIT_CASES, "--calibration", str(setup["cal"])]
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "ev")]) == 2
    msg = _error(capsys)
    assert msg.startswith("error: case c0: member fold_0_checkpoint_final was computed from an image with sha256")
    assert "--allow-identity-mismatch" in msg and "c1" not in msg.split(".")[0]
    assert not (tmp_path / "ev").exists()
    assert main([*base, "--allow-identity-mismatch", "-o", str(tmp_path / "ev2")]) == 0


def test_calibration_of_another_ensemble_or_tta_is_refused(setup, tmp_path, capsys):
    """setup["cal"] was fitted on the deep ensemble (folds 0, 1) without TTA."""
    cal = json.loads(setup["cal"].read_text())
    assert cal["ensemble"] == {"kind": "deep", "members": ["fold_0_checkpoint_final", "fold_1_checkpoint_final"],
                               "tta": False}
    image = setup["images"] / "c2_0000.nii.gz"
    base = ["predict", "-i", str(image), "-m", str(setup["model"]), "--device", "cpu", "--calibration",
            str(setup["cal"])]
    capsys.readouterr()
    assert main([*base, "--ensemble", "single", "--no-tta", "-o", str(tmp_path / "single")]) == 2
    msg = _error(capsys)
    assert "fitted on another ensemble" in msg and "ensemble kind: fitted on deep, applied to single" in msg
    assert "2 member(s)" in msg and "1 (fold_0_checkpoint_final) now" in msg
    assert not (tmp_path / "single").exists()
    # TTA on with a calibration fitted without it: refused before any inference, naming the fix
    assert main([*base, "--tta", "-o", str(tmp_path / "tta")]) == 2
    msg = _error(capsys)
    assert "TTA (nnU-Net's mirroring): off when fitted, on now" in msg and "run with --no-tta" in msg
    assert not (tmp_path / "tta").exists()
