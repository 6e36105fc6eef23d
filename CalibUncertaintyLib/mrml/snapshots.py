"""Render slices (CT background + coloured overlay) to RGB arrays and PNG files, headless.

Rendering uses Slicer's own reslicing and compositing (``vtkMRMLSliceLogic``), so a snapshot
shows exactly what a slice view shows: the background volume through its window/level, the
foreground layer through its colour table, threshold (voxels outside it transparent) and the
composite node's foreground opacity. No render window or GPU is needed. Pixels outside the
volume (transparent in the blend) are black, as on a slice view's background.

Each render uses a temporary slice node and composite node (view "CalibUSnapshot", its own view
group so slice linking ignores it) and removes every node it created afterwards, so the user's
views and the scene's node count are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path

SNAPSHOT_VIEW = "CalibUSnapshot"
ORIENTATIONS = ("Axial", "Sagittal", "Coronal")


@dataclass
class Snapshot:
    """One rendered slice. ``rgb`` (H, W, 3) uint8 with row 0 at the top; ``xy_to_ras`` maps
    view pixel (x, y from the bottom-left, 0, 1) to RAS mm."""

    rgb: np.ndarray
    xy_to_ras: np.ndarray
    orientation: str
    centre_ras: tuple[float, float, float]

    def pixel_of(self, ras) -> tuple[int, int]:
        """(row, col) of the pixel showing a RAS point that lies in the plane (row 0 = top)."""
        xy = np.linalg.solve(self.xy_to_ras, np.r_[np.asarray(ras, float), 1.0])
        h = self.rgb.shape[0]
        return int(round(h - 1 - xy[1])), int(round(xy[0]))


def _matrix(vm) -> np.ndarray:
    return np.array([[vm.GetElement(r, c) for c in range(4)] for r in range(4)])


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _grab(logic) -> np.ndarray:
    from vtk.util import numpy_support

    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    w, h, _ = image.GetDimensions()
    a = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
    rgb = np.array(a[::-1, :, :3])
    if a.shape[2] == 4:
        # outside the volume the blend is transparent (alpha 0) over an arbitrary grey; a slice
        # view shows its black background there, so the snapshot does too
        rgb[a[::-1, :, 3] == 0] = 0
    return np.ascontiguousarray(rgb)


def render_slice(scene, ras, orientation: str = "Axial", background_id: str | None = None,
                 foreground_id: str | None = None, opacity: float = 0.6, size_px=(256, 256),
                 fov_mm: float | None = None) -> Snapshot:
    """Render the ``orientation`` plane through RAS point ``ras`` (mm), centred on it.

    ``fov_mm``: width of the view in mm (height follows the pixel aspect); None fits the
    background volume. Layers are given by node ID; the foreground is drawn with its display
    node's colour table and threshold at ``opacity``.
    """
    import slicer

    from .slice_jump import _ensure_orientation_presets

    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    w, h = int(size_px[0]), int(size_px[1])
    if w < 8 or h < 8:
        raise InputError(f"snapshot size must be at least 8x8 pixels, got {size_px}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise InputError(f"opacity must be between 0 and 1, got {opacity}")
    for nid in (background_id, foreground_id):
        if nid is not None and scene.GetNodeByID(nid) is None:
            raise InputError(f"no volume node {nid!r} in the scene")
    before = _node_ids(scene)
    logic = None
    try:
        _ensure_orientation_presets(scene)
        sn = scene.CreateNodeByClass("vtkMRMLSliceNode")
        sn.SetName(SNAPSHOT_VIEW)
        sn.SetLayoutName(SNAPSHOT_VIEW)
        sn.SetSingletonTag(SNAPSHOT_VIEW)
        sn.SetViewGroup(9999)
        sn.SetOrientation(orientation)
        sn.SetDimensions(w, h, 1)
        created, sn = sn, scene.AddNode(sn)
        created.UnRegister(None)  # CreateNodeByClass's reference: the scene holds its own now
        cn = slicer.vtkMRMLSliceCompositeNode()
        cn.SetLayoutName(SNAPSHOT_VIEW)
        cn.SetSingletonTag(SNAPSHOT_VIEW)
        cn = scene.AddNode(cn)
        cn.SetBackgroundVolumeID(background_id)
        cn.SetForegroundVolumeID(foreground_id)
        cn.SetForegroundOpacity(float(opacity))
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(sn)
        if fov_mm is None:
            logic.FitSliceToAll()
        else:
            sn.SetFieldOfView(float(fov_mm), float(fov_mm) * h / w, sn.GetFieldOfView()[2])
        sn.JumpSliceByCentering(*[float(v) for v in ras])
        rgb = _grab(logic)
        xy = _matrix(sn.GetXYToRAS())
    finally:
        _clean_up(scene, logic, before)
    return Snapshot(rgb, xy, orientation, tuple(float(v) for v in ras))


def render_view(scene, slice_node_id: str, size_px=None) -> Snapshot:
    """Render what an existing view shows (its plane, field of view and layers) without touching it."""
    import slicer

    from .slice_jump import composite_node_for

    sn = scene.GetNodeByID(slice_node_id)
    if sn is None:
        raise InputError(f"no slice node {slice_node_id!r} in the scene")
    comp = composite_node_for(scene, sn)
    dims = sn.GetDimensions()
    w, h = (int(size_px[0]), int(size_px[1])) if size_px else (dims[0], dims[1])
    before = _node_ids(scene)
    logic = None
    try:
        tmp = scene.CreateNodeByClass("vtkMRMLSliceNode")
        tmp.SetName(SNAPSHOT_VIEW)
        tmp.SetLayoutName(SNAPSHOT_VIEW)
        tmp.SetSingletonTag(SNAPSHOT_VIEW)
        tmp.SetViewGroup(9999)
        tmp.SetDimensions(w, h, 1)
        created, tmp = tmp, scene.AddNode(tmp)
        created.UnRegister(None)  # CreateNodeByClass's reference: the scene holds its own now
        tmp.GetSliceToRAS().DeepCopy(sn.GetSliceToRAS())
        fov = sn.GetFieldOfView()
        tmp.SetFieldOfView(fov[0], fov[0] * h / w, fov[2])
        tmp.UpdateMatrices()
        cn = slicer.vtkMRMLSliceCompositeNode()
        cn.SetLayoutName(SNAPSHOT_VIEW)
        cn.SetSingletonTag(SNAPSHOT_VIEW)
        cn = scene.AddNode(cn)
        cn.SetBackgroundVolumeID(comp.GetBackgroundVolumeID())
        cn.SetForegroundVolumeID(comp.GetForegroundVolumeID())
        cn.SetForegroundOpacity(comp.GetForegroundOpacity())
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(tmp)
        rgb = _grab(logic)
        xy = _matrix(tmp.GetXYToRAS())
        centre = tuple(_matrix(tmp.GetSliceToRAS())[:3, 3])
        orientation = sn.GetOrientation()
    finally:
        _clean_up(scene, logic, before)
    return Snapshot(rgb, xy, orientation, centre)


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
                     size_px=(256, 256), fov_mm: float | None = None) -> list[Snapshot]:
    """Axial, sagittal and coronal snapshots through a region's RAS centroid with ``layer`` as
    the overlay (its current display threshold and colour table)."""
    regions = case_nodes.regions
    if not 0 <= region_index < len(regions):
        raise InputError(f"region index {region_index} out of range ({len(regions)} regions)")
    fg = case_nodes.layer_node(scene, layer)      # InputError for an unknown layer
    bg = case_nodes.input_volume.GetID() if case_nodes.input_volume is not None else None
    ras = regions[region_index].centroid_ras
    return [render_slice(scene, ras, o, bg, fg.GetID(), opacity, size_px, fov_mm)
            for o in ORIENTATIONS]


def _clean_up(scene, logic, before: set) -> None:
    """Detach the temporary slice logic and remove every node added since ``before`` (node IDs)."""
    if logic is not None:
        logic.SetMRMLScene(None)
    for i in reversed(range(scene.GetNumberOfNodes())):
        node = scene.GetNthNode(i)
        if node is not None and node.GetID() not in before:
            scene.RemoveNode(node)
