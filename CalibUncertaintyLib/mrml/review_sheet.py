"""A one-file review sheet a reviewer opens without Slicer: header, legend, region table, views.

For each of the top N error regions (METHODS.md section 5: connected components of {U > τ*} in
the ROI ranked by volume × mean U) the sheet shows the axial, sagittal and coronal planes
through the region's jump point (its most uncertain voxel) **as the module shows them, drawn by Slicer's own slice view**
(``slice_views.py``: slice logic + segmentation and markups displayable managers, offscreen):
the CT, the overlay through its display node (colour table, window, threshold), the predicted
organs and the margins as outlines in their segment colours (``overlay_display.py``), the region
points, orientation letters; a white cross marks the jump point and a white/black dashed box the region's
bounding box.

Field of view: by default each view is fitted to the body's section in its plane (the CT's voxels
above -500 HU near the plane through the region, 10 % margin: a head, not the shoulders below
it); ``fov_mm`` centres a view of that width on the region instead. The legend states what is drawn; its colour bar runs
over the overlay's colour window as Slicer draws it (the display node's, ``overlay_display.legend``),
with the threshold range. The region table leaves out single-voxel regions (and anything smaller
than one voxel's volume) and regions of class ``background`` (outside every predicted organ), and
says how many it left out.

``.png``: one image composed with matplotlib (Figure + Agg canvas; pyplot's global state is
never touched); without matplotlib (Slicer does not ship it) a plainer PNG of the same views and
the colour bar, and a warning that says what is missing. ``.html``: a single self-contained page
(PNG views embedded as base64), which needs only VTK, so it also works in a Slicer without
matplotlib. Where OpenGL is missing, the views carry ``slice_views``' red banner and the header
says so.
"""

from __future__ import annotations

import base64
import contextlib
import html
import itertools
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path, write_text
from ..report.style import styled
from .overlay_display import contours_only, legend as overlay_legend
from .slice_views import ORIENTATIONS, SliceViews
from .snapshots import case_markups, case_segmentations, encode_png

log = logging.getLogger(__name__)

CROSS_RGB = (255, 255, 255)
EDGE_RGB = (0, 0, 0)
LINE_CHARS = 150


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


CALIBRATORS = {
    "temperature": "temperature scaling",
    "vector": "vector scaling (a scale and a bias per class)",
    "class_temperature": "per-class temperature (one T per predicted class)",
    "local_temperature": "local temperature T(x) (by predicted class and distance to the predicted contour)",
}


def _calibration_text(summary: dict) -> str:
    """The calibrator by its name; a single T only for plain temperature scaling (under a
    per-class or local calibrator the file's global T is not what was applied)."""
    cal = summary.get("calibration")
    if not cal:
        return "calibration: none (uncalibrated ensemble mean)"
    if not isinstance(cal, dict):
        return f"calibration: {cal}"
    method = cal.get("method") or "temperature"
    text = CALIBRATORS.get(method, str(method))
    if method == "temperature" and isinstance(cal.get("temperature"), (int, float)):
        text += f", T = {cal['temperature']:.3g}"
    if cal.get("ensemble_mode") == "per_member":
        text += ", applied to each member"
    if cal.get("n_cases"):
        text += f"; fitted on {cal['n_cases']} cases"
    return "calibration: " + text


def _draw_cross(rgb: np.ndarray, row: int, col: int, arm: int = 6, gap: int = 3) -> np.ndarray:
    """A white cross (arms from ``gap`` to ``gap + arm`` pixels) edged in black: achromatic, so never
    read as an organ colour or an overlay colour, and visible on bone and on air."""
    out = rgb.copy()
    h, w, _ = out.shape
    for colour, width in ((EDGE_RGB, 1), (CROSS_RGB, 0)):
        for d in range(gap - width, arm + gap + width):
            for t in range(-width, width + 1):
                for r, c in ((row - d, col + t), (row + d, col + t), (row + t, col - d), (row + t, col + d)):
                    if 0 <= r < h and 0 <= c < w:
                        out[r, c] = colour
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


def _draw_box(rgb: np.ndarray, box, dash: int = 4) -> np.ndarray:
    """Rectangle (rows r0..r1, cols c0..c1) of alternating white and black dashes, clipped to
    the image: visible on any background, never a segment or overlay colour."""
    out = rgb.copy()
    h, w, _ = out.shape
    r0, r1, c0, c1 = box
    colour = [CROSS_RGB if (i // dash) % 2 == 0 else EDGE_RGB for i in range(2 * (h + w) + abs(r1 - r0) + abs(c1 - c0) + 2)]
    for k, c in enumerate(range(c0, c1 + 1)):
        for r in (r0, r1):
            if 0 <= r < h and 0 <= c < w:
                out[r, c] = colour[k]
    for k, r in enumerate(range(r0, r1 + 1)):
        for c in (c0, c1):
            if 0 <= r < h and 0 <= c < w:
                out[r, c] = colour[k]
    return out


# --- which regions the table lists ----------------------------------------------------------
def voxel_volume_mm3(geometry) -> float:
    return float(np.prod(geometry.spacing))


MIN_REGION_VOXELS = 2


@dataclass
class SheetRegions:
    """The regions a sheet lists (regions.json order) and how many it left out, and why."""

    listed: list
    too_small: int = 0
    background: int = 0
    voxel_mm3: float = 0.0

    def note(self) -> str | None:
        parts = []
        if self.too_small:
            parts.append(f"{self.too_small} of a single voxel ({self.voxel_mm3:.3g} mm³) or less")
        if self.background:
            parts.append(f"{self.background} outside every predicted organ (class background)")
        return ("not listed: " + "; ".join(parts) + " (all in regions.json)") if parts else None


def sheet_regions(case_nodes) -> SheetRegions:
    """Regions the table lists: of an organ's class (not background) and of at least
    ``MIN_REGION_VOXELS`` voxels (a single voxel, or anything smaller than one voxel's volume, is
    not a place a reviewer can look at on this grid)."""
    vmin = voxel_volume_mm3(case_nodes.geometry)
    out = SheetRegions([], voxel_mm3=vmin)
    for r in case_nodes.regions:
        n_vox = r.n_voxels if r.n_voxels is not None else r.volume_mm3 / vmin
        if r.class_index == 0 or (r.class_name or "").lower() == "background":
            out.background += 1
        elif n_vox < MIN_REGION_VOXELS - 1e-6 or r.volume_mm3 < MIN_REGION_VOXELS * vmin * (1 - 1e-6):
            out.too_small += 1
        else:
            out.listed.append(r)
    return out


# --- field of view ---------------------------------------------------------------------------
BODY_HU = -500.0
BODY_MARGIN = 0.10


def body_points_ras(case_nodes, max_points: int = 400_000):
    """(RAS points (N, 3) of body voxels, their spacing tolerance mm) on a regular subsample of
    the CT (voxels above -500 HU, or above the CT's minimum when it is not in HU), or None without a
    CT or body."""
    import slicer

    ct = case_nodes.input_volume
    if ct is None or ct.GetScene() is None or ct.GetImageData() is None:
        return None
    a = slicer.util.arrayFromVolume(ct)
    level = BODY_HU if float(a.min()) < BODY_HU else float(a.min())
    step = 1
    while a[::step, ::step, ::step].size > 8 * max_points:
        step += 1
    inside = np.argwhere(a[::step, ::step, ::step] > level)
    if inside.size == 0:
        return None
    if len(inside) > max_points:
        inside = inside[:: int(np.ceil(len(inside) / max_points))]
    points = np.asarray(case_nodes.geometry.zyx_to_ras(inside * step), float)
    return points, float(max(case_nodes.geometry.spacing)) * step


def body_view(views: SliceViews, body, orientation: str, ras, size_px) -> tuple[tuple[float, float], tuple]:
    """((width, height) mm, centre RAS) of a view through ``ras`` fitted to the body's section in
    that plane (``body`` from :func:`body_points_ras`; the whole body where the plane misses it),
    with a 10 % margin."""
    points, tol = body
    x_dir, y_dir = views.plane_axes(orientation)
    normal = np.cross(x_dir, y_dir)
    ras = np.asarray(ras, float)
    near = np.abs((points - ras) @ normal) <= tol
    section = points[near] if near.sum() >= 10 else points
    px, py = section @ x_dir, section @ y_dir
    w, h = float(np.ptp(px)), float(np.ptp(py))
    aspect = size_px[0] / size_px[1]
    width = max(w, h * aspect, 10.0) * (1 + BODY_MARGIN)
    cx, cy = (px.min() + px.max()) / 2, (py.min() + py.max()) / 2
    centre = ras + x_dir * (cx - ras @ x_dir) + y_dir * (cy - ras @ y_dir)
    return (width, width / aspect), tuple(float(v) for v in centre)


@contextlib.contextmanager
def _open_views(scene, size, views):
    if views is not None:
        yield views
        return
    with SliceViews(scene, size) as own:
        yield own


def collect_snapshots(scene, case_nodes, top_n: int = 3, layer: str | None = None, opacity: float | None = None,
                      size_px: int = 256, fov_mm: float | None = None, controller=None, regions=None, views=None):
    """[(region or None, [(orientation, rgb with jump-point cross and dashed bounding box)])] for
    the top N regions (of ``regions``, default :func:`sheet_regions`), plus (layer, threshold,
    fallback banner text or None). With no regions, one row through the volume centre. ``views``:
    an open ``SliceViews`` to draw with (default: one for this call)."""
    if top_n < 1:
        raise InputError(f"top_n must be at least 1, got {top_n}")
    _ensure_layer(scene, case_nodes, layer)
    layer, thr = _layer_and_display(case_nodes, layer, controller)
    if opacity is None:
        opacity = controller.opacity if controller is not None else 0.6
    fg = case_nodes.layers()[layer]
    regions = sheet_regions(case_nodes).listed if regions is None else regions
    targets = [(r, r.jump_ras) for r in regions[:top_n]]
    if not targets:
        centre = case_nodes.geometry.zyx_to_ras((np.asarray(case_nodes.geometry.shape_zyx) - 1) / 2.0)
        targets = [(None, tuple(centre))]
    size = (size_px, size_px)
    body = body_points_ras(case_nodes) if fov_mm is None else None
    rows, fallback = [], None
    with _open_views(scene, size, views) as views, contours_only(case_nodes):
        for region, ras in targets:
            row = []
            for o in ORIENTATIONS:
                fov, centre = (fov_mm, None) if body is None else body_view(views, body, o, ras, size)
                snap = views.render(ras, o, case_nodes.input_volume, fg, opacity, size, fov,
                                    case_segmentations(case_nodes), case_markups(case_nodes), centre_ras=centre)
                fallback = fallback or snap.fallback
                rgb = snap.rgb
                if region is not None:
                    box = region_box_px(snap, case_nodes.geometry, region)
                    rgb = _draw_cross(rgb if box is None else _draw_box(rgb, box), *snap.pixel_of(ras))
                row.append((o, rgb))
            rows.append((region, row))
    return rows, layer, thr, fallback


def _regions_text(case_nodes) -> str:
    doc = case_nodes.regions_doc
    rmap, tau = doc.get("map"), doc.get("threshold")
    if not rmap or tau is None:
        return "regions: as listed in regions.json"
    op = "<" if doc.get("flag") == "below" else ">"
    radius = (doc.get("roi") or {}).get("radius_mm")
    roi = f" within {radius:g} mm of the prediction" if isinstance(radius, (int, float)) else ""
    return f"regions: connected components of {{{rmap} {op} {tau:.3g}}}{roi}, ranked by volume × mean U"


# --- what a sheet says ------------------------------------------------------------------------
# The region table's columns: (header, relative width, value of a Region). Another column is one
# more entry here (the PNG and the HTML sheet both read this list).
TABLE_COLUMNS = [
    ("region", 0.08, lambda r: f"R{r.rank}"),
    ("class", 0.17, lambda r: r.class_name),
    ("volume mm³", 0.13, lambda r: f"{r.volume_mm3:.0f}"),
    ("mean U", 0.12, lambda r: f"{r.mean_u:.3g}"),
    ("max U", 0.12, lambda r: f"{r.max_u:.3g}"),
    ("jump point RAS mm", 0.38, lambda r: "({:.1f}, {:.1f}, {:.1f})".format(*r.jump_ras)),
]
TABLE_HEADER = [c[0] for c in TABLE_COLUMNS]


def _organ_lines(case_nodes) -> list[str]:
    """One line per organ (predicted Dice, surface Dice, intervals, coverage) and whether the
    case's guarantees apply (``report.guarantees``); [] without per-organ quality."""
    from ..report.guarantees import organ_rows, void_reason

    rows = organ_rows(case_nodes.summary)
    if not rows:
        return []
    void = void_reason(case_nodes.summary)
    return ([f"WARNING: guarantees VOID for this case: {void}"] if void else []) + [r["text"] for r in rows]


def _table_rows(regions):
    return [[fn(r) for _h, _w, fn in TABLE_COLUMNS] for r in regions]


@dataclass
class SheetContent:
    """Everything a sheet shows, whatever its format."""

    title: str
    lines: list                 # header lines, top to bottom
    legend: object              # colors.LegendEntry of the overlay as drawn
    organs: list                # [(name, (r, g, b) 0-1)] of the predicted contours drawn
    table: list                 # rows of TABLE_COLUMNS values
    notes: list                 # lines under the table (rows left out, ...)
    rows: list                  # [(region or None, [(orientation, rgb)])]
    fallback: str | None        # the views' banner text when OpenGL was missing


def _organ_key(case_nodes) -> list:
    seg = case_nodes.segmentation.GetSegmentation() if case_nodes.segmentation is not None else None
    if seg is None:
        return []
    return [(seg.GetNthSegment(i).GetName(), tuple(seg.GetNthSegment(i).GetColor()))
            for i in range(seg.GetNumberOfSegments())]


def sheet_content(scene, case_nodes, top_n: int = 3, layer: str | None = None, opacity: float | None = None,
                  size_px: int = 256, fov_mm: float | None = None, controller=None,
                  max_table_rows: int = 20, views=None) -> SheetContent:
    """Render the views and gather the text of a sheet (module docstring)."""
    chosen = sheet_regions(case_nodes)
    rows, layer, thr, fallback = collect_snapshots(scene, case_nodes, top_n, layer, opacity, size_px, fov_mm,
                                                   controller, chosen.listed, views)
    node = case_nodes.layers()[layer]
    legend = overlay_legend(layer, node)
    src = case_nodes.default_thresholds.get(layer, (None, ""))[1]
    n_members = case_nodes.summary.get("n_members")
    fov = (f"each view {fov_mm:g} mm wide, centred on the region" if fov_mm else
           "each view fitted to the body, through the region")
    lines = [f"overlay: {legend.title}, {legend.shown_text()} (threshold: {src or 'as set'}); "
             f"colours {legend.range[0]:.3g} – {legend.range[1]:.3g} {legend.units}",
             f"{_calibration_text(case_nodes.summary)} · members: {n_members if n_members else '?'}",
             f"{_regions_text(case_nodes)}: {len(chosen.listed)} listed",
             f"outlines: predicted organs (and margins) · white +: region jump point (most uncertain voxel) · dashed box: the region's "
             f"bounding box · {fov}"]
    lines += _organ_lines(case_nodes)  # per-organ predicted Dice with its interval (when calibrated for it)
    lines = [part for line in lines for part in textwrap.wrap(line, LINE_CHARS, subsequent_indent="    ")]
    if fallback:
        lines.append("WARNING: " + fallback)
    notes = [n for n in (chosen.note(), _more_text(len(chosen.listed), max_table_rows)) if n]
    return SheetContent(f"CalibUncertainty review: case {case_nodes.case_id}", lines, legend,
                        _organ_key(case_nodes), _table_rows(chosen.listed[:max_table_rows]), notes, rows, fallback)


def _more_text(n_listed: int, max_table_rows: int) -> str | None:
    extra = n_listed - max_table_rows
    return f"… and {extra} more region(s), all in regions.json" if extra > 0 else None


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb[:3])


def _legend_bar_png(legend, height: int = 16, width: int = 256) -> bytes:
    from . import colors

    key = colors.PROBABILITY if legend.title.startswith("P(") else colors.UNCERTAINTY
    lut = colors.table_rgba(key)[:, :3]
    idx = np.linspace(0, len(lut) - 1, width).round().astype(int)
    return encode_png(np.ascontiguousarray(np.repeat(lut[idx][None], height, axis=0)))


def _write_html(path: Path, content: SheetContent) -> Path:
    esc = html.escape
    lg = content.legend
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{esc(content.title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #aaa;padding:2px 8px;text-align:right}"
             "figure{display:inline-block;margin:4px}figcaption{text-align:center}"
             ".organ{display:inline-block;margin-right:1em;font-weight:bold}"
             ".warn{background:#aa0000;color:white;padding:4px}</style></head><body>",
             f"<h1>{esc(content.title)}</h1>"]
    if content.fallback:
        parts.append(f"<p class='warn'>{esc(content.fallback)}</p>")
    parts.append("<p>" + "<br>".join(esc(ln) for ln in content.lines) + "</p>")
    bar = base64.b64encode(_legend_bar_png(lg)).decode("ascii")
    parts.append(f"<p class='legend'>{esc(lg.title)} ({esc(lg.units)}): "
                 f"<span class='lo'>{lg.range[0]:.3g}</span> <img alt='colour bar' src='data:image/png;base64,{bar}'> "
                 f"<span class='hi'>{lg.range[1]:.3g}</span> — {esc(lg.shown_text())}. {esc(lg.meaning)}</p>")
    if content.organs:
        parts.append("<p>contours: " + "".join(f"<span class='organ' style='color:{_hex(c)}'>{esc(n)}</span>"
                                               for n, c in content.organs) + "</p>")
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEADER) + "</tr>")
    for tr in content.table:
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in tr) + "</tr>")
    parts.append("</table>")
    parts += [f"<p>{esc(n)}</p>" for n in content.notes]
    for region, row in content.rows:
        label = region.label if region is not None else "volume centre (no regions listed)"
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


NO_MATPLOTLIB_MESSAGE = ("matplotlib is not installed, so the PNG review sheet has the views and the "
                         "colour bar but no title, labels or region table; the .html sheet has them all "
                         "(it needs only VTK), or install matplotlib")


def _write_png_plain(path: Path, content: SheetContent, gap: int = 8) -> Path:
    """The PNG sheet without matplotlib: the views in a grid (one row per region: axial,
    sagittal, coronal) and a vertical colour bar at the right, encoded with VTK's PNG writer."""
    from . import colors

    tiles = [[rgb for _o, rgb in row] for _region, row in content.rows]
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
    key = colors.PROBABILITY if content.legend.title.startswith("P(") else colors.UNCERTAINTY
    lut = colors.table_rgba(key)[:, :3]
    bar_h = height - 2 * gap
    idx = np.linspace(len(lut) - 1, 0, bar_h).round().astype(int)       # top = high values
    sheet[gap:gap + bar_h, width - gap - bar_w:width - gap] = lut[idx][:, None, :]
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(encode_png(sheet))
    return path


@styled
def _write_png(path: Path, content: SheetContent, dpi: int = 100) -> Path:
    if not matplotlib_available():
        log.warning(NO_MATPLOTLIB_MESSAGE)
        return _write_png_plain(path, content)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from . import colors

    lg = content.legend
    # vertical layout in inches, top to bottom: header, legend, organ key, table (+ notes), regions
    head_h = 0.55 + 0.2 * len(content.lines)
    legend_h, organ_h, row_h, block_h = 0.75, 0.3 if content.organs else 0.0, 0.21, 3.3
    table_h = row_h * (len(content.table) + 1) if content.table else 0.4
    note_h = 0.22 * len(content.notes)
    top0 = head_h + legend_h + organ_h + table_h + note_h + 0.25
    total = top0 + block_h * len(content.rows) + 0.1
    fig = Figure(figsize=(10, total), dpi=dpi)
    FigureCanvasAgg(fig)

    def y(inches_from_top: float) -> float:
        return 1 - inches_from_top / total

    fig.text(0.5, y(0.3), content.title, ha="center", va="center", fontsize=15, weight="bold")
    for i, line in enumerate(content.lines):
        warn = line.startswith("WARNING")
        fig.text(0.04, y(0.65 + 0.2 * i), line, ha="left", va="center", fontsize=8.5,
                 color="white" if warn else "black", weight="bold" if warn else "normal",
                 bbox=dict(facecolor="#aa0000", edgecolor="none", pad=2) if warn else None)
    # legend: the colour bar over the display node's colour window, labelled at both ends
    key = colors.PROBABILITY if lg.title.startswith("P(") else colors.UNCERTAINTY
    lut = colors.table_rgba(key)[:, :3].astype(float) / 255.0
    lt = head_h + 0.1
    cax = fig.add_axes([0.04, y(lt + 0.3), 0.4, 0.22 / total])
    cax.imshow(lut[None, :, :], aspect="auto", extent=(lg.range[0], lg.range[1], 0, 1))
    cax.set_yticks([])
    cax.set_xticks([lg.range[0], lg.range[1]])
    hi_label = f"≥ {lg.range[1]:.3g}" if lg.shown and lg.shown[1] > lg.range[1] * (1 + 1e-6) + 1e-12 else f"{lg.range[1]:.3g}"
    cax.set_xticklabels([f"{lg.range[0]:.3g}", hi_label], fontsize=8)
    cax.set_title(f"{lg.title} ({lg.units}): colours as drawn; transparent outside the threshold", fontsize=8.5,
                  loc="left", pad=3)
    fig.text(0.47, y(lt + 0.2), lg.meaning, fontsize=7.5, va="center", wrap=True)
    if content.organs:
        fig.text(0.04, y(head_h + legend_h + 0.12), "contours:", fontsize=8.5, va="center", weight="bold")
        x = 0.12
        for name, rgb in content.organs:
            if x + 0.0085 * len(name) + 0.03 > 0.97:
                fig.text(x, y(head_h + legend_h + 0.12), "…", fontsize=8.5, va="center")
                break
            fig.text(x, y(head_h + legend_h + 0.12), "■", fontsize=11, va="center", color=rgb)
            fig.text(x + 0.017, y(head_h + legend_h + 0.12), name, fontsize=8.5, va="center")
            x += 0.0085 * len(name) + 0.035
    tt = head_h + legend_h + organ_h
    ax_t = fig.add_axes([0.04, y(tt + table_h), 0.92, table_h / total])
    ax_t.axis("off")
    if content.table:
        tab = ax_t.table(cellText=content.table, colLabels=TABLE_HEADER, cellLoc="center", bbox=[0, 0, 1, 1],
                         colWidths=[c[1] for c in TABLE_COLUMNS])
        tab.auto_set_font_size(False)
        tab.set_fontsize(9)
        for (r, _c), cell in tab.get_celld().items():
            cell.set_edgecolor("#999999")
            if r == 0:
                cell.set_facecolor("#e8e8e8")
                cell.set_text_props(weight="bold")
    else:
        ax_t.text(0.5, 0.5, "no error regions to list", ha="center", va="center", fontsize=10)
    for i, note in enumerate(content.notes):
        fig.text(0.04, y(tt + table_h + 0.15 + 0.22 * i), note, fontsize=8.5, style="italic", va="center")
    for i, (region, row) in enumerate(content.rows):
        top = top0 + block_h * i
        label = region.label if region is not None else "volume centre (no regions listed)"
        if region is not None:
            label += f"   (mean U {region.mean_u:.3g}, max U {region.max_u:.3g})"
        fig.text(0.04, y(top + 0.1), label, fontsize=10.5, weight="bold", va="center")
        for j, (o, rgb) in enumerate(row):
            ax = fig.add_axes([0.04 + 0.31 * j, y(top + 3.2), 0.29, 2.9 / total])
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(o, fontsize=9, pad=3)
            ax.set_xticks([])
            ax.set_yticks([])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def write_review_sheet(scene, case_nodes, out_png_or_html, top_n: int = 3, layer: str | None = None,
                       opacity: float | None = None, size_px: int = 256, fov_mm: float | None = None,
                       controller=None, max_table_rows: int = 20) -> Path:
    """Write the review sheet for a loaded case to ``.png`` or ``.html`` (atomically).

    ``layer`` defaults to the controller's current overlay, else the map the regions were cut
    on; it is drawn as its display node says (colour table, window, threshold) at ``opacity``
    (default: the controller's, else 0.6), with the case's contours as outlines (the display
    state before is put back afterwards). ``max_table_rows`` limits the region table (a note
    counts the rest). Returns the path written.
    """
    path = Path(out_png_or_html)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise InputError(f"review sheet must be .png or .html, got {path.name}")
    if top_n < 1:
        raise InputError(f"top_n must be at least 1, got {top_n}")
    return write_review_sheets(scene, case_nodes, [path], top_n, layer, opacity, size_px, fov_mm, controller,
                               max_table_rows)[0]


def write_review_sheets(scene, case_nodes, paths, top_n: int = 3, layer: str | None = None,
                        opacity: float | None = None, size_px: int = 256, fov_mm: float | None = None,
                        controller=None, max_table_rows: int = 20, views=None) -> list[Path]:
    """The same sheet in several files (``.png`` and/or ``.html``), the views drawn once (with
    ``views``, an open ``SliceViews``, when given)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.suffix.lower() not in (".png", ".html", ".htm"):
            raise InputError(f"review sheet must be .png or .html, got {path.name}")
    content = sheet_content(scene, case_nodes, top_n, layer, opacity, size_px, fov_mm, controller, max_table_rows,
                            views)
    return [_write_png(p, content) if p.suffix.lower() == ".png" else _write_html(p, content) for p in paths]
