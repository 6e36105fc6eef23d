"""One member's softmax probabilities in the input image's grid, computed slab by slab from its logits.

nnU-Net's export (``convert_predicted_logits_to_segmentation_with_correct_shape`` with
``return_probabilities=True``) turns a member's logits into the probabilities it saves with
``--save_probabilities``: logits resampled to the original spacing with the configuration's
``resampling_fn_probabilities``, the label manager's softmax, the result put back into the crop
box with background probability 1 outside it, axes transposed back to the image's order.

``MemberProbabilities`` does the same with less memory: the logits stay on the network grid and
are resampled one output z slab at a time when the slab is read (``slab_resampling``: nnU-Net's
interpolation reproduced per slab, bit for bit in the separate-z case, to float64 rounding in
the trilinear one), and the softmax, crop re-insertion and transposition run on that slab. Where
``slab_resampling`` cannot reproduce the configuration's resampling (cubic without separate z, a
custom function), every class channel is resampled as a whole by nnU-Net's function, one channel
at a time (channels are independent, so the values are equal; only one channel is ever float64). The accumulator
(``uncertainty.streaming.EnsembleAccumulator.add``) reads members slab by slab (once: a member
whose logits are finite is a softmax by construction and ``valid_probabilities`` lets the
accumulator skip its validation pass), so a member's
full float32 probability volume never exists in ``predict``: only its logits (float16, half that
size, and already there). ``to_array()`` gives the whole volume for callers that keep members.

Softmax acts on each voxel's K values alone, so slabs give nnU-Net's numbers; the vectorised
kernel may round the last float32 bit of a slab's short tail differently (tests).
"""

from __future__ import annotations

import numpy as np

from .. import memory
from ..uncertainty.streaming import DEFAULT_SLAB_VOXELS, z_slabs


def crop_box_fits(properties: dict, shape_zyx, transpose_forward) -> bool:
    """True when nnU-Net's crop box (``properties``) lies inside the image of ``shape_zyx``, as
    nnU-Net's own cropping always gives; otherwise use nnU-Net's export as it is."""
    shape_crop = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    internal_shape = tuple(int(shape_zyx[i]) for i in transpose_forward)
    bbox = [[int(a), int(b)] for a, b in properties["bbox_used_for_cropping"]]
    return (internal_shape == tuple(int(s) for s in properties["shape_before_cropping"]) and len(bbox) == 3
            and all(0 <= a <= b <= n and b - a == m for (a, b), n, m in zip(bbox, internal_shape, shape_crop)))


class MemberProbabilities:
    """Probabilities (K, z, y, x) float32 of one member, computed per z slab on demand.

    ``logits``: torch tensor (K, ...) in nnU-Net's transposed, cropped, preprocessed space (as the
    sliding window returns it). ``properties``: nnU-Net's data properties of the case (spacing,
    crop box, shapes). ``shape_zyx``: the input image's shape. Pass ``logits`` without keeping
    another reference and they are freed as soon as they are resampled. The crop box must fit
    (``crop_box_fits``).
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, logits, plans_manager, configuration_manager, label_manager, properties: dict, shape_zyx,
                 backend=None):
        import torch

        from ..uncertainty.backend import NUMPY

        #: where the slabs are computed: numpy (host, the CPU path) or torch on the logits' device
        #: (``uncertainty.backend``; ``slab()`` then returns a device tensor)
        self.backend = backend or NUMPY
        if not crop_box_fits(properties, shape_zyx, plans_manager.transpose_forward):
            raise ValueError("nnU-Net's crop box does not lie inside the image; use nnU-Net's export")
        self._nonlin = label_manager.inference_nonlin
        self._background_outside = 0.0 if label_manager.has_regions else 1.0
        self._torch = torch
        shape_crop = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
        spacing_t = [properties["spacing"][i] for i in plans_manager.transpose_forward]
        cm = configuration_manager
        current = cm.spacing if len(cm.spacing) == len(shape_crop) else [spacing_t[0], *cm.spacing]
        self._resampler = None
        if tuple(logits.shape[1:]) != shape_crop:
            from .slab_resampling import SlabResampler

            self._resampler = SlabResampler.create(cm.resampling_fn_probabilities, tuple(logits.shape[1:]),
                                                   shape_crop, current, spacing_t,
                                                   axis=int(plans_manager.transpose_backward[0]))
        from .slab_resampling import device_supported

        same_grid = tuple(logits.shape[1:]) == shape_crop
        # on the device: softmax (and resampling, when the device path reproduces it) of each slab
        on_device = self.backend.is_torch and (device_supported(self._resampler) if self._resampler is not None
                                               else same_grid)
        if on_device:
            logits = self.backend.put(logits)
        elif self._resampler is not None:  # resampled one slab at a time on the host, when the slab is read
            logits = logits.cpu() if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
        elif not same_grid:
            src = logits.cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
            del logits
            resampled = memory.empty((src.shape[0],) + shape_crop, src.dtype)
            for c in range(src.shape[0]):
                resampled[c] = cm.resampling_fn_probabilities(src[c:c + 1], shape_crop, current, spacing_t)[0]
            del src
            logits = torch.from_numpy(resampled)
        elif isinstance(logits, torch.Tensor):
            logits = logits.cpu()
        else:
            logits = torch.from_numpy(np.asarray(logits))
        self._on_device = on_device
        self._logits = logits
        # softmax of finite logits is a valid probability vector by construction, so the
        # accumulator may skip its validation pass (``EnsembleAccumulator.add``); non-finite
        # logits (a diverged network) are left to that validation and its error message
        # (checked one channel at a time: on float16 CPU tensors the check makes a float32 copy)
        self.valid_probabilities = all(bool(torch.isfinite(logits[c]).all()) for c in range(logits.shape[0]))
        self.n_classes = int(logits.shape[0])
        self.shape = (self.n_classes,) + tuple(int(s) for s in shape_zyx)
        self._forward = [int(i) for i in plans_manager.transpose_forward]
        self._backward = [int(i) for i in plans_manager.transpose_backward]
        self._bbox = [[int(a), int(b)] for a, b in properties["bbox_used_for_cropping"]]

    # --- slabs ---------------------------------------------------------------------------------
    def slab(self, sl: slice) -> np.ndarray:
        """Probabilities of output z slices ``sl`` (step 1): (K, dz, y, x) float32."""
        if self._logits is None:
            raise RuntimeError("this member's logits were released")
        if self.backend.is_torch:
            return self._device_slab(sl)
        z0, z1, _ = sl.indices(self.shape[1])
        out = np.empty((self.n_classes, z1 - z0) + self.shape[2:], dtype=np.float32)
        out[0] = self._background_outside  # outside the crop box: background 1; a region model's 0
        out[1:] = 0.0
        # ``view``: ``out`` in nnU-Net's axis order; output z is internal axis ``axis``
        view = out.transpose([0] + [i + 1 for i in self._forward])
        axis = self._backward[0]
        where = self._crop_indices(z0, z1)
        if where is None:
            return out  # the slab lies outside the crop box: background only
        index, source = where
        if self._resampler is not None:
            src = source[axis + 1]
            block = self._torch.from_numpy(self._resampler.block(self._logits.numpy(), src.start, src.stop))
            source[axis + 1] = slice(None)
        else:
            block = self._logits
        with self._torch.inference_mode():
            probs = self._nonlin(block[tuple(source)].float())
            view[tuple(index)] = probs.numpy()
        return out

    def _crop_indices(self, z0: int, z1: int):
        """(index into the output slab in nnU-Net's axis order, index into the logits) of the crop
        box's part of output slices z0:z1, or None when the slab lies outside the crop box."""
        axis = self._backward[0]
        index = [slice(None)] * 4
        source = [slice(None)] * 4
        for ax, (a, b) in enumerate(self._bbox):
            if ax == axis:
                lo, hi = max(a, z0), min(b, z1)
                if lo >= hi:
                    return None
                index[ax + 1] = slice(lo - z0, hi - z0)
                source[ax + 1] = slice(lo - a, hi - a)
            else:
                index[ax + 1] = slice(a, b)
        return index, source

    def _device_slab(self, sl: slice):
        """``slab`` computed by torch on the backend's device: the same steps (crop box, nnU-Net's
        resampling per slab, the label manager's softmax, transposition) as the host path,
        resampling in float64 where the device has it; a device tensor (K, dz, y, x) float32. A
        resampling the device path does not reproduce ran on the host (``device_supported``)."""
        from .slab_resampling import block_device

        be = self.backend
        torch = be.torch
        z0, z1, _ = sl.indices(self.shape[1])
        out = torch.zeros((self.n_classes, z1 - z0) + self.shape[2:], dtype=torch.float32, device=be.device)
        out[0] = self._background_outside
        view = out.permute([0] + [i + 1 for i in self._forward])
        axis = self._backward[0]
        where = self._crop_indices(z0, z1)
        if where is None:
            return out
        index, source = where
        if self._resampler is not None:
            src = source[axis + 1]
            if self._on_device:
                block = block_device(self._resampler, be, self._logits, src.start, src.stop)
            else:
                block = be.put(self._resampler.block(self._logits.numpy(), src.start, src.stop))
            source[axis + 1] = slice(None)
        else:
            block = self._logits if self._on_device else be.put(self._logits[tuple(source)])
            if not self._on_device:
                source = [slice(None)] * 4
        with torch.inference_mode():
            view[tuple(index)] = self._nonlin(block[tuple(source)].float())
        return out

    def slabs(self, slab_voxels: int = DEFAULT_SLAB_VOXELS):
        """Yield (slice, slab array) over the whole volume."""
        for sl in z_slabs(self.shape[1:], slab_voxels):
            yield sl, self.slab(sl)

    def to_array(self) -> np.ndarray:
        """The whole volume (K, z, y, x) float32 (host)."""
        out = memory.empty(self.shape, np.float32)
        for sl, values in self.slabs():
            out[:, sl] = values.cpu().numpy() if self.backend.is_torch else values
        return out

    def __array__(self, dtype=None, copy=None):
        a = self.to_array()
        return a if dtype is None else a.astype(dtype, copy=False)

    def release(self) -> None:
        """Drop the logits (the object is unusable afterwards)."""
        self._logits = None
