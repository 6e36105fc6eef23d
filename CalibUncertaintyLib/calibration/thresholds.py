"""Per-map flagging thresholds τ* chosen by UEO on calibration cases (METHODS.md §4).

UEO(τ) = Dice({s > τ} ∩ ROI, E ∩ ROI), E = prediction ≠ reference, s the map's uncertainty
score (higher = more uncertain; 1.0 when nothing is flagged and there is no error). On the
calibration cases τ* maximises the *mean over cases* of UEO; it is stored in the calibration
file and applied unchanged to new cases.

Score: every map is used as it is (higher = more uncertain) except ``confidence``
(max_c p̄_c, higher = more certain), whose score is 1 − confidence. ``uncertainty_score`` does
this; ``flag_mask`` applies an entry to a raw map.

Kinds (per map, decided here):

- ``"absolute"`` (one τ in the map's own units for every case): maps with a natural scale in
  nats or probability that means the same on every case: entropy, entropy_norm,
  expected_entropy, mutual_information, epkl, dae, ebcu, fg_variance, vote_disagreement.
- ``"quantile"`` (store q; on each case τ = the q-quantile of the score inside that case's ROI,
  numpy's default linear interpolation, so the top 1 − q of the ROI is flagged; the entry's
  ``tau`` is only the calibration cases' mean τ, for the record): confidence,
  whose level depends mostly on the temperature and the class count, and any map not listed
  above (no known scale).

Candidates: absolute τ from the pooled ROI scores of all cases (at most
``max_candidate_samples`` values, fixed seed): their distinct values when there are at most
``n_candidates`` of them (then the search is exact), else quantiles at evenly spaced levels
plus levels packed into the upper tail (1 − q from 0.5 down to 1e-4, log-spaced), where the
optimum usually lies because errors are a small share of the ROI; then one refinement round
adds the same number of candidates between the best candidate's two neighbours. Candidates
are values of the map's own float type, so a float32 map compared with τ* flags the same voxels
in float32 or float64. Quantile q = 1 − f for f log-spaced in [1e-4, 0.5]. The first (lowest
τ, largest flagged set) of equal maxima wins.

``DEFAULT_THRESHOLDS`` are used when no calibration file exists (``threshold_entry``); why each
value was chosen is written next to it.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

ABSOLUTE_MAPS = ("entropy", "entropy_norm", "expected_entropy", "mutual_information", "epkl",
                 "dae", "ebcu", "fg_variance", "vote_disagreement")
QUANTILE_MAPS = ("confidence",)
#: Maps where a *low* value means uncertain; their score is 1 − value.
LOWER_IS_UNCERTAIN = ("confidence",)

LN2 = math.log(2.0)


def _entry(kind: str, tau: float | None, q: float | None, score: str, mean_ueo=None, n_cases: int = 0,
           source: str = "calibrated") -> dict:
    return {"tau": tau, "kind": kind, "q": q, "mean_ueo": mean_ueo, "score": score,
            "n_cases": n_cases, "source": source}


def _score_name(name: str) -> str:
    return "1 - map" if name in LOWER_IS_UNCERTAIN else "map"


#: Thresholds used without a calibration file. Scores are in nats for entropy-like maps.
DEFAULT_THRESHOLDS: dict[str, dict] = {
    # half the maximum binary entropy: H = 0.5 ln 2 at a top-class probability of about 0.89
    "entropy": _entry("absolute", 0.5 * LN2, None, "map", source="default"),
    # the same point on the normalised scale (exactly it for K = 2)
    "entropy_norm": _entry("absolute", 0.5, None, "map", source="default"),
    # aleatoric part, same scale as entropy
    "expected_entropy": _entry("absolute", 0.5 * LN2, None, "map", source="default"),
    # 0.1 ln 2 ≈ 0.069 nats: e.g. two equal groups of members at p_fg 0.32 and 0.68
    "mutual_information": _entry("absolute", 0.1 * LN2, None, "map", source="default"),
    # EPKL ≥ MI and is about twice MI for two-group disagreement: twice the MI default
    "epkl": _entry("absolute", 0.2 * LN2, None, "map", source="default"),
    # DAE is entropy weighted by w(d) ≤ 1: same scale as entropy
    "dae": _entry("absolute", 0.5 * LN2, None, "map", source="default"),
    # mean excess of PE over its 0.95 ROI quantile within 4 mm: 0.1 nats is reached when about a
    # third of the ball exceeds t by 0.3 nats (a blob), rarely by a one-voxel contour shell
    "ebcu": _entry("absolute", 0.1, None, "map", source="default"),
    # variance of p_fg across members: 0.02 = a standard deviation of about 0.14
    "fg_variance": _entry("absolute", 0.02, None, "map", source="default"),
    # 1 - |2q - 1| > 0.5  <=>  between a quarter and three quarters of members vote foreground
    "vote_disagreement": _entry("absolute", 0.5, None, "map", source="default"),
    # no fixed scale (depends on T and K): flag the 5 % least confident voxels of the ROI
    "confidence": _entry("quantile", None, 0.95, "1 - map", source="default"),
}


def default_kind(name: str) -> str:
    """``"absolute"`` for the maps in ABSOLUTE_MAPS, ``"quantile"`` otherwise (module docstring)."""
    return "absolute" if name in ABSOLUTE_MAPS else "quantile"


def uncertainty_score(name: str, values) -> np.ndarray:
    """The map as an uncertainty score (higher = more uncertain): 1 − confidence, else unchanged."""
    values = np.asarray(values)
    return 1.0 - values if name in LOWER_IS_UNCERTAIN else values


def threshold_entry(name: str, calibrated: dict | None = None) -> dict:
    """The entry for map ``name``: from ``calibrated`` (calibrate_thresholds output or the
    calibration file's thresholds) when it has one, else DEFAULT_THRESHOLDS."""
    if calibrated and name in calibrated:
        return calibrated[name]
    if name in DEFAULT_THRESHOLDS:
        return DEFAULT_THRESHOLDS[name]
    raise InputError(f"no threshold for map '{name}': it is not calibrated and has no default "
                     f"(defaults exist for {', '.join(DEFAULT_THRESHOLDS)})")


def _roi_values(score: np.ndarray, roi) -> np.ndarray:
    if roi is None:
        return score.reshape(-1)
    roi = np.asarray(roi, dtype=bool)
    if roi.shape != score.shape:
        raise InputError(f"ROI {roi.shape} and map {score.shape} are not on the same voxel grid")
    return score[roi]


def threshold_for_case(entry: dict, u, roi=None, roi_values=None) -> float:
    """τ for one case, on the *score* scale of ``entry`` (``u`` is the raw map, ``roi`` its ROI).

    Absolute entries return their τ. Quantile entries return the q-quantile of the score inside
    the ROI (the whole image when ``roi`` is None), or +inf when the ROI is empty (nothing to
    flag). Flag with ``flag_mask``, or compare ``uncertainty_score(name, u) > τ``.
    ``roi_values``: ``u[roi]`` when the caller already has it (read, not changed); the score is
    then taken on those voxels only, the same numbers without a whole-volume ``1 − u``.
    """
    kind = entry.get("kind")
    if kind == "absolute":
        if entry.get("tau") is None:
            raise InputError("absolute threshold entry has no 'tau'")
        return float(entry["tau"])
    if kind != "quantile":
        raise InputError(f"threshold entry kind must be 'absolute' or 'quantile', got {kind!r}")
    q = entry.get("q")
    if q is None or not 0.0 <= float(q) <= 1.0:
        raise InputError(f"quantile threshold entry needs q in [0, 1], got {q!r}")
    if roi_values is not None:
        vals = np.asarray(roi_values)
        vals = vals if entry.get("score", "map") == "map" else 1.0 - vals
    else:
        score = np.asarray(u) if entry.get("score", "map") == "map" else 1.0 - np.asarray(u)
        vals = _roi_values(score, roi)
    if vals.size == 0:
        return math.inf
    return float(np.quantile(vals, float(q)))


def flag_mask(entry: dict, u, roi=None) -> np.ndarray:
    """Boolean volume of flagged voxels: score > τ (τ from ``threshold_for_case``), inside ``roi``."""
    u = np.asarray(u)
    score = u if entry.get("score", "map") == "map" else 1.0 - u
    flagged = score > threshold_for_case(entry, u, roi)
    if roi is not None:
        flagged &= np.asarray(roi, dtype=bool)
    return flagged


# --- calibration ---------------------------------------------------------------------------

def _ueo(tp, n_flag, n_err):
    tp = np.asarray(tp, dtype=np.float64)
    denom = np.asarray(n_flag, dtype=np.float64) + n_err
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)


def _absolute_candidates(samples: np.ndarray, n_candidates: int) -> np.ndarray:
    uniq = np.unique(samples)
    if uniq.size <= n_candidates:
        cand = uniq
    else:
        half = max(n_candidates // 2, 2)
        levels = np.concatenate((np.linspace(0.0, 1.0, half), 1.0 - np.geomspace(0.5, 1e-4, half)))
        cand = np.unique(np.quantile(samples, np.clip(levels, 0.0, 1.0)).astype(samples.dtype))
    # a value just below the minimum lets the search flag the whole ROI
    below = np.nextafter(cand[0], np.asarray(-np.inf, dtype=samples.dtype))
    return np.concatenate((np.asarray([below], dtype=samples.dtype), cand))


def _curve_absolute(vals: np.ndarray, errs: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """UEO of one case at every candidate τ (flagged: value > τ)."""
    n_c = cand.size
    idx = np.searchsorted(cand, vals, side="left")  # number of candidates strictly below the value
    n_gt = vals.size - np.cumsum(np.bincount(idx, minlength=n_c + 1))[:n_c]
    e_gt = int(errs.sum()) - np.cumsum(np.bincount(idx[errs], minlength=n_c + 1))[:n_c]
    return _ueo(e_gt, n_gt, int(errs.sum()))


def _curve_quantile(vals: np.ndarray, errs: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """UEO of one case at every quantile level q (τ = q-quantile of the case's ROI values)."""
    n_err = int(errs.sum())
    if vals.size == 0:
        return np.ones(qs.size)
    order = np.argsort(vals, kind="stable")
    s = vals[order]
    cum_err = np.concatenate(([0], np.cumsum(errs[order])))
    taus = np.quantile(s, qs)
    k = np.searchsorted(s, taus, side="right")  # values <= tau
    return _ueo(n_err - cum_err[k], vals.size - k, n_err)


def calibrate_thresholds(maps_per_case: list[dict], errors_per_case: list, rois_per_case: list,
                         kinds: dict | None = None, n_candidates: int = 256,
                         max_candidate_samples: int = 500_000, seed: int = 0) -> dict[str, dict]:
    """Choose τ* (or q*) per map maximising the mean UEO over the calibration cases.

    ``maps_per_case[i]`` maps names to volumes (z, y, x) of case i; ``errors_per_case[i]`` is
    its error mask (prediction ≠ reference; restricted to the ROI here) and ``rois_per_case[i]``
    its ROI (None: whole image). ``kinds`` overrides ``default_kind`` per map. Returns
    ``{name: {"tau", "kind", "q", "mean_ueo", "score", "n_cases", "source"}}``. For quantile
    entries τ differs per case (use ``threshold_for_case``); their ``tau`` only records the mean
    over the calibration cases of the per-case τ at q*, on the score scale.
    """
    n = len(maps_per_case)
    if n == 0:
        raise InputError("threshold calibration needs at least one calibration case")
    if len(errors_per_case) != n or len(rois_per_case) != n:
        raise InputError(f"got {n} cases of maps but {len(errors_per_case)} error masks and "
                         f"{len(rois_per_case)} ROIs; pass one of each per case")
    if n_candidates < 2:
        raise InputError("n_candidates must be at least 2")
    names = list(maps_per_case[0])
    for i, maps in enumerate(maps_per_case):
        missing = [m for m in names if m not in maps]
        if missing:
            raise InputError(f"case {i} lacks map(s) {missing} that case 0 has; compute the same maps for every case")
    kinds = dict(kinds or {})
    bad = {m: k for m, k in kinds.items() if k not in ("absolute", "quantile")}
    if bad:
        raise InputError(f"kinds must be 'absolute' or 'quantile', got {bad}")

    # Per case: flat ROI error masks (shared by all maps) and the ROI selector.
    selectors, errs = [], []
    for i in range(n):
        e = np.asarray(errors_per_case[i], dtype=bool)
        roi = rois_per_case[i]
        if roi is not None:
            roi = np.asarray(roi, dtype=bool)
            if roi.shape != e.shape:
                raise InputError(f"case {i}: ROI {roi.shape} and error mask {e.shape} differ in shape")
        selectors.append(roi)
        errs.append(e[roi] if roi is not None else e.reshape(-1))

    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        kind = kinds.get(name, default_kind(name))
        vals = []
        for i in range(n):
            m = np.asarray(maps_per_case[i][name])
            if m.shape != np.asarray(errors_per_case[i]).shape:
                raise InputError(f"case {i}: map '{name}' {m.shape} and error mask "
                                 f"{np.asarray(errors_per_case[i]).shape} differ in shape")
            v = uncertainty_score(name, m)
            v = v[selectors[i]] if selectors[i] is not None else v.reshape(-1)
            if not np.issubdtype(v.dtype, np.floating):
                v = v.astype(np.float64)
            if not np.all(np.isfinite(v)):
                raise InputError(f"case {i}: map '{name}' has NaN or infinite values in the ROI")
            vals.append(v)
        if kind == "absolute":
            per_case = max(1, max_candidate_samples // n)
            pooled = np.concatenate([v if v.size <= per_case else rng.choice(v, per_case, replace=False)
                                     for v in vals])
            if pooled.size == 0:
                raise InputError(f"map '{name}': every calibration ROI is empty")
            if pooled.min() == pooled.max():
                # a constant map (e.g. mutual information of a single model) carries no information:
                # τ at its value flags nothing, rather than "flag the whole ROI" winning by default
                tau = np.asarray([pooled[0]])
                ueo0 = float(np.mean([_curve_absolute(v, e, tau)[0] for v, e in zip(vals, errs)]))
                out[name] = _entry("absolute", float(tau[0]), None, _score_name(name), ueo0, n, source="constant map")
                log.info("map %s is constant (%g) on the calibration cases: it flags nothing", name, tau[0])
                continue
            cand = _absolute_candidates(pooled, n_candidates)
            mean = np.mean([_curve_absolute(v, e, cand) for v, e in zip(vals, errs)], axis=0)
            j = int(np.argmax(mean))
            if cand.size > 3:  # one refinement round between the best candidate's neighbours
                lo, hi = cand[max(j - 1, 0)], cand[min(j + 1, cand.size - 1)]
                inside = pooled[(pooled >= lo) & (pooled <= hi)]
                extra = np.unique(inside)
                if extra.size > n_candidates:
                    extra = np.quantile(inside, np.linspace(0.0, 1.0, n_candidates)).astype(pooled.dtype)
                cand = np.unique(np.concatenate((cand, extra)))
                mean = np.mean([_curve_absolute(v, e, cand) for v, e in zip(vals, errs)], axis=0)
                j = int(np.argmax(mean))
            out[name] = _entry("absolute", float(cand[j]), None, _score_name(name), float(mean[j]), n)
        else:
            if all(v.size == 0 for v in vals):
                raise InputError(f"map '{name}': every calibration ROI is empty")
            qs = 1.0 - np.geomspace(0.5, 1e-4, n_candidates)
            mean = np.mean([_curve_quantile(v, e, qs) for v, e in zip(vals, errs)], axis=0)
            j = int(np.argmax(mean))
            # informative only: the mean over cases of the per-case τ at q* (score scale)
            tau_info = float(np.mean([np.quantile(v, qs[j]) for v in vals if v.size]))
            out[name] = _entry("quantile", tau_info, float(qs[j]), _score_name(name), float(mean[j]), n)
        log.info("threshold for %s: %s (mean UEO %.4f over %d cases)", name,
                 f"tau={out[name]['tau']:.6g}" if kind == "absolute" else f"q={out[name]['q']:.6g}",
                 out[name]["mean_ueo"], n)
    return out
