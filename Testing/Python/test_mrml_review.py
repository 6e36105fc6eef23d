"""ReviewController and slice jumps on a real MRML scene."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.mrml import nodes
from CalibUncertaintyLib.mrml.case_folder import MAP_ORDER
from CalibUncertaintyLib.mrml.review import ReviewController
from CalibUncertaintyLib.mrml.slice_jump import (DEFAULT_SLICE_NODE_IDS, distance_to_plane_mm,
                                                 ensure_slice_views, jump_slices_to_ras, slice_to_ras)

from sample_review import load_sample_review

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer


@pytest.fixture()
def loaded(sample_case_files):
    return load_sample_review(sample_case_files)


def test_ensure_slice_views_creates_standard_views_once():
    scene = slicer.vtkMRMLScene()
    views = ensure_slice_views(scene)
    n = scene.GetNumberOfNodes()
    assert n == 6 and set(views) == {"Red", "Yellow", "Green"}
    assert {v: views[v][0].GetOrientation() for v in views} == {
        "Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
    assert views["Red"][0].GetID() == "vtkMRMLSliceNodeRed"
    assert views["Green"][1].GetID() == "vtkMRMLSliceCompositeNodeGreen"
    ensure_slice_views(scene)
    assert scene.GetNumberOfNodes() == n
    # axial plane normal is S, sagittal R, coronal A
    normals = {v: slice_to_ras(views[v][0])[:3, 2] for v in views}
    np.testing.assert_allclose(np.abs(normals["Red"]), [0, 0, 1], atol=1e-9)
    np.testing.assert_allclose(np.abs(normals["Yellow"]), [1, 0, 0], atol=1e-9)
    np.testing.assert_allclose(np.abs(normals["Green"]), [0, 1, 0], atol=1e-9)


def test_jump_centred_and_offset():
    scene = slicer.vtkMRMLScene()
    p = (12.5, -40.25, 71.0)
    moves = jump_slices_to_ras(scene, p)
    assert [m.slice_node_id for m in moves] == list(DEFAULT_SLICE_NODE_IDS)
    for sid in DEFAULT_SLICE_NODE_IDS:
        m = slice_to_ras(scene.GetNodeByID(sid))
        np.testing.assert_allclose(m[:3, 3], p, atol=1e-9)        # centred: the point is the centre
    assert all(m.moved and m.shift_mm > 0 for m in moves)
    q = (-3.0, 8.0, 20.0)
    red = scene.GetNodeByID("vtkMRMLSliceNodeRed")
    moves = jump_slices_to_ras(scene, q, slice_nodes=[red], centred=False)
    after = slice_to_ras(red)[:3, 3]
    assert abs(distance_to_plane_mm(red, q)) < 1e-9
    np.testing.assert_allclose(after[:2], p[:2], atol=1e-9)       # offset: in-plane pan kept
    assert len(moves) == 1 and moves[0].moved
    with pytest.raises(InputError, match="finite"):
        jump_slices_to_ras(scene, (0, np.nan, 0))
    with pytest.raises(InputError, match="no slice node"):
        jump_slices_to_ras(scene, q, slice_nodes=["vtkMRMLSliceNodeBlue"])


def test_foreground_opacity_and_threshold(loaded):
    scene, case, ctl = loaded
    assert ctl.map_names() == list(MAP_ORDER) + ["prob_Organ", "prob_Nodule"]
    events = []
    remove = ctl.add_listener(lambda e, v: events.append((e, v)))
    ctl.set_foreground_map("entropy")
    for comp in ctl.composite_nodes:
        assert comp.GetForegroundVolumeID() == case.maps["entropy"].GetID()
        assert comp.GetBackgroundVolumeID() == case.input_volume.GetID()
    ctl.set_opacity(0.35)
    assert [c.GetForegroundOpacity() for c in ctl.composite_nodes] == pytest.approx([0.35] * 3)
    ctl.set_threshold(0.2, 0.9)
    d = case.maps["entropy"].GetDisplayNode()
    assert d.GetApplyThreshold() == 1
    assert (d.GetLowerThreshold(), d.GetUpperThreshold()) == pytest.approx((0.2, 0.9))
    assert ctl.threshold == pytest.approx((0.2, 0.9))
    ctl.set_threshold(0.3)                          # hi defaults to the layer maximum
    assert d.GetUpperThreshold() == pytest.approx(float(slicer.util.arrayFromVolume(case.maps["entropy"]).max()))
    # switching away and back keeps each layer's own threshold
    ctl.set_foreground_map("prob_Organ")
    assert ctl.threshold[0] == pytest.approx(nodes.PROB_DISPLAY_THRESHOLD)
    ctl.set_foreground_map("entropy")
    assert ctl.threshold[0] == pytest.approx(0.3)
    assert [e for e, _ in events] == ["foreground", "opacity", "threshold", "threshold",
                                      "foreground", "foreground"]
    remove()
    ctl.set_opacity(0.5)
    assert len(events) == 6
    with pytest.raises(InputError, match="between 0 and 1"):
        ctl.set_opacity(1.5)
    with pytest.raises(InputError, match="lo <= hi"):
        ctl.set_threshold(0.9, 0.1)
    with pytest.raises(InputError, match="available"):
        ctl.set_foreground_map("nonexistent")


def test_default_threshold_from_regions_json(loaded, sample_case_files):
    _scene, case, ctl = loaded
    doc = json.loads((sample_case_files[1] / "regions.json").read_text())
    assert ctl.default_threshold(doc["map"]) == pytest.approx(doc["threshold"])
    assert ctl.threshold_source(doc["map"]) == doc["threshold_source"]
    ctl.set_foreground_map(doc["map"])
    assert case.maps[doc["map"]].GetDisplayNode().GetLowerThreshold() == pytest.approx(doc["threshold"])
    summary = json.loads((sample_case_files[1] / "summary.json").read_text())
    assert ctl.default_threshold("entropy") == pytest.approx(summary["thresholds"]["entropy"]["tau_abs"])
    assert ctl.default_range("entropy")[0] == pytest.approx(ctl.default_threshold("entropy"))
    assert ctl.threshold_source("entropy").startswith("summary.json thresholds")
    assert "mutual" in ctl.legend(doc["map"]).text().lower()


def test_region_navigation_moves_all_three_views(loaded, sample_case_files):
    scene, case, ctl = loaded
    doc = json.loads((sample_case_files[1] / "regions.json").read_text())
    regions = ctl.regions()
    assert [r.rank for r in regions] == [r["rank"] for r in doc["regions"]]
    assert len(regions) >= 2
    seen = []
    ctl.add_listener(lambda e, v: seen.append(v) if e == "region" else None)
    order = []
    for step in (ctl.next_region, ctl.next_region, ctl.next_region, ctl.previous_region):
        moves = step()
        i = ctl.current_region_index
        order.append(i)
        c = regions[i].jump_ras                          # the region's most uncertain part
        assert c == tuple(doc["regions"][i]["jump_ras"])
        assert len(moves) == 3
        for sn in ctl.slice_nodes:
            assert abs(distance_to_plane_mm(sn, c)) < 1e-6, sn.GetName()
            np.testing.assert_allclose(slice_to_ras(sn)[:3, 3], c, atol=1e-6)
        markups = case.regions_markups
        assert [markups.GetNthControlPointSelected(k) for k in range(len(regions))] == \
            [k == i for k in range(len(regions))]
        # only the current region's markup and label are drawn: no two labels can overlap
        assert nodes.visible_labels(markups) == [(regions[i].label, pytest.approx(c))]
    n = len(regions)
    assert order == [0, 1 % n, 2 % n, 1 % n]            # wraps after the last region
    assert seen == order
    ctl.current_region_index = None
    ctl.previous_region()
    assert ctl.current_region_index == n - 1             # previous from the start: the last one
    with pytest.raises(InputError, match="out of range"):
        ctl.go_to_region(n)


def test_clamped_navigation_and_no_regions(sample_case_files, tmp_path):
    ct_path, case_dir = sample_case_files
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=nodes.load_volume_file(scene, ct_path))
    ctl = ReviewController(scene, case, wrap=False)
    for _ in range(len(case.regions) + 2):
        ctl.next_region()
    assert ctl.current_region_index == len(case.regions) - 1
    case.regions = []
    empty = ReviewController(scene, case)
    red_before = slice_to_ras(empty.slice_nodes[0])
    assert empty.next_region() is None and empty.previous_region() is None
    np.testing.assert_array_equal(slice_to_ras(empty.slice_nodes[0]), red_before)
