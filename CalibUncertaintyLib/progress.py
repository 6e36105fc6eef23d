"""Machine-readable progress lines, so that a GUI (the Slicer module) can show stage and member.

One line per event on stderr::

    CALIBU_PROGRESS {"stage": "inference", "case": "case_001", "member": 2, "n_members": 5, "fraction": 0.43, "message": "fold_1"}

``fraction`` is the overall fraction done (0..1) when the emitter knows it. ``parse_progress_line``
is the inverse and returns None for any other line, so a reader can pass the rest to its log.

Lines are printed only when asked: environment variable ``CALIBU_PROGRESS=1`` (set by the
out-of-process runner ``runner.py`` for the Slicer module, or by the CLI's ``--progress``), or an
explicit ``stream``. A person at a terminal gets the progress bar and log, not JSON.
"""

from __future__ import annotations

import json
import os
import sys

PREFIX = "CALIBU_PROGRESS "
#: set to "1" to get progress lines on stderr
ENV_VAR = "CALIBU_PROGRESS"


def progress_enabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def format_progress(stage: str, fraction: float | None = None, **fields) -> str:
    event = {"stage": stage}
    if fraction is not None:
        event["fraction"] = round(min(max(float(fraction), 0.0), 1.0), 4)
    event.update({k: v for k, v in fields.items() if v is not None})
    return PREFIX + json.dumps(event, sort_keys=False)


def emit_progress(stage: str, fraction: float | None = None, stream=None, **fields) -> None:
    """Write one progress line to ``stream``; with no stream, to stderr when ``progress_enabled()``."""
    if stream is None:
        if not progress_enabled():
            return
        stream = sys.stderr
    stream.write(format_progress(stage, fraction, **fields) + "\n")
    stream.flush()


def parse_progress_line(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith(PREFIX.strip()):
        return None
    try:
        event = json.loads(line[len(PREFIX.strip()):].strip())
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "stage" in event else None
