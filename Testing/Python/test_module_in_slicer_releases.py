"""``CalibUncertainty/CalibUncertainty.py`` under Slicer's own scripted-module code of Slicer 5.10.0,
5.12.3 and main (``../shared/slicer-python``), on this Python's slicer-core wheel.

Each release runs in a process of its own (``slicer_release_checks.py``; the ``slicer`` namespace,
SampleData's registry and the i18n cache are process-wide), all three at once. What is real and
what is a test double is said in ``slicer_release_harness.py``. Per release: the module object
and its metadata; the parameter node through the real ``parameterNodeWrapper`` (validators,
node references); the sample registered with that release's SampleData at ``startupCompleted()``
with SHA-256 checksums, downloaded and verified by SampleData itself (a mismatching file is
refused); Apply's ``startPrediction`` through the out-of-process runner on a tiny real nnU-Net
model (random weights, ``tiny_nnunet``; when this Python has no torch - the slicer-core matrix
venvs - a sample case folder is loaded instead), its outputs loaded step by step; the review saved
as .mrb, read into a fresh scene and brought back by ``restoreReview`` (also with the saved map
deleted: no foreign threshold); the module's self-test (one release) or its test class.

Not exercised here (no Qt): the widget class, the .ui file, ctk widgets, the layout manager
building slice widgets, pip dialogs, PythonSlicer; .github/workflows/slicer-selftest.yml runs
those in the real application.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = Path(os.environ.get("CALIBU_SHARED", REPO.parent / "shared"))  # as conftest.py finds it
SLICER_PYTHON = SHARED / "slicer-python"
RELEASES = {"v5.10.0": "5.10", "v5.12.3": "5.12", "main-583e9b3": "5.13"}
#: the release whose run also runs the whole self-test (its body is the library's, covered by
#: test_mrml_selftest.py; the other releases exercise the test class only)
SELF_TEST = "v5.12.3"
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("nnunetv2") is not None


def _sample_dir(root: Path, case_dir: Path) -> Path:
    """Stand-ins of the two release assets (a small CT; a zip with a tiny nnU-Net model folder and
    its calibration), SHA256SUMS, and a case folder for the runs without torch."""
    from CalibUncertaintyLib import sample_data
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.calibration.fingerprint import fingerprint_model_folder

    from tiny_nnunet import build_tiny_model_folder, tiny_dataset_json, tiny_plans, write_test_ct

    sample = root / "sample"
    sample.mkdir(parents=True)
    cts = sorted((SHARED / "data" / "openkbp").glob("*/imagesTr/*_0000.nii.gz"))
    ct = write_test_ct(sample / sample_data.CT_FILE, source_ct=cts[0] if cts else None, shape_zyx=(20, 40, 36))
    if HAVE_TORCH:
        model = build_tiny_model_folder(root / "model", folds=(0, 1))
    else:  # the folder layout only (SampleData download and unpacking; no prediction without torch)
        model = root / "model" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        for f in (0, 1):
            (model / f"fold_{f}").mkdir(parents=True)
            (model / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"no torch here")
        (model / "plans.json").write_text(json.dumps(tiny_plans()))
        (model / "dataset.json").write_text(json.dumps(tiny_dataset_json(3)))
    calibration = CalibrationFile(temperature=1.3, class_names=["background", "Organ", "Tumour"], n_cases=1,
                                  fingerprint=fingerprint_model_folder(model)).save(root / "calibration.json")
    zip_path = sample_data.write_model_zip(sample / sample_data.MODEL_ZIP, model, calibration, (0, 1), "test\n")
    sample_data.write_sums(sample, sample_data.SampleFiles(ct, zip_path))
    shutil.copytree(case_dir, sample / "case")
    return sample


@pytest.fixture(scope="module")
def release_runs(tmp_path_factory, sample_case_files):
    if not SLICER_PYTHON.is_dir():
        pytest.skip(f"Slicer's scripted-module Python is not at {SLICER_PYTHON} (../shared beside the clone)")
    root = tmp_path_factory.mktemp("slicer_releases")
    sample = _sample_dir(root, sample_case_files[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for release in RELEASES:
        work = root / release
        work.mkdir()
        cmd = [sys.executable, str(HERE / "slicer_release_checks.py"), str(SLICER_PYTHON / release), str(work),
               str(sample)] + (["--predict"] if HAVE_TORCH else []) + (["--self-test"] if release == SELF_TEST else [])
        log = open(work / "log.txt", "w")
        procs[release] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work)), log)
    yield procs
    for p, log in procs.values():
        if p.poll() is None:
            p.kill()
        log.close()


def _result(procs, release):
    proc, log = procs[release]
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log.flush()
    text = Path(log.name).read_text(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("CHECKS ")), None)
    assert line is not None, f"{release}: no result line; output:\n{text[-4000:]}"
    results = json.loads(line[len("CHECKS "):])["results"]
    failed = {k: v for k, v in results.items() if not v["ok"]}
    assert not failed and proc.returncode == 0, f"{release}: " + "\n".join(
        f"{k}: {v['error']}\n{v['traceback']}" for k, v in failed.items()) + text[-3000:]
    return results


@pytest.mark.parametrize("release", list(RELEASES))
def test_module_runs_under_slicers_own_scripted_module_code(release_runs, release):
    r = _result(release_runs, release)
    assert r["import"]["slicer"] == RELEASES[release]
    assert len(r["parameter_node"]["refused"]) == 7            # every invalid value refused by the wrapper
    assert "checksum" in r["sample_data"]["refused"]                # the mismatching download was refused
    if HAVE_TORCH:
        assert r["prediction"]["device"].startswith("CPU") and r["prediction"]["progress_events"] > 3
    assert r["review_and_restore"]["map"] == "entropy" and r["review_and_restore"]["fallback"] != "entropy"
    assert {"import", "parameter_node", "sample_data", "review_and_restore",
            "self_test" if release == SELF_TEST else "test_class"} <= set(r)


def test_the_self_test_adds_no_view_node_to_the_application_scene(release_runs):
    # pictures are drawn by slice_views.SliceViews in a scene of its own (issue 16 item 7)
    r = _result(release_runs, SELF_TEST)
    assert r["self_test"]["view_nodes_added"] == 0, r["self_test"]["views"]
