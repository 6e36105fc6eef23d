"""Fit a calibration file on calibration cases (what ``calib-uncertainty fit-temperature`` does).

METHODS.md §2 and §4, in three passes over the cases (members are re-read each pass, so memory
stays bounded by one case's accumulator plus the sampled voxels and ROI crops):

1. Calibration voxels. Per case the members are pooled, p̄ = (1/M) Σ_m p_m; the prediction is
   argmax p̄ and the ROI the voxels within R mm (default 15) of the predicted foreground (rule
   "prediction"), or of reference ∪ prediction ("gt_union_prediction"). ROI voxels are
   subsampled stratified by reference class with a fixed seed (at most ``max_voxels`` over all
   cases, split evenly). The rows are log p̄ (pool then calibrate) and, for temperature scaling,
   also each member's log p_m at the same voxels (per member), so both ensemble modes are
   fitted on identical voxels and both are reported; the requested mode is the one stored.
   (The members are read again for those rows, one z slab at a time.)
2. Fit: T by a bounded 1-D search on log T minimising the NLL (``TemperatureScaler``), or
   per-class scale and bias (``VectorScaler``, pooled ensemble only), or a per-class / local
   temperature table (``calibration.local_temperature``, pooled ensemble only; the global T is
   fitted on the same voxels and stored too). For the local one, pass 1 also keeps each sampled
   voxel's predicted class and distance in mm to the predicted contour; the file records the
   leave-one-case-out NLL of global, per-class and local temperature on the calibration cases
   (on at most ``CV_MAX_ROWS`` of the rows, a fixed-seed subsample).
3. Thresholds with the calibration applied: the EBCU threshold t is the 0.95 quantile of the
   calibrated predictive entropy inside the ROI, pooled over the voxels of all calibration
   cases; then every map is computed (EBCU with that t) and τ* per map maximises the mean UEO
   over cases (``calibration.thresholds.calibrate_thresholds``). The error mask is
   prediction ≠ reference inside the ROI. Maps, errors and ROIs are kept cropped to the ROI
   bounding box (padded by the EBCU radius, so EBCU inside the ROI is exact). The same pass
   gives the conformal records: voxel-error flags and margins, contour-level flags and margins
   (errors beyond ``tolerance_mm``), and the per-organ quality pairs (expected and true Dice /
   surface Dice, ``calibration.organ_quality``) stored as ``CalibrationFile.organ_quality``.

Passes 1 and 3 are per-case functions (``sample_case``, ``threshold_case``) mapped over the
cases by ``cohort.executor.run_cohort`` (local loop or Ray tasks); only their small results (the
sampled rows; the ROI-box crops and ROI entropies) come back, and the fit, the pooled EBCU quantile
and the τ* search run once on them in case order, so every executor gives the same file.

The calibration file records T (or w, b), the mode, the ROI rule and radius, the cases, the NLL
before/after, τ* per map, t, the class names and the fingerprint of the model: the one given
(``fingerprint_model_folder`` when the members were computed from a model folder: plans,
dataset.json and checkpoint hashes), else that of the member folders.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..io.nnunet_outputs import Pairing
from ..cohort.executor import run_cohort
from .dataset import prediction_fingerprint, read_label
from .ensemble import accumulate, calibrated_probs, case_maps, mean_argmax

log = logging.getLogger(__name__)

EBCU_QUANTILE = 0.95
BEYOND_SEED = 1_000_003  # seed offset of the beyond-ROI sample (local_open_bin "fitted")
OPEN_BIN_CHOICES = ("identity", "nearest", "fitted")
CONFORMAL_ERRORS = ("voxel", "contour")  # the errors the conformal flags and margins can cover
#: the calibrator fit-temperature stores unless told otherwise (bench/results/openkbp_local.md)
DEFAULT_METHOD = "local_temperature"
CV_MAX_ROWS = 300_000  # rows used for the leave-one-case-out NLL of the local calibrators


@dataclass
class FitOptions:
    """Options of ``fit_calibration`` (distances in mm)."""

    method: str = "local_temperature"  # DEFAULT_METHOD
    ensemble_mode: str = "pool_then_calibrate"
    roi_radius_mm: float = 15.0
    roi_rule: str = "prediction"
    max_voxels: int = 2_000_000
    seed: int = 0
    dae_sigma_mm: float = 2.0
    ebcu_radius_mm: float = 4.0
    #: local temperature: distance-bin edges in mm (first 0, last bin open) and pooling strength
    local_edges_mm: tuple = (0.0, 2.0, 4.0, 6.0, 9.0, 12.0, 15.0)
    pool_voxels: float = 2000.0
    #: local temperature, open last bin (beyond the ROI): "fitted" (default: fitted on voxels sampled
    #: uniformly beyond the ROI, per case up to the ROI sample's cap; T = 1 where none fall in a cell),
    #: "identity" (T = 1) or "nearest" (the outer ROI bin's T). See calibration.local_temperature;
    #: chosen by leave-one-case-out NLL on whole calibration images (bench/results/openkbp_local.md).
    local_open_bin: str = "fitted"
    conformal_alpha: float = 0.1  # α of the conformal flags and margins (METHODS.md §7)
    #: tolerance in mm of the contour-level errors and of the surface Dice (docs/METHODS.md "Per-organ quality")
    tolerance_mm: float = 3.0
    #: which error the maps' margins and guarantee lines use by default: "voxel" or "contour" (both are fitted)
    conformal_error: str = "voxel"
    #: level δ of the per-case exchangeability check (metrics.exchangeability)
    exchangeability_delta: float = 0.1


def _bbox(mask: np.ndarray, pad_vox, shape) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return tuple(slice(0, 0) for _ in shape)
    return tuple(slice(max(int(a.min()) - p, 0), min(int(a.max()) + 1 + p, s))
                 for a, p, s in zip(idx, pad_vox, shape))


@dataclass
class FitJob:
    """What every case of a fitting pass shares (sent once to each Ray worker).

    ``calibration`` is None in pass 1 (samples) and the fitted file in pass 3 (thresholds)."""

    n_classes: int
    opts: FitOptions
    per_case: int
    want_members: bool
    n_members: int
    calibration: object = None
    want_local: bool = False  # also return the predicted class and contour distance of each row


def label_foreground_voxels(pairing: Pairing) -> int:
    """Foreground voxels over all calibration labels, read (and checked) before any member is.

    InputError when every label is background only: T would then be fitted to make the ensemble
    confident that nothing is there, and τ* to flag every prediction (empty error masks)."""
    total = 0
    for cf in pairing.cases:
        total += int(np.count_nonzero(read_label(cf, pairing.n_classes)))
    if total == 0:
        raise InputError(f"every calibration label is background only ({', '.join(c.case for c in pairing.cases)}): "
                         "a temperature and thresholds fitted on them would mean nothing; use calibration cases "
                         "whose labels hold the structures")
    return total


def sample_case(job: FitJob, item) -> tuple:
    """Pass 1 for one case ``(ci, CaseFiles)``: its stratified ROI sample.

    Returns (log p̄ rows (n, K) float32, member rows (M, n, K) float32 or None, labels (n,) int64,
    (predicted class (n,), distance to the predicted contour in mm (n,)) or None); n = 0 for an
    empty ROI. The sample of case ``ci`` uses seed ``opts.seed + ci``, exactly as
    ``calibration.temperature.collect_calibration_samples`` numbers the cases, so the rows do not
    depend on which worker or in which order the cases ran.
    """
    from ..calibration.roi import roi_mask
    from ..calibration.sampling import stratified_sample_indices
    from ..calibration.temperature import collect_calibration_samples, safe_log

    ci, cf = item
    opts = job.opts
    k = job.n_classes
    labels = read_label(cf, k)
    acc = accumulate(cf.load_members(k), n_members=len(cf.member_dirs))  # read one z slab at a time (io.npz_stream)
    seg = mean_argmax(acc)  # argmax of p̄ = acc.mean_probs(), by slabs
    roi = roi_mask(seg, cf.geometry.spacing_zyx, opts.roi_radius_mm, reference=labels,
                   rule=opts.roi_rule, allow_empty=True)
    if not roi.any():
        log.warning("case %s: empty ROI (no predicted%s foreground), no calibration voxels",
                    cf.case, "" if opts.roi_rule == "prediction" else " or reference")
        xm = np.zeros((job.n_members, 0, k), np.float32) if job.want_members else None
        feats = (np.zeros(0, np.int64), np.zeros(0, np.float32), None) if job.want_local else None
        return np.zeros((0, k), np.float32), xm, np.zeros(0, np.int64), feats
    vox = np.flatnonzero(roi.ravel())
    keep = stratified_sample_indices(labels.reshape(-1)[vox], job.per_case, seed=opts.seed + ci)
    vox = vox[keep]  # the voxels collect_calibration_samples takes (same selector and seed)
    n = np.float32(acc.n_members)
    sums = acc.sum_probs.reshape(k, -1)
    # p̄ at those voxels only (as acc.mean_probs() computes it), through the same checks and logs
    x, y = collect_calibration_samples([(np.divide(sums[:, vox], n)[:, None, None, :],
                                         labels.reshape(-1)[vox][None, None, :], None)],
                                       kind="probs", ensemble_mode="pool_then_calibrate",
                                       max_voxels_per_case=vox.size, seed=opts.seed + ci)
    xm = feats = None
    if job.want_local:
        from ..calibration.local_temperature import contour_distance_mm

        dist = contour_distance_mm(seg, cf.geometry.spacing_zyx).reshape(-1)
        feats = (seg.reshape(-1)[vox].astype(np.int64), dist[vox], None)
        if opts.local_open_bin == "fitted":  # a uniform sample of the voxels beyond the ROI
            out = np.flatnonzero(~roi.ravel())
            if out.size > job.per_case:
                out = np.sort(np.random.default_rng(opts.seed + ci + BEYOND_SEED).choice(out, job.per_case,
                                                                                           replace=False))
            xb = safe_log(np.divide(sums[:, out], n).T).astype(np.float32)
            feats = (*feats[:2], (xb, labels.reshape(-1)[out].astype(np.int64),
                                  seg.reshape(-1)[out].astype(np.int64), dist[out]))
    del acc, sums
    if job.want_members:  # a second read of the members: their values at the sampled voxels
        xm = np.stack([safe_log(member_rows(p, vox).T).astype(np.float32) for p in cf.load_members(k)])
        if xm.shape[1] != x.shape[0]:
            raise RuntimeError("pooled and per-member calibration samples differ in size")  # same selector
    return x, xm, y, feats


def member_rows(member, vox: np.ndarray) -> np.ndarray:
    """(K, n) float32 values of a member at flat voxel indices ``vox`` (sorted), read one z slab
    at a time (``slab()``) when the member is computed on demand, else from the array."""
    if not hasattr(member, "slab"):
        a = np.asarray(member)
        return a.reshape(a.shape[0], -1)[:, vox]
    from ..uncertainty.streaming import z_slabs

    k, nz, ny, nx = member.shape
    plane = ny * nx
    out = np.empty((k, vox.size), np.float32)
    for sl in z_slabs((nz, ny, nx)):
        a, b = np.searchsorted(vox, [sl.start * plane, sl.stop * plane])
        if a == b:
            continue
        out[:, a:b] = member.slab(sl).reshape(k, -1)[:, vox[a:b] - sl.start * plane]
    return out


def _cases(pairing: Pairing) -> list:
    return [(cf.case, (ci, cf)) for ci, cf in enumerate(pairing.cases)]


def _run_pass(fn, job, pairing, executor, desc) -> list:
    result = run_cohort(fn, job, _cases(pairing), executor, desc=desc)
    if result.failed:
        raise result.error(resumable=False)
    return result.ordered()


def collect_samples(pairing: Pairing, opts: FitOptions, want_members: bool, executor=None,
                    want_local: bool = False):
    """Pass 1: stratified ROI samples of every case (``sample_case``, mapped over the cases by the
    executor, concatenated in case order). Returns (log p̄ rows (N, K), member rows (M, N, K) or None,
    labels (N,)); with ``want_local`` a fourth item {"pred", "dist_mm", "case"} (N,) each."""
    per_case = max(1, int(opts.max_voxels) // len(pairing.cases))
    job = FitJob(pairing.n_classes, opts, per_case, want_members, pairing.n_members, want_local=want_local)
    parts = _run_pass(sample_case, job, pairing, executor, "fit: collect voxels")
    if not any(p[2].size for p in parts):
        raise InputError("no calibration voxels: every case was empty or had an empty ROI")
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[2] for p in parts])
    xm = np.concatenate([p[1] for p in parts], axis=1) if want_members else None
    if not want_local:
        return x, xm, y
    local = {"pred": np.concatenate([p[3][0] for p in parts]), "dist_mm": np.concatenate([p[3][1] for p in parts]),
             "case": np.concatenate([np.full(p[2].size, i) for i, p in enumerate(parts)]), "beyond": None}
    beyond = [(i, p[3][2]) for i, p in enumerate(parts) if p[3][2] is not None]
    if beyond:  # rows beyond the ROI (local_open_bin "fitted"): x, labels, pred, dist_mm, case
        local["beyond"] = tuple(np.concatenate([b[j] for _, b in beyond]) for j in range(4)) + (
            np.concatenate([np.full(b[1].size, i) for i, b in beyond]),)
    return x, xm, y, local


def fit_scaler(x, xm, y, opts: FitOptions):
    """Pass 2: the requested scaler, plus the other temperature mode when available (for the report)."""
    from ..calibration.temperature import TemperatureScaler
    from ..calibration.vector_scaling import VectorScaler

    if opts.method in ("class_temperature", "local_temperature") and opts.ensemble_mode != "pool_then_calibrate":
        raise InputError(f"{opts.method} is fitted on the pooled ensemble only; use --ensemble-mode "
                         "pool_then_calibrate or --method temperature")
    if opts.method == "vector":
        if opts.ensemble_mode != "pool_then_calibrate":
            raise InputError("vector scaling is fitted on the pooled ensemble only; use "
                             "--ensemble-mode pool_then_calibrate or --method temperature")
        return VectorScaler().fit(x, y), None
    pooled = TemperatureScaler(ensemble_mode="pool_then_calibrate").fit(x, y)
    per_member = TemperatureScaler(ensemble_mode="per_member").fit(xm, y) if xm is not None else None
    if opts.ensemble_mode == "per_member":
        return per_member, pooled
    return pooled, per_member


def fit_local(x, y, local: dict, opts: FitOptions) -> dict:
    """The per-class / local temperature record of ``opts.method`` fitted on the pass-1 rows, with
    the leave-one-case-out NLL of global, per-class and local temperature (``cv_nll``)."""
    from ..calibration.local_temperature import cross_validated_nll, make_scaler

    kw = dict(pool_voxels=opts.pool_voxels, seed=opts.seed)
    if opts.method == "local_temperature":
        kw["edges_mm"] = tuple(opts.local_edges_mm)
        kw["open_bin"] = "nearest" if opts.local_open_bin == "nearest" else "identity"
    beyond = local.get("beyond") if opts.method == "local_temperature" else None
    fit_rows = (x, y, local["pred"], local["dist_mm"])
    if beyond is not None:
        fit_rows = tuple(np.concatenate([a, b]) for a, b in zip(fit_rows, beyond[:4]))
    scaler = make_scaler(opts.method, **kw).fit(*fit_rows)
    rec = scaler.to_record()
    rec["open_bin_source"] = ("fitted on voxels beyond the ROI" if beyond is not None else
                              None if opts.method != "local_temperature" else f"rule {kw['open_bin']}")
    if beyond is not None:
        rec["n_beyond_voxels"] = int(beyond[1].size)
    if np.unique(local["case"]).size >= 2:
        rows = np.arange(y.size)
        if rows.size > CV_MAX_ROWS:
            rows = np.sort(np.random.default_rng(opts.seed).choice(rows, CV_MAX_ROWS, replace=False))
        args = (x[rows], y[rows], local["pred"][rows], local["dist_mm"][rows], local["case"][rows])
        if beyond is not None and beyond[1].size > CV_MAX_ROWS:
            keep = np.sort(np.random.default_rng(opts.seed + 1).choice(beyond[1].size, CV_MAX_ROWS, replace=False))
            beyond = tuple(a[keep] for a in beyond)
        rec["cv_nll"] = {"rows": int(rows.size), "unit": "leave one calibration case out"}
        class_kw = dict(pool_voxels=opts.pool_voxels, seed=opts.seed)
        local_kw = dict(class_kw, edges_mm=tuple(opts.local_edges_mm),
                        open_bin="nearest" if opts.local_open_bin == "nearest" else "identity")
        for name, kkw in (("global", {}), ("class_temperature", class_kw), ("local_temperature", local_kw)):
            extra = beyond if name == "local_temperature" else None
            rec["cv_nll"][name] = cross_validated_nll("global" if name == "global" else name, *args, extra=extra,
                                                      **kkw)["nll"]
    else:
        rec["cv_nll"] = None
        log.warning("one calibration case: no cross-validated NLL for %s", opts.method)
    return rec


@dataclass
class CaseFitParts:
    """What pass 3 returns for one case. It unpacks (and indexes) as the 4-tuple earlier versions
    returned, ``crop, roi_entropy, margin_curves, reference = threshold_case(...)``; ``quality`` holds
    the organ-quality rows and the contour-level losses (``case_quality_parts``)."""

    crop: tuple
    roi_entropy: np.ndarray
    margin_curves: list
    reference: tuple
    quality: dict | None = None

    def _legacy(self) -> tuple:
        return (self.crop, self.roi_entropy, self.margin_curves, self.reference)

    def __iter__(self):
        return iter(self._legacy())

    def __getitem__(self, i):
        return self._legacy()[i]

    def __len__(self) -> int:
        return 4


def case_quality_parts(probs, labels, seg, roi, box, spacing_zyx, opts: FitOptions, slabs=None) -> dict:
    """Pass-3 extras of one case: its per-organ quality rows (``calibration.organ_quality``), its
    contour-error mask (``metrics.contour``, within the ROI) cropped to ``box``, and its per-class
    contour margin loss curves (``calibration.contour_conformal``).

    ``probs``: the calibrated probability as a (K, z, y, x) array or a ``CalibratedSlabs`` read
    once more over ``slabs`` (its z slabs): only each organ's level indices on its box and the
    class probability at its far contour errors are kept, never a class volume."""
    from ..calibration.contour_conformal import contour_margin_losses_at
    from ..calibration.organ_quality import fill_level_crops, organ_level_crops, organ_rows_from_levels
    from ..metrics.contour import class_contour_errors

    k = probs.shape[0]
    plane = int(np.prod(seg.shape[1:]))
    contour = np.zeros(seg.shape, bool)
    far = []  # per class: flat indices (sorted) of its far false negatives and far false positives
    for c in range(1, k):
        fn, fp = class_contour_errors(seg == c, labels == c, spacing_zyx, opts.tolerance_mm)
        far.append((np.flatnonzero(fn), np.flatnonzero(fp)))
        contour |= fn
        contour |= fp
        del fn, fp
    contour &= roi
    crops = organ_level_crops(seg, k, spacing_zyx, opts.roi_radius_mm)
    values = [([], []) for _ in range(1, k)]
    if slabs is None:
        slabs = [slice(0, seg.shape[0])]
    for sl in slabs:
        p = probs.slab(sl) if hasattr(probs, "slab") else np.asarray(probs[:, sl])
        fill_level_crops(crops, sl, p)
        lo, hi = sl.start * plane, sl.stop * plane
        for c in range(1, k):
            for idx, out in zip(far[c - 1], values[c - 1]):
                i, j = np.searchsorted(idx, (lo, hi))
                if j > i:
                    out.append(p[c].reshape(-1)[idx[i:j] - lo])
        del p
    curves = [contour_margin_losses_at(*(np.concatenate(v) if v else np.zeros(0, np.float32) for v in pair))
              for pair in values]
    return {"organ_rows": organ_rows_from_levels(crops, seg, labels, spacing_zyx, opts.tolerance_mm, k),
            "contour_errors": contour[box].copy(), "contour_curves": curves}


def threshold_case(job: FitJob, item) -> CaseFitParts:
    """Pass 3 for one case ``(ci, CaseFiles)`` with ``job.calibration`` applied: every map but
    EBCU, the error mask and the ROI, cropped to the ROI's bounding box padded by the EBCU
    radius, and the calibrated predictive entropy of the ROI voxels (for the pooled EBCU t).

    Memory (issue 19): the members are read one z slab at a time, the calibrated probability is
    never a (K, z, y, x) volume (``CalibratedSlabs``: one pass gives the segmentation, the argmax
    of the calibrated probability as before, and each class's margin-curve voxels), and the maps
    come one at a time (``iter_case_maps``), each kept only as its crop and samples. Also the
    organ-quality rows and contour-level losses (``case_quality_parts``: one more slab pass)."""
    from ..calibration.roi import roi_mask
    from ..metrics.error_detection import error_mask
    from ..uncertainty.ebcu import effective_radius_mm
    from ..uncertainty.maps import MAP_NAMES
    from .ensemble import calibrated_slabs, iter_case_maps

    ci, cf = item
    opts, calibration = job.opts, job.calibration
    mode = calibration.ensemble_mode
    names = [n for n in MAP_NAMES if n != "ebcu"]
    k = job.n_classes
    labels = read_label(cf, k)
    acc = accumulate(cf.load_members(k), calibration, mode, n_members=len(cf.member_dirs))
    probs = calibrated_slabs(acc, calibration, mode, cf.geometry.spacing_zyx)
    seg, margins = _segmentation_and_margin_curves(probs, labels, acc.slabs())
    roi = roi_mask(seg, cf.geometry.spacing_zyx, opts.roi_radius_mm, reference=labels,
                   rule=opts.roi_rule, allow_empty=True)
    r_ebcu = effective_radius_mm(opts.ebcu_radius_mm, cf.geometry.spacing_zyx)
    pad = [int(math.ceil(r_ebcu / h)) + 1 for h in cf.geometry.spacing_zyx]
    box = _bbox(roi, pad, roi.shape)
    quality = case_quality_parts(probs, labels, seg, roi, box, cf.geometry.spacing_zyx, opts, acc.slabs())
    errors = error_mask(seg, labels, roi)
    sampler = _ReferenceSampler(cf, opts.seed + ci, seg, k)
    crops, pe_roi = {}, None
    for name, values in iter_case_maps(acc, probs, cf.geometry, calibration, mode, names=names,
                                       dae_sigma_mm=opts.dae_sigma_mm, roi=roi, release_sums=True, seg=seg):
        crops[name] = values[box].copy()
        if name == "entropy":
            pe_roi = values[roi]
        sampler.add(name, values)
        del values
    del acc, probs
    crop = ({n: crops[n] for n in names}, errors[box].copy(), roi[box].copy(), cf.geometry.spacing_zyx)
    return CaseFitParts(crop, pe_roi, margins, sampler.result(), quality)


def _segmentation_and_margin_curves(probs, labels, slabs) -> tuple:
    """One pass over the calibrated probability's z slabs: the segmentation (argmax, ties to the
    lower class, per slab as ``uncertainty.maps.segmentation`` takes it) and the per-class margin
    loss curves (``case_margin_curves``). Each class's curve needs only its reference voxels, its
    predicted voxels and the voxels above the inner-margin floor, in image order
    (``calibration.conformal.margin_losses``), so only those are kept: the same curves as from the
    whole volumes."""
    from ..calibration.conformal import INNER_MIN, margin_losses
    from .. import memory

    k = probs.shape[0]
    seg = memory.empty(probs.shape[1:], np.uint8 if k <= 256 else np.uint16)
    parts = {c: ([], [], []) for c in range(1, k)}
    floor = np.float32(INNER_MIN * 0.999)
    for sl in slabs:
        p = probs.slab(sl)
        seg[sl] = np.argmax(p, axis=0)
        lab, pred = labels[sl], seg[sl]
        for c in range(1, k):
            t, pr = lab == c, pred == c
            keep = t | pr
            keep |= p[c] > floor
            if keep.any():
                parts[c][0].append(p[c][keep])
                parts[c][1].append(t[keep])
                parts[c][2].append(pr[keep])
        del p
    curves = []
    for c in range(1, k):
        vals, t, pr = (np.concatenate(a) if a else np.zeros(0, dt)
                       for a, dt in zip(parts.pop(c), (np.float32, bool, bool)))
        curves.append(margin_losses(vals, t, pr))
    return seg, curves


class _ReferenceSampler:
    """``reference_sample`` of one case from its maps as they stream by (each map seen once)."""

    def __init__(self, cf, seed: int, seg, n_classes: int):
        from ..metrics.atypicality import read_case_domain

        self.kind = "body" if cf.image_paths else "whole_image"
        self.dom = read_case_domain(cf.image_paths[0] if cf.image_paths else None, seg.shape, self.kind)
        self.seed, self.samples = seed, {}
        self.vols = (_label_counts(seg, n_classes)[1:] * cf.geometry.voxel_volume_mm3).tolist()

    def add(self, name: str, values) -> None:
        from ..metrics.atypicality import OOD_AGGREGATES, domain_sample

        if name in OOD_AGGREGATES.values():
            self.samples[name] = domain_sample(values, self.dom, seed=self.seed)

    def result(self) -> tuple[str, dict, list]:
        from ..metrics.atypicality import OOD_AGGREGATES

        return self.kind, {m: self.samples[m] for m in OOD_AGGREGATES.values() if m in self.samples}, self.vols


def _label_counts(seg, n_classes: int) -> np.ndarray:
    from .case import _label_counts as counts

    return counts(seg, n_classes)


def reference_sample(cf, maps: dict, seed: int, seg, n_classes: int) -> tuple[str, dict, list]:
    """The case's part of the atypicality reference (``metrics.atypicality``): its domain kind
    (the body from its CT when there is one, else the whole image), a fixed-seed sample of the
    entropy and mutual information in that domain, and its predicted volume (mm³) per foreground class."""
    sampler = _ReferenceSampler(cf, seed, seg, n_classes)
    for name, values in maps.items():
        sampler.add(name, values)
    return sampler.result()


def case_margin_curves(probs, labels, seg) -> list:
    """The per-class conformal margin loss curves of one case (``calibration.conformal.margin_losses``)."""
    from ..calibration.conformal import margin_losses

    return [margin_losses(probs[c], labels == c, seg == c) for c in range(1, probs.shape[0])]


def fit_thresholds(pairing: Pairing, calibration, opts: FitOptions, executor=None) -> tuple[dict, float, dict]:
    """Pass 3: EBCU threshold and τ* per map with ``calibration`` applied (``threshold_case`` per
    case, mapped by the executor; the pooled quantile and the τ* search once, here). Returns (τ*, t, info)."""
    from ..calibration.thresholds import calibrate_thresholds
    from ..uncertainty.ebcu import ebcu, effective_radius_mm

    n_cases = len(pairing.cases)
    job = FitJob(pairing.n_classes, opts, 0, False, pairing.n_members, calibration)
    parts = _run_pass(threshold_case, job, pairing, executor, "fit: thresholds")
    crops = [p[0] for p in parts]
    pe_roi = [p[1] for p in parts]
    pooled = np.concatenate(pe_roi) if pe_roi else np.zeros(0, np.float32)
    if pooled.size == 0:
        raise InputError("every calibration case has an empty ROI (no predicted foreground): "
                         "cannot fit thresholds; check the members")
    t_ebcu = float(np.quantile(pooled, EBCU_QUANTILE))
    for c_maps, _, _, spacing in crops:
        c_maps["ebcu"] = ebcu(c_maps["entropy"], spacing, radius_mm=effective_radius_mm(opts.ebcu_radius_mm, spacing),
                              threshold=t_ebcu)
    thresholds = calibrate_thresholds([c[0] for c in crops], [c[1] for c in crops], [c[2] for c in crops],
                                      seed=opts.seed)
    conformal = conformal_record(crops, [p[2] for p in parts], calibration.class_names, opts.conformal_alpha)
    organ_quality = None
    if all(getattr(p, "quality", None) is not None for p in parts):
        conformal["contour"], organ_quality = quality_records(crops, [p.quality for p in parts],
                                                              calibration.class_names, opts)
    conformal["error"] = opts.conformal_error
    conformal["exchangeability_delta"] = float(opts.exchangeability_delta)
    from ..metrics.atypicality import fit_reference

    domains = {p[3][0] for p in parts}
    reference = fit_reference([p[3][1] for p in parts], domains.pop(), pairing.n_members,
                              volumes_per_case=[p[3][2] for p in parts]) \
        if len(domains) == 1 else None  # some cases with a CT, some without: no common domain
    info = {"ebcu_threshold_rule": f"{EBCU_QUANTILE:g} quantile of the calibrated predictive entropy in "
                                   f"the ROI, pooled over {pooled.size} voxels of {n_cases} cases",
            "n_roi_voxels": int(pooled.size),
            "n_error_voxels": int(sum(int(c[1].sum()) for c in crops)),
            "conformal": conformal, "case_reference": reference, "organ_quality": organ_quality}
    return thresholds, t_ebcu, info


def _foreground_names(class_names, n_fg: int) -> list:
    names = list(class_names) if class_names else [f"class_{i}" for i in range(1, n_fg + 1)]
    return names[1:] if len(names) == n_fg + 1 else names


def quality_records(crops, quality_parts: list, class_names, opts: FitOptions) -> tuple[dict, dict]:
    """The contour-level conformal record (``conformal["contour"]``) and the ``organ_quality``
    record, from the pass-3 crops (every map's scores at each case's ROI contour errors) and the
    cases' ``case_quality_parts``."""
    from ..calibration.conformal import ALPHA_GRID
    from ..calibration.contour_conformal import build_contour_record
    from ..calibration.organ_quality import build_record
    from ..calibration.thresholds import uncertainty_score

    names = _foreground_names(class_names, len(quality_parts[0]["contour_curves"]))
    flag_scores = {name: [uncertainty_score(name, c_maps[name])[q["contour_errors"] & roi]
                          for (c_maps, _, roi, _), q in zip(crops, quality_parts)] for name in crops[0][0]}
    curves = {names[i]: [q["contour_curves"][i] for q in quality_parts] for i in range(len(names))}
    contour = build_contour_record(opts.conformal_alpha, opts.tolerance_mm, flag_scores, curves)
    organ = build_record([q["organ_rows"] for q in quality_parts], names, opts.conformal_alpha, ALPHA_GRID,
                         opts.tolerance_mm, opts.roi_radius_mm)
    return contour, organ


def conformal_record(crops, margin_curves, class_names, alpha) -> dict:
    """Conformal risk control thresholds (METHODS.md §7) from the pass-3 crops (every map's
    scores at each case's ROI error voxels) and the per-case margin curves."""
    from ..calibration.conformal import build_record
    from ..calibration.thresholds import uncertainty_score

    flag_scores = {name: [uncertainty_score(name, c_maps[name])[errs & roi] for c_maps, errs, roi, _ in crops]
                   for name in crops[0][0]}
    names = list(class_names) if class_names else [f"class_{i}" for i in range(1, len(margin_curves[0]) + 1)]
    if len(names) == len(margin_curves[0]) + 1:
        names = names[1:]
    curves = {names[i]: [case[i] for case in margin_curves] for i in range(len(names))}
    rec = build_record(alpha, flag_scores, curves)
    if len(crops) < rec["min_cases"]:
        log.warning("conformal alpha %g needs at least %d calibration cases, got %d: flags cover the whole "
                    "ROI, outer margins the whole image, inner margins are empty (the trivial guarantee)",
                    alpha, rec["min_cases"], len(crops))
    return rec


def fit_calibration(pairing: Pairing, opts: FitOptions | None = None, fingerprint: dict | None = None,
                    executor=None):
    """Fit and return a ``CalibrationFile`` (not saved) from the paired calibration cases.

    ``executor``: ``cohort.executor.ExecutorOptions`` for the per-case passes (default local);
    the result is the same under every executor (per-case seeds, case-ordered reductions).
    A case that fails stops the fit with an error naming it, after the other cases ran.

    ``fingerprint``: the model's fingerprint to record (default: ``prediction_fingerprint`` of
    the member folders, which knows plans and dataset.json but not the checkpoints).

    Raises InputError when a case has no label, when no ROI voxel exists, or for options
    that do not combine (vector scaling with per-member mode).
    """
    from ..calibration.calibration_file import CalibrationFile
    from ..calibration.roi import describe_roi

    opts = opts or FitOptions()
    if any(cf.label_path is None for cf in pairing.cases):
        raise InputError("fitting needs reference labels for every calibration case (--labels)")
    t0 = time.perf_counter()
    n_foreground = label_foreground_voxels(pairing)
    want_members = opts.method == "temperature"
    want_local = opts.method in ("class_temperature", "local_temperature")
    from ..calibration.conformal import check_alpha
    from ..metrics.contour import check_tolerance

    if opts.conformal_error not in CONFORMAL_ERRORS:
        raise InputError(f"conformal error must be one of {', '.join(CONFORMAL_ERRORS)}, got {opts.conformal_error!r}")
    opts.tolerance_mm = check_tolerance(opts.tolerance_mm)
    opts.exchangeability_delta = check_alpha(opts.exchangeability_delta)
    if opts.local_open_bin not in OPEN_BIN_CHOICES:
        raise InputError(f"local_open_bin must be one of {', '.join(OPEN_BIN_CHOICES)}, got {opts.local_open_bin!r}")
    if want_local and opts.ensemble_mode != "pool_then_calibrate":
        raise InputError(f"{opts.method} is fitted on the pooled ensemble only; use --ensemble-mode "
                         "pool_then_calibrate or --method temperature")
    samples = collect_samples(pairing, opts, want_members, executor, want_local=want_local)
    x, xm, y = samples[:3]
    t1 = time.perf_counter()
    scaler, other = fit_scaler(x, xm, y, opts)
    local_rec = fit_local(x, y, samples[3], opts) if want_local else None
    t2 = time.perf_counter()
    extra = {"roi_description": describe_roi(opts.roi_rule, opts.roi_radius_mm),
             "max_voxels": int(opts.max_voxels), "seed": int(opts.seed),
             "dae_sigma_mm": opts.dae_sigma_mm, "ebcu_radius_mm": opts.ebcu_radius_mm,
             "ebcu_quantile": EBCU_QUANTILE, "notes": list(pairing.notes)}
    if other is not None:
        extra["other_ensemble_mode"] = {"ensemble_mode": other.ensemble_mode,
                                        "temperature": float(other.temperature_),
                                        "nll_before": float(other.nll_before_),
                                        "nll_after": float(other.nll_after_)}
    cal = CalibrationFile.from_scaler(scaler, roi_rule=opts.roi_rule, radius_mm=opts.roi_radius_mm,
                                      case_ids=[c.case for c in pairing.cases],
                                      class_names=pairing.class_names,
                                      fingerprint=fingerprint or prediction_fingerprint(pairing), extra=extra,
                                      label_foreground_voxels=n_foreground)
    if local_rec is not None:
        cal.method, cal.local = opts.method, local_rec
        cal.validate()
    thresholds, t_ebcu, info = fit_thresholds(pairing, cal, opts, executor)
    cal.thresholds = thresholds
    cal.ebcu_threshold = t_ebcu
    cal.conformal = info.pop("conformal")
    cal.case_reference = info.pop("case_reference")
    cal.organ_quality = info.pop("organ_quality")
    cal.extra.update(info)
    cal.extra["timings_s"] = {"collect_s": round(t1 - t0, 3), "fit_s": round(t2 - t1, 3),
                              "thresholds_s": round(time.perf_counter() - t2, 3)}
    return cal.validate()
