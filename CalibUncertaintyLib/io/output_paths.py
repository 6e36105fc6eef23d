"""Check an output location before any work: the right kind (file or folder) and writable.

Called by the CLI for ``-o/--output`` before a command reads its inputs (``cli.main``), and
usable by any caller of the library. A location is writable when a file can really be created
in it (or, for a path that does not exist yet, in its nearest existing parent folder): the probe
file is created and removed again, so read-only mounts, permissions, ACLs and full quotas are
all caught the same way, whoever runs the tool (``os.access`` says yes to root on a chmod'ed
folder). Nothing is created for good: a failing run leaves no empty output folder behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import InputError

KINDS = ("dir", "file")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe(folder: Path, what: str, target: Path) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".calibu_write_probe.", dir=folder)
    except OSError as e:
        raise InputError(f"{what} {target}: cannot write in {folder} ({e.strerror or e}); choose a "
                         "writable location") from e
    os.close(fd)
    os.unlink(tmp)


def check_output_path(path: str | os.PathLike, kind: str = "dir", what: str | None = None) -> Path:
    """Return ``path`` if it can be written as a ``kind`` ("dir" or "file"); else InputError.

    Refused: a folder expected where a file exists (or the reverse), a path running through an
    existing file, and a location where no file can be created.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    what = what or ("output folder" if kind == "dir" else "output file")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise InputError(f"{what} {path} is an existing file, not a folder; give a folder path")
        if kind == "file" and path.is_dir():
            raise InputError(f"{what} {path} is an existing folder; give a file path (e.g. {path / 'out.json'})")
    base = _nearest_existing(path if kind == "dir" else path.parent)
    if not base.is_dir():
        raise InputError(f"{what} {path}: {base} is a file, not a folder, so nothing can be written below it")
    _probe(base, what, path)
    return path
