"""Case-level quality (METHODS.md §6): per-case aggregates, correlations with Dice and the
risk–coverage AURC on constructed rankings."""

from __future__ import annotations

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.metrics import case_aggregates, case_quality_summary, correlations, risk_coverage

DICE = [0.9, 0.8, 0.5, 0.2]  # risks 0.1, 0.2, 0.5, 0.8


def test_aurc_perfect_reversed_and_tied_rankings():
    good = risk_coverage([0.1, 0.3, 0.6, 0.9], DICE)  # most doubtful = worst case
    # kept-case mean risk at coverage 1/4..4/4: 0.1, 0.15, 0.8/3, 0.4
    assert good["risk"] == pytest.approx([0.1, 0.15, 0.8 / 3, 0.4])
    assert good["aurc"] == pytest.approx((0.1 + 0.15 + 0.8 / 3 + 0.4) / 4)
    assert good["e_aurc"] == pytest.approx(0.0, abs=1e-12)
    assert good["coverage"] == [0.25, 0.5, 0.75, 1.0]
    bad = risk_coverage([0.9, 0.6, 0.3, 0.1], DICE)
    assert bad["aurc"] == pytest.approx((0.8 + 0.65 + 0.5 + 0.4) / 4)
    assert bad["e_aurc"] > 0.3
    # all tied: any order is as likely, so every coverage has the mean risk
    tied = risk_coverage([1.0] * 4, DICE)
    assert tied["risk"] == pytest.approx([0.4] * 4) and tied["aurc"] == pytest.approx(0.4)
    # a tie between the two best cases only changes the first point
    part = risk_coverage([0.1, 0.1, 0.6, 0.9], DICE)
    assert part["risk"] == pytest.approx([0.15, 0.15, 0.8 / 3, 0.4])


def test_correlations():
    from scipy import stats

    agg = [0.1, 0.3, 0.6, 0.9, 0.5]
    dice = [0.9, 0.8, 0.5, 0.2, 0.7]
    c = correlations(agg, dice)
    assert c["pearson"] == pytest.approx(np.corrcoef(agg, dice)[0, 1])
    assert c["spearman"] == pytest.approx(-1.0)  # the ranks are exactly reversed
    assert c["n"] == 5 and 0 <= c["pearson_p"] < 0.05
    assert stats.spearmanr(agg, dice).statistic == pytest.approx(c["spearman"])
    const = correlations([1, 1, 1, 1], dice[:4])
    assert const["pearson"] is None and const["spearman"] is None
    # None aggregates (e.g. no predicted foreground) are left out
    assert correlations([0.1, None, 0.6, 0.9], [0.9, 0.8, 0.5, 0.2])["n"] == 3


def test_case_aggregates_hand_example():
    u = np.zeros((2, 3, 3))
    roi = np.zeros(u.shape, bool)
    roi[0] = True
    fg = np.zeros(u.shape, bool)
    fg[0, 1, :] = True
    u[0, 1, 0] = 0.9
    u[0, 1, 1] = 0.3
    u[1, 2, 2] = 5.0  # outside ROI and foreground: counts nowhere
    a = case_aggregates(u, roi, fg, tau=0.5, region_volumes_mm3=[12.0, 40.0], voxel_volume_mm3=2.0)
    assert a["mean_u_roi"] == pytest.approx(1.2 / 9)
    assert a["sum_u_fg"] == pytest.approx(1.2 * 2.0)
    assert a["largest_region_mm3"] == 40.0
    assert a["fraction_fg_flagged"] == pytest.approx(1 / 3)
    empty = case_aggregates(u, roi, np.zeros(u.shape, bool), tau=0.5)
    assert empty["fraction_fg_flagged"] is None and empty["largest_region_mm3"] == 0.0


def test_summary_over_cases():
    aggs = [{"mean_u_roi": m, "sum_u_fg": s, "largest_region_mm3": r, "fraction_fg_flagged": f}
            for m, s, r, f in ((0.1, 5, 0, 0.0), (0.3, 9, 10, 0.1), (0.6, 7, 30, None), (0.9, 20, 80, 0.4))]
    s = case_quality_summary(aggs, DICE)
    assert set(s) == {"mean_u_roi", "sum_u_fg", "largest_region_mm3", "fraction_fg_flagged"}
    assert s["mean_u_roi"]["risk_coverage"]["e_aurc"] == pytest.approx(0.0, abs=1e-12)
    assert s["sum_u_fg"]["risk_coverage"]["e_aurc"] > 0
    assert s["fraction_fg_flagged"]["n"] == 3
    with pytest.raises(InputError, match="Dice values"):
        case_quality_summary(aggs, DICE[:3])


def test_review_order_puts_empty_roi_first_then_highest_mean_uncertainty():
    from CalibUncertaintyLib.metrics.case_quality import review_order

    recs = [{"case": "a", "quality": {"mean_u_roi": 0.1}}, {"case": "b", "quality": None},
            {"case": "c", "quality": {"mean_u_roi": 0.3}}, {"case": "d", "quality": {"mean_u_roi": None}},
            {"case": "e", "quality": {"mean_u_roi": 0.1}}]
    assert [r["case"] for r in review_order(recs)] == ["b", "d", "c", "a", "e"]
