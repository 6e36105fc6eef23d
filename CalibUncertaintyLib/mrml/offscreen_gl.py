"""Can this process draw Slicer's views offscreen? (OpenGL through VTK, checked once.)

Slicer draws segmentations and markups in a slice view with OpenGL actors (its displayable
managers), so a picture of what the reviewer sees needs an OpenGL context. In the Slicer
application there always is one. Elsewhere (the ``review`` command, CI, a server) VTK's wheel
tries an X display first and then EGL (Mesa's software EGL works without a GPU or display); a
machine with neither cannot draw them, and a failed context creation can abort the process, so
the check runs in a child process once per process (about 1 s) and its answer is cached.

``CALIBU_OFFSCREEN_GL=0`` skips OpenGL on purpose (the pictures then show the visible fallback of
``slice_views.py``); ``CALIBU_OFFSCREEN_GL=1`` trusts it without the check.

On Linux without ``DISPLAY``/``WAYLAND_DISPLAY`` this module sets ``VTK_DEFAULT_OPENGL_WINDOW=
vtkEGLRenderWindow`` (unless already set) before the first render window is made, so VTK goes
straight to EGL instead of failing on X first.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_SWITCH = "CALIBU_OFFSCREEN_GL"
WINDOW_ENV = "VTK_DEFAULT_OPENGL_WINDOW"
PROBE_TIMEOUT_S = 60

_PROBE = r"""
import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (the OpenGL render window classes)
from vtkmodules.vtkRenderingCore import vtkRenderer, vtkRenderWindow, vtkWindowToImageFilter
w = vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8)
r = vtkRenderer(); r.SetBackground(1, 0, 0); w.AddRenderer(r); w.Render()
g = vtkWindowToImageFilter(); g.SetInput(w); g.ReadFrontBufferOff(); g.Update()
red = g.GetOutput().GetPointData().GetScalars().GetTuple(0)[0]
print("CALIBU_GL_OK" if red > 200 else "CALIBU_GL_WRONG_PIXELS", w.GetClassName())
w.Finalize()
"""


@dataclass(frozen=True)
class GLStatus:
    """``available``: OpenGL offscreen rendering works here; ``reason``: what was found (the
    render window class) or what is missing."""

    available: bool
    reason: str


_status: GLStatus | None = None


def in_slicer_application() -> bool:
    try:
        import slicer
    except ImportError:
        return False
    return getattr(slicer, "app", None) is not None


def prefer_egl_without_display() -> None:
    """Point VTK at EGL when there is no display to open (Linux only; never overrides)."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") \
            and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault(WINDOW_ENV, "vtkEGLRenderWindow")


def _probe() -> GLStatus:
    env = dict(os.environ)
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, env=env)
    except (OSError, subprocess.SubprocessError) as e:
        return GLStatus(False, f"the OpenGL check could not run ({e})")
    if done.returncode == 0 and "CALIBU_GL_OK" in done.stdout:
        return GLStatus(True, done.stdout.split()[-1])
    lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
    detail = lines[-1][:200] if lines else f"exit status {done.returncode}"
    return GLStatus(False, f"no OpenGL context for offscreen rendering (tried {env.get(WINDOW_ENV) or 'X, then EGL'}): "
                           f"{detail}; install Mesa's EGL (libegl1, libgl1-mesa-dri) or run with a display")


def offscreen_gl_status(refresh: bool = False) -> GLStatus:
    """Whether Slicer's views can be drawn here (cached per process; see the module docstring)."""
    global _status
    if _status is not None and not refresh:
        return _status
    switch = os.environ.get(ENV_SWITCH, "").strip()
    if in_slicer_application():
        _status = GLStatus(True, "the Slicer application's OpenGL")
    elif switch == "0":
        _status = GLStatus(False, f"OpenGL switched off ({ENV_SWITCH}=0)")
    else:
        prefer_egl_without_display()
        _status = GLStatus(True, f"trusted ({ENV_SWITCH}=1)") if switch == "1" else _probe()
    if not _status.available:
        log.warning("Slicer's slice views cannot be drawn with OpenGL here: %s. Pictures show the volume "
                    "layers only (Slicer's slice logic) under a red banner that says so.", _status.reason)
    return _status
