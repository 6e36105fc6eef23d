"""Streaming members into an EnsembleAccumulator, applying a calibration in either ensemble mode.

METHODS.md §2 "Ensemble": the default *pool then calibrate* averages the members,
p̄ = (1/M) Σ_m p_m, and calibrates the average: softmax(log p̄ / T). *Per member* scales each
member first, p_m,T = softmax(log p_m / T), and pools the scaled members. In per-member mode
the accumulator therefore holds the scaled members, so every map (including expected entropy,
MI and EPKL) describes the calibrated members; in pool-then-calibrate mode the accumulator
holds the members as they are and T enters the maps that use p̄ (see uncertainty.maps).

Only one member is in memory at a time besides the accumulator's O(K) running sums.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)


def resolve_mode(calibration, ensemble_mode: str | None) -> str:
    """The ensemble mode to use: the explicit one, else the calibration file's, else pool first."""
    if ensemble_mode is not None:
        if calibration is not None and calibration.ensemble_mode != ensemble_mode:
            raise InputError(f"ensemble mode {ensemble_mode!r} asked for, but the calibration file "
                             f"was fitted in {calibration.ensemble_mode!r} mode; drop the option or "
                             "refit the calibration in that mode")
        return ensemble_mode
    return calibration.ensemble_mode if calibration is not None else "pool_then_calibrate"


def accumulate(members: Iterable[np.ndarray], calibration=None, ensemble_mode: str = "pool_then_calibrate",
               member_names: list[str] | None = None,
               on_member: Callable[[int, str | None], None] | None = None):
    """Add every member to a new ``EnsembleAccumulator``; returns it.

    In ``per_member`` mode with a calibration, each member is scaled with the calibration's
    temperature before ``add``. ``on_member(i, name)`` is called after member i (0-based) was
    added (progress reporting). InputError when no member is given.
    """
    from ..uncertainty.streaming import EnsembleAccumulator

    acc = None
    scale = calibration is not None and ensemble_mode == "per_member"
    if scale and calibration.method != "temperature":
        raise InputError("per-member calibration is only defined for temperature scaling")
    for i, probs in enumerate(members):
        name = member_names[i] if member_names and i < len(member_names) else None
        probs = np.asarray(probs)
        if probs.ndim != 4:
            raise InputError(f"member {name or i + 1}: probabilities must be (K, z, y, x), got {probs.shape}")
        if acc is None:
            acc = EnsembleAccumulator(probs.shape[0], probs.shape[1:])
        if scale:
            probs = calibration.transform_probs(probs)
        acc.add(probs, name=name)
        del probs
        if on_member is not None:
            on_member(i, name)
    if acc is None:
        raise InputError("no ensemble member given")
    return acc


def maps_temperature(calibration, ensemble_mode: str) -> float | None:
    """T to pass to compute_maps: the fitted T when pooling first, None otherwise.

    Per-member mode: the members were already scaled before accumulation. Vector scaling:
    handled through ``calibrated_probs`` (compute_maps' temperature does not apply).
    """
    if calibration is None or ensemble_mode == "per_member" or calibration.method != "temperature":
        return None
    return float(calibration.temperature)


def calibrated_probs(acc, calibration, ensemble_mode: str) -> np.ndarray:
    """The calibrated ensemble probability (K, z, y, x) float32.

    No calibration: p̄. Temperature, pool then calibrate: softmax(log p̄ / T). Per member:
    the mean of the scaled members (already in the accumulator). Vector scaling:
    softmax(w ⊙ log p̄ + b).
    """
    from ..uncertainty.maps import calibrated_mean_probs

    if calibration is None or ensemble_mode == "per_member":
        return acc.mean_probs()
    if calibration.method == "temperature":
        return calibrated_mean_probs(acc, float(calibration.temperature))
    return np.asarray(calibration.transform_probs(acc.mean_probs()), dtype=np.float32)


def maps_need_probs(calibration, ensemble_mode: str) -> bool:
    """True when ``case_maps`` reads the calibrated probability it is given: vector scaling
    pooled first (its calibrated p̄ is not a temperature of p̄). Otherwise it may be None."""
    return calibration is not None and ensemble_mode != "per_member" and calibration.method != "temperature"


def case_maps(acc, probs: np.ndarray, geometry, calibration, ensemble_mode: str, names=None,
              dae_sigma_mm: float = 2.0, ebcu_radius_mm: float = 4.0, roi=None,
              info: dict | None = None, release_sums: bool = False) -> dict:
    """All requested maps of one case with the calibration applied (``uncertainty.maps.compute_maps``).

    ``probs`` is the calibrated ensemble probability (``calibrated_probs``; only read when
    ``maps_need_probs``, else it may be None); ``roi`` the case's
    ROI (used for the EBCU threshold when the calibration file holds none). With temperature
    scaling compute_maps applies T itself. With vector scaling (whose calibrated p̄ is not a
    temperature of p̄) the maps of the calibrated probability — confidence, entropy,
    entropy_norm, DAE, EBCU — are recomputed from ``probs`` with the same library functions,
    so every mode yields maps of the probability that is written out. ``release_sums``: let
    compute_maps free the accumulator's sums once read (``acc`` is unusable for maps afterwards).
    """
    from ..uncertainty import measures
    from ..uncertainty.distance_aware import distance_aware_entropy
    from ..uncertainty.ebcu import default_threshold, ebcu
    from ..uncertainty.maps import compute_maps, segmentation

    ebcu_t = calibration.ebcu_threshold if calibration is not None else None
    info = {} if info is None else info
    maps = compute_maps(acc, geometry, temperature=maps_temperature(calibration, ensemble_mode), names=names,
                        dae_sigma_mm=dae_sigma_mm, ebcu_radius_mm=ebcu_radius_mm, ebcu_threshold=ebcu_t,
                        roi=roi, info=info, release_sums=release_sums)
    if maps_need_probs(calibration, ensemble_mode):
        h = measures.entropy(probs)
        seg = segmentation(probs)
        if "confidence" in maps:
            maps["confidence"] = measures.confidence(probs)
        if "entropy" in maps:
            maps["entropy"] = h
        if "entropy_norm" in maps:
            maps["entropy_norm"] = measures.normalised_entropy(h, probs.shape[0])
        if "dae" in maps:
            maps["dae"] = distance_aware_entropy(h, seg, geometry.spacing_zyx, sigma_mm=dae_sigma_mm)
        if "ebcu" in maps:
            if ebcu_t is None:
                mask = roi if roi is not None and np.asarray(roi).any() else None
                ebcu_t = default_threshold(h, mask)
                info["ebcu_threshold_source"] = "0.95 quantile of the vector-scaled entropy in the ROI"
            maps["ebcu"] = ebcu(h, geometry.spacing_zyx, radius_mm=ebcu_radius_mm, threshold=ebcu_t)
            info["ebcu_threshold"] = float(ebcu_t)
    return maps
