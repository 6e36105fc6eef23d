"""Out-of-distribution check of a case: how much of the body the model doubts, against the
calibration cases (this project's definition; METHODS.md §6 asks for case aggregates, this one is
ROI-free).

Why not the §6 aggregates: they look at the ROI, i.e. at the organs the model *predicted*. On a CT
unlike its training data (an abdomen given to a head-and-neck model) the model predicts little or
odd foreground, so a mean over that ROI says little, and the uncertainty that does betray the
foreign input lies away from any predicted organ. These aggregates look at the whole body instead:

- Domain B of a case: its **body**, the voxels of the CT (channel 0) at or above ``BODY_HU`` =
  −500 HU (air and lung below, all soft tissue and bone above); without the CT, the whole image.
  The calibration reference records which domain it used, and a case is measured on the same one.
- Reference threshold u_ref(U), fitted on the **calibration cases** only: the ``q`` = 0.99
  quantile of U over their domain voxels, each case weighted equally (each case contributes a
  fixed-seed uniform sample of at most ``SAMPLE_PER_CASE`` domain voxels, weight 1/n_i per voxel).
- Aggregate of a case: **high-U body fraction** f(U) = |{x ∈ B : U(x) > u_ref}| / |B|, for U =
  the calibrated predictive entropy (``high_entropy_body_fraction``) and the members' mutual
  information (``high_mi_body_fraction``, ensembles only: one member has MI = 0). On cases like
  the calibration cases f is about 1 − q = 0.01 on average: a model on its own distribution is
  confident nearly everywhere but in a thin shell around the organs it segments. Doubt spread over
  the body (f ≫ 0.01) means the input is unlike what the model knows.
- **Organ volume atypicality** (``organ_volume_atypicality``; no CT needed): the mean over the
  foreground classes c of |ln((V_c + v0) / (m_c + v0))|, V_c the case's predicted volume of c in mm³,
  m_c the median predicted volume of c over the calibration cases, v0 = 1000 mm³ (1 ml: differences
  well below a millilitre count little, an organ that is missing or ten times too large counts
  ln 10 ≈ 2.3). A patient of the kind the model knows has organs of typical size; a CT of another
  body region gives missing or absurd organs. The calibration cases' own values are leave-one-out
  (each against the median of the others), so they are distributed like a new case's.
- Atypicality p-value of a case's aggregate s against the n calibration cases' values r_i (a
  conformal p-value): p = (1 + #{i : r_i ≥ s}) / (n + 1). Under exchangeability with the
  calibration cases P(p ≤ a) ≤ a; p = 1/(n + 1) means "beyond every calibration case". With n
  calibration cases no p-value is below 1/(n + 1), so this says little for small n; the ranking by
  f itself is what triage uses.

No threshold here is chosen on test cases: u_ref and the reference values come from the
calibration cases (``fit-temperature``), stored in the calibration file's ``case_reference``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

BODY_HU = -500.0
REFERENCE_QUANTILE = 0.99
SAMPLE_PER_CASE = 200_000
#: aggregate name -> the uncertainty map it counts
OOD_AGGREGATES = {"high_entropy_body_fraction": "entropy", "high_mi_body_fraction": "mutual_information"}
VOLUME_AGGREGATE = "organ_volume_atypicality"
VOLUME_V0_MM3 = 1000.0
#: every atypicality aggregate (each with a p-value ``<name>_p``)
ATYPICALITY_AGGREGATES = (*OOD_AGGREGATES, VOLUME_AGGREGATE)


def volume_atypicality(volumes_mm3, medians_mm3, v0: float = VOLUME_V0_MM3) -> float:
    """mean_c |ln((V_c + v0) / (m_c + v0))| over the foreground classes (module docstring)."""
    v = np.asarray(volumes_mm3, dtype=np.float64)
    m = np.asarray(medians_mm3, dtype=np.float64)
    if v.shape != m.shape or v.ndim != 1 or v.size == 0:
        raise InputError(f"need one predicted volume per foreground class: {v.shape} against {m.shape}")
    return float(np.mean(np.abs(np.log((v + v0) / (m + v0)))))


def body_mask(ct: np.ndarray, hu: float = BODY_HU) -> np.ndarray:
    """Voxels of the CT at or above ``hu`` (Hounsfield units): the body, couch included."""
    ct = np.asarray(ct)
    if ct.ndim != 3:
        raise InputError(f"body mask needs a 3-D CT (z, y, x), got shape {ct.shape}")
    return ct >= hu


def read_case_domain(image_path, shape_zyx, domain: str = "body") -> np.ndarray | None:
    """``case_domain`` of the CT file ``image_path`` (channel 0; None = no CT)."""
    ct = None
    if image_path is not None and domain == "body":
        from ..io.images import read_image

        ct, _ = read_image(image_path, allow_nonfinite=True)
    return case_domain(ct, shape_zyx, domain)


def case_domain(ct, shape_zyx, domain: str = "body") -> np.ndarray | None:
    """The case's domain mask: its body (``ct`` given, ``domain`` "body") or the whole image
    (``domain`` "whole_image"). None when the body is asked for and no CT is given."""
    if domain == "whole_image":
        return np.ones(tuple(shape_zyx), dtype=bool)
    if domain != "body":
        raise InputError(f"unknown atypicality domain {domain!r} (body or whole_image)")
    if ct is None:
        return None
    mask = body_mask(ct)
    if mask.shape != tuple(shape_zyx):
        raise InputError(f"CT has shape {mask.shape}, the maps {tuple(shape_zyx)}")
    return mask


def domain_sample(u: np.ndarray, domain: np.ndarray, n: int = SAMPLE_PER_CASE, seed: int = 0) -> np.ndarray:
    """A fixed-seed uniform sample (without replacement) of at most ``n`` values of ``u`` in ``domain``."""
    vals = np.asarray(u)[domain]
    if vals.size > n:
        vals = vals[np.sort(np.random.default_rng(seed).choice(vals.size, n, replace=False))]
    return vals.astype(np.float32, copy=False)


def weighted_quantile(samples: list, q: float) -> float:
    """The ``q`` quantile of the mixture of the cases' samples, each case weighted equally:
    the smallest value v with Σ_i (1/n_i)·#{sample_i ≤ v} ≥ q · (number of non-empty cases)."""
    parts = [np.asarray(s, dtype=np.float64) for s in samples if np.asarray(s).size]
    if not parts:
        raise InputError("no domain voxel in any calibration case: cannot fit the atypicality reference")
    vals = np.concatenate(parts)
    w = np.concatenate([np.full(p.size, 1.0 / p.size) for p in parts])
    order = np.argsort(vals, kind="stable")
    cum = np.cumsum(w[order])
    i = int(np.searchsorted(cum, q * len(parts) - 1e-12, side="left"))
    return float(vals[order][min(i, vals.size - 1)])


def high_u_fraction(u: np.ndarray, domain: np.ndarray, u_ref: float) -> float | None:
    """f = |{x ∈ domain : u(x) > u_ref}| / |domain| (None for an empty domain)."""
    n = int(np.count_nonzero(domain))
    if n == 0:
        return None
    return float(np.count_nonzero(np.asarray(u)[domain] > u_ref) / n)


def p_value(score: float | None, reference_scores) -> float | None:
    """Conformal p-value (1 + #{r ≥ s}) / (n + 1) of ``score`` against the calibration cases' values."""
    ref = [float(r) for r in reference_scores if r is not None]
    if score is None or not ref:
        return None
    return (1 + sum(r >= score for r in ref)) / (len(ref) + 1)


def fit_reference(samples_per_case: list[dict], domain: str, n_members: int,
                  q: float = REFERENCE_QUANTILE, volumes_per_case: list | None = None) -> dict:
    """The calibration file's ``case_reference`` from the calibration cases' domain samples
    (``samples_per_case[i][map]`` = ``domain_sample`` of that map on case i).

    ``volumes_per_case[i]``: case i's predicted volume (mm³) per foreground class.

    Returns ``{"q", "domain", "body_hu", "sample_per_case", "n_cases", "u_ref": {map: value},
    "volume_median_mm3": [per class], "v0_mm3", "scores": {aggregate: [value per calibration case]}}``;
    the MI aggregate is left out for one member, the volume one without volumes.
    """
    if not samples_per_case:
        raise InputError("no calibration case for the atypicality reference")
    rec = {"q": float(q), "domain": domain, "body_hu": BODY_HU if domain == "body" else None,
           "sample_per_case": SAMPLE_PER_CASE, "n_cases": len(samples_per_case), "u_ref": {}, "scores": {}}
    for agg, name in OOD_AGGREGATES.items():
        if name == "mutual_information" and n_members < 2:
            continue
        samples = [s[name] for s in samples_per_case]
        u_ref = weighted_quantile(samples, q)
        rec["u_ref"][name] = u_ref
        rec["scores"][agg] = [float(np.mean(s > u_ref)) if s.size else None for s in samples]
    if volumes_per_case:
        vols = np.asarray(volumes_per_case, dtype=np.float64)
        rec["volume_median_mm3"] = np.median(vols, axis=0).tolist()
        rec["v0_mm3"] = VOLUME_V0_MM3
        n = vols.shape[0]
        rec["scores"][VOLUME_AGGREGATE] = [
            volume_atypicality(vols[i], np.median(np.delete(vols, i, axis=0), axis=0)) if n > 1 else None
            for i in range(n)]
    return rec


def case_atypicality(maps: dict, domain_mask: np.ndarray | None, reference: dict | None,
                     volumes_mm3=None) -> dict:
    """The atypicality aggregates of one case: ``{aggregate: value, aggregate + "_p": p-value}`` for each
    aggregate of ``reference`` whose map is in ``maps`` (with a domain), and the organ volume one when
    ``volumes_mm3`` (predicted volume per foreground class) is given; {} without a reference."""
    if not reference:
        return {}
    out = {}
    if volumes_mm3 is not None and VOLUME_AGGREGATE in reference.get("scores", {}):
        v = volume_atypicality(volumes_mm3, reference["volume_median_mm3"], reference.get("v0_mm3", VOLUME_V0_MM3))
        out[VOLUME_AGGREGATE] = v
        out[f"{VOLUME_AGGREGATE}_p"] = p_value(v, reference["scores"][VOLUME_AGGREGATE])
    if domain_mask is None:
        return out
    for agg, name in OOD_AGGREGATES.items():
        if agg not in reference.get("scores", {}) or name not in maps:
            continue
        f = high_u_fraction(maps[name], domain_mask, reference["u_ref"][name])
        out[agg] = f
        out[f"{agg}_p"] = p_value(f, reference["scores"][agg])
    return out


def check_reference(rec) -> dict | None:
    """Validate a calibration file's ``case_reference`` record (None passes)."""
    if rec is None:
        return None
    if not isinstance(rec, dict) or rec.get("domain") not in ("body", "whole_image") \
            or not isinstance(rec.get("u_ref"), dict) or not isinstance(rec.get("scores"), dict):
        raise InputError("'case_reference' must hold domain (body | whole_image), u_ref and scores")
    for name, v in rec["u_ref"].items():
        if not np.isfinite(float(v)):
            raise InputError(f"case_reference u_ref of {name} is not finite")
    return rec


# --- naming the atypical case ------------------------------------------------------------------
#: a case is *named* atypical when one of its atypicality p-values is at most this level (per
#: aggregate, a case exchangeable with the calibration cases gets p ≤ ATYPICAL_P with probability
#: at most ATYPICAL_P; with n calibration cases no p-value is below 1/(n + 1), so n ≥ 9 is needed
#: to name any case at 0.1)
ATYPICAL_P = 0.1
#: how the product words each aggregate for a reader
AGGREGATE_LABELS = {VOLUME_AGGREGATE: "organ volumes",
                    "high_entropy_body_fraction": "high-entropy body fraction",
                    "high_mi_body_fraction": "high-MI body fraction"}


def atypical_evidence(aggregates: dict | None, level: float = ATYPICAL_P) -> list[dict]:
    """The atypicality aggregates of one case (its ``case_aggregates``) whose p-value is ≤ ``level``,
    smallest p first: ``[{"aggregate", "label", "value", "p"}]``; [] when none is (or none was computed)."""
    out = []
    for agg in ATYPICALITY_AGGREGATES:
        p = (aggregates or {}).get(f"{agg}_p")
        if p is None or not np.isfinite(float(p)) or float(p) > level:
            continue
        out.append({"aggregate": agg, "label": AGGREGATE_LABELS[agg], "value": aggregates.get(agg), "p": float(p)})
    return sorted(out, key=lambda e: e["p"])


def describe_atypical(aggregates: dict | None, level: float = ATYPICAL_P) -> str | None:
    """One case's atypicality in words ("organ volumes p = 0.04, high-entropy body fraction p = 0.09"),
    or None when no aggregate's p-value is ≤ ``level``. For the per-case verdict and the summaries."""
    ev = atypical_evidence(aggregates, level)
    if not ev:
        return None
    return ", ".join(f"{e['label']} p = {e['p']:.2g}" for e in ev)


def atypical_cases(records, level: float = ATYPICAL_P) -> list[tuple[str, str]]:
    """``[(case, description)]`` of the records (each ``{"case", "case_aggregates"}``, as ``maps`` /
    ``predict`` return them and the folder index keeps them) named atypical, most atypical first."""
    named = []
    for r in records or []:
        ev = atypical_evidence((r or {}).get("case_aggregates"), level)
        if ev:
            named.append((ev[0]["p"], str(r.get("case")), describe_atypical(r.get("case_aggregates"), level)))
    return [(c, d) for _, c, d in sorted(named, key=lambda t: t[0])]


def atypical_summary_line(records, level: float = ATYPICAL_P) -> str | None:
    """The end-of-run line of ``maps`` / ``predict``: the cases unlike the calibration cases, with
    their p-values; None when no case is (or no calibration reference was used)."""
    named = atypical_cases(records, level)
    if not named:
        return None
    return (f"Atypical case(s), unlike the calibration cases (p ≤ {level:g}; calibration and guarantees assume "
            f"cases like them, review these first): " + "; ".join(f"{c} ({d})" for c, d in named))


def atypicality_warning(aggregates: dict | None, level: float = ATYPICAL_P) -> str | None:
    """The warning a viewer shows for one case (the Slicer panel, the review sheet), or None."""
    text = describe_atypical(aggregates, level)
    if text is None:
        return None
    return (f"Warning: this case is unlike the calibration cases ({text}). The calibration, the flags' and "
            "margins' guarantees assume cases like them: review the whole case, not only the flagged regions.")
