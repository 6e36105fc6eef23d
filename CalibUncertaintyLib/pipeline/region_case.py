"""One case of a region-based (sigmoid) model -> its output folder (``predict`` of such a model).

The members' region probabilities stream into ``uncertainty.bernoulli_regions.RegionAccumulator``;
the folder has the layout of ``pipeline.case`` (docs/ARCHITECTURE.md "Per-case outputs") with the
region model's content:

- ``seg.nii.gz``: nnU-Net's label map of the pooled region probabilities (``regions_class_order``);
- ``prob_<Region>.nii.gz``: pooled probability p̄_r of each region (uncalibrated: no calibration
  method for sigmoid outputs exists yet, and a softmax calibration file is refused by the caller);
- ``map_<name>.nii.gz`` for ``REGION_MAP_NAMES`` (entropy, MI, EPKL... as sums over regions of
  the binary measures, METHODS.md §7);
- ``regions.json`` (no error regions are ranked for region models yet: an empty list, said so in
  its ``note``) and ``summary.json`` with ``"output": "regions"`` and the definitions used.

Written into ``<out>/.<case>.partial/`` and renamed into place when complete, as ``process_case``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError
from ..io.atomic import write_json
from ..io.geometry import Geometry
from ..io.images import write_image
from ..progress import emit_progress
from ..uncertainty.bernoulli_regions import RegionAccumulator, region_maps, segmentation
from .case import CaseOptions, _replace_dir, _stats, safe_name

DEFINITIONS = ("independent per-region Bernoullis: entropy, expected entropy, MI and EPKL are sums over "
               "regions of the binary measures (METHODS.md §7)")


def process_region_case(case_id: str, members: Iterable, geometry: Geometry, out_dir, region_names: list[str],
                        regions_class_order, options: CaseOptions | None = None) -> dict:
    """Members (each (R, z, y, x) sigmoid probabilities) of one case -> ``<out_dir>/<case_id>/``."""
    opts = options or CaseOptions()
    if not case_id or case_id in (".", "..") or "/" in case_id or "\\" in case_id or case_id.startswith("."):
        raise InputError(f"case id {case_id!r} cannot name an output folder (empty, a path or hidden)")
    t0 = time.perf_counter()
    acc = RegionAccumulator(len(region_names), geometry.shape_zyx)
    for i, m in enumerate(members):
        acc.add(m)
        emit_progress("accumulate", 0.6 * (i + 1) / opts.n_members if opts.n_members else None, case=case_id,
                      member=i + 1, n_members=opts.n_members)
        del m
    if acc.n_members == 0:
        raise InputError(f"case {case_id}: no ensemble member given")
    timings = {"accumulate_s": time.perf_counter() - t0}
    out_dir = Path(out_dir)
    final, partial = out_dir / case_id, out_dir / f".{case_id}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
        t = time.perf_counter()
        pbar = acc.mean_probs()
        seg = segmentation(pbar, regions_class_order)
        roi = seg > 0
        write_image(partial / "seg.nii.gz", seg.astype(np.uint8 if seg.max(initial=0) < 255 else np.uint16),
                    geometry)
        files = ["seg.nii.gz"]
        for r, name in enumerate(region_names):
            fname = f"prob_{safe_name(name)}.nii.gz"
            write_image(partial / fname, pbar[r], geometry)
            files.append(fname)
        del pbar
        maps = region_maps(acc)
        stats = {}
        for name, values in maps.items():
            write_image(partial / f"map_{name}.nii.gz", values, geometry)
            stats[name] = _stats(values, roi)
            files.append(f"map_{name}.nii.gz")
        del maps
        timings["maps_and_write_s"] = time.perf_counter() - t
        write_json(partial / "regions.json", {
            "case": case_id, "map": None, "threshold": None, "threshold_source": None, "roi": None,
            "class_names": ["background", *region_names], "regions": [],
            "note": "error regions are not ranked for region-based models"})
        files += ["regions.json", "summary.json"]
        timings["total_s"] = time.perf_counter() - t0
        voxel_mm3 = geometry.voxel_volume_mm3
        summary = {
            "case": case_id, "geometry": geometry.to_dict(), "output": "regions",
            "n_members": acc.n_members, "member_names": opts.member_names,
            "class_names": ["background", *region_names], "region_names": list(region_names),
            "regions_class_order": [int(c) for c in regions_class_order], "definitions": DEFINITIONS,
            "calibration": None, "regions_map": None, "n_regions": 0,
            "predicted_volume_mm3": _region_volumes(seg, region_names, regions_class_order, voxel_mm3),
            "maps": stats, "timings_s": {k: round(v, 4) for k, v in timings.items()}, "files": files,
            "notes": ([] if acc.n_members > 1 else ["one member: mutual information and EPKL are zero"]),
            **opts.extra_summary,
        }
        write_json(partial / "summary.json", summary)
        _replace_dir(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    emit_progress("done", 1.0, case=case_id)
    return summary


def _region_volumes(seg, region_names, regions_class_order, voxel_mm3) -> dict:
    """Volume (mm³) of each region in the label map: the voxels whose label belongs to the region
    (nnU-Net's nested regions: label c is in region i when i's label comes at or before c's)."""
    order = [int(c) for c in regions_class_order]
    out = {}
    for i, name in enumerate(region_names):
        labels = order[i:]  # later (inner) regions overwrite earlier ones in the label map
        out[name] = float(np.isin(seg, labels).sum() * voxel_mm3)
    return out
