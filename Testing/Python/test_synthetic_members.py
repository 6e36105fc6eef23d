"""Synthetic nnU-Net-style members: deterministic, valid softmax, close to the labels, over-confident."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CalibUncertaintyLib.calibration.roi import roi_mask
from CalibUncertaintyLib.calibration.temperature import TemperatureScaler, safe_log
from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.io.nnunet_outputs import load_member_probs, pair_cases
from CalibUncertaintyLib.synthetic.members import MemberSpec, make_member_folders, member_probabilities

CASES = ("OKBP_train_001", "OKBP_train_002")


@pytest.fixture(scope="module")
def real_case(openkbp_dir):
    return read_image(openkbp_dir / "labelsTr" / f"{CASES[0]}.nii.gz")


def test_deterministic_valid_and_close_to_labels(real_case):
    labels, geom = real_case
    a = list(member_probabilities(labels, geom, 6, 2, CASES[0], seed=3))
    b = list(member_probabilities(labels, geom, 6, 2, CASES[0], seed=3))
    c = next(member_probabilities(labels, geom, 6, 1, CASES[0], seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c)
    assert not np.array_equal(a[0], a[1])  # members differ from each other
    for p in a:
        assert p.dtype == np.float32 and p.shape == (6,) + geom.shape_zyx
        assert np.abs(p.sum(0) - 1).max() < 1e-5 and p.min() >= 0
        seg = p.argmax(0)
        for k in range(1, 6):
            dice = 2 * np.sum((seg == k) & (labels == k)) / (np.sum(seg == k) + np.sum(labels == k))
            assert dice > 0.4, (k, dice)
        assert 0 < np.mean(seg != labels) < 0.01


def test_members_are_over_confident_so_temperature_above_one(real_case):
    labels, geom = real_case
    pbar = np.mean(list(member_probabilities(labels, geom, 6, 3, CASES[0], seed=0)), axis=0)
    roi = roi_mask(pbar.argmax(0), geom.spacing_zyx, 15.0)
    x = safe_log(pbar[:, roi].T)
    ts = TemperatureScaler().fit(x, labels[roi])
    assert ts.temperature_ > 1.5 and ts.nll_after_ < ts.nll_before_
    # sharpen = 1 with the same noise is much less over-confident
    soft = np.mean(list(member_probabilities(labels, geom, 6, 3, CASES[0], seed=0,
                                             spec=MemberSpec(sharpen=1.0))), axis=0)
    t_soft = TemperatureScaler().fit(safe_log(soft[:, roi].T), labels[roi]).temperature_
    assert t_soft < ts.temperature_


def test_empty_labels_and_bad_input():
    geom = Geometry((5, 6, 7), (1.0, 1.0, 2.0))
    empty = np.zeros(geom.shape_zyx, np.uint8)
    (p,) = member_probabilities(empty, geom, 3, 1)
    assert (p.argmax(0) == 0).all() and p[0].min() > 0.999
    with pytest.raises(InputError, match="outside 0..2"):
        next(member_probabilities(empty + 3, geom, 3, 1))
    with pytest.raises(InputError, match="sharpen must be > 0"):
        MemberSpec(sharpen=0)


def test_make_member_folders_writes_nnunet_layout(openkbp_dir, tmp_path):
    dirs = make_member_folders(openkbp_dir / "labelsTr", tmp_path, CASES, n_members=2, seed=1)
    assert [d.name for d in dirs] == ["member_0", "member_1"]
    meta = json.loads((dirs[1] / "synthetic_members.json").read_text())
    assert meta["member"] == 1 and meta["seed"] == 1 and meta["n_classes"] == 6
    assert json.loads((dirs[0] / "dataset.json").read_text())["labels"]["Mandible"] == 5
    pairing = pair_cases(dirs, openkbp_dir / "imagesTr", openkbp_dir / "labelsTr")
    assert [c.case for c in pairing.cases] == list(CASES) and pairing.class_names[5] == "Mandible"
    probs, geom = load_member_probs(dirs[0], CASES[1])
    labels, lgeom = read_image(openkbp_dir / "labelsTr" / f"{CASES[1]}.nii.gz")
    assert geom.mismatch(lgeom) is None
    again = next(member_probabilities(labels, lgeom, 6, 1, CASES[1], seed=1))
    assert np.array_equal(probs, again)  # a case's members do not depend on the other cases
    with pytest.raises(InputError, match="no label file for case"):
        make_member_folders(openkbp_dir / "labelsTr", tmp_path / "x", ["nope"], 1)
