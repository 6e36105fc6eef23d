"""CalibUncertaintyLib.runner against real subprocesses.

A small stand-in for ``calib-uncertainty predict`` (written to tmp_path) prints progress lines
with CalibUncertaintyLib.progress, spawns a child process (so there is a process *tree* to
cancel), writes a case folder into the output folder it is given, then succeeds, fails or hangs.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from CalibUncertaintyLib import runner
from CalibUncertaintyLib.device import CHOICES as DEVICE_CHOICES
from CalibUncertaintyLib.errors import InputError, ModelFolderError
from CalibUncertaintyLib.nnunet.model_folder import ENSEMBLE_KINDS
from CalibUncertaintyLib.runner import (OUTPUT_PLACEHOLDER, PredictionRun, PredictOptions, RunError, RunState,
                                        RunStateError, blocking_run)

REPO = Path(__file__).resolve().parents[2]

FAKE_PREDICT = textwrap.dedent('''
    import signal, subprocess, sys, time
    from pathlib import Path
    from CalibUncertaintyLib.progress import emit_progress

    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child_code = ("import signal, time\\n"
                  + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if mode == "stubborn" else "")
                  + "time.sleep(120)\\n")
    child = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"CHILD {child.pid}", flush=True)
    for m in (1, 2, 3):
        emit_progress("inference", 0.3 * m, case="case_a", member=m, n_members=3, message=f"fold_{m - 1}")
    (out / "case_a").mkdir(parents=True)
    (out / "case_a" / "summary.json").write_text('{"run": "new"}')
    if mode == "success":
        child.terminate(); child.wait()
        print("done", flush=True)
        sys.exit(0)
    if mode == "leave":  # exits 0 but leaves its child running
        print("done", flush=True)
        sys.exit(0)
    if mode == "indexed":  # a case folder and the folder index, as predict writes them
        (out / "case_a" / "summary.json").write_text('{"case": "case_a"}')
        (out / "summary.json").write_text('{"cases": [{"case": "case_a", "n_regions": 2}], "n_members": 3}')
        child.terminate(); child.wait()
        sys.exit(0)
    if mode == "empty":
        child.terminate(); child.wait()
        (out / "case_a" / "summary.json").unlink(); (out / "case_a").rmdir()
        sys.exit(0)
    if mode == "fail":
        print("loading fold 3", file=sys.stderr, flush=True)
        print("error: fold 3 has no checkpoint_final.pth", file=sys.stderr, flush=True)
        child.kill(); child.wait()
        sys.exit(2)
    time.sleep(120)  # hang / stubborn: wait to be cancelled
''')


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_predict.py"
    script.write_text(FAKE_PREDICT)
    return lambda mode: [sys.executable, str(script), mode, OUTPUT_PLACEHOLDER]


@pytest.fixture
def out_dir(tmp_path):
    """An output folder holding results of an earlier run, which must survive failures."""
    out = tmp_path / "results"
    (out / "case_a").mkdir(parents=True)
    (out / "case_a" / "old_file.txt").write_text("previous run")
    (out / "case_other").mkdir()
    (out / "case_other" / "summary.json").write_text('{"run": "other"}')
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc").is_dir():
        try:
            text = stat.read_text()
        except OSError:
            return False
        return text[text.rfind(")") + 2:].split()[0] not in ("Z", "X", "x")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _staging_dirs(out: Path):
    """Staging folders left anywhere a run could have put one (inside out_dir, or beside it)."""
    return list(out.glob(".staging-*")) + list(out.parent.glob(f".{out.name}.staging-*"))


def _previous_outputs_intact(out: Path):
    assert (out / "case_a" / "old_file.txt").read_text() == "previous run"
    assert not (out / "case_a" / "summary.json").exists()
    assert json.loads((out / "case_other" / "summary.json").read_text()) == {"run": "other"}


# --------------------------------------------------------------------------------- the run
def test_success_delivers_progress_and_moves_outputs_into_place(fake, out_dir, monkeypatch):
    # the child prints progress lines only when asked: the runner must ask (CALIBU_PROGRESS=1)
    monkeypatch.delenv("CALIBU_PROGRESS", raising=False)
    events, lines = [], []
    run = PredictionRun(fake("success"), out_dir, on_progress=events.append,
                        on_log=lambda line, stream: lines.append((stream, line)))
    assert run.state is RunState.IDLE
    run.start()
    assert run.state is RunState.RUNNING
    assert str(out_dir) not in run.command and run.command[-1] == str(run.staging_dir)
    assert run.wait(timeout=30) is RunState.SUCCEEDED
    assert run.returncode == 0 and run.error is None
    assert [e["member"] for e in events] == [1, 2, 3]
    assert events[-1] == {"stage": "inference", "fraction": 0.9, "case": "case_a", "member": 3,
                          "n_members": 3, "message": "fold_2"}
    assert run.last_progress == events[-1]
    assert ("stdout", "done") in lines
    assert not any("CALIBU_PROGRESS" in line for _, line in lines)  # progress is not logged as text
    # the case folder was replaced as a whole; the other case was left alone
    assert json.loads((out_dir / "case_a" / "summary.json").read_text()) == {"run": "new"}
    assert not (out_dir / "case_a" / "old_file.txt").exists()
    assert json.loads((out_dir / "case_other" / "summary.json").read_text()) == {"run": "other"}
    assert _staging_dirs(out_dir) == []
    assert sorted(p.name for p in out_dir.iterdir()) == ["case_a", "case_other"]


def test_a_run_merges_the_folder_index_instead_of_replacing_it(fake, out_dir):
    """Issue 12 item 5 on the Slicer path: the staged index lists only this run's case."""
    (out_dir / "case_other" / "summary.json").write_text('{"case": "case_other"}')
    (out_dir / "summary.json").write_text('{"cases": [{"case": "case_other", "n_regions": 1}]}')
    run = PredictionRun(fake("indexed"), out_dir).start()
    assert run.wait(timeout=30) is RunState.SUCCEEDED
    index = json.loads((out_dir / "summary.json").read_text())
    assert [c["case"] for c in index["cases"]] == ["case_a", "case_other"]
    assert index["replaced"] == [] and index["n_members"] == 3 and index["cases"][1]["n_regions"] == 1
    assert _staging_dirs(out_dir) == []


def test_processes_left_running_by_a_successful_command_are_stopped(fake, tmp_path):
    lines = []
    run = PredictionRun(fake("leave"), tmp_path / "out", on_log=lambda line, s: lines.append(line)).start()
    assert run.wait(timeout=30) is RunState.SUCCEEDED
    child_pid = int(next(x for x in lines if x.startswith("CHILD ")).split()[1])
    assert _wait_until(lambda: not _alive(child_pid), timeout=5.0)
    assert "stopping processes the command left running" in lines
    assert (tmp_path / "out" / "case_a" / "summary.json").is_file()


def test_success_into_a_new_output_folder(fake, tmp_path):
    out = tmp_path / "deep" / "new_results"
    assert blocking_run(fake("success"), out, timeout=30) == out.absolute()
    assert json.loads((out / "case_a" / "summary.json").read_text()) == {"run": "new"}


def test_failure_reports_the_stderr_tail_and_keeps_previous_outputs(fake, out_dir):
    logged = []
    run = PredictionRun(fake("fail"), out_dir, on_log=lambda line, stream: logged.append((stream, line)))
    run.start()
    assert run.wait(timeout=30) is RunState.FAILED
    assert run.returncode == 2
    assert "exit code 2" in run.error
    assert run.error.rstrip().endswith("error: fold 3 has no checkpoint_final.pth")
    assert "loading fold 3" in run.error
    assert run.stderr_tail() == ["loading fold 3", "error: fold 3 has no checkpoint_final.pth"]
    assert ("stderr", "error: fold 3 has no checkpoint_final.pth") in logged
    _previous_outputs_intact(out_dir)
    assert _staging_dirs(out_dir) == []


def test_blocking_run_raises_with_the_error(fake, out_dir):
    with pytest.raises(RunError, match="fold 3 has no checkpoint_final.pth"):
        blocking_run(fake("fail"), out_dir, timeout=30)
    _previous_outputs_intact(out_dir)


def test_success_without_output_is_a_failure(fake, out_dir):
    run = PredictionRun(fake("empty"), out_dir).start()
    assert run.wait(timeout=30) is RunState.FAILED
    assert "wrote no output" in run.error
    _previous_outputs_intact(out_dir)


def test_cancel_kills_the_whole_process_tree(fake, out_dir):
    lines = []
    run = PredictionRun(fake("hang"), out_dir, on_log=lambda line, stream: lines.append(line)).start()
    assert _wait_until(lambda: run.poll() is RunState.RUNNING and run.last_progress is not None
                       and any(x.startswith("CHILD ") for x in lines))
    child_pid = int(next(x for x in lines if x.startswith("CHILD ")).split()[1])
    parent_pid = run.pid
    assert _alive(child_pid) and _alive(parent_pid)
    t0 = time.monotonic()
    assert run.cancel(timeout=5.0) is RunState.CANCELLED
    assert time.monotonic() - t0 < 5.0  # SIGTERM was enough
    assert _wait_until(lambda: not _alive(child_pid), timeout=5.0), "the grandchild survived cancel()"
    assert not _alive(parent_pid)
    assert _staging_dirs(out_dir) == []
    _previous_outputs_intact(out_dir)
    assert lines[-1].startswith("cancelled")
    assert run.poll() is RunState.CANCELLED and run.cancel() is RunState.CANCELLED  # idempotent


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM-ignoring children are a POSIX test; Windows uses taskkill /F")
def test_cancel_escalates_to_sigkill_when_sigterm_is_ignored(fake, out_dir):
    lines = []
    run = PredictionRun(fake("stubborn"), out_dir, on_log=lambda line, stream: lines.append(line)).start()
    assert _wait_until(lambda: run.poll() is RunState.RUNNING and any(x.startswith("CHILD ") for x in lines))
    child_pid = int(next(x for x in lines if x.startswith("CHILD ")).split()[1])
    t0 = time.monotonic()
    assert run.cancel(timeout=0.3) is RunState.CANCELLED
    assert 0.3 <= time.monotonic() - t0 < 5.0
    assert _wait_until(lambda: not _alive(child_pid), timeout=5.0)
    assert not _alive(run.pid)
    assert _staging_dirs(out_dir) == []
    _previous_outputs_intact(out_dir)


def test_second_start_is_refused_while_running_then_allowed(fake, out_dir):
    run = PredictionRun(fake("hang"), out_dir).start()
    try:
        with pytest.raises(RunStateError, match="already running"):
            run.start()
        assert run.state is RunState.RUNNING
    finally:
        run.cancel(timeout=5.0)
    assert _staging_dirs(out_dir) == []
    # a finished run may be started again (a fresh staging folder, a fresh process)
    first_pid = run.pid
    run.start()
    try:
        assert run.state is RunState.RUNNING and run.pid != first_pid
    finally:
        run.cancel(timeout=5.0)
    _previous_outputs_intact(out_dir)


def test_blocking_run_timeout_cancels(fake, out_dir):
    t0 = time.monotonic()
    with pytest.raises(RunError, match="did not finish within 0.5 s"):
        blocking_run(fake("hang"), out_dir, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert _staging_dirs(out_dir) == []
    _previous_outputs_intact(out_dir)


def test_unstartable_program_fails_clearly(tmp_path):
    run = PredictionRun([str(tmp_path / "no-such-program"), OUTPUT_PLACEHOLDER], tmp_path / "out")
    with pytest.raises(RunError, match="could not start"):
        run.start()
    assert run.state is RunState.FAILED
    assert list(tmp_path.glob(".out.staging-*")) == []


def test_command_must_name_the_output_placeholder(tmp_path):
    with pytest.raises(InputError, match=r"\{output\}"):
        PredictionRun([sys.executable, "-c", "pass"], tmp_path / "out")
    with pytest.raises(InputError, match="empty command"):
        PredictionRun([], tmp_path / "out")


def test_output_folder_that_is_a_file_is_refused(fake, tmp_path):
    target = tmp_path / "results"
    target.write_text("not a folder")
    with pytest.raises(InputError, match="not a folder"):
        PredictionRun(fake("success"), target).start()
    assert target.read_text() == "not a folder"


def test_child_environment_finds_this_library(tmp_path):
    """The child resolves CalibUncertaintyLib to this copy even from another working directory
    and with an empty environment (as PythonSlicer gets Slicer's startup environment)."""
    code = "import CalibUncertaintyLib, sys; print(CalibUncertaintyLib.__file__); open(sys.argv[1] + '/x', 'w').close()"
    lines = []
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "SYSTEMROOT", "HOME")}
    run = PredictionRun([sys.executable, "-c", code, OUTPUT_PLACEHOLDER], tmp_path / "out", env=env,
                        cwd=str(tmp_path), on_log=lambda line, s: lines.append(line)).start()
    assert run.wait(timeout=30) is RunState.SUCCEEDED, run.error
    assert Path(lines[0]).resolve() == (REPO / "CalibUncertaintyLib" / "__init__.py").resolve()


# --------------------------------------------------------------------------------- options
def _model_folder(root: Path, folds=(0, 1), snapshots=False) -> Path:
    """A minimal nnU-Net v2 trained-model folder layout (JSON + checkpoint file names)."""
    model = root / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {}}}))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                    "labels": {"background": 0, "organ": 1}}))
    for f in folds:
        (model / f"fold_{f}").mkdir()
        (model / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"")
        if snapshots:
            (model / f"fold_{f}" / "checkpoint_snapshot_1.pth").write_bytes(b"")
    return model


def test_build_predict_command(tmp_path):
    opts = PredictOptions(input_path=tmp_path / "ct.nii.gz", model_dir=tmp_path / "model", ensemble="deep",
                          folds=("0", "1"), calibration=tmp_path / "cal.json", device="cuda", tta=False)
    cmd = runner.build_predict_command(opts, output="/out", python="/opt/PythonSlicer")
    assert cmd == ["/opt/PythonSlicer", "-m", "CalibUncertaintyLib.cli.main", "predict",
                   "-i", str(tmp_path / "ct.nii.gz"), "-m", str(tmp_path / "model"), "-o", "/out",
                   "--ensemble", "deep", "--folds", "0", "1", "--calibration", str(tmp_path / "cal.json"),
                   "--device", "cuda", "--no-tta"]
    plain = runner.build_predict_command(PredictOptions(tmp_path / "ct.nii.gz", tmp_path / "m"))
    assert plain[0] == sys.executable
    assert "--folds" not in plain and "--calibration" not in plain
    assert plain[-3:] == ["--device", "auto", "--tta"]
    assert plain[plain.index("-o") + 1] == OUTPUT_PLACEHOLDER
    with pytest.raises(InputError, match="export the CT"):
        runner.build_predict_command(PredictOptions(None, tmp_path / "m"))


def test_parse_folds():
    assert runner.parse_folds("0,1, 2") == ("0", "1", "2")
    assert runner.parse_folds("3 4") == ("3", "4")
    assert runner.parse_folds([0, 1]) == ("0", "1")
    assert runner.parse_folds("all") == ("all",)
    assert runner.parse_folds("") is None and runner.parse_folds("  ") is None and runner.parse_folds(None) is None
    for bad, msg in (("a", "fold numbers"), ("0,0", "twice"), ("all,1", "cannot be mixed"), ("-1", "fold numbers")):
        with pytest.raises(InputError, match=msg):
            runner.parse_folds(bad)


def test_option_problems_name_what_to_fix(tmp_path):
    assert runner.ENSEMBLE_CHOICES == ENSEMBLE_KINDS
    assert runner.DEVICE_CHOICES == DEVICE_CHOICES  # the GUI offers what the command accepts
    model = _model_folder(tmp_path / "models")
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"x")
    assert PredictOptions(ct, model).problems() == []
    assert PredictOptions(ct, model, ensemble="single", folds=("1",)).problems() == []
    assert PredictOptions(None, model).problems(check_input=False) == []
    assert PredictOptions(None, model).problems() == ["No input CT file."]

    empty = tmp_path / "empty"
    empty.mkdir()
    (p,) = PredictOptions(ct, empty).problems()
    assert "not an nnU-Net v2 trained model folder" in p
    (p,) = PredictOptions(ct, tmp_path / "models").problems()  # the parent of the model folder
    assert "nnUNetTrainer__nnUNetPlans__3d_fullres" in p
    (p,) = PredictOptions(ct, "").problems()
    assert p.startswith("Choose the nnU-Net model folder")
    (p,) = PredictOptions(ct, model, folds=("3",)).problems()
    assert "fold 3" in p
    (p,) = PredictOptions(ct, model, ensemble="checkpoint").problems()
    assert "snapshot" in p
    (p,) = PredictOptions(ct, model, ensemble="single", folds=("0", "1")).problems()
    assert "one fold" in p
    problems = PredictOptions(tmp_path / "missing.nii.gz", model, calibration=tmp_path / "cal.json",
                              device="tpu", ensemble="bagging").problems()
    assert len(problems) == 4
    assert "missing.nii.gz" in problems[0] and "bagging" in problems[1]
    assert "cal.json" in problems[2] and "tpu" in problems[3]

    with pytest.raises(ModelFolderError, match="not an nnU-Net v2 trained model folder"):
        PredictOptions(ct, empty).validate()
    with pytest.raises(InputError, match="does not exist"):
        PredictOptions(ct, model, calibration=tmp_path / "cal.json").validate()
    assert PredictOptions(ct, _model_folder(tmp_path / "snap", snapshots=True), ensemble="checkpoint").validate()


def test_apply_check_refuses_a_calibration_of_other_members(tmp_path):
    """The Slicer panel's Apply check names the mismatch and the fix before anything runs (issue 17):
    a calibration fitted without TTA on folds 0 and 1 fits only those members without TTA."""
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile

    model = _model_folder(tmp_path / "models")
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"x")
    cal = CalibrationFile(temperature=1.2, class_names=[], fingerprint={},
                          ensemble={"kind": "deep", "members": ["fold_0/checkpoint_final", "fold_1/checkpoint_final"],
                                    "tta": False}).save(tmp_path / "cal.json")
    assert PredictOptions(ct, model, calibration=cal, tta=False).problems() == []
    assert runner.calibration_tta(cal) is False and runner.calibration_tta(tmp_path / "none.json") is None
    (p,) = PredictOptions(ct, model, calibration=cal, tta=True).problems()
    assert "TTA (nnU-Net's mirroring): off when fitted, on now" in p and "run with --no-tta" in p
    (p,) = PredictOptions(ct, model, calibration=cal, tta=False, ensemble="single", folds=("0",)).problems()
    assert "fitted on deep, applied to single" in p and "--ensemble deep --folds 0 1" in p


def test_as_optional_path_treats_empty_widgets_as_unset():
    assert runner.as_optional_path("") is None
    assert runner.as_optional_path(".") is None
    assert runner.as_optional_path(Path()) is None
    assert runner.as_optional_path(None) is None
    assert runner.as_optional_path(" /a/b ") == Path("/a/b")


def test_describe_progress():
    assert runner.describe_progress({"stage": "inference", "fraction": 0.434, "case": "c1", "member": 2,
                                     "n_members": 5, "message": "fold_1"}) == \
        (43, "inference - member 2/5 - c1 - fold_1")
    assert runner.describe_progress({"stage": "maps"}) == (None, "maps")
    assert runner.describe_progress({"stage": "x", "fraction": 1.7, "member": 1}) == (100, "x - member 1")


def test_safe_case_name_and_locate_case_dir(tmp_path):
    assert runner.safe_case_name("CT chest #2") == "CT_chest_2"
    assert runner.safe_case_name("case_001_0000") == "case_001"
    assert runner.safe_case_name("///") == "case"
    out = tmp_path / "out"
    (out / "case_b").mkdir(parents=True)
    (out / "case_b" / "summary.json").write_text("{}")
    assert runner.locate_case_dir(out, "case_b") == out / "case_b"
    assert runner.locate_case_dir(out, "renamed") == out / "case_b"  # the only case folder
    (out / "case_c").mkdir()
    (out / "case_c" / "regions.json").write_text("{}")
    with pytest.raises(InputError, match="case_b, case_c"):
        runner.locate_case_dir(out, "renamed")


# --------------------------------------------------------------------------------- real predict
def test_real_predict_command_failure_is_reported(tmp_path, out_dir):
    """The real ``calib-uncertainty predict`` through the runner: a folder that is not a model
    fails with the CLI's own message in the run's error, and the previous outputs survive."""
    from CalibUncertaintyLib.io.geometry import Geometry
    from CalibUncertaintyLib.io.images import write_image

    ct = tmp_path / "ct.nii.gz"
    write_image(ct, np.zeros((8, 9, 10), np.int16), Geometry((8, 9, 10), (1.0, 1.0, 2.0), (0, 0, 0),
                                                             (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    run = PredictionRun(PredictOptions(ct, not_a_model, device="cpu", tta=False), out_dir).start()
    assert run.wait(timeout=120) is RunState.FAILED
    assert run.returncode != 0
    assert "not an nnU-Net v2 trained model folder" in run.error
    _previous_outputs_intact(out_dir)
    assert _staging_dirs(out_dir) == []


@pytest.mark.slow
def test_real_predict_command_succeeds_with_progress_and_outputs(tmp_path, out_dir):
    """The real ``calib-uncertainty predict`` out of process on a tiny real nnU-Net model folder
    (random weights, two folds): progress arrives as events, the case folder lands in place."""
    from tiny_nnunet import build_tiny_model_folder, write_test_ct

    model = build_tiny_model_folder(tmp_path / "models", folds=(0, 1))
    ct = write_test_ct(tmp_path / "input" / "case_a_0000.nii.gz")
    opts = PredictOptions(ct, model, ensemble="deep", folds=("0", "1"), device="cpu", tta=False)
    assert opts.problems() == []
    events, lines = [], []
    run = PredictionRun(opts, out_dir, on_progress=events.append, on_log=lambda line, s: lines.append(line)).start()
    assert run.wait(timeout=240) is RunState.SUCCEEDED, run.error
    members = sorted({e["member"] for e in events if e.get("member") is not None})
    assert members == [1, 2] and all(e.get("n_members") in (None, 2) for e in events)
    fractions = [e["fraction"] for e in events if "fraction" in e]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    case_dir = runner.locate_case_dir(out_dir, runner.safe_case_name(ct.name[:-len(".nii.gz")]))
    assert case_dir == out_dir / "case_a"
    for name in ("seg.nii.gz", "regions.json", "summary.json", "map_entropy.nii.gz"):
        assert (case_dir / name).is_file(), name
    assert not (case_dir / "old_file.txt").exists()  # the earlier case_a was replaced as a whole
    assert json.loads((out_dir / "case_other" / "summary.json").read_text()) == {"run": "other"}
    assert _staging_dirs(out_dir) == []


def test_staging_folder_is_inside_the_output_folder_not_beside_it(fake, tmp_path):
    """A user who picks ~/results must not find hidden staging folders in ~ (issue 8)."""
    parent = tmp_path / "home"
    out = parent / "results"
    parent.mkdir()
    run = PredictionRun(fake("success"), out)
    run.start()
    assert run.staging_dir.parent == out and run.staging_dir.name.startswith(".staging-")
    assert sorted(p.name for p in parent.iterdir()) == ["results"]
    assert run.wait(timeout=30) is RunState.SUCCEEDED
    assert sorted(p.name for p in parent.iterdir()) == ["results"]
    assert _staging_dirs(out) == [] and (out / "case_a" / "summary.json").is_file()


def test_windows_child_gets_no_console_window():
    """On Windows the child starts without a console window (as Slicer's launchConsoleProcess
    starts PythonSlicer) and in its own process group; elsewhere in its own session. (Windows
    cannot run here: this checks the Popen arguments PredictionRun.start passes.)"""
    from CalibUncertaintyLib import runner as runner_mod

    win = runner_mod.popen_platform_kwargs(True)
    assert win["creationflags"] & 0x08000000 and win["creationflags"] & 0x00000200
    assert "start_new_session" not in win
    assert runner_mod.popen_platform_kwargs(False) == {"start_new_session": True}
    src = Path(runner_mod.__file__).read_text()
    assert 'popen_platform_kwargs(os.name == "nt")' in src
