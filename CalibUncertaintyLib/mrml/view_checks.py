"""Checks on pictures of Slicer's views: is the overlay what a pixel shows? (self-test and tests)

The colour a voxel of an overlay gets is its display node's colour table at the voxel's place in
the colour window; at foreground opacity 1 a slice view pixel over that voxel shows exactly that
colour unless something is drawn over it (a segment fill, a markup). :func:`overlay_pixel_check`
compares the two; :func:`flagged_voxel` picks a voxel of a region that the threshold shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def colour_of_value(node, value: float) -> np.ndarray:
    """(3,) 0-255 colour Slicer gives ``value`` of volume ``node``: its colour table at the
    value's place in the display node's window (clamped)."""
    disp = node.GetDisplayNode()
    lo, hi = float(disp.GetWindowLevelMin()), float(disp.GetWindowLevelMax())
    colour = disp.GetColorNode()
    n = colour.GetNumberOfColors()
    t = 0.0 if hi <= lo else float(np.clip((value - lo) / (hi - lo), 0.0, 1.0))
    rgba = [0.0] * 4
    colour.GetColor(int(round(t * (n - 1))), rgba)
    return np.asarray(rgba[:3]) * 255.0


@dataclass
class PixelCheck:
    ok: bool
    expected: tuple
    got: tuple
    row: int
    col: int

    def message(self) -> str:
        return (f"pixel ({self.row}, {self.col}) shows {self.got}, the overlay's colour there is "
                f"{self.expected}")


def overlay_pixel_check(snapshot, ras, node, value: float, tol: float = 24.0) -> PixelCheck:
    """Whether the picture (drawn at foreground opacity 1) shows the overlay's own colour for
    ``value`` at RAS point ``ras`` (summed |ΔRGB| ≤ ``tol``: resampling at the voxel centre and
    8-bit rounding)."""
    row, col = snapshot.pixel_of(ras)
    got = snapshot.rgb[row, col].astype(float)
    expected = colour_of_value(node, value)
    ok = float(np.abs(got - expected).sum()) <= tol
    return PixelCheck(ok, tuple(int(round(v)) for v in expected), tuple(int(v) for v in got), row, col)


def flagged_voxel(values: np.ndarray, region, lo: float, hi: float, within: np.ndarray | None = None):
    """(z, y, x) of the voxel of ``region``'s bounding box with lo ≤ value ≤ hi (and inside the
    bool mask ``within``, e.g. the predicted organs, where a segment fill would be drawn) nearest
    to the region's centroid (a region need not be convex: its centroid may lie outside it);
    None if there is none."""
    zmin = np.asarray(region.raw["bbox_zyx_min"], int)
    zmax = np.asarray(region.raw["bbox_zyx_max"], int)
    box = tuple(slice(a, b + 1) for a, b in zip(zmin, zmax))
    shown = (values[box] >= lo) & (values[box] <= hi)
    if within is not None:
        shown &= np.asarray(within, bool)[box]
    inside = np.argwhere(shown) + zmin
    if len(inside) == 0:
        return None
    centre = np.asarray(region.raw.get("centroid_zyx", inside.mean(axis=0)), float)
    return tuple(int(v) for v in inside[np.argmin(((inside - centre) ** 2).sum(axis=1))])
