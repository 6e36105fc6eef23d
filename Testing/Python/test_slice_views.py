"""The review as Slicer draws it: pixel tests through Slicer's own slice view (issue 16).

Pictures come from ``mrml/slice_views.py``: slicer-core's ``vtkMRMLSliceLogic`` and its
segmentation and markups slice displayable managers, offscreen (Mesa EGL here), in a private
scene. The case is driven as the module drives it (ReviewController). Cases: the synthetic sample
case, the quick demo's deep-ensemble case (``calib-uncertainty demo --quick``, session fixture);
real CT is in test_cli_real_ct.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.mrml import offscreen_gl
from CalibUncertaintyLib.mrml.review_sheet import sheet_content
from CalibUncertaintyLib.mrml.slice_views import SliceViews
from CalibUncertaintyLib.mrml.snapshots import case_markups, case_segmentations, render_slice, render_view
from CalibUncertaintyLib.mrml.view_marks import orientation_letters

import view_pixels
from sample_review import load_sample_review

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer


def _node_summary(scene) -> list:
    return sorted((scene.GetNthNode(i).GetClassName(), scene.GetNthNode(i).GetID())
                  for i in range(scene.GetNumberOfNodes()))


@pytest.fixture(scope="module")
def sample(sample_case_files):
    return load_sample_review(sample_case_files)


@pytest.fixture(scope="module")
def views(sample):
    status = offscreen_gl.offscreen_gl_status()
    assert status.available, f"offscreen OpenGL is expected on this machine (Mesa EGL): {status.reason}"
    with SliceViews(sample[0]) as v:
        yield v


# --- the sample case ---------------------------------------------------------------------------
def test_overlay_visible_with_the_contours_the_module_shows(views, sample):
    scene, case, ctl = sample
    view_pixels.overlay_visible_inside_an_organ(views, case, ctl, "mutual_information")
    seg = case.segmentation.GetDisplayNode()
    assert not seg.GetVisibility2DFill() and seg.GetVisibility2DOutline()   # the module's display state


def test_nothing_drawn_above_an_out_of_range_threshold(views, sample):
    view_pixels.nothing_above_an_out_of_range_threshold(views, sample[1], sample[2], "mutual_information")


def test_every_view_centred_on_the_region_after_next(views, sample):
    view_pixels.every_view_centred_after_next(views, sample[1], sample[2])


def test_legend_range_is_the_display_nodes_window(sample):
    scene, case, ctl = sample
    legend = view_pixels.legend_equals_display(case, ctl, "entropy")
    lo, hi = ctl.threshold
    assert legend.range[0] == pytest.approx(lo)          # the colours start where the drawing starts
    # a threshold above the robust top: the window follows it, the legend too
    top = float(slicer.util.arrayFromVolume(ctl.layer_node("entropy")).max())
    legend = view_pixels.legend_equals_display(case, ctl, "entropy", 0.5 * top, top)
    assert legend.range[0] == pytest.approx(0.5 * top) and legend.shown == pytest.approx((0.5 * top, top))
    ctl.set_threshold(*ctl.default_range("entropy"))


def test_review_sheet_legend_is_what_slicer_draws(views, sample):
    scene, case, ctl = sample
    ctl.set_foreground_map("mutual_information")
    content = sheet_content(scene, case, top_n=1, controller=ctl, views=views)
    assert content.legend.range == ctl.legend().range
    assert content.legend.shown == ctl.threshold and content.fallback is None
    assert any("colours" in line for line in content.lines)
    assert [n for n, _c in content.organs] == ["Organ", "Nodule"]


def test_pictures_add_nothing_to_the_scene_and_keep_the_display(views, sample):
    scene, case, ctl = sample
    ctl.set_foreground_map("mutual_information")
    before = _node_summary(scene)
    disp = case.segmentation.GetDisplayNode()
    state = (disp.GetVisibility2DFill(), disp.GetVisibility2DOutline())
    snap = render_slice(scene, case.regions[0].centroid_ras, "Sagittal", case.input_volume,
                        case.maps["mutual_information"], 0.6, (64, 64), 80.0, case_segmentations(case),
                        case_markups(case), views=views)
    render_view(scene, "vtkMRMLSliceNodeGreen", (64, 48), views=views)
    sheet_content(scene, case, top_n=1, controller=ctl, views=views)
    assert _node_summary(scene) == before            # no view node, no proxy, no colour node added
    assert (disp.GetVisibility2DFill(), disp.GetVisibility2DOutline()) == state
    assert snap.rgb.shape == (64, 64, 3) and "displayable managers" in snap.renderer


def test_orientation_letters_of_slicers_planes(views):
    expected = {"Axial": ("R", "L", "A", "P"), "Sagittal": ("A", "P", "S", "I"), "Coronal": ("R", "L", "S", "I")}
    for o, (left, right, top, bottom) in expected.items():
        x, y = views.plane_axes(o)
        m = np.eye(4)
        m[:3, 0], m[:3, 1] = x, y
        assert orientation_letters(m) == {"left": left, "right": right, "top": top, "bottom": bottom}, o


def test_without_opengl_the_pictures_say_so(sample, monkeypatch, caplog, tmp_path):
    scene, case, ctl = sample
    monkeypatch.setattr(offscreen_gl, "_status", None)
    monkeypatch.setenv(offscreen_gl.ENV_SWITCH, "0")
    with caplog.at_level(logging.WARNING):
        with SliceViews(scene) as v:
            assert v.window is None
            snap = v.render(case.regions[0].centroid_ras, "Axial", case.input_volume,
                            case.maps["mutual_information"], 1.0, (200, 200), None, case_segmentations(case))
    assert "cannot be drawn with OpenGL" in caplog.text
    assert snap.fallback and "NOT drawn" in snap.fallback and "CALIBU_OFFSCREEN_GL=0" in snap.fallback
    band = snap.rgb[:8].reshape(-1, 3)
    assert (np.abs(band.astype(int) - (170, 0, 0)).sum(axis=1) < 10).mean() > 0.5, "no red banner"
    content = sheet_content(scene, case, top_n=1, controller=ctl)
    assert content.fallback and content.lines[-1].startswith("WARNING")


# --- the quick demo's case -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_case(quick_demo):
    from CalibUncertaintyLib.mrml.nodes import load_case_outputs, load_volume_file
    from CalibUncertaintyLib.mrml.review import ReviewController

    workdir, _res = quick_demo
    case_dir = workdir / "maps" / "deep" / "phantom_007"
    ct = next((workdir / "nnUNet_raw").glob("*/imagesTs/phantom_007_0000.nii.gz"))
    scene = slicer.vtkMRMLScene()
    case = load_case_outputs(scene, case_dir, load_volume_file(scene, ct))
    with SliceViews(scene) as v:
        yield v, case, ReviewController(scene, case)


def test_quick_demo_case_through_slicers_views(demo_case):
    views, case, ctl = demo_case
    layer = case.regions_doc["map"]
    assert case.margins is not None                     # the margins' prediction segments are drawn too
    view_pixels.overlay_visible_inside_an_organ(views, case, ctl, layer)
    view_pixels.nothing_above_an_out_of_range_threshold(views, case, ctl, layer)
    view_pixels.every_view_centred_after_next(views, case, ctl)
    view_pixels.legend_equals_display(case, ctl, layer)


def test_review_on_the_quick_demos_outputs(quick_demo, tmp_path, capsys):
    workdir, _res = quick_demo
    rc = main(["review", "--outputs", str(workdir / "maps" / "deep" / "phantom_007"), "--format", "html",
               "-o", str(tmp_path / "sheets")])
    out = capsys.readouterr().out
    assert rc == 0, out
    sheets = sorted((tmp_path / "sheets").iterdir())
    assert [p.name for p in sheets] == ["phantom_007_review.html"]
    text = sheets[0].read_text()
    # the CT was found from the case's input identity, the views are Slicer's, the calibrator named
    assert "WARNING" not in text and "calibration: temperature scaling, T = " in text and "contours:" in text
