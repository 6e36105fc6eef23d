"""A private MRML scene that shows nodes of another scene, for drawing views offscreen.

In the Slicer application every slice node added to ``slicer.mrmlScene`` makes the layout manager
build a slice widget (``qMRMLLayoutManager``, ``onNodeAddedEvent``), so pictures are never drawn
with view nodes in the user's scene. :class:`SceneMirror` keeps a scene of its own holding one
*proxy* per source node that a picture needs:

- volumes: same class, same IJKToRAS, the **same** ``vtkImageData`` (no voxel is copied), a copy
  of the display node (window, threshold, colour node; the colour node itself is copied into the
  private scene once);
- segmentations: the **same** ``vtkSegmentation`` object (no labelmap copied), a copy of the
  display node (per-segment fill / outline visibility, opacity, colour);
- markups: a copy of the node (control points, labels, selection) and of its display node;
- a parent transform: its matrix to world as a linear transform (non-linear ones are reported
  and ignored).

:meth:`SceneMirror.sync` refreshes a proxy from its source before each picture, so what is drawn
is the source's state at that moment; the source scene is only read. View restrictions of
display nodes (``ViewNodeIDs``) are decided by the caller, the proxies show in every view.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _user_table(node) -> bool:
    return node.IsA("vtkMRMLColorTableNode") and node.GetType() == node.User


def _matrix(get) -> object:
    import vtk

    m = vtk.vtkMatrix4x4()
    get(m)
    return m


class SceneMirror:
    """Proxies of source-scene nodes in the private ``scene`` (see the module docstring)."""

    def __init__(self, scene):
        self.scene = scene
        self._proxies: dict = {}          # source node address -> (source node, proxy node)
        self._colours: dict = {}          # source colour node ID -> private colour node ID
        self._transforms: dict = {}

    # --- public ---------------------------------------------------------------------------
    def proxy(self, node):
        """The private node showing ``node`` (a volume, segmentation or markups node), made on
        first use and refreshed from its source now. None for None."""
        if node is None:
            return None
        key = node.GetID() if node.GetScene() is not None else f"@{id(node)}"
        entry = self._proxies.get(key)
        if entry is not None and entry[0] is not node:      # another node now holds that ID
            self._drop(key)
            entry = None
        if entry is None:
            proxy = self._make(node)
            self._proxies[key] = (node, proxy)
        else:
            proxy = entry[1]
        self._sync(node, proxy)
        return proxy

    def proxies(self) -> list:
        return [p for _s, p in self._proxies.values()]

    def prune(self) -> int:
        """Drop the proxies of source nodes no longer in a scene (a reviewed case removed), so
        their voxels are not kept alive; returns how many were dropped."""
        gone = [k for k, (src, _p) in self._proxies.items() if src.GetScene() is None]
        for key in gone:
            self._drop(key)
        return len(gone)

    def _drop(self, key) -> None:
        _src, proxy = self._proxies.pop(key)
        if proxy.GetScene() is self.scene:
            disp = proxy.GetDisplayNode()
            self.scene.RemoveNode(proxy)
            if disp is not None and disp.GetScene() is self.scene:
                self.scene.RemoveNode(disp)

    def hide_all_but(self, keep) -> None:
        """Every proxy not in ``keep`` is made invisible (a picture shows only what it names)."""
        keep_ids = {p.GetID() for p in keep if p is not None}
        for _src, proxy in self._proxies.values():
            if proxy.IsA("vtkMRMLVolumeNode") or proxy.GetID() in keep_ids:
                continue
            disp = proxy.GetDisplayNode()
            if disp is not None:
                disp.SetVisibility(False)

    # --- making proxies ---------------------------------------------------------------------
    def _make(self, src):
        import slicer

        cls = src.GetClassName()
        proxy = self.scene.AddNewNodeByClass(cls, src.GetName() or cls)
        if proxy is None:
            raise RuntimeError(f"cannot show a {cls} in an offscreen view")
        if src.IsA("vtkMRMLVolumeNode"):
            proxy.SetAndObserveImageData(src.GetImageData())
        elif src.IsA("vtkMRMLSegmentationNode"):
            proxy.SetAndObserveSegmentation(src.GetSegmentation())
        disp = src.GetDisplayNode()
        if disp is not None:
            pdisp = self.scene.AddNewNodeByClass(disp.GetClassName())
            proxy.SetAndObserveDisplayNodeID(pdisp.GetID())
        elif src.IsA("vtkMRMLSegmentationNode"):
            proxy.SetAndObserveDisplayNodeID(self.scene.AddNode(slicer.vtkMRMLSegmentationDisplayNode()).GetID())
        return proxy

    def _sync(self, src, proxy) -> None:
        if src.IsA("vtkMRMLVolumeNode"):
            proxy.SetIJKToRASMatrix(_matrix(src.GetIJKToRASMatrix))
            if proxy.GetImageData() is not src.GetImageData():
                proxy.SetAndObserveImageData(src.GetImageData())
        elif src.IsA("vtkMRMLSegmentationNode"):
            if proxy.GetSegmentation() is not src.GetSegmentation():
                proxy.SetAndObserveSegmentation(src.GetSegmentation())
        elif src.IsA("vtkMRMLMarkupsNode"):
            proxy.CopyContent(src)
        disp, pdisp = src.GetDisplayNode(), proxy.GetDisplayNode()
        if disp is not None and pdisp is not None:
            pdisp.CopyContent(disp)
            pdisp.RemoveAllViewNodeIDs()
            colour_id = disp.GetColorNodeID() if hasattr(disp, "GetColorNodeID") else None
            if colour_id:
                pdisp.SetAndObserveColorNodeID(self._colour_id(src.GetScene(), colour_id) or "")
        proxy.SetAndObserveTransformNodeID(self._transform_id(src))

    def _colour_id(self, source_scene, colour_id):
        """The private scene's ID for a colour node: Slicer's built-in nodes exist there under the
        same ID (the colour logic adds them); any other (the project's tables, file-based tables
        of the application) is copied in once."""
        if not colour_id:
            return None
        if colour_id in self._colours:
            return self._colours[colour_id]
        src = source_scene.GetNodeByID(colour_id) if source_scene is not None else None
        mine = self.scene.GetNodeByID(colour_id)
        if src is None:
            out = colour_id if mine is not None else None
        elif mine is not None and mine.GetClassName() == src.GetClassName() and mine.GetName() == src.GetName() \
                and not _user_table(src):
            out = colour_id
        else:
            copy = self.scene.AddNewNodeByClass(src.GetClassName(), src.GetName())
            copy.Copy(src)
            out = copy.GetID()
        self._colours[colour_id] = out
        return out

    def _transform_id(self, src):
        parent = src.GetParentTransformNode() if hasattr(src, "GetParentTransformNode") else None
        if parent is None:
            return None
        key = parent.GetID()
        node = self._transforms.get(key)
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"{parent.GetName()} (to world)")
            self._transforms[key] = node
        if parent.IsTransformToWorldLinear():
            node.SetMatrixTransformToParent(_matrix(parent.GetMatrixTransformToWorld))
        else:
            log.warning("%s is under a non-linear transform (%s); the offscreen view draws it untransformed",
                        src.GetName(), parent.GetName())
            return None
        return node.GetID()
