"""Negative log-likelihood and multi-class Brier score over voxels (METHODS.md §3).

Both take class probabilities ``probs (K, ...)``, integer ``labels (...)`` and an optional boolean
``mask (...)`` (the voxels to evaluate; METHODS evaluates inside the ROI by default, the caller
passes it). Means are over the selected voxels.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._inputs import finite_number, probs_and_labels

#: Clamp inside logs (METHODS notation ε; same value as ``uncertainty.streaming.EPS``).
EPS = 1e-12


def nll(probs, labels, mask=None, eps: float = EPS) -> float:
    """NLL = mean over voxels of −log p_y, with p_y clamped to at least ``eps`` (natural log).

    Equals scikit-learn's ``log_loss(labels, probs.T)`` when no probability is below ``eps``
    (sklearn clips at its own machine epsilon). ``eps`` must lie in (0, 1): 0 would give an
    infinite NLL for one wrong, fully confident voxel.
    """
    eps = finite_number(eps, "eps", 0.0, 1.0, low_open=True)
    p, y = probs_and_labels(probs, labels, mask)
    p_true = p[y, np.arange(y.size)].astype(np.float64)
    return float(-np.mean(np.log(np.maximum(p_true, eps))))


def brier(probs, labels, mask=None) -> float:
    """Multi-class Brier score: mean over voxels of Σ_c (p_c − y_c)², y one-hot (range 0..2).

    Computed as Σ_c p_c² − 2 p_y + 1 per voxel. For K = 2 this is exactly 2× the binary Brier
    score of scikit-learn's ``brier_score_loss(y == 1, p_1)`` (both classes contribute the same
    squared error); tables state which one they show (``binary_brier`` gives sklearn's).
    """
    p, y = probs_and_labels(probs, labels, mask)
    n = y.size
    sq = np.einsum("kn,kn->n", p, p, dtype=np.float64)
    p_true = p[y, np.arange(n)].astype(np.float64)
    return float(np.mean(sq - 2.0 * p_true + 1.0))


def binary_brier(probs, labels, mask=None, positive_class: int = 1) -> float:
    """One-vs-rest binary Brier: mean of (p_c − [y = c])² for ``positive_class`` c.

    For K = 2 and c = 1 this is scikit-learn's ``brier_score_loss`` and half of ``brier``.
    """
    p, y = probs_and_labels(probs, labels, mask)
    if not 0 <= positive_class < p.shape[0]:
        raise InputError(f"positive_class {positive_class} is not a class index of K={p.shape[0]} classes")
    pc = p[positive_class].astype(np.float64)
    return float(np.mean((pc - (y == positive_class)) ** 2))
