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

Everything that reads the members' sums runs slab by slab along z, so the only full-size
arrays are the requested maps, the label volume and, for DAE/EBCU, one entropy volume
(and, unless ``release_sums`` frees them first, the accumulator's sums).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import GeometryMismatchError, InputError
from . import measures
from .distance_aware import DEFAULT_SIGMA_MM, distance_aware_entropy
from .ebcu import DEFAULT_QUANTILE, DEFAULT_RADIUS_MM, default_threshold, ebcu
from .streaming import EPS, EnsembleAccumulator

log = logging.getLogger(__name__)

MAP_NAMES = ("confidence", "entropy", "entropy_norm", "expected_entropy", "mutual_information",
             "epkl", "fg_variance", "vote_disagreement", "dae", "ebcu")

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
    out = np.empty((acc.n_classes,) + acc.shape_zyx, dtype=np.float32)
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
    return np.argmax(p, axis=0).astype(dtype)


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
                 release_sums: bool = False) -> dict:
    """Compute the requested maps (default: all of ``MAP_NAMES``) -> {name: float32 (z, y, x)}.

    ``acc``: an ``EnsembleAccumulator`` with >= 1 member; ``geometry``: the image's
    ``io.geometry.Geometry`` (its shape must match; its spacing gives every mm distance).
    ``temperature``: T of pool-then-calibrate (None = uncalibrated). ``dae_sigma_mm``: σ of DAE;
    ``ebcu_radius_mm``: r of EBCU; ``ebcu_threshold``: t of EBCU (None: 0.95 quantile of PE in
    ``roi``, see module doc). ``info``: optional dict filled with the EBCU threshold used
    (``ebcu_threshold``, ``ebcu_threshold_source``), ``temperature`` and ``n_members``.
    ``release_sums``: free the accumulator's sums (``acc.release()``) as soon as the slab pass
    has read them, before DAE and EBCU, to lower peak memory (the caller must not need them).
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
    n = acc.n_members
    k = acc.n_classes
    single = (("mutual_information" in wanted or "epkl" in wanted) and acc.note_single_member())

    out = {name: np.empty(shape, dtype=np.float32) for name in wanted if name not in ("dae", "ebcu")}
    need_h = bool({"entropy", "entropy_norm", "dae", "ebcu"} & set(wanted))
    need_seg = "dae" in wanted or ("ebcu" in wanted and ebcu_threshold is None)
    h_all = out.get("entropy")
    if need_h and h_all is None:
        h_all = np.empty(shape, dtype=np.float32)
    seg = np.empty(shape, dtype=np.uint8 if k <= 256 else np.uint16) if need_seg else None
    log_k = np.float32(math.log(k))
    inv = np.float32(1.0 / n)

    for sl in acc.slabs() if (out or need_h or need_seg) else ():
        pbar = acc.sum_probs[:, sl] * inv
        pcal = pbar if t_cal is None else _temperature_slab(pbar, t_cal)
        if "confidence" in out:
            out["confidence"][sl] = pcal.max(axis=0)
        h = measures.entropy(pcal) if need_h else None
        if need_h:
            h_all[sl] = h
        if "entropy_norm" in out:
            out["entropy_norm"][sl] = h / log_k
        if seg is not None:
            seg[sl] = np.argmax(pcal, axis=0)
        if _MEMBER_MAPS & set(out):
            pe_raw = h if (t_cal is None and h is not None) else measures.entropy(pbar)
            ee, mi, ep = measures.disagreement_slab(acc, sl, pbar, pe_raw, want_epkl="epkl" in out)
            if "expected_entropy" in out:
                out["expected_entropy"][sl] = ee
            if "mutual_information" in out:
                out["mutual_information"][sl] = 0.0 if single else mi
            if "epkl" in out:
                out["epkl"][sl] = 0.0 if single else ep
        if "fg_variance" in out:
            out["fg_variance"][sl] = measures.fg_variance_slab(acc, sl)
        if "vote_disagreement" in out:
            out["vote_disagreement"][sl] = measures.vote_disagreement_slab(acc, sl)

    if release_sums:
        acc.release()
    spacing = geometry.spacing_zyx
    if "dae" in wanted:
        out["dae"] = distance_aware_entropy(h_all, seg, spacing, sigma_mm=dae_sigma_mm,
                                            slab_voxels=acc.slab_voxels)
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
        out["ebcu"] = ebcu(h_all, spacing, radius_mm=ebcu_radius_mm, threshold=threshold)
    if info is not None:
        info.update({"n_members": n, "temperature": None if temperature is None else float(temperature),
                     "ebcu_threshold": threshold, "ebcu_threshold_source": source,
                     "ebcu_radius_mm": float(ebcu_radius_mm) if "ebcu" in out else None,
                     "dae_sigma_mm": float(dae_sigma_mm) if "dae" in out else None})
    return {name: out[name] for name in wanted}
