"""Pixel-wise ECE with a false-positive penalty, pECE ("We Care Each Pixel"; METHODS.md §3).

    pECE = Σ_b (n_b / N) · |(conf_b − acc_b) + λ · conf_b^FP|,   λ = 2, B = 10 equal-width bins.

Which confidence is binned: the binary foreground/background view. For every evaluated voxel
conf = p_fg = 1 − p_0 (the probability of *any* foreground class) and correct = [y ≠ 0].
With ``cls=c`` the view is one class against the rest instead: conf = p_c, correct = [y = c].
Bins are the ECE bins of ``metrics.ece`` ([b/B, (b+1)/B), last bin closed at 1.0).

conf_b the mean conf of bin b, acc_b the fraction of its voxels that are foreground, and
conf_b^FP the mean foreground confidence over bin b's *background* voxels (y = 0, resp. y ≠ c):
Σ_{x∈b, y=0} conf(x) / #{x∈b : y=0}, taken as 0 when bin b has no background voxel. The penalty
grows when confident foreground is predicted on background, which plain ECE can cancel out.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._inputs import finite_number, probs_and_labels
from .ece import bin_index, check_n_bins

PECE_BINS = 10
PECE_LAMBDA = 2.0


def pece_from_confidences(conf, is_fg, n_bins: int = PECE_BINS, lam: float = PECE_LAMBDA) -> float:
    """pECE from flat foreground confidences ``conf`` and binary foreground truth ``is_fg``."""
    lam = finite_number(lam, "pECE lambda", 0.0)
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    is_fg = np.asarray(is_fg).reshape(-1)
    if conf.shape != is_fg.shape:
        raise InputError(f"confidence {conf.shape} and foreground truth {is_fg.shape} must have the same size")
    if conf.size == 0:
        raise InputError("no voxels to evaluate for pECE")
    if not np.all(np.isfinite(conf)) or conf.min() < -1e-3 or conf.max() > 1 + 1e-3:
        raise InputError("foreground confidences must be finite probabilities in [0, 1]")
    conf = np.clip(conf, 0.0, 1.0)
    is_fg = is_fg.astype(bool)
    n_bins = check_n_bins(n_bins)
    idx = bin_index(conf, n_bins)
    n_b = np.bincount(idx, minlength=n_bins)
    s_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    s_acc = np.bincount(idx, weights=is_fg.astype(np.float64), minlength=n_bins)
    bg = ~is_fg
    n_bg = np.bincount(idx[bg], minlength=n_bins)
    s_conf_bg = np.bincount(idx[bg], weights=conf[bg], minlength=n_bins)
    ne = n_b > 0
    conf_b = s_conf[ne] / n_b[ne]
    acc_b = s_acc[ne] / n_b[ne]
    fp_b = np.where(n_bg[ne] > 0, s_conf_bg[ne] / np.maximum(n_bg[ne], 1), 0.0)
    return float(np.sum(n_b[ne] / conf.size * np.abs(conf_b - acc_b + lam * fp_b)))


def pece(probs, labels, mask=None, n_bins: int = PECE_BINS, lam: float = PECE_LAMBDA,
         cls: int | None = None) -> float:
    """pECE of ``probs (K, ...)`` against ``labels`` inside ``mask`` (module docstring).

    ``cls=None``: foreground/background view, conf = 1 − p_0; ``cls=c``: class c against the rest.
    """
    p, y = probs_and_labels(probs, labels, mask)
    if cls is None:
        conf = 1.0 - p[0].astype(np.float64)
        is_fg = y != 0
    else:
        if not 1 <= cls < p.shape[0]:
            raise InputError(f"cls must be a foreground class 1..{p.shape[0] - 1}, got {cls}")
        conf = p[cls].astype(np.float64)
        is_fg = y == cls
    return pece_from_confidences(conf, is_fg, n_bins=n_bins, lam=lam)
