"""Conformal risk control for error flags and organ margins (METHODS.md §7).

Source: A. N. Angelopoulos, S. Bates, A. Fisch, L. Lei, T. Schuster, "Conformal Risk Control"
(ICLR 2024; arXiv 2208.02814), Theorem 1. Facts used, restated here:

    n exchangeable calibration cases with losses L_i(λ) ∈ [0, B], each non-increasing and
    right-continuous in λ, and L_i(λ_max) ≤ α. With R̂_n(λ) = (1/n) Σ_i L_i(λ),

        λ̂ = inf { λ : (n / (n + 1)) · R̂_n(λ) + B / (n + 1) ≤ α }

    gives E[L_{n+1}(λ̂)] ≤ α for a new exchangeable case (expectation over the calibration
    cases and the new case). The term B / (n + 1) is the finite-sample correction: it needs
    α ≥ B / (n + 1), i.e. n ≥ 1/α − 1 cases (9 for α = 0.1); with fewer cases no λ but λ_max
    qualifies and the result is the trivial, always-safe one (``trivial: True``).

Here B = 1 (every loss is a fraction) and a case is the exchangeable unit (its voxels are not).
The guarantee is on the *mean over cases of the per-case fraction*, not on the pooled voxel
fraction and not for every case.

Losses (each is non-increasing in the direction that flags more / grows the set):

- flags, map score s (higher = more uncertain), flagged set {s ≥ c}: L_i(c) = fraction of case
  i's ROI error voxels with s < c (0 when the case has no error); λ = −c. ĉ is the largest
  candidate c meeting the bound; it is stored as τ = the float32 number just below ĉ, so the
  project's usual test ``score > τ`` flags exactly {s ≥ ĉ} on float32 maps.
- outer margin of class k, set {p_k ≥ λ} ∪ {prediction = k}: L_i(λ) = fraction of the true
  voxels of k (reference = k) outside that set (0 when k is absent); λ is searched on
  ``PROB_GRID`` and the largest λ meeting the bound is taken.
- inner margin of class k, set {p_k > λ}, λ ≥ 0.5: the loss is the false-discovery proportion
  FDP_i(λ) = |{p_k > λ} ∖ {reference = k}| / |{p_k > λ}| (0 for an empty set). FDP is not
  monotone in λ, so the controlled loss is its monotone envelope L_i(λ) = max_{λ' ≥ λ} FDP_i(λ')
  over the grid (≥ FDP, so controlling it controls the FDP: precision ≥ 1 − α in expectation);
  the smallest grid λ meeting the bound is taken. λ ≥ 0.5 makes p_k > λ imply argmax = k, so
  inner ⊆ prediction ⊆ outer for every organ.

Every choice above searches a fixed candidate set fixed before seeing the cases (the grid) or
the calibration scores themselves, exactly as the theorem allows.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

DEFAULT_ALPHA = 0.1
#: α values whose thresholds are also stored, so ``evaluate`` can plot miss rate against α.
ALPHA_GRID = (0.05, 0.1, 0.2, 0.3)
SOURCE = ("conformal risk control, Angelopoulos, Bates, Fisch, Lei & Schuster, 'Conformal Risk "
          "Control' (ICLR 2024), Theorem 1, B = 1")
INNER_MIN = 0.5
#: probability levels searched for the margins: 0.001 steps plus finer steps near 0 and 1, each a
#: float32 number, so a float32 probability map compares with a level the same way in float32 and float64
PROB_GRID = np.unique(np.concatenate((
    np.linspace(0.0, 1.0, 1001), np.geomspace(1e-6, 1e-3, 13), 1.0 - np.geomspace(1e-6, 1e-3, 13))
).astype(np.float32)).astype(np.float64)


def check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"conformal alpha must be a number in (0, 1), got {alpha!r}") from None
    if not (math.isfinite(a) and 0.0 < a < 1.0):
        raise InputError(f"conformal alpha must be in (0, 1) (e.g. 0.1 for 90 % coverage), got {alpha!r}")
    return a


def crc_bound(mean_risk: float, n: int, b: float = 1.0) -> float:
    """The conformal risk control bound n/(n+1) · R̂ + B/(n+1) (module docstring)."""
    return (n * float(mean_risk) + b) / (n + 1)


def min_cases(alpha: float) -> int:
    """Fewest calibration cases for a non-trivial threshold at ``alpha``: B/(n+1) ≤ α."""
    return max(int(math.ceil(1.0 / alpha - 1.0 - 1e-12)), 1)


# --- error flags -------------------------------------------------------------------------------

def flag_threshold(error_scores: list, alpha: float) -> dict:
    """The flag threshold by conformal risk control (module docstring).

    ``error_scores[i]``: the scores (higher = more uncertain) of case i's ROI error voxels.
    Returns {"alpha", "tau", "c", "n_cases", "mean_miss", "bound", "trivial"}: flag
    ``score > tau`` (equivalently ``score ≥ c``); ``tau`` None when trivial (flag the whole ROI).
    """
    a = check_alpha(alpha)
    n = len(error_scores)
    if n == 0:
        raise InputError("conformal flag threshold needs at least one calibration case")
    cases = [np.sort(np.asarray(s, dtype=np.float32).ravel()) for s in error_scores]
    pooled = np.unique(np.concatenate(cases)) if any(c.size for c in cases) else np.zeros(0, np.float32)
    if pooled.size:
        # mean miss at every candidate c (a flagged set {s >= c}); non-decreasing in c
        miss = np.zeros(pooled.size)
        for s in cases:
            if s.size:
                miss += np.searchsorted(s, pooled, side="left") / s.size
        miss /= n
        ok = (n * miss + 1.0) / (n + 1) <= a + 1e-12
        if ok.any():
            j = int(np.flatnonzero(ok)[-1])
            c = np.float32(pooled[j])
            tau = np.nextafter(c, np.float32(-np.inf))
            return {"alpha": a, "tau": float(tau), "c": float(c), "n_cases": n, "mean_miss": float(miss[j]),
                    "bound": crc_bound(miss[j], n), "trivial": False}
    # too few cases for α (B/(n+1) > α), or no calibration error at all: flag the whole ROI
    return {"alpha": a, "tau": None, "c": None, "n_cases": n, "mean_miss": 0.0, "bound": crc_bound(0.0, n),
            "trivial": True}


def flag_thresholds(error_scores: list, alphas) -> dict:
    """``flag_threshold`` at every α of ``alphas`` from one pass over the calibration scores:
    {α: the same dict ``flag_threshold(error_scores, α)`` returns}."""
    levels = [check_alpha(a) for a in alphas]
    n = len(error_scores)
    if n == 0:
        raise InputError("conformal flag threshold needs at least one calibration case")
    cases = [np.sort(np.asarray(s, dtype=np.float32).ravel()) for s in error_scores]
    pooled = np.unique(np.concatenate(cases)) if any(c.size for c in cases) else np.zeros(0, np.float32)
    miss = np.zeros(pooled.size)
    for s in cases:
        if s.size:
            miss += np.searchsorted(s, pooled, side="left") / s.size
    miss /= n
    out = {}
    for a in levels:
        ok = (n * miss + 1.0) / (n + 1) <= a + 1e-12
        if ok.any():
            j = int(np.flatnonzero(ok)[-1])
            c = np.float32(pooled[j])
            out[a] = {"alpha": a, "tau": float(np.nextafter(c, np.float32(-np.inf))), "c": float(c), "n_cases": n,
                      "mean_miss": float(miss[j]), "bound": crc_bound(miss[j], n), "trivial": False}
        else:
            out[a] = {"alpha": a, "tau": None, "c": None, "n_cases": n, "mean_miss": 0.0, "bound": crc_bound(0.0, n),
                      "trivial": True}
    return out


def case_miss_rate(score, errors, tau) -> float | None:
    """Fraction of the error voxels (``errors`` True) not flagged by ``score > tau``
    (tau None = everything flagged). None when the case has no error voxel."""
    e = np.asarray(errors, dtype=bool)
    n = int(e.sum())
    if n == 0:
        return None
    if tau is None:
        return 0.0
    s = np.asarray(score)[e]
    return float(np.count_nonzero(~(s > np.float32(tau)))) / n


# --- organ margins -----------------------------------------------------------------------------

def margin_losses(prob_k, label_is_k, pred_is_k, grid=PROB_GRID) -> dict:
    """Per-case loss curves of one class on ``grid`` (module docstring).

    Returns {"outer_miss": (G,), "inner_fdp": (G,) monotone envelope, "inner_fdp_raw": (G,) the
    FDP itself (for held-out checks), "n_true", "n_pred"}. ``outer_miss[j]``: fraction of true voxels outside
    {p ≥ grid[j]} ∪ prediction; ``inner_fdp[j]``: max over grid[j'] ≥ grid[j] of the FDP of {p > grid[j']}.
    """
    p = np.asarray(prob_k, dtype=np.float32)
    t = np.asarray(label_is_k, dtype=bool)
    pr = np.asarray(pred_is_k, dtype=bool)
    g = np.asarray(grid, dtype=np.float64)
    n_true = int(t.sum())
    if n_true:
        outside = np.sort(p[t & ~pr].astype(np.float64))
        outer = np.searchsorted(outside, g, side="left") / n_true  # p < λ and not predicted
    else:
        outer = np.zeros(g.size)
    cand = p > INNER_MIN * 0.999
    vals = p[cand].astype(np.float64)
    is_true = t[cand]
    order = np.argsort(vals, kind="stable")
    vals, is_true = vals[order], is_true[order]
    # number of voxels with p <= λ, and true ones among them
    k = np.searchsorted(vals, g, side="right")
    cum_true = np.concatenate(([0], np.cumsum(is_true)))
    n_in = vals.size - k
    n_false_in = (vals.size - cum_true[-1]) - (k - cum_true[k])
    fdp = np.where(n_in > 0, n_false_in / np.maximum(n_in, 1), 0.0)
    envelope = np.maximum.accumulate(fdp[::-1])[::-1]
    return {"outer_miss": outer, "inner_fdp": envelope, "inner_fdp_raw": fdp, "n_true": n_true,
            "n_pred": int(pr.sum())}


def margin_thresholds(curves: list[dict], alpha: float, grid=PROB_GRID) -> dict:
    """Outer and inner thresholds of one class from its per-case ``margin_losses`` curves."""
    a = check_alpha(alpha)
    n = len(curves)
    if n == 0:
        raise InputError("conformal margins need at least one calibration case")
    g = np.asarray(grid, dtype=np.float64)
    outer = np.mean([c["outer_miss"] for c in curves], axis=0)
    inner = np.mean([c["inner_fdp"] for c in curves], axis=0)
    ok_o = (n * outer + 1.0) / (n + 1) <= a + 1e-12  # true at small λ, false above some level
    ok_i = ((n * inner + 1.0) / (n + 1) <= a + 1e-12) & (g >= INNER_MIN)
    trivial = not (ok_o.any() and ok_i.any())
    jo = int(np.flatnonzero(ok_o)[-1]) if ok_o.any() else 0
    ji = int(np.flatnonzero(ok_i)[0]) if ok_i.any() else None
    return {"alpha": a, "n_cases": n, "trivial": trivial,
            "outer": float(g[jo]) if ok_o.any() else 0.0,
            "outer_mean_miss": float(outer[jo]), "outer_bound": crc_bound(outer[jo], n),
            "inner": float(g[ji]) if ji is not None else 1.0,
            "inner_mean_fdp": float(inner[ji]) if ji is not None else 0.0,
            "inner_bound": crc_bound(inner[ji], n) if ji is not None else crc_bound(0.0, n)}


def margin_masks(prob_k, pred_is_k, outer: float, inner: float) -> tuple[np.ndarray, np.ndarray]:
    """(inner, outer) boolean masks of one class: inner = {p > inner} ∩ prediction (p > 0.5
    already implies it), outer = {p ≥ outer} ∪ prediction. inner ⊆ prediction ⊆ outer."""
    p = np.asarray(prob_k)
    pr = np.asarray(pred_is_k, dtype=bool)
    inner_m = (p > np.float32(max(float(inner), INNER_MIN))) & pr
    outer_m = (p >= np.float32(outer)) | pr
    return inner_m, outer_m


def margin_levels(prob_k, pred_is_k, outer: float, inner: float) -> np.ndarray:
    """uint8 nested levels of one class: 3 inner, 2 prediction (not inner), 1 outer band, 0 outside."""
    inner_m, outer_m = margin_masks(prob_k, pred_is_k, outer, inner)
    out = outer_m.astype(np.uint8)
    out += np.asarray(pred_is_k, dtype=bool)
    out += inner_m
    return out


def case_margin_rates(prob_k, label_is_k, pred_is_k, outer: float, inner: float) -> dict:
    """Held-out check of one class on one case: outer miss (None when the class is absent) and
    inner FDP (0 for an empty inner set)."""
    inner_m, outer_m = margin_masks(prob_k, pred_is_k, outer, inner)
    t = np.asarray(label_is_k, dtype=bool)
    n_true = int(t.sum())
    n_in = int(inner_m.sum())
    return {"outer_miss": float(np.count_nonzero(t & ~outer_m)) / n_true if n_true else None,
            "inner_fdp": float(np.count_nonzero(inner_m & ~t)) / n_in if n_in else 0.0,
            "n_true": n_true, "n_inner": n_in, "n_outer": int(outer_m.sum())}


# --- the calibration file's record -------------------------------------------------------------

def guarantee_text(alpha: float, what: str = "flags", trivial: bool = False, n_cases: int | None = None) -> str:
    """The guarantee as a sentence; ``trivial``: the trivial one, said so (``trivial_text``)."""
    if trivial:
        return trivial_text(alpha, n_cases, what)
    pct = f"{100 * (1 - float(alpha)):.0f} %"
    if what == "flags":
        return f"flags cover ≥ {pct} of errors in expectation"
    if what == "outer":
        return f"outer contour holds ≥ {pct} of the organ's voxels in expectation"
    return f"inner contour's voxels are organ with precision ≥ {pct} in expectation"


def trivial_text(alpha: float, n_cases: int | None, what: str = "flags") -> str:
    """What a trivial guarantee is, and how many calibration cases would make it a real one."""
    need = min_cases(float(alpha))
    if n_cases is not None and n_cases < need:
        why = (f"fitted on {n_cases} calibration case(s); α = {float(alpha):g} needs at least {need} for a real "
               "guarantee")
    else:
        why = "no smaller set met the bound on the calibration cases"
    held = {"flags": "every ROI voxel is flagged", "outer": "the outer contour is the whole image",
            "inner": "the inner contour is empty"}[what]
    return f"trivial guarantee only: {held} ({why})"


def outer_is_trivial(th: dict) -> bool:
    """An outer threshold at 0 keeps every voxel (p ≥ 0): the whole image."""
    return th.get("outer") is None or float(th["outer"]) <= 0.0


def inner_is_trivial(th: dict) -> bool:
    """An inner threshold at 1 keeps no voxel (p > 1): an empty contour."""
    return th.get("inner") is None or float(th["inner"]) >= 1.0


def margin_guarantees(rec: dict, alpha: float | None = None) -> dict | None:
    """{"outer": sentence, "inner": sentence, "trivial_outer": [classes], "trivial_inner": [classes]}
    for the record's margins at ``alpha`` (None = the record's α): a part that is trivial for every
    class says so (``trivial_text``), one trivial for some classes names them. None without margins."""
    if not rec or not rec.get("margins"):
        return None
    a = rec["alpha"] if alpha is None else float(alpha)
    n = rec.get("n_cases")
    out = {}
    for part, test in (("outer", outer_is_trivial), ("inner", inner_is_trivial)):
        stored = {c: at_alpha(rec, "margins", c, a) for c in rec["margins"]}
        trivial = [c for c, th in stored.items() if th is None or test(th)]
        if stored and len(trivial) == len(stored):
            text = trivial_text(a, n, part)
        else:
            text = guarantee_text(a, part)
            if trivial:
                text += f" (trivial for {', '.join(trivial)}: {trivial_text(a, n, part)})"
        out[part], out[f"trivial_{part}"] = text, trivial
    return out


def build_record(alpha: float, flag_scores: dict, margin_curves: dict, alphas=ALPHA_GRID) -> dict:
    """The calibration file's ``conformal`` record.

    ``flag_scores``: {map: [per-case error scores]}; ``margin_curves``: {class name: [per-case
    margin_losses]}. Thresholds are stored at ``alpha`` and at every α of ``alphas``."""
    a = check_alpha(alpha)
    levels = sorted({a, *[check_alpha(x) for x in alphas]})
    n = len(next(iter(flag_scores.values()))) if flag_scores else (
        len(next(iter(margin_curves.values()))) if margin_curves else 0)
    rec = {"alpha": a, "method": "conformal_risk_control", "source": SOURCE, "n_cases": n,
           "min_cases": min_cases(a), "alphas": levels,
           "flags": {}, "margins": {}}
    for name, scores in flag_scores.items():
        rec["flags"][name] = {f"{x:g}": flag_threshold(scores, x) for x in levels}
    for cname, curves in margin_curves.items():
        rec["margins"][cname] = {f"{x:g}": margin_thresholds(curves, x) for x in levels}
    return rec


def validate_record(rec, where: str = "calibration") -> None:
    """InputError naming what is wrong with a ``conformal`` record ({} = none)."""
    if rec in (None, {}):
        return
    if not isinstance(rec, dict):
        raise InputError(f"{where}: conformal must be an object")
    try:
        check_alpha(rec.get("alpha"))
    except InputError as exc:
        raise InputError(f"{where}: conformal.{exc}") from None
    for part in ("flags", "margins"):
        block = rec.get(part, {})
        if not isinstance(block, dict) or not all(isinstance(v, dict) for v in block.values()):
            raise InputError(f"{where}: conformal.{part} must map names to {{alpha: thresholds}}")
        for name, by_alpha in block.items():
            for key, th in by_alpha.items():
                if not isinstance(th, dict):
                    raise InputError(f"{where}: conformal.{part}.{name}.{key} must be an object")
                nums = [th.get("tau")] if part == "flags" else [th.get("outer"), th.get("inner")]
                if any(v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)) for v in nums):
                    raise InputError(f"{where}: conformal.{part}.{name}.{key} holds a non-finite threshold")
    if rec.get("error", "voxel") not in ("voxel", "contour"):
        raise InputError(f"{where}: conformal.error must be 'voxel' or 'contour', got {rec.get('error')!r}")
    contour = rec.get("contour")
    if contour is not None:  # contour-level flags and margins (calibration.contour_conformal)
        if not isinstance(contour, dict) or not isinstance(contour.get("tolerance_mm"), (int, float)):
            raise InputError(f"{where}: conformal.contour must be an object with tolerance_mm")
        validate_record({"alpha": rec["alpha"], "flags": contour.get("flags", {}),
                         "margins": contour.get("margins", {})}, f"{where} (contour)")
    elif rec.get("error") == "contour":
        raise InputError(f"{where}: conformal.error is 'contour' but the record has no contour thresholds")


def at_alpha(rec: dict, part: str, name: str, alpha: float | None = None) -> dict | None:
    """The stored thresholds of ``part`` ("flags" | "margins") for ``name`` at ``alpha``
    (None = the record's α); None when not stored."""
    if not rec:
        return None
    a = rec["alpha"] if alpha is None else alpha
    return (rec.get(part) or {}).get(name, {}).get(f"{float(a):g}")


def describe_record(rec: dict, maps=None) -> list[str]:
    """Readable lines for the CLI and reports ([] when there is no record). A trivial guarantee
    is called trivial, with the number of calibration cases a real one needs."""
    if not rec:
        return []
    a, n = rec["alpha"], rec.get("n_cases", 0)
    need = rec.get("min_cases") or min_cases(a)
    lines = [f"conformal risk control (α = {a:g}, {n} calibration cases; {SOURCE})"]
    if n < need:
        lines.append(f"  TRIVIAL GUARANTEE ONLY: {n} calibration case(s), α = {a:g} needs at least {need}: the flags "
                     "cover the errors only by flagging the whole ROI, the outer margins are the whole image and "
                     f"the inner margins empty; fit on {need} or more calibration cases for a real guarantee")
    flags = rec.get("flags") or {}
    shown = [m for m in (maps or flags) if m in flags]
    real = [m for m in shown if not _flag_is_trivial(at_alpha(rec, "flags", m))]
    trivial = [m for m in shown if m not in real]
    if real:
        lines.append(f"  {guarantee_text(a)} at: " + ", ".join(_flag_rule(m, at_alpha(rec, "flags", m)) for m in real))
    if trivial:
        lines.append(f"  whole ROI flagged (trivial guarantee) for: {', '.join(trivial)}")
    mg = margin_guarantees(rec)
    if mg:
        lines.append(f"  organ margins: {mg['outer']}; {mg['inner']}:")
    for cname in rec.get("margins") or {}:
        th = at_alpha(rec, "margins", cname)
        if th:
            lines.append(f"    {cname}: outer p ≥ {th['outer']:.4g}, inner p > {max(th['inner'], INNER_MIN):.4g}")
    return lines


def _flag_is_trivial(th: dict | None) -> bool:
    """No threshold, or one at or below 0 (every score is >= 0): the whole ROI is flagged."""
    return not th or th["tau"] is None or th["c"] is None or th["c"] <= 0


def _flag_rule(name: str, th: dict | None) -> str:
    """How a stored flag threshold reads in the map's own units (every score is >= 0, so a
    threshold at or below 0 flags the whole ROI: the map is 0 at some calibration errors)."""
    from .thresholds import LOWER_IS_UNCERTAIN

    if _flag_is_trivial(th):
        return f"{name}: whole ROI"
    if name in LOWER_IS_UNCERTAIN:
        return f"{name} < {1.0 - th['tau']:.4g}"
    return f"{name} > {th['tau']:.4g}"


def case_guarantees(calibration, regions_map: str) -> dict | None:
    """summary.json's ``conformal`` block: α, the guarantee sentences (a trivial one said so, with
    ``min_cases``, the calibration cases a real one needs) and the thresholds used."""
    rec = getattr(calibration, "conformal", None) if calibration is not None else None
    if not rec:
        return None
    a, n = rec["alpha"], rec.get("n_cases")
    flag = at_alpha(rec, "flags", regions_map)
    trivial = _flag_is_trivial(flag) if flag else None
    mg = margin_guarantees(rec)
    return {"alpha": a, "n_cases": n, "min_cases": rec.get("min_cases") or min_cases(a), "source": rec.get("source"),
            "trivial": trivial,
            "flags": {"map": regions_map, "tau_score": flag["tau"], "rule": _flag_rule(regions_map, flag),
                      "guarantee": guarantee_text(a, "flags", bool(trivial), n)} if flag else None,
            "margins": {"outer": mg["outer"], "inner": mg["inner"]} if mg else None}
