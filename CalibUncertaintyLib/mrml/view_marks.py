"""Marks drawn on a rendered view: orientation letters, a warning banner, text.

Text is rasterised with VTK's FreeType text renderer (``vtkTextRenderer``), which needs no
OpenGL, so the same marks appear whether or not the view itself could be drawn with OpenGL.
Images are (H, W, 3) uint8 with row 0 at the top; ``xy_to_ras`` maps view pixel (x, y from the
bottom-left, 0, 1) to RAS mm (``snapshots.Snapshot``).
"""

from __future__ import annotations

import numpy as np

_AXES = (("R", "L"), ("A", "P"), ("S", "I"))
LETTER_RGB = (255, 255, 255)
BANNER_RGB = (170, 0, 0)


def direction_letters(ras_direction, min_share: float = 0.3) -> str:
    """Anatomical letters of a direction in RAS ("R", "A", "S" for +x, +y, +z; "L", "P", "I" for
    the negative ones): the dominant axis first, then any other whose component is at least
    ``min_share`` of the largest (an oblique plane gets e.g. "RA")."""
    d = np.asarray(ras_direction, float)[:3]
    big = float(np.abs(d).max())
    if big == 0:
        return ""
    order = np.argsort(-np.abs(d))
    return "".join(_AXES[i][0 if d[i] > 0 else 1] for i in order if abs(d[i]) >= min_share * big)


def orientation_letters(xy_to_ras) -> dict:
    """{"left", "right", "top", "bottom": letters} of a view: the anatomical direction each edge
    of the picture faces (for Slicer's axial view: R on the left, L on the right, A at the top)."""
    m = np.asarray(xy_to_ras, float)
    x, y = m[:3, 0], m[:3, 1]
    return {"left": direction_letters(-x), "right": direction_letters(x),
            "top": direction_letters(y), "bottom": direction_letters(-y)}


def text_image(text: str, size_pt: int = 12, rgb=LETTER_RGB, bold: bool = True) -> np.ndarray | None:
    """(h, w, 4) uint8 RGBA of ``text`` (row 0 at the top), or None if FreeType cannot render it."""
    import vtk
    from vtk.util import numpy_support

    prop = vtk.vtkTextProperty()
    prop.SetFontSize(int(size_pt))
    prop.SetColor(*(c / 255.0 for c in rgb))
    prop.SetBold(bool(bold))
    prop.SetFontFamilyToArial()
    image = vtk.vtkImageData()
    renderer = vtk.vtkTextRenderer()
    if not renderer.RenderString(prop, str(text), image, [0, 0], 72):
        return None
    w, h, _ = image.GetDimensions()
    a = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    if a.size == 0:
        return None
    return np.ascontiguousarray(a.reshape(h, w, -1)[::-1])


def paste_text(rgb: np.ndarray, text: str, row: int, col: int, size_pt: int = 12, colour=LETTER_RGB,
               anchor: str = "center", shadow: bool = True) -> np.ndarray:
    """``rgb`` with ``text`` drawn at (row, col) (``anchor``: "center", "top-left", ...: which
    point of the text box lies there), with a 1-pixel dark shadow so it reads on any background."""
    glyphs = text_image(text, size_pt, colour)
    if glyphs is None:
        return rgb
    out = rgb.copy()
    h, w = glyphs.shape[:2]
    vert, _, horiz = anchor.partition("-") if "-" in anchor else (anchor, "", anchor)
    r0 = row - h // 2 if vert == "center" else (row if vert == "top" else row - h)
    c0 = col - w // 2 if horiz == "center" else (col if horiz == "left" else col - w)
    alpha = glyphs[..., 3:4].astype(float) / 255.0
    layers = ([((1, 1), np.zeros(3))] if shadow else []) + [((0, 0), glyphs[..., :3].astype(float))]
    for (dr, dc), colour_px in layers:
        rr0, cc0 = r0 + dr, c0 + dc
        ra, rb = max(rr0, 0), min(rr0 + h, out.shape[0])
        ca, cb = max(cc0, 0), min(cc0 + w, out.shape[1])
        if ra >= rb or ca >= cb:
            continue
        a = alpha[ra - rr0:rb - rr0, ca - cc0:cb - cc0]
        src = colour_px if colour_px.ndim == 1 else colour_px[ra - rr0:rb - rr0, ca - cc0:cb - cc0]
        region = out[ra:rb, ca:cb].astype(float)
        out[ra:rb, ca:cb] = np.rint(region * (1 - a) + src * a).astype(np.uint8)
    return out


def draw_orientation_letters(rgb: np.ndarray, xy_to_ras, size_pt: int | None = None) -> np.ndarray:
    """The four edge letters of :func:`orientation_letters` drawn at the middle of each edge."""
    h, w = rgb.shape[:2]
    size = size_pt or max(9, min(16, round(min(h, w) / 18)))
    pad = 3
    letters = orientation_letters(xy_to_ras)
    out = paste_text(rgb, letters["left"], h // 2, pad, size, anchor="center-left")
    out = paste_text(out, letters["right"], h // 2, w - pad, size, anchor="center-right")
    out = paste_text(out, letters["top"], pad, w // 2, size, anchor="top-center")
    return paste_text(out, letters["bottom"], h - pad, w // 2, size, anchor="bottom-center")


def draw_banner(rgb: np.ndarray, text: str) -> np.ndarray:
    """A dark red band across the top of the picture carrying ``text`` (wrapped to fit)."""
    out = rgb.copy()
    h, w = out.shape[:2]
    size = max(8, min(11, w // 40))
    words, lines, line = text.split(), [], ""
    max_chars = max(10, int(w / (size * 0.62)))
    for word in words:
        if line and len(line) + 1 + len(word) > max_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    lines = lines[:4]
    band = min(h, 6 + len(lines) * (size + 5))
    out[:band] = BANNER_RGB
    for i, ln in enumerate(lines):
        out = paste_text(out, ln, 4 + i * (size + 5), 4, size, (255, 255, 255), anchor="top-left", shadow=False)
    return out
