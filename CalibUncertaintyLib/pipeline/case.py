"""One case from ensemble members to the reviewable output folder (docs/ARCHITECTURE.md "Per-case outputs").

``process_case`` streams the members into an ``EnsembleAccumulator`` (per-member mode: each
member is scaled before ``add``), computes the calibrated probability (METHODS.md §2), the
segmentation (its argmax, identical to the uncalibrated argmax for temperature scaling), every
uncertainty map of METHODS.md §1 (``uncertainty.maps.iter_maps``: each map is written as soon as it is
computed, then dropped), the ROI (voxels within R mm
of the predicted foreground, R from the calibration file, default 15 mm) and the error regions
of METHODS.md §5 (connected components of {score > τ} in the ROI for the chosen map, τ from the
calibration file's τ* for that map, else ``calibration.thresholds.DEFAULT_THRESHOLDS``).

Files (all in the input geometry, each written atomically):

    <out>/<case>/seg.nii.gz, prob_<Class>.nii.gz, map_<name>.nii.gz, regions.json, summary.json
    margins_<Class>.nii.gz (when the calibration file holds conformal margins, ``pipeline.margins``)

The folder is built as ``<out>/.<case>.partial/`` and renamed to ``<out>/<case>/`` only when
complete, so an interrupted run never leaves a half case; an existing complete folder of the
same case is replaced only at that final rename (and kept when anything before it fails).

It does not care where the members come from (member folders, nnU-Net inference, synthetic).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError
from ..io.atomic import write_json
from ..io.geometry import Geometry
from .. import memory
from ..io.images import write_image
from ..io.nifti_stream import NiftiStreamWriter
from ..progress import emit_progress
from .margins import MarginsWriter
from .organ_case import OrganCaseCollector, apply_blocks
from .ensemble import accumulate, calibrated_slabs, iter_case_maps, maps_need_probs, mean_argmax, resolve_mode

log = logging.getLogger(__name__)


@dataclass
class CaseOptions:
    """Options of ``process_case``. Distances in mm, volumes in mm³.

    ``ensemble_mode`` None = the calibration file's mode (else pool_then_calibrate).
    ``roi_radius_mm`` None = the calibration file's radius (else 15 mm).
    ``map_names`` None = every map of MAP_NAMES.
    ``probability_classes`` which foreground classes get a ``prob_<Class>.nii.gz`` (class names
    or label numbers as strings): None = all (the default), () = none; the segmentation and the
    maps do not depend on it.
    """

    ensemble_mode: str | None = None
    regions_map: str = "dae"
    dae_sigma_mm: float = 2.0
    ebcu_radius_mm: float = 4.0
    min_region_mm3: float = 10.0
    max_region_extent_mm: float | None = 50.0  # regions cut to fit one view (regions.split); None: whole
    roi_radius_mm: float | None = None
    map_names: tuple[str, ...] | None = None
    probability_classes: tuple[str, ...] | None = None  # None: every foreground class; (): none
    n_members: int | None = None  # for progress fractions when ``members`` has no len()
    member_names: list[str] | None = None
    extra_summary: dict = field(default_factory=dict)
    #: error the organ margins cover: "voxel" | "contour" (None: the calibration file's choice)
    conformal_error: str | None = None


def safe_name(name: str) -> str:
    """A class name usable in a file name: runs of other characters than [A-Za-z0-9_-] become '_'."""
    out = re.sub(r"[^A-Za-z0-9_\-]+", "_", str(name)).strip("_")
    return out or "class"


def _quantile_inplace(vals: np.ndarray, q: float) -> float:
    """``np.quantile(vals, q)`` (linear interpolation) by partitioning ``vals`` in place: no
    sorted float64 copy of a volume-sized array."""
    pos = q * (vals.size - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, vals.size - 1)
    vals.partition([lo, hi] if hi != lo else lo)
    a, b = float(vals[lo]), float(vals[hi])
    return a + (b - a) * (pos - lo)


def _stats(a: np.ndarray, roi: np.ndarray, roi_values: np.ndarray | None = None) -> dict:
    """min / max / mean of map ``a`` and the mean and 0.95 quantile inside ``roi``; ``roi_values``:
    ``a[roi]`` when the caller has it (it is partitioned in place)."""
    return {**_whole_stats(a), **_roi_stats(a, roi, roi_values)}


def _whole_stats(a: np.ndarray) -> dict:
    """min / max / mean of the whole map: reads it, allocates nothing of its size."""
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean(dtype=np.float64))}


def _roi_stats(a: np.ndarray, roi: np.ndarray, roi_values: np.ndarray | None = None) -> dict:
    vals = roi_values if roi_values is not None else (a[roi] if roi.any() else np.zeros(0, a.dtype))
    mean_roi = float(vals.mean(dtype=np.float64)) if vals.size else None
    return {"mean_roi": mean_roi, "p95_roi": _quantile_inplace(vals, 0.95) if vals.size else None}


def _whole_stats_and_write(path, values: np.ndarray, geometry) -> dict:
    """A map's whole-image statistics, then its file (one writer-thread job: the map is held until
    its file is written anyway, so reading it there costs no memory and overlaps the next map)."""
    stats = _whole_stats(values)
    write_image(path, values.astype(np.float32, copy=False), geometry)
    return stats


def map_threshold_info(name: str, entry: dict, tau_score: float) -> dict:
    """Threshold record for summary.json: the entry plus ``tau_abs`` in the map's own units.

    ``tau_score`` is τ on the score scale (higher = more uncertain). For maps whose score is
    1 − map (confidence), voxels are flagged where map < tau_abs (``"flag": "below"``);
    otherwise where map > tau_abs (``"flag": "above"``).
    """
    below = entry.get("score", "map") != "map"
    finite = bool(np.isfinite(tau_score))
    tau_abs = (1.0 - tau_score if below else tau_score) if finite else None
    return {"tau": entry.get("tau"), "kind": entry.get("kind"), "q": entry.get("q"),
            "score": entry.get("score", "map"), "source": entry.get("source"),
            "mean_ueo": entry.get("mean_ueo"), "tau_score": tau_score if finite else None,
            "tau_abs": tau_abs, "flag": "below" if below else "above"}


def _replace_dir(partial: Path, final: Path) -> None:
    """Rename ``partial`` to ``final``; an existing ``final`` is swapped out and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(partial, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def process_case(case_id: str, members: Iterable[np.ndarray], geometry: Geometry, out_dir,
                 calibration=None, class_names: list[str] | None = None,
                 options: CaseOptions | None = None, ct_path=None) -> dict:
    """Members of one case -> ``<out_dir>/<case_id>/`` (module docstring); returns the summary dict.

    ``members``: iterable of (K, z, y, x) probabilities on ``geometry``'s grid (consumed once,
    one at a time). ``calibration``: a ``CalibrationFile`` (its fingerprint must have been
    checked by the caller) or None for uncalibrated outputs. ``class_names``: K names,
    background first (default ``background, class_1, ...``). ``ct_path``: the case's CT (channel 0)
    on the same grid, for the body domain of the atypicality aggregates (``case_aggregates`` in
    summary.json; without it a body reference cannot be applied and they are left out).
    """
    from ..calibration.conformal import case_guarantees
    from ..calibration.roi import describe_roi, roi_mask
    from ..calibration.thresholds import threshold_entry, threshold_for_case, uncertainty_score
    from ..regions.components import find_regions, regions_to_dict
    from ..uncertainty.maps import MAP_NAMES

    opts = options or CaseOptions()
    if not case_id or case_id in (".", "..") or "/" in case_id or "\\" in case_id or case_id.startswith("."):
        raise InputError(f"case id {case_id!r} cannot name an output folder (empty, a path or hidden)")
    mode = resolve_mode(calibration, opts.ensemble_mode)
    names = tuple(opts.map_names) if opts.map_names else tuple(MAP_NAMES)
    unknown = [n for n in names if n not in MAP_NAMES]
    if unknown or opts.regions_map not in MAP_NAMES:
        raise InputError(f"unknown map name(s) {unknown or [opts.regions_map]}; choose from {', '.join(MAP_NAMES)}")
    if opts.regions_map not in names:
        names = names + (opts.regions_map,)
    radius = opts.roi_radius_mm if opts.roi_radius_mm is not None else (
        float(calibration.roi["radius_mm"]) if calibration is not None else 15.0)
    out_dir = Path(out_dir)
    final = out_dir / case_id
    partial = out_dir / f".{case_id}.partial"
    n_members_hint = opts.n_members or (len(members) if hasattr(members, "__len__") else None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_member(i, name):
        frac = 0.6 * (i + 1) / n_members_hint if n_members_hint else None
        emit_progress("accumulate", frac, case=case_id, member=i + 1, n_members=n_members_hint,
                      message=name)

    emit_progress("accumulate", 0.0, case=case_id, n_members=n_members_hint)
    acc = accumulate(members, calibration, mode, opts.member_names, on_member, n_members=n_members_hint)
    if acc.shape_zyx != geometry.shape_zyx:
        raise InputError(f"case {case_id}: members have shape {acc.shape_zyx}, the image "
                         f"{geometry.shape_zyx}")
    k = acc.n_classes
    class_names = list(class_names) if class_names else ["background"] + [f"class_{i}" for i in range(1, k)]
    if len(class_names) != k:
        raise InputError(f"case {case_id}: {len(class_names)} class names for {k} probability channels")
    if calibration is not None and calibration.class_names and len(calibration.class_names) != k:
        raise InputError(f"case {case_id}: the calibration file has {len(calibration.class_names)} "
                         f"classes, the members {k}")
    notes = []
    if calibration is not None:
        for key, value in (("dae_sigma_mm", opts.dae_sigma_mm), ("ebcu_radius_mm", opts.ebcu_radius_mm)):
            fitted = (calibration.extra or {}).get(key)
            if fitted is not None and abs(float(fitted) - float(value)) > 1e-9:
                notes.append(f"{key} = {value:g} differs from the {float(fitted):g} the calibration file's "
                             "thresholds were fitted with: its τ* for that map may not fit")
                log.warning(notes[-1])
    if acc.n_members == 1:
        notes.append("one member: mutual information and EPKL are zero; vote disagreement and "
                     "foreground variance carry no ensemble information")
    timings["accumulate_s"] = time.perf_counter() - t0

    prob_labels = probability_labels(opts.probability_classes, class_names, case_id)
    t = time.perf_counter()
    emit_progress("calibrate", 0.62, case=case_id)
    # The calibrated probability is never held as a (K, z, y, x) volume. Every calibration but
    # vector scaling keeps the argmax, so the segmentation is argmax p̄ (one slab pass over the
    # sums) and the per-class / local temperature reads its T(x) from it; then one pass over z
    # slabs computes each calibrated slab and streams the requested class channels into their
    # prob_<Class>.nii.gz files and the organ margins into margins_<Class>.nii.gz
    # (io.nifti_stream), compressed in parallel threads. Vector scaling takes the segmentation
    # from the calibrated slabs in that same pass.
    invariant = calibration is None or mode == "per_member" or calibration.method != "vector"
    seg = mean_argmax(acc) if invariant else None
    probs = calibrated_slabs(acc, calibration, mode, geometry.spacing_zyx, seg)
    if partial.exists():  # left by a run that was killed
        shutil.rmtree(partial)
    writers, margins_w, jobs = {}, None, []
    try:
        partial.mkdir(parents=True)
        if seg is None:
            seg = memory.empty(geometry.shape_zyx, np.uint8 if k <= 256 else np.uint16)
        files = ["seg.nii.gz"]
        used, stems = set(), {}
        for c in range(1, k):
            fname = f"prob_{safe_name(class_names[c])}.nii.gz"
            if fname in used:
                fname = f"prob_{safe_name(class_names[c])}_{c}.nii.gz"
            used.add(fname)
            stems[c] = fname[len("prob_"):]
            if c in prob_labels:
                writers[c] = NiftiStreamWriter(partial / fname, geometry, np.float32)
                files.append(fname)
        margins_w = MarginsWriter(partial, calibration, class_names, geometry, stems, error=opts.conformal_error)
        organs = OrganCaseCollector(calibration, class_names, geometry, seg if invariant else None, radius)
        write_s = 0.0
        if writers or margins_w.classes or not invariant or organs.needs_slabs:
            # slab i is compressed in the writer threads while slab i + 1 is computed (each file
            # still gets its slabs in order: a slab's writes are submitted after the last ones ended)
            for sl in acc.slabs():
                p = probs.slab(sl)
                if not invariant:
                    seg[sl] = np.argmax(p, axis=0)
                tw = time.perf_counter()
                _wait(jobs)
                jobs += [_pool().submit(writers[c].write, p[c]) for c in writers]
                if margins_w.classes:
                    jobs.append(_pool().submit(margins_w.write, p, seg[sl]))
                if organs.needs_slabs:  # per-organ levels and margin burdens (pipeline.organ_case)
                    jobs.append(_pool().submit(organs.add_slab, sl, p, seg[sl]))
                write_s += time.perf_counter() - tw
                del p
        tw = time.perf_counter()
        _wait(jobs)
        for c in list(writers):
            writers.pop(c).close()
        margins = margins_w.close()
        files += [m["file"] for m in (margins or {"classes": {}})["classes"].values()]
        write_s += time.perf_counter() - tw
    except BaseException:
        for j in jobs:  # no writer thread may still be writing a file aborted below
            j.exception()
        for w in writers.values():
            w.abort()
        if margins_w is not None:
            margins_w.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # the writer threads' and slab temporaries' freed heap goes back to the system before the
    # maps, whose pass is the case's peak while the sums are still held
    memory.release_heap()
    t_organs = time.perf_counter()
    organs.finish_slabs(seg)  # per-organ features (pipeline.organ_case), then the boxes are freed
    organ_s = time.perf_counter() - t_organs
    roi = roi_mask(seg, geometry.spacing_zyx, radius, rule="prediction", allow_empty=True)
    t_organs = time.perf_counter()
    organs.prepare_roi(seg, roi)  # each ROI voxel's nearest organ (for the flagged volume per organ)
    timings["organ_quality_s"] = organ_s + time.perf_counter() - t_organs
    if not roi.any():
        notes.append("the prediction has no foreground: the ROI is empty, so no region is flagged "
                     "and ROI statistics are undefined")
    timings["calibrate_s"] = time.perf_counter() - t - write_s - timings["organ_quality_s"]

    pending = []  # files compressed in a writer thread while the next map is computed
    try:
        t = time.perf_counter()
        pending.append(_pool().submit(write_image, partial / "seg.nii.gz", seg, geometry))
        if not maps_need_probs(calibration, mode):
            probs = None
        write_early_s = time.perf_counter() - t + write_s

        # Each map is written (and its threshold and statistics taken) as soon as it is computed,
        # then dropped; only the regions map is kept, for the connected components below.
        t = time.perf_counter()
        write_maps_s = 0.0
        n_maps = len(names)
        emit_progress("maps", 0.7, case=case_id, n_maps=n_maps)
        map_info: dict = {}
        calibrated_thresholds = calibration.thresholds if calibration is not None else None
        rmap = opts.regions_map
        thresholds, roi_stats, whole_stats, rmap_values = {}, {}, {}, None
        atyp = _AtypicalityCounter(calibration, ct_path, geometry.shape_zyx)
        roi_any = bool(roi.any())
        # A written map's volume is handed to the next map but one (``spare_volume``): the same
        # number of volumes is alive as when each map is freed and the next one allocated, minus
        # the page faults of a fresh mapping. Never the entropy (DAE and EBCU read it later) nor
        # the regions map (kept for the regions).
        spare: list = []
        written = None  # (name, volume) whose file a writer thread is compressing

        def spare_volume():
            return spare.pop() if spare else None

        for i, (name, values) in enumerate(iter_case_maps(
                acc, probs, geometry, calibration, mode, names=list(names), dae_sigma_mm=opts.dae_sigma_mm,
                ebcu_radius_mm=opts.ebcu_radius_mm, roi=roi, info=map_info, release_sums=True, seg=seg,
                spare_volume=spare_volume)):
            entry = threshold_entry(name, calibrated_thresholds)
            vals = values[roi] if roi_any else np.zeros(0, values.dtype)  # one copy of the ROI voxels, for both
            organs.add_map(name, vals)  # flagged volume per α and organ, before the statistics reorder vals
            thresholds[name] = map_threshold_info(name, entry, threshold_for_case(entry, values, roi, roi_values=vals))
            roi_stats[name] = _roi_stats(values, roi, vals)
            del vals
            atyp.add(name, values)
            tw = time.perf_counter()  # the previous map's file is done: at most one map waits for its writer
            _wait(pending)
            if written is not None and written[0] not in ("entropy", rmap):
                spare[:] = [written[1]]
            whole_stats[name] = _pool().submit(_whole_stats_and_write, partial / f"map_{name}.nii.gz", values,
                                               geometry)
            pending.append(whole_stats[name])
            write_maps_s += time.perf_counter() - tw
            if name == rmap:
                rmap_values = values
            written = (name, values)
            del values
            emit_progress("maps", 0.7 + 0.15 * (i + 1) / n_maps, case=case_id, n_maps=n_maps, message=name)
        probs = None
        spare.clear()
        written = None
        tw = time.perf_counter()
        _wait(pending)
        write_maps_s += time.perf_counter() - tw
        map_stats = {name: {**whole_stats[name].result(), **roi_stats[name]} for name in roi_stats}
        files += [f"map_{name}.nii.gz" for name in names]
        thresholds = {name: thresholds[name] for name in names}
        timings["maps_s"] = time.perf_counter() - t - write_maps_s

        t = time.perf_counter()
        emit_progress("regions", 0.86, case=case_id)
        r_info = thresholds[rmap]
        calibrated_here = calibration is not None and rmap in (calibration.thresholds or {})
        source = (f"calibration file {Path(calibration.source_path).name}" if calibrated_here and calibration.source_path
                  else "calibration file" if calibrated_here else "default (calibration.thresholds.DEFAULT_THRESHOLDS)")
        roi_doc = {"rule": "prediction", "radius_mm": radius, "n_voxels": int(roi.sum()),
                   "description": describe_roi("prediction", radius)}
        score = uncertainty_score(rmap, rmap_values)
        del rmap_values
        if r_info["tau_score"] is None:  # quantile threshold on an empty ROI: nothing to flag
            regions = []
        else:
            regions = find_regions(score, r_info["tau_score"], roi, seg, geometry,
                                   class_names=class_names, min_volume_mm3=opts.min_region_mm3,
                                   max_extent_mm=opts.max_region_extent_mm)
        regions_doc = regions_to_dict(regions, case=case_id, map_name=rmap, threshold=r_info["tau_abs"] or 0.0,
                                      threshold_source=source, roi=roi_doc, class_names=class_names,
                                      max_extent_mm=opts.max_region_extent_mm)
        regions_doc.update(threshold=r_info["tau_abs"], threshold_kind=r_info["kind"], flag=r_info["flag"],
                           score=r_info["score"], threshold_score=r_info["tau_score"],
                           min_region_mm3=opts.min_region_mm3)
        timings["regions_s"] = time.perf_counter() - t
        label_counts = _label_counts(seg, k)
        atyp.add_volumes(label_counts, geometry.voxel_volume_mm3)
        case_aggs = _case_aggregates(rmap, score, r_info["tau_score"], roi, seg, regions, geometry, atyp)
        del score

        t = time.perf_counter()
        emit_progress("write", 0.95, case=case_id)
        write_json(partial / "regions.json", regions_doc)
        files += ["regions.json", "summary.json"]
        timings["write_s"] = time.perf_counter() - t + write_early_s + write_maps_s
        timings["total_s"] = time.perf_counter() - t0
        voxel_mm3 = geometry.voxel_volume_mm3
        summary = {
            "case": case_id,
            "geometry": geometry.to_dict(),
            "n_members": acc.n_members,
            "member_names": opts.member_names,
            "class_names": class_names,
            "ensemble_mode": mode,
            "calibration": _calibration_record(calibration),
            "roi": regions_doc["roi"],
            "predicted_volume_mm3": {class_names[c]: float(label_counts[c] * voxel_mm3) for c in range(1, k)},
            "thresholds": thresholds,
            "regions_map": rmap,
            "n_regions": len(regions_doc["regions"]),
            "case_aggregates": case_aggs,
            "maps": {n: map_stats[n] for n in names},
            "ebcu_threshold": map_info.get("ebcu_threshold"),
            "conformal": case_guarantees(calibration, rmap),
            "margins": margins,
            "ebcu_threshold_source": map_info.get("ebcu_threshold_source"),
            "options": {kk: v for kk, v in asdict(opts).items() if kk not in ("member_names", "extra_summary")},
            "timings_s": {kk: round(v, 4) for kk, v in timings.items()},
            "files": files,
            "probability_classes": [class_names[c] for c in sorted(prob_labels)],
            "notes": notes,
            **opts.extra_summary,
        }
        apply_blocks(summary, organs.blocks(case_aggs, rmap))
        summary["notes"] += organs.notes
        write_json(partial / "summary.json", summary)
        _replace_dir(partial, final)
    except BaseException:
        for f in pending:  # no writer may still be writing into the folder removed below
            f.exception()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    emit_progress("done", 1.0, case=case_id)
    log.info("case %s written to %s (%.1f s)", case_id, final, timings["total_s"])
    return summary


class _AtypicalityCounter:
    """The atypicality aggregates (``metrics.atypicality``) of one case, from each map as it streams by."""

    def __init__(self, calibration, ct_path, shape_zyx):
        from ..metrics.atypicality import read_case_domain

        self.ref = getattr(calibration, "case_reference", None) if calibration is not None else None
        self.domain = None
        self.values: dict = {}
        self.note = None
        if self.ref:
            self.domain = read_case_domain(ct_path, shape_zyx, self.ref["domain"])
            if self.domain is None:
                self.note = ("no CT given (--images): the atypicality aggregates measured on the body are "
                             "left out")

    def add(self, name, values) -> None:
        from ..metrics.atypicality import case_atypicality

        if self.domain is not None:
            self.values.update(case_atypicality({name: values}, self.domain, self.ref))

    def add_volumes(self, label_counts, voxel_mm3: float) -> None:
        """``label_counts``: voxels per label 0..K-1 (``_label_counts``)."""
        from ..metrics.atypicality import case_atypicality

        if not self.ref:
            return
        vols = np.asarray(label_counts[1:]) * voxel_mm3
        self.values.update(case_atypicality({}, None, self.ref, volumes_mm3=vols))


def _label_counts(seg, n_classes: int) -> np.ndarray:
    """Voxels of each label 0..K-1 (int64), one z slab at a time: ``np.bincount`` of a whole uint8
    volume would first make an int64 copy of it (8 bytes per voxel)."""
    from ..uncertainty.streaming import z_slabs

    counts = np.zeros(n_classes, np.int64)
    for sl in z_slabs(seg.shape):
        counts += np.bincount(seg[sl].ravel(), minlength=n_classes)[:n_classes]
    return counts


def _case_aggregates(rmap, score, tau_score, roi, seg, regions, geometry, atyp) -> dict:
    """summary.json's ``case_aggregates``: the §6 aggregates of the regions map (the same definitions
    as ``evaluate``; None where undefined) and the atypicality aggregates with their p-values."""
    from ..metrics.case_quality import AGGREGATES, case_aggregates
    from ..metrics.triage import DEFAULT_PRIORITY
    from ..regions.components import component_volumes

    out = {"map": rmap, **{a: None for a in AGGREGATES}}
    if tau_score is not None and roi.any():
        out.update(case_aggregates(score, roi, seg > 0, tau_score, component_volumes(regions),
                                   geometry.voxel_volume_mm3))
    out.update(atyp.values)
    if atyp.note:
        out["note"] = atyp.note
    out["default_priority"] = DEFAULT_PRIORITY
    return out


def _wait(pending: list) -> None:
    """Wait for every submitted write and empty the list; the first error is raised once all ended."""
    error = None
    while pending:
        e = pending.pop(0).exception()
        error = error or e
    if error is not None:
        raise error


_POOL = None


def _pool():
    """Threads that compress output files (zlib / ISA-L release the GIL): one per CPU, at most 4."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                   thread_name_prefix="calibu-write")
    return _POOL


def probability_labels(wanted, class_names: list[str], case_id: str | None = None) -> set[int]:
    """Labels (1..K-1) whose probability file is written: all for None, else those named
    (``CaseOptions.probability_classes``); InputError naming the classes for an unknown one. The
    CLI calls it once before any work, ``process_case`` again per case."""
    k = len(class_names)
    if wanted is None:
        return set(range(1, k))
    out = set()
    for w in wanted:
        w = str(w)
        hits = [c for c in range(1, k) if w in (class_names[c], safe_name(class_names[c]), str(c))]
        if not hits:
            where = f"case {case_id}: " if case_id else "--probabilities: "
            raise InputError(f"{where}no foreground class {w!r} to write probabilities for; "
                             f"classes: {', '.join(class_names[1:])}")
        out.update(hits)
    return out


def _calibration_record(calibration) -> dict | None:
    if calibration is None:
        return None
    return {"path": calibration.source_path, "method": calibration.method,
            "ensemble_mode": calibration.ensemble_mode, "temperature": calibration.temperature,
            "vector": calibration.vector, "ebcu_threshold": calibration.ebcu_threshold,
            "roi": calibration.roi, "n_cases": calibration.n_cases,
            "thresholds": calibration.thresholds, "description": calibration.describe()}
