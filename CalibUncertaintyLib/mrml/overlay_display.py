"""How an overlay and the predicted contours are shown together, in the module and in every picture.

Slicer draws a segmentation's 2D fill *over* the volume layers, so an uncertainty overlay under the
case segmentation's default fill (or under the margins' "prediction" segments) is hidden. While an
overlay is shown (:func:`show_contours_only`), every segment of the case segmentation and of the
margins node is drawn as an outline only (no fill), ``OUTLINE_PX`` pixels wide, fully opaque, in
its segment colour (``segment_colours.py``: never confusable with the overlay colour maps); the
reviewer sees uncertainty and contour together. :func:`show_filled` restores Slicer's default
fill (no overlay shown). ``ReviewController`` calls these; the review sheet and the screenshots
draw with the same state.

Colour window (:func:`overlay_window`): the overlay's colours span the range it shows — from the
lower end of its threshold to the upper end, capped at the layer's robust top (the 0.995 quantile
of the voxels shown by default, ``nodes.colour_window``) so a few outliers do not wash the colours
out; values above the cap get the brightest colour. The legend (:func:`legend`) reads the display
node, so its range is always the window Slicer draws with.
"""

from __future__ import annotations

import contextlib
import math

OUTLINE_PX = 2


def _display_nodes(case_nodes) -> list:
    nodes = [case_nodes.segmentation, getattr(case_nodes, "margins", None)]
    out = []
    for node in nodes:
        if node is not None and node.GetScene() is not None and node.GetDisplayNode() is not None:
            out.append(node.GetDisplayNode())
    return out


def show_contours_only(case_nodes) -> None:
    """Case segmentation and margins as outlines only (module docstring)."""
    for disp in _display_nodes(case_nodes):
        disp.SetVisibility(True)
        disp.SetVisibility2DFill(False)
        disp.SetVisibility2DOutline(True)
        disp.SetOpacity2DOutline(1.0)
        disp.SetSliceIntersectionThickness(OUTLINE_PX)


def show_filled(case_nodes) -> None:
    """Slicer's default 2D display again: fill and outline (no overlay shown)."""
    for disp in _display_nodes(case_nodes):
        disp.SetVisibility2DFill(True)
        disp.SetVisibility2DOutline(True)


def contour_state(case_nodes) -> list:
    """What :func:`show_contours_only` changes, to put back with :func:`restore_contour_state`."""
    return [(d, d.GetVisibility(), d.GetVisibility2DFill(), d.GetVisibility2DOutline(), d.GetOpacity2DOutline(),
             d.GetSliceIntersectionThickness()) for d in _display_nodes(case_nodes)]


def restore_contour_state(state) -> None:
    for d, vis, fill, outline, opacity, thickness in state:
        d.SetVisibility(vis)
        d.SetVisibility2DFill(fill)
        d.SetVisibility2DOutline(outline)
        d.SetOpacity2DOutline(opacity)
        d.SetSliceIntersectionThickness(thickness)


@contextlib.contextmanager
def contours_only(case_nodes):
    """:func:`show_contours_only` for a block (a picture of an overlay), then the state before."""
    state = contour_state(case_nodes)
    show_contours_only(case_nodes)
    try:
        yield
    finally:
        restore_contour_state(state)


def overlay_window(lo: float, hi: float, top: float) -> tuple[float, float]:
    """Colour window (lo, hi') for an overlay shown where lo ≤ value ≤ hi: hi' = min(hi, top)
    when that lies above lo, else hi (a range entirely above the robust top); never empty."""
    lo, hi, top = float(lo), float(hi), float(top)
    cap = min(hi, top) if math.isfinite(top) else hi
    upper = cap if cap > lo else hi
    if not upper > lo:
        upper = lo + max(abs(lo) * 1e-6, 1e-12)
    return lo, upper


def apply_overlay_range(node, lo: float, hi: float, top: float) -> tuple[float, float]:
    """Show ``node`` only where lo ≤ value ≤ hi, with the colour window of :func:`overlay_window`;
    returns the window."""
    disp = node.GetDisplayNode()
    window = overlay_window(lo, hi, top)
    disp.AutoThresholdOff()
    disp.SetApplyThreshold(1)
    disp.SetThreshold(float(lo), float(hi))
    disp.AutoWindowLevelOff()
    disp.SetWindowLevelMinMax(*window)
    return window


def displayed_window(node) -> tuple[float, float]:
    """The colour window Slicer draws ``node`` with (its display node's)."""
    disp = node.GetDisplayNode()
    return float(disp.GetWindowLevelMin()), float(disp.GetWindowLevelMax())


def displayed_threshold(node) -> tuple[float, float] | None:
    disp = node.GetDisplayNode()
    return (float(disp.GetLowerThreshold()), float(disp.GetUpperThreshold())) if disp.GetApplyThreshold() else None


def legend(layer: str, node):
    """The legend of an overlay as drawn now: the display node's window and threshold."""
    from .colors import legend_for

    return legend_for(layer, displayed_window(node), displayed_threshold(node))
