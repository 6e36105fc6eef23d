"""A one-file review sheet a reviewer opens without Slicer: title, region table, snapshots.

For each of the top N error regions (METHODS.md section 5: connected components of {U > τ*} in
the ROI ranked by volume × mean U) the sheet shows the axial, sagittal and coronal planes
through the region's RAS centroid, rendered by snapshots.py with the overlay's current colour
table, threshold and opacity, a cross at the centroid and the region's bounding box (dashed).

``.png``: one image composed with matplotlib (Figure + Agg canvas; pyplot's global state is
never touched); without matplotlib (Slicer does not ship it) a plainer PNG of the same snapshots
and the colour bar, and a warning that says what is missing. ``.html``: a single self-contained page (PNG snapshots embedded as base64),
which needs only VTK, so it also works in a Slicer without matplotlib.

Colour window: when the overlay's colour window would saturate the voxels it shows (the top of
the window below the 99th percentile of the shown values, e.g. when τ* lies above the robust
maximum of the whole map, so every shown voxel gets the brightest colour), the sheet renders
with the window's top raised to that percentile and restores the display node afterwards;
the colour bar shows the window used and marks the threshold.
"""

from __future__ import annotations

import base64
import contextlib
import html
import itertools
import logging
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path, write_text
from ..report.style import styled
from .snapshots import ORIENTATIONS, encode_png, render_slice

log = logging.getLogger(__name__)

CROSS_RGB = (0, 255, 255)


def _ensure_layer(scene, case_nodes, layer) -> None:
    """A class probability asked for by name becomes a node first (they load on demand)."""
    if layer is not None and layer not in case_nodes.layers() and layer in case_nodes.layer_names():
        case_nodes.layer_node(scene, layer)


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


def region_box_px(snap, geometry, region) -> tuple[int, int, int, int] | None:
    """(row_min, row_max, col_min, col_max) of a region's bounding box (regions.json
    ``bbox_zyx_min``/``bbox_zyx_max``, voxel edges included) projected onto a snapshot, or None
    when the region carries no box."""
    lo, hi = region.raw.get("bbox_zyx_min"), region.raw.get("bbox_zyx_max")
    if lo is None or hi is None:
        return None
    lo, hi = np.asarray(lo, float) - 0.5, np.asarray(hi, float) + 0.5
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    pixels = np.array([snap.pixel_of(p) for p in geometry.zyx_to_ras(corners)])
    return (int(pixels[:, 0].min()), int(pixels[:, 0].max()), int(pixels[:, 1].min()), int(pixels[:, 1].max()))


def _draw_box(rgb: np.ndarray, box, dash: int = 4, gap: int = 3) -> np.ndarray:
    """Dashed rectangle (rows r0..r1, cols c0..c1) in the cross colour, clipped to the image."""
    out = rgb.copy()
    h, w, _ = out.shape
    r0, r1, c0, c1 = box
    on = [(i % (dash + gap)) < dash for i in range(max(h, w) * 2 + abs(r1 - r0) + abs(c1 - c0) + 2)]
    for k, c in enumerate(range(c0, c1 + 1)):
        for r in (r0, r1):
            if on[k] and 0 <= r < h and 0 <= c < w:
                out[r, c] = CROSS_RGB
    for k, r in enumerate(range(r0, r1 + 1)):
        for c in (c0, c1):
            if on[k] and 0 <= r < h and 0 <= c < w:
                out[r, c] = CROSS_RGB
    return out


def collect_snapshots(scene, case_nodes, top_n: int = 3, layer: str | None = None, opacity: float | None = None,
                      size_px: int = 256, fov_mm: float | None = None, controller=None):
    """[(region or None, [(orientation, rgb with centroid cross and dashed bounding box)])] for
    the top N regions, plus (layer, threshold). With no regions, one row through the volume centre."""
    if top_n < 1:
        raise InputError(f"top_n must be at least 1, got {top_n}")
    _ensure_layer(scene, case_nodes, layer)
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
            rgb = snap.rgb
            if region is not None:
                box = region_box_px(snap, case_nodes.geometry, region)
                rgb = _draw_cross(rgb if box is None else _draw_box(rgb, box), *snap.pixel_of(ras))
            row.append((o, rgb))
        rows.append((region, row))
    return rows, layer, thr


def _regions_text(case_nodes) -> str:
    doc = case_nodes.regions_doc
    rmap, tau = doc.get("map"), doc.get("threshold")
    if not rmap or tau is None:
        return "regions: as listed in regions.json\ncyan +: region centroid · dashed box: the region's bounding box"
    op = "<" if doc.get("flag") == "below" else ">"
    radius = (doc.get("roi") or {}).get("radius_mm")
    roi = f" within {radius:g} mm of the prediction" if isinstance(radius, (int, float)) else ""
    return (f"regions: connected components of {{{rmap} {op} {tau:.3g}}}{roi}, ranked by volume × mean U\n"
            "cyan +: region centroid · dashed box: the region's bounding box")


def _header(case_nodes, layer, thr) -> tuple[str, str]:
    title = f"CalibUncertainty review: case {case_nodes.case_id}"
    thr_txt = f"shown where {thr[0]:.3g} ≤ U ≤ {thr[1]:.3g}" if thr else "no threshold"
    src = case_nodes.default_thresholds.get(layer, (None, ""))[1]
    n_members = case_nodes.summary.get("n_members")
    sub = (f"overlay: {layer} ({thr_txt}; τ: {src})\n"
           f"{_calibration_text(case_nodes.summary)} · members: {n_members if n_members else '?'} · "
           f"{len(case_nodes.regions)} regions\n{_regions_text(case_nodes)}")
    organs = _organ_lines(case_nodes)
    return title, sub + ("\n" + "\n".join(organs) if organs else "")


def _organ_lines(case_nodes) -> list[str]:
    """One line per organ (predicted Dice, surface Dice, intervals, coverage) and whether the
    case's guarantees apply (``report.guarantees``); [] without per-organ quality."""
    from ..report.guarantees import organ_rows, void_reason

    rows = organ_rows(case_nodes.summary)
    if not rows:
        return []
    void = void_reason(case_nodes.summary)
    return ([f"GUARANTEES VOID: {void}"] if void else []) + [r["text"] for r in rows]


def _more_text(case_nodes, max_table_rows: int) -> str | None:
    extra = len(case_nodes.regions) - max_table_rows
    return f"… and {extra} more region(s), all in regions.json" if extra > 0 else None


def sheet_window(case_nodes, layer: str, thr) -> tuple[float, float]:
    """Colour window (lo, hi) the sheet renders ``layer`` with: the display node's window, its
    top raised to the 99th percentile of the shown values (within ``thr``) when it lies below
    it (module docstring)."""
    import slicer

    node = case_nodes.layers()[layer]
    disp = node.GetDisplayNode()
    lo, hi = float(disp.GetWindowLevelMin()), float(disp.GetWindowLevelMax())
    if thr is None:
        return lo, hi
    a = slicer.util.arrayFromVolume(node)
    shown = a[(a >= thr[0]) & (a <= thr[1])]
    if shown.size == 0:
        return lo, hi
    top = float(np.quantile(shown, 0.99))
    return (lo, top) if top > hi else (lo, hi)


@contextlib.contextmanager
def _rendered_window(node, window):
    """Set the node's colour window for the block; restore the previous window afterwards."""
    disp = node.GetDisplayNode()
    before = (disp.GetAutoWindowLevel(), disp.GetWindowLevelMin(), disp.GetWindowLevelMax())
    if (before[1], before[2]) == tuple(window):
        yield
        return
    disp.AutoWindowLevelOff()
    disp.SetWindowLevelMinMax(*window)
    try:
        yield
    finally:
        disp.SetWindowLevelMinMax(before[1], before[2])
        disp.SetAutoWindowLevel(before[0])


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
    more = _more_text(case_nodes, max_table_rows)
    if more:
        parts.append(f"<p>{esc(more)}</p>")
    for region, row in rows:
        label = region.label if region is not None else "volume centre (no regions)"
        parts.append(f"<h2>{esc(label)}</h2>")
        for o, rgb in row:
            b64 = base64.b64encode(encode_png(rgb)).decode("ascii")
            parts.append(f"<figure><img alt='{esc(o)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{esc(o)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return write_text(path, "\n".join(parts))


def matplotlib_available() -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return False
    return True


NO_MATPLOTLIB_MESSAGE = ("matplotlib is not installed, so the PNG review sheet has the snapshots and the "
                         "colour bar but no title, labels or region table; the .html sheet has them all "
                         "(it needs only VTK), or install matplotlib")


def _write_png_plain(path: Path, case_nodes, rows, layer, window=None, gap: int = 8) -> Path:
    """The PNG sheet without matplotlib: the snapshots in a grid (one row per region: axial,
    sagittal, coronal) and a vertical colour bar at the right, encoded with VTK's PNG writer."""
    from . import colors

    tiles = [[rgb for _o, rgb in row] for _region, row in rows]
    th = max(t.shape[0] for r in tiles for t in r)
    tw = max(t.shape[1] for r in tiles for t in r)
    ncol = max(len(r) for r in tiles)
    bar_w = 16
    height = gap + len(tiles) * (th + gap)
    width = gap + ncol * (tw + gap) + bar_w + gap
    sheet = np.full((height, width, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            y0, x0 = gap + i * (th + gap), gap + j * (tw + gap)
            sheet[y0:y0 + t.shape[0], x0:x0 + t.shape[1]] = t[..., :3]
    key = colors.PROBABILITY if layer.startswith("prob_") else colors.UNCERTAINTY
    lut = colors.table_rgba(key)[:, :3]
    bar_h = height - 2 * gap
    idx = np.linspace(len(lut) - 1, 0, bar_h).round().astype(int)       # top = high values
    sheet[gap:gap + bar_h, width - gap - bar_w:width - gap] = lut[idx][:, None, :]
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(encode_png(sheet))
    return path


@styled
def _write_png(path: Path, case_nodes, rows, layer, thr, max_table_rows: int, window=None, dpi: int = 100) -> Path:
    if not matplotlib_available():
        log.warning(NO_MATPLOTLIB_MESSAGE)
        return _write_png_plain(path, case_nodes, rows, layer, window)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from . import colors

    title, sub = _header(case_nodes, layer, thr)
    table = _table_rows(case_nodes.regions[:max_table_rows])
    more = _more_text(case_nodes, max_table_rows)
    # vertical layout in inches, top to bottom: header, table (+ note), one block per region
    head_h, row_h, block_h = 1.45 + 0.15 * len(_organ_lines(case_nodes)), 0.21, 3.3
    table_h = row_h * (len(table) + 1) if table else 0.4
    note_h = 0.25 if more else 0.0
    total = head_h + table_h + note_h + 0.25 + block_h * len(rows) + 0.1
    fig = Figure(figsize=(10, total), dpi=dpi)
    FigureCanvasAgg(fig)

    def y(inches_from_top: float) -> float:
        return 1 - inches_from_top / total

    fig.text(0.5, y(0.32), title, ha="center", va="center", fontsize=15, weight="bold")
    fig.text(0.5, y(0.95 + (head_h - 1.45) / 2), sub, ha="center", va="center", fontsize=8.5, linespacing=1.5)
    ax_t = fig.add_axes([0.04, y(head_h + table_h), 0.92, table_h / total])
    ax_t.axis("off")
    if table:
        tab = ax_t.table(cellText=table, colLabels=TABLE_HEADER, cellLoc="center", bbox=[0, 0, 1, 1],
                         colWidths=[0.08, 0.17, 0.13, 0.12, 0.12, 0.38])
        tab.auto_set_font_size(False)
        tab.set_fontsize(9)
        for (r, _c), cell in tab.get_celld().items():
            cell.set_edgecolor("#999999")
            if r == 0:
                cell.set_facecolor("#e8e8e8")
                cell.set_text_props(weight="bold")
    else:
        ax_t.text(0.5, 0.5, "no error regions above the threshold", ha="center", va="center", fontsize=10)
    if more:
        fig.text(0.04, y(head_h + table_h + 0.15), more, fontsize=8.5, style="italic", va="center")
    top0 = head_h + table_h + note_h + 0.25
    for i, (region, row) in enumerate(rows):
        top = top0 + block_h * i
        label = region.label if region is not None else "volume centre (no regions)"
        if region is not None:
            label += f"   (mean U {region.mean_u:.3g}, max U {region.max_u:.3g})"
        fig.text(0.04, y(top + 0.1), label, fontsize=10.5, weight="bold", va="center")
        for j, (o, rgb) in enumerate(row):
            ax = fig.add_axes([0.04 + 0.285 * j, y(top + 3.2), 0.27, 2.75 / total])
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(o, fontsize=9, pad=3)
            ax.set_xticks([])
            ax.set_yticks([])
    key = colors.PROBABILITY if layer.startswith("prob_") else colors.UNCERTAINTY
    lut = colors.table_rgba(key)[:, :3].astype(float) / 255.0
    lo, hi = window if window is not None else case_nodes.value_ranges.get(layer, (0.0, 1.0))
    bar_top, bar_bottom = top0 + 0.45, top0 + block_h * len(rows) - 0.15
    cax = fig.add_axes([0.905, y(bar_bottom), 0.014, (bar_bottom - bar_top) / total])
    cax.imshow(lut[::-1, None, :], aspect="auto", extent=(0, 1, lo, hi))
    cax.set_xticks([])
    cax.yaxis.tick_right()
    cax.tick_params(labelsize=8)
    if thr is not None:
        for t in thr:
            if lo < t < hi:
                cax.axhline(t, color="cyan", lw=1.5)
                cax.text(1.15, t, "τ", transform=cax.get_yaxis_transform(), color="black",
                         fontsize=8, va="center", ha="left")
    cax.set_title(layer, fontsize=9, pad=6)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def write_review_sheet(scene, case_nodes, out_png_or_html, top_n: int = 3, layer: str | None = None,
                       opacity: float | None = None, size_px: int = 256, fov_mm: float | None = None,
                       controller=None, max_table_rows: int = 20) -> Path:
    """Write the review sheet for a loaded case to ``.png`` or ``.html`` (atomically).

    ``layer`` defaults to the controller's current overlay, else the map the regions were cut
    on; its current display threshold and colour table are used, at ``opacity`` (default: the
    controller's, else 0.6), with the colour window of :func:`sheet_window` (the display node is
    restored afterwards). ``max_table_rows`` limits the region table (a note counts the rest).
    Returns the path written.
    """
    path = Path(out_png_or_html)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise InputError(f"review sheet must be .png or .html, got {path.name}")
    if top_n < 1:
        raise InputError(f"top_n must be at least 1, got {top_n}")
    _ensure_layer(scene, case_nodes, layer)
    layer, thr = _layer_and_display(case_nodes, layer, controller)
    window = sheet_window(case_nodes, layer, thr)
    with _rendered_window(case_nodes.layers()[layer], window):
        rows, layer, thr = collect_snapshots(scene, case_nodes, top_n, layer, opacity, size_px, fov_mm, controller)
    if suffix == ".png":
        return _write_png(path, case_nodes, rows, layer, thr, max_table_rows, window)
    return _write_html(path, case_nodes, rows, layer, thr, max_table_rows)
