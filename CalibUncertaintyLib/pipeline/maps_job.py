"""``maps`` over a cohort: one per-case function (``maps_case``) for every executor.

``run_maps`` skips the cases whose output folder is already complete for this very job
(``cohort.completeness``: the case's summary.json records the job key), then maps ``maps_case``
over the others with ``cohort.executor.run_cohort`` (local loop or Ray tasks). ``maps_case`` is
``case.process_case`` on one case's member files: it builds the folder as a hidden ``.partial``
folder and renames it into place only when complete, so a worker killed mid-case leaves nothing
under the case's final name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..cohort.completeness import case_is_complete, file_identity, job_key
from ..cohort.executor import ExecutorOptions, TaskResources, run_cohort
from ..io.identity import SUMMARY_KEY as IDENTITY_KEY
from ..io.identity import file_identity as input_identity
from .case import CaseOptions, process_case


@dataclass
class MapsJob:
    """What every case of a ``maps`` run shares (sent once to each Ray worker)."""

    out_dir: Path
    n_classes: int
    class_names: list
    calibration: object | None
    options: CaseOptions
    key: str


def calibration_identity(calibration) -> list | None:
    """The calibration's part of a job key: its file's identity and its fitted values."""
    if calibration is None:
        return None
    src = [calibration.source_path] if calibration.source_path else []
    return [file_identity(src), calibration.method, calibration.ensemble_mode, calibration.temperature,
            calibration.vector, calibration.ebcu_threshold, calibration.thresholds,
            *([calibration.local] if getattr(calibration, "local", None) is not None else [])]


def make_maps_job(pairing, calibration, options: CaseOptions, out_dir) -> MapsJob:
    opts = {k: v for k, v in asdict(options).items() if k != "extra_summary"}
    key = job_key("maps", opts, calibration_identity(calibration), pairing.class_names)
    return MapsJob(Path(out_dir), pairing.n_classes, list(pairing.class_names), calibration, options, key)


def case_key(job: MapsJob, cf) -> str:
    """The job key of one case: the job's plus the identity of the case's member and image files."""
    files = [p for d in cf.member_dirs for p in (Path(d) / f"{cf.case}.npz", Path(d) / f"{cf.case}.pkl")]
    return job_key(job.key, file_identity(files + list(cf.image_paths)))


def maps_case(job: MapsJob, cf) -> dict:
    """One case: members -> ``<out>/<case>/`` (``process_case``); returns its short record."""
    extra = {**job.options.extra_summary, "cohort": {"job_key": case_key(job, cf)}}
    if cf.image_paths:  # the wrong-patient check of review and Slicer compares against this record
        extra[IDENTITY_KEY] = input_identity(cf.image_paths[0], cf.case)
    s = process_case(cf.case, cf.load_members(job.n_classes), cf.geometry, job.out_dir, job.calibration,
                     job.class_names, replace(job.options, extra_summary=extra),
                     ct_path=cf.image_paths[0] if cf.image_paths else None)
    return {"case": cf.case, "n_regions": s["n_regions"], "regions_map": s["regions_map"],
            "timings_s": s["timings_s"], "case_aggregates": s.get("case_aggregates")}


def complete_record(out_dir, case: str) -> dict:
    """The short record of a case skipped as complete, read back from its summary.json."""
    import json

    s = json.loads((Path(out_dir) / case / "summary.json").read_text())
    return {"case": case, "n_regions": s.get("n_regions"), "regions_map": s.get("regions_map"),
            "timings_s": s.get("timings_s"), "case_aggregates": s.get("case_aggregates"), "skipped": True}


def run_maps(pairing, calibration, options: CaseOptions, out_dir, executor: ExecutorOptions | None = None,
             on_done=None):
    """Every case of ``pairing`` not yet complete -> its output folder. Returns the ``CohortResult``.
    ``on_done(case_id, record)``: called in this process as each case is finished (``run_cohort``)."""
    job = make_maps_job(pairing, calibration, options, out_dir)
    skipped = [cf.case for cf in pairing.cases if case_is_complete(out_dir, cf.case, case_key(job, cf))]
    items = [(cf.case, cf) for cf in pairing.cases if cf.case not in skipped]
    return run_cohort(maps_case, job, items, executor, desc="maps", resources=TaskResources(num_cpus=1),
                      skipped=skipped, on_done=on_done)
