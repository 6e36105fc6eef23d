"""Threshold calibration by mean UEO (METHODS.md §4): the chosen τ* / q* on constructed cases,
exactness against a brute-force search, quantile maps, defaults and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from CalibUncertaintyLib.calibration.thresholds import (DEFAULT_THRESHOLDS, calibrate_thresholds, flag_mask,
                                                        threshold_entry, threshold_for_case, uncertainty_score)
from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.metrics import ueo


def _brute_force(maps, errors, rois, name):
    """Best mean UEO over every distinct value (and below the minimum) of the pooled ROI scores."""
    vals = np.unique(np.concatenate([m[name][r] for m, r in zip(maps, rois)]))
    cands = np.concatenate(([vals[0] - 1.0], vals))
    means = [np.mean([ueo(m[name], e, t, r) for m, e, r in zip(maps, errors, rois)]) for t in cands]
    j = int(np.argmax(means))
    return cands[j], means[j]


def _cases(rng, n_cases=3, shape=(8, 16, 16)):
    maps, errors, rois = [], [], []
    for i in range(n_cases):
        e = rng.random(shape) < 0.08 + 0.02 * i
        roi = np.ones(shape, bool)
        roi[:, :, :2] = False
        # errors U ~ U(0.5, 1), correct voxels U ~ U(0, 0.7)
        ent = np.where(e, 0.5 + 0.5 * rng.random(shape), 0.7 * rng.random(shape))
        levels = np.round(ent * 5) / 5  # five levels: an exactly searchable discrete map
        maps.append({"entropy": ent.astype(np.float32), "vote_disagreement": levels})
        errors.append(e)
        rois.append(roi)
    return maps, errors, rois


def test_discrete_map_exact_and_separable_case():
    rng = np.random.default_rng(0)
    maps, errors, rois = _cases(rng)
    res = calibrate_thresholds(maps, errors, rois)
    tau_bf, best_bf = _brute_force(maps, errors, rois, "vote_disagreement")
    v = res["vote_disagreement"]
    assert v["kind"] == "absolute" and v["q"] is None and v["n_cases"] == 3 and v["score"] == "map"
    assert v["mean_ueo"] == pytest.approx(best_bf)
    assert v["tau"] == pytest.approx(tau_bf)
    # perfectly separable: errors at 0.8, correct voxels at 0.4 or 0 -> τ* = 0.4 (lowest maximiser)
    sep_maps = []
    for e in errors:
        m = np.where(e, 0.8, 0.4)
        m[~e & (rng.random(e.shape) < 0.3)] = 0.0
        sep_maps.append({"vote_disagreement": m})
    sep = calibrate_thresholds(sep_maps, errors, rois)["vote_disagreement"]
    assert sep["tau"] == pytest.approx(0.4) and sep["mean_ueo"] == pytest.approx(1.0)


def test_continuous_map_close_to_brute_force():
    rng = np.random.default_rng(1)
    maps, errors, rois = _cases(rng, shape=(4, 12, 12))
    res = calibrate_thresholds(maps, errors, rois, n_candidates=64)["entropy"]
    tau_bf, best_bf = _brute_force(maps, errors, rois, "entropy")
    # correct voxels reach 0.7, so the optimum sits just below it
    assert abs(res["tau"] - 0.7) < 0.01 and abs(tau_bf - 0.7) < 0.01
    assert best_bf - 0.005 <= res["mean_ueo"] <= best_bf + 1e-12
    # what the entry claims is what UEO gives when the entry is applied
    again = np.mean([ueo(m["entropy"], e, res["tau"], r) for m, e, r in zip(maps, errors, rois)])
    assert again == pytest.approx(res["mean_ueo"], abs=1e-9)
    # enough candidates for every distinct value: exact
    exact = calibrate_thresholds(maps, errors, rois, n_candidates=10_000)["entropy"]
    assert exact["mean_ueo"] == pytest.approx(best_bf)


def test_confidence_uses_per_case_quantile():
    rng = np.random.default_rng(2)
    shape = (6, 20, 20)
    maps, errors, rois = [], [], []
    for i in range(4):
        conf = 0.6 + 0.4 * rng.random(shape)
        low = conf < np.quantile(conf, 0.10)           # errors: the 10 % least confident voxels
        conf = conf * (0.7 + 0.1 * i) + 0.05 * i       # each case on its own confidence level
        maps.append({"confidence": conf})
        errors.append(low)
        rois.append(np.ones(shape, bool))
    res = calibrate_thresholds(maps, errors, rois)
    c = res["confidence"]
    assert c["kind"] == "quantile" and c["score"] == "1 - map"
    per_case = [threshold_for_case(c, m["confidence"], r) for m, r in zip(maps, rois)]
    assert c["tau"] == pytest.approx(np.mean(per_case))  # the record of the per-case τ
    assert np.ptp(per_case) > 0.1                         # which really differ between cases
    assert 0.88 < c["q"] < 0.92 and c["mean_ueo"] > 0.95
    for m, e, r in zip(maps, errors, rois):
        tau = threshold_for_case(c, m["confidence"], r)
        assert np.array_equal(flag_mask(c, m["confidence"], r), uncertainty_score("confidence", m["confidence"]) > tau)
        flagged = flag_mask(c, m["confidence"], r)
        assert 2 * np.sum(flagged & e) / (flagged.sum() + e.sum()) > 0.95
    # one absolute threshold cannot follow the per-case levels
    absolute = calibrate_thresholds(maps, errors, rois, kinds={"confidence": "absolute"})["confidence"]
    assert absolute["kind"] == "absolute" and absolute["mean_ueo"] < c["mean_ueo"] - 0.2


def test_defaults_and_entry_lookup():
    assert DEFAULT_THRESHOLDS["entropy"]["tau"] == pytest.approx(0.5 * math.log(2))
    assert DEFAULT_THRESHOLDS["confidence"]["kind"] == "quantile"
    names = {"confidence", "entropy", "entropy_norm", "expected_entropy", "mutual_information", "epkl",
             "fg_variance", "vote_disagreement", "dae", "ebcu"}
    assert names <= set(DEFAULT_THRESHOLDS)
    cal = {"entropy": {"tau": 0.2, "kind": "absolute", "q": None, "score": "map"}}
    assert threshold_entry("entropy", cal)["tau"] == 0.2
    assert threshold_entry("dae", cal) is DEFAULT_THRESHOLDS["dae"]
    with pytest.raises(InputError, match="no threshold"):
        threshold_entry("made_up_map", cal)
    # quantile default on an empty ROI flags nothing
    u = np.random.default_rng(3).random((3, 3, 3))
    assert threshold_for_case(DEFAULT_THRESHOLDS["confidence"], u, np.zeros(u.shape, bool)) == math.inf
    assert not flag_mask(DEFAULT_THRESHOLDS["confidence"], u, np.zeros(u.shape, bool)).any()


def test_bad_inputs_raise():
    e = np.zeros((2, 2, 2), bool)
    with pytest.raises(InputError, match="at least one"):
        calibrate_thresholds([], [], [])
    with pytest.raises(InputError, match="one of each"):
        calibrate_thresholds([{"entropy": np.zeros((2, 2, 2))}], [e, e], [None])
    with pytest.raises(InputError, match="lacks map"):
        calibrate_thresholds([{"entropy": np.zeros((2, 2, 2))}, {}], [e, e], [None, None])
    with pytest.raises(InputError, match="differ in shape"):
        calibrate_thresholds([{"entropy": np.zeros((2, 2, 3))}], [e], [None])
    with pytest.raises(InputError, match="kinds"):
        calibrate_thresholds([{"entropy": np.zeros((2, 2, 2))}], [e], [None], kinds={"entropy": "relative"})
    with pytest.raises(InputError, match="kind"):
        threshold_for_case({"kind": "other"}, np.zeros(3))


def test_constant_map_flags_nothing():
    """A map that is the same everywhere (mutual information of a single model is 0) carries no
    information: its τ* must flag nothing, although flagging the whole ROI would score a UEO > 0."""
    import numpy as np

    from CalibUncertaintyLib.calibration.thresholds import calibrate_thresholds, flag_mask

    rng = np.random.default_rng(0)
    errors = [rng.random((6, 8, 8)) < 0.3 for _ in range(2)]
    rois = [np.ones((6, 8, 8), bool) for _ in range(2)]
    maps = [{"mutual_information": np.zeros((6, 8, 8), np.float32)} for _ in range(2)]
    entry = calibrate_thresholds(maps, errors, rois)["mutual_information"]
    assert entry["source"] == "constant map"
    assert entry["mean_ueo"] == 0.0
    assert not flag_mask(entry, maps[0]["mutual_information"], rois[0]).any()
