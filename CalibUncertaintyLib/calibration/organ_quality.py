"""Per-organ quality with a guarantee: a predicted Dice and surface Dice for each predicted organ of a
case, with a conformal interval (docs/METHODS.md "Per-organ quality").

**Feature: the model's own expected Dice.** For organ k with predicted mask P_k and calibrated
probability p_k, the reference is modelled as a level set of p_k at a uniform random level,
G_U = {p_k ≥ U}, U ~ Uniform(0, 1) (every voxel's marginal P(x ∈ G) = p_k(x), as calibration says;
the voxels move together, as real contour errors do, instead of the salt-and-pepper of
independent voxels). The features are

    x_dice = E_U[Dice(P_k, G_U)],   x_sd = E_U[SD_τ(P_k, G_U)]       (SD_τ: ``metrics.contour``)

evaluated at the ``LEVELS`` 0.05, 0.15, …, 0.95 (the midpoint rule on U), inside the organ's box:
the bounding box of P_k padded by ``crop_mm`` (the ROI radius, 15 mm). They are computed from the
calibrated probability only, so they exist at deployment; the same function runs at fit time (on
the calibration cases) and per case (``pipeline.organ_case``, on level indices streamed slab by slab).

**Predictor: one feature, shrunk to the identity.** Per organ and target (Dice, surface Dice),
ŷ = a + b·x, ridge-fitted with the penalty λ·(a² + (b − 1)²), λ = ``RIDGE_LAMBDA`` = 1: with few
cases the data move the intercept (a bias: e.g. a model that believes its parotid more than it
should) and the slope moves away from 1 only as far as the spread of x over the cases supports.
Two parameters per organ and target is what 10–25 calibration cases can carry.

**Interval: full conformal prediction** (Vovk, Gammerman & Shafer, "Algorithmic Learning in a
Random World", 2005; with ridge regression as in Nouretdinov, Melluish & Vovk 2001), the case as the
exchangeable unit. For a candidate value y of the new case, the ridge fit is done on the n
calibration cases *and* (x_new, y); every case i of the n + 1 gets the normalised residual
s_i(y) = |y_i − ŷ_i| / σ(x_i), σ(x) = (1 − x) + ``SIGMA_FLOOR`` (0.05; a confident organ gets a
narrow interval, a doubtful one a wide one); y is kept when its conformal p-value
#{i ≤ n + 1 : s_i(y) ≥ s_{n+1}(y)} / (n + 1) exceeds α. The interval is the hull of the kept y in
[0, 1], found exactly (every residual is linear in y, so p(y) changes only where two normalised
residuals cross: at most 2n points, each evaluated). Because the fit treats all n + 1 cases alike,
P(y_true ∈ interval) ≥ 1 − α over the calibration cases and the new case, for exchangeable cases,
whatever the model's quality — calibration cases are not spent on a separate fit. With
(n + 1)·α < 1, i.e. n < ``min_cases(α)`` = ⌈1/α⌉ − 1 (9 for α = 0.1, 19 for 0.05), every y is kept:
the interval is [0, 1] and flagged ``trivial``. The guarantee is per organ (marginal over cases),
not simultaneous over the organs of a case; it holds for cases where the organ is predicted (the
calibration pairs are those cases too: selection by the case's own prediction keeps exchangeability).
The point prediction shown is the ridge fit on the calibration cases alone, at x_new.

Caveat stated in the docs: T (the calibration) is fitted on the same calibration cases; its single
scalar (or table) enters x, as it enters every conformal threshold of this project.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .conformal import check_alpha, min_cases

LEVELS = tuple(float(v) for v in np.round(np.arange(0.05, 1.0, 0.1), 2))
_LEVELS32 = np.asarray(LEVELS, dtype=np.float32)
DEFAULT_TOLERANCE_MM = 3.0
DEFAULT_CROP_MM = 15.0
RIDGE_LAMBDA = 1.0
SIGMA_FLOOR = 0.05
TARGETS = ("dice", "surface_dice")
TARGET_LABEL = {"dice": "Dice", "surface_dice": "surface Dice"}
SOURCE = ("full conformal prediction (Vovk, Gammerman & Shafer 2005) with ridge regression toward the "
          "identity on the model's expected Dice, normalised residuals; the case is the exchangeable unit")


# --- features ----------------------------------------------------------------------------------

def level_index(p) -> np.ndarray:
    """uint8 number of ``LEVELS`` at or below p (0..10): G_{LEVELS[j]} = {level_index > j}."""
    return np.searchsorted(_LEVELS32, np.asarray(p, dtype=np.float32), side="right").astype(np.uint8)


def organ_box(pred_box, spacing_zyx, shape, crop_mm: float = DEFAULT_CROP_MM) -> tuple:
    """The organ's box: ``pred_box`` (slices of P_k's bounding box) padded by ``crop_mm`` (in voxels per axis)."""
    pad = [int(math.ceil(float(crop_mm) / h)) for h in spacing_zyx]
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(pred_box, pad, shape))


def organ_features(levels, pred, spacing_zyx, tolerance_mm: float) -> dict:
    """{"expected_dice", "expected_surface_dice"} of one organ from its level indices and predicted
    mask on the organ's box (module docstring); P must not be empty.

    All ten levels at once, touching the box a fixed number of times whatever the organ's size: each
    voxel y gets the bit set B(y) of the levels j whose border B(G_j) it lies on (L(y) > j ≥ the
    smallest level index of its face neighbours, outside the box counting as 0); a border voxel x of P
    is within τ of B(G_j) when bit j is set at some x + Δ, Δ in the offsets of box distance ≤ τ
    (``metrics.contour``'s distance); a voxel of B(G_j) is within τ of B(P) by one distance transform.
    Equal to ``metrics.contour.surface_dice`` level by level on the box (tested)."""
    from ..metrics.contour import ROUND_MM, border, check_tolerance, distance_to_mm

    lv = np.asarray(levels, dtype=np.uint8)
    p = np.asarray(pred, dtype=bool)
    n_p = int(p.sum())
    if n_p == 0:
        raise InputError("organ features need a predicted organ (empty prediction)")
    if lv.shape != p.shape or lv.ndim != 3:
        raise InputError(f"organ features need levels and prediction on one 3-D box, got {lv.shape} and {p.shape}")
    tol = check_tolerance(tolerance_mm)
    sp = np.asarray([float(h) for h in spacing_zyx])
    j_n = len(LEVELS)
    # Dice per level: |P ∩ G_j| and |G_j| from the level histograms inside and outside P
    hist_p = np.bincount(lv[p], minlength=j_n + 1)
    hist = np.bincount(lv.ravel(), minlength=j_n + 1)
    above_p = np.cumsum(hist_p[::-1])[::-1]  # above_p[j] = #{x ∈ P : L(x) ≥ j}
    above = np.cumsum(hist[::-1])[::-1]
    inter, size_g = above_p[1:j_n + 1], above[1:j_n + 1]  # G_j = {L > j} = {L ≥ j + 1}
    dice = 2.0 * inter / (n_p + size_g)
    # border bits: y ∈ B(G_j) ⇔ minnb(y) ≤ j < L(y)
    minnb = lv.copy()
    for a in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[a], hi[a] = slice(1, None), slice(None, -1)
        np.minimum(minnb[tuple(lo)], lv[tuple(hi)], out=minnb[tuple(lo)])
        np.minimum(minnb[tuple(hi)], lv[tuple(lo)], out=minnb[tuple(hi)])
        for i in (0, -1):
            edge = [slice(None)] * 3
            edge[a] = i
            minnb[tuple(edge)] = 0
    one = np.uint16(1)
    bits = np.where(minnb < lv, (one << lv.astype(np.uint16)) - (one << minnb.astype(np.uint16)),
                    np.uint16(0)).astype(np.uint16)
    del minnb
    n_bg = np.array([int(np.count_nonzero(bits & (one << np.uint16(j)))) for j in range(j_n)])
    bp = border(p)
    n_bp = int(bp.sum())
    # B(G_j) within τ of B(P): one distance transform of B(P)
    near_p = distance_to_mm(bp, sp, tol + float(sp.max())) <= tol + ROUND_MM
    b_near = bits[near_p]
    to_p = np.array([int(np.count_nonzero(b_near & (one << np.uint16(j)))) for j in range(j_n)])
    # B(P) within τ of B(G_j): OR of the bits over the offsets of box distance ≤ τ (on a copy of the
    # bits padded by the reach, so every offset is one flat shift)
    reach = [int(np.floor((tol + ROUND_MM) / h + 0.5)) for h in sp]
    padded = np.pad(bits, [(r, r) for r in reach])
    flat = padded.ravel()
    strides = np.array(padded.strides) // padded.itemsize
    idx = np.ravel_multi_index(tuple(np.add(np.nonzero(bp), np.array(reach)[:, None])), padded.shape)
    acc = np.zeros(n_bp, np.uint16)
    lim2 = (tol + ROUND_MM) ** 2
    for dz in range(-reach[0], reach[0] + 1):
        for dy in range(-reach[1], reach[1] + 1):
            for dx in range(-reach[2], reach[2] + 1):
                gap = np.maximum(np.abs([dz, dy, dx]) * sp - sp / 2, 0.0)
                if float((gap ** 2).sum()) <= lim2:
                    acc |= flat[idx + int(dz * strides[0] + dy * strides[1] + dx * strides[2])]
    del padded, flat
    from_p = np.array([int(np.count_nonzero(acc & (one << np.uint16(j)))) for j in range(j_n)])
    denom = n_bp + n_bg
    sd = np.where(denom > 0, (from_p + to_p) / np.maximum(denom, 1), 1.0)
    sd = np.where(n_bg == 0, 0.0, sd)  # G_j empty (or without border): surface Dice 0 against a non-empty P
    return {"expected_dice": float(np.mean(dice)), "expected_surface_dice": float(np.mean(sd))}


def case_organ_rows(probs, seg, labels, spacing_zyx, tolerance_mm: float, crop_mm: float = DEFAULT_CROP_MM) -> list:
    """Fit-time rows of one calibration case, one per foreground class: None when the class is not
    predicted, else {"expected_dice", "expected_surface_dice", "dice", "surface_dice"} (true values
    against ``labels``: Dice over the whole image, surface Dice at ``tolerance_mm``). ``probs``: the
    (K, z, y, x) calibrated probability; ``organ_level_crops`` + ``organ_rows_from_levels`` give the
    same rows from z slabs of it."""
    crops = organ_level_crops(seg, probs.shape[0], spacing_zyx, crop_mm)
    for c, (box, arr) in crops.items():
        arr[...] = level_index(probs[c][box])
    return organ_rows_from_levels(crops, seg, labels, spacing_zyx, tolerance_mm, probs.shape[0])


def organ_level_crops(seg, n_classes: int, spacing_zyx, crop_mm: float = DEFAULT_CROP_MM) -> dict:
    """{class: [organ box, zeroed uint8 array of the box's shape]} for every predicted foreground
    class, to be filled with ``level_index`` of its calibrated probability (``fill_level_crops``)."""
    from scipy import ndimage

    s = np.asarray(seg)
    boxes = ndimage.find_objects(s.astype(np.int32, copy=False), max_label=n_classes - 1)
    out = {}
    for c in range(1, n_classes):
        if boxes[c - 1] is not None:
            box = organ_box(boxes[c - 1], spacing_zyx, s.shape, crop_mm)
            out[c] = [box, np.zeros(tuple(b.stop - b.start for b in box), np.uint8)]
    return out


def fill_level_crops(crops: dict, sl: slice, probs_slab) -> None:
    """Write the level indices of one z slab (K, dz, y, x) of the calibrated probability into ``crops``."""
    z0, z1 = sl.start, sl.stop
    for c, (box, arr) in crops.items():
        a, b = max(z0, box[0].start), min(z1, box[0].stop)
        if a < b:
            arr[a - box[0].start:b - box[0].start] = level_index(probs_slab[c, a - z0:b - z0, box[1], box[2]])


def organ_rows_from_levels(crops: dict, seg, labels, spacing_zyx, tolerance_mm: float, n_classes: int) -> list:
    """``case_organ_rows`` from filled ``organ_level_crops``."""
    from ..metrics.contour import surface_dice

    s, y = np.asarray(seg), np.asarray(labels)
    rows = []
    for c in range(1, n_classes):
        if c not in crops:
            rows.append(None)
            continue
        box, levels = crops[c]
        pred = s == c
        feats = organ_features(levels, pred[box], spacing_zyx, tolerance_mm)
        ref = y == c
        n = int(pred.sum()) + int(ref.sum())
        feats["dice"] = 2.0 * np.count_nonzero(pred & ref) / n
        feats["surface_dice"] = surface_dice(pred, ref, spacing_zyx, tolerance_mm)
        rows.append(feats)
    return rows


# --- the conformal interval --------------------------------------------------------------------

def sigma(x) -> np.ndarray:
    return (1.0 - np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)) + SIGMA_FLOOR


def _ridge_matrices(x: np.ndarray, lam: float):
    """(H, c): fitted values = H @ y + c for ridge toward (a, b) = (0, 1) with design [1, x]."""
    X = np.stack([np.ones_like(x), x], axis=1)
    A = np.linalg.inv(X.T @ X + lam * np.eye(2))
    return X @ A @ X.T, X @ A @ np.array([0.0, lam])


def point_prediction(x_cal, y_cal, x_new: float, lam: float = RIDGE_LAMBDA) -> float:
    """ŷ(x_new) of the ridge fit on the calibration pairs alone, clipped to [0, 1]."""
    x = np.asarray(x_cal, dtype=np.float64)
    y = np.asarray(y_cal, dtype=np.float64)
    X = np.stack([np.ones_like(x), x], axis=1)
    theta = np.linalg.solve(X.T @ X + lam * np.eye(2), X.T @ y + lam * np.array([0.0, 1.0]))
    return float(np.clip(theta[0] + theta[1] * float(x_new), 0.0, 1.0))


def conformal_interval(x_cal, y_cal, x_new: float, alpha: float, lam: float = RIDGE_LAMBDA) -> dict:
    """Full conformal interval of y at ``x_new`` (module docstring): {"lower", "upper", "predicted",
    "trivial", "n_cases"}; y ∈ [0, 1]."""
    a = check_alpha(alpha)
    x = np.asarray(x_cal, dtype=np.float64).ravel()
    y = np.asarray(y_cal, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"need one feature per calibration value, got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and math.isfinite(float(x_new))):
        raise InputError("organ quality: non-finite calibration values or feature")
    n = x.size
    pred = point_prediction(x, y, x_new, lam) if n else float(np.clip(x_new, 0, 1))
    if (n + 1) * a < 1.0 - 1e-12:
        return {"lower": 0.0, "upper": 1.0, "predicted": pred, "trivial": True, "n_cases": n}
    xa = np.append(x, float(x_new))
    H, c = _ridge_matrices(xa, lam)
    # residuals r(y) = (I − H) [y_cal; t] − c = A + B t
    I_H = np.eye(n + 1) - H
    A = I_H[:, :n] @ y - c
    B = I_H[:, n]
    sg = sigma(xa)
    a_n, b_n = A / sg, B / sg  # normalised residuals s_i(t) = |a_n[i] + b_n[i] t|
    # candidate points: where |s_i| = |s_new| (a_i + b_i t = ±(a_0 + b_0 t)), and the ends 0, 1
    cands = [0.0, 1.0]
    for i in range(n):
        for sgn in (1.0, -1.0):
            den = b_n[i] - sgn * b_n[n]
            if abs(den) > 1e-15:
                t = -(a_n[i] - sgn * a_n[n]) / den
                if 0.0 <= t <= 1.0:
                    cands.append(float(t))
    t = np.unique(np.asarray(cands))
    s = np.abs(a_n[:, None] + b_n[:, None] * t[None, :])  # (n + 1, C)
    p = np.count_nonzero(s >= s[n][None, :] - 1e-12 * (1.0 + s[n][None, :]), axis=0) / (n + 1)
    kept = t[p > a]
    if kept.size == 0:  # no y in [0, 1] conforms (the fit's own value lies outside): the point alone
        return {"lower": pred, "upper": pred, "predicted": pred, "trivial": False, "n_cases": n}
    lo, hi = float(kept.min()), float(kept.max())
    return {"lower": lo, "upper": hi, "predicted": float(np.clip(pred, lo, hi)), "trivial": False, "n_cases": n}


# --- the calibration file's record -------------------------------------------------------------

def build_record(rows_per_case: list, class_names, alpha: float, alphas, tolerance_mm: float,
                 crop_mm: float = DEFAULT_CROP_MM) -> dict:
    """The calibration file's ``organ_quality`` record from ``case_organ_rows`` of every calibration
    case: per class the calibration pairs (feature, true value) of the cases where it was predicted."""
    a = check_alpha(alpha)
    names = list(class_names)
    classes = {}
    for ci, name in enumerate(names):
        rows = [r[ci] for r in rows_per_case if r[ci] is not None]
        classes[name] = {"n_predicted": len(rows),
                         **{f"x_{t}": [round(r[f"expected_{t}"], 6) for r in rows] for t in TARGETS},
                         **{f"y_{t}": [round(r[t], 6) for r in rows] for t in TARGETS}}
    return {"method": "full_conformal_ridge", "source": SOURCE, "alpha": a,
            "alphas": sorted({a, *[check_alpha(v) for v in alphas]}), "n_cases": len(rows_per_case),
            "min_cases": min_cases(a), "tolerance_mm": float(tolerance_mm), "crop_mm": float(crop_mm),
            "levels": list(LEVELS), "ridge_lambda": RIDGE_LAMBDA, "sigma_floor": SIGMA_FLOOR, "classes": classes}


def validate_record(rec, where: str = "calibration") -> None:
    """InputError naming what is wrong with an ``organ_quality`` record (None passes)."""
    if rec is None:
        return
    if not isinstance(rec, dict) or not isinstance(rec.get("classes"), dict):
        raise InputError(f"{where}: organ_quality must be an object with 'classes'")
    try:
        check_alpha(rec.get("alpha"))
    except InputError as exc:
        raise InputError(f"{where}: organ_quality.{exc}") from None
    tol = rec.get("tolerance_mm")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise InputError(f"{where}: organ_quality.tolerance_mm must be a distance in mm >= 0")
    if list(rec.get("levels") or []) != list(LEVELS):
        raise InputError(f"{where}: organ_quality was fitted with other levels than this version uses; refit")
    for name, c in rec["classes"].items():
        lens = {len(c.get(f"{p}_{t}") or []) for p in ("x", "y") for t in TARGETS}
        if lens != {int(c.get("n_predicted", -1))}:
            raise InputError(f"{where}: organ_quality.classes.{name} needs n_predicted values per list")
        vals = [v for p in ("x", "y") for t in TARGETS for v in c[f"{p}_{t}"]]
        if not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in vals):
            raise InputError(f"{where}: organ_quality.classes.{name} holds values outside [0, 1]")


def case_intervals(rec: dict, features: dict, alpha: float | None = None) -> dict:
    """Per organ of a case: {name: {"predicted": bool, "features": {...}, target: {"predicted",
    "lower", "upper", "trivial", "n_cases"}, "by_alpha": {α: {target: [lower, upper]}}}}.
    ``features[name]``: ``organ_features`` of the organ, or None when the case does not predict it."""
    a = rec["alpha"] if alpha is None else check_alpha(alpha)
    out = {}
    for name, feats in features.items():
        c = (rec.get("classes") or {}).get(name)
        if feats is None or c is None:
            out[name] = {"predicted": feats is not None, "features": feats,
                         "note": "not predicted in this case" if feats is None else "no calibration pairs"}
            continue
        entry = {"predicted": True, "features": feats, "by_alpha": {}}
        for t in TARGETS:
            entry[t] = conformal_interval(c[f"x_{t}"], c[f"y_{t}"], feats[f"expected_{t}"], a,
                                          rec.get("ridge_lambda", RIDGE_LAMBDA))
        for level in rec.get("alphas", [a]):
            iv = {t: conformal_interval(c[f"x_{t}"], c[f"y_{t}"], feats[f"expected_{t}"], level,
                                        rec.get("ridge_lambda", RIDGE_LAMBDA)) for t in TARGETS}
            entry["by_alpha"][f"{level:g}"] = {t: [round(iv[t]["lower"], 4), round(iv[t]["upper"], 4)]
                                               for t in TARGETS}
        out[name] = entry
    return out


def organ_line(name: str, entry: dict, alpha: float, tolerance_mm: float, void: str | None = None) -> str:
    """"Mandible: Dice 0.81 [0.72, 0.88], surface Dice (3 mm) 0.90 [0.80, 0.97], 90 %" (+ why void/trivial)."""
    if not entry.get("predicted"):
        return f"{name}: not predicted in this case (no interval)"
    if "dice" not in entry:
        return f"{name}: {entry.get('note', 'no interval')}"
    d, s = entry["dice"], entry["surface_dice"]
    pct = f"{100 * (1 - alpha):.0f} %"
    text = (f"{name}: Dice {d['predicted']:.2f} [{d['lower']:.2f}, {d['upper']:.2f}], surface Dice "
            f"({tolerance_mm:g} mm) {s['predicted']:.2f} [{s['lower']:.2f}, {s['upper']:.2f}], {pct}")
    if d.get("trivial"):
        text += f" (trivial interval: {d['n_cases']} calibration cases, {pct} needs ≥ {min_cases(alpha)})"
    if void:
        text += f" — VOID: {void}"
    return text


def describe_record(rec: dict | None) -> list[str]:
    """Readable lines for fit-temperature ([] without a record)."""
    if not rec:
        return []
    a, n, need = rec["alpha"], rec.get("n_cases", 0), rec.get("min_cases", min_cases(rec["alpha"]))
    pct = f"{100 * (1 - a):.0f} %"
    lines = [f"per-organ quality: predicted Dice and surface Dice ({rec['tolerance_mm']:g} mm) with {pct} full-conformal "
             f"intervals from {n} calibration cases"]
    short = {name: c["n_predicted"] for name, c in rec["classes"].items() if c["n_predicted"] < need}
    if short:
        lines.append(f"  trivial intervals [0, 1] for {', '.join(f'{k} ({v} cases)' for k, v in short.items())}: "
                     f"{pct} needs ≥ {need} calibration cases where the organ is predicted")
    for level in sorted(rec.get("alphas", [])):
        if level < a:
            lines.append(f"  a {100 * (1 - level):.0f} % interval needs ≥ {min_cases(level)} cases (have {n})")
            break
    return lines
