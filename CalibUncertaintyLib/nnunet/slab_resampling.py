"""nnU-Net's probability resampling of a member's logits, one block of slices at a time.

nnU-Net exports probabilities by resampling the network's logits (K, ...) from the network grid
to the image grid with the configuration's ``resampling_fn_probabilities``
(``nnunetv2.preprocessing.resampling.default_resampling.resample_data_or_seg_to_shape`` with the
plans' keyword arguments; nnU-Net's default is ``order = 1``, ``order_z = 0``,
``force_separate_z = None``), one class channel at a time, each channel as a whole float64 volume
(plus, when the slice count changes, coordinate maps of 3 x 8 bytes per output voxel).
``SlabResampler`` gives the same values for a range of slices along one axis (the output's z)
from the network-grid logits, so a member never exists as a whole resampled volume: the
ensemble reads it slab by slab (``member_probabilities``), and the transient is one slab.

Both cases nnU-Net's ``resample_data_or_seg`` has are reproduced, chosen by nnU-Net's own
``determine_do_sep_z_and_axis`` from the same spacings:

- **separate z** (anisotropic spacing) along the slab axis: every needed source slice is resized
  in-plane by the very call nnU-Net makes (``skimage.transform.resize``, ``order``, mode edge, no
  anti-aliasing), then the slices are combined along the axis as nnU-Net's
  ``map_coordinates(..., order=order_z, mode='nearest')`` does with ``order_z = 0`` (nearest
  slice, nnU-Net's default): the picked slice index is computed by ``map_coordinates`` itself.
- **no separate z**, ``order = 1``: ``scipy.ndimage.map_coordinates`` at the coordinates nnU-Net's
  3-D ``resize`` (``zoom``, ``grid_mode``) uses for the block's voxels, on the few source slices
  the block reads; scipy evaluates the same weights and sums the same terms in the same order.

Both equal nnU-Net's whole-volume resampling bit for bit (tests/test_slab_resampling.py, and the
probabilities of every model kind are compared with ``nnUNetPredictor``'s). Anything else
(``order = 3`` without separate z, whose spline prefilter spans the whole volume; ``order_z``
other than 0; separate z along another axis than the slab axis; a resampling function that is
not nnU-Net's default) gets ``None`` from ``SlabResampler.create`` and the caller resamples whole channels as
before.
"""

from __future__ import annotations

import functools
import inspect
import threading

import numpy as np


def _kwargs_of(fn) -> dict | None:
    """The keyword arguments ``fn`` applies when it is nnU-Net's resample_data_or_seg_to_shape
    (a functools.partial of it), else None."""
    try:
        from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    except ImportError:  # pragma: no cover - nnunetv2 is a dependency of every caller
        return None
    kw = {}
    while isinstance(fn, functools.partial):
        if fn.args:
            return None
        kw = {**fn.keywords, **kw}
        fn = fn.func
    if fn is not resample_data_or_seg_to_shape:
        return None
    params = inspect.signature(resample_data_or_seg_to_shape).parameters
    out = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(kw)
    return out


class SlabResampler:
    """Resample (K, *src) logits to (K, *dst) one block ``[lo, hi)`` of slices along ``axis`` at a
    time (module doc). Build with ``create``; ``block(src, lo, hi)`` -> (K, *dst with axis
    ``hi - lo``) in ``src``'s dtype, equal to nnU-Net's ``resampling_fn_probabilities(src, dst,
    ...)[:, ..lo:hi..]``."""

    def __init__(self, src_shape, dst_shape, axis: int, order: int, separate: bool, order_z: int):
        self.src_shape, self.dst_shape = tuple(int(s) for s in src_shape), tuple(int(s) for s in dst_shape)
        self.axis, self.order, self.separate, self.order_z = int(axis), int(order), bool(separate), int(order_z)
        self._ranges = None
        self._ranges_lock = threading.Lock()  # blocks may be computed in several threads (read-ahead)
        n_in, n_out = self.src_shape[self.axis], self.dst_shape[self.axis]
        self.plane_shape = tuple(s for i, s in enumerate(self.dst_shape) if i != self.axis)
        i = np.arange(n_out, dtype=np.float64)
        if self.separate:
            if n_in == n_out:
                self._lo, self._w = np.arange(n_out), None
            else:  # the coordinates of nnU-Net's separate-z step (align_corners=False)
                coords = float(n_in) / n_out * (i + 0.5) - 0.5
                if self.order_z == 0:
                    from scipy.ndimage import map_coordinates

                    picked = map_coordinates(np.arange(n_in, dtype=np.float64), coords[None], order=0, mode="nearest")
                    self._lo, self._w = picked.astype(np.int64), None
                else:
                    raise ValueError("separate-z resampling is reproduced for order_z = 0 only")

    @classmethod
    def create(cls, resampling_fn, src_shape, dst_shape, current_spacing, new_spacing, axis: int):
        """A resampler reproducing ``resampling_fn`` (nnU-Net's configuration function) from
        ``src_shape`` to ``dst_shape`` (spatial shapes, nnU-Net's axis order) with slabs along
        ``axis``, or None when it cannot (module doc) or when no resampling happens."""
        kw = _kwargs_of(resampling_fn)
        src_shape, dst_shape = tuple(int(s) for s in src_shape), tuple(int(s) for s in dst_shape)
        if kw is None or kw.get("is_seg") or src_shape == dst_shape or len(src_shape) != 3:
            return None
        from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

        separate, lowres = determine_do_sep_z_and_axis(kw.get("force_separate_z"), current_spacing, new_spacing,
                                                       kw["separate_z_anisotropy_threshold"])
        order, order_z = int(kw.get("order", 3)), int(kw.get("order_z", 0))
        if separate:
            if lowres is None or int(lowres) != int(axis) or order_z != 0:
                return None
        elif order != 1:
            return None
        return cls(src_shape, dst_shape, axis, order, separate, order_z)

    def _plane(self, src_c, j: int) -> np.ndarray:
        """Source slice ``j`` of one channel resized in-plane (float64), as nnU-Net resizes it."""
        from skimage.transform import resize

        plane = np.take(src_c, j, axis=self.axis).astype(float, copy=False)
        return resize(plane, self.plane_shape, self.order, mode="edge", anti_aliasing=False)

    def _trilinear(self, src_c, c: int, lo: int, hi: int) -> np.ndarray:
        """Output slices [lo, hi) (slab axis first) of channel ``c``, computed as nnU-Net's 3-D
        ``resize`` computes them: ``scipy.ndimage.map_coordinates`` (order 1, mode nearest) at the
        coordinates ``zoom(..., grid_mode=True)`` uses, (i + 0.5) * n_in / n_out - 0.5 per axis
        (scipy maps those outside the volume itself), evaluates the same weights and sums the same terms in the same
        order, so the values are equal bit for bit (tests); then the output is clipped to the
        channel's range as ``resize`` clips it. Only the source slices the block needs are
        converted to float64 (the coordinates along the slab axis are shifted by an integer,
        which is exact)."""
        from scipy.ndimage import map_coordinates

        if self._ranges is None:
            raise RuntimeError("channel ranges not set")
        axes = []
        for a, n in enumerate(self.dst_shape):
            idx = np.arange(lo, hi) if a == self.axis else np.arange(n)
            zoom = np.divide(self.src_shape[a], self.dst_shape[a])
            axes.append((idx + 0.5) * zoom - 0.5)
        # the source slices [j0, j1] the block reads (at least two, so that scipy's border
        # handling past the last slice reads the same neighbours as on the whole volume)
        n_in = self.src_shape[self.axis]
        j1 = min(int(np.floor(axes[self.axis][-1])) + 1, n_in - 1)
        j0 = max(min(int(np.floor(axes[self.axis][0])), j1 - 1), 0)
        axes[self.axis] = axes[self.axis] - j0
        sub = [slice(None)] * 3
        sub[self.axis] = slice(j0, j1 + 1)
        vol = src_c[tuple(sub)].astype(np.float64)
        grid = np.meshgrid(*axes, indexing="ij", sparse=True)
        shape = tuple(x.size for x in axes)
        coords = np.stack([np.broadcast_to(g, shape) for g in grid])
        out = map_coordinates(vol, coords, order=1, mode="nearest")
        np.clip(out, self._ranges[c][0], self._ranges[c][1], out=out)
        return np.moveaxis(out, self.axis, 0)

    def block(self, src, lo: int, hi: int) -> np.ndarray:
        """Output slices ``[lo, hi)`` along ``axis`` of every channel of ``src`` (K, *src_shape)."""
        src = np.asarray(src)
        k = src.shape[0]
        n = hi - lo
        out_shape = list(self.dst_shape)
        out_shape[self.axis] = n
        out = np.empty((k, *out_shape), dtype=src.dtype)
        view = np.moveaxis(out, self.axis + 1, 1)  # (K, n, *plane)
        if not self.separate and self._ranges is None:  # resize clips to each channel's range
            with self._ranges_lock:
                if self._ranges is None:
                    self._ranges = [(float(np.min(src[c])), float(np.max(src[c]))) for c in range(k)]
        for c in range(k):
            cache: dict[int, np.ndarray] = {}
            if self.separate:
                def plane(j, c=c):
                    if j not in cache:
                        cache[j] = self._plane(src[c], j)
                    return cache[j]

                for t in range(n):
                    view[c, t] = plane(int(self._lo[lo + t]))
            else:
                view[c] = self._trilinear(src[c], c, lo, hi)
        return out


# --- the same resampling in torch, on the device where the logits are (issue 19) ----------------

def device_supported(resampler: SlabResampler | None) -> bool:
    """True when ``block_device`` reproduces ``resampler``: linear interpolation (``order`` 1),
    separate z with the nearest slice, or trilinear."""
    return resampler is not None and resampler.order == 1


def _linear_axis(n_in: int, n_out: int, lo: int = 0, hi: int | None = None):
    """Linear interpolation along one axis as scipy evaluates it for ``zoom(..., grid_mode=True)``
    and ``map_coordinates(order=1, mode="nearest")``: coordinates (i + 0.5) · n_in / n_out − 0.5,
    the lower neighbour floor(c) and the upper one, both clamped to the axis ("nearest"), weights
    (1 − t, t) with t = c − floor(c) (float64, numpy, as scipy computes them)."""
    hi = n_out if hi is None else hi
    c = (np.arange(lo, hi, dtype=np.float64) + 0.5) * np.divide(n_in, n_out) - 0.5
    f = np.floor(c)
    t = c - f
    i0 = f.astype(np.int64)
    return (np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1)), (1.0 - t, t)


def block_device(resampler: SlabResampler, be, src, lo: int, hi: int):
    """``resampler.block(src, lo, hi)`` on the device of ``src`` (a torch tensor (K, *src_shape),
    float16 as the sliding window returns it). The interpolation is scipy's own arithmetic, written
    out: each output value is Σ over the 2 (in-plane: 4, trilinear: 8) neighbours, the last axis
    varying fastest, of value · w_axis0 · w_axis1 (· w_axis2), with the weights and neighbours of
    ``_linear_axis``; in float64 this gives scipy's values bit for bit (tests), so the float16
    rounding that follows is the host path's. On MPS (no float64) the same sums run in float32.
    Separate z picks the nearest source slice (the host path's indices); trilinear values are
    clipped to each channel's range as ``resize`` clips; the values are rounded to ``src``'s dtype
    once, as numpy rounds (``_round_to``). Returns (K, *dst with axis hi − lo)."""
    torch = be.torch
    r = resampler
    work = torch.float64 if be.float64 else torch.float32
    dev = src.device
    k = src.shape[0]
    moved = src.movedim(r.axis + 1, 1)  # (K, n_axis, a, b): the slab axis first
    plane_in = tuple(int(s) for s in moved.shape[2:])
    plane = tuple(s for i, s in enumerate(r.dst_shape) if i != r.axis)
    idx_w = [_linear_axis(n_in, n_out) for n_in, n_out in zip(plane_in, plane)]
    (ya, yb), (wy0, wy1) = idx_w[0]
    (xa, xb), (wx0, wx1) = idx_w[1]
    rows = [torch.as_tensor(a, device=dev) for a in (ya, yb)]
    cols = [torch.as_tensor(a, device=dev) for a in (xa, xb)]
    wy = [torch.as_tensor(w, dtype=work, device=dev)[:, None] for w in (wy0, wy1)]
    wx = [torch.as_tensor(w, dtype=work, device=dev)[None, :] for w in (wx0, wx1)]
    n = hi - lo
    out = torch.empty((k, n) + plane, dtype=src.dtype, device=dev)

    def bilinear(planes, extra=None, total=None):
        """Σ over the in-plane neighbours of planes (m, a, b) -> (m, H, W), each term times
        ``extra`` (a weight per plane: the z weight of the trilinear case) before the in-plane
        weights, added one by one to ``total`` (scipy adds the corners in sequence)."""
        for i in range(2):
            r_i = planes.index_select(1, rows[i])
            for j in range(2):
                term = r_i.index_select(2, cols[j])
                if extra is not None:
                    term = term * extra
                term = term * wy[i] * wx[j]
                total = term if total is None else total + term
        return total

    if r.separate:
        picks = np.asarray(r._lo[lo:hi], dtype=np.int64)
        uniq, inverse = np.unique(picks, return_inverse=True)
        uniq_t, inv_t = torch.as_tensor(uniq, device=dev), torch.as_tensor(inverse, device=dev)
        for c in range(k):  # one channel at a time: float64 planes of one channel only
            out[c] = _round_to(bilinear(moved[c].index_select(0, uniq_t).to(work)).index_select(0, inv_t), src.dtype)
    else:
        (za, zb), (wz0, wz1) = _linear_axis(r.src_shape[r.axis], r.dst_shape[r.axis], lo, hi)
        zs = [torch.as_tensor(a, device=dev) for a in (za, zb)]
        wz = [torch.as_tensor(w, dtype=work, device=dev)[:, None, None] for w in (wz0, wz1)]
        if r._ranges is None:
            with r._ranges_lock:
                if r._ranges is None:
                    r._ranges = [(float(src[c].min()), float(src[c].max())) for c in range(k)]
        for c in range(k):
            vals = None
            for i in range(2):  # the z neighbour outermost, then the in-plane ones: scipy's corner order
                vals = bilinear(moved[c].index_select(0, zs[i]).to(work), wz[i], vals)
            lo_c, hi_c = r._ranges[c]
            out[c] = _round_to(torch.clamp(vals, lo_c, hi_c), src.dtype)
    return out.movedim(1, r.axis + 1)



def _round_to(x, dtype):
    """``x`` (float64) rounded to ``dtype`` to nearest, once, as numpy's ``astype`` does. torch
    converts float64 to float16 through float32, rounding twice (a value just off a float16
    midpoint can land on it); rounding to float32 *to odd* first (of the two float32 neighbours
    of an inexact value, the one whose last bit is 1) keeps the one correct rounding."""
    torch = __import__("torch")
    if x.dtype != torch.float64 or dtype != torch.float16:
        return x.to(dtype)
    x32 = x.to(torch.float32)
    back = x32.to(torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=x.device)
    other = torch.nextafter(x32, torch.where(back < x, inf, -inf))
    odd = (x32.view(torch.int32) & 1) == 1
    return torch.where((back == x) | odd, x32, other).to(dtype)
