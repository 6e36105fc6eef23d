"""Render the README / Extensions Index screenshot of the slice views from real CT, with Slicer's
own rendering (headless).

Loads a case folder written by ``calib-uncertainty predict`` or ``maps`` with its CT into an MRML
scene of the slicer-core wheel, drives the review as the module does (``ReviewController``: the
overlay shown, contours as outlines, *Next* to the top error region) and draws what Slicer's Red,
Yellow and Green views then show with Slicer's own slice view (``mrml/slice_views.py``: slice
logic + segmentation and markups displayable managers, offscreen): row 1 the region's map (the
map the regions were cut on, default DAE) above its calibrated threshold, row 2 the calibrated
probability of the region's structure (loaded on demand, as the module does). The views' field of
view is fitted to the body, as a reviewer zooms; a white cross marks the region's jump point.

    python scripts/render_screenshots.py CASE_DIR CT_FILE docs/images/slicer_views_openkbp.png [REGION_RANK]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def render(case_dir, ct_file, out_png, size_px: int = 300, gap: int = 6, rank: int | None = None) -> Path:
    import slicer

    from CalibUncertaintyLib.mrml.nodes import load_case_outputs, load_volume_file
    from CalibUncertaintyLib.mrml.review import ReviewController
    from CalibUncertaintyLib.mrml.review_sheet import _draw_cross, body_points_ras, body_view, sheet_regions
    from CalibUncertaintyLib.mrml.slice_jump import DEFAULT_SLICE_NODE_IDS
    from CalibUncertaintyLib.mrml.slice_views import SliceViews
    from CalibUncertaintyLib.mrml.snapshots import render_view, write_png

    scene = slicer.vtkMRMLScene()
    ct = load_volume_file(scene, ct_file, name="CT")
    case = load_case_outputs(scene, case_dir, ct)
    ctl = ReviewController(scene, case)
    listed = sheet_regions(case).listed or case.regions
    region = next(r for r in listed if rank is None or r.rank == rank)
    body = body_points_ras(case)
    rows = []
    with SliceViews(scene, (size_px, size_px)) as views:
        for sid in DEFAULT_SLICE_NODE_IDS:             # the views fitted to the body, as a reviewer zooms
            sn = scene.GetNodeByID(sid)
            sn.SetDimensions(size_px, size_px, 1)
            (w, h), _centre = body_view(views, body, sn.GetOrientation(), region.jump_ras, (size_px, size_px))
            sn.SetFieldOfView(w, h, sn.GetFieldOfView()[2])
        for layer in (case.regions_doc.get("map") or "dae", f"prob_{region.class_name}"):
            ctl.set_foreground_map(layer)
            ctl.go_to_region(case.regions.index(region))
            row = []
            for sid in DEFAULT_SLICE_NODE_IDS:
                snap = render_view(scene, sid, (size_px, size_px), views=views)
                row.append(_draw_cross(snap.rgb, *snap.pixel_of(region.jump_ras)))
            rows.append(row)
    h = gap + len(rows) * (size_px + gap)
    w = gap + 3 * (size_px + gap)
    sheet = np.full((h, w, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, rgb in enumerate(row):
            y, x = gap + i * (size_px + gap), gap + j * (size_px + gap)
            sheet[y:y + size_px, x:x + size_px] = rgb[..., :3]
    return write_png(out_png, sheet)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    print(render(sys.argv[1], sys.argv[2], sys.argv[3], rank=int(sys.argv[4]) if len(sys.argv) == 5 else None))
