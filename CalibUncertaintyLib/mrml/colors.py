"""The project's colour tables as MRML colour nodes, and the legend text the widget shows.

Two perceptually uniform 256-entry tables ship in ``CalibUncertaintyLib/resources`` as Slicer
colour-table text files (``index name R G B A``, 0-255):

- ``CalibU_Probability.txt`` ("CalibU Probability"): matplotlib's viridis sampled at 256 evenly
  spaced points of [0, 1]. Used for ``prob_<Class>`` volumes, window 0-1.
- ``CalibU_Uncertainty.txt`` ("CalibU Uncertainty"): matplotlib's inferno sampled at 256 evenly
  spaced points of [0.15, 1] (its near-black start is dropped so that low uncertainty stays
  visible over a dark CT). Used for every ``map_<name>`` volume.

The files were produced by :func:`generate_colour_table_files` (matplotlib is needed only for that
step, never at run time; a test regenerates them and compares). At run time the text files are
parsed in Python and turned into ``vtkMRMLColorTableNode`` objects, because slicer-core has no
file-based colour tables.

:func:`ensure_colour_tables` creates the nodes once per scene (found again by the node attribute
``CalibU.ColorTable``) and returns them. :func:`ensure_default_colour_nodes` adds Slicer's built-in
colour nodes (Grey, Labels, ...) to a bare scene, which a real Slicer scene already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

RESOURCES = Path(__file__).resolve().parents[1] / "resources"

PROBABILITY = "probability"
UNCERTAINTY = "uncertainty"

# key -> (node name, file name, matplotlib colormap, sampled range of the colormap)
TABLES = {
    PROBABILITY: ("CalibU Probability", "CalibU_Probability.txt", "viridis", (0.0, 1.0)),
    UNCERTAINTY: ("CalibU Uncertainty", "CalibU_Uncertainty.txt", "inferno", (0.15, 1.0)),
}
N_COLOURS = 256
ATTRIBUTE = "CalibU.ColorTable"

# What each map means (METHODS.md section 1 and the DAE/EBCU definitions), for the legend.
MAP_MEANINGS = {
    "confidence": ("max_c p̄_c of the calibrated probability; high = certain (the only map where "
                   "high is good)", "probability"),
    "entropy": ("predictive entropy H(p̄) = -Σ_c p̄_c log p̄_c of the calibrated probability "
                "(total uncertainty)", "nats"),
    "entropy_norm": ("predictive entropy divided by log K (0 certain, 1 uniform)", "fraction"),
    "expected_entropy": ("mean over members of H(p_m) (aleatoric part)", "nats"),
    "mutual_information": ("H(p̄) - mean_m H(p_m) (epistemic part: member disagreement)", "nats"),
    "epkl": ("expected pairwise KL divergence between members (≥ mutual information)", "nats"),
    "fg_variance": ("variance over members of the foreground probability 1 - p_0", "probability²"),
    "vote_disagreement": ("1 - |2q - 1|, q = fraction of members voting foreground", "fraction"),
    "dae": ("distance-aware entropy: H(p̄) · (1 - exp(-d²/2σ²)), d = mm to the predicted "
            "contour (project definition; hides the thin contour shell)", "nats"),
    "ebcu": ("local mean excess of entropy over a high threshold in a ball (project definition; "
             "favours blobs of doubt over contour shells)", "nats"),
}


@dataclass(frozen=True)
class LegendEntry:
    """What the colour legend of one overlay says: ``range`` is the colour window (darkest to
    brightest colour of ``colour_table``), ``shown`` the threshold range drawn (None: all)."""

    title: str
    colour_table: str
    range: tuple[float, float]
    meaning: str
    units: str
    shown: tuple[float, float] | None = None

    def shown_text(self) -> str:
        """Where the overlay is drawn, in words."""
        if self.shown is None:
            return "drawn everywhere"
        lo, hi = self.shown
        text = f"drawn where {lo:.3g} ≤ value ≤ {hi:.3g}"
        if hi > self.range[1] * (1 + 1e-6) + 1e-12:
            text += f" (≥ {self.range[1]:.3g}: brightest colour)"
        return text

    def text(self) -> str:
        lo, hi = self.range
        return (f"{self.title}: colours {lo:.3g} – {hi:.3g} {self.units} ({self.colour_table}, brighter = higher), "
                f"{self.shown_text()}. {self.meaning}")


# --- table values -------------------------------------------------------------------------
def read_colour_table_file(path: str | Path) -> np.ndarray:
    """Parse a Slicer colour-table text file (``index name R G B A`` lines, ``#`` comments).

    Returns an (N, 4) uint8 array indexed by the entry index. Raises InputError for a missing
    file, a malformed line or non-contiguous indices.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"colour table file not found: {path}")
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 6:
            raise InputError(f"{path.name} line {n}: expected 'index name R G B A', got {line!r}")
        try:
            idx = int(parts[0])
            rgba = [int(v) for v in parts[-4:]]
        except ValueError as e:
            raise InputError(f"{path.name} line {n}: {e}") from e
        if any(not 0 <= v <= 255 for v in rgba):
            raise InputError(f"{path.name} line {n}: colour components must be 0-255")
        rows[idx] = rgba
    if not rows or sorted(rows) != list(range(len(rows))):
        raise InputError(f"{path.name}: indices must run 0..N-1 without gaps")
    return np.asarray([rows[i] for i in range(len(rows))], dtype=np.uint8)


def sample_matplotlib_colormap(cmap_name: str, lo: float, hi: float, n: int = N_COLOURS) -> np.ndarray:
    """(n, 4) uint8 RGBA: the matplotlib colormap at n evenly spaced points of [lo, hi], opaque."""
    from matplotlib import colormaps  # build-time only

    rgba = colormaps[cmap_name](np.linspace(lo, hi, n))
    out = np.rint(np.asarray(rgba) * 255).astype(np.uint8)
    out[:, 3] = 255
    return out


def format_colour_table(name: str, rgba: np.ndarray, description: str) -> str:
    """Slicer colour-table text for an (N, 4) uint8 array."""
    lines = [f"# Color table file {name}", f"# {description}", f"# {len(rgba)} values"]
    lines += [f"{i} {name.replace(' ', '_')}_{i} {r} {g} {b} {a}" for i, (r, g, b, a) in enumerate(rgba)]
    return "\n".join(lines) + "\n"


def generate_colour_table_files(out_dir: str | Path = RESOURCES) -> list[Path]:
    """(Re)build the shipped colour-table files from matplotlib (build time only)."""
    from ..io.atomic import write_text

    written = []
    for name, fname, cmap, (lo, hi) in TABLES.values():
        rgba = sample_matplotlib_colormap(cmap, lo, hi)
        desc = (f"CalibUncertainty: matplotlib '{cmap}' sampled at {N_COLOURS} evenly spaced points "
                f"of [{lo}, {hi}]; perceptually uniform")
        written.append(write_text(Path(out_dir) / fname, format_colour_table(name, rgba, desc)))
    return written


def table_rgba(key: str) -> np.ndarray:
    """(256, 4) uint8 values of the shipped table ``key`` (PROBABILITY or UNCERTAINTY)."""
    if key not in TABLES:
        raise InputError(f"unknown colour table {key!r}; expected one of {sorted(TABLES)}")
    return read_colour_table_file(RESOURCES / TABLES[key][1])


def class_colour(label: int, name: str | None = None, scene=None) -> tuple[float, float, float]:
    """Segment colour (0-1 RGB) for class label >= 1 (segment_colours.segment_colour: Slicer's
    anatomical colour where the scene has one for ``name``, else the 48-colour palette)."""
    from .segment_colours import segment_colour

    return segment_colour(label, name, scene)


# --- MRML ----------------------------------------------------------------------------------
def ensure_default_colour_nodes(scene) -> None:
    """Add Slicer's built-in colour nodes (Grey, Labels, ...) if the scene has none (bare scene)."""
    import slicer

    if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is not None:
        return
    logic = slicer.vtkMRMLColorLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLScene(None)


def ensure_colour_tables(scene) -> dict:
    """The project's colour table nodes in ``scene``, created on first use: {key: node}."""
    import slicer

    found = {}
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        key = node.GetAttribute(ATTRIBUTE)
        if key in TABLES and key not in found:
            found[key] = node
    for key, (name, _fname, _cmap, _rng) in TABLES.items():
        if key in found:
            continue
        rgba = table_rgba(key)
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(name)
        node.SetTypeToUser()
        node.SetNumberOfColors(len(rgba))
        node.GetLookupTable().SetTableRange(0, len(rgba) - 1)
        for i, (r, g, b, a) in enumerate(rgba.astype(float) / 255.0):
            node.SetColor(i, f"{i}", r, g, b, a)
        node.SetAttribute(ATTRIBUTE, key)
        node.SetDescription(f"CalibUncertainty {key} colour table (perceptually uniform)")
        scene.AddNode(node)
        found[key] = node
    return found


def colour_table_id(scene, key: str) -> str:
    return ensure_colour_tables(scene)[key].GetID()


def legend_for(layer: str, value_range: tuple[float, float], shown: tuple[float, float] | None = None) -> LegendEntry:
    """Legend entry for a layer name (a MAP_NAMES entry or ``prob_<Class>``) drawn with colour
    window ``value_range`` where ``shown`` (threshold lo, hi; None = everywhere)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    shown = None if shown is None else (float(shown[0]), float(shown[1]))
    if layer.startswith("prob_"):
        cls = layer[len("prob_"):]
        return LegendEntry(f"P({cls})", TABLES[PROBABILITY][0], (lo, hi),
                           f"calibrated probability of {cls}", "probability", shown)
    meaning, units = MAP_MEANINGS.get(layer, (f"uncertainty map {layer}", ""))
    return LegendEntry(layer, TABLES[UNCERTAINTY][0], (lo, hi), meaning, units, shown)
