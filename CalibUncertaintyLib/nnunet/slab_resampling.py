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
