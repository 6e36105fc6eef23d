"""Progress of long work: machine-readable lines for a GUI, and events for a display in this process.

Two kinds of call, made by the code that does the work (library code never draws anything):

- ``emit_progress(stage, fraction, **fields)``: a stage-level event (a case starts a stage, a
  member starts, an estimate is known). Fields: ``case``, ``member``/``n_members``, ``message``,
  anything JSON-able. ``span_end`` (not printed) is the overall fraction at which the current step
  ends, so that sub-steps can interpolate.
- ``tick(unit, done, total)``: a sub-step inside the current stage (``patch`` of the sliding
  window, ``slab`` of a member's export). Cheap: call it as often as there are sub-steps.

Where they go:

1. With the environment variable ``CALIBU_PROGRESS=1`` (set by the out-of-process runner
   ``runner.py`` for the Slicer module, or by the CLI's ``--progress``), one line per event on
   stderr::

       CALIBU_PROGRESS {"stage": "inference", "case": "case_001", "member": 2, "n_members": 5, "fraction": 0.43, "message": "fold_1"}

   Ticks become lines too, at most one per ``TICK_LINE_INTERVAL_S`` (with ``patch``/``n_patches``
   or ``slab``/``n_slabs`` and the interpolated fraction), so a GUI sees a long member move.
   ``parse_progress_line`` is the inverse and returns None for any other line.
2. To every display installed with ``reporting(sink)`` (the command line installs
   ``cli.live_progress.LiveProgress``): ``sink.on_event(event)``, ``sink.on_tick(unit, done, total)``.
   ``before_output()`` lets a display clear its status line before someone prints (``cli.common.say``
   and the log handler call it).

``fraction`` is the overall fraction done (0..1) when the emitter knows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

PREFIX = "CALIBU_PROGRESS "
#: set to "1" to get progress lines on stderr
ENV_VAR = "CALIBU_PROGRESS"
#: at most one progress line per this many seconds for ``tick`` events (stage events always print)
TICK_LINE_INTERVAL_S = 1.0
#: the count field of each tick unit
TICK_TOTALS = {"patch": "n_patches", "slab": "n_slabs"}

_LOCK = threading.RLock()
_SINKS: list = []
_CONTEXT: dict = {"event": None, "span_end": None}
_LAST_TICK_LINE = [0.0]


def progress_enabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _event(stage: str, fraction: float | None, fields: dict) -> dict:
    event = {"stage": stage}
    if fraction is not None:
        event["fraction"] = round(min(max(float(fraction), 0.0), 1.0), 4)
    event.update({k: v for k, v in fields.items() if v is not None})
    return event


def format_progress(stage: str, fraction: float | None = None, **fields) -> str:
    fields.pop("span_end", None)
    return PREFIX + json.dumps(_event(stage, fraction, fields), sort_keys=False)


def emit_progress(stage: str, fraction: float | None = None, stream=None, **fields) -> None:
    """A stage event: to ``stream`` if given; else a line on stderr when ``progress_enabled()``,
    and to every installed display."""
    span_end = fields.pop("span_end", None)
    event = _event(stage, fraction, fields)
    if stream is not None:
        stream.write(PREFIX + json.dumps(event) + "\n")
        stream.flush()
        return
    with _LOCK:
        _CONTEXT["event"], _CONTEXT["span_end"] = event, span_end
        sinks = list(_SINKS)
    if progress_enabled():
        sys.stderr.write(PREFIX + json.dumps(event) + "\n")
        sys.stderr.flush()
    for sink in sinks:
        sink.on_event(event)


def tick(unit: str, done: int, total: int) -> None:
    """Sub-step ``done`` of ``total`` of the current stage (module docstring)."""
    with _LOCK:
        sinks = list(_SINKS)
        ctx = _CONTEXT["event"]
        span_end = _CONTEXT["span_end"]
    for sink in sinks:
        sink.on_tick(unit, done, total)
    if ctx is None or not progress_enabled():
        return
    now = time.monotonic()
    with _LOCK:
        if now - _LAST_TICK_LINE[0] < TICK_LINE_INTERVAL_S:
            return
        _LAST_TICK_LINE[0] = now
    event = {k: v for k, v in ctx.items() if k != "fraction"}
    f0 = ctx.get("fraction")
    if f0 is not None and span_end is not None and total:
        event["fraction"] = round(f0 + (float(span_end) - f0) * min(done, total) / total, 4)
    elif f0 is not None:
        event["fraction"] = f0
    event[unit], event[TICK_TOTALS.get(unit, f"n_{unit}")] = int(done), int(total)
    sys.stderr.write(PREFIX + json.dumps(event) + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def reporting(sink):
    """Install a display (``on_event``, ``on_tick``, ``before_output``) for the duration."""
    with _LOCK:
        _SINKS.append(sink)
    try:
        yield sink
    finally:
        with _LOCK:
            if sink in _SINKS:
                _SINKS.remove(sink)
            if not _SINKS:
                _CONTEXT["event"], _CONTEXT["span_end"] = None, None


def has_display() -> bool:
    """True while a display is installed (then nothing else should draw a bar on the terminal)."""
    return bool(_SINKS)


def before_output() -> None:
    """Someone is about to print: let every display clear its status line first."""
    for sink in list(_SINKS):
        sink.before_output()


def format_duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    s = int(round(max(float(seconds), 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def parse_progress_line(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith(PREFIX.strip()):
        return None
    try:
        event = json.loads(line[len(PREFIX.strip()):].strip())
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "stage" in event else None
