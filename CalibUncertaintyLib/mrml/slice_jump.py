"""The three standard slice views (Red, Yellow, Green) and jumping them to a RAS point.

A real Slicer scene has the slice and slice-composite nodes of its layout; a bare scene (the
slicer-core wheel, tests, batch mode) has none, so :func:`ensure_slice_views` creates the same
nodes with the same IDs (``vtkMRMLSliceNodeRed``, ``vtkMRMLSliceCompositeNodeRed``, ...) and
leaves existing ones untouched.

:func:`jump_slices_to_ras` moves every view so that the point lies in its plane: centred
(``JumpSliceByCentering``: the point becomes the centre of each view) or offset only
(``JumpSliceByOffsetting``: each plane moves along its normal, the in-plane pan is kept).
:func:`jump_view_group_to_ras` does the same for *every* slice view of a view group through
Slicer's own ``vtkMRMLSliceNode.JumpAllSlices`` (a layout with more than three slice views, or a
second linked group, moves as the application moves it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

VIEWS = (("Red", "Axial", (0.953, 0.286, 0.259)),
         ("Yellow", "Sagittal", (0.929, 0.835, 0.298)),
         ("Green", "Coronal", (0.431, 0.690, 0.294)))
DEFAULT_SLICE_NODE_IDS = tuple(f"vtkMRMLSliceNode{v}" for v, _o, _c in VIEWS)
DEFAULT_VIEW_SIZE = (256, 256)


def _ensure_orientation_presets(scene) -> None:
    import slicer

    default = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
    if default is None or not default.HasSliceOrientationPreset("Axial"):
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)


def ensure_slice_views(scene) -> dict:
    """Red/Yellow/Green slice nodes and their composite nodes, created if missing.

    Returns {view name: (slice node, composite node)}. Created slice nodes have Slicer's standard
    orientation (Red axial, Yellow sagittal, Green coronal), layout colour and a 256x256 size.
    """
    out = {}
    for view, orientation, colour in VIEWS:
        out[view] = (ensure_slice_node(scene, view, orientation, colour), ensure_composite_node(scene, view))
    return out


def ensure_slice_node(scene, view: str, orientation: str = "Axial", colour=(0.5, 0.5, 0.5), view_group: int = 0):
    node = scene.GetNodeByID(f"vtkMRMLSliceNode{view}")
    if node is not None:
        return node
    _ensure_orientation_presets(scene)
    node = scene.CreateNodeByClass("vtkMRMLSliceNode")
    node.SetName(view)
    node.SetLayoutName(view)
    node.SetSingletonTag(view)
    node.SetLayoutColor(*colour)
    node.SetViewGroup(view_group)
    node.SetDimensions(*DEFAULT_VIEW_SIZE, 1)
    node.SetOrientation(orientation)
    added = scene.AddNode(node)
    # CreateNodeByClass returns a new reference the caller owns; the scene holds its own now
    node.UnRegister(None)
    return added


def ensure_composite_node(scene, view: str):
    node = scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{view}")
    if node is not None:
        return node
    import slicer

    node = slicer.vtkMRMLSliceCompositeNode()
    node.SetName(f"SliceComposite{view}")
    node.SetLayoutName(view)
    node.SetSingletonTag(view)
    return scene.AddNode(node)


def composite_node_for(scene, slice_node):
    """The slice-composite node of a slice node's view (same layout name)."""
    node = scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{slice_node.GetLayoutName()}")
    if node is not None:
        return node
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(nodes.GetNumberOfItems()):
        n = nodes.GetItemAsObject(i)
        if n.GetLayoutName() == slice_node.GetLayoutName():
            return n
    return ensure_composite_node(scene, slice_node.GetLayoutName())


def slice_to_ras(slice_node) -> np.ndarray:
    m = slice_node.GetSliceToRAS()
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def distance_to_plane_mm(slice_node, ras) -> float:
    """Signed distance (mm) of a RAS point from the slice plane (along the plane normal)."""
    m = slice_to_ras(slice_node)
    normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
    return float(np.dot(np.asarray(ras, float) - m[:3, 3], normal))


def plane_contains(slice_node, ras, tol_mm: float = 1e-3) -> bool:
    return abs(distance_to_plane_mm(slice_node, ras)) <= tol_mm


@dataclass(frozen=True)
class SliceMove:
    """What one jump did to one view: plane centre (SliceToRAS origin) before and after, RAS mm."""

    slice_node_id: str
    before: tuple[float, float, float]
    after: tuple[float, float, float]

    @property
    def moved(self) -> bool:
        return not np.allclose(self.before, self.after, atol=1e-6)

    @property
    def shift_mm(self) -> float:
        return float(np.linalg.norm(np.subtract(self.after, self.before)))


def _resolve(scene, slice_nodes):
    if slice_nodes is None:
        ensure_slice_views(scene)
        slice_nodes = DEFAULT_SLICE_NODE_IDS
    out = []
    for s in slice_nodes:
        node = scene.GetNodeByID(s) if isinstance(s, str) else s
        if node is None or not node.IsA("vtkMRMLSliceNode"):
            raise InputError(f"no slice node {s!r} in the scene")
        out.append(node)
    return out


def jump_slices_to_ras(scene, ras, slice_nodes=None, centred: bool = True) -> list[SliceMove]:
    """Move the slice views so the RAS point (mm) lies in each plane; return one SliceMove per view.

    ``slice_nodes``: nodes or node IDs; default Red, Yellow and Green (created if missing).
    ``centred=True`` centres every view on the point; False only offsets each plane along its
    normal (keeps the in-plane pan). Raises InputError for a non-finite point or unknown view.
    """
    p = np.asarray(ras, dtype=float).reshape(-1)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise InputError(f"RAS point must be 3 finite numbers (mm), got {ras!r}")
    moves = []
    for node in _resolve(scene, slice_nodes):
        before = tuple(slice_to_ras(node)[:3, 3])
        if centred:
            node.JumpSliceByCentering(*p)
        else:
            node.JumpSliceByOffsetting(*p)
        moves.append(SliceMove(node.GetID(), before, tuple(slice_to_ras(node)[:3, 3])))
    return moves


def view_group_slice_nodes(scene, view_group: int) -> list:
    """Every slice node of ``scene`` in ``view_group`` (all of them for a negative group), in
    scene order; in the application each one is a slice view."""
    nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
    out = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    return [n for n in out if view_group < 0 or n.GetViewGroup() == view_group]


def jump_view_group_to_ras(scene, ras, view_group: int = 0, centred: bool = True) -> list[SliceMove]:
    """Jump every slice view of ``view_group`` to the RAS point (mm) with Slicer's
    ``vtkMRMLSliceNode.JumpAllSlices``; one SliceMove per slice node of the group."""
    import slicer

    p = np.asarray(ras, dtype=float).reshape(-1)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise InputError(f"RAS point must be 3 finite numbers (mm), got {ras!r}")
    nodes = view_group_slice_nodes(scene, view_group)
    before = [tuple(slice_to_ras(n)[:3, 3]) for n in nodes]
    mode = slicer.vtkMRMLSliceNode.CenteredJumpSlice if centred else slicer.vtkMRMLSliceNode.OffsetJumpSlice
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *p, mode, view_group)
    return [SliceMove(n.GetID(), b, tuple(slice_to_ras(n)[:3, 3])) for n, b in zip(nodes, before)]
