"""Pictures of slice views as RGB arrays and PNG files, drawn by Slicer's own slice view.

Every picture comes from ``slice_views.SliceViews``: Slicer's ``vtkMRMLSliceLogic`` reslices and
blends the volume layers (background through its window/level, foreground through its colour
table, threshold and opacity) and Slicer's slice displayable managers draw the segmentations and
markups given, as their display nodes say, offscreen. Nothing is added to the caller's scene
(the view lives in a private scene). Where OpenGL is missing, the volume layers are still drawn
by the slice logic, under a red banner saying what is missing (``Snapshot.fallback``).

:func:`render_slice` draws one plane through a point; :func:`render_view` what an existing view
shows (its plane, field of view, layers, and every segmentation and markups node visible in it);
both accept ``views=`` (an open ``SliceViews``) to draw many pictures with one view.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path
from .slice_views import ORIENTATIONS, SliceViews  # noqa: F401 (ORIENTATIONS re-exported)

SNAPSHOT_VIEW = "CalibUSnapshot"


@dataclass
class Snapshot:
    """One rendered view. ``rgb`` (H, W, 3) uint8 with row 0 at the top; ``xy_to_ras`` maps
    view pixel (x, y from the bottom-left, 0, 1) to RAS mm; ``renderer`` says what drew it;
    ``fallback`` is the banner text when segmentations and markups could not be drawn."""

    rgb: np.ndarray
    xy_to_ras: np.ndarray
    orientation: str
    centre_ras: tuple[float, float, float]
    renderer: str = ""
    fallback: str | None = None

    def pixel_of(self, ras) -> tuple[int, int]:
        """(row, col) of the pixel showing a RAS point that lies in the plane (row 0 = top)."""
        xy = np.linalg.solve(self.xy_to_ras, np.r_[np.asarray(ras, float), 1.0])
        h = self.rgb.shape[0]
        return int(round(h - 1 - xy[1])), int(round(xy[0]))


@contextlib.contextmanager
def _views(scene, views):
    if views is not None:
        yield views
        return
    with SliceViews(scene) as own:
        yield own


def _node(scene, node_or_id, what: str = "volume"):
    if node_or_id is None:
        return None
    node = scene.GetNodeByID(node_or_id) if isinstance(node_or_id, str) else node_or_id
    if node is None:
        raise InputError(f"no {what} node {node_or_id!r} in the scene")
    return node


def render_slice(scene, ras, orientation: str = "Axial", background_id=None, foreground_id=None,
                 opacity: float = 0.6, size_px=(256, 256), fov_mm=None, segmentations=(), markups=(),
                 views=None, centre_ras=None) -> Snapshot:
    """Draw the ``orientation`` plane through RAS point ``ras`` (mm), centred on it (or on
    ``centre_ras``), ``fov_mm`` wide (None fits the background volume).

    Volume layers are given as nodes or node IDs; the foreground is drawn through its display
    node (colour table, window, threshold) at ``opacity``. ``segmentations`` and ``markups``
    (nodes) are drawn by Slicer's displayable managers as their display nodes say.
    """
    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    bg, fg = _node(scene, background_id), _node(scene, foreground_id)
    with _views(scene, views) as v:
        return v.render(ras, orientation, bg, fg, opacity, size_px, fov_mm, segmentations, markups,
                        centre_ras=centre_ras)


def _visible_in_view(node, view_id: str) -> bool:
    disp = node.GetDisplayNode()
    if disp is None or not disp.GetVisibility():
        return False
    if hasattr(disp, "GetVisibility2D") and not disp.GetVisibility2D():
        return False
    return bool(disp.IsDisplayableInView(view_id))


def nodes_shown_in_view(scene, slice_node) -> tuple[list, list]:
    """(segmentation nodes, markups nodes) of ``scene`` that Slicer draws in that slice view."""
    out = {"vtkMRMLSegmentationNode": [], "vtkMRMLMarkupsNode": []}
    for cls, found in out.items():
        nodes = scene.GetNodesByClass(cls)
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if _visible_in_view(node, slice_node.GetID()):
                found.append(node)
    return out["vtkMRMLSegmentationNode"], out["vtkMRMLMarkupsNode"]


def render_view(scene, slice_node_id: str, size_px=None, views=None) -> Snapshot:
    """Draw what an existing view shows: its plane and centre, its mm per pixel, its composite
    node's layers and opacity, every segmentation and markups node visible in it. The view's
    nodes are only read."""
    from .slice_jump import composite_node_for

    sn = scene.GetNodeByID(slice_node_id)
    if sn is None:
        raise InputError(f"no slice node {slice_node_id!r} in the scene")
    comp = composite_node_for(scene, sn)
    segs, points = nodes_shown_in_view(scene, sn)
    bg, fg = _node(scene, comp.GetBackgroundVolumeID()), _node(scene, comp.GetForegroundVolumeID())
    with _views(scene, views) as v:
        return v.render(None, sn.GetOrientation(), bg, fg, comp.GetForegroundOpacity(), size_px,
                        segmentations=segs, markups=points, slice_node=sn)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image (row 0 at the top), encoded with VTK only."""
    import vtk
    from vtk.util import numpy_support

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise InputError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    h, w, c = rgb.shape
    image = vtk.vtkImageData()
    image.SetDimensions(w, h, 1)
    flat = np.ascontiguousarray(rgb[::-1]).reshape(-1, c)
    arr = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(arr)
    writer = vtk.vtkPNGWriter()
    writer.SetInputData(image)
    writer.WriteToMemoryOn()
    writer.Write()
    return bytes(numpy_support.vtk_to_numpy(writer.GetResult()).tobytes())


def write_png(path, rgb: np.ndarray) -> Path:
    """Write an RGB image as PNG atomically (temporary name, then rename)."""
    data = encode_png(rgb)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def region_snapshots(scene, case_nodes, region_index: int, layer: str, opacity: float = 0.6,
                     size_px=(256, 256), fov_mm=None, views=None) -> list[Snapshot]:
    """Axial, sagittal and coronal pictures through a region's jump point (RAS) with ``layer`` as the
    overlay and the case's segmentation, margins and region points drawn as the module shows them."""
    regions = case_nodes.regions
    if not 0 <= region_index < len(regions):
        raise InputError(f"region index {region_index} out of range ({len(regions)} regions)")
    fg = case_nodes.layer_node(scene, layer)      # InputError for an unknown layer
    ras = regions[region_index].jump_ras
    with _views(scene, views) as v:
        return [render_slice(scene, ras, o, case_nodes.input_volume, fg, opacity, size_px, fov_mm,
                             case_segmentations(case_nodes), case_markups(case_nodes), views=v)
                for o in ORIENTATIONS]


def case_segmentations(case_nodes) -> list:
    """The case's segmentation nodes a view shows: the predicted segmentation, the margins."""
    return [n for n in (case_nodes.segmentation, case_nodes.margins) if n is not None and n.GetScene() is not None]


def case_markups(case_nodes) -> list:
    node = case_nodes.regions_markups
    return [node] if node is not None and node.GetScene() is not None else []
