"""Slicer's own slice view, offscreen: every picture of the views is drawn by Slicer's code.

A :class:`SliceViews` is one slice view as the application assembles it, without Qt:

- its own MRML scene (``view_mirror.SceneMirror``: proxies of the user's nodes sharing their voxels
  and segments), an application logic with Slicer's colour logic (built-in colour nodes) and the
  Markups logic registered, the standard orientation presets;
- a slice node + slice-composite node + ``vtkMRMLSliceLogic``: Slicer reslices and blends the
  background and foreground volume layers (window/level, colour table, threshold, opacity), and
  the blended image is drawn as the view's background image, as Slicer's slice view does;
- the slice displayable managers Slicer puts in every slice view for what a review shows:
  ``vtkMRMLSegmentationsDisplayableManager2D`` (segment fill and outline as the segmentation's
  display node says), ``vtkMRMLMarkupsDisplayableManager`` (region points and labels);
- an offscreen ``vtkRenderWindow`` (EGL without a display, ``offscreen_gl.py``), read back to an
  RGB array, and the orientation letters of the plane drawn on it (``view_marks.py``).

No view node is ever added to the caller's scene (in the application each one would build a slice
widget). Where OpenGL is not available the volume layers are still Slicer's slice logic output,
but segmentations and markups cannot be drawn: the picture then carries a red banner saying so
and a warning is logged (``offscreen_gl.offscreen_gl_status``), never a silent difference.

Use it as a context manager; one instance renders any number of pictures (orientation, size and
layers per call)::

    with SliceViews(scene) as views:
        snap = views.render(ras, "Axial", background=ct, foreground=overlay, opacity=0.6,
                            segmentations=[seg], markups=[points], fov_mm=150)
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError
from .offscreen_gl import offscreen_gl_status
from .view_marks import draw_banner, draw_orientation_letters
from .view_mirror import SceneMirror

log = logging.getLogger(__name__)

VIEW_NAME = "CalibUSnapshot"
ORIENTATIONS = ("Axial", "Sagittal", "Coronal")
# the slice displayable managers a review needs, by class name (a wheel lacking one skips it)
DISPLAYABLE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager")
RENDERER = "Slicer slice view (vtkMRMLSliceLogic + segmentation and markups displayable managers)"
FALLBACK = "Slicer's slice logic only (volume layers)"


def fallback_banner(reason: str) -> str:
    return f"Segmentations and markups NOT drawn: {reason}"


class SliceViews:
    """One offscreen Slicer slice view over a private scene (module docstring)."""

    def __init__(self, source_scene, size_px=(256, 256), orientation_letters: bool = True):
        import slicer

        self.source = source_scene
        self.letters = orientation_letters
        self.gl = offscreen_gl_status()
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkMRMLApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        colours = slicer.vtkMRMLColorLogic()
        colours.SetMRMLScene(self.scene)           # adds Slicer's built-in colour nodes
        colours.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetColorLogic(colours)
        self._colour_logic = colours
        self._markups_logic = None
        if hasattr(slicer, "vtkSlicerMarkupsLogic"):
            self._markups_logic = slicer.vtkSlicerMarkupsLogic()
            self._markups_logic.SetMRMLScene(self.scene)
            self._markups_logic.SetMRMLApplicationLogic(self.app_logic)
            self.app_logic.SetModuleLogic("Markups", self._markups_logic)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)
        self.mirror = SceneMirror(self.scene)

        node = self.scene.CreateNodeByClass("vtkMRMLSliceNode")
        node.SetName(VIEW_NAME)
        node.SetLayoutName(VIEW_NAME)
        node.SetSingletonTag(VIEW_NAME)
        node.SetDimensions(int(size_px[0]), int(size_px[1]), 1)
        self.slice_node = self.scene.AddNode(node)
        node.UnRegister(None)
        comp = slicer.vtkMRMLSliceCompositeNode()
        comp.SetLayoutName(VIEW_NAME)
        comp.SetSingletonTag(VIEW_NAME)
        self.composite = self.scene.AddNode(comp)
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(self.app_logic)
        self.logic.SetMRMLScene(self.scene)
        self.logic.SetSliceNode(self.slice_node)
        if self.app_logic.GetSliceLogics() is None:
            import vtk

            self.app_logic.SetSliceLogics(vtk.vtkCollection())
        self.app_logic.GetSliceLogics().AddItem(self.logic)
        self.window = None
        self.managers = []
        if self.gl.available:
            self._build_view(size_px)

    # --- the OpenGL part ----------------------------------------------------------------------
    def _build_view(self, size_px) -> None:
        import slicer
        import vtk

        vtk.vtkMapper.SetResolveCoincidentTopologyToPolygonOffset()   # as Slicer's views set it
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(int(size_px[0]), int(size_px[1]))
        self.renderer = vtk.vtkRenderer()
        self.renderer.SetBackground(0, 0, 0)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkGenericRenderWindowInteractor()   # widgets need one; no event loop
        self.interactor.SetRenderWindow(self.window)
        # the blended volume layers: Slicer's slice view draws the slice logic's RGBA output as
        # a background image, 1 image pixel per view pixel
        self._image_mapper = vtk.vtkImageMapper()
        self._image_mapper.SetColorWindow(255)
        self._image_mapper.SetColorLevel(127.5)
        self._image_mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self._image_actor = vtk.vtkActor2D()
        self._image_actor.SetMapper(self._image_mapper)
        self._image_actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self._image_actor)
        self.group = slicer.vtkMRMLDisplayableManagerGroup()
        self.group.SetRenderer(self.renderer)
        for name in DISPLAYABLE_MANAGERS:
            cls = getattr(slicer, name, None)
            if cls is None:
                log.warning("this slicer-core has no %s; the offscreen view cannot draw what it draws", name)
                continue
            manager = cls()
            manager.SetMRMLApplicationLogic(self.app_logic)
            self.group.AddDisplayableManager(manager)
            self.managers.append(name)
        self.group.SetMRMLDisplayableNode(self.slice_node)
        self._grabber = vtk.vtkWindowToImageFilter()
        self._grabber.SetInput(self.window)
        self._grabber.ReadFrontBufferOff()
        self._grabber.SetInputBufferTypeToRGB()

    # --- public -------------------------------------------------------------------------------
    @property
    def renderer_name(self) -> str:
        return RENDERER if self.window is not None else FALLBACK

    def render(self, ras=None, orientation: str = "Axial", background=None, foreground=None,
               opacity: float = 0.6, size_px=None, fov_mm=None, segmentations=(), markups=(),
               slice_node=None, centre_ras=None):
        """Draw one view and return a ``snapshots.Snapshot``.

        The plane is ``orientation`` through RAS point ``ras`` (mm) with the view centred on
        ``centre_ras`` (default ``ras``: the point is the view centre), ``fov_mm`` wide (a number,
        or (width, height) in mm; None fits the background volume) — or, with ``slice_node``, exactly
        that view's plane and field of view (the source node is only read). ``background`` /
        ``foreground``: volume nodes (or None) of the source scene, drawn through their display
        nodes at foreground ``opacity``; ``segmentations`` / ``markups``: nodes drawn as their
        display nodes say (fill, outline, colours, labels).
        """
        from .snapshots import Snapshot

        if slice_node is None and orientation not in ORIENTATIONS:
            raise InputError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if not 0.0 <= float(opacity) <= 1.0:
            raise InputError(f"opacity must be between 0 and 1, got {opacity}")
        if size_px is None:
            size_px = tuple(slice_node.GetDimensions()[:2]) if slice_node is not None else \
                tuple(self.slice_node.GetDimensions()[:2])
        w, h = int(size_px[0]), int(size_px[1])
        if w < 8 or h < 8:
            raise InputError(f"snapshot size must be at least 8x8 pixels, got {size_px}")
        self.mirror.prune()
        bg, fg = self.mirror.proxy(background), self.mirror.proxy(foreground)
        shown = [self.mirror.proxy(n) for n in (*segmentations, *markups) if n is not None]
        self.mirror.hide_all_but(shown)
        self.composite.SetBackgroundVolumeID(bg.GetID() if bg is not None else None)
        self.composite.SetForegroundVolumeID(fg.GetID() if fg is not None else None)
        self.composite.SetForegroundOpacity(float(opacity))
        self.composite.SetLabelVolumeID(None)
        sn = self.slice_node
        sn.SetDimensions(w, h, 1)
        if slice_node is not None:
            self._copy_view(slice_node, w, h)
            orientation = slice_node.GetOrientation()
            centre = tuple(_matrix(sn.GetSliceToRAS())[:3, 3])
            ras = centre if ras is None else ras
        else:
            if ras is None:
                raise InputError("render needs a RAS point (or a slice node to copy)")
            sn.SetOrientation(orientation)
            if fov_mm is None:
                self.logic.FitSliceToAll()
            else:
                fw, fh = (float(fov_mm), float(fov_mm) * h / w) if np.isscalar(fov_mm) else map(float, fov_mm)
                sn.SetFieldOfView(fw, fh, sn.GetFieldOfView()[2])
            target = ras if centre_ras is None else centre_ras
            sn.JumpSliceByCentering(*[float(v) for v in target])
            if centre_ras is not None:
                sn.JumpSliceByOffsetting(*[float(v) for v in ras])
            centre = tuple(float(v) for v in target)
        sn.UpdateMatrices()
        rgb = self._draw(w, h)
        xy = _matrix(sn.GetXYToRAS())
        fallback = None
        if self.window is None:
            fallback = fallback_banner(self.gl.reason)
            rgb = draw_banner(rgb, fallback)
        if self.letters:
            rgb = draw_orientation_letters(rgb, xy)
        return Snapshot(rgb, xy, orientation, centre, renderer=self.renderer_name, fallback=fallback)

    def plane_axes(self, orientation: str) -> tuple[np.ndarray, np.ndarray]:
        """RAS directions of the picture's +x (left to right) and +y (bottom to top) axes for a
        standard orientation (Slicer's presets)."""
        if orientation not in ORIENTATIONS:
            raise InputError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        self.slice_node.SetOrientation(orientation)
        m = _matrix(self.slice_node.GetSliceToRAS())
        return m[:3, 0] / np.linalg.norm(m[:3, 0]), m[:3, 1] / np.linalg.norm(m[:3, 1])

    def _copy_view(self, source, w: int, h: int) -> None:
        sn = self.slice_node
        sn.SetOrientation(source.GetOrientation()) if source.GetOrientation() in ORIENTATIONS else None
        sn.GetSliceToRAS().DeepCopy(source.GetSliceToRAS())
        fov = source.GetFieldOfView()
        # the same field of view across as the source view, at this picture's size
        sn.SetFieldOfView(fov[0], fov[0] * h / w, fov[2])
        sn.SetXYZOrigin(*source.GetXYZOrigin())

    def _draw(self, w: int, h: int) -> np.ndarray:
        from vtk.util import numpy_support

        if self.window is None:
            producer = self.logic.GetImageDataConnection().GetProducer()
            producer.Update()
            image = producer.GetOutputDataObject(0)
            iw, ih, _ = image.GetDimensions()
            a = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ih, iw, -1)
            rgb = np.array(a[::-1, :, :3])
            if a.shape[2] == 4:
                rgb[a[::-1, :, 3] == 0] = 0    # outside the volume: the view's black background
            return np.ascontiguousarray(rgb)
        self.window.SetSize(w, h)
        # the slice logic makes a new pipeline output when its layers change: follow it
        connection = self.logic.GetImageDataConnection()
        if self._image_mapper.GetInputConnection(0, 0) is not connection:
            self._image_mapper.SetInputConnection(connection)
        self.window.Render()
        self._grabber.Modified()
        self._grabber.Update()
        image = self._grabber.GetOutput()
        iw, ih, _ = image.GetDimensions()
        a = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ih, iw, -1)
        return np.ascontiguousarray(a[::-1, :, :3])

    def close(self) -> None:
        """Release the view, its OpenGL context and the private scene (the source is untouched)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self.window is not None:
            self.group.SetMRMLDisplayableNode(None)
            self._image_mapper.SetInputConnection(None)
            self.renderer.RemoveAllViewProps()
            self.window.Finalize()
            self.interactor.SetRenderWindow(None)
            del self.group
            self.window = None
        self.app_logic.GetSliceLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        if self._markups_logic is not None:
            self._markups_logic.SetMRMLScene(None)
        self._colour_logic.SetMRMLScene(None)
        self.app_logic.SetMRMLScene(None)
        self.scene.Clear(1)

    def __enter__(self) -> "SliceViews":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _matrix(vm) -> np.ndarray:
    return np.array([[vm.GetElement(r, c) for c in range(4)] for r in range(4)])
