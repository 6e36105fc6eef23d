"""Bad input reaches the user as one clear line (exit code 2) and never destroys earlier output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image, write_image
from CalibUncertaintyLib.io.nnunet_outputs import load_member_probs, write_member_probs
from CalibUncertaintyLib.synthetic.members import make_member_folders

GEOM = Geometry((16, 20, 24), (1.5, 1.25, 2.0), (-12.0, 30.5, 7.0))
CASES = ("c0", "c1", "c2")


def _labels(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(GEOM.shape_zyx)
    lab = np.zeros(GEOM.shape_zyx, np.uint8)
    cz, cy, cx = 8 + rng.integers(-2, 3), 10 + rng.integers(-2, 3), 8 + rng.integers(-2, 3)
    lab[((z - cz) * 2.0) ** 2 + ((y - cy) * 1.25) ** 2 + ((x - cx) * 1.5) ** 2 < 36] = 1
    lab[5:11, 4:9, 15:20] = 2
    return lab


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    raw = root / "Dataset999_Tiny"
    for i, case in enumerate(CASES + ("empty",)):
        lab = _labels(i) if case != "empty" else np.zeros(GEOM.shape_zyx, np.uint8)
        write_image(raw / "labelsTr" / f"{case}.nii.gz", lab, GEOM)
        ct = np.where(lab > 0, 40, -100).astype(np.int16)
        write_image(raw / "imagesTr" / f"{case}_0000.nii.gz", ct, GEOM)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "box": 2},
        "numTraining": 4, "file_ending": ".nii.gz"}))
    members = make_member_folders(raw / "labelsTr", root / "model_a", n_members=3, seed=0)
    other = make_member_folders(raw / "labelsTr", root / "model_b", n_members=3, seed=1)
    cal = root / "calibration.json"
    assert main(["fit-temperature", "--members", *map(str, members), "--labels", str(raw / "labelsTr"),
                 "--cases", *CASES, "-o", str(cal)]) == 0
    return {"root": root, "raw": raw, "members": members, "other": other, "cal": cal}


def _copy_members(data, tmp_path):
    dst = []
    for d in data["members"]:
        shutil.copytree(d, tmp_path / "m" / d.name)
        dst.append(tmp_path / "m" / d.name)
    return dst


def _maps(members, data, out, *extra):
    return main(["maps", "--members", *map(str, members), "--images", str(data["raw"] / "imagesTr"),
                 "-o", str(out), *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_spacing_and_shape_mismatch_between_member_and_image(data, tmp_path, capsys):
    members = _copy_members(data, tmp_path)
    probs, _ = load_member_probs(members[1], "c1")
    wrong = Geometry(GEOM.shape_zyx, (1.5, 1.25, 2.5), GEOM.origin)
    write_member_probs(members[1], "c1", probs, wrong)
    assert _maps(members, data, tmp_path / "out") == 2
    msg = _error(capsys)
    assert msg.startswith("error: member member_1 case c1: spacing (x, y, z) mm (1.5, 1.25, 2.5) != image "
                          "spacing (1.5, 1.25, 2)")
    small = Geometry((16, 20, 23), GEOM.spacing, GEOM.origin)
    for m in members:  # every member on a cropped grid: the members agree, the image does not
        write_member_probs(m, "c1", probs[..., :23], small)
    assert _maps(members, data, tmp_path / "out") == 2
    assert "member member_0 case c1: shape (z, y, x) (16, 20, 23) != image shape (16, 20, 24)" in _error(capsys)
    assert not (tmp_path / "out").exists()  # checked before any case was written


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p * 0.5, "do not sum to one over the 3 classes"),
    (lambda p: np.where(np.indices(p.shape)[1] == 3, np.nan, p), "non-finite values"),
])
def test_bad_probabilities(data, tmp_path, capsys, corrupt, message):
    members = _copy_members(data, tmp_path)
    probs, _ = load_member_probs(members[2], "c0")
    np.savez_compressed(members[2] / "c0.npz", probabilities=corrupt(probs).astype(np.float32))
    assert _maps(members, data, tmp_path / "out", "--cases", "c0") == 2
    msg = _error(capsys)
    assert msg.startswith("error: member member_2 case c0 (c0.npz)") and message in msg


def test_one_member_works_and_says_so(data, tmp_path, capsys):
    assert _maps(data["members"][:1], data, tmp_path / "out", "--cases", "c0") == 0
    assert "note: one member (member_0): mutual information and EPKL are zero" in capsys.readouterr().out
    mi, _ = read_image(tmp_path / "out" / "c0" / "map_mutual_information.nii.gz")
    assert not mi.any()
    summary = json.loads((tmp_path / "out" / "c0" / "summary.json").read_text())
    assert summary["n_members"] == 1 and "EPKL are zero" in summary["notes"][0]


def test_empty_labels(data, tmp_path, capsys):
    """Fitting on a case with an empty label and empty prediction is refused with a clear message;
    evaluating such a case works and states that its ROI metrics are undefined."""
    members, raw = list(map(str, data["members"])), data["raw"]
    assert main(["fit-temperature", "--members", *members, "--labels", str(raw / "labelsTr"), "--cases", "empty",
                 "-o", str(tmp_path / "cal.json")]) == 2
    assert "every calibration label is background only" in _error(capsys)  # refused before any member is read
    assert not (tmp_path / "cal.json").exists()
    assert main(["evaluate", "--members", *members, "--images", str(raw / "imagesTr"), "--labels",
                 str(raw / "labelsTr"), "--calibration", str(data["cal"]), "--cases", "c0", "empty",
                 "-o", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    empty = ev["per_case"][1]
    assert empty["metrics"]["before"]["roi"] is None and empty["metrics"]["after"]["whole_image"] is not None
    assert any("empty reference label" in n for n in empty["notes"]) and empty["quality"] is None
    assert "c0" in ev["held_out_overlap"]  # c0 was a fitting case: said in the notes
    assert any("not held-out" in n for n in ev["notes"])


def test_calibration_from_another_model(data, tmp_path, capsys):
    other = list(map(str, data["other"]))
    assert _maps(other, data, tmp_path / "out", "--calibration", str(data["cal"])) == 2
    msg = _error(capsys)
    assert msg.startswith("error: calibration file calibration.json was fitted on model") and "refit" in msg
    raw = data["raw"]
    assert main(["evaluate", "--members", *other, "--images", str(raw / "imagesTr"), "--labels",
                 str(raw / "labelsTr"), "--calibration", str(data["cal"]), "-o", str(tmp_path / "ev")]) == 2
    assert "plans.json/dataset.json differ" in _error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ev").exists()


def test_missing_files(data, tmp_path, capsys):
    members = _copy_members(data, tmp_path)
    (members[0] / "c2.pkl").unlink()
    assert _maps(members, data, tmp_path / "out") == 2
    assert "error: member member_0 case c2: properties file missing" in _error(capsys)
    (members[1] / "c2.npz").unlink()
    assert _maps(members, data, tmp_path / "out") == 2
    assert "case c2 is missing from member folder(s) member_1" in _error(capsys)
    assert _maps(members, data, tmp_path / "out", "--cases", "c0", "c9") == 2
    assert "case c9: no c9.npz in member folder(s) member_0, member_1, member_2" in _error(capsys)
    images = tmp_path / "images"
    shutil.copytree(data["raw"] / "imagesTr", images)
    (images / "c1_0000.nii.gz").unlink()
    assert main(["maps", "--members", *map(str, members), "--images", str(images), "--cases", "c1",
                 "-o", str(tmp_path / "out")]) == 2
    assert "case c1: no image c1_0000.nii.gz" in _error(capsys)
    shutil.copy(images / "c0_0000.nii.gz", images / "c0_0001.nii.gz")
    assert main(["maps", "--members", *map(str, members), "--images", str(images), "--cases", "c0",
                 "-o", str(tmp_path / "out")]) == 2
    assert "expected 1 channel(s) (dataset.json)" in _error(capsys)
    with pytest.raises(SystemExit) as e:  # argparse checks folders and values before any work
        main(["maps", "--members", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert e.value.code == 2 and "folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["maps", "--members", *map(str, members), "--dae-sigma-mm", "-1", "-o", str(tmp_path / "out")])
    assert e.value.code == 2 and "expected a distance in mm > 0" in capsys.readouterr().err


def test_unknown_probability_class_is_refused_before_any_case(data, tmp_path, capsys):
    assert _maps(data["members"], data, tmp_path / "out", "--probabilities", "Liver") == 2
    assert "error: --probabilities: no foreground class 'Liver' to write probabilities for" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_failing_rerun_keeps_existing_outputs(data, tmp_path, capsys):
    members = _copy_members(data, tmp_path)
    out = tmp_path / "out"
    assert _maps(members, data, out, "--cases", "c0", "c1") == 0
    old = {p.name: p.read_bytes() for p in (out / "c1").iterdir()}
    old_c0 = (out / "c0" / "summary.json").read_text()
    probs, _ = load_member_probs(members[2], "c1")
    probs[:, 2, 2, 2] = np.nan
    np.savez_compressed(members[2] / "c1.npz", probabilities=probs)
    assert _maps(members, data, out, "--cases", "c0", "c1", "--calibration", str(data["cal"])) == 2
    assert "non-finite" in _error(capsys)
    assert {p.name: p.read_bytes() for p in (out / "c1").iterdir()} == old  # untouched
    assert json.loads((out / "c0" / "summary.json").read_text())["calibration"] is not None  # c0 redone
    assert old_c0 != (out / "c0" / "summary.json").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["c0", "c1", "summary.json"]  # no partial folder


def test_debug_shows_the_traceback(data, tmp_path, capsys):
    assert main(["--debug", "maps", "--members", *map(str, data["other"]), "--calibration", str(data["cal"]),
                 "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "CalibrationMismatchError" in err
    assert main(["maps", "--debug", "--members", *map(str, data["other"]), "--calibration", str(data["cal"]),
                 "-o", str(tmp_path / "o")]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("extra, key", [(["--ensemble-mode", "per_member"], "per_member"),
                                        (["--method", "vector"], "vector"),
                                        (["--method", "local_temperature", "--local-open-bin", "identity"],
                                         "local_temperature"),
                                        ([], "local_temperature"),  # the default: open bin fitted beyond the ROI
                                        (["--method", "class_temperature"], "class_temperature")])
def test_other_calibration_modes_run_end_to_end(data, tmp_path, extra, key):
    """Not bad input: the calibration modes (the default one too) go through fit, maps and evaluate."""
    members, raw = list(map(str, data["members"])), data["raw"]
    cal = tmp_path / "cal.json"
    assert main(["fit-temperature", "--members", *members, "--labels", str(raw / "labelsTr"), "--cases", *CASES,
                 "-o", str(cal), *extra]) == 0
    doc = json.loads(cal.read_text())
    assert (doc["ensemble_mode"] == "per_member") if key == "per_member" else (doc["method"] == key)
    if key == "per_member":  # the local default is pool-then-calibrate only: per_member falls back to one T
        assert doc["method"] == "temperature"
    if key.endswith("_temperature"):  # the table, the global T and the cross-validated NLL are stored
        assert doc["local"]["kind"] == key and doc["temperature"] > 0
        assert set(doc["local"]["cv_nll"]) >= {"global", "class_temperature", "local_temperature"}
    if key == "local_temperature":  # the open last bin (beyond the ROI): fitted there by default, or T = 1
        fitted = "identity" not in extra
        assert doc["local"]["open_bin"] == "identity"
        assert doc["local"]["open_bin_source"] == ("fitted on voxels beyond the ROI" if fitted else "rule identity")
        assert (doc["local"].get("n_beyond_voxels", 0) > 0) == fitted
        beyond_counts = [row[-1] for row in doc["local"]["counts"]]
        assert (sum(beyond_counts) > 0) == fitted
        if not fitted:
            assert all(t == 1.0 for t, n in zip((r[-1] for r in doc["local"]["temperatures"]), beyond_counts))
    assert _maps(members, data, tmp_path / "out", "--cases", "c1", "--calibration", str(cal)) == 0
    summary = json.loads((tmp_path / "out" / "c1" / "summary.json").read_text())
    assert summary["calibration"]["method"] == doc["method"] and summary["ensemble_mode"] == doc["ensemble_mode"]
    assert main(["evaluate", "--members", *members, "--images", str(raw / "imagesTr"), "--labels",
                 str(raw / "labelsTr"), "--calibration", str(cal), "--cases", "c1", "-o", str(tmp_path / "ev")]) == 0
    rec = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["per_case"][0]
    assert rec["metrics"]["after"]["roi"]["nll"] != rec["metrics"]["before"]["roi"]["nll"]
    # each stage on its own prediction's ROI, and both on the uncalibrated prediction's ROI
    m = rec["metrics"]
    assert m["before"]["roi"]["n_voxels"] == rec["roi"]["n_voxels_before"]
    assert m["after"]["roi"]["n_voxels"] == rec["roi"]["n_voxels"]
    assert m["before"]["shared_roi"] == m["before"]["roi"]
    assert m["after"]["shared_roi"]["n_voxels"] == rec["roi"]["n_voxels_before"]
    if key.endswith("_temperature"):
        assert rec["segmentation_unchanged"]
        assert rec["roi"]["n_voxels"] == rec["roi"]["n_voxels_before"]


def test_local_open_bin_needs_the_local_method(data, tmp_path, capsys):
    cal = tmp_path / "cal.json"
    assert main(["fit-temperature", "--members", *map(str, data["members"]), "--labels",
                 str(data["raw"] / "labelsTr"), "--cases", *CASES, "-o", str(cal), "--method", "temperature",
                 "--local-open-bin", "fitted"]) == 2
    assert "--local-open-bin applies to --method local_temperature only" in _error(capsys)
    assert not cal.exists()


def test_command_modules_not_written_yet_are_skipped_but_broken_ones_are_not(tmp_path, monkeypatch):
    import CalibUncertaintyLib.cli as cli_pkg
    from CalibUncertaintyLib.cli import main as main_mod

    monkeypatch.setattr(main_mod, "COMMANDS", main_mod.COMMANDS + ("not_written_yet",))
    parser = main_mod.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"fit-temperature", "maps", "evaluate"} <= set(sub.choices)
    (tmp_path / "broken_cmd.py").write_text("import a_dependency_that_is_not_installed_xyz\n")
    monkeypatch.setattr(cli_pkg, "__path__", list(cli_pkg.__path__) + [str(tmp_path)])
    monkeypatch.setattr(main_mod, "COMMANDS", ("maps", "broken_cmd"))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed_xyz"):
        main_mod.build_parser()


# --- calibration files that cannot be right (issue 12, item 6) -----------------------------------
def _edited_calibration(data, tmp_path, **changes):
    doc = json.loads(data["cal"].read_text())
    doc.update(changes)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return path


def test_temperature_no_fit_can_produce_is_refused(data, tmp_path, capsys):
    for t in (1e-30, 1e6):
        cal = _edited_calibration(data, tmp_path, temperature=t)
        assert _maps(data["members"], data, tmp_path / "out", "--calibration", str(cal)) == 2
        msg = _error(capsys)
        assert msg.startswith("error: calibration file") and f"temperature {t:.4g} is outside [0.05, 20]" in msg
        assert not (tmp_path / "out").exists()


def test_calibration_fitted_on_empty_labels(data, tmp_path, capsys):
    """Predictions with foreground, labels all background: refused at fit time (before: a warning
    and a file with a large T), and an old file that records it is refused when applied."""
    labels = tmp_path / "labels"
    for case in CASES:
        write_image(labels / f"{case}.nii.gz", np.zeros(GEOM.shape_zyx, np.uint8), GEOM)
    assert main(["fit-temperature", "--members", *map(str, data["members"]), "--labels", str(labels),
                 "--cases", *CASES, "-o", str(tmp_path / "cal.json")]) == 2
    assert "every calibration label is background only (c0, c1, c2)" in _error(capsys)
    assert not (tmp_path / "cal.json").exists()
    assert json.loads(data["cal"].read_text())["label_foreground_voxels"] > 0
    cal = _edited_calibration(data, tmp_path, label_foreground_voxels=0)
    assert _maps(data["members"], data, tmp_path / "out", "--calibration", str(cal)) == 2
    assert "all background" in _error(capsys)


def test_calibration_of_other_members_is_refused(data, tmp_path, capsys):
    assert json.loads(data["cal"].read_text())["ensemble"] == {
        "kind": None, "members": ["member_0", "member_1", "member_2"], "tta": None}
    assert _maps(data["members"][:2], data, tmp_path / "out", "--calibration", str(data["cal"])) == 2
    msg = _error(capsys)
    assert "fitted on another ensemble" in msg and "3 member(s) (member_0, member_1, member_2) when fitted, 2" in msg


# --- one member: disagreement maps are not applicable (issue 12, item 7) -------------------------
def test_one_member_disagreement_maps_are_not_applicable(data, tmp_path):
    one = data["members"][:1]
    cal = tmp_path / "cal1.json"
    raw = data["raw"]
    assert main(["fit-temperature", "--members", *map(str, one), "--labels", str(raw / "labelsTr"),
                 "--cases", *CASES, "-o", str(cal)]) == 0
    assert main(["evaluate", "--members", *map(str, one), "--images", str(raw / "imagesTr"), "--labels",
                 str(raw / "labelsTr"), "--calibration", str(cal), "--cases", "c0", "c1", "-o",
                 str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    for name in ("mutual_information", "epkl", "fg_variance", "vote_disagreement"):
        rec = ev["per_case"][0]["error_detection"][name]
        assert rec["applicable"] is False and "ueo" not in rec and "auroc" not in rec
    assert ev["per_case"][0]["error_detection"]["entropy"]["applicable"] is True
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| mutual_information | not applicable (one member) |" in report
    assert "| epkl | not applicable (one member) |" in report


# --- progress lines only when asked (issue 12, item 7) -------------------------------------------
def test_progress_lines_only_when_asked(data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CALIBU_PROGRESS", raising=False)
    assert _maps(data["members"], data, tmp_path / "quiet", "--cases", "c0") == 0
    assert "CALIBU_PROGRESS" not in capsys.readouterr().err
    assert _maps(data["members"], data, tmp_path / "flag", "--cases", "c0", "--progress") == 0
    assert "CALIBU_PROGRESS {" in capsys.readouterr().err
    import os
    assert "CALIBU_PROGRESS" not in os.environ  # the flag does not leak out of main()
    monkeypatch.setenv("CALIBU_PROGRESS", "1")
    assert _maps(data["members"], data, tmp_path / "env", "--cases", "c0") == 0
    assert "CALIBU_PROGRESS {" in capsys.readouterr().err
