"""Multi-rater metrics (METHODS.md §3, CURVAS style) on the real LIDC-IDRI four-rater slabs and on
constructed cases: consensus/dissensus counts, consensus Dice, soft-reference ECE, volume CRPS."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.metrics import (consensus_regions, crps_normal, multirater_metrics, soft_reference,
                                         volume_crps)

CASES = ("LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003")


@pytest.fixture(scope="module")
def lidc(lidc_dir):
    meta = json.loads((lidc_dir / "cases.json").read_text())
    out = {}
    for case in CASES:
        masks = [read_image(lidc_dir / f"{case}_rater{r}.nii.gz") for r in range(1, 5)]
        out[case] = ([m for m, _ in masks], masks[0][1], meta[case])
    return out


@pytest.mark.parametrize("case", CASES)
def test_consensus_counts_on_lidc(lidc, case):
    raters, geom, meta = lidc[case]
    stack = np.stack(raters).astype(bool)
    union, inter = stack.any(0), stack.all(0)
    reg = consensus_regions(raters)
    assert reg["consensus_fg"].sum() == inter.sum()
    assert reg["dissensus"].sum() == union.sum() - inter.sum()
    assert reg["consensus"].sum() + reg["dissensus"].sum() == stack[0].size
    soft = soft_reference(raters)
    res = multirater_metrics(soft, raters, geom.voxel_volume_mm3)
    assert res["n_dissensus"] == union.sum() - inter.sum()
    assert res["n_consensus_fg"] == inter.sum()
    # rater volumes agree with the data set's own per-rater voxel counts
    expected = [r["voxels"] * geom.voxel_volume_mm3 for r in meta["raters"]]
    np.testing.assert_allclose(res["rater_volumes_mm3"], expected)
    # predicting the soft reference: consensus Dice 1, perfectly calibrated against it
    assert res["consensus_dice"]["dice"] == 1.0
    assert res["ece_soft"] == pytest.approx(0.0, abs=1e-9)
    # its volume is the raters' mean, so z = 0 and CRPS = σ(√2 − 1)/√π
    crps = res["volume_crps"]
    sigma = float(np.std(expected))
    assert crps["defined"] and crps["sigma"] == pytest.approx(sigma)
    assert crps["crps"] == pytest.approx(sigma * (math.sqrt(2) - 1) / math.sqrt(math.pi), rel=1e-6)


def test_lidc_0002_two_empty_raters(lidc):
    raters, geom, _ = lidc["LIDC-IDRI-0002"]
    assert raters[0].sum() == 0 and raters[1].sum() == 0 and raters[2].sum() > 0
    soft = soft_reference(raters)
    res = multirater_metrics(soft, raters, geom.voxel_volume_mm3)
    # nobody agrees on any foreground voxel: consensus foreground empty, all marked voxels dissensus
    assert res["n_consensus_fg"] == 0
    assert res["n_dissensus"] == int((raters[2] | raters[3]).sum())
    d = res["consensus_dice"]
    assert d["dice"] == 1.0 and d["empty_reference"] and d["empty_prediction"]  # soft ≤ 0.5 everywhere
    # against an empty rater every bin has accuracy 0, so ECE = mean predicted probability
    assert res["ece_per_rater"][0] == pytest.approx(float(soft.mean()), rel=1e-6)
    assert res["ece_per_rater"][2] != pytest.approx(res["ece_per_rater"][0])


def test_lidc_0003_prediction_of_one_rater_with_roi(lidc):
    raters, geom, _ = lidc["LIDC-IDRI-0003"]
    p = raters[3].astype(np.float32) * 0.9 + 0.05  # a confident copy of rater 4
    roi = np.zeros(p.shape, bool)
    zz, yy, xx = np.nonzero(np.stack(raters).any(0))
    roi[:, yy.min() - 10:yy.max() + 10, xx.min() - 10:xx.max() + 10] = True
    res = multirater_metrics(p, raters, geom.voxel_volume_mm3, mask=roi)
    assert res["n_voxels"] == roi.sum()
    assert res["ece_per_rater"][3] == pytest.approx(0.05, abs=1e-6)  # gap 0.05 in both occupied bins
    assert res["ece_soft"] > 0.05
    assert res["volume_crps"]["predicted_volume"] > max(res["rater_volumes_mm3"][:3])


def test_equal_rater_volumes_make_crps_undefined():
    shape = (6, 12, 12)
    raters = []
    for shift in range(3):  # three cubes of 27 voxels in different places: equal volumes
        r = np.zeros(shape, np.uint8)
        r[2:5, 3 + shift:6 + shift, 3:6] = 1
        raters.append(r)
    p = soft_reference(raters)
    res = multirater_metrics(p, raters, voxel_volume_mm3=2.0)
    c = res["volume_crps"]
    assert c["crps"] is None and not c["defined"] and "equal" in c["reason"]
    assert c["sigma"] == 0.0 and c["mu"] == pytest.approx(54.0)
    # consensus foreground: the 3x1x3 column shared by all three cubes
    assert res["n_consensus_fg"] == 9
    assert res["n_dissensus"] == 3 * 5 * 3 - 9


def test_crps_closed_form_matches_integral():
    from scipy import integrate, stats

    for x, mu, sigma in ((3.0, 1.0, 2.0), (-1.0, 0.5, 0.3), (10.0, 10.0, 5.0)):
        f = lambda y: (stats.norm.cdf(y, mu, sigma) - (y >= x)) ** 2  # noqa: E731
        lo, hi = mu - 12 * sigma, mu + 12 * sigma
        ref = integrate.quad(f, lo, x, limit=200)[0] + integrate.quad(f, x, hi, limit=200)[0]
        assert crps_normal(x, mu, sigma) == pytest.approx(ref, rel=1e-6)
    assert volume_crps(4.0, [2.0, 6.0])["crps"] == pytest.approx(crps_normal(4.0, 4.0, 2.0))


def test_bad_multirater_input():
    with pytest.raises(InputError, match="at least 2 raters"):
        soft_reference([np.zeros((2, 2, 2))])
    with pytest.raises(InputError, match="same grid"):
        multirater_metrics(np.zeros((2, 2, 2)), [np.zeros((2, 2, 3))] * 2, 1.0)
    with pytest.raises(InputError, match="binary"):
        consensus_regions([np.full((2, 2, 2), 2), np.zeros((2, 2, 2))])
