"""Headless slice rendering, PNG files and review sheets on a real MRML scene."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.mrml import colors
from CalibUncertaintyLib.mrml.overlay_display import displayed_window
from CalibUncertaintyLib.mrml.review_sheet import write_review_sheet
from CalibUncertaintyLib.mrml.slice_jump import slice_to_ras
from CalibUncertaintyLib.mrml.snapshots import encode_png, render_slice, render_view, write_png

from sample_review import load_sample_review

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer

MAP = "mutual_information"


@pytest.fixture()
def loaded(sample_case_files):
    scene, case, ctl = load_sample_review(sample_case_files)
    ctl.set_foreground_map(MAP)
    return scene, case, ctl


def _read_png(data: bytes) -> np.ndarray:
    import io

    from matplotlib import image

    return (image.imread(io.BytesIO(data), format="png")[..., :3] * 255).round().astype(np.uint8)


def test_overlay_inside_region_and_not_when_thresholded_away(loaded):
    scene, case, ctl = loaded
    n_nodes = scene.GetNumberOfNodes()
    region = case.regions[0]
    bg, fg = case.input_volume.GetID(), case.maps[MAP].GetID()
    shown = render_slice(scene, region.centroid_ras, "Axial", bg, fg, opacity=1.0)
    r, c = shown.pixel_of(region.centroid_ras)
    assert shown.rgb.shape == (256, 256, 3)
    px = shown.rgb[r, c].astype(int)
    assert px.max() - px.min() > 30, f"no overlay colour at the centroid: {px}"
    # the colour is the uncertainty table's entry for the voxel's value (window 0..robust max)
    lut = colors.table_rgba(colors.UNCERTAINTY)[:, :3].astype(int)
    zyx = tuple(np.round(region.raw["centroid_zyx"]).astype(int))
    value = float(slicer.util.arrayFromVolume(case.maps[MAP])[zyx])
    lo, hi = displayed_window(case.maps[MAP])          # the colour window Slicer draws with
    nearest = np.abs(lut - px).sum(axis=1)
    assert nearest.min() <= 3, "the pixel colour is not an entry of the uncertainty table"
    assert nearest.argmin() == pytest.approx(np.clip((value - lo) / (hi - lo) * 255, 0, 255), abs=2)
    background = render_slice(scene, region.centroid_ras, "Axial", bg, None, opacity=1.0)
    # far from every region (a corner of the body ring) the overlay is transparent
    assert np.array_equal(shown.rgb[r, c + 60], background.rgb[r, c + 60])
    ctl.set_threshold(region.max_u * 2 + 1)
    hidden = render_slice(scene, region.centroid_ras, "Axial", bg, fg, opacity=1.0)
    np.testing.assert_array_equal(hidden.rgb, background.rgb)
    assert scene.GetNumberOfNodes() == n_nodes          # temporary view nodes were removed


def test_opacity_blends_and_views_are_not_moved(loaded):
    scene, case, ctl = loaded
    region = case.regions[0]
    ctl.go_to_region(0)
    red = scene.GetNodeByID("vtkMRMLSliceNodeRed")
    red_before = slice_to_ras(red)
    bg, fg = case.input_volume.GetID(), case.maps[MAP].GetID()
    full = render_slice(scene, region.centroid_ras, "Coronal", bg, fg, 1.0, (96, 64), fov_mm=80.0)
    half = render_slice(scene, region.centroid_ras, "Coronal", bg, fg, 0.5, (96, 64), fov_mm=80.0)
    none = render_slice(scene, region.centroid_ras, "Coronal", bg, fg, 0.0, (96, 64), fov_mm=80.0)
    assert full.rgb.shape == (64, 96, 3)
    r, c = full.pixel_of(region.centroid_ras)
    mid = (full.rgb[r, c].astype(int) + none.rgb[r, c].astype(int)) / 2
    np.testing.assert_allclose(half.rgb[r, c], mid, atol=2)
    np.testing.assert_array_equal(slice_to_ras(red), red_before)
    # render_view shows what the Red view shows: the centroid in the middle, overlay visible
    ctl.set_opacity(1.0)
    view = render_view(scene, "vtkMRMLSliceNodeRed", (128, 128))
    vr, vc = view.pixel_of(region.centroid_ras)
    assert abs(vr - 63.5) <= 1 and abs(vc - 63.5) <= 1
    assert int(view.rgb[vr, vc].max()) - int(view.rgb[vr, vc].min()) > 30
    with pytest.raises(InputError, match="orientation"):
        render_slice(scene, region.centroid_ras, "Oblique", bg, fg)
    with pytest.raises(InputError, match="no volume node"):
        render_slice(scene, region.centroid_ras, "Axial", "vtkMRMLScalarVolumeNode999", fg)


def test_png_encoding_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_read_png(encode_png(rgb)), rgb)
    path = write_png(tmp_path / "x.png", rgb)
    np.testing.assert_array_equal(_read_png(path.read_bytes()), rgb)
    with pytest.raises(InputError, match="uint8"):
        encode_png(rgb.astype(float))


def test_review_sheets(loaded, tmp_path):
    scene, case, ctl = loaded
    png = write_review_sheet(scene, case, tmp_path / "sheet.png", top_n=2, controller=ctl)
    img = _read_png(png.read_bytes())
    assert img.shape[0] > 700 and img.shape[1] == 1000
    # the snapshots carry the overlay: some clearly coloured pixels from the uncertainty table
    coloured = (img.max(axis=2).astype(int) - img.min(axis=2)) > 60
    assert coloured.sum() > 200
    html = write_review_sheet(scene, case, tmp_path / "sheet.html", top_n=1, controller=ctl).read_text()
    assert f"case {case.case_id}" in html and html.count("<tr>") == 1 + len(case.regions)
    imgs = re.findall(r"<figure><img alt='(?:Axial|Sagittal|Coronal)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == 3
    assert _read_png(base64.b64decode(imgs[0])).shape == (256, 256, 3)
    assert case.regions[0].label in html
    with pytest.raises(InputError, match=".png or .html"):
        write_review_sheet(scene, case, tmp_path / "sheet.pdf")
    assert not (tmp_path / "sheet.pdf").exists()


def test_sheet_table_leaves_out_single_voxels_and_background():
    from types import SimpleNamespace

    from CalibUncertaintyLib.io.geometry import Geometry
    from CalibUncertaintyLib.mrml.case_folder import Region
    from CalibUncertaintyLib.mrml.review_sheet import sheet_regions

    geo = Geometry((10, 10, 10), (5.0, 5.0, 2.5), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))   # 62.5 mm³ voxels
    regions = [Region(1, "Mandible", 625.0, 0.4, 0.9, (0, 0, 0), n_voxels=10, class_index=5),
               Region(2, "background", 6250.0, 0.5, 0.9, (0, 0, 0), n_voxels=100, class_index=0),
               Region(3, "Brainstem", 62.5, 0.3, 0.3, (0, 0, 0), n_voxels=1, class_index=1),
               Region(4, "Brainstem", 12.0, 0.3, 0.3, (0, 0, 0), class_index=1),
               Region(5, "SpinalCord", 125.0, 0.3, 0.3, (0, 0, 0), n_voxels=2, class_index=2)]
    chosen = sheet_regions(SimpleNamespace(geometry=geo, regions=regions))
    assert [r.rank for r in chosen.listed] == [1, 5]
    assert (chosen.too_small, chosen.background) == (2, 1)
    assert "2 of a single voxel (62.5 mm³) or less" in chosen.note() and "1 outside every predicted organ" in chosen.note()


@pytest.mark.parametrize("cal, says, never", [
    ({"method": "temperature", "temperature": 1.7, "n_cases": 4}, "temperature scaling, T = 1.7; fitted on 4", None),
    ({"method": "local_temperature", "temperature": 1.7}, "local temperature T(x)", "T = 1.7"),
    ({"method": "class_temperature", "temperature": 1.7}, "per-class temperature", "T = 1.7"),
    ({"method": "vector", "temperature": 1.0}, "vector scaling", "T = 1"),
    (None, "none (uncalibrated", None)])
def test_sheet_names_the_calibrator(cal, says, never):
    from CalibUncertaintyLib.mrml.review_sheet import _calibration_text

    text = _calibration_text({"calibration": cal})
    assert says in text and (never is None or never not in text), text
