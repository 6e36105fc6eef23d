"""Uncertainty of region-based (sigmoid) models: independent per-region Bernoullis (METHODS.md §7).

A region-based nnU-Net model (``regions_class_order`` in dataset.json, e.g. BraTS's nested whole
tumour / tumour core / enhancing tumour) outputs one sigmoid per region r = 1..R, not a softmax
over classes: member m gives p_{m,r} = P(voxel in region r), and regions overlap. Each region is
treated as an independent Bernoulli variable, so every measure of §1 is the sum over regions of
its binary version (natural log, logs clamped at EPS):

- H_b(q) = −q log q − (1 − q) log(1 − q)                      (binary entropy, ≤ log 2)
- p̄_r = mean_m p_{m,r}                                         (pooled region probability)
- entropy            PE = Σ_r H_b(p̄_r)                          (the joint entropy of R independent Bernoullis)
- entropy_norm          = PE / (R log 2)                        (in [0, 1])
- expected_entropy   EE = Σ_r mean_m H_b(p_{m,r})
- mutual_information MI = Σ_r max(H_b(p̄_r) − mean_m H_b(p_{m,r}), 0)
- epkl            EPKL = Σ_r [ −p̄_r mean_m log p_{m,r} − (1 − p̄_r) mean_m log(1 − p_{m,r})
                               − mean_m H_b(p_{m,r}) ],  the mean over all M² ordered member pairs
                          of Σ_r KL(Bernoulli(p_{m,r}) ‖ Bernoulli(p_{m',r})); per region ≥ MI_r.

One member: MI = EPKL = 0. ``RegionAccumulator`` keeps 4R float32 volumes of running sums
(Σ p, Σ H_b(p), Σ log p, Σ log(1 − p)) whatever the number of members, and reads a member slab by
slab like ``EnsembleAccumulator`` (an array, or an object with ``shape`` and ``slab(z_slice)``).
The segmentation follows nnU-Net (``LabelManager.convert_probabilities_to_segmentation``): start
from background 0 and, for each region i in order, set ``regions_class_order[i]`` where p̄_i > 0.5.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .streaming import EPS, z_slabs

REGION_MAP_NAMES = ("entropy", "entropy_norm", "expected_entropy", "mutual_information", "epkl")
_EPS32 = np.float32(EPS)


def binary_entropy(q: np.ndarray) -> np.ndarray:
    """H_b(q) in nats, float32, logs clamped at EPS."""
    q = np.asarray(q, dtype=np.float32)
    return -(q * np.log(np.maximum(q, _EPS32)) + (1 - q) * np.log(np.maximum(1 - q, _EPS32)))


class RegionAccumulator:
    """Running per-voxel sums over members of a region-based model (module docstring)."""

    def __init__(self, n_regions: int, shape_zyx):
        self.n_regions = int(n_regions)
        self.shape_zyx = tuple(int(s) for s in shape_zyx)
        shape = (self.n_regions, *self.shape_zyx)
        self.sum_p = np.zeros(shape, np.float32)
        self.sum_h = np.zeros(shape, np.float32)
        self.sum_log_p = np.zeros(shape, np.float32)
        self.sum_log_q = np.zeros(shape, np.float32)
        self.n_members = 0

    def _slabs(self, member):
        if hasattr(member, "slab") and not isinstance(member, np.ndarray):
            for sl in z_slabs(self.shape_zyx):
                v = member.slab(sl)  # a device tensor when computed on a GPU: region maps run on the host
                yield sl, v.detach().cpu().numpy() if hasattr(v, "detach") else v
        else:
            a = np.asarray(member)
            for sl in z_slabs(self.shape_zyx):
                yield sl, a[:, sl]

    def add(self, member) -> None:
        """Add one member's region probabilities (R, z, y, x) in [0, 1]. Validated first (shape,
        finite, range), so a bad member changes nothing."""
        shape = tuple(member.shape)
        if shape != (self.n_regions, *self.shape_zyx):
            raise InputError(f"region member has shape {shape}, expected {(self.n_regions, *self.shape_zyx)} "
                             "(regions, z, y, x)")
        for _, s in self._slabs(member):
            if not np.all(np.isfinite(s)) or s.min(initial=0.0) < -1e-6 or s.max(initial=0.0) > 1 + 1e-6:
                raise InputError("region probabilities must be finite and in [0, 1] (sigmoid outputs)")
        for sl, s in self._slabs(member):
            s = np.clip(np.asarray(s, np.float32), 0.0, 1.0)
            self.sum_p[:, sl] += s
            self.sum_h[:, sl] += binary_entropy(s)
            self.sum_log_p[:, sl] += np.log(np.maximum(s, _EPS32))
            self.sum_log_q[:, sl] += np.log(np.maximum(1 - s, _EPS32))
        self.n_members += 1

    def _require(self) -> None:
        if self.n_members == 0:
            raise InputError("no ensemble member has been added yet")

    def mean_probs(self) -> np.ndarray:
        """p̄ (R, z, y, x) float32."""
        self._require()
        return self.sum_p / np.float32(self.n_members)


def segmentation(pbar: np.ndarray, regions_class_order) -> np.ndarray:
    """nnU-Net's label map of region probabilities: region i (in order) writes its label where p̄_i > 0.5."""
    seg = np.zeros(pbar.shape[1:], dtype=np.uint16)
    for i, c in enumerate(regions_class_order):
        seg[pbar[i] > 0.5] = int(c)
    return seg


def region_maps(acc: RegionAccumulator, names=None) -> dict[str, np.ndarray]:
    """The maps of ``REGION_MAP_NAMES`` (or ``names``), float32 (z, y, x), by the module's definitions."""
    names = list(REGION_MAP_NAMES if names is None else names)
    unknown = [n for n in names if n not in REGION_MAP_NAMES]
    if unknown:
        raise InputError(f"unknown region map(s) {unknown}; a region-based model has {', '.join(REGION_MAP_NAMES)}")
    acc._require()
    inv = np.float32(1.0 / acc.n_members)
    pbar = acc.sum_p * inv
    h_pbar = binary_entropy(pbar)                   # (R, ...)
    ee_r = acc.sum_h * inv
    mi_r = np.maximum(h_pbar - ee_r, 0)
    out = {}
    pe = h_pbar.sum(0)
    if "entropy" in names:
        out["entropy"] = pe.astype(np.float32)
    if "entropy_norm" in names:
        out["entropy_norm"] = (pe / np.float32(acc.n_regions * math.log(2))).astype(np.float32)
    if "expected_entropy" in names:
        out["expected_entropy"] = ee_r.sum(0).astype(np.float32)
    single = acc.n_members == 1
    if "mutual_information" in names:
        out["mutual_information"] = np.zeros(acc.shape_zyx, np.float32) if single else mi_r.sum(0).astype(np.float32)
    if "epkl" in names:
        if single:
            out["epkl"] = np.zeros(acc.shape_zyx, np.float32)
        else:
            ce = -(pbar * acc.sum_log_p * inv + (1 - pbar) * acc.sum_log_q * inv)
            gap = np.maximum(ce - h_pbar, 0)        # EPKL_r − MI_r = CE_r − H_b(p̄_r) ≥ 0
            out["epkl"] = (gap + mi_r).sum(0).astype(np.float32)
    return {n: out[n] for n in names}
