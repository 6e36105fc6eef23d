"""Machine-readable progress lines, so that a GUI (the Slicer module) can show stage and member.

One line per event on stderr::

    CALIBU_PROGRESS {"stage": "inference", "case": "case_001", "member": 2, "n_members": 5, "fraction": 0.43, "message": "fold_1"}

``fraction`` is the overall fraction done (0..1) when the emitter knows it. ``parse_progress_line``
is the inverse and returns None for any other line, so a reader can pass the rest to its log.
"""

from __future__ import annotations

import json
import sys

PREFIX = "CALIBU_PROGRESS "


def format_progress(stage: str, fraction: float | None = None, **fields) -> str:
    event = {"stage": stage}
    if fraction is not None:
        event["fraction"] = round(min(max(float(fraction), 0.0), 1.0), 4)
    event.update({k: v for k, v in fields.items() if v is not None})
    return PREFIX + json.dumps(event, sort_keys=False)


def emit_progress(stage: str, fraction: float | None = None, stream=None, **fields) -> None:
    stream = sys.stderr if stream is None else stream
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
