"""Choose the torch device at run time: ``auto`` tries CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CHOICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(requested: str = "auto"):
    """Return a ``torch.device``. An unavailable explicit request falls back to the CPU with a
    warning that says why (it never fails a run that the CPU can still do). The choice is also
    reported as a progress event (stage ``device``, ``message`` = :func:`describe`), which the
    Slicer module shows: Slicer's own process never imports torch to find it out."""
    dev = _resolve(requested)
    from .progress import emit_progress

    emit_progress("device", None, message=describe(dev))
    return dev


def describe(dev) -> str:
    """One line naming the device a run uses, e.g. ``GPU: NVIDIA H100 (CUDA 12.8, PyTorch 2.13.0)``."""
    import torch

    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"GPU: {torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda}, PyTorch {torch.__version__})"
    if dev.type == "mps":
        return f"GPU: Apple MPS (PyTorch {torch.__version__})"
    return f"CPU (PyTorch {torch.__version__})"


def _resolve(requested: str):
    import torch

    requested = (requested or "auto").lower()
    if requested not in CHOICES and not requested.startswith("cuda:"):
        raise ValueError(f"unknown device {requested!r}; choose one of {', '.join(CHOICES)}")
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if requested == "auto":
        if cuda_ok:
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not cuda_ok:
        log.warning("CUDA was requested but this PyTorch (%s) sees no CUDA device; running on the CPU "
                    "instead (slower, same results).", torch.__version__)
        return torch.device("cpu")
    if requested == "mps" and not mps_ok:
        log.warning("MPS was requested but is not available here; running on the CPU instead.")
        return torch.device("cpu")
    return torch.device(requested)
