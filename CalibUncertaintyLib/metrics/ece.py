"""Expected / maximum / adaptive calibration error and the reliability table (METHODS.md §3).

Binning (METHODS §3, equal width, default B = 15): bin b holds confidences in [b/B, (b+1)/B);
the last bin is closed at 1.0, so a confidence of exactly 1.0 falls in bin B-1. Bin edges are
the floats ``b / B``; a confidence is placed with ``searchsorted`` against them, never with
``floor(conf * B)`` (which misplaces some values next to an edge).

- ECE = Σ_b (n_b / N) · |acc_b − conf_b|, conf_b the mean confidence and acc_b the mean
  correctness of bin b's voxels. Two flavours:
  * top-label: conf = max_c p_c, correct = [argmax_c p_c = y]  (``top_label_ece``);
  * foreground, binary per class c: conf = p_c, correct = [y = c]  (``foreground_ece``).
- MCE = max over non-empty bins of |acc_b − conf_b|.
- ACE = unweighted mean over equal-mass bins of |acc_b − conf_b|: voxels sorted by confidence
  (stable sort, ties kept in input order) and cut into B runs of ⌊N/B⌋ or ⌈N/B⌉ voxels (run j
  holds sorted positions ⌊jN/B⌋ … ⌊(j+1)N/B⌋ − 1); empty runs (N < B) are skipped.
- Soft labels: ``correct`` may hold values in [0, 1] (a soft reference, e.g. the mean of
  raters); acc_b is then the mean soft label of the bin. This is how multi-rater ECE against the
  soft reference is defined (METHODS §3, multi-rater).

Differences from the reference libraries (tested in Testing/Python/test_metrics_calibration.py):
torchmetrics bins with the same left-closed intervals but puts p = 1.0 in an extra bin of its
own, and its *binary* calibration error uses p(y=1) as confidence (= our foreground flavour for
class 1, not top-label). netcal defaults to 10 bins and clips confidences to (eps, 1 − eps).
On data away from the bin edges (and without p = 1.0) all three agree.

Everything is one pass of ``np.bincount`` (O(N)) plus, for ACE only, one sort (O(N log N)).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._inputs import flat_confidence, probs_and_labels

DEFAULT_BINS = 15


def check_n_bins(n_bins) -> int:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def bin_edges(n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """The B + 1 equal-width edges b / B, b = 0..B."""
    n_bins = check_n_bins(n_bins)
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def bin_index(conf: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Bin of each confidence: b such that b/B ≤ conf < (b+1)/B; conf = 1.0 goes to bin B-1."""
    edges = bin_edges(n_bins)
    idx = np.searchsorted(edges, np.asarray(conf, dtype=np.float64), side="right") - 1
    return np.clip(idx, 0, n_bins - 1)


def bin_sums(conf, correct, n_bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, Σ confidence, Σ correctness) for equal-width bins (arrays of length B)."""
    conf, correct = flat_confidence(conf, correct)
    n_bins = check_n_bins(n_bins)
    idx = bin_index(conf, n_bins)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    s_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    s_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    return counts, s_conf, s_acc


def expected_calibration_error(conf, correct, n_bins: int = DEFAULT_BINS) -> float:
    """ECE = Σ_b (n_b/N)·|acc_b − conf_b| over equal-width bins (see module docstring)."""
    counts, s_conf, s_acc = bin_sums(conf, correct, n_bins)
    return float(np.sum(np.abs(s_acc - s_conf)) / counts.sum())


def maximum_calibration_error(conf, correct, n_bins: int = DEFAULT_BINS) -> float:
    """MCE = max over non-empty equal-width bins of |acc_b − conf_b|."""
    counts, s_conf, s_acc = bin_sums(conf, correct, n_bins)
    ne = counts > 0
    return float(np.max(np.abs(s_acc[ne] - s_conf[ne]) / counts[ne]))


def adaptive_calibration_error(conf, correct, n_bins: int = DEFAULT_BINS) -> float:
    """ACE = unweighted mean over B equal-mass bins of |acc_b − conf_b| (module docstring)."""
    conf, correct = flat_confidence(conf, correct)
    n_bins = check_n_bins(n_bins)
    n = conf.size
    order = np.argsort(conf, kind="stable")
    starts = np.unique((np.arange(n_bins) * n) // n_bins)
    starts = starts[starts < n]
    sizes = np.diff(np.append(starts, n))
    m_conf = np.add.reduceat(conf[order], starts) / sizes
    m_acc = np.add.reduceat(correct[order], starts) / sizes
    return float(np.mean(np.abs(m_acc - m_conf)))


def reliability_table(conf, correct, n_bins: int = DEFAULT_BINS) -> list[dict]:
    """Rows a reliability diagram draws, one per equal-width bin (empty bins included).

    Each row: ``{"bin", "lo", "hi", "count", "mean_confidence", "accuracy", "gap"}`` with
    ``gap = mean_confidence − accuracy`` (> 0: over-confident). For an empty bin the last three
    are None. ``accuracy`` is the mean soft label when ``correct`` holds soft labels.
    """
    counts, s_conf, s_acc = bin_sums(conf, correct, n_bins)
    edges = bin_edges(n_bins)
    rows = []
    for b in range(len(counts)):
        n = int(counts[b])
        mc = float(s_conf[b] / n) if n else None
        acc = float(s_acc[b] / n) if n else None
        rows.append({"bin": b, "lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                     "mean_confidence": mc, "accuracy": acc, "gap": (mc - acc) if n else None})
    return rows


# --- from probability volumes ------------------------------------------------------------

def _top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.argmax(p, axis=0)
    conf = p[pred, np.arange(y.size)]
    return conf, (pred == y)


def top_label_confidence(probs, labels, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Flat (conf = max_c p_c, correct = [argmax = y]) inside ``mask`` (the top-label view)."""
    return _top_label(*probs_and_labels(probs, labels, mask))


def class_confidence(probs, labels, cls: int, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Flat (conf = p_c, correct = [y = c]) inside ``mask`` (the binary foreground view of class c)."""
    p, y = probs_and_labels(probs, labels, mask)
    if not 0 <= cls < p.shape[0]:
        raise InputError(f"class {cls} is not one of the K={p.shape[0]} probability channels")
    return p[cls], (y == cls)


def top_label_ece(probs, labels, mask=None, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE of ``probs (K, ...)`` against ``labels (...)`` inside ``mask``."""
    return expected_calibration_error(*top_label_confidence(probs, labels, mask), n_bins=n_bins)


def foreground_ece(probs, labels, mask=None, n_bins: int = DEFAULT_BINS, classes=None) -> dict[int, float]:
    """Foreground ECE per class c (conf = p_c, correct = [y = c]); ``classes`` defaults to 1..K-1."""
    p, y = probs_and_labels(probs, labels, mask)
    classes = range(1, p.shape[0]) if classes is None else classes
    out = {}
    for c in classes:
        if not 0 <= c < p.shape[0]:
            raise InputError(f"class {c} is not one of the K={p.shape[0]} probability channels")
        out[int(c)] = expected_calibration_error(p[c], y == c, n_bins=n_bins)
    return out


def calibration_errors(probs, labels, mask=None, n_bins: int = DEFAULT_BINS) -> dict:
    """Top-label ECE, MCE, ACE and reliability table plus foreground ECE per class, in one call.

    Returns ``{"n_voxels", "n_bins", "ece_top", "mce_top", "ace_top", "reliability_top",
    "ece_fg": {c: ece}}``.
    """
    p, y = probs_and_labels(probs, labels, mask)
    conf, correct = _top_label(p, y)
    return {"n_voxels": int(y.size), "n_bins": int(n_bins),
            "ece_top": expected_calibration_error(conf, correct, n_bins),
            "mce_top": maximum_calibration_error(conf, correct, n_bins),
            "ace_top": adaptive_calibration_error(conf, correct, n_bins),
            "reliability_top": reliability_table(conf, correct, n_bins),
            "ece_fg": {c: expected_calibration_error(p[c], y == c, n_bins) for c in range(1, p.shape[0])}}
