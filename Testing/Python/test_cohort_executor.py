"""The cohort executor's policy on the local executor (no Ray needed): retries, failures,
ordering, option checks, completeness records, and that Ray is never imported by a local run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from CalibUncertaintyLib.cohort.completeness import case_is_complete
from CalibUncertaintyLib.cohort.executor import ExecutorOptions, run_cohort
from CalibUncertaintyLib.errors import InputError


def flaky_case(job, item):
    """Fails ``item`` times with the error in ``job`` (counted in job["calls"]), then returns."""
    case, n_fail = item
    job["calls"][case] = job["calls"].get(case, 0) + 1
    if job["calls"][case] <= n_fail:
        raise job["error"](f"attempt {job['calls'][case]} of {case}")
    return case.upper()


def test_transient_errors_retried_deterministic_not(capsys, monkeypatch):
    monkeypatch.setenv("CALIBU_PROGRESS", "1")  # progress lines only when asked
    job = {"calls": {}, "error": OSError}
    items = [("a", ("a", 0)), ("b", ("b", 2)), ("c", ("c", 5))]
    r = run_cohort(flaky_case, job, items, ExecutorOptions(max_retries=2))
    assert r.done == ["a", "b"] and r.ordered() == ["A", "B"]
    assert job["calls"] == {"a": 1, "b": 3, "c": 3}  # c: 1 try + 2 retries, then failed
    assert r.failed == {"c": "OSError: attempt 3 of c"}
    assert r.record()["retried"] == {"b": 2, "c": 2}
    job = {"calls": {}, "error": InputError}
    r = run_cohort(flaky_case, job, [("x", ("x", 1)), ("y", ("y", 0))], ExecutorOptions(max_retries=5))
    assert job["calls"] == {"x": 1, "y": 1} and r.failed == {"x": "attempt 1 of x"} and r.done == ["y"]
    err = str(r.error())
    assert err.startswith("attempt 1 of x [case x failed; the other 1 case(s) are complete")
    lines = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().err.splitlines()
             if line.startswith("CALIBU_PROGRESS")]
    assert lines[-1]["stage"] == "cohort" and lines[-1]["done"] == 1 and lines[-1]["failed"] == 1


def test_keyboard_interrupt_stops_the_cohort():
    def interrupted(job, item):
        if item == "b":
            raise KeyboardInterrupt
        job.append(item)

    seen = []
    with pytest.raises(KeyboardInterrupt):
        run_cohort(interrupted, seen, [("a", "a"), ("b", "b"), ("c", "c")])
    assert seen == ["a"]


def test_options_are_checked():
    with pytest.raises(InputError, match="unknown executor"):
        ExecutorOptions(kind="dask")
    with pytest.raises(InputError, match="only applies with the ray executor"):
        ExecutorOptions(ray_address="auto")
    with pytest.raises(InputError, match="twice"):
        run_cohort(flaky_case, {}, [("a", ("a", 0)), ("a", ("a", 0))])


def test_cli_ray_options_need_the_ray_executor(tmp_path, capsys):
    from CalibUncertaintyLib.cli.main import main

    members = tmp_path / "m"
    members.mkdir()
    assert main(["maps", "--members", str(members), "--ray-address", "auto", "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: --ray-address and --workers only apply with --executor ray")
    with pytest.raises(SystemExit):
        main(["maps", "--members", str(members), "--max-retries", "-1", "-o", str(tmp_path / "o")])


def test_completeness_is_the_summary_record(tmp_path):
    folder = tmp_path / "c1"
    assert not case_is_complete(tmp_path, "c1", "k")
    folder.mkdir()
    assert not case_is_complete(tmp_path, "c1", "k")  # a folder is not a record
    (folder / "seg.nii.gz").write_bytes(b"x")
    summary = {"case": "c1", "files": ["seg.nii.gz", "summary.json"], "cohort": {"job_key": "k"}}
    (folder / "summary.json").write_text(json.dumps(summary))
    assert case_is_complete(tmp_path, "c1", "k")
    assert not case_is_complete(tmp_path, "c1", "other job")
    (folder / "seg.nii.gz").unlink()
    assert not case_is_complete(tmp_path, "c1", "k")
    (folder / "summary.json").write_text("{trunc")
    assert not case_is_complete(tmp_path, "c1", "k")


def test_ray_is_imported_only_when_used():
    code = ("import sys, CalibUncertaintyLib.cli.main as m, CalibUncertaintyLib.pipeline.maps_job, "
            "CalibUncertaintyLib.pipeline.predict_job, CalibUncertaintyLib.pipeline.fit, "
            "CalibUncertaintyLib.pipeline.evaluate, CalibUncertaintyLib.cohort.ray_backend; m.build_parser(); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_inference_asks_for_a_gpu_where_the_cluster_has_them():
    from CalibUncertaintyLib.cohort.executor import TaskResources
    from CalibUncertaintyLib.cohort.ray_backend import placement

    infer, maps = TaskResources(num_cpus=1, gpu_if_available=True), TaskResources(num_cpus=1)
    assert placement({"CPU": 64.0, "GPU": 4.0}, infer, None) == (0.0, 1, 4)   # one GPU per case, 4 at once
    assert placement({"CPU": 2.0}, infer, None) == (1.0, 0, 2)                # no GPU: one CPU per case
    assert placement({"CPU": 64.0, "GPU": 4.0}, maps, None) == (1.0, 0, 64)   # maps never take a GPU
    assert placement({"CPU": 64.0, "GPU": 4.0}, infer, 2) == (0.0, 1, 2)      # --workers caps cases in flight
