"""The demo end to end (quick settings): every step runs, outputs exist, a rerun reuses everything,
and the command line entry works. The full-size demo has the same steps with more data and
iterations (``DemoSettings()``); its timing is reported in the README, not tested here."""

from __future__ import annotations

import json

import pytest

from CalibUncertaintyLib.demo import ENSEMBLES, DemoSettings, run_demo
from CalibUncertaintyLib.errors import InputError


# the quick demo itself is the session fixture ``quick_demo`` (conftest.py), shared with test_docs.py and
# the pixel tests of Slicer's views


def test_quick_demo_writes_every_output(quick_demo):
    workdir, res = quick_demo
    s = res.summary
    assert res.steps_skipped == [] and "predict_example" in res.steps_run
    assert s["calibration_cases"] == ["phantom_005", "phantom_006"] and s["test_cases"] == ["phantom_007", "phantom_008"]
    models = workdir / "nnUNet_results" / "Dataset989_CalibPhantomQuick"
    assert sorted(p.name for p in (models / "CalibuTinyTrainer__nnUNetPlans_tiny__3d_fullres").glob("fold_*")) == \
        ["fold_0", "fold_1"]
    snaps = sorted(p.name for p in models.glob("CalibuSnapshotTrainer__*/fold_0/checkpoint_snapshot_*.pth"))
    assert snaps == ["checkpoint_snapshot_0.pth", "checkpoint_snapshot_1.pth"]
    # member folders hold every held-out case (calibration + test) for every member
    for ens, n in (("deep", 2), ("checkpoint", 2)):
        dirs = sorted((workdir / "members" / ens).iterdir())
        assert len(dirs) == n
        for d in dirs:
            assert sorted(p.stem for p in d.glob("*.npz")) == ["phantom_005", "phantom_006", "phantom_007", "phantom_008"]
            assert (d / "plans.json").is_file() and (d / "dataset.json").is_file()
    rows = {r["ensemble"]: r for r in s["comparison"]}
    assert list(rows) == list(ENSEMBLES)
    assert [rows[e]["members"] for e in ENSEMBLES] == [1, 2, 2]
    for ens in ENSEMBLES:
        cal = json.loads((workdir / "calibration" / f"{ens}.json").read_text())
        assert cal["temperature"] == pytest.approx(rows[ens]["temperature"]) and cal["temperature"] > 0
        assert sorted(cal["case_ids"]) == s["calibration_cases"]
        for case in s["test_cases"]:
            assert (workdir / "maps" / ens / case / "map_entropy.nii.gz").is_file()
            assert (workdir / "maps" / ens / case / "regions.json").is_file()
        assert (workdir / "evaluation" / ens / "report.md").is_file()
        assert rows[ens]["nll_before"] > 0 and rows[ens]["nll_after"] > 0
    example = workdir / "predict_example" / s["test_cases"][0]
    pred = json.loads((example / "summary.json").read_text())
    assert pred["prediction"]["ensemble"] == "deep" and len(pred["prediction"]["members"]) == 2
    text = res.report.read_text()
    assert "| deep | 2 |" in text and "nll_before" in text


def test_rerun_reuses_every_step(quick_demo):
    workdir, first = quick_demo
    stamp = (workdir / "calibration" / "deep.json").stat().st_mtime_ns
    again = run_demo(workdir, device="cpu", settings=DemoSettings.quick())
    assert again.steps_run == [] and sorted(again.steps_skipped) == sorted(first.steps_run)
    assert (workdir / "calibration" / "deep.json").stat().st_mtime_ns == stamp
    assert again.summary["comparison"] == first.summary["comparison"]
    assert again.summary["seconds"] < 30
    # the rerun keeps the record of the run that computed the numbers (issue 17)
    report = (workdir / "REPORT.md").read_text()
    computed = again.summary["computed_by"]
    assert computed["finished_utc"] == first.summary["finished_utc"] and computed["steps_run"] == first.steps_run
    assert f"Computed by the run that finished {first.summary['finished_utc']}" in report
    assert "Steps run this time: none" not in report and "reused every step" in report
    assert again.summary["step_records"]["fit_deep"] == first.summary["step_records"]["fit_deep"]


def test_report_links_only_files_that_exist(quick_demo):
    import re

    workdir, first = quick_demo
    text = first.report.read_text()
    links = re.findall(r"\]\(([^)#\s]+)[^)]*\)", text)
    assert len(links) >= 8 and any(t.endswith("METHODS.md") for t in links)
    for target in links:
        assert (workdir / target).resolve().exists(), target


def test_cli_demo_reuses_and_reports(quick_demo, capsys):
    from CalibUncertaintyLib.cli.main import main

    workdir, _ = quick_demo
    assert main(["demo", "--quick", "--workdir", str(workdir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "deep (2 member(s)): T = " in out and "REPORT.md" in out


def test_bad_workdir_and_settings(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        run_demo(f, settings=DemoSettings.quick())
    with pytest.raises(InputError, match="calibration and one test"):
        run_demo(tmp_path / "w", settings=DemoSettings(n_test=0))
