"""The top-level ``summary.json`` of a ``maps``/``predict`` output folder: an index of its cases.

A rerun for some cases into a folder that holds others must not make the index forget them.
``update_folder_index`` merges: the new records replace those of the same cases, every other
complete case folder already in the folder keeps its record (or gets one built from its own
``<case>/summary.json`` when the old index did not list it), and records of cases whose folder is
gone are dropped. It is called once, after the cases are done, by whichever executor ran them.

Index layout::

    {"cases": [{"case", "n_regions", "timings_s", "case_aggregates", ..., "run": {...}}, ...],   # by case id
     "review": {"priority", "order": [case ids, review first first], "priority_values", "without_aggregates"},
     "n_cases": N, "replaced": [case ids this update replaced], "updated_utc": "...",
     **run,                                                                     # the latest run's fields
     "executor", "done", "skipped", "failed", "retried"}                        # the latest run's outcome

``run`` (e.g. n_members, class_names, calibration, model folder, ensemble) is stored in each
new case record too, so a case written by an earlier run keeps the description of its own run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..io.atomic import write_json

log = logging.getLogger(__name__)

INDEX_NAME = "summary.json"


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def complete_cases(out_dir: str | os.PathLike) -> dict[str, dict]:
    """{case id: its summary.json} for every complete case folder in ``out_dir``.

    A case folder is complete when it holds a readable ``summary.json`` naming that case
    (``process_case`` writes it last and renames the finished folder into place)."""
    out_dir = Path(out_dir)
    found = {}
    if not out_dir.is_dir():
        return found
    for d in sorted(out_dir.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        s = _read_json(d / INDEX_NAME)
        if s.get("case") == d.name:
            found[d.name] = s
    return found


def _record_from_case_summary(summary: dict) -> dict:
    rec = {"case": summary["case"], "n_regions": summary.get("n_regions"), "timings_s": summary.get("timings_s"),
           "case_aggregates": summary.get("case_aggregates")}
    rec["run"] = {"n_members": summary.get("n_members"), "class_names": summary.get("class_names"),
                  "calibration": (summary.get("calibration") or {}).get("source_path")
                  if isinstance(summary.get("calibration"), dict) else summary.get("calibration")}
    return rec


def review_order(records: dict) -> dict:
    """The folder's cases in review order by the default priority (``metrics.triage``): each case's
    ``case_aggregates`` (from its summary.json); cases without them (older outputs, region models) last."""
    from ..metrics.triage import DEFAULT_PRIORITY, rank_cases

    have = [c for c in sorted(records) if isinstance(records[c].get("case_aggregates"), dict)]
    ranking = rank_cases(have, [records[c]["case_aggregates"] for c in have], DEFAULT_PRIORITY)
    return {"priority": DEFAULT_PRIORITY, "order": [r["case"] for r in ranking],
            "priority_values": {r["case"]: r["priority"] for r in ranking},
            "without_aggregates": [c for c in sorted(records) if c not in have],
            "rule": "highest priority first; a case whose priority is undefined (nothing predicted) first"}


def update_folder_index(out_dir: str | os.PathLike, new_case_records: list[dict],
                        run: dict | None = None, cohort: dict | None = None) -> list[str]:
    """Merge ``new_case_records`` (each a dict with at least ``"case"``) into ``<out_dir>/summary.json``
    (written atomically) and return the ids of the cases whose earlier record or folder was
    replaced by this run, sorted.

    ``run``: fields describing this run (stored at the top level and in each new record). Old
    records are kept for cases whose folder is still complete; complete case folders missing
    from the old index get a record from their own summary.json. ``cohort``: the outcome of this
    run (``cohort.executor.CohortResult.record()``: executor, done, skipped, failed, retried), stored
    at the top level only."""
    out_dir = Path(out_dir)
    run = dict(run or {})
    old = _read_json(out_dir / INDEX_NAME)
    old_records = {r["case"]: r for r in old.get("cases", []) if isinstance(r, dict) and "case" in r}
    on_disk = complete_cases(out_dir)
    new = {}
    for r in new_case_records:
        rec = dict(r)
        rec.setdefault("run", run)
        new[rec["case"]] = rec
    replaced = sorted(c for c in new if c in old_records)
    merged = {}
    for case, summary in on_disk.items():
        if case in new:
            continue
        merged[case] = old_records.get(case) or _record_from_case_summary(summary)
    dropped = sorted(set(old_records) - set(on_disk) - set(new))
    if dropped:
        log.warning("index of %s: dropped %d case(s) whose folder is gone or incomplete: %s", out_dir,
                    len(dropped), ", ".join(dropped))
    merged.update(new)
    index = {"cases": [merged[c] for c in sorted(merged)], "n_cases": len(merged), "replaced": replaced,
             "review": review_order(merged),
             "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **run}
    index.update(cohort or {})
    write_json(out_dir / INDEX_NAME, index)
    return replaced

