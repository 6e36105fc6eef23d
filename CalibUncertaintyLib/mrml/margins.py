"""Organ margins (METHODS.md §7) as segments: one segmentation node per case, three segments per
organ: "<Organ> inner", "<Organ> prediction", "<Organ> outer" (nested: inner ⊆ prediction ⊆ outer).

Read from the case folder's ``margins_<Class>.nii.gz`` files (``pipeline.margins``: levels 3 inner,
2 prediction, 1 outer band) listed in summary.json's ``margins`` block; each segment is imported
from its own binary labelmap, so the overlapping segments stay whole. The colours are the
class's colour, darker for the inner and lighter for the outer contour; the outer and inner are
shown as outlines only. Takes the scene as an argument.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.images import read_image
from . import colors
from .volumes import new_volume_node

SEGMENTS = (("inner", 3, 0.6), ("prediction", 2, 1.0), ("outer", 1, 1.4))  # (name, min level, colour factor)


def read_margins(case_dir, summary: dict, geometry) -> dict:
    """{organ: (class index, levels array)} of the folder's margins files ({} when none);
    InputError for a listed file that is missing or on another grid."""
    block = (summary or {}).get("margins") or {}
    out = {}
    for organ, rec in (block.get("classes") or {}).items():
        path = Path(case_dir) / rec["file"]
        if not path.is_file():
            raise InputError(f"summary.json lists the margins file {path.name}, which is not in {case_dir}")
        levels, geo = read_image(path)
        geo.require_same(geometry, str(path), "the case outputs")
        out[organ] = (int(rec.get("class_index", 0)), levels.astype(np.uint8, copy=False))
    return out


def guarantee_lines(summary: dict) -> list[str]:
    """The guarantees of a case, as the panel shows them ([] without a conformal calibration):
    voxel flags and margins, then (``report.guarantees.case_lines``) exchangeability, contour
    flags, per-organ Dice intervals and the review burden; each marked VOID when the case is not
    exchangeable with the calibration cases."""
    from ..report.guarantees import case_lines, void_reason

    conf = (summary or {}).get("conformal") or {}
    void = " VOID for this case." if void_reason(summary) else ""
    lines = []
    flags = conf.get("flags") or {}
    if flags:
        what = "the whole ROI (too few calibration cases for α)" if conf.get("trivial") else \
            flags.get("rule") or f"{flags['map']} > {flags['tau_score']:.4g}"
        lines.append(f"Conformal flags ({what}): {flags['guarantee']}.{void}")
    margins = (summary or {}).get("margins") or {}
    if margins.get("guarantee"):  # the margins the files hold (voxel or contour errors)
        g = margins["guarantee"]
        lines.append(f"Organ margins: {g['outer']}; {g['inner']}.{void}")
    elif conf.get("margins"):
        lines.append(f"Organ margins: {conf['margins']['outer']}; {conf['margins']['inner']}.{void}")
    return lines + case_lines(summary)


def add_margins_node(scene, case_dir, summary: dict, geometry, name: str):
    """The margins segmentation node (added to ``scene``), or None when the case has no margins."""
    import slicer

    margins = read_margins(case_dir, summary, geometry)
    if not margins:
        return None
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(
        new_volume_node(np.zeros(geometry.shape_zyx, np.uint8), geometry, f"{name} grid", "vtkMRMLLabelMapVolumeNode"))
    segmentation = node.GetSegmentation()
    display = node.GetDisplayNode()
    for organ, (c, levels) in margins.items():
        base = np.asarray(colors.class_colour(c), dtype=float)
        for part, level, factor in SEGMENTS:
            mask = (levels >= level).astype(np.uint8)
            labelmap = new_volume_node(mask, geometry, f"{name} {organ} {part}", "vtkMRMLLabelMapVolumeNode")
            n_before = segmentation.GetNumberOfSegments()
            if mask.any():
                if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
                    raise InputError(f"could not turn the {part} margin of {organ} into a segment")
            else:
                _add_empty_segment(segmentation, f"{organ} {part}")
            seg_id = segmentation.GetNthSegmentID(n_before)
            segment = segmentation.GetSegment(seg_id)
            segment.SetName(f"{organ} {part}")
            segment.SetColor(*np.clip(base * factor, 0, 1))
            segment.SetTag("CalibU.Margin", f"{organ}|{part}")
            if part != "prediction" and display is not None:
                display.SetSegmentOpacity2DFill(seg_id, 0.0)
    return node


def _add_empty_segment(segmentation, name: str) -> None:
    """Add a segment with an empty binary labelmap. ``vtkSegmentation.AddEmptySegment`` needs the
    segmentation converter rules, which only the application's Segmentations module registers: in
    a bare scene (slicer-core, PythonSlicer) it adds nothing and returns no segment. An empty
    margin is common (an organ the case lacks, an inner contour at a trivial α)."""
    import slicer
    import vtk

    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, -1, 0, -1, 0, -1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName(), image)
    if not segmentation.AddSegment(segment):
        raise InputError(f"could not add the empty segment {name!r} to the margins segmentation")


def segment_masks(scene, node, reference_volume) -> dict:
    """{segment name: bool (z, y, x) array on ``reference_volume``'s grid} of a margins node."""
    from .volumes import segment_array

    seg = node.GetSegmentation()
    return {seg.GetNthSegment(i).GetName():
            segment_array(scene, node, seg.GetNthSegmentID(i), reference_volume).astype(bool)
            for i in range(seg.GetNumberOfSegments())}
