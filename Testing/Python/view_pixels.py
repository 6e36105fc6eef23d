"""Pixel checks through Slicer's own slice view (mrml/slice_views.py), shared by the view tests on
the sample case, the quick demo's case (test_slice_views.py) and real CT (test_cli_real_ct.py).

Each takes a loaded case and its ReviewController, drives the review as the module does
(controller methods only), draws with Slicer's slice logic and displayable managers offscreen,
and asserts on pixels.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_erosion

from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.mrml.overlay_display import displayed_window
from CalibUncertaintyLib.mrml.slice_jump import DEFAULT_SLICE_NODE_IDS, distance_to_plane_mm
from CalibUncertaintyLib.mrml.snapshots import case_markups, case_segmentations, render_view
from CalibUncertaintyLib.mrml.view_checks import flagged_voxel, overlay_pixel_check

SIZE = (240, 240)


def _organs(case) -> np.ndarray:
    seg, _geo = read_image(case.case_dir / "seg.nii.gz")
    return seg > 0


def overlay_visible_inside_an_organ(views, case, ctl, layer):
    """The overlay's own colour at a shown voxel of a region *inside a predicted organ* (where
    Slicer would draw the segment fill), with the segmentation and margins displayed as the
    module displays them while ``layer`` is shown; about 10 pixels per voxel, so the pixel at the
    voxel's centre is the voxel and not a contour line on its edge. Returns the check."""
    import slicer

    ctl.set_foreground_map(layer)
    ctl.set_opacity(1.0)
    node = ctl.layer_node(layer)
    lo, hi = ctl.threshold
    values = slicer.util.arrayFromVolume(node)
    organs = _organs(case)
    for region in case.regions:
        zyx = flagged_voxel(values, region, lo, hi, within=organs)
        if zyx is not None:
            break
    else:
        raise AssertionError(f"no shown voxel of {layer} inside a predicted organ in any region")
    ras = tuple(case.geometry.zyx_to_ras(zyx))
    fov = 24.0 * float(min(case.geometry.spacing))
    snap = views.render(ras, "Axial", case.input_volume, node, 1.0, SIZE, fov, case_segmentations(case))
    assert snap.fallback is None, snap.fallback
    check = overlay_pixel_check(snap, ras, node, float(values[zyx]))
    assert check.ok, f"{case.case_id} {layer}: overlay hidden at a flagged voxel inside an organ: {check.message()}"
    # the contours are drawn, as outlines: against the same view without segmentations, the
    # pixels that change are thin lines (nothing survives a 5x5 erosion; a fill would), and the
    # voxel's own pixel does not change
    bare = views.render(ras, "Axial", case.input_volume, node, 1.0, SIZE, fov, ())
    changed = np.any(snap.rgb != bare.rgb, axis=2)
    assert changed.sum() >= 20, f"{case.case_id}: no contour drawn around the organ at the voxel"
    assert not binary_erosion(changed, np.ones((5, 5), bool)).any(), f"{case.case_id}: a segment is filled"
    assert not changed[check.row, check.col]
    return check


def nothing_above_an_out_of_range_threshold(views, case, ctl, layer):
    """A threshold above the layer's maximum draws exactly the picture without overlay (contours
    and region points drawn in both)."""
    import slicer

    ctl.set_foreground_map(layer)
    node = ctl.layer_node(layer)
    top = float(slicer.util.arrayFromVolume(node).max())
    region = case.regions[0]
    args = (case.input_volume, node, 1.0, SIZE, None, case_segmentations(case), case_markups(case))
    before = ctl.threshold
    ctl.set_threshold(top + 1.0, top + 2.0)
    try:
        hidden = views.render(region.centroid_ras, "Axial", *args)
        without = views.render(region.centroid_ras, "Axial", args[0], None, *args[2:])
    finally:
        ctl.set_threshold(*before)
    shown = views.render(region.centroid_ras, "Axial", *args)
    np.testing.assert_array_equal(hidden.rgb, without.rgb)
    assert not np.array_equal(shown.rgb, without.rgb), "the overlay is not drawn at its own threshold"


def every_view_centred_after_next(views, case, ctl):
    """After Next, each of Red, Yellow and Green (as Slicer would draw it) has the region's
    jump point in its plane and at the centre of the picture."""
    ctl.current_region_index = None
    ctl.next_region()
    region = case.regions[ctl.current_region_index]
    for view_id in DEFAULT_SLICE_NODE_IDS:
        sn = ctl.scene.GetNodeByID(view_id)
        assert abs(distance_to_plane_mm(sn, region.jump_ras)) < 1e-3
        snap = render_view(ctl.scene, view_id, SIZE, views=views)
        row, col = snap.pixel_of(region.jump_ras)
        assert abs(row - SIZE[1] / 2) <= 1 and abs(col - SIZE[0] / 2) <= 1, (view_id, row, col)


def legend_equals_display(case, ctl, layer, lo=None, hi=None):
    """The legend's range is the colour window Slicer draws the layer with."""
    ctl.set_foreground_map(layer)
    if lo is not None:
        ctl.set_threshold(lo, hi)
    node = ctl.layer_node(layer)
    legend = ctl.legend(layer)
    assert legend.range == displayed_window(node)
    assert legend.shown == ctl.threshold
    return legend
