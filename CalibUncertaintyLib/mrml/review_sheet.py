"""A one-file review sheet a reviewer opens without Slicer: title, region table, snapshots.

For each of the top N error regions (METHODS.md section 5: connected components of {U > τ*} in
the ROI ranked by volume × mean U) the sheet shows the axial, sagittal and coronal planes
through the region's RAS centroid, rendered by snapshots.py with the overlay's current colour
table, threshold and opacity, and a cross at the centroid.

``.png``: one image composed with matplotlib (Figure + Agg canvas; pyplot's global state is
never touched). ``.html``: a single self-contained page (PNG snapshots embedded as base64),
which needs only VTK, so it also works in a Slicer without matplotlib.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path, write_text
from .snapshots import ORIENTATIONS, encode_png, render_slice

CROSS_RGB = (0, 255, 255)


def _layer_and_display(case_nodes, layer, controller):
    layers = case_nodes.layers()
    if layer is None and controller is not None:
        layer = controller.current_map
    if layer is None:
        layer = case_nodes.regions_doc.get("map")
    if layer not in layers:
        layer = next(iter(case_nodes.maps), None) or next(iter(layers))
    disp = layers[layer].GetDisplayNode()
    thr = (disp.GetLowerThreshold(), disp.GetUpperThreshold()) if disp.GetApplyThreshold() else None
    return layer, thr


def _calibration_text(summary: dict) -> str:
    cal = summary.get("calibration")
    if not cal:
        return "calibration: none (uncalibrated ensemble mean)"
    if isinstance(cal, dict):
        parts = [f"{k}={cal[k]:.3g}" if isinstance(cal[k], float) else f"{k}={cal[k]}"
                 for k in ("method", "temperature", "roi_rule") if k in cal]
        return "calibration: " + (", ".join(parts) or "yes")
    return f"calibration: {cal}"


def _draw_cross(rgb: np.ndarray, row: int, col: int, arm: int = 6, gap: int = 3) -> np.ndarray:
    out = rgb.copy()
    h, w, _ = out.shape
    for d in range(gap, arm + gap):
        for r, c in ((row - d, col), (row + d, col), (row, col - d), (row, col + d)):
            if 0 <= r < h and 0 <= c < w:
                out[r, c] = CROSS_RGB
    return out


def collect_snapshots(scene, case_nodes, top_n: int = 3, layer: str | None = None, opacity: float | None = None,
                      size_px: int = 256, fov_mm: float | None = None, controller=None):
    """[(region or None, [(orientation, rgb with centroid cross)])] for the top N regions, plus
    (layer, threshold). With no regions, one row through the volume centre."""
    if top_n < 1:
        raise InputError(f"top_n must be at least 1, got {top_n}")
    layer, thr = _layer_and_display(case_nodes, layer, controller)
    if opacity is None:
        opacity = controller.opacity if controller is not None else 0.6
    fg = case_nodes.layers()[layer].GetID()
    bg = case_nodes.input_volume.GetID() if case_nodes.input_volume is not None else None
    targets = [(r, r.centroid_ras) for r in case_nodes.regions[:top_n]]
    if not targets:
        centre = case_nodes.geometry.zyx_to_ras((np.asarray(case_nodes.geometry.shape_zyx) - 1) / 2.0)
        targets = [(None, tuple(centre))]
    rows = []
    for region, ras in targets:
        row = []
        for o in ORIENTATIONS:
            snap = render_slice(scene, ras, o, bg, fg, opacity, (size_px, size_px), fov_mm)
            rgb = _draw_cross(snap.rgb, *snap.pixel_of(ras)) if region is not None else snap.rgb
            row.append((o, rgb))
        rows.append((region, row))
    return rows, layer, thr


def _header(case_nodes, layer, thr) -> tuple[str, str]:
    title = f"CalibUncertainty review: case {case_nodes.case_id}"
    thr_txt = f"shown where {thr[0]:.3g} ≤ U ≤ {thr[1]:.3g}" if thr else "no threshold"
    src = case_nodes.default_thresholds.get(layer, (None, ""))[1]
    n_members = case_nodes.summary.get("n_members")
    sub = (f"overlay: {layer} ({thr_txt}; default τ from {src})\n"
           f"{_calibration_text(case_nodes.summary)} · members: {n_members if n_members else '?'} · "
           f"{len(case_nodes.regions)} regions")
    return title, sub


def _table_rows(regions):
    return [[f"R{r.rank}", r.class_name, f"{r.volume_mm3:.0f}", f"{r.mean_u:.3g}", f"{r.max_u:.3g}",
             "({:.1f}, {:.1f}, {:.1f})".format(*r.centroid_ras)] for r in regions]


TABLE_HEADER = ["region", "class", "volume mm³", "mean U", "max U", "centroid RAS mm"]


def _write_html(path: Path, case_nodes, rows, layer, thr, max_table_rows: int) -> Path:
    title, sub = _header(case_nodes, layer, thr)
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #aaa;padding:2px 8px;text-align:right}"
             "figure{display:inline-block;margin:4px}figcaption{text-align:center}</style></head><body>",
             f"<h1>{esc(title)}</h1>", f"<p>{esc(sub).replace(chr(10), '<br>')}</p>", "<table><tr>"]
    parts += [f"<th>{esc(h)}</th>" for h in TABLE_HEADER] + ["</tr>"]
    for tr in _table_rows(case_nodes.regions[:max_table_rows]):
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in tr) + "</tr>")
    parts.append("</table>")
    for region, row in rows:
        label = region.label if region is not None else "volume centre (no regions)"
        parts.append(f"<h2>{esc(label)}</h2>")
        for o, rgb in row:
            b64 = base64.b64encode(encode_png(rgb)).decode("ascii")
            parts.append(f"<figure><img alt='{esc(o)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{esc(o)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return write_text(path, "\n".join(parts))


def _write_png(path: Path, case_nodes, rows, layer, thr, max_table_rows: int, dpi: int = 100) -> Path:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise InputError("a PNG review sheet needs matplotlib; write an .html sheet instead "
                         "(it needs only VTK) or install matplotlib") from e
    from . import colors

    title, sub = _header(case_nodes, layer, thr)
    table = _table_rows(case_nodes.regions[:max_table_rows])
    n_rows = len(rows)
    table_h = 0.35 + 0.22 * max(len(table), 1)
    fig = Figure(figsize=(10, 1.0 + table_h + 3.3 * n_rows), dpi=dpi)
    FigureCanvasAgg(fig)
    total = 1.0 + table_h + 3.3 * n_rows
    fig.text(0.5, 1 - 0.35 / total, title, ha="center", va="center", fontsize=14, weight="bold")
    fig.text(0.5, 1 - 0.72 / total, sub, ha="center", va="center", fontsize=7.5)
    ax_t = fig.add_axes([0.05, 1 - (1.0 + table_h) / total, 0.9, table_h / total])
    ax_t.axis("off")
    if table:
        tab = ax_t.table(cellText=table, colLabels=TABLE_HEADER, loc="upper center", cellLoc="center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(8)
    else:
        ax_t.text(0.5, 0.5, "no error regions above the threshold", ha="center", va="center")
    key = colors.PROBABILITY if layer.startswith("prob_") else colors.UNCERTAINTY
    lut = colors.table_rgba(key)[:, :3].astype(float) / 255.0
    lo, hi = case_nodes.value_ranges.get(layer, (0.0, 1.0))
    for i, (region, row) in enumerate(rows):
        top = 1 - (1.0 + table_h + 3.3 * i) / total
        label = region.label if region is not None else "volume centre (no regions)"
        fig.text(0.05, top - 0.12 / total, label, fontsize=10, weight="bold", va="center")
        for j, (o, rgb) in enumerate(row):
            ax = fig.add_axes([0.05 + 0.3 * j, top - 3.25 / total, 0.28, 2.75 / total])
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(o, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    cax = fig.add_axes([0.955, 0.1, 0.012, 0.5])
    cax.imshow(lut[::-1, None, :], aspect="auto", extent=(0, 1, lo, hi))
    cax.set_xticks([])
    cax.tick_params(labelsize=7)
    cax.yaxis.set_label_position("left")
    cax.set_ylabel(layer, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def write_review_sheet(scene, case_nodes, out_png_or_html, top_n: int = 3, layer: str | None = None,
                       opacity: float | None = None, size_px: int = 256, fov_mm: float | None = None,
                       controller=None, max_table_rows: int = 20) -> Path:
    """Write the review sheet for a loaded case to ``.png`` or ``.html`` (atomically).

    ``layer`` defaults to the controller's current overlay, else the map the regions were cut
    on; its current display threshold and colour table are used, at ``opacity`` (default: the
    controller's, else 0.6). Returns the path written.
    """
    path = Path(out_png_or_html)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise InputError(f"review sheet must be .png or .html, got {path.name}")
    rows, layer, thr = collect_snapshots(scene, case_nodes, top_n, layer, opacity, size_px, fov_mm, controller)
    if suffix == ".png":
        return _write_png(path, case_nodes, rows, layer, thr, max_table_rows)
    return _write_html(path, case_nodes, rows, layer, thr, max_table_rows)
