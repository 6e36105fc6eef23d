"""Segment colours: distinct for 48 organs, never confusable with the overlay colour maps.

A reviewer sees an organ's contour and the uncertainty overlay together, so the two colour sets
are chosen together: the segment palette (``resources/CalibU_Segments.txt``, 48 colours) is built
from the two overlay tables (``colors.py``: CalibU Probability = viridis, CalibU Uncertainty =
inferno from 0.15) by :func:`build_palette`:

- candidates: an sRGB grid (step 15), kept only if CIE L* ≥ 45 (visible over a dark CT and the
  black outside the body), chroma ≥ 30 (never read as grey CT) and at least ``OVERLAY_MIN_DE``
  = 25 (CIE76 ΔE in CIELAB) away from **every** entry of both overlay tables;
- farthest-point selection: the candidate farthest from the overlay tables first, then each next
  colour the candidate farthest (ΔE) from all colours chosen so far, so the first classes get the
  most distinct colours. The 48 colours are ≥ 19 ΔE apart from one another (tested).

Class k (1, 2, ...) gets palette entry k - 1 (cycling after 48). Where the scene holds Slicer's
anatomical colour table (``GenericAnatomyColors``, loaded from Slicer's colour files by the
application; the slicer-core wheel ships none) and a segment's name matches one of its entries
(:func:`normalise_name`: case, ``_``/``-``, CamelCase, left/right and "gland" ignored), that
colour is used instead, provided it too is ``OVERLAY_MIN_DE`` away from the overlay tables;
otherwise the palette colour (logged once at debug level).
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import numpy as np

from ..errors import InputError
from . import colors

log = logging.getLogger(__name__)

PALETTE_FILE = "CalibU_Segments.txt"
PALETTE_NAME = "CalibU Segments"
N_SEGMENT_COLOURS = 48
OVERLAY_MIN_DE = 25.0
MIN_LIGHTNESS = 45.0
MIN_CHROMA = 30.0
GRID_STEP = 15
ANATOMY_TABLE = "GenericAnatomyColors"
_SIDES = {"left", "right", "l", "r", "lt", "rt"}


def srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB (D65) of sRGB colours given as (N, 3) 0-255 (the standard sRGB -> XYZ -> Lab formulas)."""
    c = np.asarray(rgb, float).reshape(-1, 3) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def delta_e(lab_a, lab_b) -> np.ndarray:
    """CIE76 colour difference, (N, M) for (N, 3) and (M, 3) Lab arrays."""
    a, b = np.asarray(lab_a, float), np.asarray(lab_b, float)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def overlay_lab() -> np.ndarray:
    """Lab of every entry of both overlay tables."""
    rgb = np.vstack([colors.table_rgba(colors.PROBABILITY)[:, :3], colors.table_rgba(colors.UNCERTAINTY)[:, :3]])
    return srgb_to_lab(rgb)


def build_palette(n: int = N_SEGMENT_COLOURS) -> np.ndarray:
    """(n, 3) uint8: the segment palette (module docstring), deterministic."""
    g = np.arange(0, 256, GRID_STEP)
    cand = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    lab = srgb_to_lab(cand)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    to_overlay = delta_e(lab, overlay_lab()).min(axis=1)
    ok = (to_overlay >= OVERLAY_MIN_DE) & (lab[:, 0] >= MIN_LIGHTNESS) & (chroma >= MIN_CHROMA)
    cand, lab, to_overlay = cand[ok], lab[ok], to_overlay[ok]
    if len(cand) < n:
        raise InputError(f"only {len(cand)} candidate colours, {n} asked for")
    chosen = [int(np.argmax(to_overlay))]
    nearest = delta_e(lab, lab[chosen]).min(axis=1)
    while len(chosen) < n:
        i = int(np.argmax(nearest))
        chosen.append(i)
        nearest = np.minimum(nearest, delta_e(lab, lab[[i]])[:, 0])
    return cand[chosen].astype(np.uint8)


def write_palette_file(out_dir=colors.RESOURCES):
    """(Re)write ``resources/CalibU_Segments.txt`` from :func:`build_palette` (build time)."""
    from pathlib import Path

    from ..io.atomic import write_text

    rgb = build_palette()
    rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    desc = (f"CalibUncertainty segment colours: {len(rgb)} colours >= {OVERLAY_MIN_DE:g} CIE76 dE from every "
            "entry of the overlay tables, chosen farthest-point (mrml/segment_colours.py)")
    return write_text(Path(out_dir) / PALETTE_FILE, colors.format_colour_table(PALETTE_NAME, rgba, desc))


@lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """(48, 3) uint8 of the shipped palette file."""
    return colors.read_colour_table_file(colors.RESOURCES / PALETTE_FILE)[:, :3].copy()


def palette_colour(label: int) -> tuple[float, float, float]:
    """0-1 RGB of palette entry ``label - 1`` (cycling after 48) for class label >= 1."""
    p = palette()
    r, g, b = p[(int(label) - 1) % len(p)]
    return (r / 255.0, g / 255.0, b / 255.0)


def normalise_name(name: str) -> str:
    """A structure name reduced for matching: "LeftParotid", "parotid_gland_R" and "Parotid gland
    (right)" all give "parotid"; "SpinalCord" and "spinal cord" give "spinalcord"."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name))
    words = [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]
    words = [w for w in words if w not in _SIDES and w != "gland"]
    return "".join(words)


def _anatomy_table(scene):
    if scene is None:
        return None
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetName() == ANATOMY_TABLE:
            return node
    return None


def anatomical_colour(scene, name: str) -> tuple[float, float, float] | None:
    """0-1 RGB of ``name`` in the scene's GenericAnatomyColors table, or None (no table, no match,
    or a colour too close to the overlay tables)."""
    table = _anatomy_table(scene)
    key = normalise_name(name)
    if table is None or not key:
        return None
    for i in range(table.GetNumberOfColors()):
        entry = table.GetColorName(i)
        if entry and normalise_name(entry) == key:
            rgba = [0.0] * 4
            table.GetColor(i, rgba)
            lab = srgb_to_lab(np.asarray(rgba[:3]) * 255)
            if delta_e(lab, overlay_lab()).min() < OVERLAY_MIN_DE:
                log.debug("anatomical colour of %s is too close to the overlay colour maps; palette used", name)
                return None
            return tuple(float(v) for v in rgba[:3])
    return None


def segment_colour(label: int, name: str | None = None, scene=None) -> tuple[float, float, float]:
    """The colour of class ``label`` named ``name``: Slicer's anatomical colour where the scene
    has one for that name (and it is far from the overlays), else the palette's."""
    if name:
        found = anatomical_colour(scene, name)
        if found is not None:
            return found
    return palette_colour(label)
