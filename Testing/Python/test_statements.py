"""Every statement holds as printed (issue 17): a conformal guarantee fitted on too few calibration
cases is called trivial, with the number of cases a real one needs, wherever it is stated (the
fit's terminal lines, summary.json, the margins block, the evaluation report and its plot, the Slicer
panel's lines); a real one is stated as before. And the end-of-case verdict says what to look at."""

from __future__ import annotations

import numpy as np
import pytest

from CalibUncertaintyLib.calibration import conformal as cf
from CalibUncertaintyLib.report.verdict import VERDICT_PARTS, case_verdict


def _record(n_cases: int, alpha: float = 0.1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    scores = {"dae": [(rng.gamma(2.0, 1.0, 80) + rng.normal(0, 0.3)).astype(np.float32) for _ in range(n_cases)]}
    curves = []
    for _ in range(n_cases):
        z, y, x = np.indices((6, 20, 20))
        r = np.sqrt(((z - 3) * 2.5) ** 2 + (y - 10) ** 2 + (x - 10) ** 2)
        p = (1.0 / (1.0 + np.exp((r - 6 + rng.normal(0, 0.5)) / rng.uniform(0.8, 2.0)))).astype(np.float32)
        curves.append(cf.margin_losses(p, rng.random(p.shape) < p, p > 0.5))
    return cf.build_record(alpha, scores, {"Liver": curves})


class _Cal:
    def __init__(self, rec):
        self.conformal = rec


def test_trivial_guarantee_is_said_everywhere_it_is_stated():
    from CalibUncertaintyLib.mrml.margins import guarantee_lines

    rec = _record(4)
    assert rec["n_cases"] == 4 and rec["min_cases"] == 9
    lines = cf.describe_record(rec)
    text = "\n".join(lines)
    assert "TRIVIAL GUARANTEE ONLY: 4 calibration case(s), α = 0.1 needs at least 9" in text
    assert "flags cover ≥ 90 %" not in text and "whole ROI flagged (trivial guarantee) for: dae" in text
    assert "organ margins: trivial guarantee only: the outer contour is the whole image (fitted on 4" in text
    summary_block = cf.case_guarantees(_Cal(rec), "dae")  # summary.json's "conformal"
    assert summary_block["trivial"] is True and summary_block["min_cases"] == 9
    assert summary_block["flags"]["guarantee"] == ("trivial guarantee only: every ROI voxel is flagged (fitted on 4 "
                                                   "calibration case(s); α = 0.1 needs at least 9 for a real guarantee)")
    assert summary_block["margins"]["inner"].startswith("trivial guarantee only: the inner contour is empty")
    panel = guarantee_lines({"conformal": summary_block})
    assert panel[0] == f"Conformal flags: {summary_block['flags']['guarantee']}." and "trivial" in panel[1]
    # a case folder written before this wording: the panel still says trivial
    old = {"conformal": {**summary_block, "flags": {**summary_block["flags"], "guarantee": cf.guarantee_text(0.1)},
                         "margins": {"outer": cf.guarantee_text(0.1, "outer"), "inner": cf.guarantee_text(0.1, "inner")}}}
    assert all("trivial guarantee only" in line and "needs at least 9" in line for line in guarantee_lines(old))


def test_real_guarantee_is_stated_as_such():
    rec = _record(12, seed=3)
    text = "\n".join(cf.describe_record(rec))
    assert "TRIVIAL" not in text and "flags cover ≥ 90 % of errors in expectation at: dae > " in text
    block = cf.case_guarantees(_Cal(rec), "dae")
    assert block["trivial"] is False and block["flags"]["guarantee"] == "flags cover ≥ 90 % of errors in expectation"
    assert block["margins"]["outer"] == "outer contour holds ≥ 90 % of the organ's voxels in expectation"
    # at α = 0.05 the same 12 cases are too few (19 needed): the stored thresholds there are trivial
    assert cf.margin_guarantees(rec, 0.05)["outer"].startswith("trivial guarantee only")


def test_report_and_plot_say_trivial(tmp_path):
    from CalibUncertaintyLib.metrics.conformal_check import report_lines, summarise
    from CalibUncertaintyLib.report.plots import conformal_plot

    rec = _record(4)
    checks = [{"n_errors": 10, "flags": {"dae": {k: 0.0 for k in rec["flags"]["dae"]}},
               "margins": {"Liver": {k: {"outer_miss": 0.0, "inner_fdp": 0.0} for k in rec["margins"]["Liver"]}}}
              for _ in range(3)]
    summary = summarise(_Cal(rec), checks)
    report = "\n".join(report_lines(summary, "dae"))
    assert "**Every guarantee below is the trivial one**: 4 calibration case(s), and α = 0.1 needs at least 9" in report
    assert "**trivial guarantee only: every ROI voxel is flagged" in report and "**flags cover" not in report
    assert "| dae | 0.1 | whole ROI (trivial) |" in report
    assert "Organ margins: trivial guarantee only: the outer contour is the whole image" in report
    path = conformal_plot(tmp_path / "conformal.png", summary)
    assert path.stat().st_size > 10_000
    real = summarise(_Cal(_record(12, seed=3)), checks)
    assert "trivial one" not in "\n".join(report_lines(real, "dae"))


def _summary(**kw):
    s = {"case": "case_9", "regions_map": "dae", "calibration": {"n_cases": 12},
         "case_aggregates": {"fraction_fg_flagged": 0.12, "organ_volume_atypicality_p": 0.5,
                             "high_entropy_body_fraction_p": 0.3},
         "conformal": {"trivial": False, "n_cases": 12, "min_cases": 9}}
    s.update(kw)
    return s


REGIONS = {"map": "dae", "regions": [
    {"rank": 1, "volume_mm3": 4200.0, "class_name": "Liver", "centroid_ras": [12.4, -80.2, 301.6]},
    {"rank": 2, "volume_mm3": 35.0, "class_name": "Spleen", "centroid_ras": [-50.0, -70.0, 290.0]}]}


def test_verdict_names_what_to_look_at():
    line = case_verdict(_summary(), REGIONS)
    assert line == ("case_9: 2 error region(s) on dae (4.24 ml in all); look first at region 1: 4.2 ml touching Liver "
                    "at RAS (12, -80, 302) mm; 12 % of the predicted foreground flagged; typical of the calibration "
                    "cases (smallest p = 0.3, high_entropy_body_fraction)")
    atypical = case_verdict(_summary(case_aggregates={"organ_volume_atypicality_p": 1 / 13}), {"regions": []})
    assert atypical == ("case_9: no error region on dae above τ*; ATYPICAL: organ_volume_atypicality beyond every one "
                        "of the 12 calibration cases (p = 0.077); check the input")
    bare = case_verdict(_summary(calibration=None, case_aggregates={}, conformal=None), None)
    assert "uncalibrated (no --calibration)" in bare
    trivial = case_verdict(_summary(conformal={"trivial": True, "n_cases": 4, "min_cases": 9}), REGIONS)
    assert trivial.endswith("conformal flags: trivial guarantee (4 calibration case(s), 9 needed)")
    # the builder is extended by adding a part
    extra = case_verdict(_summary(), REGIONS, parts=[*VERDICT_PARTS, lambda s, r: "seen by nobody yet"])
    assert extra.endswith("; seen by nobody yet")


@pytest.mark.parametrize("n, need", [(4, 9), (20, 19)])
def test_min_cases_matches_the_statement(n, need):
    rec = _record(n, alpha=0.05 if need == 19 else 0.1)
    assert rec["min_cases"] == need
    assert ("TRIVIAL" in "\n".join(cf.describe_record(rec))) == (n < need)
