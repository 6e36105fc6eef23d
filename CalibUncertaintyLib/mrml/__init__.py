"""The only MRML-aware part of the library: outputs as Slicer nodes and the Qt-free review logic.

Every function takes the MRML scene as an argument (``slicer.mrmlScene`` in Slicer, a
``slicer.vtkMRMLScene()`` from the slicer-core wheel elsewhere); ``slicer`` and ``vtk`` are
imported inside functions only, so importing this package needs neither.

- nodes.py: ``load_case_outputs`` (per-case folder -> CaseNodes).
- volumes.py: ``load_volume_file``, ``export_volume_node``, ``geometry_from_volume_node``
  (volume nodes <-> files with exact geometry; also re-exported by nodes.py).
- case_folder.py: reading/validating a per-case folder (no MRML).
- colors.py: the project's colour tables and legend text; segment_colours.py: the 48-colour
  segment palette built against them, Slicer's anatomical colours where a name matches.
- review.py: ``ReviewController`` (overlay, opacity, threshold, region navigation);
  overlay_display.py: contours as outlines while an overlay is shown, colour window = shown range.
- slice_jump.py: ``ensure_slice_views``, ``jump_slices_to_ras``.
- slice_views.py: ``SliceViews``, Slicer's own slice view offscreen (slice logic + segmentation
  and markups displayable managers) in a private scene (view_mirror.py), OpenGL checked once
  (offscreen_gl.py), orientation letters and banners (view_marks.py), pixel checks (view_checks.py).
- snapshots.py / review_sheet.py: pictures of views (PNG), PNG/HTML review sheets.
- sample_case.py: a per-case folder from synthetic members (self-test and tests).
- selftest.py: ``run_self_test``, the module self-test body.
"""

from .case_folder import CaseData, Region, read_case_folder
from .nodes import CaseNodes, load_case_outputs
from .review import ReviewController
from .review_sheet import write_review_sheet
from .selftest import run_self_test
from .slice_jump import ensure_slice_views, jump_slices_to_ras
from .snapshots import render_slice, render_view, write_png
from .volumes import export_volume_node, geometry_from_volume_node, load_volume_file

__all__ = ["CaseData", "Region", "read_case_folder", "CaseNodes", "export_volume_node",
           "geometry_from_volume_node", "load_case_outputs", "load_volume_file", "ReviewController",
           "write_review_sheet", "run_self_test", "ensure_slice_views", "jump_slices_to_ras",
           "render_slice", "render_view", "write_png"]
