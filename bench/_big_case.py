"""A clinical-size per-case output folder for the loading bench: 512 x 512 x ``slices`` voxels,
``n_organs`` organs (default 40), every file ``predict`` writes for a calibrated case with organ
margins (seg, one probability per organ, six maps, one margins file per organ, regions.json,
summary.json), in the folder layout of docs/ARCHITECTURE.md ("Per-case outputs").

The content is synthetic but shaped like a real case where it matters for loading: organs are
ellipsoids of 1-8 cm inside a body cylinder, each probability is 1 inside its organ and falls off
over a few millimetres around it (so the files compress like real ones), the maps are bands of
uncertainty along the organ boundaries with noise, and the margins are nested shells. Files are
written slab by slab with the project's own NIfTI writer (``io.nifti_stream``), so nothing
volume-sized but one map is held at a time. Built once into ``work`` and reused (``.complete``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MAPS = ("confidence", "entropy", "mutual_information", "epkl", "dae", "ebcu")
SPACING = (0.98, 0.98, 2.5)  # x, y, z mm


def _organs(n: int, shape_zyx, rng):
    """(centre zyx, semi-axes zyx in voxels) of n non-overlapping-ish ellipsoids in the body."""
    z, y, x = shape_zyx
    sz, sy, sx = SPACING[2], SPACING[1], SPACING[0]
    out = []
    for k in range(n):
        semi_mm = rng.uniform(8, 40, 3)
        semi = semi_mm / np.array([sz, sy, sx])
        ang = 2 * np.pi * k / n
        rad = 0.28 * min(y, x) * (0.4 + 0.6 * ((k * 7) % 5) / 4)
        c = np.array([z * (0.15 + 0.7 * ((k * 13) % n) / n), y / 2 + rad * np.sin(ang), x / 2 + rad * np.cos(ang)])
        out.append((c, np.maximum(semi, 2.0)))
    return out


def _box(c, semi, shape, pad):
    lo = [max(int(np.floor(ci - si - p)), 0) for ci, si, p in zip(c, semi, pad)]
    hi = [min(int(np.ceil(ci + si + p)) + 1, s) for ci, si, p, s in zip(c, semi, pad, shape)]
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _r(c, semi, box):
    """Ellipsoidal radius (1 on the surface) over a box."""
    zz, yy, xx = np.ogrid[box]
    return np.sqrt(((zz - c[0]) / semi[0]) ** 2 + ((yy - c[1]) / semi[1]) ** 2 + ((xx - c[2]) / semi[2]) ** 2)


def build_big_case(work, slices: int = 300, n_organs: int = 40, seed: int = 0) -> Path:
    """The case folder ``work/big_case_<slices>_<n>/case`` (built on first use)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from CalibUncertaintyLib.io.geometry import Geometry
    from CalibUncertaintyLib.io.nifti_stream import write_volume

    root = Path(work) / f"big_case_{slices}_{n_organs}"
    case = root / "case"
    if (root / ".complete").is_file():
        return case
    case.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (slices, 512, 512)
    geo = Geometry(shape, SPACING, (-250.0, -250.0, -400.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    organs = _organs(n_organs, shape, rng)
    names = ["background"] + [f"Organ_{k + 1:02d}" for k in range(n_organs)]
    pad = (3, 8, 8)
    seg = np.zeros(shape, np.uint8)
    for k, (c, semi) in enumerate(organs, 1):
        box = _box(c, semi, shape, (0, 0, 0))
        inside = _r(c, semi, box) <= 1
        seg[box][inside] = k
    write_volume(case / "seg.nii.gz", seg, geo)
    # probabilities: 1 inside the organ, a smooth fall-off over a few voxels outside
    for k, (c, semi) in enumerate(organs, 1):
        p = np.zeros(shape, np.float32)
        box = _box(c, semi, shape, pad)
        r = _r(c, semi, box)
        p[box] = np.clip(1.0 - (r - 0.9) / 0.25, 0, 1).astype(np.float32) * rng.uniform(0.9, 1.0)
        write_volume(case / f"prob_{names[k]}.nii.gz", p, geo)
        del p
    # maps: uncertainty bands on the organ boundaries (+ noise), confidence = 1 - band
    boundary = np.zeros(shape, np.float32)
    for c, semi in organs:
        box = _box(c, semi, shape, pad)
        band = np.exp(-((_r(c, semi, box) - 1.0) / 0.08) ** 2).astype(np.float32)
        np.maximum(boundary[box], band, out=boundary[box])
    noise = rng.random(shape, dtype=np.float32) * 0.02
    scale = {"confidence": 1.0, "entropy": 1.2, "mutual_information": 0.05, "epkl": 0.1, "dae": 0.9, "ebcu": 0.6}
    thresholds = {}
    for name in MAPS:
        m = boundary * scale[name] + noise * scale[name]
        if name == "confidence":
            m = (1.0 - m).astype(np.float32)
            thresholds[name] = {"tau_abs": 0.6, "flag": "below", "source": "calibration"}
        else:
            thresholds[name] = {"tau_abs": 0.3 * scale[name], "flag": "above", "source": "calibration"}
        write_volume(case / f"map_{name}.nii.gz", m.astype(np.float32), geo)
        del m
    del noise, boundary
    # margins: 3 inner, 2 prediction, 1 outer band
    classes = {}
    for k, (c, semi) in enumerate(organs, 1):
        lv = np.zeros(shape, np.uint8)
        box = _box(c, semi, shape, pad)
        r = _r(c, semi, box)
        lv[box] = np.select([r <= 0.8, r <= 1.0, r <= 1.2], [3, 2, 1], 0).astype(np.uint8)
        fname = f"margins_{names[k]}.nii.gz"
        write_volume(case / fname, lv, geo)
        classes[names[k]] = {"file": fname, "class_index": k, "outer_threshold": 0.1, "inner_threshold": 0.9,
                             "trivial": False, "volumes_mm3": {}}
        del lv
    voxel = float(np.prod(SPACING))
    regions = []
    for rank, (k, (c, semi)) in enumerate(list(enumerate(organs, 1))[:50], 1):
        ras = geo.index_to_ras((c[2], c[1], c[0])) if hasattr(geo, "index_to_ras") else (0.0, 0.0, 0.0)
        regions.append({"rank": rank, "class_index": k, "class_name": names[k], "centroid_ras": [float(v) for v in ras],
                        "volume_mm3": float(np.prod(semi) * voxel), "mean_u": 0.5, "max_u": 1.0, "n_voxels": 100})
    (case / "regions.json").write_text(json.dumps({
        "case": "big", "map": "dae", "threshold": thresholds["dae"]["tau_abs"], "threshold_source": "calibration",
        "flag": "above", "class_names": names, "regions": regions}))
    (case / "summary.json").write_text(json.dumps({
        "case": "big", "geometry": geo.to_dict(), "class_names": names, "thresholds": thresholds,
        "probability_classes": names[1:], "regions_map": "dae",
        "margins": {"alpha": 0.1, "levels": {"inner": 3, "prediction": 2, "outer": 1},
                    "guarantee": {"outer": "-", "inner": "-"}, "classes": classes}}))
    (root / ".complete").write_text("ok\n")
    return case
