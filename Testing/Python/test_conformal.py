"""Conformal risk control (calibration/conformal.py, METHODS.md §7): the documented correction,
the guarantee on exchangeable synthetic cases, and nested organ margins."""

import numpy as np
import pytest

from CalibUncertaintyLib.calibration import conformal as cf
from CalibUncertaintyLib.errors import InputError


def _case_errors(rng, n_err=None):
    # a case-level shift makes voxels within a case dependent (cases, not voxels, are exchangeable)
    shift = rng.normal(0, 0.5)
    n = n_err if n_err is not None else int(rng.integers(20, 200))
    return (rng.gamma(2.0, 1.0, n) + shift).astype(np.float32)


def test_finite_sample_correction_is_the_documented_one():
    # n = 19, alpha = 0.1: (19 R + 1) / 20 <= 0.1  <=>  R <= 1/19
    rng = np.random.default_rng(0)
    cases = [_case_errors(rng, 100) for _ in range(19)]
    th = cf.flag_threshold(cases, 0.1)
    assert not th["trivial"]
    mean_miss = np.mean([np.mean(c < th["c"]) for c in cases])
    assert mean_miss == pytest.approx(th["mean_miss"])
    assert (19 * mean_miss + 1) / 20 <= 0.1 + 1e-12
    assert th["bound"] == pytest.approx((19 * mean_miss + 1) / 20)
    # the next larger candidate would break the bound: the threshold is the largest allowed
    above = np.unique(np.concatenate(cases))
    nxt = above[above > th["c"]][0]
    assert (19 * np.mean([np.mean(c < nxt) for c in cases]) + 1) / 20 > 0.1
    # score > tau flags exactly score >= c on float32 maps
    allv = np.concatenate(cases)
    assert np.array_equal(allv > np.float32(th["tau"]), allv >= np.float32(th["c"]))
    # n = 9, alpha = 0.1: only R = 0 qualifies (every calibration error flagged)
    th9 = cf.flag_threshold(cases[:9], 0.1)
    assert th9["c"] == pytest.approx(float(min(c.min() for c in cases[:9])))
    assert th9["mean_miss"] == 0.0 and th9["bound"] == pytest.approx(0.1)
    # n = 8: B/(n+1) = 1/9 > 0.1, no threshold but the trivial one
    th8 = cf.flag_threshold(cases[:8], 0.1)
    assert th8["trivial"] and th8["tau"] is None and cf.min_cases(0.1) == 9


def test_flag_threshold_meets_target_miss_rate_on_exchangeable_cases():
    rng = np.random.default_rng(1)
    n, reps = 19, 1000
    for alpha in (0.1, 0.2):
        misses = []
        for _ in range(reps):
            cases = [_case_errors(rng) for _ in range(n + 1)]
            th = cf.flag_threshold(cases[:n], alpha)
            misses.append(cf.case_miss_rate(cases[n], np.ones(cases[n].size, bool), th["tau"]))
        m, se = np.mean(misses), np.std(misses, ddof=1) / np.sqrt(reps)
        assert m <= alpha + se, (alpha, m, se)
        # and not vacuous: the CRC lower bound alpha - 2B/(n+1) (continuous losses)
        assert m >= alpha - 2.0 / (n + 1) - 2 * se, (alpha, m)


def _margin_case(rng, shape=(8, 24, 24)):
    """Calibrated-ish probability of one organ (a ball), with a case-level boundary blur."""
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2 + rng.normal(0, 1.0, 3)
    r = np.sqrt(((z - c[0]) * 2.5) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    radius = 7.0 + rng.normal(0, 0.5)
    width = rng.uniform(0.8, 2.0)
    p = 1.0 / (1.0 + np.exp((r - radius) / width))
    truth = rng.random(shape) < p
    return p.astype(np.float32), truth


def test_margins_meet_target_and_nest():
    rng = np.random.default_rng(2)
    n, reps, alpha = 19, 200, 0.1
    outer, inner = [], []
    for _ in range(reps):
        cases = [_margin_case(rng) for _ in range(n + 1)]
        curves = [cf.margin_losses(p, t, p > 0.5) for p, t in cases[:n]]
        th = cf.margin_thresholds(curves, alpha)
        assert not th["trivial"] and th["inner"] >= 0.5 and th["outer"] <= 0.5
        p, t = cases[n]
        rates = cf.case_margin_rates(p, t, p > 0.5, th["outer"], th["inner"])
        outer.append(rates["outer_miss"])
        inner.append(rates["inner_fdp"])
        lv = cf.margin_levels(p, p > 0.5, th["outer"], th["inner"])
        im, om = cf.margin_masks(p, p > 0.5, th["outer"], th["inner"])
        assert not (im & ~(p > 0.5)).any() and not ((p > 0.5) & ~om).any()  # inner ⊆ pred ⊆ outer
        assert np.array_equal(lv == 3, im) and np.array_equal(lv >= 1, om)
    for vals in (outer, inner):
        m, se = np.mean(vals), np.std(vals, ddof=1) / np.sqrt(reps)
        assert m <= alpha + se, (m, se)


def test_inner_envelope_is_monotone_and_dominates_fdp():
    rng = np.random.default_rng(3)
    p, t = _margin_case(rng)
    c = cf.margin_losses(p, t, p > 0.5)
    g = cf.PROB_GRID
    assert np.all(np.diff(c["inner_fdp"][g >= 0.5]) <= 1e-12)
    assert np.all(np.diff(c["outer_miss"]) >= 0)
    for lam in (0.5, 0.7, 0.9):
        j = int(np.searchsorted(g, lam))
        s = p > g[j]
        assert c["inner_fdp"][j] >= (s & ~t).sum() / max(s.sum(), 1) - 1e-12


def test_record_round_trip_and_bad_alpha():
    rng = np.random.default_rng(4)
    scores = {"entropy": [_case_errors(rng) for _ in range(12)]}
    curves = {"organ": [cf.margin_losses(p, t, p > 0.5) for p, t in (_margin_case(rng) for _ in range(12))]}
    rec = cf.build_record(0.1, scores, curves)
    cf.validate_record(rec)
    assert rec["alphas"] == [0.05, 0.1, 0.2, 0.3] and rec["n_cases"] == 12
    assert cf.at_alpha(rec, "flags", "entropy")["alpha"] == 0.1
    assert cf.at_alpha(rec, "flags", "entropy", 0.05)["trivial"]  # 12 cases < 19 needed for 0.05
    assert cf.guarantee_text(0.1) == "flags cover ≥ 90 % of errors in expectation"
    for bad in (0, 1, -0.1, float("nan"), "x"):
        with pytest.raises(InputError, match="alpha"):
            cf.flag_threshold(scores["entropy"], bad)
    broken = dict(rec, alpha=2)
    with pytest.raises(InputError, match="alpha"):
        cf.validate_record(broken)


def test_calibration_file_keeps_the_record_and_old_files_load():
    import json

    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile

    base = dict(method="temperature", temperature=1.5, class_names=["background", "organ"],
                fingerprint={"n_classes": 2}, ebcu_threshold=0.3)
    old = CalibrationFile(**base).to_dict()
    old.pop("conformal")  # a file written before the record existed
    assert CalibrationFile.from_dict(old).conformal == {}
    rng = np.random.default_rng(5)
    rec = cf.build_record(0.2, {"dae": [_case_errors(rng) for _ in range(6)]}, {})
    loaded = CalibrationFile.from_dict(json.loads(json.dumps(CalibrationFile(**base, conformal=rec).to_dict())))
    assert loaded.conformal == rec and not cf.at_alpha(loaded.conformal, "flags", "dae")["trivial"]
    bad = json.loads(json.dumps(CalibrationFile(**base, conformal=rec).to_dict()))
    bad["conformal"]["flags"]["dae"]["0.2"]["tau"] = "x"
    with pytest.raises(InputError, match="conformal.flags.dae"):
        CalibrationFile.from_dict(bad)
