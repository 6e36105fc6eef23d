"""Per-voxel uncertainty measures (METHODS.md §1), from probabilities or from an accumulator.

Definitions (M members, K classes, p̄ = (1/M) Σ_m p_m, natural log, log max(p, EPS)):

- confidence            max_c p̄_c
- predictive entropy    PE = H(p̄) = −Σ_c p̄_c log p̄_c; normalised: PE / log K (in [0, 1])
- expected entropy      EE = (1/M) Σ_m H(p_m)                       (aleatoric)
- mutual information    MI = PE − EE, tiny negatives clamped to 0  (epistemic; 0 for M = 1)
- EPKL                  (1/M²) Σ_{m,m'} KL(p_m || p_m') over all ordered pairs incl. m = m'
                        = −Σ_c p̄_c · (1/M) Σ_m log p_m,c − EE.  It is computed as
                        MI + max(Σ_c p̄_c (log p̄_c − mean_m log p_m,c), 0), the same number
                        (EPKL − MI = CE − PE ≥ 0 by Jensen), so MI ≤ EPKL holds exactly.
- foreground variance   mean_m p_fg,m² − (mean_m p_fg,m)², p_fg = 1 − p_0 (population variance)
- vote disagreement     1 − |2q − 1|, q = fraction of members whose argmax is foreground

Array functions take (K, ...) probabilities; accumulator functions read an
``EnsembleAccumulator`` slab by slab and return float32 (z, y, x) volumes. The accumulator
measures (EE, MI, EPKL, variance, votes) describe the members as they were accumulated;
confidence and entropy are applied by ``maps.compute_maps`` to the calibrated p̄.
For M = 1, MI and EPKL are returned as exact zeros and an info message says so once.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .streaming import EPS, EnsembleAccumulator

_EPS32 = np.float32(EPS)


# --- on probability arrays -------------------------------------------------------------------

def _as_probs(probs) -> np.ndarray:
    p = np.asarray(probs)
    if p.ndim < 1 or p.shape[0] < 2:
        raise InputError(f"expected class probabilities with K >= 2 classes on the first axis, "
                         f"got shape {p.shape}")
    return p


def entropy(probs, out: np.ndarray | None = None) -> np.ndarray:
    """Shannon entropy over the first axis, H(p) = −Σ_c p_c log max(p_c, EPS), float32 (nats)."""
    p = _as_probs(probs)
    h = np.zeros(p.shape[1:], dtype=np.float32) if out is None else out
    if out is not None:
        h[...] = 0
    for c in range(p.shape[0]):
        pc = np.asarray(p[c], dtype=np.float32)
        t = np.log(np.maximum(pc, _EPS32))
        t *= pc
        h -= t
    return h


def argmax_classes(probs, out: np.ndarray | None = None) -> np.ndarray:
    """argmax over the first axis (ties: lowest class, as ``np.argmax``) of finite probabilities,
    into ``out`` (default uint8, uint16 for K > 256). The same labels as ``np.argmax(p, axis=0)``
    (tests), by one comparison per class on contiguous planes: numpy's argmax along the first
    axis walks the K values of each voxel with a stride, several times slower for small K."""
    p = _as_probs(probs)
    if out is None:
        out = np.empty(p.shape[1:], np.uint8 if p.shape[0] <= 256 else np.uint16)
    best = np.array(p[0], copy=True)
    out.fill(0)
    better = np.empty(best.shape, dtype=bool)
    for c in range(1, p.shape[0]):
        np.greater(p[c], best, out=better)  # strictly greater: a tie keeps the lower class
        np.copyto(out, c, where=better, casting="unsafe")
        np.maximum(best, p[c], out=best)
    return out


def confidence(probs) -> np.ndarray:
    """max_c p_c over the first axis, float32."""
    return np.asarray(_as_probs(probs).max(axis=0), dtype=np.float32)


def normalised_entropy(h, n_classes: int) -> np.ndarray:
    """PE / log K: entropy scaled to [0, 1] (1 = uniform over the K classes)."""
    if int(n_classes) < 2:
        raise InputError(f"normalised entropy needs K >= 2 classes, got {n_classes}")
    return (np.asarray(h, dtype=np.float32) / np.float32(math.log(int(n_classes)))).astype(np.float32, copy=False)


# --- slab kernels shared with maps.compute_maps ------------------------------------------------

def disagreement_slab(acc: EnsembleAccumulator, sl: slice, pbar: np.ndarray, pe: np.ndarray,
                      want_epkl: bool = True):
    """EE, MI and (optionally) EPKL on z slab ``sl`` of ``acc``.

    ``pbar`` is the slab of the uncalibrated mean p̄ (K, dz, y, x) and ``pe`` its entropy H(p̄).
    Returns (ee, mi, epkl_or_None), float32 arrays of the slab's shape.
    """
    ee = expected_entropy_slab(acc, sl)
    mi = pe - ee
    np.maximum(mi, 0, out=mi)
    if not want_epkl:
        return ee, mi, None
    gap = acc.epkl_gap_slab(sl, pbar)  # G = max(Σ_c p̄_c (−L_c / M), 0) = EPKL − MI (streaming)
    gap += mi
    return ee, mi, gap


def expected_entropy_slab(acc: EnsembleAccumulator, sl: slice) -> np.ndarray:
    """EE = Σ_m H(p_m) / M on slab ``sl`` (float32)."""
    return acc.sum_entropy[sl] * np.float32(1.0 / acc.n_members)


def fg_variance_slab(acc: EnsembleAccumulator, sl: slice) -> np.ndarray:
    """Foreground variance mean_m p_fg² − (mean_m p_fg)² on slab ``sl`` (Welford sum / M)."""
    v = acc.fg_sq_dev[sl] * np.float32(1.0 / acc.n_members)
    np.maximum(v, 0, out=v)
    return v


def vote_disagreement_slab(acc: EnsembleAccumulator, sl: slice) -> np.ndarray:
    """1 − |2q − 1| with q = fg votes / M on slab ``sl``."""
    q = acc.fg_votes[sl].astype(np.float32)
    q *= np.float32(2.0 / acc.n_members)
    q -= np.float32(1.0)
    np.abs(q, out=q)
    return np.float32(1.0) - q


# --- on an accumulator (whole volume) ---------------------------------------------------------

def _per_slab(acc: EnsembleAccumulator, fn) -> np.ndarray:
    acc.require_members()
    out = np.empty(acc.shape_zyx, dtype=np.float32)
    for sl in acc.slabs():
        out[sl] = fn(sl)
    return out


def _pbar_slab(acc: EnsembleAccumulator, sl: slice) -> np.ndarray:
    return acc.sum_probs[:, sl] * np.float32(1.0 / acc.n_members)


def predictive_entropy(acc: EnsembleAccumulator) -> np.ndarray:
    """PE = H(p̄) of the accumulated (uncalibrated) mean, float32 (z, y, x)."""
    return _per_slab(acc, lambda sl: entropy(_pbar_slab(acc, sl)))


def expected_entropy(acc: EnsembleAccumulator) -> np.ndarray:
    """EE = (1/M) Σ_m H(p_m), float32 (z, y, x)."""
    return _per_slab(acc, lambda sl: acc.sum_entropy[sl] * np.float32(1.0 / acc.n_members))


def mutual_information(acc: EnsembleAccumulator) -> np.ndarray:
    """MI = max(PE − EE, 0); exactly 0 for a single member (logged once)."""
    acc.require_members()
    if acc.note_single_member():
        return np.zeros(acc.shape_zyx, dtype=np.float32)

    def one(sl):
        pbar = _pbar_slab(acc, sl)
        return disagreement_slab(acc, sl, pbar, entropy(pbar), want_epkl=False)[1]
    return _per_slab(acc, one)


def epkl(acc: EnsembleAccumulator) -> np.ndarray:
    """EPKL = −Σ_c p̄_c · mean_m log p_m,c − EE (all M² ordered pairs); exactly 0 for M = 1."""
    acc.require_members()
    if acc.note_single_member():
        return np.zeros(acc.shape_zyx, dtype=np.float32)

    def one(sl):
        pbar = _pbar_slab(acc, sl)
        return disagreement_slab(acc, sl, pbar, entropy(pbar))[2]
    return _per_slab(acc, one)


def fg_variance(acc: EnsembleAccumulator) -> np.ndarray:
    """Foreground variance over members, mean_m p_fg² − (mean_m p_fg)², float32."""
    return _per_slab(acc, lambda sl: fg_variance_slab(acc, sl))


def vote_disagreement(acc: EnsembleAccumulator) -> np.ndarray:
    """Vote disagreement 1 − |2q − 1|, q the fraction of foreground argmax votes, float32."""
    return _per_slab(acc, lambda sl: vote_disagreement_slab(acc, sl))
