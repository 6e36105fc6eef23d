"""Plain tables for reports: CSV writing, aggregation over cases, pooled reliability tables.

Rows are lists of flat dicts (column -> number, string or None). ``write_csv`` writes them
atomically; ``aggregate_rows`` summarises numeric columns over cases (mean, standard deviation
with ddof = 1, median, min, max, and n = the number of cases with a value; None values are
skipped, never counted as zero); ``merge_reliability_tables`` pools the per-case reliability
tables of ``metrics.ece.reliability_table`` into one (counts added, means weighted by count),
which is what the reliability diagram of several cases draws.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from ..io.atomic import write_text


def flatten(d: dict, prefix: str = "", sep: str = ".") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as they are (not expanded)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def _columns(rows: list[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, None)
    return list(cols)


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(str(_cell(x)) for x in v)
    return v


def to_csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    """CSV text with a header; columns default to every key in first-seen order; None -> empty."""
    columns = columns or _columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write ``rows`` as CSV atomically (see ``to_csv_text``)."""
    return write_text(path, to_csv_text(rows, columns))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(float(v))


def aggregate_rows(rows: list[dict], group_by: tuple[str, ...] = (), skip: tuple[str, ...] = ("case",)) -> list[dict]:
    """Summarise the numeric columns of ``rows`` over cases, per group of ``group_by`` values.

    One output row per group with, for each numeric column c: ``c.mean``, ``c.std`` (ddof = 1,
    None for n < 2), ``c.median``, ``c.min``, ``c.max`` and ``c.n`` (cases with a value).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(g) for g in group_by), []).append(r)
    out = []
    for key, members in groups.items():
        agg = dict(zip(group_by, key))
        agg["n_cases"] = len(members)
        for c in _columns(members):
            if c in group_by or c in skip:
                continue
            vals = [float(r[c]) for r in members if _is_number(r.get(c))]
            if not vals and any(r.get(c) is not None for r in members):
                continue  # a text column
            a = np.asarray(vals)
            agg.update({f"{c}.mean": float(a.mean()) if a.size else None,
                        f"{c}.std": float(a.std(ddof=1)) if a.size > 1 else None,
                        f"{c}.median": float(np.median(a)) if a.size else None,
                        f"{c}.min": float(a.min()) if a.size else None,
                        f"{c}.max": float(a.max()) if a.size else None,
                        f"{c}.n": int(a.size)})
        out.append(agg)
    return out


def merge_reliability_tables(tables: list[list[dict]]) -> list[dict]:
    """Pool reliability tables with identical bins: counts add, means are count-weighted."""
    tables = [t for t in tables if t]
    if not tables:
        return []
    n_bins = len(tables[0])
    if any(len(t) != n_bins for t in tables):
        raise ValueError("reliability tables with different bin counts cannot be pooled")
    out = []
    for b in range(n_bins):
        rows = [t[b] for t in tables]
        n = sum(int(r["count"]) for r in rows)
        sc = sum(r["count"] * r["mean_confidence"] for r in rows if r["count"])
        sa = sum(r["count"] * r["accuracy"] for r in rows if r["count"])
        mc, acc = (sc / n, sa / n) if n else (None, None)
        out.append({"bin": b, "lo": rows[0]["lo"], "hi": rows[0]["hi"], "count": n,
                    "mean_confidence": mc, "accuracy": acc, "gap": (mc - acc) if n else None})
    return out


def ece_from_table(table: list[dict]) -> float | None:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| of a (pooled) reliability table (METHODS.md §3)."""
    n = sum(r["count"] for r in table)
    if not n:
        return None
    return float(sum(r["count"] * abs(r["accuracy"] - r["mean_confidence"]) for r in table if r["count"]) / n)
