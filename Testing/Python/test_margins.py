"""Organ margins end to end: process_case writes margins_<Class>.nii.gz from the calibration
file's conformal record (pipeline/margins.py), and the MRML side shows them as nested segments
(mrml/margins.py) on a real slicer-core scene."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CalibUncertaintyLib.calibration import conformal
from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.pipeline.case import CaseOptions, process_case
from CalibUncertaintyLib.pipeline.fit import case_margin_curves
from CalibUncertaintyLib.synthetic.members import member_probabilities

GEOM = Geometry((18, 22, 26), (1.25, 0.875, 2.5), (10.5, -20.25, 5.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
NAMES = ["background", "Left Parotid", "Cord"]


def _labels(shift=0):
    z, y, x = np.indices(GEOM.shape_zyx)
    lab = np.zeros(GEOM.shape_zyx, np.uint8)
    lab[(z - 9) ** 2 * 4 + (y - 11 - shift) ** 2 * 0.8 + (x - 9) ** 2 * 1.44 < 60] = 1
    lab[4:14, 6:12, 16 + shift:22 + shift] = 2
    return lab


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    """A calibration with conformal margins fitted on 4 synthetic cases (α = 0.25 needs ≥ 3), applied to a fifth."""
    root = tmp_path_factory.mktemp("margins")
    curves = []
    for i in range(4):
        lab = _labels(shift=i % 2)
        members = list(member_probabilities(lab, GEOM, 3, 3, f"c{i}", seed=i))
        pbar = np.mean(members, axis=0)
        curves.append(case_margin_curves(pbar, lab, np.argmax(pbar, axis=0)))
    rec = conformal.build_record(0.25, {}, {NAMES[c]: [cc[c - 1] for cc in curves] for c in (1, 2)})
    cal = CalibrationFile(method="temperature", temperature=1.0, class_names=NAMES, fingerprint={"n_classes": 3},
                          ebcu_threshold=0.3, conformal=rec).validate()
    cal = CalibrationFile.from_dict(json.loads(json.dumps(cal.to_dict())))  # JSON round trip
    lab = _labels()
    members = list(member_probabilities(lab, GEOM, 3, 3, "new", seed=9))
    process_case("new", members, GEOM, root, calibration=cal, class_names=NAMES,
                 options=CaseOptions(map_names=("entropy",), regions_map="entropy"))
    return root / "new", rec


def test_margins_files_nest_for_every_organ(case_dir):
    d, rec = case_dir
    summary = json.loads((d / "summary.json").read_text())
    block = summary["margins"]
    assert set(block["classes"]) == {"Left Parotid", "Cord"} and block["alpha"] == 0.25
    assert block["guarantee"]["outer"] == "outer contour holds ≥ 75 % of the organ's voxels in expectation"
    seg, _ = read_image(d / "seg.nii.gz")
    for name, m in block["classes"].items():
        levels, geo = read_image(d / m["file"])
        assert geo == GEOM and m["file"] in summary["files"]
        c = NAMES.index(name)
        assert np.array_equal(levels >= 2, seg == c)
        inner, outer = levels == 3, levels >= 1
        assert not (inner & ~outer).any() and inner.sum() < (seg == c).sum() <= outer.sum()
        th = rec["margins"][name]["0.25"]
        assert (m["outer_threshold"], m["inner_threshold"]) == (th["outer"], th["inner"])


def test_margins_as_segments_in_a_scene(case_dir):
    slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
    from CalibUncertaintyLib.mrml import nodes
    from CalibUncertaintyLib.mrml.margins import guarantee_lines, segment_masks

    d, _ = case_dir
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, d)
    assert case.margins is not None and case.margins in case.output_nodes()
    ref = case.maps["entropy"]
    masks = segment_masks(scene, case.margins, ref)
    assert len(masks) == 6
    summary = json.loads((d / "summary.json").read_text())
    for name, m in summary["margins"]["classes"].items():
        levels, _ = read_image(d / m["file"])
        inner, pred, outer = masks[f"{name} inner"], masks[f"{name} prediction"], masks[f"{name} outer"]
        assert np.array_equal(inner, levels == 3) and np.array_equal(pred, levels >= 2)
        assert np.array_equal(outer, levels >= 1)
        assert not (inner & ~pred).any() and not (pred & ~outer).any()
    assert any("Organ margins" in line for line in guarantee_lines(case.summary))
    n = scene.GetNumberOfNodes()
    case.remove_from_scene(scene)
    assert scene.GetNumberOfNodes() < n and case.margins.GetScene() is None


def test_empty_margins_load_as_empty_segments(case_dir, tmp_path):
    """An organ absent from a case, or an inner contour that a trivial α leaves empty, is an empty
    margin: it loads as an empty segment (AddEmptySegment adds nothing in a scene without the
    converter rules, which crashed `review` on the quick demo's outputs)."""
    import shutil

    slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
    from CalibUncertaintyLib.io.images import write_image
    from CalibUncertaintyLib.mrml import nodes
    from CalibUncertaintyLib.mrml.margins import segment_masks

    src, _ = case_dir
    d = tmp_path / "new"
    shutil.copytree(src, d)
    summary = json.loads((d / "summary.json").read_text())
    files = {name: d / m["file"] for name, m in summary["margins"]["classes"].items()}
    levels, geo = read_image(files["Cord"])
    write_image(files["Cord"], np.zeros_like(levels), geo)  # the whole organ absent
    levels, geo = read_image(files["Left Parotid"])
    write_image(files["Left Parotid"], np.minimum(levels, 2), geo)  # no inner contour
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, d, allow_identity_mismatch=True)
    masks = segment_masks(scene, case.margins, case.maps["entropy"])
    assert sorted(masks) == sorted(f"{o} {p}" for o in ("Cord", "Left Parotid") for p in ("inner", "prediction", "outer"))
    assert not any(masks[f"Cord {p}"].any() for p in ("inner", "prediction", "outer"))
    assert not masks["Left Parotid inner"].any() and masks["Left Parotid prediction"].any()


def test_trivial_outer_contour_is_not_drawn(case_dir, tmp_path):
    """A trivial outer contour is the whole image (too few calibration cases): drawn, it is a frame
    around every view that says nothing (seen on the stock model with 4 calibration cases). It
    loads as an empty segment, through the module's stepwise loader and the one-call path alike,
    while the organ's prediction and inner contour stay as they were."""
    import shutil

    slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
    from CalibUncertaintyLib.io.images import write_image
    from CalibUncertaintyLib.mrml import nodes
    from CalibUncertaintyLib.mrml.margins import add_margins_node, segment_masks, trivial_outer_organs

    src, _ = case_dir
    d = tmp_path / "trivial"
    shutil.copytree(src, d)
    summary = json.loads((d / "summary.json").read_text())
    rec = summary["margins"]["classes"]["Cord"]
    levels, geo = read_image(d / rec["file"])
    write_image(d / rec["file"], np.maximum(levels, 1).astype(np.uint8), geo)  # outer = the whole image
    rec["trivial_outer"], rec["outer_threshold"] = True, 0.0
    (d / "summary.json").write_text(json.dumps(summary))
    assert trivial_outer_organs(summary) == {"Cord"}
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, d, allow_identity_mismatch=True)
    other = add_margins_node(scene, d, summary, case.geometry, "one call")
    for node in (case.margins, other):
        masks = segment_masks(scene, node, case.maps["entropy"])
        assert not masks["Cord outer"].any()
        assert np.array_equal(masks["Cord prediction"], levels >= 2)
        assert np.array_equal(masks["Cord inner"], levels >= 3)
        assert masks["Left Parotid outer"].any()  # a real outer contour is still drawn


@pytest.mark.parametrize("kind", ["local_temperature", "class_temperature"])
def test_streamed_local_temperature_and_margins_equal_the_whole_volume(tmp_path, monkeypatch, kind):
    """process_case never holds the calibrated (K, z, y, x) volume: the segmentation is argmax p̄,
    T(x) comes from it, and the probability and margins files are written slab by slab (here
    3 z slices per slab). They equal what the whole-volume path gives: the calibration file's
    transform of p̄ and margin_levels on it."""
    from CalibUncertaintyLib.calibration.local_temperature import make_scaler
    from CalibUncertaintyLib.uncertainty.streaming import EnsembleAccumulator

    monkeypatch.setattr(EnsembleAccumulator.__init__, "__defaults__", (3 * 22 * 26,))
    lab = _labels()
    members = [m.astype(np.float32) for m in member_probabilities(lab, GEOM, 3, 3, "loc", seed=4)]
    pbar = np.mean(members, axis=0)
    x = np.log(np.maximum(pbar, 1e-7)).reshape(3, -1).T
    from CalibUncertaintyLib.calibration.local_temperature import contour_distance_mm

    seg0 = np.argmax(pbar, axis=0)
    dist = contour_distance_mm(seg0, GEOM.spacing_zyx).reshape(-1)
    rng = np.random.default_rng(1)
    y = np.where(rng.random(lab.size) < 0.85, lab.reshape(-1), rng.integers(0, 3, lab.size))
    scaler = make_scaler(kind, edges_mm=(0.0, 2.0, 4.0)).fit(x, y, seg0.reshape(-1), dist)
    curves = [case_margin_curves(pbar, lab, seg0) for _ in range(3)]
    rec = conformal.build_record(0.25, {}, {NAMES[c]: [cc[c - 1] for cc in curves] for c in (1, 2)})
    cal = CalibrationFile(method=kind, temperature=1.3, class_names=NAMES, fingerprint={"n_classes": 3},
                          ebcu_threshold=0.3, conformal=rec, local=scaler.to_record()).validate()
    cal = CalibrationFile.from_dict(json.loads(json.dumps(cal.to_dict())))
    summary = process_case("loc", members, GEOM, tmp_path, calibration=cal, class_names=NAMES,
                           options=CaseOptions(map_names=("confidence", "entropy"), regions_map="entropy"))
    d = tmp_path / "loc"
    acc_mean = np.sum(members, axis=0, dtype=np.float32) / np.float32(3)
    expected = cal.transform_probs(acc_mean, spacing_zyx=GEOM.spacing_zyx)
    seg, _ = read_image(d / "seg.nii.gz")
    assert np.array_equal(seg, np.argmax(expected, axis=0))
    for c, stem in ((1, "Left_Parotid"), (2, "Cord")):
        got, geo = read_image(d / f"prob_{stem}.nii.gz")
        assert geo == GEOM
        np.testing.assert_allclose(got, expected[c], rtol=0, atol=2e-7)
        th = conformal.at_alpha(rec, "margins", NAMES[c])
        levels, _ = read_image(d / f"margins_{stem}.nii.gz")
        assert np.array_equal(levels, conformal.margin_levels(expected[c], seg == c, th["outer"], th["inner"]))
        vol = summary["margins"]["classes"][NAMES[c]]["volumes_mm3"]
        assert vol["outer"] == pytest.approx(np.count_nonzero(levels >= 1) * GEOM.voxel_volume_mm3)
    conf, _ = read_image(d / "map_confidence.nii.gz")
    np.testing.assert_allclose(conf, expected.max(axis=0), rtol=0, atol=2e-7)
    assert not np.allclose(expected, acc_mean, atol=1e-3)  # the local T did change the probabilities
