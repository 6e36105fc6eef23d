"""Progress everywhere a run is long (issue 17): the live status line on a terminal, plain lines at
least every interval when piped (also while no event arrives), the inference estimate as its own
line, the ETA, and the machine-readable protocol the Slicer runner reads (ticks included)."""

from __future__ import annotations

import io
import json
import time

from CalibUncertaintyLib import progress
from CalibUncertaintyLib.cli.live_progress import LiveProgress
from CalibUncertaintyLib.runner import describe_progress

ESTIMATE = {"stage": "estimate", "case": "c1", "n_members": 2, "n_patches": 10, "n_network_passes": 160,
            "seconds_per_pass": 0.5, "message": "CT 300×512×512 voxels at 3×0.8×0.8 mm, resampled to ..."}


def _drive(display, pause: float = 0.0):
    with progress.reporting(display):
        progress.emit_progress("cohort", 0.0, event="started", case="c1", n_cases=2, done=0, failed=0,
                               message="predict")
        progress.emit_progress("estimate", 0.0, **{k: v for k, v in ESTIMATE.items() if k != "stage"})
        progress.emit_progress("inference", 0.0, case="c1", member=1, n_members=2, message="fold_0", span_end=0.3)
        for i in range(4):
            progress.tick("patch", i, 10)
        time.sleep(pause)
        progress.tick("patch", 5, 10)


def test_piped_output_gets_plain_lines_at_least_every_interval():
    out = io.StringIO()
    with LiveProgress(stream=out, tty=False, interval=0.3) as display:
        _drive(display, pause=1.3)  # no event for 1.3 s: the heartbeat still prints
    lines = out.getvalue().splitlines()
    assert lines[0] == "progress: predict · case 1/2 c1 started" and lines[1].startswith("c1: CT 300×512×512 voxels")
    periodic = [ln for ln in lines if ln.startswith("progress: predict · case 1/2 c1 · inference")]
    assert len(periodic) >= 3, lines  # at least one per 0.3 s interval while the stage runs
    assert " · member 1/2 · patch 3/10 · " in periodic[0] and " · ETA " in periodic[0]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no terminal codes in a log


def test_terminal_gets_one_live_line_cleared_before_other_output(capsys):
    out = io.StringIO()
    with LiveProgress(stream=out, tty=True, interval=10) as display:
        _drive(display, pause=0.25)
        display.before_output()
        text = out.getvalue()
    drawn = [part for part in text.split("\r\x1b[2K") if part]
    assert any(d.startswith("predict · case 1/2 c1 · inference · member 1/2 · patch") and "ETA" in d for d in drawn), drawn
    assert text.endswith("\r\x1b[2K")  # cleared, so the next printed line starts clean
    assert "c1: CT 300×512×512" in text  # the estimate is a line of its own


def test_eta_follows_the_estimate_then_the_measured_rate():
    display = LiveProgress(stream=io.StringIO(), tty=False, interval=0)
    display.on_event({"stage": "cohort", "event": "started", "case": "c1", "n_cases": 1, "done": 0, "failed": 0})
    display.on_event(ESTIMATE)
    display.on_event({"stage": "inference", "case": "c1", "member": 1, "n_members": 2})
    assert abs(display.eta() - 160 * 0.5) < 1e-6  # nothing run yet: the estimate's time per pass
    display.on_tick("patch", 5, 10)
    assert display.passes_done == 5 * 8  # 160 passes / (10 patches × 2 members) = 8 mirrorings per patch
    display.on_event({"stage": "inference", "case": "c1", "member": 2, "n_members": 2})
    display.on_tick("patch", 0, 10)
    assert display.passes_done == 80  # the first member's passes are done
    assert 0 < display.eta() < 1e6 and "member 2/2 · patch 0/10" in display.status()


def test_eta_of_the_member_cache_inference_counts_its_passes():
    """fit-temperature / evaluate --model run the network in stage "members": the ETA follows its
    passes; after a case that took almost nothing (its members were cached), a case running longer
    than that mean gets no ETA rather than "0 s" (seen on the stock model)."""
    display = LiveProgress(stream=io.StringIO(), tty=False, interval=0)
    display.on_event({"stage": "cohort", "event": "started", "case": "c0", "n_cases": 2, "done": 0, "failed": 0})
    display.on_event({"stage": "cohort", "event": "done", "case": "c0", "n_cases": 2, "done": 1, "failed": 0})
    display.on_event({"stage": "cohort", "event": "started", "case": "c1", "n_cases": 2, "done": 1, "failed": 0})
    time.sleep(0.05)
    assert display.eta() is None  # c1 already ran longer than c0 took
    display.on_event(ESTIMATE)
    display.on_event({"stage": "members", "case": "c1", "member": 1, "n_members": 2})
    display.on_tick("patch", 5, 10)
    assert display.passes_done == 5 * 8
    assert display.eta() > 0 and "member 1/2 · patch 5/10 · " in display.status()


def test_machine_readable_lines_keep_the_protocol(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV_VAR, "1")
    monkeypatch.setattr(progress, "TICK_LINE_INTERVAL_S", 0.0)
    progress.emit_progress("inference", 0.2, case="c1", member=1, n_members=2, message="fold_0", span_end=0.4)
    progress.tick("patch", 5, 10)
    events = [progress.parse_progress_line(ln) for ln in capsys.readouterr().err.splitlines()]
    assert events[0] == {"stage": "inference", "fraction": 0.2, "case": "c1", "member": 1, "n_members": 2,
                         "message": "fold_0"}  # span_end is not printed
    assert events[1] == {**events[0], "fraction": 0.3, "patch": 5, "n_patches": 10}
    assert describe_progress(events[1]) == (30, "inference - member 1/2 - patch 5/10 - c1 - fold_0")
    monkeypatch.setattr(progress, "TICK_LINE_INTERVAL_S", 60.0)
    for i in range(50):  # rate-limited: a GUI is not flooded by a long sliding window
        progress.tick("patch", i, 50)
    assert len(capsys.readouterr().err.splitlines()) <= 1


def test_cli_installs_the_display_only_without_machine_lines(monkeypatch):
    from CalibUncertaintyLib.cli import main as cli_main

    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    with cli_main._display():
        assert progress.has_display()
    assert not progress.has_display()
    monkeypatch.setenv(progress.ENV_VAR, "1")
    with cli_main._display():
        assert not progress.has_display()  # the GUI draws the JSON lines; no second display
    assert json.loads(progress.format_progress("x", 0.5, span_end=1)[len(progress.PREFIX):]) == \
        {"stage": "x", "fraction": 0.5}


def test_inference_estimate_counts_the_network_passes_that_run(tmp_path, monkeypatch):
    """The estimate printed before inference (resampled size, patches × mirrorings × members) counts
    exactly the forward passes the sliding window then makes, on a real (random-weight) nnU-Net
    network with TTA; the measured time per pass is recorded for the next estimate."""
    from tiny_nnunet import build_tiny_model_folder, write_test_ct

    from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor
    from CalibUncertaintyLib.nnunet.inference_estimate import (estimate_inference, passes_per_patch,
                                                               record_pass_time)
    from CalibUncertaintyLib.nnunet.model_folder import ModelFolder

    monkeypatch.setenv("CALIBU_CACHE_DIR", str(tmp_path / "cache"))
    model = ModelFolder.open(build_tiny_model_folder(tmp_path, folds=(0,)))
    ct = write_test_ct(tmp_path / "ct_0000.nii.gz", shape_zyx=(12, 24, 20))  # one patch: 8 mirrored passes
    pred = EnsemblePredictor(model, model.members("deep"), device="cpu", tta=True)
    case = pred.prepare([ct], "ct")
    est = estimate_inference(pred, case)
    assert est.network_shape == list(case.data.shape[1:]) and est.n_members == 1 and est.n_patches == 1
    assert passes_per_patch(pred, pred.members[0]) == 2 ** len(pred._mirror_axes)
    assert est.source == "one pass timed just now" and est.seconds_per_pass > 0
    calls = []
    hook = pred.network.register_forward_hook(lambda *a: calls.append(1))
    try:
        for i in range(len(pred.members)):
            pred.member_logits(case, i)
    finally:
        hook.remove()
    assert len(calls) == est.n_network_passes
    assert est.n_network_passes == 8 and "× 8 mirrorings × 1 member(s) = 8 network passes" in est.describe()
    assert est.describe().startswith("CT 12×24×20 voxels at 3×3.7×3.5 mm, resampled to ")
    record_pass_time(pred, 0.125)
    again = estimate_inference(pred, case)
    assert again.source == "measured by earlier runs on this device" and again.seconds_per_pass == 0.125
