"""Volume nodes <-> arrays and image files, with exact geometry; node removal. Scene-explicit.

A volume node stores its voxel grid as the IJKToRAS matrix; :func:`new_volume_node` sets it from
``Geometry.ijk_to_ras_matrix()`` (ITK's LPS direction, spacing and origin turned to RAS), and
:func:`geometry_from_volume_node` inverts it, so voxel (i, j, k) sits at the same RAS point in
the file, the node and every output computed on the file. The image data keeps origin 0 and
spacing 1, as Slicer expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.geometry import LPS_TO_RAS, Geometry
from ..io.images import read_image, write_image
from . import colors


# --- geometry --------------------------------------------------------------------------------
def _vtk_matrix(m: np.ndarray):
    import vtk

    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, float(m[r, c]))
    return vm


def ijk_to_ras_of(node) -> np.ndarray:
    import vtk

    vm = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(vm)
    return np.array([[vm.GetElement(r, c) for c in range(4)] for r in range(4)])


def geometry_from_volume_node(node) -> Geometry:
    """Geometry (ITK/LPS conventions) of a volume node, from its IJKToRAS matrix and dimensions.

    Inverse of ``Geometry.ijk_to_ras_matrix``: spacing = column norms, direction = normalised
    columns, both taken back from RAS to LPS. Raises InputError for a node without image data
    or with a degenerate matrix.
    """
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise InputError(f"volume node {node.GetName() if node else None!r} has no image data")
    dims = image.GetDimensions()
    m = ijk_to_ras_of(node)
    lin = LPS_TO_RAS @ m[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"volume node {node.GetName()!r} has a degenerate IJKToRAS matrix")
    direction = lin / spacing[None, :]
    origin = LPS_TO_RAS @ m[:3, 3]
    return Geometry((dims[2], dims[1], dims[0]), tuple(spacing), tuple(origin), tuple(direction.ravel()))


def new_volume_node(array: np.ndarray, geometry: Geometry, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node (not yet in a scene) holding a copy of ``array`` (z, y, x) on ``geometry``."""
    import slicer

    array = np.asarray(array)
    if tuple(array.shape) != geometry.shape_zyx:
        raise InputError(f"{name}: array shape {array.shape} != geometry shape {geometry.shape_zyx}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    elif array.dtype == np.int64:
        array = array.astype(np.int32)
    node = getattr(slicer, class_name)()
    node.SetName(name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(_vtk_matrix(geometry.ijk_to_ras_matrix()))
    return node


def volume_array(node) -> np.ndarray:
    """A copy of the node's voxels, (z, y, x)."""
    import slicer

    return np.array(slicer.util.arrayFromVolume(node), copy=True)


def _display_node(scene, node):
    """The node's display node, created with automatic window/level off: Slicer's
    CreateDefaultDisplayNodes computes a histogram of the whole volume for it (seconds on a
    512 x 512 x 300 float map), and the callers set the window themselves."""
    if node.GetDisplayNode() is None:
        if node.IsA("vtkMRMLLabelMapVolumeNode") or not node.IsA("vtkMRMLScalarVolumeNode") or node.GetScene() is None:
            node.CreateDefaultDisplayNodes()
        else:
            import slicer

            disp = slicer.vtkMRMLScalarVolumeDisplayNode()
            disp.AutoWindowLevelOff()
            disp.AutoThresholdOff()
            scene.AddNode(disp)
            disp.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
            node.SetAndObserveDisplayNodeID(disp.GetID())
    return node.GetDisplayNode()


def display_ct(scene, node, array: np.ndarray | None = None) -> None:
    """Grey CT display: soft-tissue window (W 400, L 40 HU) for HU-like data, automatic otherwise."""
    colors.ensure_default_colour_nodes(scene)
    disp = _display_node(scene, node)
    disp.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    a = volume_array(node) if array is None else array
    if a.size and float(a.min()) < -500:
        disp.AutoWindowLevelOff()
        disp.SetWindowLevel(400.0, 40.0)
    else:
        disp.AutoWindowLevelOn()


def display_overlay(scene, node, key: str, window: tuple[float, float], lower: float, upper: float) -> None:
    """Colour overlay display: colour table ``key``, window ``window``, voxels outside
    [lower, upper] transparent (display node ApplyThreshold)."""
    disp = _display_node(scene, node)
    disp.SetAndObserveColorNodeID(colors.colour_table_id(scene, key))
    disp.AutoWindowLevelOff()
    disp.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    disp.AutoThresholdOff()
    disp.SetApplyThreshold(1)
    disp.SetThreshold(float(lower), float(upper))
    disp.SetInterpolate(0)


def load_volume_file(scene, path, name: str | None = None, display: bool = True):
    """Read an image file (NIfTI, NRRD, ... via SimpleITK) into a new scalar volume node.

    The node keeps the file's exact geometry (LPS -> RAS). Raises InputError for an unreadable
    or non-3-D file; the scene is touched only after the file was read.
    """
    array, geometry = read_image(path)
    path = Path(path)
    if name is None:
        name = path.name[:-len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    node = new_volume_node(array, geometry, name)
    scene.AddNode(node)
    if display:
        display_ct(scene, node, array)
    return node


def export_volume_node(node, path) -> Path:
    """Write a volume node to an image file (atomic) with its geometry, for the out-of-process run.

    Reading the file back with ``io.images.read_image`` gives the node's voxels and geometry.
    """
    return write_image(path, volume_array(node), geometry_from_volume_node(node))


def remove_nodes(scene, nodes) -> None:
    """Remove nodes and their display and storage nodes from the scene (ignoring absent ones)."""
    for node in nodes:
        if node is None or node.GetScene() is not scene:
            continue
        extra = []
        if hasattr(node, "GetNumberOfDisplayNodes"):
            extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if hasattr(node, "GetNumberOfStorageNodes"):
            extra += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for e in extra:
            if e is not None and e.GetScene() is scene:
                scene.RemoveNode(e)


def segment_array(scene, segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """Binary (z, y, x) uint8 array of one segment on ``reference_volume``'s voxel grid.

    Scene-explicit replacement for ``slicer.util.arrayFromSegmentBinaryLabelmap`` (which uses
    ``slicer.mrmlScene``): exports into a temporary labelmap node that is removed afterwards.
    """
    import slicer
    import vtk

    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    tmp = slicer.vtkMRMLLabelMapVolumeNode()
    tmp.SetName("__CalibU_segment_export__")
    scene.AddNode(tmp)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, tmp, reference_volume)
        if not ok:
            raise InputError(f"could not export segment {segment_id!r} of {segmentation_node.GetName()!r}")
        return (volume_array(tmp) > 0).astype(np.uint8)
    finally:
        remove_nodes(scene, [tmp])
