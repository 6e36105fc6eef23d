"""A small but complete per-case output folder built from synthetic ensemble members.

Used by the self-test (no model needed) and the MRML tests. Given a CT (or a CT-like phantom)
and labels, it makes M member probability volumes that agree everywhere except in "doubt
blobs" (balls of a given radius in mm), where half the members push a class up and the other
half push it down. Each member is confident
there, so the blobs carry high mutual information (METHODS.md section 1: MI = H(p̄) - mean_m
H(p_m)) and become well-separated, ball-shaped error regions (section 5) whose centroids lie
inside them. The members go through the real pipeline (``pipeline.case.process_case``), so the
folder is exactly what ``maps``/``predict`` write ("Per-case outputs" in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.geometry import Geometry

REGION_MAP = "mutual_information"


def phantom_ct(shape_zyx=(40, 48, 48), spacing=(1.5, 1.5, 2.0), origin=(12.0, -30.0, 40.0),
               direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0), seed: int = 0):
    """CT-like phantom in HU (air -1000, soft tissue ~40, a bone ring ~700) on a geometry with a
    non-identity direction and origin. Returns (int16 array (z, y, x), Geometry)."""
    geo = Geometry(shape_zyx, spacing, origin, direction)
    z, y, x = np.indices(geo.shape_zyx, dtype=float)
    cz, cy, cx = [(s - 1) / 2 for s in geo.shape_zyx]
    sx, sy, sz = geo.spacing
    r = np.sqrt(((x - cx) * sx) ** 2 + ((y - cy) * sy) ** 2)
    body = r < 0.45 * min(geo.shape_zyx[1] * sy, geo.shape_zyx[2] * sx)
    ct = np.where(body, 40.0, -1000.0)
    ring = body & (r > 0.36 * min(geo.shape_zyx[1] * sy, geo.shape_zyx[2] * sx))
    ct[ring] = 700.0
    ct += np.random.default_rng(seed).normal(0, 15, ct.shape)
    return ct.astype(np.int16), geo


def ball_mask(geometry: Geometry, centre_zyx, radius_mm: float) -> np.ndarray:
    """Voxels whose centre is within ``radius_mm`` of a (z, y, x) index point, spacing-aware."""
    z, y, x = np.indices(geometry.shape_zyx, dtype=float)
    sz, sy, sx = geometry.spacing_zyx
    c = np.asarray(centre_zyx, float)
    d2 = ((z - c[0]) * sz) ** 2 + ((y - c[1]) * sy) ** 2 + ((x - c[2]) * sx) ** 2
    return d2 <= radius_mm ** 2


def phantom_labels(geometry: Geometry) -> np.ndarray:
    """Two organ-like balls: class 1 (radius 12 mm, centred) and class 2 (7 mm, off-centre)."""
    c = np.array([(s - 1) / 2 for s in geometry.shape_zyx])
    lab = np.zeros(geometry.shape_zyx, np.uint8)
    lab[ball_mask(geometry, c, 12.0)] = 1
    lab[ball_mask(geometry, c + np.array([0, 0, 10]), 7.0)] = 2
    return lab


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def blob_centres(labels: np.ndarray, n: int = 2) -> list[tuple[int, int, int]]:
    """Doubt-blob centres: the voxel nearest the centroid of each of the ``n`` largest classes."""
    counts = [(int((labels == c).sum()), int(c)) for c in np.unique(labels) if c != 0]
    out = []
    for _count, c in sorted(counts, reverse=True)[:n]:
        idx = np.argwhere(labels == c)
        mid = idx.mean(axis=0)
        out.append(tuple(int(v) for v in idx[np.argmin(((idx - mid) ** 2).sum(axis=1))]))
    return out


def members_from_labels(labels: np.ndarray, n_classes: int, geometry: Geometry, n_members: int = 4,
                        blob_radii_mm=(6.0, 4.0), blob_strength=(6.0, 3.0), blobs=None):
    """Yield M member probability volumes (K, z, y, x) float32 that disagree only in doubt blobs."""
    from scipy.ndimage import gaussian_filter

    if n_members < 2:
        raise InputError("sample members need at least 2 members to disagree")
    onehot = np.stack([(labels == c).astype(np.float32) for c in range(n_classes)])
    base = np.stack([gaussian_filter(o, 1.0) for o in onehot]) * 8.0
    blobs = blob_centres(labels, len(blob_radii_mm)) if blobs is None else blobs
    masks = [(ball_mask(geometry, c, r), int(labels[c])) for c, r in zip(blobs, blob_radii_mm)]
    for m in range(n_members):
        logits = base.copy()
        sign = 1.0 if m % 2 == 0 else -1.0
        for (mask, cls), s in zip(masks, blob_strength):
            # inside the blob the class logit sits at +s or -s against ~0 for the others:
            # each member is confident, but they disagree (high mutual information)
            logits[cls][mask] = sign * s
        yield _softmax(logits).astype(np.float32)


def write_sample_case(out_dir, geometry: Geometry | None = None, labels: np.ndarray | None = None,
                      class_names=None, case_id: str = "sample", n_members: int = 4,
                      input_image: str | None = None) -> Path:
    """Write ``<out_dir>/<case_id>/`` with the real pipeline and return that folder.

    The doubt-blob members (:func:`members_from_labels`) go through
    ``pipeline.case.process_case`` (uncalibrated, regions cut on the mutual-information map at
    its default threshold). ``geometry`` defaults to :func:`phantom_ct`'s, ``labels`` to
    :func:`phantom_labels`, ``class_names`` (background first) to background/Organ/Nodule or
    Class_<k>. ``input_image`` is recorded in summary.json so the CT can be loaded with the case.
    """
    from ..pipeline.case import CaseOptions, process_case

    if geometry is None:
        geometry = phantom_ct()[1]
    if labels is None:
        labels = phantom_labels(geometry)
    if tuple(labels.shape) != geometry.shape_zyx:
        raise InputError(f"labels shape {labels.shape} != geometry shape {geometry.shape_zyx}")
    k = int(labels.max()) + 1
    if class_names is None:
        class_names = ["background", "Organ", "Nodule"] if k == 3 else \
            ["background"] + [f"Class_{c}" for c in range(1, k)]
    class_names = list(class_names)
    if len(class_names) < k:
        raise InputError(f"{len(class_names)} class names for labels 0..{k - 1}")
    k = len(class_names)
    extra = {"input_image": str(input_image)} if input_image is not None else {}
    options = CaseOptions(regions_map=REGION_MAP, n_members=n_members, extra_summary=extra)
    process_case(case_id, members_from_labels(labels, k, geometry, n_members), geometry, out_dir,
                 class_names=class_names, options=options)
    return Path(out_dir) / case_id
