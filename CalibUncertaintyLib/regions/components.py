"""Error regions a reviewer navigates (METHODS.md §5).

Regions are places to look: the 26-connected components of {U > τ} ∩ ROI, each cut into parts
that fit one view (``max_extent_mm`` along every axis, voxel edges included; ``regions.split``:
seeds at the uncertainty peaks, nearest-seed cells, connected parts, merged while they fit). A
component that fits is one region, as before. Per region:

- ``n_voxels``, ``volume_mm3`` = n_voxels × voxel volume (mm³);
- ``mean_u``, ``max_u``: mean and max of U over the region's voxels;
- ``class_index`` / ``class_name``: the predicted foreground class the region touches most,
  counted over the region dilated by one voxel (26-neighbourhood) so that a region lying just
  outside an organ still names it; 0 / "background" when it touches no foreground class
  (ties go to the lower class index);
- ``centroid_zyx``: mean voxel index (z, y, x) of the region (unweighted), and
  ``centroid_ras``: the same point in RAS millimetres (``Geometry.zyx_to_ras``); it may lie
  outside a curved region;
- ``jump_zyx`` / ``jump_ras``: the region's most uncertain part (``regions.jump_point``: its
  voxel of largest U smoothed over a few mm), always a voxel of the region: where "Next" takes
  the slice views;
- ``bbox_zyx_min`` / ``bbox_zyx_max``: inclusive voxel index bounds; ``extent_mm``: the box's
  length (z, y, x) in mm, voxel edges included, at most ``max_extent_mm``;
- ``component``: which connected component the region is part of (numbered by the rank of its
  first region), ``n_parts``: how many parts that component was cut into,
  ``component_volume_mm3``: its whole volume (the §6 "largest region" is the largest component);
- ``score`` = volume_mm3 × mean_u (the region's total uncertainty); regions are ranked by
  descending score, rank 1 first (ties: larger volume, then the region found first).

Dropped, and so missing from the sum of the region volumes: components and parts smaller than
``min_volume_mm3`` (default 10 mm³) or of a single voxel (a minimum below one voxel, e.g. 10 mm³
on a 5 × 5 × 2.5 mm grid, would list single voxels); parts are first merged, smallest first,
into a neighbouring part while the union fits (``split``). ``max_regions`` keeps only the best ones.
``max_extent_mm=None`` keeps whole components (no splitting).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..errors import GeometryMismatchError, InputError
from .jump_point import PEAK_SIGMA_MM, jump_points, smoothed_on_box
from .split import extent_mm, split_component

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

#: Default longest side (mm) of a region's box: what a reviewer takes in at one zoom of a slice
#: view, with context around it (a 5 cm box in a ~10-15 cm field of view). Fixed a priori.
DEFAULT_MAX_EXTENT_MM = 50.0


@dataclass
class Region:
    """One error region (see module doc for every field's definition)."""

    rank: int
    n_voxels: int
    volume_mm3: float
    mean_u: float
    max_u: float
    class_index: int
    class_name: str
    centroid_ras: tuple
    centroid_zyx: tuple
    bbox_zyx_min: tuple
    bbox_zyx_max: tuple
    score: float
    jump_ras: tuple = ()
    jump_zyx: tuple = ()
    extent_mm: tuple = ()
    component: int = 0
    n_parts: int = 1
    component_volume_mm3: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict with the keys of regions.json (docs/ARCHITECTURE.md)."""
        d = asdict(self)
        for key in ("centroid_ras", "centroid_zyx", "bbox_zyx_min", "bbox_zyx_max", "jump_ras", "jump_zyx",
                    "extent_mm"):
            d[key] = list(d[key])
        return d


def class_name_of(index: int, class_names=None) -> str:
    """Name of class ``index`` from a sequence or mapping; defaults "background" / "class_<i>"."""
    index = int(index)
    if class_names is not None:
        try:
            name = class_names[index] if not isinstance(class_names, dict) else class_names.get(
                index, class_names.get(str(index)))
        except (IndexError, KeyError):
            name = None
        if name is not None:
            return str(name)
    return "background" if index == 0 else f"class_{index}"


def _check_inputs(u, roi, labels, geometry, threshold, min_volume_mm3, max_regions, max_extent_mm=None):
    u = np.asarray(u)
    shape = tuple(geometry.shape_zyx)
    if u.ndim != 3:
        raise InputError(f"the uncertainty map must be 3-D (z, y, x), got shape {u.shape}")
    if u.shape != shape:
        raise GeometryMismatchError(f"uncertainty map shape {u.shape} differs from the image "
                                    f"geometry shape {shape}")
    if not np.isfinite(u).all():
        raise InputError("the uncertainty map has non-finite values (NaN or inf); regions need a finite map")
    lab = np.asarray(labels)
    if lab.shape != shape:
        raise GeometryMismatchError(f"label volume shape {lab.shape} differs from the image "
                                    f"geometry shape {shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise InputError(f"labels must be an integer volume of predicted classes, got dtype {lab.dtype}")
    if roi is not None:
        roi = np.asarray(roi)
        if roi.shape != shape:
            raise GeometryMismatchError(f"ROI shape {roi.shape} differs from the image geometry shape {shape}")
        roi = roi.astype(bool, copy=False)
    try:
        tau = float(threshold)
    except (TypeError, ValueError) as e:
        raise InputError(f"threshold must be a number, got {threshold!r}") from e
    if not math.isfinite(tau):
        raise InputError(f"threshold must be finite, got {threshold!r}")
    if not (min_volume_mm3 >= 0):
        raise InputError(f"min_volume_mm3 must be >= 0 mm³, got {min_volume_mm3!r}")
    if max_regions is not None and (int(max_regions) != max_regions or max_regions < 1):
        raise InputError(f"max_regions must be a positive integer or None, got {max_regions!r}")
    if max_extent_mm is not None:
        smallest = 2.0 * max(geometry.spacing_zyx)
        try:
            extent = float(max_extent_mm)
        except (TypeError, ValueError):
            extent = math.nan
        if not (math.isfinite(extent) and extent >= smallest):
            raise InputError(f"the region max extent must be at least two voxels of the coarsest axis "
                             f"({smallest:g} mm on this image), got {max_extent_mm!r} mm")
    return u, roi, lab, tau


def find_regions(u, threshold, roi, labels, geometry, class_names=None,
                 min_volume_mm3: float = 10.0, max_regions: int | None = None,
                 max_extent_mm: float | None = DEFAULT_MAX_EXTENT_MM) -> list[Region]:
    """Error regions of {u > threshold} ∩ roi, each fitting ``max_extent_mm`` (module doc),
    ranked by volume × mean u.

    ``u``: uncertainty map (z, y, x); ``roi``: boolean mask or None (whole image); ``labels``:
    predicted labels (z, y, x); ``geometry``: ``io.geometry.Geometry`` of the image (volume and
    RAS); ``class_names``: names by class index (sequence or dict), used for ``class_name``.
    """
    return _find(u, threshold, roi, labels, geometry, class_names, min_volume_mm3, max_regions,
                 max_extent_mm, False)[0]


def find_regions_and_labels(u, threshold, roi, labels, geometry, class_names=None,
                            min_volume_mm3: float = 10.0, max_regions: int | None = None,
                            max_extent_mm: float | None = DEFAULT_MAX_EXTENT_MM):
    """``find_regions`` and the regions' voxels: (regions, int32 volume (z, y, x) holding each
    region's rank, 0 elsewhere: unflagged, dropped parts and parts beyond max_regions)."""
    return _find(u, threshold, roi, labels, geometry, class_names, min_volume_mm3, max_regions,
                 max_extent_mm, True)


def _find(u, threshold, roi, labels, geometry, class_names, min_volume_mm3, max_regions, max_extent_mm,
          want_labels: bool):
    u, roi, lab, tau = _check_inputs(u, roi, labels, geometry, threshold, min_volume_mm3, max_regions,
                                     max_extent_mm)
    mask = u > tau
    if roi is not None:
        mask &= roi
    # Everything below runs on the flagged voxels' bounding box padded by one voxel (the
    # dilation of ``_touching_class`` reaches one voxel out): the components, their numbering
    # (raster order, which a box keeps) and every per-region sum are those of the whole image.
    shape = mask.shape
    empty = (lambda: ([], np.zeros(shape, np.int32) if want_labels else None))
    box0 = _padded_bbox(mask, 1)
    if box0 is None:
        return empty()
    offset = np.array([s.start for s in box0])
    u_whole = u
    mask, u, lab = mask[box0], u[box0], lab[box0]
    comp, n_comp = ndimage.label(mask, structure=_STRUCTURE_26)
    del mask
    if n_comp == 0:
        return empty()

    vox_mm3 = geometry.voxel_volume_mm3
    spacing = geometry.spacing_zyx
    min_voxels = max(2, math.ceil(float(min_volume_mm3) / vox_mm3 - 1e-9))
    # Each kept component's parts are relabelled n_comp + 1, n_comp + 2, ... in place (dropped
    # components keep their label <= n_comp and are ignored below).
    comp_counts = np.bincount(comp.ravel(), minlength=n_comp + 1)
    comp_boxes = ndimage.find_objects(comp)
    part_comp, part_nparts, jumps = [], [], []
    for i in range(1, n_comp + 1):
        if comp_counts[i] < min_voxels:
            continue
        box = comp_boxes[i - 1]
        m = comp[box] == i
        s = smoothed_on_box(u_whole, tuple(slice(b.start + o, b.stop + o) for b, o in zip(box, offset)),
                            spacing, PEAK_SIGMA_MM)
        if max_extent_mm is None:
            parts, n_parts = m.astype(np.int32), 1
        else:
            parts, n_parts = split_component(m, s, spacing, max_extent_mm)
        peaks = jump_points(s, parts, n_parts)[1:] + [b.start for b in box]
        comp[box][m] = parts[m] + (n_comp + len(part_comp))
        part_comp += [i] * n_parts
        part_nparts += [n_parts] * n_parts
        jumps.extend(peaks)
    n_parts_all = len(part_comp)
    if n_parts_all == 0:
        return empty()

    flat = comp.ravel()
    idx = np.flatnonzero(flat > n_comp)
    ids = flat[idx] - n_comp                       # parts 1..n_parts_all
    vals = np.ascontiguousarray(u).ravel()[idx].astype(np.float64)
    counts = np.bincount(ids, minlength=n_parts_all + 1)
    sums = np.bincount(ids, weights=vals, minlength=n_parts_all + 1)
    maxs = np.full(n_parts_all + 1, -np.inf)
    np.maximum.at(maxs, ids, vals)
    coords = np.unravel_index(idx, comp.shape)
    # whole-image indices: sums of integers in float64 are exact, so equal to the uncropped sums
    cents = [np.bincount(ids, weights=c + o, minlength=n_parts_all + 1) for c, o in zip(coords, offset)]
    del idx, vals, coords

    volumes = counts * vox_mm3
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    scores = volumes * means
    keep = [j for j in range(1, n_parts_all + 1)
            if counts[j] >= min_voxels and volumes[j] >= float(min_volume_mm3)]
    keep.sort(key=lambda j: (-scores[j], -volumes[j], j))
    if max_regions is not None:
        keep = keep[: int(max_regions)]

    boxes = ndimage.find_objects(comp)
    component_number: dict = {}
    regions = []
    for rank, j in enumerate(keep, start=1):
        box = boxes[n_comp + j - 1]
        cz, cy, cx = (float(c[j] / counts[j]) for c in cents)
        ras = geometry.zyx_to_ras(np.array([cz, cy, cx]))
        jump = tuple(int(v) for v in np.asarray(jumps[j - 1]) + offset)
        jras = geometry.zyx_to_ras(np.array(jump, dtype=float))
        lo = tuple(int(s.start + o) for s, o in zip(box, offset))
        hi = tuple(int(s.stop + o) - 1 for s, o in zip(box, offset))
        c_id = part_comp[j - 1]
        cls = _touching_class(comp, lab, n_comp + j, box)
        regions.append(Region(
            rank=rank, n_voxels=int(counts[j]), volume_mm3=float(volumes[j]),
            mean_u=float(means[j]), max_u=float(maxs[j]), class_index=cls,
            class_name=class_name_of(cls, class_names),
            centroid_ras=tuple(float(v) for v in ras), centroid_zyx=(cz, cy, cx),
            bbox_zyx_min=lo, bbox_zyx_max=hi, score=float(scores[j]),
            jump_ras=tuple(float(v) for v in jras), jump_zyx=jump,
            extent_mm=tuple(float(v) for v in extent_mm(lo, hi, spacing)),
            component=component_number.setdefault(c_id, len(component_number) + 1),
            n_parts=int(part_nparts[j - 1]), component_volume_mm3=float(comp_counts[c_id] * vox_mm3)))
    if not want_labels:
        return regions, None
    lut = np.zeros(n_comp + n_parts_all + 1, np.int32)
    lut[[n_comp + j for j in keep]] = np.arange(1, len(keep) + 1, dtype=np.int32)
    out = np.zeros(shape, np.int32)
    out[box0] = lut[comp]
    return regions, out


def component_volumes(regions) -> list[float]:
    """One volume (mm³) per connected component the regions come from (METHODS.md §6 "largest
    region" is the largest component, whatever parts it was cut into)."""
    seen: dict = {}
    for r in regions:
        seen.setdefault(r.component, r.component_volume_mm3 if r.component else r.volume_mm3)
    return list(seen.values())


def _padded_bbox(mask: np.ndarray, pad: int):
    """Slices of ``mask``'s True voxels' bounding box padded by ``pad`` voxels (clipped to the
    array), or None when no voxel is True."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    sub = mask[zs[0]:zs[-1] + 1]
    ys = np.flatnonzero(sub.any(axis=(0, 2)))
    xs = np.flatnonzero(sub[:, ys[0]:ys[-1] + 1].any(axis=(0, 1)))
    return tuple(slice(max(int(a[0]) - pad, 0), min(int(a[-1]) + 1 + pad, n))
                 for a, n in zip((zs, ys, xs), mask.shape))


def _touching_class(comp, lab, i, box) -> int:
    """Most frequent foreground label within region ``i`` of ``comp`` dilated by one voxel (0 if none)."""
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, comp.shape))
    region = comp[grown] == i
    near = ndimage.binary_dilation(region, structure=_STRUCTURE_26)
    hits = lab[grown][near].astype(np.int64, copy=False)
    hits = hits[hits > 0]
    if hits.size == 0:
        return 0
    return int(np.argmax(np.bincount(hits)))


def regions_to_dict(regions, *, case: str, map_name: str, threshold: float, threshold_source: str,
                    roi: dict | None = None, class_names=None, max_extent_mm: float | None = None) -> dict:
    """The regions.json structure (docs/ARCHITECTURE.md): case, map, threshold and its source,
    ROI description (e.g. {"rule": "prediction", "radius_mm": 15.0}), class names, regions, and
    the max extent (mm) they were cut to (None: whole components)."""
    if isinstance(class_names, dict):
        names = {str(k): str(v) for k, v in class_names.items()}
    elif class_names is not None:
        names = [str(n) for n in class_names]
    else:
        names = None
    return {"case": str(case), "map": str(map_name), "threshold": float(threshold),
            "threshold_source": str(threshold_source), "roi": dict(roi) if roi is not None else None,
            "class_names": names, "regions": [r.to_dict() for r in regions],
            "max_extent_mm": None if max_extent_mm is None else float(max_extent_mm)}
