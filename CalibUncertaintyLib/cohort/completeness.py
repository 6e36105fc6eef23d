"""Is a case already done? Decided by the case's own summary.json record, not by the folder.

A case folder counts as complete for a job when ``<out>/<case>/summary.json`` reads as JSON,
names the case, holds ``cohort.job_key`` equal to the key of the job now asked for, and every
file it lists exists. The key (``job_key``) is a hash of what determines the outputs: the
options, the calibration and the inputs' identity (path, size, modification time), so a rerun
with other options or changed inputs recomputes the case instead of skipping it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_identity(paths) -> list:
    """(path, size, mtime_ns) of each existing file (missing files as (path, None, None))."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p), None, None])
    return out


def job_key(*parts) -> str:
    """A stable hash of JSON-serialisable ``parts`` (non-JSON values by their ``str``)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def case_is_complete(out_dir, case: str, key: str) -> bool:
    """True when ``<out_dir>/<case>/summary.json`` records this case, this job key and files all present."""
    folder = Path(out_dir) / case
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("case") != case:
        return False
    if (summary.get("cohort") or {}).get("job_key") != key:
        return False
    files = summary.get("files") or []
    return bool(files) and all((folder / f).is_file() for f in files)
