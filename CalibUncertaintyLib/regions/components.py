"""Error regions a reviewer navigates (METHODS.md §5).

Regions are the 26-connected components of {U > τ} ∩ ROI. Per region:

- ``n_voxels``, ``volume_mm3`` = n_voxels × voxel volume (mm³);
- ``mean_u``, ``max_u``: mean and max of U over the region's voxels;
- ``class_index`` / ``class_name``: the predicted foreground class the region touches most,
  counted over the region dilated by one voxel (26-neighbourhood) so that a region lying just
  outside an organ still names it; 0 / "background" when it touches no foreground class
  (ties go to the lower class index);
- ``centroid_zyx``: mean voxel index (z, y, x) of the region (unweighted), and
  ``centroid_ras``: the same point in RAS millimetres (``Geometry.zyx_to_ras``), where a Slicer
  slice view can be jumped to;
- ``bbox_zyx_min`` / ``bbox_zyx_max``: inclusive voxel index bounds;
- ``score`` = volume_mm3 × mean_u; regions are ranked by descending score, rank 1 first.

Regions smaller than ``min_volume_mm3`` (default 10 mm³) are dropped before ranking;
``max_regions`` keeps only the best ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..errors import GeometryMismatchError, InputError

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


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

    def to_dict(self) -> dict:
        """JSON-ready dict with the keys of regions.json (docs/ARCHITECTURE.md)."""
        d = asdict(self)
        for key in ("centroid_ras", "centroid_zyx", "bbox_zyx_min", "bbox_zyx_max"):
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


def _check_inputs(u, roi, labels, geometry, threshold, min_volume_mm3, max_regions):
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
    return u, roi, lab, tau


def find_regions(u, threshold, roi, labels, geometry, class_names=None,
                 min_volume_mm3: float = 10.0, max_regions: int | None = None) -> list[Region]:
    """Connected error regions of {u > threshold} ∩ roi, ranked by volume × mean u.

    ``u``: uncertainty map (z, y, x); ``roi``: boolean mask or None (whole image); ``labels``:
    predicted labels (z, y, x); ``geometry``: ``io.geometry.Geometry`` of the image (volume and
    RAS); ``class_names``: names by class index (sequence or dict), used for ``class_name``.
    """
    u, roi, lab, tau = _check_inputs(u, roi, labels, geometry, threshold, min_volume_mm3, max_regions)
    mask = u > tau
    if roi is not None:
        mask &= roi
    # Everything below runs on the flagged voxels' bounding box padded by one voxel (the
    # dilation of ``_touching_class`` reaches one voxel out): the components, their numbering
    # (raster order, which a box keeps) and every per-region sum are those of the whole image.
    box0 = _padded_bbox(mask, 1)
    if box0 is None:
        return []
    offset = np.array([s.start for s in box0])
    mask, u, lab = mask[box0], u[box0], lab[box0]
    comp, n_comp = ndimage.label(mask, structure=_STRUCTURE_26)
    del mask
    if n_comp == 0:
        return []

    flat = comp.ravel()
    idx = np.flatnonzero(flat)
    ids = flat[idx]
    vals = np.ascontiguousarray(u).ravel()[idx].astype(np.float64)
    counts = np.bincount(ids, minlength=n_comp + 1)
    sums = np.bincount(ids, weights=vals, minlength=n_comp + 1)
    maxs = np.full(n_comp + 1, -np.inf)
    np.maximum.at(maxs, ids, vals)
    coords = np.unravel_index(idx, comp.shape)
    # whole-image indices: sums of integers in float64 are exact, so equal to the uncropped sums
    cents = [np.bincount(ids, weights=c + o, minlength=n_comp + 1) for c, o in zip(coords, offset)]
    del idx, vals, coords

    vox_mm3 = geometry.voxel_volume_mm3
    volumes = counts * vox_mm3
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    scores = volumes * means
    keep = [i for i in range(1, n_comp + 1) if volumes[i] >= float(min_volume_mm3)]
    keep.sort(key=lambda i: (-scores[i], -volumes[i], i))
    if max_regions is not None:
        keep = keep[: int(max_regions)]

    boxes = ndimage.find_objects(comp)
    regions = []
    for rank, i in enumerate(keep, start=1):
        box = boxes[i - 1]
        cz, cy, cx = (float(c[i] / counts[i]) for c in cents)
        ras = geometry.zyx_to_ras(np.array([cz, cy, cx]))
        cls = _touching_class(comp, lab, i, box)
        regions.append(Region(
            rank=rank, n_voxels=int(counts[i]), volume_mm3=float(volumes[i]),
            mean_u=float(means[i]), max_u=float(maxs[i]), class_index=cls,
            class_name=class_name_of(cls, class_names),
            centroid_ras=tuple(float(v) for v in ras), centroid_zyx=(cz, cy, cx),
            bbox_zyx_min=tuple(int(s.start + o) for s, o in zip(box, offset)),
            bbox_zyx_max=tuple(int(s.stop + o) - 1 for s, o in zip(box, offset)),
            score=float(scores[i])))
    return regions


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
    """Most frequent foreground label within the region dilated by one voxel (0 if none)."""
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, comp.shape))
    region = comp[grown] == i
    near = ndimage.binary_dilation(region, structure=_STRUCTURE_26)
    hits = lab[grown][near].astype(np.int64, copy=False)
    hits = hits[hits > 0]
    if hits.size == 0:
        return 0
    return int(np.argmax(np.bincount(hits)))


def regions_to_dict(regions, *, case: str, map_name: str, threshold: float, threshold_source: str,
                    roi: dict | None = None, class_names=None) -> dict:
    """The regions.json structure (docs/ARCHITECTURE.md): case, map, threshold and its source,
    ROI description (e.g. {"rule": "prediction", "radius_mm": 15.0}), class names, regions."""
    if isinstance(class_names, dict):
        names = {str(k): str(v) for k, v in class_names.items()}
    elif class_names is not None:
        names = [str(n) for n in class_names]
    else:
        names = None
    return {"case": str(case), "map": str(map_name), "threshold": float(threshold),
            "threshold_source": str(threshold_source), "roi": dict(roi) if roi is not None else None,
            "class_names": names, "regions": [r.to_dict() for r in regions]}
