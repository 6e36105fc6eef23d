"""What the Slicer module does in the application, through its Qt-free parts on a real MRML scene
(issue 16 items 3, 4 and 7): a second Apply never changes what the first case shows; a restored
review never puts one map's threshold on another; Cancel returns at once; the Apply check and the
case record are not touched by slider ticks; slider steps follow the map's range; the device is
reported by the run, not found by importing torch in Slicer's process; a torch replaced while
Slicer runs asks for a restart; the loader steps and can be cancelled with nothing left behind.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.runner import OUTPUT_PLACEHOLDER, PredictionRun, RunState

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer

from CalibUncertaintyLib.mrml import nodes  # noqa: E402
from CalibUncertaintyLib.mrml.case_loader import CaseLoader  # noqa: E402
from CalibUncertaintyLib.mrml.prediction import ApplyCheck, ScenePrediction, unique_case_name  # noqa: E402
from CalibUncertaintyLib.mrml.review import ReviewController, slider_steps  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "CalibUncertainty" / "CalibUncertainty.py"

# A stand-in for `predict`: writes the sample case folder under the exported CT's name (as predict
# names a case), with every class probability scaled by a factor that tells the runs apart.
FAKE = textwrap.dedent('''
    import sys
    from pathlib import Path
    import numpy as np
    from CalibUncertaintyLib.io.images import read_image, write_image
    import shutil
    src, out, factor, ct = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
    case = ct.name[:-len(".nii.gz")]
    dest = out / case
    shutil.copytree(src, dest)
    for p in dest.glob("prob_*.nii.gz"):
        a, g = read_image(p)
        write_image(p, (a * factor).astype(np.float32), g)
''')


@pytest.fixture()
def scene_and_ct(sample_case_files):
    ct_path, case_dir = sample_case_files
    scene = slicer.vtkMRMLScene()
    ct = nodes.load_volume_file(scene, ct_path, name="sample")
    return scene, ct, case_dir


def _run(scene, ct, case_dir, out, factor, tmp_path):
    script = tmp_path / "fake_predict.py"
    script.write_text(FAKE)
    cmd = [sys.executable, str(script), str(case_dir), "{output}", str(factor), "{input}"]
    pred = ScenePrediction(scene, ct, None, out, temp_root=tmp_path, command=cmd).start()
    assert pred.run.wait(timeout=60) is RunState.SUCCEEDED, pred.run.error
    return pred


# ------------------------------------------------------------------------------- item 3
def test_a_second_apply_never_changes_what_the_first_case_shows(scene_and_ct, tmp_path):
    """Two Applies on the same CT into the same output folder: the first case, still in the scene,
    must read its own probability files when a class is first shown (it read the second run's,
    under its own name, when both runs shared one case folder)."""
    scene, ct, case_dir = scene_and_ct
    out = tmp_path / "results"
    first = _run(scene, ct, case_dir, out, 0.5, tmp_path)
    case1 = first.load()
    first.cleanup()
    from CalibUncertaintyLib.io.images import read_image

    own = read_image(case1.probability_files["Organ"])[0]
    second = _run(scene, ct, case_dir, out, 1.0, tmp_path)
    case2 = second.load()
    second.cleanup()
    shown = slicer.util.arrayFromVolume(case1.layer_node(scene, "prob_Organ"))
    theirs = read_image(case2.probability_files["Organ"])[0]
    assert np.array_equal(shown, own), f"max |dp| = {np.abs(shown - own).max():.3f}"  # the first run's own values ...
    assert not np.array_equal(shown, theirs)        # ... not the second run's
    assert case1.case_dir != case2.case_dir and case1.case_dir.is_dir() and case2.case_dir.is_dir()
    assert (case1.case_dir.name, case2.case_dir.name) == ("sample", "sample_2")
    assert unique_case_name(out, "sample") == "sample_3" and unique_case_name(out, "other") == "other"


def test_a_probability_file_replaced_behind_the_case_is_refused(scene_and_ct, tmp_path):
    """Defence in depth: a case whose folder another command rewrote refuses to show the new
    file under its name (its size and time are recorded at loading, and in a saved scene)."""
    from CalibUncertaintyLib.io.images import read_image, write_image
    from CalibUncertaintyLib.mrml.case_record import restore_case_nodes

    scene, ct, case_dir = scene_and_ct
    folder = tmp_path / "case"
    shutil.copytree(case_dir, folder)
    case = nodes.load_case_outputs(scene, folder, input_volume_node=ct)
    path = case.probability_files["Nodule"]
    a, g = read_image(path)
    time.sleep(0.01)
    write_image(path, (a * 0.25).astype(np.float32), g)
    for c in (case, restore_case_nodes(scene)):
        with pytest.raises(InputError, match="was replaced after the case was loaded"):
            c.layer_node(scene, "prob_Nodule")
    assert c.layer_node(scene, "prob_Organ").GetScene() is scene  # untouched files still load


# ------------------------------------------------------------------------------- item 4
def test_restore_never_puts_the_saved_maps_threshold_on_another_map(scene_and_ct):
    scene, ct, case_dir = scene_and_ct
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=ct)
    ctl = ReviewController(scene, case)
    ctl.set_foreground_map("entropy")
    ctl.set_threshold(0.05, 0.5)
    scene.RemoveNode(case.maps["entropy"])          # the saved map's node is deleted
    restored = ReviewController.restore(scene, map_name="entropy", threshold=(0.05, 0.5))
    fallback = restored.map_names()[0]
    assert restored.current_map == fallback != "entropy"
    assert restored.threshold == pytest.approx(case.default_shown[fallback])
    disp = restored.layer_node(fallback).GetDisplayNode()
    assert (disp.GetLowerThreshold(), disp.GetUpperThreshold()) == pytest.approx(case.default_shown[fallback])
    # the fallback map's own recorded range wins over its default
    restored.set_threshold(*[v * 0.9 for v in case.default_shown[fallback]])
    again = ReviewController.restore(scene, map_name="entropy", threshold=(0.05, 0.5))
    assert again.threshold == pytest.approx([v * 0.9 for v in case.default_shown[fallback]])


# ------------------------------------------------------------------------------- item 7: cancel
STUBBORN = textwrap.dedent('''
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); time.sleep(120)"])
    print("ready", flush=True)
    time.sleep(120)
''')


@pytest.mark.skipif(sys.platform == "win32", reason="a SIGTERM-ignoring tree is a POSIX case; Windows uses taskkill /F")
def test_cancel_returns_at_once_and_poll_ends_the_tree(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    lines = []
    run = PredictionRun([sys.executable, str(script), OUTPUT_PLACEHOLDER], tmp_path / "out",
                        on_log=lambda line, stream: lines.append(line)).start()
    end = time.monotonic() + 20
    while "ready" not in lines and time.monotonic() < end:
        run.poll()
        time.sleep(0.02)
    t0 = time.perf_counter()
    assert run.cancel(timeout=1.0, wait=False) is RunState.CANCELLING
    assert time.perf_counter() - t0 < 0.2           # the GUI thread does not wait for the tree
    assert not run.poll().finished
    end = time.monotonic() + 15
    while run.poll() is RunState.CANCELLING and time.monotonic() < end:
        time.sleep(0.02)
    assert run.state is RunState.CANCELLED          # SIGKILL after the timeout ended the tree
    assert not list((tmp_path / "out").glob(".staging-*"))
    assert lines[-1].startswith("cancelled")


# ------------------------------------------------------------------------------- item 7: slider
def test_slider_ticks_preview_without_recording(scene_and_ct):
    from CalibUncertaintyLib.mrml.case_record import REVIEW_ATTRIBUTE

    scene, ct, case_dir = scene_and_ct
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=ct)
    ctl = ReviewController(scene, case)
    ctl.set_foreground_map("entropy")
    events = []
    ctl.add_listener(lambda e, v: events.append(e))
    hub = case.segmentation
    recorded = hub.GetAttribute(REVIEW_ATTRIBUTE)
    modified = []
    tag = hub.AddObserver("ModifiedEvent", lambda *a: modified.append(1))
    disp = case.maps["entropy"].GetDisplayNode()
    for k in range(50):                                  # a drag: 50 ticks
        ctl.preview_threshold(0.01 * k, 1.0)
        assert disp.GetLowerThreshold() == pytest.approx(0.01 * k)
    assert hub.GetAttribute(REVIEW_ATTRIBUTE) == recorded and not modified and not events
    ctl.set_threshold(0.3, 1.0)                          # the slider rests: recorded once
    hub.RemoveObserver(tag)
    assert json.loads(hub.GetAttribute(REVIEW_ATTRIBUTE))["thresholds"]["entropy"] == [0.3, 1.0]
    assert events == ["threshold"] and len(modified) >= 1


def test_the_apply_check_does_not_list_the_model_folder_on_every_call(tmp_path):
    scene = slicer.vtkMRMLScene()
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    now = [0.0]
    check = ApplyCheck(recheck_s=1.0, clock=lambda: now[0])
    model = tmp_path / "model"
    model.mkdir()
    args = (scene, ct, model, "deep", "", None, "auto", True)
    first = check.problems(*args)
    for _ in range(100):                                 # e.g. 100 parameter events of a drag
        assert check.problems(*args) == first
    assert (check.stamp_reads, check.evaluations) == (1, 1)
    (model / "fold_0").mkdir()
    now[0] = 1.5                                         # a second later the disk is looked at again
    check.problems(*args)
    assert (check.stamp_reads, check.evaluations) == (2, 2)
    (model / "fold_1").mkdir()
    check.problems(*args, force=True)                    # the Apply click always looks
    assert check.evaluations == 3


@pytest.mark.parametrize("lo,hi,decimals,step", [(0.0, 1.0, 3, 1e-3), (0.0, 0.002, 5, 1e-5),
                                                  (0.1, 0.15, 4, 1e-4), (0.0, 40.0, 1, 0.1), (-1000, 3000, 0, 10.0)])
def test_slider_steps_follow_the_range(lo, hi, decimals, step):
    d, s = slider_steps(lo, hi)
    assert (d, s) == (decimals, pytest.approx(step))
    assert (hi - lo) / s >= 200 and round(s, d) == pytest.approx(s)  # representable at those decimals


def test_the_module_wires_the_slider_and_apply_as_tested_here():
    """The widget (it needs Qt, so it is read, not run): slider ticks preview, a single-shot
    timer records; decimals set before the step; the Apply check re-run only for Apply's inputs;
    Cancel does not wait; no torch in Slicer's process; the loader stepped by a timer."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    widget = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "CalibUncertaintyWidget")
    fn = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "preview_threshold(" in fn["onThresholdChanged"] and "set_threshold" not in fn["onThresholdChanged"]
    assert "_thresholdTimer.start()" in fn["onThresholdChanged"]
    assert "set_threshold(" in fn["onThresholdCommit"] and "NodeModify" in fn["onThresholdCommit"]
    assert "setSingleShot(True)" in fn["setup"] and "onThresholdCommit" in fn["onSceneStartSave"]
    body = fn["onMapChanged"]
    assert "slider_steps(" in body and body.index(".decimals = ") < body.index(".singleStep = ")
    assert "apply_inputs(" in fn["onParameterNodeModified"]
    assert "cancel(wait=False)" in fn["onApplyButton"] and "cancel()" not in fn["onApplyButton"]
    assert ".step()" in fn["onLoadStep"] and "_loadTimer.start()" in fn["_startLoading"]
    assert "torch_restart_needed()" in fn["_ensureDependencies"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "describe_compute_device" not in source and "import torch" not in source


# ------------------------------------------------------------------------------- item 7: device, torch
def test_the_run_reports_its_device(monkeypatch, capsys):
    """The run (its own process) reports the device it chose as a progress event the module shows."""
    pytest.importorskip("torch", reason="the device is chosen by torch (not in the slicer-core wheel venvs)")
    from CalibUncertaintyLib.device import resolve_device
    from CalibUncertaintyLib.progress import ENV_VAR, parse_progress_line
    from CalibUncertaintyLib.runner import describe_progress

    monkeypatch.setenv(ENV_VAR, "1")                     # as the runner sets it for its child
    assert str(resolve_device("cpu")) == "cpu"
    events = [e for e in map(parse_progress_line, capsys.readouterr().err.splitlines()) if e]
    assert [e["stage"] for e in events] == ["device"] and events[0]["message"].startswith("CPU (PyTorch ")
    assert describe_progress(events[0])[1].startswith("device - CPU")


def test_a_torch_replaced_while_slicer_runs_asks_for_a_restart(monkeypatch):
    from CalibUncertaintyLib import dependencies
    from CalibUncertaintyLib.slicer_install import InstallPlan, SlicerInstaller

    installed = dependencies.installed_version("torch")
    if installed is None:
        pytest.skip("torch is not installed here (a slicer-core wheel venv): nothing can replace it")
    # the torch module this process imported, as a stand-in object (only its version is read)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.9.1"))
    msg = dependencies.torch_restart_needed()
    assert msg and "Restart Slicer" in msg and "2.9.1" in msg and installed in msg

    class Logic:                                         # the PyTorch extension's installTorch
        def installTorch(self, askConfirmation, torchVersionRequirement):
            return types.SimpleNamespace(__version__=installed)

    installer = SlicerInstaller(util=None, torch_logic=Logic())
    installer.install(InstallPlan(torch=True))
    assert installer.restart_message == msg
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__=installed))
    assert dependencies.torch_restart_needed() is None
    monkeypatch.delitem(sys.modules, "torch")
    assert dependencies.torch_restart_needed() is None  # torch never imported here: nothing to restart


# ------------------------------------------------------------------------------- item 7: loading
def test_the_loader_steps_and_cancel_leaves_nothing(scene_and_ct):
    scene, ct, case_dir = scene_and_ct
    n_before = scene.GetNumberOfNodes()
    loader = CaseLoader(scene, case_dir, ct, step_seconds=0.0)   # one unit per step
    fractions = []
    while not loader.done and scene.GetNumberOfNodes() < n_before + 8:
        fractions.append(loader.step())
    assert not loader.done and scene.GetNumberOfNodes() > n_before
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1 and loader.progress[1]
    loader.cancel()
    assert loader.cancelled and scene.GetNumberOfNodes() == n_before
    full = CaseLoader(scene, case_dir, ct, step_seconds=0.0)
    while not full.done:
        full.step()
    assert full.steps > 50 and full.result.segmentation.GetScene() is scene
    one = nodes.load_case_outputs(slicer.vtkMRMLScene(), case_dir)
    assert full.result.value_ranges == one.value_ranges and full.result.default_shown == one.default_shown
