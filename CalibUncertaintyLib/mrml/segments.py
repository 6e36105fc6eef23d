"""Segments from label arrays, cropped to what they cover. Scene-explicit.

A segment's binary labelmap in Slicer has its own extent inside the reference grid, so each organ
is added from the box it occupies (``add_mask_segment``): a 40-organ case at 512 x 512 x 300 adds
40 small images instead of importing one full-size labelmap per organ (and the margins' three
nested contours per organ likewise), which keeps each step of loading short. The voxels land
exactly where ``ImportLabelmapToSegmentationNode`` puts them: the image's extent is the box's
voxel indices in the full grid and its image-to-world matrix is the grid's IJK-to-RAS.

Segments are added without ``vtkSegmentation.AddEmptySegment`` (it needs the converter rules that
only the application's Segmentations module registers; in a bare scene it adds nothing), so they
load the same in Slicer, in PythonSlicer and on the slicer-core wheel.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..io.geometry import Geometry

Box = tuple  # (slice z, slice y, slice x)


class LabelBoxes:
    """Bounding boxes of the labels of a (z, y, x) label array, accumulated over z slabs
    (``add(z0, slab)``), so that no full-volume pass is needed at once."""

    def __init__(self):
        self.lo: dict[int, np.ndarray] = {}
        self.hi: dict[int, np.ndarray] = {}

    def add(self, z0: int, slab: np.ndarray) -> None:
        from scipy import ndimage

        slab = np.asarray(slab)
        if not slab.any():
            return
        labels = slab if np.issubdtype(slab.dtype, np.integer) else slab.astype(np.int64)
        for i, box in enumerate(ndimage.find_objects(labels.astype(np.int32, copy=False)
                                                    if labels.dtype.itemsize > 4 else labels), 1):
            if box is None:
                continue
            lo = np.array([box[0].start + z0, box[1].start, box[2].start])
            hi = np.array([box[0].stop + z0, box[1].stop, box[2].stop])
            if i in self.lo:
                self.lo[i] = np.minimum(self.lo[i], lo)
                self.hi[i] = np.maximum(self.hi[i], hi)
            else:
                self.lo[i], self.hi[i] = lo, hi

    def box(self, label: int) -> Box | None:
        if label not in self.lo:
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo[label], self.hi[label]))

    def labels(self) -> list[int]:
        return sorted(self.lo)


def _vtk_matrix(m: np.ndarray):
    import vtk

    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, float(m[r, c]))
    return vm


def oriented_mask(mask: np.ndarray | None, box: Box | None, geometry: Geometry):
    """A vtkOrientedImageData (uint8) holding ``mask`` (the box's voxels, (z, y, x)) at the box's
    place in ``geometry``'s grid; an empty image when ``box`` is None."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    if box is None or mask is None or not np.any(mask):
        image.SetExtent(0, -1, 0, -1, 0, -1)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        return image
    (z, y, x) = box
    image.SetExtent(x.start, x.stop - 1, y.start, y.stop - 1, z.start, z.stop - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(z.stop - z.start,
                                                                                y.stop - y.start, x.stop - x.start)
    voxels[...] = mask.astype(np.uint8, copy=False)
    image.SetImageToWorldMatrix(_vtk_matrix(geometry.ijk_to_ras_matrix()))
    return image


def add_mask_segment(segmentation, name: str, mask: np.ndarray | None, box: Box | None, geometry: Geometry,
                     colour=None) -> str:
    """Add a segment named ``name`` from a binary mask of the box (None or all zero: an empty
    segment) to a vtkSegmentation; returns its ID."""
    import slicer

    segment = slicer.vtkSegment()
    segment.SetName(name)
    if colour is not None:
        segment.SetColor(*[float(c) for c in colour])
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName(),
                              oriented_mask(mask, box, geometry))
    n_before = segmentation.GetNumberOfSegments()
    if not segmentation.AddSegment(segment) or segmentation.GetNumberOfSegments() != n_before + 1:
        raise InputError(f"could not add the segment {name!r} to {segmentation.GetClassName()}")
    return segmentation.GetNthSegmentID(n_before)


def set_reference_geometry(segmentation_node, geometry: Geometry, volume_node=None) -> None:
    """Set the segmentation's reference image geometry (Slicer logs an error on every scene save
    without it): the volume node's when given (Slicer keeps the reference), else the grid's."""
    import slicer

    if volume_node is not None and volume_node.GetImageData() is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        return
    z, y, x = geometry.shape_zyx
    text = slicer.vtkSegmentationConverter.SerializeImageGeometry(
        _vtk_matrix(geometry.ijk_to_ras_matrix()), [0, x - 1, 0, y - 1, 0, z - 1])
    segmentation_node.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), text)


__all__ = ["LabelBoxes", "oriented_mask", "add_mask_segment", "set_reference_geometry"]
