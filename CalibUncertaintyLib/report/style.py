"""One fixed, local matplotlib style for every figure the project draws.

Other libraries change matplotlib's *global* style in the same process: nnU-Net's training
logger calls ``seaborn.set(font_scale=2.5)``, which made the demo's reliability diagrams
unreadable. ``fixed_style()`` draws under matplotlib's own defaults (``rcParamsDefault``, which
no ``seaborn.set`` or ``rcParams`` change touches) plus ``STYLE``, inside ``rc_context``, so the
global state is restored afterwards and never read. Use it around the whole figure: creation,
drawing and saving (``styled`` does that for a function).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

#: the project's figure style (points); everything else is matplotlib's default
STYLE = {
    "font.size": 10.0, "axes.titlesize": 10.0, "axes.labelsize": 9.0, "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0, "legend.fontsize": 8.0, "figure.titlesize": 11.0,
    "font.family": ["sans-serif"], "axes.grid": False, "figure.facecolor": "white", "axes.facecolor": "white",
}
_NOT_STYLE = ("backend", "backend_fallback", "interactive", "toolbar", "webagg.", "savefig.directory")


@contextmanager
def fixed_style():
    """Context in which matplotlib's rcParams are its defaults plus ``STYLE`` (nothing to do
    without matplotlib: Slicer does not ship it, and the callers then draw without it)."""
    try:
        import matplotlib as mpl
    except ImportError:
        yield
        return

    base = {k: v for k, v in mpl.rcParamsDefault.items() if not k.startswith(_NOT_STYLE)}
    with mpl.rc_context(base):
        with mpl.rc_context(STYLE):
            yield


def styled(fn):
    """Decorator: run ``fn`` (which builds and saves a figure) under ``fixed_style()``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with fixed_style():
            return fn(*args, **kwargs)
    return wrapper
