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

from .. import memory
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
               on_member: Callable[[int, str | None], None] | None = None, backend=None,
               n_members: int | None = None):
    """Add every member to a new ``EnsembleAccumulator``; returns it, complete
    (``reduce_log_gap()``: no member can be added afterwards). ``backend``: where the arithmetic
    runs (``uncertainty.backend``); default the first member's (a member computed on a device
    carries its torch backend), else numpy. ``n_members``: how many members come, when known: the
    last one is added with ``last=True`` (EPKL's gap computed as it is added, the K gap volumes
    never written by it; the same numbers).

    In ``per_member`` mode with a calibration, each member is scaled with the calibration's
    temperature before ``add``. ``on_member(i, name)`` is called after member i (0-based) was
    added (progress reporting). InputError when no member is given.
    """
    from ..uncertainty.streaming import EnsembleAccumulator

    acc = None
    scale = calibration is not None and ensemble_mode == "per_member"
    if scale and calibration.method != "temperature":
        raise InputError("per-member calibration is only defined for temperature scaling")
    i = -1
    for probs in members:  # not enumerate(): its reused result tuple would keep the previous
        i += 1             # member alive while the next one is being made
        name = member_names[i] if member_names and i < len(member_names) else None
        if not hasattr(probs, "slab"):  # else computed slab by slab as the accumulator reads it
            probs = np.asarray(probs)
        if probs.ndim != 4:
            raise InputError(f"member {name or i + 1}: probabilities must be (K, z, y, x), got {probs.shape}")
        if acc is None:
            from ..uncertainty.backend import backend_of

            acc = EnsembleAccumulator(probs.shape[0], probs.shape[1:], backend=backend or backend_of(probs))
        if scale:
            probs = (_ScaledSlabs(probs, calibration, acc.backend) if hasattr(probs, "slab")
                     else calibration.transform_probs(probs))
        memory.release_heap()
        if acc.reduced:
            raise InputError(f"member {name or i + 1}: more members than the {n_members} announced")
        acc.add(probs, name=name, last=n_members is not None and i == n_members - 1)
        del probs
        memory.release_heap()  # the member's slab temporaries, before the next member is made
        if on_member is not None:
            on_member(i, name)
    if acc is None:
        raise InputError("no ensemble member given")
    acc.reduce_log_gap()  # the K log-gap volumes become EPKL's one: every member is in
    return acc


class _ScaledSlabs:
    """A member computed slab by slab, with a calibration's temperature applied to each slab
    (softmax(log p / T) acts on each voxel alone)."""

    ndim = 4

    def __init__(self, source, calibration, backend=None):
        from ..uncertainty.backend import NUMPY

        self.source, self.calibration = source, calibration
        self.shape, self.dtype = source.shape, np.dtype(np.float32)
        self.valid_probabilities = getattr(source, "valid_probabilities", False)
        self.backend = backend or NUMPY

    def slab(self, sl: slice) -> np.ndarray:
        if self.backend.is_torch:  # softmax(log p / T) on the device (calibration.temperature.apply_temperature)
            from ..uncertainty.torch_kernels import temperature

            return temperature(self.backend, self.backend.put(self.source.slab(sl)), float(self.calibration.temperature),
                               divide=True)
        return np.asarray(self.calibration.transform_probs(self.source.slab(sl)), dtype=np.float32)


def maps_temperature(calibration, ensemble_mode: str) -> float | None:
    """T to pass to compute_maps: the fitted T when pooling first, None otherwise.

    Per-member mode: the members were already scaled before accumulation. Vector scaling:
    handled through ``calibrated_probs`` (compute_maps' temperature does not apply).
    """
    if calibration is None or ensemble_mode == "per_member" or calibration.method != "temperature":
        return None
    return float(calibration.temperature)


def calibrated_probs(acc, calibration, ensemble_mode: str, spacing_zyx=None) -> np.ndarray:
    """The calibrated ensemble probability (K, z, y, x) float32.

    No calibration: p̄. Temperature, pool then calibrate: softmax(log p̄ / T). Per member:
    the mean of the scaled members (already in the accumulator). Vector scaling:
    softmax(w ⊙ log p̄ + b). Per-class / local temperature: softmax(log p̄ / T(x))
    (``spacing_zyx`` in mm: the local one measures distances to the predicted contour).
    """
    from ..uncertainty.maps import calibrated_mean_probs

    if calibration is None or ensemble_mode == "per_member":
        return acc.mean_probs()
    if calibration.method == "temperature":
        return calibrated_mean_probs(acc, float(calibration.temperature))
    if getattr(calibration, "needs_spacing", False):
        return np.asarray(calibration.transform_probs(acc.mean_probs(), spacing_zyx=spacing_zyx), dtype=np.float32)
    return np.asarray(calibration.transform_probs(acc.mean_probs()), dtype=np.float32)


class CalibratedSlabs:
    """The calibrated ensemble probability of ``calibrated_probs``, computed one z slab at a time
    (``slab(sl) -> (K, dz, y, x)`` float32) from the accumulator's sums: the whole (K, z, y, x)
    volume is never held. Temperature and vector scaling act on each voxel alone, so the slabs
    are the volume's values. Per-class / local temperature: T(x) depends on the predicted class
    and the distance to the predicted contour, both functions of the segmentation argmax p̄
    (unchanged by any T(x) > 0), so ``seg`` (argmax of the uncalibrated mean, ``mean_argmax``)
    is taken first and T(x) is held as one float32 volume; each slab is then
    softmax(log p̄ / T(x)) exactly as ``calibrated_probs`` computes it on the whole volume."""

    ndim = 4

    def __init__(self, acc, calibration, ensemble_mode: str, spacing_zyx=None, seg=None):
        from ..calibration.calibration_file import LOCAL_METHODS
        from ..uncertainty.maps import _check_temperature

        acc.require_members("calibrated probabilities")
        self.acc, self.calibration = acc, calibration
        self.shape = (acc.n_classes,) + tuple(acc.shape_zyx)
        self.dtype = np.dtype(np.float32)
        self._kind = ("mean" if calibration is None or ensemble_mode == "per_member"
                      else "temperature" if calibration.method == "temperature"
                      else "tmap" if calibration.method in LOCAL_METHODS else "transform")
        self._t = _check_temperature(calibration.temperature) if self._kind == "temperature" else None
        self._tmap = None
        if self._kind == "tmap":
            if calibration.class_names and len(calibration.class_names) != acc.n_classes:
                raise InputError(f"probabilities have {acc.n_classes} classes but the calibration file was "
                                 f"fitted on {len(calibration.class_names)} classes")
            if calibration.needs_spacing and spacing_zyx is None:
                raise InputError("local temperature needs the image spacing (distances to the contour are in mm)")
            if seg is None:
                seg = mean_argmax(acc)
            self._tmap = calibration.local_scaler().volume_temperature(
                seg, spacing_zyx if spacing_zyx is not None else (1.0, 1.0, 1.0))

    @property
    def argmax_invariant(self) -> bool:
        """True when argmax of every slab is argmax p̄ (all but vector scaling)."""
        return self._kind != "transform"

    def slab(self, sl: slice) -> np.ndarray:
        """The calibrated slab (K, dz, y, x) as a host float32 array (on a device: computed there,
        ``device_slab``, then copied)."""
        from ..uncertainty.maps import _temperature_slab

        be = self.acc.backend
        if be.is_torch:
            return be.get(self.device_slab(sl))
        if self._kind == "temperature":
            pbar = self.acc.sum_probs[:, sl] * np.float32(1.0 / self.acc.n_members)
            return pbar if self._t is None else _temperature_slab(pbar, self._t)
        pbar = self.acc.sum_probs[:, sl] / np.float32(self.acc.n_members)  # as acc.mean_probs()
        if self._kind == "mean":
            return pbar
        if self._kind == "tmap":
            from ..calibration.local_temperature import apply_temperature_map

            return np.asarray(apply_temperature_map(pbar, self._tmap[sl], axis=0), dtype=np.float32)
        return np.asarray(self.calibration.transform_probs(pbar), dtype=np.float32)

    def device_slab(self, sl: slice):
        """``slab`` as a tensor on the accumulator's torch device, computed there (vector scaling:
        on the host, then moved)."""
        from ..uncertainty import torch_kernels as tk

        be = self.acc.backend
        if self._kind == "temperature":
            pbar = tk.pbar_slab(self.acc, sl)
            return pbar if self._t is None else tk.temperature(be, pbar, self._t)
        pbar = tk.mean_slab(self.acc, sl)
        if self._kind == "mean":
            return pbar
        if self._kind == "tmap":
            return tk.temperature_map(be, pbar, be.put(self._tmap[sl]))
        return be.put(np.asarray(self.calibration.transform_probs(be.get(pbar)), dtype=np.float32))

    def to_array(self) -> np.ndarray:
        from .. import memory

        out = memory.empty(self.shape, np.float32)
        for sl in self.acc.slabs():
            out[:, sl] = self.slab(sl)
        return out


def mean_argmax(acc) -> np.ndarray:
    """argmax_c p̄_c (z, y, x), uint8 (uint16 for K > 256), one z slab at a time: the segmentation
    of every calibration that keeps the argmax (temperature, per-class, local)."""
    from .. import memory
    from ..uncertainty.measures import argmax_classes

    acc.require_members("the segmentation")
    seg = memory.empty(acc.shape_zyx, np.uint8 if acc.n_classes <= 256 else np.uint16)
    n = np.float32(acc.n_members)
    be = acc.backend
    for sl in acc.slabs():  # of p̄ itself: rounding Σ/M can tie two classes that Σ orders
        if be.is_torch:
            from ..uncertainty import torch_kernels as tk

            tk.calibrated_pass(be, tk.mean_slab(acc, sl), None, None, seg[sl])
            continue
        argmax_classes(acc.sum_probs[:, sl] / n, out=seg[sl])
    return seg


def calibrated_slabs(acc, calibration, ensemble_mode: str, spacing_zyx=None, seg=None) -> CalibratedSlabs:
    """``calibrated_probs`` as a ``CalibratedSlabs`` (computed per z slab on demand); ``seg``:
    argmax p̄ when the caller has it (used by the per-class / local temperature)."""
    return CalibratedSlabs(acc, calibration, ensemble_mode, spacing_zyx, seg)


def maps_need_probs(calibration, ensemble_mode: str) -> bool:
    """True when ``case_maps`` reads the calibrated probability it is given: vector scaling or
    per-class / local temperature pooled first (their calibrated p̄ is not one temperature of p̄).
    Otherwise it may be None."""
    return calibration is not None and ensemble_mode != "per_member" and calibration.method != "temperature"


def case_maps(acc, probs: np.ndarray, geometry, calibration, ensemble_mode: str, names=None,
              dae_sigma_mm: float = 2.0, ebcu_radius_mm: float = 4.0, roi=None,
              info: dict | None = None, release_sums: bool = False, seg=None) -> dict:
    """All requested maps of one case with the calibration applied, at once (``iter_case_maps``)."""
    from ..uncertainty.maps import MAP_NAMES

    maps = dict(iter_case_maps(acc, probs, geometry, calibration, ensemble_mode, names, dae_sigma_mm,
                               ebcu_radius_mm, roi, info, release_sums, seg))
    return {name: maps[name] for name in MAP_NAMES if name in maps}


def iter_case_maps(acc, probs: np.ndarray, geometry, calibration, ensemble_mode: str, names=None,
                   dae_sigma_mm: float = 2.0, ebcu_radius_mm: float = 4.0, roi=None,
                   info: dict | None = None, release_sums: bool = False, seg=None, spare_volume=None):
    """Yield ``(name, map)`` one at a time with the calibration applied (``uncertainty.maps.iter_maps``).

    ``probs`` is the calibrated ensemble probability (``calibrated_probs``; only read when
    ``maps_need_probs``, else it may be None); ``seg`` its argmax when the caller has it;
    ``roi`` the case's ROI (used for the EBCU threshold when the calibration file holds none).
    With temperature scaling the maps apply T themselves. With vector scaling (whose calibrated
    p̄ is not a temperature of p̄) the maps of the calibrated probability — confidence, entropy,
    entropy_norm, DAE, EBCU — are maps of ``probs``, so every mode yields maps of the
    probability that is written out. ``release_sums``: free the accumulator's sums once read
    (``acc`` is unusable for maps afterwards). ``spare_volume``: see ``iter_maps``.
    """
    from ..uncertainty.maps import iter_maps

    ebcu_t = calibration.ebcu_threshold if calibration is not None else None
    return iter_maps(acc, geometry, temperature=maps_temperature(calibration, ensemble_mode), names=names,
                     dae_sigma_mm=dae_sigma_mm, ebcu_radius_mm=ebcu_radius_mm, ebcu_threshold=ebcu_t,
                     roi=roi, info=info, release_sums=release_sums,
                     probs=probs if maps_need_probs(calibration, ensemble_mode) else None, seg=seg,
                     spare_volume=spare_volume)
