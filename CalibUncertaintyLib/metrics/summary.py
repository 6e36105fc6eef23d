"""One call for every calibration number of METHODS.md §3 on one case (or pooled voxels).

``calibration_summary`` returns NLL, the multi-class Brier score (and the binary one for
K = 2), top-label ECE / MCE / ACE with the reliability table, foreground ECE per class and
pECE, all over the same voxels (``mask``: the ROI; pass None for the whole-image numbers and
label them so). Definitions are those of ``nll_brier``, ``ece`` and ``pece``.
"""

from __future__ import annotations

from .ece import DEFAULT_BINS, calibration_errors
from .nll_brier import binary_brier, brier, nll
from .pece import PECE_BINS, PECE_LAMBDA, pece


def calibration_summary(probs, labels, mask=None, n_bins: int = DEFAULT_BINS, pece_bins: int = PECE_BINS,
                        pece_lambda: float = PECE_LAMBDA) -> dict:
    """``{"n_voxels", "nll", "brier_multiclass", "brier_binary" (K = 2 only, else None), "ece_top",
    "mce_top", "ace_top", "reliability_top", "ece_fg", "pece", "n_bins", "pece_bins"}``."""
    out = calibration_errors(probs, labels, mask, n_bins)
    k = len(probs)
    out.update(nll=nll(probs, labels, mask), brier_multiclass=brier(probs, labels, mask),
               brier_binary=binary_brier(probs, labels, mask) if k == 2 else None,
               pece=pece(probs, labels, mask, n_bins=pece_bins, lam=pece_lambda), pece_bins=int(pece_bins))
    return out
