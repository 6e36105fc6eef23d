"""What the Apply button does (mrml.prediction), on a real MRML scene with real subprocesses:
Apply -> progress -> Cancel -> Apply -> results; the CT deleted during a run; the Apply check
re-evaluated when files change on disk."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from CalibUncertaintyLib.mrml import nodes
from CalibUncertaintyLib.mrml.prediction import ApplyCheck, ScenePrediction
from CalibUncertaintyLib.runner import RunState

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer

FAKE = textwrap.dedent('''
    import shutil, sys, time
    from pathlib import Path
    from CalibUncertaintyLib.progress import emit_progress
    src, out, delay, ct = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
    assert ct.is_file(), ct
    emit_progress("inference", 0.2, case="sample", member=1, n_members=2)
    print("member 1 done", flush=True)
    time.sleep(delay)
    shutil.copytree(src, out / "sample")
''')


@pytest.fixture()
def setup(sample_case_files, tmp_path):
    ct_path, case_dir = sample_case_files
    script = tmp_path / "fake_predict.py"
    script.write_text(FAKE)
    scene = slicer.vtkMRMLScene()
    ct = nodes.load_volume_file(scene, ct_path, name="sample")

    def prediction(delay, events=None, lines=None):
        cmd = [sys.executable, str(script), str(case_dir), "{output}", str(delay), "{input}"]
        return ScenePrediction(scene, ct, None, tmp_path / "results", temp_root=tmp_path, command=cmd,
                               on_progress=(events.append if events is not None else None),
                               on_log=(lambda line, stream: lines.append(line)) if lines is not None else None)

    return scene, ct, prediction, tmp_path / "results"


def _wait(pred, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not pred():
        time.sleep(0.05)
    return pred()


def test_apply_progress_cancel_apply_results(setup):
    scene, ct, prediction, results = setup
    lines = []
    n_before = scene.GetNumberOfNodes()
    first = prediction(60, lines=lines).start()
    assert first.exported_ct.is_file()
    assert _wait(lambda: first.poll() is RunState.RUNNING and "member 1 done" in lines)
    assert first.cancel() is RunState.CANCELLED
    first.cleanup()
    assert not first.export_dir.exists() and not (results / "sample").exists()
    assert scene.GetNumberOfNodes() == n_before          # cancel left the scene as it was

    second = prediction(0).start()
    assert _wait(lambda: second.poll().finished)
    assert second.run.state is RunState.SUCCEEDED, second.run.error
    case = second.load()
    second.cleanup()
    assert case.input_volume is ct and not case.owns_input and case.regions
    assert (results / "sample" / "regions.json").is_file()


def test_ct_deleted_during_the_run_loads_the_exported_copy(setup):
    scene, ct, prediction, _results = setup
    run = prediction(0.5).start()
    scene.RemoveNode(ct)
    assert run.input_deleted
    assert _wait(lambda: run.poll().finished) and run.run.state is RunState.SUCCEEDED
    case = run.load()
    run.cleanup()
    assert case.owns_input and case.input_volume.GetScene() is scene
    assert nodes.geometry_from_volume_node(case.input_volume).mismatch(case.geometry) is None


def test_load_before_success_is_a_clear_error(setup):
    from CalibUncertaintyLib.errors import InputError

    _scene, _ct, prediction, _ = setup
    run = prediction(30).start()
    try:
        with pytest.raises(InputError, match="not finished"):
            run.load()
    finally:
        run.cancel()
        run.cleanup()


def test_apply_check_follows_files_on_disk_and_the_scene(tmp_path):
    scene = slicer.vtkMRMLScene()
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    check = ApplyCheck()
    model = tmp_path / "model"
    model.mkdir()
    cal = tmp_path / "calibration.json"
    first = check.problems(scene, ct, model, "deep", "", cal, "auto", True)
    assert any("calibration file" in p for p in first) and any("model" in p.lower() for p in first)
    assert check.problems(scene, ct, model, "deep", "", cal, "auto", True) == first
    assert check.evaluations == 1                         # cached while nothing changed
    cal.write_text("{}")                                  # a file appears: no parameter changed
    second = check.problems(scene, ct, model, "deep", "", cal, "auto", True)
    assert check.evaluations == 2 and not any("calibration file" in p for p in second)
    (model / "fold_0").mkdir()                            # the model folder changes on disk
    time.sleep(0.01)
    check.problems(scene, ct, model, "deep", "", cal, "auto", True)
    assert check.evaluations == 3
    scene.RemoveNode(ct)                                  # the CT deleted by the user
    assert check.problems(scene, ct, model, "deep", "", cal, "auto", True)[0] == "Select the input CT volume."
    assert any("folds must be" in p for p in check.problems(scene, None, model, "deep", "x", cal, "auto", True))
