"""Render the README / Extensions Index screenshot of the slice views from real CT, headless.

Loads a case folder written by ``calib-uncertainty maps`` (README, "Review sheets": the OpenKBP
case OKBP_train_013) with its CT into an MRML scene of the slicer-core wheel, and renders with
the project's own renderer (``mrml.snapshots``) what the module shows in the Red, Yellow and
Green views when it jumps to the top error region: row 1 the distance-aware entropy overlay
above its calibrated threshold, row 2 the calibrated probability of the region's structure
(loaded on demand, as the module does). A cyan cross marks the region centroid.

    python scripts/render_screenshots.py CASE_DIR CT_FILE docs/images/slicer_views_openkbp.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def render(case_dir, ct_file, out_png, size_px: int = 240, fov_mm: float = 200.0, gap: int = 6) -> Path:
    import slicer

    from CalibUncertaintyLib.mrml.nodes import load_case_outputs, load_volume_file
    from CalibUncertaintyLib.mrml.review import ReviewController
    from CalibUncertaintyLib.mrml.review_sheet import _draw_cross
    from CalibUncertaintyLib.mrml.snapshots import ORIENTATIONS, render_slice, write_png

    scene = slicer.vtkMRMLScene()
    ct = load_volume_file(scene, ct_file, name="CT")
    case = load_case_outputs(scene, case_dir, ct)
    ctl = ReviewController(scene, case)
    region = case.regions[0]
    rows = []
    for layer in ("dae", f"prob_{region.class_name}"):
        ctl.set_foreground_map(layer)
        node = ctl.layer_node(layer)
        row = []
        for o in ORIENTATIONS:
            snap = render_slice(scene, region.centroid_ras, o, ct.GetID(), node.GetID(), 0.7, (size_px, size_px), fov_mm)
            row.append(_draw_cross(snap.rgb, *snap.pixel_of(region.centroid_ras)))
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
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(render(sys.argv[1], sys.argv[2], sys.argv[3]))
