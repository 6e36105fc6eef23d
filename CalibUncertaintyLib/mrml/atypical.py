"""The panel's warning for a case unlike the calibration cases (Qt-free; the module shows the text).

A case folder's ``summary.json`` carries the atypicality aggregates and their p-values against the
calibration cases (``case_aggregates``, ``metrics.atypicality``); the panel shows one warning line
when one of them is at most ``metrics.atypicality.ATYPICAL_P``, above the guarantee lines, because
the calibration and the guarantees assume cases like the calibration cases.
"""

from __future__ import annotations


def warning_lines(summary: dict | None) -> list[str]:
    """``[warning]`` for a case named atypical, else [] (no reference, or p-values above the level)."""
    from ..metrics.atypicality import atypicality_warning

    text = atypicality_warning((summary or {}).get("case_aggregates"))
    return [text] if text else []
