"""Where a reviewer is taken for a region: its most uncertain part (METHODS.md §5).

s = G∗U, the uncertainty map smoothed by a Gaussian of σ = ``PEAK_SIGMA_MM`` mm (per axis in
voxels from the spacing; the map's own values all around, flagged or not). A region's jump point
is its voxel of largest s (ties: first in raster order): always a voxel of the region, unlike the
centroid of a curved shell, and in the middle of its most uncertain few millimetres rather than
at a lone extreme voxel or on its rim (where the neighbourhood outside the region is less
uncertain). ``split`` cuts a component around the same peaks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: σ (mm) of the smoothing that defines "the most uncertain part": a few millimetres, the size of
#: a contour error at CT resolution (fixed a priori, not tuned on data).
PEAK_SIGMA_MM = 3.0
TRUNCATE = 3.0


def _sigma_vox(spacing_zyx, sigma_mm: float) -> list[float]:
    return [float(sigma_mm) / float(h) for h in spacing_zyx]


def smoothed_on_box(u: np.ndarray, box: tuple, spacing_zyx, sigma_mm: float = PEAK_SIGMA_MM) -> np.ndarray:
    """s = G∗U on the index box ``box`` (slices) of the whole map ``u``: float32 of the box's
    shape, exact (the map is read as far around the box as the kernel reaches; the image's own
    border is mirrored, scipy's default)."""
    sigma = _sigma_vox(spacing_zyx, sigma_mm)
    reach = [int(np.ceil(TRUNCATE * s)) for s in sigma]
    grown = tuple(slice(max(b.start - k, 0), min(b.stop + k, n)) for b, k, n in zip(box, reach, u.shape))
    s = ndimage.gaussian_filter(np.asarray(u[grown], dtype=np.float32), sigma, truncate=TRUNCATE)
    return s[tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown))]


def jump_points(s: np.ndarray, parts: np.ndarray, n_parts: int) -> np.ndarray:
    """(n_parts + 1, 3) int array: for each label 1..n_parts of ``parts`` (0 = none), the index
    (z, y, x) in the box of its voxel of largest ``s`` (same box), ties to the first in raster
    order; row 0 unused."""
    vox = np.nonzero(parts)
    ids = parts[vox]
    order = np.lexsort((-s[vox].astype(np.float64), ids))  # by part, then s descending; stable
    ids_sorted = ids[order]
    first = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]])
    out = np.zeros((n_parts + 1, 3), np.int64)
    pick = order[first]
    out[ids_sorted[first]] = np.stack([v[pick] for v in vox], axis=1)
    return out
