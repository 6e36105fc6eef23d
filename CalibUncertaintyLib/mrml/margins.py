"""Organ margins (METHODS.md §7) as segments: one segmentation node per case, three segments per
organ: "<Organ> inner", "<Organ> prediction", "<Organ> outer" (nested: inner ⊆ prediction ⊆ outer).

Read from the case folder's ``margins_<Class>.nii.gz`` files (``pipeline.margins``: levels 3 inner,
2 prediction, 1 outer band) listed in summary.json's ``margins`` block; each segment is added from
its own binary mask, cropped to the organ's outer contour (``segments.add_mask_segment``), so the
overlapping segments stay whole and an empty one needs no converter rules. The colours are the
class's colour, darker for the inner and lighter for the outer contour; the outer and inner are
shown as outlines only. Takes the scene as an argument.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.images import read_image
from . import colors

SEGMENTS = (("inner", 3, 0.6), ("prediction", 2, 1.0), ("outer", 1, 1.4))  # (name, min level, colour factor)


def margin_files(case_dir, summary: dict) -> list[tuple[str, int, Path]]:
    """[(organ, class index, margins file)] listed in summary.json's ``margins`` block ([] when
    none); InputError for a listed file that is missing."""
    block = (summary or {}).get("margins") or {}
    out = []
    for organ, rec in (block.get("classes") or {}).items():
        path = Path(case_dir) / rec["file"]
        if not path.is_file():
            raise InputError(f"summary.json lists the margins file {path.name}, which is not in {case_dir}")
        out.append((organ, int(rec.get("class_index", 0)), path))
    return out


def trivial_outer_organs(summary: dict) -> set:
    """Organs whose outer contour is the trivial one (the whole image: too few calibration cases,
    or no smaller set met the bound). It is not drawn: a frame around every view says nothing, and
    the panel's guarantee line says the guarantee is trivial. Folders written before summary.json
    said so: an outer threshold of 0."""
    block = (summary or {}).get("margins") or {}
    out = set()
    for organ, rec in (block.get("classes") or {}).items():
        trivial = rec.get("trivial_outer")
        if trivial is None:
            trivial = float(rec.get("outer_threshold", 1.0)) <= 0.0
        if trivial:
            out.add(organ)
    return out


def read_margins(case_dir, summary: dict, geometry) -> dict:
    """{organ: (class index, levels array)} of the folder's margins files ({} when none);
    InputError for a listed file that is missing or on another grid."""
    out = {}
    for organ, c, path in margin_files(case_dir, summary):
        levels, geo = read_image(path)
        geo.require_same(geometry, str(path), "the case outputs")
        out[organ] = (c, levels.astype(np.uint8, copy=False))
    return out


def margin_box(levels: np.ndarray, trivial_outer: bool = False):
    """(box, {part: mask of the box}) of one organ's levels: the box of its outer contour (which
    holds the other two), or (None, {}) when the organ has no margin at all. ``trivial_outer``:
    the outer contour is left out (see ``trivial_outer_organs``) and the box is the prediction's."""
    from .segments import LabelBoxes

    lowest = 2 if trivial_outer else 1
    boxes = LabelBoxes()
    boxes.add(0, (np.asarray(levels) >= lowest).astype(np.uint8))
    box = boxes.box(1)
    if box is None:
        return None, {}
    crop = np.asarray(levels)[box]
    return box, {part: crop >= level for part, level, _f in SEGMENTS if level >= lowest}


def guarantee_lines(summary: dict) -> list[str]:
    """The guarantees of a case, as the panel shows them ([] without a conformal calibration):
    voxel flags and margins, then (``report.guarantees.case_lines``) exchangeability, contour
    flags, per-organ Dice intervals and the review burden; each marked VOID when the case is not
    exchangeable with the calibration cases. A trivial guarantee is called trivial, with the
    calibration cases a real one needs (also for case folders written before summary.json said so)."""
    from ..calibration.conformal import guarantee_text, min_cases, trivial_text
    from ..report.guarantees import case_lines, void_reason

    conf = (summary or {}).get("conformal") or {}
    void = " VOID for this case." if void_reason(summary) else ""
    lines = []
    flags = conf.get("flags") or {}
    a, n = conf.get("alpha"), conf.get("n_cases")
    if flags:
        if conf.get("trivial"):
            text = flags["guarantee"] if "trivial" in flags.get("guarantee", "") else trivial_text(a, n, "flags")
            lines.append(f"Conformal flags: {text}.{void}")
        else:
            what = flags.get("rule") or f"{flags['map']} > {flags['tau_score']:.4g}"
            lines.append(f"Conformal flags ({what}): {flags.get('guarantee') or guarantee_text(a)}.{void}")
    margins = (summary or {}).get("margins") or {}
    if margins.get("guarantee"):  # the margins the files hold (voxel or contour errors)
        outer, inner = margins["guarantee"]["outer"], margins["guarantee"]["inner"]
    elif conf.get("margins"):
        outer, inner = conf["margins"]["outer"], conf["margins"]["inner"]
    else:
        outer = inner = None
    if outer is not None:
        if a is not None and n is not None and n < min_cases(a) and "trivial" not in outer + inner:  # older folders
            outer, inner = trivial_text(a, n, "outer"), trivial_text(a, n, "inner")
        lines.append(f"Organ margins: {outer}; {inner}.{void}")
    return lines + case_lines(summary)


def new_margins_node(scene, name: str, geometry, reference_volume=None):
    """An empty margins segmentation node added to ``scene``, with its reference geometry."""
    import slicer

    from .segments import set_reference_geometry

    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    set_reference_geometry(node, geometry, reference_volume)
    return node


def add_organ_margins(node, organ: str, class_index: int, box, masks: dict, geometry) -> None:
    """The three segments of one organ ("<organ> inner / prediction / outer", nested, in the
    class's colour: darker inner, lighter outer, both outlines only) from ``margin_box``'s output
    (an organ without any margin gets three empty segments)."""
    from .segments import add_mask_segment

    segmentation = node.GetSegmentation()
    display = node.GetDisplayNode()
    base = np.asarray(colors.class_colour(class_index, organ, node.GetScene()), dtype=float)
    for part, _level, factor in SEGMENTS:
        seg_id = add_mask_segment(segmentation, f"{organ} {part}", masks.get(part), box, geometry,
                                  colour=np.clip(base * factor, 0, 1))
        segmentation.GetSegment(seg_id).SetTag("CalibU.Margin", f"{organ}|{part}")
        if part != "prediction" and display is not None:
            display.SetSegmentOpacity2DFill(seg_id, 0.0)


def add_margins_node(scene, case_dir, summary: dict, geometry, name: str, reference_volume=None):
    """The margins segmentation node (added to ``scene``), or None when the case has no margins.
    (``case_loader.CaseLoader`` does the same a file at a time.)"""
    files = margin_files(case_dir, summary)
    if not files:
        return None
    node = new_margins_node(scene, name, geometry, reference_volume)
    trivial = trivial_outer_organs(summary)
    for organ, c, path in files:
        levels, geo = read_image(path)
        geo.require_same(geometry, str(path), "the case outputs")
        box, masks = margin_box(levels.astype(np.uint8, copy=False), organ in trivial)
        add_organ_margins(node, organ, c, box, masks, geometry)
    return node


def segment_masks(scene, node, reference_volume) -> dict:
    """{segment name: bool (z, y, x) array on ``reference_volume``'s grid} of a margins node."""
    from .volumes import segment_array

    seg = node.GetSegmentation()
    return {seg.GetNthSegment(i).GetName():
            segment_array(scene, node, seg.GetNthSegmentID(i), reference_volume).astype(bool)
            for i in range(seg.GetNumberOfSegments())}
