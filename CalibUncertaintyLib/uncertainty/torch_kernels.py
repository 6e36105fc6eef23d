"""The torch kernels of ``backend.TorchBackend``: each z slab's arithmetic of the sums and the maps,
with the definitions (and, where it matters, the operation order) of the numpy kernels in
``streaming``, ``measures``, ``maps``, ``distance_aware`` and ``ebcu``.

Inputs are host numpy slabs of the sums (moved to the device here) or device tensors (a member
computed on the device); outputs are written back into host arrays. float32 throughout, with the
numpy path's float32 scalars (``TorchBackend.f32``), so the numbers agree to float32 precision
(library log/exp differ in the last bit; sums over classes may add in another order).
"""

from __future__ import annotations

import math

import numpy as np

from .streaming import EPS


def _t(be, a, dtype=None):
    return be.put(a, dtype)


# --- accumulation --------------------------------------------------------------------------------

def accumulate_slab(acc, sl: slice, p, n_old: int) -> None:
    """Add member slab ``p`` (K, dz, y, x) to ``acc``'s sums on z slab ``sl`` (streaming.add's pass 2)."""
    be = acc.backend
    torch = be.torch
    p = _t(be, p, torch.float32)
    k = p.shape[0]
    eps = EPS
    s_old = _t(be, acc._sum_p[:, sl])
    logp = torch.log(torch.clamp(p, min=eps))
    h = (logp * p).sum(dim=0).neg_()
    if n_old:
        inv_new, n_new = be.f32(1.0 / (n_old + 1)), be.f32(n_old + 1)
        new = torch.log(torch.clamp((s_old + p) * inv_new, min=eps)) * n_new
        if n_old == 1:  # L is 0 after the first member
            gap = logp - new + torch.log(torch.clamp(s_old, min=eps))
        else:
            inv_old = be.f32(1.0 / n_old)
            gaps = torch.stack([_t(be, acc._log_gap[c][sl]) for c in range(k)])
            gap = gaps + logp - new + torch.log(torch.clamp(s_old * inv_old, min=eps)) * be.f32(n_old)
        for c in range(k):
            be.get(gap[c], out=acc._log_gap[c][sl])
        del new, gap
        # Welford on p_fg = 1 - p_0, the running mean 1 - S0 / n
        inv_old = be.f32(1.0 / n_old)
        x = 1.0 - p[0]
        d_old = x - (1.0 - s_old[0] * inv_old)
        d_new = x - (1.0 - (s_old[0] + p[0]) * inv_new)
        be.get(_t(be, acc._fg_m2[sl]) + d_old * d_new, out=acc._fg_m2[sl])
    be.get(_t(be, acc._sum_h[sl]) + h, out=acc._sum_h[sl])
    be.get(s_old + p, out=acc._sum_p[:, sl])
    votes = _t(be, acc._fg_votes[sl])
    vote = (p[1:].amax(dim=0) > p[0]).to(votes.dtype)
    be.get(votes + vote, out=acc._fg_votes[sl])


def gap_slab(be, gaps, sl: slice, sum_p_slab, n: int) -> np.ndarray:
    """G = max(Σ_c p̄_c (−L_c / M), 0) on slab ``sl`` (streaming._gap_from_log_gap)."""
    torch = be.torch
    inv = be.f32(1.0 / n)
    pbar = _t(be, sum_p_slab) * inv
    g = torch.zeros(pbar.shape[1:], dtype=torch.float32, device=be.device)
    for c in range(pbar.shape[0]):
        g += _t(be, gaps[c][sl]) * (-inv) * pbar[c]
    return be.get(torch.clamp(g, min=0.0))


# --- per-voxel measures (measures, maps) ---------------------------------------------------------

def entropy(be, p):
    """H(p) = −Σ_c p_c log max(p_c, EPS) over axis 0, a device tensor."""
    torch = be.torch
    return (p * torch.log(torch.clamp(p, min=EPS))).sum(dim=0).neg_()


def argmax(be, p, dtype):
    """argmax over axis 0, ties to the lowest class (torch returns the first maximum)."""
    return be.torch.argmax(p, dim=0).to(dtype)


def temperature(be, pbar, t: float, divide: bool = False):
    """softmax(log max(p̄, EPS) / T) over axis 0: times 1/T as maps._temperature_slab, or divided
    by T (``divide``) as calibration.temperature.apply_temperature (a member in per-member mode)."""
    torch = be.torch
    lp = torch.log(torch.clamp(pbar, min=EPS))
    z = lp / be.f32(t) if divide else lp * be.f32(1.0 / t)
    z = z - z.amax(dim=0, keepdim=True)
    z = torch.exp(z)
    return z / z.sum(dim=0, keepdim=True)


def temperature_map(be, pbar, tmap):
    """softmax(log max(p̄, EPS) / T(x)) over axis 0 with a voxel-wise T (local temperature)."""
    torch = be.torch
    z = torch.log(torch.clamp(pbar, min=EPS)) / tmap
    z = z - z.amax(dim=0, keepdim=True)
    z = torch.exp(z)
    return z / z.sum(dim=0, keepdim=True)


def pbar_slab(acc, sl: slice):
    """p̄ = Σ p · (1/M) on slab ``sl`` as the maps take it, a device tensor."""
    be = acc.backend
    return _t(be, acc.sum_probs[:, sl]) * be.f32(1.0 / acc.n_members)


def mean_slab(acc, sl: slice):
    """p̄ = Σ p / M on slab ``sl`` (``acc.mean_probs()``'s division), a device tensor."""
    be = acc.backend
    return _t(be, acc.sum_probs[:, sl]) / be.f32(acc.n_members)


def expected_entropy_slab(acc, sl: slice) -> np.ndarray:
    be = acc.backend
    return be.get(_t(be, acc.sum_entropy[sl]) * be.f32(1.0 / acc.n_members))


def fg_variance_slab(acc, sl: slice) -> np.ndarray:
    be = acc.backend
    return be.get(be.torch.clamp(_t(be, acc.fg_sq_dev[sl]) * be.f32(1.0 / acc.n_members), min=0.0))


def vote_disagreement_slab(acc, sl: slice) -> np.ndarray:
    be = acc.backend
    q = _t(be, acc.fg_votes[sl]).to(be.torch.float32) * be.f32(2.0 / acc.n_members) - 1.0
    return be.get(1.0 - q.abs())


def disagreement_slab(acc, sl: slice, want_epkl: bool):
    """(MI, EPKL or None) on slab ``sl`` as host arrays (measures.disagreement_slab)."""
    be = acc.backend
    torch = be.torch
    pbar = pbar_slab(acc, sl)
    ee = _t(be, acc.sum_entropy[sl]) * be.f32(1.0 / acc.n_members)
    mi = torch.clamp(entropy(be, pbar) - ee, min=0.0)
    if not want_epkl:
        return be.get(mi), None
    if acc.reduced:
        g = _t(be, acc._epkl_gap[sl])
    else:
        g = torch.zeros_like(mi)
        inv = be.f32(1.0 / acc.n_members)
        for c in range(pbar.shape[0]):
            g += _t(be, acc.log_gap[c, sl]) * (-inv) * pbar[c]
        g = torch.clamp(g, min=0.0)
    return be.get(mi), be.get(g + mi)


def calibrated_pass(be, pcal, conf_out, h_out, seg_out) -> None:
    """Confidence, entropy and labels of one calibrated slab ``pcal`` (a device tensor) into the
    host slabs given (each may be None)."""
    if conf_out is not None:
        be.get(pcal.amax(dim=0), out=conf_out)
    if h_out is not None:
        be.get(entropy(be, pcal), out=h_out)
    if seg_out is not None:
        be.get(argmax(be, pcal, be.torch.uint8 if seg_out.dtype == np.uint8 else be.torch.int32), out=seg_out)


def scale_slab(be, a, factor: float, out) -> None:
    """out = a · factor (the normalised entropy: H / log K, as numpy's divide by log K)."""
    be.get(_t(be, a) / be.f32(factor), out=out)


# --- DAE: exact distance passes (distance_aware) ------------------------------------------------

def box_distance(be, region_mask: np.ndarray, spacing, max_mm) -> np.ndarray:
    """The exact distance (mm) inside ``region_mask``'s box to the nearest voxel box outside it
    (distance_aware._box_distance_into's three 1-D minimum passes, on the device; minima and sums
    of the same float32 numbers, so the same values). Returns the host float32 box."""
    torch = be.torch
    m = _t(be, region_mask)
    g = torch.where(m, torch.tensor(float("inf"), device=be.device), torch.tensor(0.0, device=be.device))
    g = g.to(torch.float32)
    for a in range(3):
        n = g.shape[a]
        width = n - 1 if max_mm is None else int(math.floor(float(max_mm) / spacing[a] + 0.5))
        width = min(width, n - 1)
        if width < 1:
            continue
        src = g.movedim(a, 0).contiguous()
        out = src.clone()
        h = float(spacing[a])
        for k in range(1, width + 1):
            c = be.f32(h * h * (k - 0.5) ** 2)
            out[k:] = torch.minimum(out[k:], src[:n - k] + c)
            out[:n - k] = torch.minimum(out[:n - k], src[k:] + c)
        g = out.movedim(0, a)
    return be.get(torch.sqrt(g))


def dae_weight_slab(be, d, h, sigma: float, out) -> None:
    """out = (1 − exp(−d² / 2σ²)) · H (distance_aware.distance_weight times the entropy)."""
    torch = be.torch
    dt = _t(be, d)
    w = 1.0 - torch.exp(dt * dt * be.f32(-1.0 / (2.0 * sigma * sigma)))
    be.get(w * _t(be, h), out=out)


# --- EBCU: ball sums (ebcu) ----------------------------------------------------------------------

def ball_sum(be, ex: np.ndarray, rows) -> np.ndarray:
    """Σ over the ball's offsets of ``ex`` (zero-padded box) by rows along x (ebcu._sum_rows):
    a 1-D box sum along x per distinct row length, shift-added once per (dz, dy) row."""
    from .ebcu import _shift_slices

    torch = be.torch
    e = _t(be, ex)
    out = torch.zeros_like(e)
    by_len = {}
    for dz, dy, a in rows:
        by_len.setdefault(a, []).append((dz, dy))
    nx = e.shape[2]
    for a, pairs in by_len.items():
        box = e.clone()
        for dx in range(1, a + 1):
            if dx >= nx:
                break
            box[:, :, :nx - dx] += e[:, :, dx:]
            box[:, :, dx:] += e[:, :, :nx - dx]
        for dz, dy in pairs:
            dz_dst, dz_src = _shift_slices(e.shape[0], dz)
            dy_dst, dy_src = _shift_slices(e.shape[1], dy)
            out[dz_dst, dy_dst] += box[dz_src, dy_src]
    return be.get(out)
