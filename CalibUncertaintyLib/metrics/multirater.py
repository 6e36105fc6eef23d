"""Multi-rater evaluation in the style of the CURVAS challenge (METHODS.md §3, multi-rater).

For one structure (binary view) with R ≥ 2 raters r_1..r_R (0/1 masks on the image grid):

- Soft reference s(x) = (1/R) Σ_r r_r(x) ∈ {0, 1/R, …, 1}.
- Consensus = voxels where all raters agree (all foreground or all background);
  dissensus = the rest (0 < s < 1). Consensus foreground = {s = 1}.
- Dice on the consensus region: Dice(pred ∩ C, {s = 1}) with C the consensus region, pred the
  predicted foreground (default p_fg > 0.5). Empty-vs-empty is 1.0 with flags (METHODS §3).
- ECE (foreground flavour, conf = p_fg, equal-width bins of ``metrics.ece``) against each
  rater (correct = rater label) and against the soft reference, where the bin accuracy is
  replaced by the mean soft label of the bin's voxels.
- Volume CRPS: predicted volume V = Σ_x p_fg(x) · voxel volume (mm³, inside ``mask`` when
  given). The raters' volumes v_r (same region) are fitted with a normal N(μ, σ²) by maximum
  likelihood (μ = mean, σ = population standard deviation, ddof = 0). Its CRPS at V is the
  closed form σ · [z(2Φ(z) − 1) + 2φ(z) − 1/√π], z = (V − μ)/σ (in mm³; lower is better).
  When all raters' volumes are equal σ = 0, the fitted normal is degenerate and the CRPS is
  reported as undefined: value None with the reason.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from ._inputs import as_bool, flat_mask
from .dice import dice_masks
from .ece import DEFAULT_BINS, expected_calibration_error


def stack_raters(raters) -> np.ndarray:
    """(R, ...) boolean stack from a list of 0/1 masks or an (R, ...) array; needs R ≥ 2."""
    if isinstance(raters, np.ndarray):
        arrs = [raters[i] for i in range(raters.shape[0])]
    else:
        arrs = list(raters)
    if len(arrs) < 2:
        raise InputError(f"multi-rater metrics need at least 2 raters, got {len(arrs)}")
    shapes = {np.shape(a) for a in arrs}
    if len(shapes) != 1:
        raise InputError(f"rater masks must share one voxel grid, got shapes {sorted(shapes)}")
    return np.stack([as_bool(a, f"rater {i + 1} mask") for i, a in enumerate(arrs)])


def soft_reference(raters) -> np.ndarray:
    """Mean of the raters' masks, float32 in [0, 1]."""
    st = stack_raters(raters)
    return (st.sum(axis=0, dtype=np.int32) / st.shape[0]).astype(np.float32)


def consensus_regions(raters) -> dict[str, np.ndarray]:
    """``{"consensus", "dissensus", "consensus_fg", "consensus_bg"}`` boolean volumes."""
    st = stack_raters(raters)
    votes = st.sum(axis=0, dtype=np.int32)
    fg = votes == st.shape[0]
    bg = votes == 0
    return {"consensus": fg | bg, "dissensus": ~(fg | bg), "consensus_fg": fg, "consensus_bg": bg}


def crps_normal(x: float, mu: float, sigma: float) -> float:
    """CRPS of N(mu, sigma²) at x: σ[z(2Φ(z) − 1) + 2φ(z) − 1/√π], z = (x − mu)/σ; needs σ > 0."""
    if not sigma > 0:
        raise InputError(f"CRPS of a normal needs sigma > 0, got {sigma}")
    z = (x - mu) / sigma
    cdf = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return sigma * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))


def volume_crps(predicted_volume: float, rater_volumes) -> dict:
    """CRPS of ``predicted_volume`` against a normal fitted (ML) to ``rater_volumes`` (module docstring).

    Returns ``{"crps", "mu", "sigma", "predicted_volume", "defined", "reason"}``; when all
    rater volumes are equal ``crps`` is None, ``defined`` False and ``reason`` says why.
    """
    v = np.asarray(rater_volumes, dtype=np.float64).reshape(-1)
    if v.size < 2:
        raise InputError(f"volume CRPS needs at least 2 rater volumes, got {v.size}")
    mu, sigma = float(v.mean()), float(v.std(ddof=0))
    out = {"predicted_volume": float(predicted_volume), "mu": mu, "sigma": sigma}
    if np.all(v == v[0]):
        return {**out, "crps": None, "defined": False,
                "reason": "all raters' volumes are equal: the fitted normal has zero spread, CRPS undefined"}
    return {**out, "crps": crps_normal(float(predicted_volume), mu, sigma), "defined": True, "reason": None}


def multirater_metrics(prob_fg, raters, voxel_volume_mm3: float, pred=None, mask=None,
                       n_bins: int = DEFAULT_BINS) -> dict:
    """All multi-rater numbers for one structure of one case (module docstring).

    ``prob_fg``: predicted foreground probability (z, y, x); ``raters``: list of R 0/1 masks or
    an (R, z, y, x) array; ``pred``: predicted foreground mask (default p_fg > 0.5); ``mask``:
    evaluate ECE, volumes and counts inside it (None: whole image).
    """
    prob = np.asarray(prob_fg)
    st = stack_raters(raters)
    if st.shape[1:] != prob.shape:
        raise InputError(f"rater masks {st.shape[1:]} and probabilities {prob.shape} are not on the same grid")
    if not np.issubdtype(prob.dtype, np.floating) or not np.all(np.isfinite(prob)) \
            or prob.min() < -1e-3 or prob.max() > 1 + 1e-3:
        raise InputError("prob_fg must be finite foreground probabilities in [0, 1]")
    if not voxel_volume_mm3 > 0:
        raise InputError(f"voxel_volume_mm3 must be positive, got {voxel_volume_mm3}")
    pred = prob > 0.5 if pred is None else as_bool(pred, "prediction mask")
    if pred.shape != prob.shape:
        raise InputError(f"prediction {pred.shape} and probabilities {prob.shape} are not on the same grid")
    m = flat_mask(mask, prob.shape)
    p = prob.reshape(-1) if m is None else prob.reshape(-1)[m]
    r = st.reshape(st.shape[0], -1) if m is None else st.reshape(st.shape[0], -1)[:, m]
    pr = pred.reshape(-1) if m is None else pred.reshape(-1)[m]
    if p.size == 0:
        raise InputError("no voxels to evaluate: the mask is empty")
    n_r = r.shape[0]
    votes = r.sum(axis=0, dtype=np.int32)
    soft = votes / n_r
    c_fg, c_bg = votes == n_r, votes == 0
    consensus = c_fg | c_bg
    d = dice_masks(pr[consensus], c_fg[consensus])
    rater_vol = r.sum(axis=1, dtype=np.int64) * voxel_volume_mm3
    pred_vol = float(np.sum(p, dtype=np.float64) * voxel_volume_mm3)
    return {
        "n_raters": int(n_r), "n_voxels": int(p.size),
        "n_consensus": int(consensus.sum()), "n_dissensus": int((~consensus).sum()),
        "n_consensus_fg": int(c_fg.sum()), "n_consensus_bg": int(c_bg.sum()),
        "consensus_dice": {k: d[k] for k in ("dice", "empty_reference", "empty_prediction")},
        "ece_per_rater": [expected_calibration_error(p, r[i], n_bins) for i in range(n_r)],
        "ece_soft": expected_calibration_error(p, soft, n_bins),
        "rater_volumes_mm3": rater_vol.tolist(),
        "volume_crps": volume_crps(pred_vol, rater_vol),
    }
