"""Where the test session builds what takes a minute (the quick demo, the tiny trained model)."""

from __future__ import annotations

import os
from pathlib import Path


def shared_root(tmp_path_factory) -> Path:
    """This run's temporary folder that every pytest-xdist worker sees (scripts/test.sh runs the
    suite on 2 workers): session fixtures that take a minute to build are built there once, under
    a lock, and read by the other workers. Without xdist, this process's own base folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
