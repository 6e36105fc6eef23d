"""Sliding-window logits of one network on one preprocessed image, by nnU-Net v2's inference scheme.

The result is what ``nnUNetPredictor.predict_sliding_window_return_logits`` gives for the same
network, image, patch size, step and mirroring (tests compare the two bit for bit), computed
here so that inference does not import ``nnunetv2.inference.predict_from_raw_data``: that module
imports ``torch._dynamo`` and with it sympy, about 80 MB of resident memory that per-member
prediction never uses. The scheme (nnU-Net v2's documented inference):

- the image (C, z, y, x) is zero-padded to at least the patch size on every axis
  (``acvl_utils`` ``pad_nd_image``, the padding nnU-Net uses), and the padding is cut off again
  at the end;
- tile origins per axis come from nnU-Net's ``compute_steps_for_sliding_window`` (tiles overlap
  by 1 − step of the patch, the last tile ends at the border); a 2-D configuration (patch with
  one axis fewer than the image) runs the same tiling on every slice along the first axis;
- each tile's logits — with mirroring test-time augmentation, the mean over the tile and its
  flips along every non-empty combination of the allowed axes — are multiplied by nnU-Net's
  Gaussian importance map (``compute_gaussian``: σ = patch / 8, scaled to a peak of 10, float16)
  and added into float16 sums of weighted logits and of weights, on the compute device (on the
  CPU if the device runs out of memory); the logits are the sums' quotient.

Float16 sums, the operation order and CUDA autocast follow nnU-Net, which is why the result is
the same to the bit on the same device.
"""

from __future__ import annotations

import contextlib
import itertools
import logging

import numpy as np

from .. import memory
from ..progress import tick

log = logging.getLogger(__name__)

GAUSSIAN_SIGMA_SCALE = 1.0 / 8
GAUSSIAN_PEAK = 10.0


class LogitOverflowError(RuntimeError):
    """The float16 sums overflowed (infinite logits)."""


def tile_slicers(image_size, patch_size, step: float) -> list[tuple]:
    """Index tuples (channels, then one slice or index per image axis) of every tile, in
    nnU-Net's order (last axis fastest; for a 2-D patch, slice by slice along the first axis)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    image_size, patch_size = tuple(int(s) for s in image_size), tuple(int(p) for p in patch_size)
    if len(patch_size) == len(image_size) - 1:
        steps = compute_steps_for_sliding_window(image_size[1:], patch_size, step)
        return [(slice(None), d, *(slice(a, a + p) for a, p in zip(origin, patch_size)))
                for d in range(image_size[0]) for origin in itertools.product(*steps)]
    if len(patch_size) != len(image_size):
        raise ValueError(f"patch size {patch_size} does not fit an image of {len(image_size)} axes")
    steps = compute_steps_for_sliding_window(image_size, patch_size, step)
    return [(slice(None), *(slice(a, a + p) for a, p in zip(origin, patch_size)))
            for origin in itertools.product(*steps)]


def predict_tile(network, x, mirror_axes=None, flip=None):
    """Logits of one tile batch ``x`` (1, C, ...); with ``mirror_axes`` (spatial axes, 0-based)
    the mean over ``x`` and its flips along every non-empty combination of those axes; with
    ``flip`` (spatial axes) the logits of ``x`` flipped along them, flipped back (one TTA member)."""
    import torch

    if flip:
        if mirror_axes:
            raise ValueError("a tile is either one mirrored member (flip) or nnU-Net's mirrored mean")
        axes = [int(a) + 2 for a in flip]
        return torch.flip(network(torch.flip(x, axes)), axes)
    prediction = network(x)
    if mirror_axes:
        if max(mirror_axes) > x.ndim - 3:
            raise ValueError(f"mirror axes {tuple(mirror_axes)} do not fit a {x.ndim - 2}-D patch")
        axes = [int(a) + 2 for a in mirror_axes]
        combinations = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
        for flip in combinations:
            prediction += torch.flip(network(torch.flip(x, flip)), flip)
        prediction /= len(combinations) + 1
    return prediction


def sliding_window_logits(network, image, patch_size, n_outputs: int, device, step: float = 0.5,
                          mirror_axes=None, flip=None, mc_dropout: bool = False):
    """Logits (n_outputs, *image.shape[1:]) float16 of ``network`` on ``image`` (a (C, ...)
    float32 tensor in nnU-Net's preprocessed space), on ``device`` (torch.device); see the
    module docstring. ``mirror_axes``: None for no test-time augmentation. ``flip``: every tile
    mirrored along these spatial axes (one TTA member, ``single_model_members``). ``mc_dropout``:
    the network's dropout layers stay active (one MC-dropout pass; seed the RNG before)."""
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    network = network.to(device)
    network.eval()
    if mc_dropout:
        from .single_model_members import enable_mc_dropout

        enable_mc_dropout(network)
    autocast = torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        data, revert = pad_nd_image(image, tuple(patch_size), "constant", {"value": 0}, True, None)
        slicers = tile_slicers(data.shape[1:], patch_size, step)
        if device.type == "cpu":
            logits = _accumulate(network, data, slicers, patch_size, n_outputs, device, device, mirror_axes, flip)
        else:
            try:
                logits = _accumulate(network, data, slicers, patch_size, n_outputs, device, device, mirror_axes,
                                     flip)
            except LogitOverflowError:
                raise
            except RuntimeError as e:  # out of device memory: keep the sums on the CPU
                log.warning("sums of the sliding window do not fit on %s (%s); keeping them on the CPU",
                            device, str(e).splitlines()[0] if str(e) else type(e).__name__)
                _empty_cache(device)
                logits = _accumulate(network, data, slicers, patch_size, n_outputs, device,
                                     torch.device("cpu"), mirror_axes, flip)
        _empty_cache(device)
        if mc_dropout:
            network.eval()
        return logits[(slice(None), *revert[1:])]


def _accumulate(network, data, slicers, patch_size, n_outputs, device, results_device, mirror_axes, flip=None):
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    data = data.to(results_device)
    if results_device.type == "cpu":  # on their own memory mappings, freed whole (memory.py)
        logits = torch.from_numpy(memory.zeros((int(n_outputs), *data.shape[1:]), np.float16))
        weights = torch.from_numpy(memory.zeros(tuple(data.shape[1:]), np.float16))
    else:
        logits = torch.zeros((int(n_outputs), *data.shape[1:]), dtype=torch.half, device=results_device)
        weights = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
    gaussian = compute_gaussian(tuple(int(p) for p in patch_size), sigma_scale=GAUSSIAN_SIGMA_SCALE,
                                value_scaling_factor=GAUSSIAN_PEAK, device=results_device)
    for i, sl in enumerate(slicers):
        tick("patch", i, len(slicers))  # progress.tick: the patch about to run (a live display's ETA)
        x = torch.clone(data[sl][None], memory_format=torch.contiguous_format).to(device)
        prediction = predict_tile(network, x, mirror_axes, flip)[0].to(results_device)
        del x
        prediction *= gaussian
        logits[sl] += prediction
        weights[sl[1:]] += gaussian
        del prediction
    tick("patch", len(slicers), len(slicers))
    torch.div(logits, weights, out=logits)
    if torch.any(torch.isinf(logits)):
        raise LogitOverflowError("infinite logits in the sliding-window sums (float16 overflow); the network's "
                           "outputs are too large for nnU-Net's float16 accumulation")
    return logits


def _empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
