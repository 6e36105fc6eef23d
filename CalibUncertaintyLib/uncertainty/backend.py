"""Where the per-voxel arithmetic of the ensemble sums and the maps runs: numpy, or torch on a device.

One pipeline, two array backends (issue 19). The sums (``streaming.EnsembleAccumulator``) and
every finished map are host numpy arrays whatever the backend; the backend decides where each
z slab's arithmetic runs:

- ``NUMPY`` (the CPU path): the numpy kernels of ``streaming``, ``measures``, ``maps``,
  ``distance_aware`` and ``ebcu``, unchanged.
- ``TorchBackend(device)``: the same definitions in torch (``torch_kernels``) on CUDA, MPS or the
  CPU. A slab of the sums goes to the device, is updated or turned into a map slab there, and
  comes back; a member whose logits are on the device (``nnunet.member_probabilities``) is
  resampled, softmaxed and accumulated there, so its probabilities never reach the host. Device
  memory: the member's logits (nnU-Net's own sliding window holds as much) plus a few slab
  temporaries of ``slab_voxels`` voxels per class; DAE's distance box and EBCU's excess box (at
  most one float32 volume each) for the spatial maps.

``backend_for(device)`` gives the backend a run uses: numpy for the CPU (the CPU path stays
bit for bit what it was), torch for CUDA and MPS. The torch backend gives the numpy backend's
numbers to float32 precision (``Testing/Python/test_device_backend.py`` runs it on the CPU
against the numpy path, map by map).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

ENV_DISABLE = "CALIBU_DEVICE_MAPS"
"""``0``: keep the maps on the CPU (numpy) even when the model runs on a GPU. ``cpu``: run the
torch backend on the CPU as well (for dry runs of the device path, e.g. ``bench/gpu_check.sh --cpu``)."""

DEVICE_SLAB_VOXELS = 1 << 20
"""Voxels per z slab on a device (4 slices of 512 x 512): few kernel launches, small temporaries."""


class NumpyBackend:
    """The CPU path: numpy kernels, host arrays (module doc)."""

    name = "numpy"
    is_torch = False
    device = None

    def __repr__(self) -> str:
        return "NumpyBackend()"


NUMPY = NumpyBackend()


class TorchBackend:
    """Torch kernels on ``device`` (module doc). ``put`` / ``get`` move arrays to and from it."""

    name = "torch"
    is_torch = True

    def __init__(self, device="cpu", slab_voxels: int = DEVICE_SLAB_VOXELS):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.slab_voxels = int(slab_voxels)
        # float64 where the device has it (not MPS): resampling logits as nnU-Net does in float64
        self.float64 = self.device.type != "mps"

    def __repr__(self) -> str:
        return f"TorchBackend({str(self.device)!r})"

    def put(self, a, dtype=None):
        """``a`` (numpy array or tensor) as a tensor on the device (a copy unless already there)."""
        torch = self.torch
        if isinstance(a, torch.Tensor):
            return a.to(device=self.device, dtype=dtype)
        a = np.asarray(a)
        if not a.flags.writeable:  # a read-only view of the sums: only read here (kernels never write inputs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(a)
        else:
            t = torch.from_numpy(a)
        return t.to(device=self.device, dtype=dtype)

    def get(self, t, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``t`` as a host numpy array, written into ``out`` when given."""
        a = t.detach().to("cpu").numpy()
        if out is None:
            return a
        out[...] = a
        return out

    def f32(self, x: float) -> float:
        """A Python float rounded to float32 (the numpy path's ``np.float32`` scalars)."""
        return float(np.float32(x))


def device_maps_enabled() -> bool:
    return os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def _forced_on_cpu() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() == "cpu"


def backend_for(device) -> NumpyBackend | TorchBackend:
    """The backend for a run whose model runs on ``device`` (a torch device or its name; None =
    CPU): numpy on the CPU, torch on CUDA / MPS (unless ``CALIBU_DEVICE_MAPS=0``; with
    ``CALIBU_DEVICE_MAPS=cpu`` torch on the CPU too)."""
    if device is None:
        return NUMPY
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cpu" and _forced_on_cpu():
        return TorchBackend("cpu")
    if kind == "cpu" or not device_maps_enabled():
        return NUMPY
    return TorchBackend(device)


def backend_of(obj) -> NumpyBackend | TorchBackend:
    """The backend an object (an accumulator, a member) carries, numpy when it has none."""
    return getattr(obj, "backend", None) or NUMPY
