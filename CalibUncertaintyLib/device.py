"""Choose the torch device at run time: ``auto`` tries CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CHOICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(requested: str = "auto"):
    """Return a ``torch.device``. An unavailable explicit request falls back to the CPU with a
    warning that says why (it never fails a run that the CPU can still do)."""
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
