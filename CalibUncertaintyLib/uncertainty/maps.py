"""All uncertainty maps of a case at once, from a streaming accumulator (METHODS.md §1, §2).

Pool-then-calibrate (METHODS.md §2): the calibrated probability is
    p_T = softmax(log max(p̄, EPS) / T)
(``calibrated_mean_probs``); T = None or 1 leaves p̄ unchanged, T > 1 flattens, T < 1
sharpens. confidence, entropy, entropy_norm, DAE and EBCU are computed from p_T;
expected_entropy, mutual_information and epkl describe the members as they were accumulated
(per-member calibration scales each member before ``add``). The segmentation is argmax p_T,
which equals argmax p̄.

Maps (float32, (z, y, x)); definitions in ``measures``, ``distance_aware`` and ``ebcu``:
see ``MAP_DESCRIPTIONS``. EBCU uses U = entropy (the calibrated PE); when no threshold is
given (none stored in a calibration file) t is the 0.95 quantile of PE inside the ROI: the
``roi`` argument (a boolean mask, or a callable ``roi(seg, spacing_zyx) -> mask``), by default
the 15 mm prediction-derived ROI of ``calibration.roi.roi_mask``; with an empty ROI (empty
prediction) the quantile is taken over the whole image and a warning says so.

Everything that reads the members' sums runs slab by slab along z. ``compute_maps`` returns
every requested map at once; ``iter_maps`` yields them one at a time, each computed
when asked for, so a caller that writes each map and drops it holds one map besides the label
volume, one entropy volume and, unless ``release_sums`` frees them first, the accumulator's sums.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .. import memory
from ..errors import GeometryMismatchError, InputError
from . import measures
from .distance_aware import DEFAULT_SIGMA_MM, distance_aware_entropy
from .ebcu import DEFAULT_QUANTILE, DEFAULT_RADIUS_MM, default_threshold, ebcu, effective_radius_mm
from .streaming import EPS, EnsembleAccumulator, z_slabs

log = logging.getLogger(__name__)

MAP_NAMES = ("confidence", "entropy", "entropy_norm", "expected_entropy", "mutual_information",
             "epkl", "fg_variance", "vote_disagreement", "dae", "ebcu")
#: maps that measure disagreement between members: identically zero with one member, so their
#: error-detection numbers (UEO 0, AUROC 0.5) would describe nothing ("not applicable")
ENSEMBLE_ONLY_MAPS = ("mutual_information", "epkl", "fg_variance", "vote_disagreement")

MAP_DESCRIPTIONS = {
    "confidence": "Confidence: probability of the predicted class, max_c p_c (low = uncertain).",
    "entropy": "Predictive entropy H(p) of the calibrated ensemble mean, in nats (total uncertainty).",
    "entropy_norm": "Predictive entropy divided by log K: 0 = certain, 1 = all classes equally likely.",
    "expected_entropy": "Expected entropy: mean of the members' own entropies (aleatoric part).",
    "mutual_information": "Mutual information = entropy of the mean − expected entropy: "
                          "disagreement between members (epistemic part; 0 for one model).",
    "epkl": "Expected pairwise KL divergence between members (epistemic; ≥ mutual information; "
            "0 for one model).",
    "fg_variance": "Variance over members of the foreground probability 1 − p(background).",
    "vote_disagreement": "Vote disagreement 1 − |2q − 1|, q = fraction of members voting foreground "
                         "(1 = split vote).",
    "dae": "Distance-aware entropy: entropy × (1 − exp(−d²/2σ²)), d = mm to the predicted contour "
           "(σ = 2 mm): drops the contour shell, keeps doubt away from it.",
    "ebcu": "EBCU: mean excess of entropy over a high threshold within a ball (4 mm): favours "
            "blobs of doubt over thin contour shells.",
}

YIELD_ORDER = ("fg_variance", "vote_disagreement", "expected_entropy", "mutual_information", "epkl",
               "confidence", "entropy", "entropy_norm", "dae", "ebcu")
"""The order in which ``iter_maps`` yields the maps (``compute_maps`` returns ``MAP_NAMES`` order)
with a calibration (or on a device)."""
YIELD_ORDER_UNCALIBRATED = ("fg_variance", "vote_disagreement", "confidence", "entropy", "expected_entropy",
                            "mutual_information", "epkl", "entropy_norm", "dae", "ebcu")
"""The order without a calibration (numpy path, M > 1): the entropy map H(p̄) comes before the maps of
the members, which read it as their H(p̄) instead of computing it again."""

_MEMBER_MAPS = {"expected_entropy", "mutual_information", "epkl"}


def _check_temperature(temperature) -> float | None:
    if temperature is None:
        return None
    try:
        t = float(temperature)
    except (TypeError, ValueError) as e:
        raise InputError(f"temperature must be a positive number, got {temperature!r}") from e
    if not (math.isfinite(t) and t > 0):
        raise InputError(f"temperature must be a positive finite number (T > 0), got {temperature!r}")
    return None if t == 1.0 else t


def _temperature_slab(pbar: np.ndarray, t: float) -> np.ndarray:
    """softmax(log max(p̄, EPS) / T) over axis 0, float32."""
    z = np.log(np.maximum(pbar, np.float32(EPS)))
    z *= np.float32(1.0 / t)
    z -= z.max(axis=0, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=0, keepdims=True)
    return z


def calibrated_mean_probs(acc: EnsembleAccumulator, temperature: float | None) -> np.ndarray:
    """Pool-then-calibrate probability softmax(log p̄ / T), (K, z, y, x) float32.

    T = None or 1 returns p̄ itself (``acc.mean_probs()``)."""
    t = _check_temperature(temperature)
    acc.require_members("calibrated_mean_probs()")
    if t is None:
        return acc.mean_probs()
    out = memory.empty((acc.n_classes,) + acc.shape_zyx, np.float32)
    inv = np.float32(1.0 / acc.n_members)
    for sl in acc.slabs():
        out[:, sl] = _temperature_slab(acc.sum_probs[:, sl] * inv, t)
    return out


def segmentation(probs) -> np.ndarray:
    """Predicted labels argmax_c p_c over the first axis (ties: lowest class), uint8 (uint16 for K > 256)."""
    p = np.asarray(probs)
    if p.ndim < 2 or p.shape[0] < 2:
        raise InputError(f"expected class probabilities (K, z, y, x) with K >= 2, got shape {p.shape}")
    dtype = np.uint8 if p.shape[0] <= 256 else np.uint16
    if p.ndim != 4:
        return np.argmax(p, axis=0).astype(dtype)
    out = memory.empty(p.shape[1:], dtype)
    for sl in z_slabs(p.shape[1:]):  # argmax's int64 result one slab at a time
        out[sl] = np.argmax(p[:, sl], axis=0)
    return out


def _check_names(names):
    if names is None:
        return list(MAP_NAMES)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in MAP_NAMES]
    if unknown:
        raise InputError(f"unknown map name(s) {unknown}; choose from {', '.join(MAP_NAMES)}")
    return [n for n in MAP_NAMES if n in names]


def _resolve_roi(roi, seg, spacing_zyx, shape):
    if roi is None:
        from ..calibration.roi import roi_mask

        return roi_mask(seg, spacing_zyx, 15.0, allow_empty=True), "15 mm prediction-derived ROI"
    if callable(roi):
        mask = np.asarray(roi(seg, spacing_zyx))
        source = f"ROI from {getattr(roi, '__name__', 'callable')}"
    else:
        mask = np.asarray(roi)
        source = "given ROI"
    if mask.shape != tuple(shape):
        raise InputError(f"ROI mask shape {mask.shape} differs from the image shape {tuple(shape)}")
    return mask.astype(bool, copy=False), source


def compute_maps(acc: EnsembleAccumulator, geometry, temperature: float | None = None, names=None,
                 dae_sigma_mm: float = DEFAULT_SIGMA_MM, ebcu_radius_mm: float = DEFAULT_RADIUS_MM,
                 ebcu_threshold: float | None = None, roi=None, info: dict | None = None,
                 release_sums: bool = False, probs=None, seg=None) -> dict:
    """Compute the requested maps (default: all of ``MAP_NAMES``) -> {name: float32 (z, y, x)}.

    Every map at once in memory; ``iter_maps`` (same arguments) yields them one at a time.
    """
    wanted = _check_names(names)
    maps = dict(iter_maps(acc, geometry, temperature, wanted, dae_sigma_mm, ebcu_radius_mm, ebcu_threshold,
                          roi, info, release_sums, probs, seg))
    return {name: maps[name] for name in wanted}


def iter_maps(acc: EnsembleAccumulator, geometry, temperature: float | None = None, names=None,
              dae_sigma_mm: float = DEFAULT_SIGMA_MM, ebcu_radius_mm: float = DEFAULT_RADIUS_MM,
              ebcu_threshold: float | None = None, roi=None, info: dict | None = None,
              release_sums: bool = False, probs=None, seg=None, spare_volume=None):
    """Yield ``(name, map)`` for the requested maps (default: all of ``MAP_NAMES``), in
    ``YIELD_ORDER`` (the maps of the members first, so that ``release_sums`` frees the sums only
    they read before the entropy volume and the confidence exist), float32 (z, y, x), each computed when it is asked for: a caller that
    writes each map and drops it holds one map at a time, besides the entropy volume (kept for
    DAE and EBCU) and the labels.

    ``acc``: an ``EnsembleAccumulator`` with >= 1 member; ``geometry``: the image's
    ``io.geometry.Geometry`` (its shape must match; its spacing gives every mm distance).
    ``temperature``: T of pool-then-calibrate (None = uncalibrated). ``probs``: a calibrated
    ensemble probability (K, z, y, x), an array or an object with ``shape`` and
    ``slab(z_slice)`` (read per z slab), to describe instead of softmax(log p̄ / T) (vector
    scaling): confidence, entropy, entropy_norm, DAE and EBCU are then maps of ``probs``, the
    member maps still of the accumulated members. ``seg``: the labels argmax of that probability
    when the caller has them (else computed). ``dae_sigma_mm``: σ of DAE; ``ebcu_radius_mm``: r of
    EBCU; ``ebcu_threshold``: t of EBCU (None: 0.95 quantile of PE in ``roi``, see module doc).
    ``info``: optional dict filled, once the generator is exhausted, with the EBCU threshold used
    (``ebcu_threshold``, ``ebcu_threshold_source``), ``temperature`` and ``n_members``.
    ``release_sums``: free the accumulator's sums (``acc.release()``) as soon as the last map that
    reads them is done, before DAE and EBCU (the caller must not need them afterwards).
    ``spare_volume``: optional callable returning a float32 (z, y, x) volume that nobody reads any
    more (e.g. a map already written), or None; each yielded map but the entropy is computed into
    it instead of a fresh volume (a fresh mapping costs page faults on its first write: about
    45 ms per 64 MiB), overwriting every voxel.
    Arguments are checked before the first map is computed.
    """
    if not isinstance(acc, EnsembleAccumulator):
        raise InputError(f"compute_maps needs an EnsembleAccumulator, got {type(acc).__name__}")
    acc.require_members("compute_maps()")
    if tuple(geometry.shape_zyx) != acc.shape_zyx:
        raise GeometryMismatchError(f"the ensemble volume has shape (z, y, x) {acc.shape_zyx} but the "
                                    f"image geometry has {tuple(geometry.shape_zyx)}")
    t_cal = _check_temperature(temperature)
    wanted = _check_names(names)
    if ebcu_threshold is not None and not math.isfinite(float(ebcu_threshold)):
        raise InputError(f"ebcu_threshold must be a finite number or None, got {ebcu_threshold!r}")
    shape = acc.shape_zyx
    k = acc.n_classes
    if probs is not None:
        if not hasattr(probs, "slab"):  # else computed per z slab (pipeline.ensemble.CalibratedSlabs)
            probs = np.asarray(probs)
        if tuple(probs.shape) != (k,) + shape:
            raise InputError(f"calibrated probabilities have shape {probs.shape}, expected {(k,) + shape}")
    if seg is not None:
        seg = np.asarray(seg)
        if seg.shape != shape:
            raise InputError(f"labels have shape {seg.shape}, expected {shape}")
    return _iter_maps(acc, geometry, temperature, t_cal, wanted, dae_sigma_mm, ebcu_radius_mm, ebcu_threshold,
                      roi, info, release_sums, probs, seg, spare_volume)


def _iter_maps(acc, geometry, temperature, t_cal, wanted, dae_sigma_mm, ebcu_radius_mm, ebcu_threshold,
               roi, info, release_sums, probs, seg, spare_volume=None):
    shape = acc.shape_zyx

    def new_map():
        """A float32 volume for the next map: a spare one when the caller has it (every voxel is
        written), else a fresh one."""
        buf = spare_volume() if spare_volume is not None else None
        if buf is not None and buf.shape == tuple(shape) and buf.dtype == np.float32 and buf.flags.c_contiguous:
            return buf
        return memory.empty(shape, np.float32)

    n = acc.n_members
    k = acc.n_classes
    if release_sums:  # the accumulator is complete: its K log-gap volumes become EPKL's one
        acc.reduce_log_gap()
    inv = np.float32(1.0 / n)
    log_k = np.float32(math.log(k))
    single = (("mutual_information" in wanted or "epkl" in wanted) and acc.note_single_member())

    be = acc.backend  # numpy, or torch on a device (uncertainty.backend): the same steps, other kernels
    if be.is_torch:
        from . import torch_kernels as tk

    def pbar_slab(sl):
        return acc.sum_probs[:, sl] * inv

    def pcal_slab(sl):
        """The calibrated probability of slab ``sl``: host numpy, or a device tensor on a device."""
        if be.is_torch:
            if probs is not None:
                return probs.device_slab(sl) if hasattr(probs, "device_slab") else be.put(
                    np.asarray(probs.slab(sl) if hasattr(probs, "slab") else probs[:, sl], dtype=np.float32))
            pbar = tk.pbar_slab(acc, sl)
            return pbar if t_cal is None else tk.temperature(be, pbar, t_cal)
        if probs is not None:
            return np.asarray(probs.slab(sl) if hasattr(probs, "slab") else probs[:, sl], dtype=np.float32)
        pbar = pbar_slab(sl)
        return pbar if t_cal is None else _temperature_slab(pbar, t_cal)

    # 0. maps of the members' foreground variance and votes first: with ``release_sums`` their
    #    two sums (1.5 volumes) are freed before the entropy volume and the other maps exist
    fns = ((tk.fg_variance_slab, tk.vote_disagreement_slab) if be.is_torch
           else (measures.fg_variance_slab, measures.vote_disagreement_slab))
    for name, fn, part in (("fg_variance", fns[0], "fg_sq_dev"), ("vote_disagreement", fns[1], "fg_votes")):
        if name in wanted:
            out = new_map()
            for sl in acc.slabs():
                out[sl] = fn(acc, sl)
            if release_sums:
                acc.release_part(part)
            yield name, out
            del out
        elif release_sums:
            acc.release_part(part)

    member_wanted = [n for n in ("expected_entropy", "mutual_information", "epkl") if n in wanted]
    need_h = bool({"entropy", "entropy_norm", "dae", "ebcu"} & set(wanted))
    need_seg = seg is None and ("dae" in wanted or ("ebcu" in wanted and ebcu_threshold is None))
    # Uncalibrated (numpy): the entropy map is H(p̄), the very H(p̄) that MI and EPKL need, so the
    # calibrated pass comes first and the maps of the members read it instead of recomputing it
    # (the same numbers; at most as many volumes at once as the other order: the entropy and the
    # confidence exist while Σ H(p_m) and EPKL's gap do, where before MI and EPKL did).
    entropy_first = (not be.is_torch and t_cal is None and probs is None and need_h
                     and bool({"mutual_information", "epkl"} & set(wanted)) and not single)
    h_all = None

    def members_maps():
        """1. maps of the members' disagreement, each in its own slab pass (one map held at a
        time). EPKL = MI + G is read from the MI map when it was just computed (no H(p̄) again);
        H(p̄) comes from the entropy volume when it exists, else is computed per slab (the same
        function on the same p̄ as the entropy map)."""
        mi_vol = None
        for name in ("expected_entropy", "mutual_information", "epkl"):
            if name not in wanted:
                continue
            out = new_map()
            if single and name != "expected_entropy":
                out.fill(0.0)
            else:
                for sl in acc.slabs():
                    if name == "expected_entropy":  # Σ_m H(p_m) / M alone: no p̄, no H(p̄)
                        out[sl] = (tk if be.is_torch else measures).expected_entropy_slab(acc, sl)
                        continue
                    if be.is_torch:
                        mi, ep = tk.disagreement_slab(acc, sl, want_epkl=name == "epkl")
                        out[sl] = mi if name == "mutual_information" else ep
                        continue
                    if name == "epkl" and mi_vol is not None:  # EPKL = MI + G (streaming)
                        np.add(acc.epkl_gap_slab(sl), mi_vol[sl], out=out[sl])
                        continue
                    if h_all is not None:
                        pe = h_all[sl]
                    else:
                        pbar = pbar_slab(sl)
                        pe = measures.entropy(pbar)
                    ee, mi, ep = measures.disagreement_slab(acc, sl, None if h_all is not None else pbar, pe,
                                                            want_epkl=name == "epkl")
                    out[sl] = {"mutual_information": mi, "epkl": ep}[name]
            if name == "mutual_information":
                mi_vol = out  # read by EPKL next (the caller holds it while its file is written)
            if release_sums and name == member_wanted[-1]:
                acc.release_part("log_gap")  # no later map reads these two:
                acc.release_part("sum_entropy")  # freed before this map is handed over
            yield name, out
            del out
        if release_sums:
            acc.release_part("log_gap")
            acc.release_part("sum_entropy")

    if not entropy_first:
        # before the entropy volume exists: with ``release_sums`` the sums only they read
        # (Σ H(p_m), the log gaps) are freed before it and the confidence are allocated
        yield from members_maps()

    # 2. maps of the calibrated probability: one slab pass for the entropy (kept for DAE and
    #    EBCU), the labels and the confidence; the normalised entropy is a rescaled entropy.
    confidence = new_map() if "confidence" in wanted else None
    h_all = memory.empty(shape, np.float32) if need_h else None
    if need_seg:
        seg = memory.empty(shape, np.uint8 if k <= 256 else np.uint16)
    if confidence is not None or need_h or need_seg:
        for sl in acc.slabs():
            pcal = pcal_slab(sl)
            if be.is_torch:
                tk.calibrated_pass(be, pcal, confidence[sl] if confidence is not None else None,
                                   h_all[sl] if need_h else None, seg[sl] if need_seg else None)
                del pcal
                continue
            if confidence is not None:
                confidence[sl] = pcal.max(axis=0)
            if need_h:
                measures.entropy(pcal, out=h_all[sl])
            if need_seg:
                measures.argmax_classes(pcal, out=seg[sl])
            del pcal
    if release_sums and not entropy_first:
        acc.release()  # no later map reads the sums (the maps of the members came first)
    if confidence is not None:
        yield "confidence", confidence
        del confidence
    if "entropy" in wanted:
        yield "entropy", h_all
    if entropy_first:
        yield from members_maps()
        if release_sums:
            acc.release()
    if "entropy_norm" in wanted:
        out = new_map()
        for sl in acc.slabs():
            if be.is_torch:
                tk.scale_slab(be, h_all[sl], float(log_k), out=out[sl])
            else:
                np.divide(h_all[sl], log_k, out=out[sl])
        yield "entropy_norm", out
        del out

    # 3. the spatial maps of the calibrated entropy
    spacing = geometry.spacing_zyx
    if "dae" in wanted:
        yield "dae", distance_aware_entropy(h_all, seg, spacing, sigma_mm=dae_sigma_mm, out=new_map(), backend=be)
    threshold, source = None, None
    if "ebcu" in wanted:
        if ebcu_threshold is not None:
            threshold, source = float(ebcu_threshold), "given"
        else:
            mask, roi_source = _resolve_roi(roi, seg, spacing, shape)
            if mask.any():
                threshold = default_threshold(h_all, mask, DEFAULT_QUANTILE)
                source = f"{DEFAULT_QUANTILE:g} quantile of entropy in the {roi_source}"
            else:
                log.warning("the ROI is empty (no predicted foreground): the EBCU threshold is the "
                            "%g quantile of entropy over the whole image", DEFAULT_QUANTILE)
                threshold = default_threshold(h_all, None, DEFAULT_QUANTILE)
                source = f"{DEFAULT_QUANTILE:g} quantile of entropy over the whole image (empty ROI)"
            del mask
        if info is not None:
            info.update({"ebcu_threshold": threshold, "ebcu_threshold_source": source})
        yield "ebcu", ebcu(h_all, spacing, radius_mm=effective_radius_mm(ebcu_radius_mm, spacing),
                           threshold=threshold, out=new_map(), backend=be)
    if info is not None:
        info.update({"n_members": n, "temperature": None if temperature is None else float(temperature),
                     "ebcu_threshold": threshold, "ebcu_threshold_source": source,
                     "ebcu_radius_mm": float(ebcu_radius_mm) if "ebcu" in wanted else None,
                     "ebcu_radius_mm_used": effective_radius_mm(ebcu_radius_mm, spacing) if "ebcu" in wanted else None,
                     "dae_sigma_mm": float(dae_sigma_mm) if "dae" in wanted else None})
