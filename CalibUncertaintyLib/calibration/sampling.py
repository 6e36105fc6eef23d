"""Class-stratified voxel subsampling for calibration fitting (METHODS.md §2).

"Subsample the ROI to at most a few million voxels, stratified by class, with a fixed seed."
Each class present keeps its share of the sample (proportional allocation, largest-remainder
rounding), except that a rare class whose share would fall below ``min_per_class`` keeps that
minimum (or all of its voxels when it has fewer); the other classes share what is left in
proportion to their sizes. The same labels and seed always give the same indices.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

DEFAULT_MAX_VOXELS = 2_000_000
DEFAULT_MIN_PER_CLASS = 1000


def stratified_sample_indices(labels_flat, max_voxels: int = DEFAULT_MAX_VOXELS, seed: int = 0,
                              min_per_class: int = DEFAULT_MIN_PER_CLASS) -> np.ndarray:
    """Sorted int64 indices into ``labels_flat`` (at most ``max_voxels`` of them).

    If there are no more than ``max_voxels`` labels, all indices are returned. Otherwise class c
    (n_c voxels) gets max_voxels · n_c / N, except that a class whose share is below
    min(n_c, m), m = ``min_per_class`` (lowered to ``max_voxels // n_classes`` if the minima alone
    could exceed the budget), gets that floor and the others split the rest proportionally. Within a
    class, voxels are drawn uniformly without replacement with ``numpy.random.default_rng(seed)``.
    """
    labels = np.asarray(labels_flat).ravel()
    max_voxels = int(max_voxels)
    if max_voxels < 1:
        raise InputError(f"max_voxels must be at least 1, got {max_voxels}")
    if min_per_class < 0:
        raise InputError(f"min_per_class must be >= 0, got {min_per_class}")
    n = labels.size
    if n <= max_voxels:
        return np.arange(n, dtype=np.int64)

    classes, counts = np.unique(labels, return_counts=True)
    quota = _allocate(counts, max_voxels, int(min_per_class))

    rng = np.random.default_rng(seed)
    parts = []
    for c, q in zip(classes, quota):
        if q == 0:
            continue
        idx = np.flatnonzero(labels == c)
        parts.append(idx if q >= idx.size else rng.choice(idx, size=int(q), replace=False))
    out = np.concatenate(parts).astype(np.int64, copy=False)
    out.sort()
    return out


def _allocate(counts: np.ndarray, budget: int, min_per_class: int) -> np.ndarray:
    """Per-class sample sizes summing to ``budget`` (assumes budget < counts.sum()).

    Classes whose proportional share falls below their floor min(n_c, m) get the floor; the
    share of the others is recomputed on what is left, until no further class needs its floor.
    """
    counts = counts.astype(np.int64)
    m = min(min_per_class, budget // len(counts))
    floor = np.minimum(counts, m)
    fixed = np.zeros(len(counts), dtype=bool)
    while True:
        left = budget - int(floor[fixed].sum())
        free = ~fixed
        total_free = int(counts[free].sum())
        share = np.zeros(len(counts))
        share[free] = counts[free] * (left / total_free)
        # share < floor, compared exactly in integers (no rounding can fix every class)
        newly = free & (counts * left < floor * total_free)
        if not newly.any() or newly.sum() == free.sum():
            break
        fixed |= newly
    quota = np.where(fixed, floor, np.floor(share).astype(np.int64))
    quota = np.minimum(quota, counts)
    short = budget - int(quota.sum())
    order = np.argsort(-(share - np.floor(share)), kind="stable")  # largest remainders first
    while short > 0:
        before = short
        for i in order:
            if short == 0:
                break
            if not fixed[i] and quota[i] < counts[i]:
                quota[i] += 1
                short -= 1
        if short == before:  # cannot happen when budget < counts.sum(); never loop forever
            break
    return quota
