"""Shared assertion for CLI refusals: one line ``error: ...`` on stderr and no traceback."""

from __future__ import annotations


def error_line(capsys) -> str:
    """The last stderr line of the command just run, asserted to be a one-line ``error: ...``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]
