"""Case outputs as MRML nodes: geometry, display, segments, markups, table, hierarchy, failures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from CalibUncertaintyLib.errors import GeometryMismatchError, InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image, write_image
from CalibUncertaintyLib.mrml import colors, nodes
from CalibUncertaintyLib.mrml.sample_case import phantom_ct, write_sample_case

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    """A per-case folder on a grid with a rotated direction and a non-zero origin, plus its CT."""
    root = tmp_path_factory.mktemp("mrml_nodes")
    ct, geo = phantom_ct()
    assert geo.direction != (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0) and any(geo.origin)
    ct_path = write_image(root / "ct.nii.gz", ct, geo)
    case_dir = write_sample_case(root / "out", geo, case_id="phantom", input_image=str(ct_path))
    return ct_path, case_dir


def _sitk_ras(path, ijk):
    """RAS of voxel (i, j, k) computed by SimpleITK from the file (independent reference)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    lps = img.TransformIndexToPhysicalPoint([int(v) for v in ijk])
    return np.array([-lps[0], -lps[1], lps[2]])


def _node_ras(node, ijk):
    m = nodes.ijk_to_ras_of(node)
    return (m @ np.r_[np.asarray(ijk, float), 1.0])[:3]


def _copy_case(case_dir, dest):
    out = dest / case_dir.name
    shutil.copytree(case_dir, out)
    return out


def test_outputs_sit_on_the_input_voxels(phantom_case):
    ct_path, case_dir = phantom_case
    scene = slicer.vtkMRMLScene()
    ct_node = nodes.load_volume_file(scene, ct_path)
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=ct_node, probabilities="all")
    assert len(case.probabilities) == 2
    shape = case.geometry.shape_zyx
    corners = [(0, 0, 0), (shape[2] - 1, 0, 0), (0, shape[1] - 1, 0), (3, 5, shape[0] - 1),
               (shape[2] - 1, shape[1] - 1, shape[0] - 1)]
    for name, node in {"CT": ct_node, **case.layers()}.items():
        fname = "seg.nii.gz" if name == "CT" else (f"{name}.nii.gz" if name.startswith("prob_")
                                                   else f"map_{name}.nii.gz")
        ref_file = ct_path if name == "CT" else case_dir / fname
        for ijk in corners:
            np.testing.assert_allclose(_node_ras(node, ijk), _sitk_ras(ref_file, ijk), atol=1e-4,
                                       err_msg=f"{name} voxel {ijk}")
            np.testing.assert_allclose(_node_ras(node, ijk), _node_ras(ct_node, ijk), atol=1e-6)
    # voxel values unchanged by the trip through MRML
    arr, _ = read_image(case_dir / "map_mutual_information.nii.gz")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(case.maps["mutual_information"]), arr)


def test_segmentation_named_from_class_names_and_aligned(phantom_case):
    ct_path, case_dir = phantom_case
    scene = slicer.vtkMRMLScene()
    ct_node = nodes.load_volume_file(scene, ct_path)
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=ct_node)
    seg, _ = read_image(case_dir / "seg.nii.gz")
    segmentation = case.segmentation.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
             for i in range(segmentation.GetNumberOfSegments())}
    assert set(names) == {"Organ", "Nodule"}
    for label, name in ((1, "Organ"), (2, "Nodule")):
        mask = nodes.segment_array(scene, case.segmentation, names[name], ct_node)
        np.testing.assert_array_equal(mask.astype(bool), seg == label)


def test_display_nodes_use_project_tables_windows_and_thresholds(phantom_case):
    ct_path, case_dir = phantom_case
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=nodes.load_volume_file(scene, ct_path))
    prob_id = colors.colour_table_id(scene, colors.PROBABILITY)
    unc_id = colors.colour_table_id(scene, colors.UNCERTAINTY)
    assert case.probabilities == {}                   # on demand: none until shown
    loaded = [case.layer_node(scene, n) for n in case.layer_names() if n.startswith("prob_")]
    assert len(loaded) == 2 and list(case.probabilities.values()) == loaded
    for node in loaded:
        d = node.GetDisplayNode()
        assert d.GetColorNodeID() == prob_id
        # the colours span what is shown (overlay_display.overlay_window): p from 0.1 to 1
        assert (d.GetWindowLevelMin(), d.GetWindowLevelMax()) == pytest.approx((nodes.PROB_DISPLAY_THRESHOLD, 1.0))
        assert d.GetApplyThreshold() == 1 and d.GetLowerThreshold() == pytest.approx(nodes.PROB_DISPLAY_THRESHOLD)
    regions_doc = json.loads((case_dir / "regions.json").read_text())
    for name, node in case.maps.items():
        d = node.GetDisplayNode()
        arr = slicer.util.arrayFromVolume(node)
        assert d.GetColorNodeID() == unc_id
        # colour window = the shown range, its top capped at the robust top (overlay_window)
        lo, hi = case.default_shown[name]
        assert d.GetWindowLevelMin() == pytest.approx(lo, rel=1e-5)
        assert d.GetWindowLevelMax() == pytest.approx(min(hi, case.value_ranges[name][1]), rel=1e-5) \
            or d.GetWindowLevelMax() == pytest.approx(hi, rel=1e-5)
        assert d.GetWindowLevelMax() <= arr.max() + 1e-6
        assert d.GetApplyThreshold() == 1
        assert (d.GetLowerThreshold(), d.GetUpperThreshold()) == pytest.approx(case.default_shown[name], rel=1e-5)
    summary = json.loads((case_dir / "summary.json").read_text())
    # τ* of the regions map comes from regions.json, the others from summary.json's thresholds
    assert case.default_thresholds["mutual_information"] == (regions_doc["threshold"], regions_doc["threshold_source"])
    tau_e = summary["thresholds"]["entropy"]["tau_abs"]
    assert case.default_thresholds["entropy"][0] == pytest.approx(tau_e)
    assert case.default_shown["entropy"][0] == pytest.approx(tau_e)
    # confidence is flagged where it is LOW: shown from its minimum up to τ
    tau_c = summary["thresholds"]["confidence"]["tau_abs"]
    assert summary["thresholds"]["confidence"]["flag"] == "below"
    conf = slicer.util.arrayFromVolume(case.maps["confidence"])
    assert case.default_shown["confidence"] == pytest.approx((float(conf.min()), tau_c))
    assert case.input_volume.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeGrey"


def test_fallback_threshold_when_the_folder_gives_none(phantom_case, tmp_path):
    _ct_path, case_dir = phantom_case
    copy = _copy_case(case_dir, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    del summary["thresholds"]["entropy"]
    (copy / "summary.json").write_text(json.dumps(summary))
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, copy)
    ent = slicer.util.arrayFromVolume(case.maps["entropy"])
    tau, src = case.default_thresholds["entropy"]
    assert src == "fallback q95"
    assert tau == pytest.approx(np.quantile(ent[ent > 0.01 * ent.max()], 0.95), rel=1e-6)
    assert case.maps["entropy"].GetDisplayNode().GetLowerThreshold() == pytest.approx(tau, rel=1e-5)


def test_regions_markups_table_and_hierarchy(phantom_case):
    ct_path, case_dir = phantom_case
    scene = slicer.vtkMRMLScene()
    ct_node = nodes.load_volume_file(scene, ct_path)
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=ct_node, name_prefix="P1")
    regions = json.loads((case_dir / "regions.json").read_text())["regions"]
    assert len(regions) >= 2 and len(case.regions) == len(regions)
    m = case.regions_markups
    assert m.GetNumberOfControlPoints() == len(regions)
    for i, r in enumerate(regions):
        assert m.GetNthControlPointLabel(i) == f"R{r['rank']} {r['class_name']} {r['volume_mm3']:.0f} mm³"
        np.testing.assert_allclose(m.GetNthControlPointPosition(i), r["jump_ras"], atol=1e-6)
        assert not m.GetNthControlPointVisibility(i)        # shown one at a time, by the review
    assert nodes.visible_labels(m) == []
    t = case.regions_table
    assert t.GetNumberOfRows() == len(regions)
    cols = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    assert cols[:5] == ["rank", "class", "volume mm³", "mean uncertainty", "max uncertainty"]
    assert t.GetCellText(0, 1) == regions[0]["class_name"]
    assert float(t.GetCellText(1, 3)) == pytest.approx(regions[1]["mean_u"], rel=1e-5)
    assert case.maps["entropy"].GetName() == "P1 entropy"

    # slicer-core has the subject hierarchy node: everything sits in one folder under the CT's item
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ct_item = sh.GetItemByDataNode(ct_node)
    assert ct_item and sh.GetItemParent(case.folder_item) == ct_item
    assert sh.GetItemName(case.folder_item) == "P1 CalibUncertainty"
    for node in case.output_nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == case.folder_item, node.GetName()

    n_before_removal = scene.GetNumberOfNodes()
    case.remove_from_scene(scene)
    assert scene.GetNumberOfNodes() < n_before_removal
    assert scene.GetNodeByID(case.maps["entropy"].GetID()) is None
    assert case.folder_item == 0 and sh.GetNumberOfItemChildren(ct_item) == 0


def test_input_loaded_from_summary_when_not_given(phantom_case):
    _ct_path, case_dir = phantom_case
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, case_dir)
    assert case.owns_input and case.input_volume is not None
    assert case.input_volume in case.output_nodes()


def test_missing_files_listed_and_scene_untouched(phantom_case, tmp_path):
    _ct_path, case_dir = phantom_case
    broken = _copy_case(case_dir, tmp_path)
    (broken / "map_entropy.nii.gz").unlink()           # maps: others remain, so not listed
    (broken / "prob_Nodule.nii.gz").unlink()
    (broken / "summary.json").unlink()
    scene = slicer.vtkMRMLScene()
    ct_node = nodes.load_volume_file(scene, _ct_path)
    n = scene.GetNumberOfNodes()
    with pytest.raises(InputError) as err:
        nodes.load_case_outputs(scene, broken, input_volume_node=ct_node)
    assert "summary.json" in str(err.value) and "prob_Nodule.nii.gz" in str(err.value)
    assert scene.GetNumberOfNodes() == n
    for f in broken.glob("map_*.nii.gz"):
        f.unlink()
    (broken / "seg.nii.gz").unlink()
    with pytest.raises(InputError, match=r"seg\.nii\.gz.*map_<name>"):
        nodes.load_case_outputs(scene, broken)
    assert scene.GetNumberOfNodes() == n
    with pytest.raises(InputError, match="not found"):
        nodes.load_case_outputs(scene, tmp_path / "nope")


def test_wrong_grid_and_bad_json_leave_scene_untouched(phantom_case, tmp_path):
    ct_path, case_dir = phantom_case
    broken = _copy_case(case_dir, tmp_path)
    arr, geo = read_image(broken / "map_entropy.nii.gz")
    shifted = Geometry(geo.shape_zyx, geo.spacing, (geo.origin[0] + 5.0, *geo.origin[1:]), geo.direction)
    write_image(broken / "map_entropy.nii.gz", arr, shifted)
    scene = slicer.vtkMRMLScene()
    n = scene.GetNumberOfNodes()
    with pytest.raises(GeometryMismatchError, match="map_entropy"):
        nodes.load_case_outputs(scene, broken)
    assert scene.GetNumberOfNodes() == n

    broken2 = _copy_case(case_dir, tmp_path / "b2")
    (broken2 / "regions.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        nodes.load_case_outputs(scene, broken2)
    assert scene.GetNumberOfNodes() == n

    # an input volume on another grid is refused before anything is added
    ct, geo_ct = read_image(ct_path)
    other = nodes.new_volume_node(ct[:, :, ::-1].copy(), Geometry(geo_ct.shape_zyx, (1.0, 1.0, 1.0)), "other")
    scene.AddNode(other)
    n = scene.GetNumberOfNodes()
    with pytest.raises(GeometryMismatchError, match="voxel grid of input volume 'other'"):
        nodes.load_case_outputs(scene, case_dir, input_volume_node=other)
    assert scene.GetNumberOfNodes() == n


def test_failure_while_adding_nodes_rolls_back(phantom_case, monkeypatch):
    """Fault injection: the table step fails after volumes were added; all of them go again."""
    ct_path, case_dir = phantom_case
    scene = slicer.vtkMRMLScene()
    ct_node = nodes.load_volume_file(scene, ct_path)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ids_before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    def broken_table(*_a, **_k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(nodes, "_table_node", broken_table)
    with pytest.raises(RuntimeError, match="disk gone"):
        nodes.load_case_outputs(scene, case_dir, input_volume_node=ct_node)
    assert {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())} == ids_before
    assert sh.GetItemByDataNode(ct_node) == 0 or sh.GetNumberOfItemChildren(sh.GetItemByDataNode(ct_node)) == 0


def test_volume_file_round_trip_keeps_geometry(phantom_case, tmp_path):
    ct_path, _ = phantom_case
    scene = slicer.vtkMRMLScene()
    node = nodes.load_volume_file(scene, ct_path)
    out = nodes.export_volume_node(node, tmp_path / "exported.nrrd")
    a0, g0 = read_image(ct_path)
    a1, g1 = read_image(out)
    assert g1.mismatch(g0) is None
    np.testing.assert_allclose(g1.direction, g0.direction, atol=1e-9)
    np.testing.assert_array_equal(a1, a0)
    assert nodes.geometry_from_volume_node(node).mismatch(g0) is None


def test_real_openkbp_ct_geometry(openkbp_dir, tmp_path):
    """A real head-and-neck CT (LPS direction diag(-1, -1, 1)): outputs on its grid line up."""
    ct_path = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    label_path = openkbp_dir / "labelsTr" / ct_path.name.replace("_0000", "")
    labels, geo = read_image(label_path)
    names = ["background"] + list(json.loads((openkbp_dir / "dataset.json").read_text())["labels"])[1:]
    # a sub-box around the organs keeps the test fast; its origin moves with the crop start
    nz = np.argwhere(labels > 0)
    lo = np.maximum(nz.min(axis=0) - 4, 0)
    hi = np.minimum(nz.max(axis=0) + 5, geo.shape_zyx)
    ct, _ = read_image(ct_path)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_geo = Geometry(tuple(int(b - a) for a, b in zip(lo, hi)), geo.spacing,
                       tuple(geo.index_to_lps(lo[::-1])), geo.direction)
    sub_ct = write_image(tmp_path / "ct_crop.nii.gz", ct[crop], sub_geo)
    case_dir = write_sample_case(tmp_path / "out", sub_geo, labels=labels[crop], class_names=names,
                                 case_id="okbp", n_members=2)
    scene = slicer.vtkMRMLScene()
    full = nodes.load_volume_file(scene, ct_path)
    crop_node = nodes.load_volume_file(scene, sub_ct)
    assert full.GetDisplayNode().GetWindow() == pytest.approx(400.0)   # HU data: soft-tissue window
    assert nodes.geometry_from_volume_node(full).mismatch(geo) is None
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=crop_node)
    # voxel (i, j, k) of the crop is voxel lo + (i, j, k) of the full CT: same RAS point
    for ijk in [(0, 0, 0), (5, 7, 3), tuple(np.array(sub_geo.shape_zyx[::-1]) - 1)]:
        full_ijk = np.asarray(ijk) + lo[::-1]
        np.testing.assert_allclose(_node_ras(case.maps["entropy"], ijk), _node_ras(full, full_ijk), atol=1e-4)
        np.testing.assert_allclose(_node_ras(full, full_ijk), _sitk_ras(ct_path, full_ijk), atol=1e-4)
    seg_names = {case.segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(case.segmentation.GetSegmentation().GetNumberOfSegments())}
    assert seg_names <= set(names[1:]) and "Mandible" in seg_names
    assert all(r.class_name in names for r in case.regions) and case.regions


def test_case_segmentation_saves_without_error(phantom_case, tmp_path):
    """The case segmentation carries the CT's grid as reference image geometry, so writing it (as a
    scene save does) logs no ERROR (issue 16 item 5; before: 'Conversion parameter Reference image
    geometry is not found' on every save)."""
    import vtk

    ct_path, case_dir = phantom_case
    scene = slicer.vtkMRMLScene()
    ct_node = nodes.load_volume_file(scene, ct_path)
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=ct_node)
    seg = case.segmentation.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    log = tmp_path / "vtk_messages.txt"
    window = vtk.vtkFileOutputWindow()
    window.SetFileName(str(log))
    window.SetFlush(True)
    previous = vtk.vtkOutputWindow.GetInstance()
    vtk.vtkOutputWindow.SetInstance(window)
    try:
        geometry = seg.GetConversionParameter(name)
        case.segmentation.AddDefaultStorageNode()
        storage = case.segmentation.GetStorageNode()
        storage.SetFileName(str(tmp_path / "segmentation.seg.nrrd"))
        assert storage.WriteData(case.segmentation)
    finally:
        vtk.vtkOutputWindow.SetInstance(previous)
    messages = log.read_text() if log.exists() else ""
    assert "ERROR" not in messages and "Reference image geometry" not in messages, messages
    # the reference grid is the CT's: same IJK->RAS and extent
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    np.testing.assert_allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)],
                               nodes.ijk_to_ras_of(ct_node), atol=1e-5)
    assert image.GetExtent() == ct_node.GetImageData().GetExtent()


def test_forty_five_organs_get_distinct_colours(phantom_case):
    """A 45-class model: every organ its own colour (issue 16 item 6: before, colours repeated every
    8 classes), each far from the overlay colour maps; a name matching the scene's
    GenericAnatomyColors table takes Slicer's anatomical colour; the loader colours segments so."""
    from CalibUncertaintyLib.mrml import segment_colours

    scene = slicer.vtkMRMLScene()
    colors.ensure_default_colour_nodes(scene)
    anatomy = slicer.vtkMRMLColorTableNode()          # stands in for Slicer's GenericAnatomyColors
    anatomy.SetName("GenericAnatomyColors")
    anatomy.SetTypeToUser()
    anatomy.SetNumberOfColors(2)
    anatomy.SetColor(0, "background", 0, 0, 0, 0)
    anatomy.SetColor(1, "spinal cord", 0.2, 0.9, 1.0, 1.0)
    scene.AddNode(anatomy)
    names = {k: f"Organ_{k:02d}" for k in range(1, 46)}
    names[7] = "Spinal_Cord"
    by_name = {n: np.asarray(colors.class_colour(k, n, scene)) for k, n in names.items()}
    np.testing.assert_allclose(by_name["Spinal_Cord"], (0.2, 0.9, 1.0), atol=0.003)   # 8-bit table
    rgb = np.array([c for n, c in by_name.items() if n != "Spinal_Cord"]) * 255
    lab = segment_colours.srgb_to_lab(rgb)
    d = segment_colours.delta_e(lab, lab)
    np.fill_diagonal(d, np.inf)
    assert d.min() > 15, "two organs got (nearly) the same colour"
    assert segment_colours.delta_e(lab, segment_colours.overlay_lab()).min() >= segment_colours.OVERLAY_MIN_DE
    # a loaded case's segments carry exactly these colours (organ segmentation and margins)
    ct_path, case_dir = phantom_case
    case = nodes.load_case_outputs(scene, case_dir, input_volume_node=nodes.load_volume_file(scene, ct_path))
    class_names = case.summary["class_names"]             # ["background", "Organ", "Nodule"]
    seg = case.segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == len(class_names) - 1
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        label = class_names.index(segment.GetName())
        np.testing.assert_allclose(segment.GetColor(), colors.class_colour(label, segment.GetName(), scene), atol=1e-6)
