"""Split one connected error component into parts that each fit one view (METHODS.md §5).

At the calibrated τ* (low by design: it maximises UEO) a component is often an organ's whole
uncertain shell, e.g. both halves of a mandible joined at the chin. A region that large is no
place to look: its centroid can lie outside it, at the organ's centre. A component whose bounding
box is longer than ``max_extent_mm`` along any axis (voxel edges included) is cut into parts:

1. **Seeds at the uncertainty peaks, at least r apart** (greedy non-maximum suppression):
   the voxels are visited by decreasing s, the map smoothed over a few mm (``jump_point``;
   ties: raster order); a voxel becomes a seed when no earlier seed lies within r mm of it
   (Euclidean, in mm). Every voxel then lies within r of a seed, and seeds are more than r apart.
2. **Nearest-seed cells**: each voxel goes to its nearest seed (ties: the earlier seed), so every
   cell lies in the ball of radius r about its seed. With r = (max_extent_mm − h) / 2, h the
   largest voxel spacing, a cell's extent along each axis is at most 2r + h = max_extent_mm.
3. **Connected parts**: a cell is split into its 26-connected parts (a cell can be cut in two
   where the component curves back within r of its seed).
4. **Merging**: the parts are taken smallest first (ties: first voxel in raster order; a part
   that grew is taken again at its new size); each joins the neighbouring part it shares the
   most 26-neighbour contacts with (ties: the lower part number) among those whose union with it
   still fits the extent. This removes the slivers the cells leave at the component's edges and
   leaves parts about as large as one view allows, so fewer regions to step through.

Every part is 26-connected and fits the extent, the parts cover the component exactly, and the
result depends only on the voxels and their values. Cost: per seed, one pass over the voxels
whose z and y lie within r of it, so about (component voxels × seeds within reach).
"""

from __future__ import annotations

import heapq
import math

import numpy as np
from scipy import ndimage

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
_OFFSETS_26 = np.array([(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                        if (dz, dy, dx) != (0, 0, 0)])


def extent_mm(lo, hi, spacing_zyx) -> np.ndarray:
    """Extent (z, y, x) in mm of the inclusive index box lo..hi, voxel edges included."""
    return (np.asarray(hi) - np.asarray(lo) + 1) * np.asarray(spacing_zyx, dtype=float)


def fits(lo, hi, spacing_zyx, max_extent_mm: float) -> bool:
    """Whether the inclusive index box lo..hi is at most ``max_extent_mm`` long along every axis."""
    return bool(np.all(extent_mm(lo, hi, spacing_zyx) <= max_extent_mm * (1 + 1e-9)))


def cover_radius_mm(spacing_zyx, max_extent_mm: float) -> float:
    """r such that a set within r mm of a point fits ``max_extent_mm``: (max_extent − h) / 2."""
    return (float(max_extent_mm) - float(max(spacing_zyx))) / 2.0


def split_component(mask: np.ndarray, s: np.ndarray, spacing_zyx, max_extent_mm: float) -> tuple[np.ndarray, int]:
    """Parts of the single 26-connected component ``mask`` (bool, a box around it) that each fit
    ``max_extent_mm`` (module doc). ``s``: the smoothed map on the same box (read on the mask).
    Returns (labels int32 of the box's shape, 0 outside, parts 1..n; n).

    A component that already fits is one part. Needs ``max_extent_mm`` ≥ 2 × the largest spacing.
    """
    spacing = np.asarray(spacing_zyx, dtype=float)
    vox = np.nonzero(mask)                       # raster order: z ascending
    n = vox[0].size
    labels = np.zeros(mask.shape, np.int32)
    if n == 0:
        return labels, 0
    lo = np.array([v.min() for v in vox])
    hi = np.array([v.max() for v in vox])
    if fits(lo, hi, spacing, max_extent_mm):
        labels[vox] = 1
        return labels, 1

    r = cover_radius_mm(spacing, max_extent_mm)
    cell, _ = _nearest_seed_cells(vox, s[vox], spacing, r)
    labels[vox] = cell + 1
    labels, n_parts = _connected_parts(labels, int(cell.max()) + 1)
    labels = _merge_parts(labels, n_parts, spacing, max_extent_mm)
    return _renumber(labels)


def _nearest_seed_cells(vox, s_vals, spacing, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1 and 2 of the module doc: the cell index (0..k-1, seeds in the order found) of each
    voxel, and the seeds (positions in ``vox``). A seed's distances are taken only over the voxels
    whose (z, y) lies within r of it: in raster order each such row is one contiguous run."""
    n = vox[0].size
    pts = np.stack(vox, axis=1).astype(np.float64) * spacing
    z, y = vox[0].astype(np.int64), vox[1].astype(np.int64)
    n_y = int(y.max()) + 1
    row = z * n_y + y                                # non-decreasing in raster order
    r2 = r * r
    reach_z, reach_y = int(math.floor(r / spacing[0])), int(math.floor(r / spacing[1]))
    d2 = np.full(n, np.inf)
    cell = np.full(n, -1, np.int64)
    order = np.argsort(-np.asarray(s_vals, dtype=np.float64), kind="stable")
    ptr, chunk, seeds = 0, 4096, []
    while ptr < n:
        ahead = order[ptr:ptr + chunk]
        open_ = np.flatnonzero(d2[ahead] > r2)
        if open_.size == 0:
            ptr += chunk
            continue
        ptr += int(open_[0])
        seed = order[ptr]
        zs = np.arange(max(z[seed] - reach_z, 0), z[seed] + reach_z + 1)
        a = np.searchsorted(row, zs * n_y + max(y[seed] - reach_y, 0), side="left")
        b = np.searchsorted(row, zs * n_y + min(y[seed] + reach_y, n_y - 1), side="right")
        near = _runs(a, b)
        dd = ((pts[near] - pts[seed]) ** 2).sum(axis=1)
        closer = dd < d2[near]
        near = near[closer]
        d2[near] = dd[closer]
        cell[near] = len(seeds)
        seeds.append(seed)
        ptr += 1
    return cell, np.asarray(seeds, dtype=np.int64)


def _runs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The concatenation of ranges a[i]..b[i] - 1 (int64)."""
    lengths = b - a
    keep = lengths > 0
    a, lengths = a[keep], lengths[keep]
    if a.size == 0:
        return np.zeros(0, np.int64)
    starts = np.repeat(a - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return starts + np.arange(int(lengths.sum()), dtype=np.int64)


def _connected_parts(labels: np.ndarray, n_cells: int) -> tuple[np.ndarray, int]:
    """Step 3: each cell (labels 1..n_cells) split into its 26-connected parts; a cell's first part
    keeps its label, the others get new ones. Returns (labels, number of parts)."""
    boxes = ndimage.find_objects(labels, max_label=n_cells)
    next_label = n_cells + 1
    for j, box in enumerate(boxes, start=1):
        parts, n_p = ndimage.label(labels[box] == j, structure=_STRUCTURE_26)
        view = labels[box]
        for p in range(2, n_p + 1):
            view[parts == p] = next_label
            next_label += 1
    return labels, next_label - 1


def _merge_parts(labels, n_parts: int, spacing, max_extent_mm: float) -> np.ndarray:
    """Step 4 of the module doc; returns the merged labels (a view of a padded copy)."""
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n_parts + 1)
    boxes = ndimage.find_objects(labels, max_label=n_parts)
    lo = {p: np.array([s.start for s in b]) for p, b in enumerate(boxes, 1) if b is not None}
    hi = {p: np.array([s.stop - 1 for s in b]) for p, b in enumerate(boxes, 1) if b is not None}
    nz = np.flatnonzero(flat)
    ids, where = np.unique(flat[nz], return_index=True)
    first = {int(p): int(nz[w]) for p, w in zip(ids, where)}
    heap = [(int(counts[p]), first[p], p) for p in lo]
    heapq.heapify(heap)
    padded = np.pad(labels, 1)
    while heap:
        c, f, p = heapq.heappop(heap)
        if counts[p] != c or first[p] != f:                 # merged away, or grown since pushed
            continue
        pts = np.argwhere(padded[tuple(slice(a + 1, b + 2) for a, b in zip(lo[p], hi[p]))] == p)
        pts += lo[p] + 1                                    # padded coordinates
        neigh = padded[tuple((pts[:, None, :] + _OFFSETS_26[None]).reshape(-1, 3).T)]
        neigh = neigh[(neigh != 0) & (neigh != p)]
        if neigh.size == 0:
            continue
        contacts = np.bincount(neigh)
        for q in sorted(np.flatnonzero(contacts).tolist(), key=lambda q: (-contacts[q], q)):
            new_lo, new_hi = np.minimum(lo[p], lo[q]), np.maximum(hi[p], hi[q])
            if fits(new_lo, new_hi, spacing, max_extent_mm):
                padded[tuple(pts.T)] = q
                counts[q] += counts[p]
                counts[p] = 0
                lo[q], hi[q] = new_lo, new_hi
                first[q] = min(first[q], first[p])
                heapq.heappush(heap, (int(counts[q]), first[q], q))
                break
    return padded[1:-1, 1:-1, 1:-1]


def _renumber(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Parts renumbered 1..n by their first voxel in raster order (deterministic)."""
    flat = labels.ravel()
    nz = np.flatnonzero(flat)
    ids, where = np.unique(flat[nz], return_index=True)
    order = ids[np.argsort(where, kind="stable")]
    lut = np.zeros(int(flat.max()) + 1, np.int32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return lut[labels], int(order.size)
