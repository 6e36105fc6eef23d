"""A reviewed scene saved to .mrb comes back as it was; 40 classes stay cheap; deleted nodes do
not break the review; every slice view of the view group jumps. All on a real MRML scene."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.mrml import nodes
from CalibUncertaintyLib.mrml.case_record import CASE_ATTRIBUTE, case_hubs, restore_case_nodes
from CalibUncertaintyLib.mrml.review import ReviewController
from CalibUncertaintyLib.mrml.slice_jump import distance_to_plane_mm, ensure_slice_node, ensure_slice_views

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer


def _scene(cache_dir):
    """A scene that can read .mrb bundles, as the application's scene can (it has a data I/O
    manager with a cache directory)."""
    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_dir))
    io = slicer.vtkDataIOManager()
    io.SetCacheManager(cache)
    scene.SetDataIOManager(io)
    scene.SetCacheManager(cache)
    return scene


def _prob_nodes(scene) -> list:
    nodes_ = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    out = [nodes_.GetItemAsObject(i) for i in range(nodes_.GetNumberOfItems())]
    return [n for n in out if (n.GetAttribute(nodes.ROLE_ATTRIBUTE) or "").startswith("prob_")]


def test_saved_mrb_brings_the_review_back_without_the_case_folder(sample_case_files, tmp_path):
    ct_path, case_dir = sample_case_files
    folder = tmp_path / "case"
    shutil.copytree(case_dir, folder)
    scene = _scene(tmp_path / "cache1")
    ct = nodes.load_volume_file(scene, ct_path)
    case = nodes.load_case_outputs(scene, folder, input_volume_node=ct)
    ctl = ReviewController(scene, case)
    ctl.set_foreground_map("prob_Organ")           # loads that one class's volume
    ctl.set_foreground_map("entropy")
    ctl.set_threshold(0.05, 0.5)
    ctl.set_opacity(0.35)
    ctl.go_to_region(1)
    region = case.regions[1]
    mrb = tmp_path / "review.mrb"
    assert scene.WriteToMRB(str(mrb))
    shutil.rmtree(folder)                         # the scene alone must be enough

    scene2 = _scene(tmp_path / "cache2")
    assert scene2.ReadFromMRB(str(mrb))
    (hub,) = case_hubs(scene2)
    restored = ReviewController.restore(scene2)
    assert restored.case.segmentation is hub
    assert restored.current_map == "entropy"
    assert restored.threshold == pytest.approx((0.05, 0.5))
    assert restored.opacity == pytest.approx(0.35)
    assert restored.current_region_index == 1
    # the display reached the restored nodes, not just the controller's fields
    entropy = restored.layer_node("entropy")
    assert entropy.GetScene() is scene2 and entropy.GetImageData() is not None
    np.testing.assert_allclose(slicer.util.arrayFromVolume(entropy), slicer.util.arrayFromVolume(case.maps["entropy"]))
    disp = entropy.GetDisplayNode()
    assert disp.GetApplyThreshold() == 1
    assert (disp.GetLowerThreshold(), disp.GetUpperThreshold()) == pytest.approx((0.05, 0.5))
    for comp in restored.composite_nodes:
        assert comp.GetForegroundVolumeID() == entropy.GetID()
        assert comp.GetForegroundOpacity() == pytest.approx(0.35)
        assert comp.GetBackgroundVolumeID() == restored.case.input_volume.GetID()
    for sn in restored.slice_nodes:
        assert abs(distance_to_plane_mm(sn, region.jump_ras)) < 1e-3
    assert [text for text, _ in nodes.visible_labels(restored.case.regions_markups)] == [region.label]
    # region list, table and markups; the legend's window
    assert [r.rank for r in restored.regions()] == [r.rank for r in case.regions]
    assert restored.case.regions_table.GetNumberOfRows() == len(case.regions)
    assert restored.case.regions_markups.GetNumberOfControlPoints() == len(case.regions)
    assert restored.value_range("entropy") == pytest.approx(ctl.value_range("entropy"))
    assert restored.legend("entropy").text() == ctl.legend("entropy").text()
    assert restored.threshold_source("entropy") == ctl.threshold_source("entropy")
    # navigation works after the restore
    restored.next_region()
    assert restored.current_region_index == 2 % len(case.regions)
    # the shown class came back; a class never shown needs its (deleted) file: a clear error
    assert "prob_Organ" in restored.map_names() and "prob_Nodule" in restored.map_names()
    assert restored.layer_node("prob_Organ").GetScene() is scene2
    with pytest.raises(InputError, match="not on disk"):
        restored.set_foreground_map("prob_Nodule")


def test_restore_takes_parameter_values_over_the_saved_state(sample_case_files, tmp_path):
    ct_path, case_dir = sample_case_files
    scene = _scene(tmp_path / "c1")
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=nodes.load_volume_file(scene, ct_path))
    ReviewController(scene, case).set_foreground_map("dae")
    mrb = tmp_path / "s.mrb"
    assert scene.WriteToMRB(str(mrb))
    scene2 = _scene(tmp_path / "c2")
    assert scene2.ReadFromMRB(str(mrb))
    ctl = ReviewController.restore(scene2, map_name="epkl", opacity=0.9, threshold=(0.01, 0.2), region=0)
    assert (ctl.current_map, ctl.opacity, ctl.threshold, ctl.current_region_index) == \
        ("epkl", pytest.approx(0.9), pytest.approx((0.01, 0.2)), 0)
    # ... and an unknown saved map falls back to the first map instead of failing
    ctl2 = ReviewController.restore(scene2, map_name="no_such_map")
    assert ctl2.current_map == ctl2.map_names()[0]


def test_a_scene_without_a_case_says_so():
    with pytest.raises(InputError, match="no CalibUncertainty case"):
        restore_case_nodes(slicer.vtkMRMLScene())


def test_forty_classes_add_no_probability_volume_until_one_is_shown(tmp_path):
    from CalibUncertaintyLib.mrml.sample_case import phantom_ct, write_sample_case

    ct, geo = phantom_ct(shape_zyx=(16, 40, 40))
    labels = np.zeros(geo.shape_zyx, np.uint8)
    for k in range(40):                            # 40 organs: 8 x 5 blocks of 4 x 6 voxels
        r, c = divmod(k, 5)
        labels[4:12, 2 + 4 * r:2 + 4 * r + 3, 2 + 7 * c:2 + 7 * c + 6] = k + 1
    case_dir = write_sample_case(tmp_path / "out", geo, labels=labels, case_id="many", n_members=2)
    assert len(list(case_dir.glob("prob_*.nii.gz"))) == 40
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, case_dir)
    assert _prob_nodes(scene) == []               # O(1): no probability volume yet
    assert case.segmentation.GetSegmentation().GetNumberOfSegments() == 40
    ctl = ReviewController(scene, case)
    names = ctl.map_names()
    assert sum(n.startswith("prob_") for n in names) == 40 and names[:len(case.maps)] == list(case.maps)
    ctl.set_foreground_map("prob_Class_17")
    assert [n.GetAttribute(nodes.ROLE_ATTRIBUTE) for n in _prob_nodes(scene)] == ["prob_Class_17"]
    node = case.probabilities["Class_17"]
    assert node.GetDisplayNode().GetLowerThreshold() == pytest.approx(nodes.PROB_DISPLAY_THRESHOLD)
    assert np.allclose(nodes.ijk_to_ras_of(node), nodes.ijk_to_ras_of(case.maps["entropy"]))
    ctl.set_foreground_map("prob_Class_17")        # asked again: the same node, nothing added
    ctl.set_foreground_map("entropy")
    assert len(_prob_nodes(scene)) == 1
    # the shown class is recorded, so a saved scene keeps it
    assert any(n.GetAttribute(nodes.ROLE_ATTRIBUTE) == "prob_Class_17"
               for n in restore_case_nodes(scene).probabilities.values())
    # all at once stays available for scripts
    scene_all = slicer.vtkMRMLScene()
    nodes.load_case_outputs(scene_all, case_dir, probabilities="all")
    assert len(_prob_nodes(scene_all)) == 40


def test_deleted_nodes_do_not_break_the_review(sample_case_files):
    ct_path, case_dir = sample_case_files
    scene = slicer.vtkMRMLScene()
    ct = nodes.load_volume_file(scene, ct_path)
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=ct)
    ctl = ReviewController(scene, case)
    ctl.set_foreground_map("dae")
    scene.RemoveNode(case.maps["dae"])
    with pytest.raises(InputError, match="deleted from the scene"):
        ctl.set_foreground_map("dae")
    assert ctl.prune_removed() == ["dae"]
    assert "dae" not in ctl.map_names() and ctl.current_map is None
    ctl.set_foreground_map("entropy")             # the rest of the review goes on
    ctl.next_region()
    # a deleted probability is read again from its file
    ctl.set_foreground_map("prob_Organ")
    first = case.probabilities["Organ"]
    scene.RemoveNode(first)
    ctl.set_foreground_map("prob_Organ")
    assert case.probabilities["Organ"] is not first and case.probabilities["Organ"].GetScene() is scene
    # the CT deleted: a new controller still works (no background)
    scene.RemoveNode(ct)
    ReviewController(scene, case).go_to_region(0)


def test_jump_moves_every_slice_view_of_the_view_group(sample_case_files):
    ct_path, case_dir = sample_case_files
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=nodes.load_volume_file(scene, ct_path))
    ensure_slice_views(scene)
    extra = ensure_slice_node(scene, "Slice4", "Axial")           # a fourth view of group 0
    other = ensure_slice_node(scene, "Other", "Axial", view_group=1)
    other_before = other.GetSliceToRAS().GetElement(2, 3)
    ctl = ReviewController(scene, case)
    ctl.set_foreground_map("entropy")
    moves = ctl.go_to_region(0)
    centroid = case.regions[0].jump_ras
    assert {m.slice_node_id for m in moves} >= {"vtkMRMLSliceNodeRed", "vtkMRMLSliceNodeYellow",
                                                "vtkMRMLSliceNodeGreen", extra.GetID()}
    assert abs(distance_to_plane_mm(extra, centroid)) < 1e-3
    assert other.GetSliceToRAS().GetElement(2, 3) == other_before and other.GetID() not in {m.slice_node_id for m in moves}
    # the fourth view shows the overlay too
    comp = next(c for c in ctl.composite_nodes if c.GetLayoutName() == "Slice4")
    assert comp.GetForegroundVolumeID() == case.maps["entropy"].GetID()


def test_created_slice_nodes_are_not_leaked():
    scene = slicer.vtkMRMLScene()
    created = ensure_slice_node(scene, "Leak", "Axial")
    plain = slicer.vtkMRMLSliceNode()
    plain.SetLayoutName("Plain")
    plain.SetSingletonTag("Plain")
    plain = scene.AddNode(plain)
    # the scene's reference and Python's: no extra reference left from CreateNodeByClass
    assert created.GetReferenceCount() == plain.GetReferenceCount()


def test_case_record_is_plain_json_on_the_segmentation(sample_case_files):
    import json

    ct_path, case_dir = sample_case_files
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=nodes.load_volume_file(scene, ct_path))
    doc = json.loads(case.segmentation.GetAttribute(CASE_ATTRIBUTE))
    assert doc["case_id"] == case.case_id and set(doc["probability_files"]) == {"Organ", "Nodule"}


def test_saved_mrml_scene_folder_brings_the_review_back(sample_case_files, tmp_path):
    """The same through a plain .mrml file with its data folder (Save scene as .mrml)."""
    ct_path, case_dir = sample_case_files
    scene = _scene(tmp_path / "c1")
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=nodes.load_volume_file(scene, ct_path))
    ctl = ReviewController(scene, case)
    ctl.set_foreground_map("epkl")
    ctl.set_threshold(0.02, 0.3)
    ctl.go_to_region(1)
    folder = tmp_path / "scene"
    folder.mkdir()
    assert scene.SaveSceneToSlicerDataBundleDirectory(str(folder))
    (mrml,) = folder.glob("*.mrml")
    scene2 = _scene(tmp_path / "c2")
    scene2.SetURL(str(mrml))
    assert scene2.Connect()
    restored = ReviewController.restore(scene2)
    assert (restored.current_map, restored.current_region_index) == ("epkl", 1)
    assert restored.threshold == pytest.approx((0.02, 0.3))
    assert restored.layer_node("epkl").GetImageData() is not None
