"""PNG figures for the evaluation report, drawn from plain tables (no volumes).

- ``reliability_diagram``: accuracy against mean confidence per equal-width bin (rows of
  ``metrics.ece.reliability_table`` or ``report.tables.merge_reliability_tables``), before and
  after calibration side by side, with the diagonal of perfect calibration, the ECE of each
  table (METHODS.md §3: sum_b (n_b/N)|acc_b − conf_b|) and a histogram of the bin counts.
- ``ueo_threshold_plot``: UEO(τ) = Dice({U > τ}, E) against τ, one panel per map, with τ*
  marked (METHODS.md §4).
- ``budget_curve_plot``: UEO when flagging the top k % most uncertain ROI voxels, k ∈ (0, 5 %],
  one line per map, plus the oracle (METHODS.md §4).

matplotlib is imported inside the functions and used through ``Figure`` + the Agg canvas,
never ``pyplot``, so no global backend is touched (safe inside Slicer), and every figure is drawn
under ``report.style.fixed_style`` (matplotlib's defaults plus the project's sizes), so a library
that changes the global style in the same process (``seaborn.set(font_scale=2.5)`` in nnU-Net's
logger) cannot change them. Files are written atomically.
- ``conformal_plot``: held-out mean miss rate (± standard error) of the conformal flags per map
  and of the organ margins against α, with the line miss = α (METHODS.md §7).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..io.atomic import atomic_path
from .style import styled
from .tables import ece_from_table


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


@styled
def reliability_diagram(path: str | os.PathLike, tables: dict[str, list[dict]], title: str = "") -> Path:
    """Reliability diagram, one column per table (e.g. {"before calibration": rows, "after ...": rows}).

    Top: bars of accuracy per bin at the bin's mean confidence, the gap to the diagonal shaded;
    bottom: voxel count per bin (log scale). Each panel's title gives its ECE.
    """
    n = len(tables)
    fig = _figure(4.2 * n, 5.6)
    axes = fig.subplots(2, n, squeeze=False, gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for j, (name, rows) in enumerate(tables.items()):
        top, bottom = axes[0][j], axes[1][j]
        filled = [r for r in rows if r["count"]]
        width = (rows[0]["hi"] - rows[0]["lo"]) if rows else 0.1
        top.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="perfect calibration")
        top.bar([r["lo"] for r in filled], [r["accuracy"] for r in filled], width=width, align="edge",
                color="#4C72B0", edgecolor="white", label="accuracy")
        top.bar([r["lo"] for r in filled], [r["mean_confidence"] - r["accuracy"] for r in filled],
                bottom=[r["accuracy"] for r in filled], width=width, align="edge", color="#DD8452",
                alpha=0.45, edgecolor="none", label="gap to confidence")
        top.plot([r["mean_confidence"] for r in filled], [r["accuracy"] for r in filled], "o",
                 color="black", ms=3)
        ece = ece_from_table(rows)
        top.set_title(f"{name}\nECE = {ece:.4f}" if ece is not None else f"{name}\n(no voxels)", fontsize=10)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.legend(loc="upper left", fontsize=7)
        bottom.bar([r["lo"] for r in rows], [max(r["count"], 0) for r in rows], width=width, align="edge",
                   color="0.6", log=any(r["count"] for r in rows))
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("voxels")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.09, top=0.85, hspace=0.08, wspace=0.3)
    return _save(fig, path)


@styled
def ueo_threshold_plot(path: str | os.PathLike, curves: dict[str, dict], title: str = "") -> Path:
    """UEO against τ, one panel per map.

    ``curves[map] = {"tau": [...], "ueo": [...], "tau_star": x | None, "label": optional panel title}``.
    """
    names = list(curves)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = _figure(3.2 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(ax for row in axes for ax in row):
        if i >= len(names):
            ax.set_visible(False)
            continue
        c = curves[names[i]]
        ax.plot(c["tau"], c["ueo"], color="#4C72B0", lw=1.5)
        if c.get("tau_star") is not None:
            ax.axvline(c["tau_star"], color="#C44E52", ls="--", lw=1, label=f"τ* = {c['tau_star']:.3g}")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_title(c.get("label", names[i]), fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("threshold τ", fontsize=8)
        ax.set_ylabel("mean UEO", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.9 if title else 0.95, hspace=0.55, wspace=0.35)
    return _save(fig, path)


@styled
def budget_curve_plot(path: str | os.PathLike, curves: dict[str, dict], title: str = "") -> Path:
    """UEO against the flagged fraction of ROI voxels (in %), one line per map, oracle dashed.

    ``curves[map] = {"fractions": [...], "ueo": [...], "normalised_area": x}``; an optional
    ``"oracle_ueo"`` in any entry is drawn once as the oracle.
    """
    fig = _figure(9.0, 4.2)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.08, right=0.66, bottom=0.12, top=0.9)
    oracle = None
    for name, c in curves.items():
        area = c.get("normalised_area")
        label = f"{name} (area {area:.3f})" if area is not None else name
        ax.plot([100 * f for f in c["fractions"]], c["ueo"], lw=1.4, label=label)
        if oracle is None and c.get("oracle_ueo") is not None:
            oracle = c
    if oracle is not None:
        ax.plot([100 * f for f in oracle["fractions"]], oracle["oracle_ueo"], color="black", ls="--", lw=1,
                label="oracle (errors first)")
    ax.set_ylim(0, 1)
    return _finish_with_side_legend(fig, ax, path, "ROI voxels flagged, most uncertain first (%)", "mean UEO", title)


@styled
def conformal_plot(path: str | os.PathLike, summary: dict, title: str = "") -> Path:
    """Held-out mean miss rate against α: left the flags (one line per map), right the organ
    margins (outer miss and inner 1 − precision, mean over classes); the guarantee is the
    region under the diagonal. ``summary``: ``metrics.conformal_check.summarise``."""
    fig = _figure(10.0, 4.2)
    left, right = fig.subplots(1, 2)
    top = max([0.35] + [r["alpha"] for rows in summary["flags"].values() for r in rows])
    for ax in (left, right):
        ax.plot([0, top], [0, top], color="0.4", ls="--", lw=1, label="miss = α")
        ax.set_xlim(0, top)
        ax.set_xlabel("α (target)")
    trivial_alphas = set()
    for name, rows in summary["flags"].items():
        rows = [r for r in rows if r["mean_miss"] is not None]
        if rows:
            left.errorbar([r["alpha"] for r in rows], [r["mean_miss"] for r in rows],
                          yerr=[r["se"] or 0.0 for r in rows], marker="o", ms=3, lw=1.2, capsize=2, label=name)
            trivial_alphas.update(r["alpha"] for r in rows if r.get("trivial"))
    if trivial_alphas:  # a trivial guarantee (whole ROI flagged) is shown as such, not as a result
        xs = sorted(trivial_alphas)
        left.scatter(xs, [0.0] * len(xs), marker="x", s=60, color="crimson", zorder=5,
                     label="trivial: whole ROI flagged")
        n, need = summary.get("n_calibration_cases"), summary.get("min_cases")
        note = f"trivial guarantee at α = {', '.join(f'{a:g}' for a in xs)}:\n{n} calibration case(s)"
        if need and n is not None and n < need:
            note += f"; α = {summary['alpha']:g} needs ≥ {need}"
        left.text(0.03, 0.6, note, transform=left.transAxes, fontsize=8, color="crimson", va="top")
    left.set_ylabel("held-out mean fraction of errors not flagged")
    left.set_title("error flags")
    left.legend(loc="upper left", ncol=2)
    margins = summary.get("margins") or {}
    if margins:
        import numpy as np

        alphas = sorted({r["alpha"] for rows in margins.values() for r in rows})
        for key, label in (("mean_outer_miss", "outer: organ voxels outside"),
                           ("mean_inner_fdp", "inner: 1 − precision")):
            vals = [np.mean([r[key] for rows in margins.values() for r in rows if r["alpha"] == a]) for a in alphas]
            right.plot(alphas, vals, marker="o", ms=3, lw=1.2, label=label)
        trivial_m = sorted({r["alpha"] for rows in margins.values() for r in rows if r.get("trivial")})
        if trivial_m:
            right.scatter(trivial_m, [0.0] * len(trivial_m), marker="x", s=60, color="crimson", zorder=5,
                          label="trivial: outer = image / inner empty")
        right.set_title(f"organ margins (mean over {len(margins)} classes)")
        right.set_ylabel("held-out mean rate")
        right.legend(loc="upper left")
    else:
        right.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.85, wspace=0.28)
    return _save(fig, path)


@styled
def risk_coverage_plot(path: str | os.PathLike, triage: dict, title: str = "") -> Path:
    """Risk–coverage curves of the case triage (``metrics.triage.triage_summary``): mean risk of the
    cases accepted without review against the fraction accepted (lowest priority first), one line
    per aggregate (the review priority drawn thick), the oracle (true risk) dashed."""
    fig = _figure(9.0, 4.2)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.08, right=0.62, bottom=0.12, top=0.9)
    for name, v in triage.get("aggregates", {}).items():
        rc = v.get("risk_coverage")
        if not rc:
            continue
        main = name == triage.get("priority")
        ax.plot([100 * c for c in rc["coverage"]], rc["risk"], marker="o", ms=3, lw=2.6 if main else 1.2,
                label=f"{name}{' (priority)' if main else ''} AURC {rc['aurc']:.3f}")
    oracle = triage.get("oracle")
    if oracle:
        ax.plot([100 * c for c in oracle["coverage"]], oracle["risk"], color="black", ls="--", lw=1,
                label=f"oracle (true risk) AURC {oracle['aurc']:.3f}")
    ax.set_xlim(0, 100)
    return _finish_with_side_legend(fig, ax, path, "cases accepted without review, lowest priority first (%)",
                                    "mean risk of accepted cases (1 − Dice)", title)


def _finish_with_side_legend(fig, ax, path, xlabel: str, ylabel: str, title: str) -> Path:
    """Axis labels, the legend right of the axes (room left by ``subplots_adjust``), title, save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path)
