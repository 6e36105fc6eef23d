"""``predict`` over a cohort: one per-case function (``predict_case``) for every executor.

A case is nnU-Net preprocessing, every member's inference streamed into
``case.process_case`` (nothing of a member is written to disk). The loaded network
(``nnunet.inference.EnsemblePredictor``) is kept per process (``_predictor``), so the local loop
loads it once as before, and every Ray worker once for all the cases it runs. On Ray each case
asks for one GPU where the cluster has GPUs (``TaskResources(gpu_if_available=True)``), else one
CPU; the device is chosen in the worker at run time (``--device auto``: CUDA when present).
Completed cases are skipped on rerun (``cohort.completeness``), as for ``maps``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..cohort.completeness import case_is_complete, file_identity, job_key
from ..cohort.executor import ExecutorOptions, TaskResources, run_cohort
from ..io.identity import SUMMARY_KEY as IDENTITY_KEY
from ..io.identity import file_identity as input_identity
from ..nnunet.inference_estimate import announce_estimate
from ..progress import emit_progress, tick
from .case import CaseOptions, process_case
from .maps_job import calibration_identity

_PREDICTORS: dict = {}


@dataclass(frozen=True)
class PredictOptions:
    """How the model is run (the typed form of predict's ensemble options)."""

    ensemble: str = "deep"
    folds: tuple | None = None
    checkpoint: str = "checkpoint_final.pth"
    device: str = "auto"
    tta: bool = True
    step_size: float = 0.5
    passes: int | None = None  # MC-dropout passes (ensemble "dropout")


@dataclass
class PredictJob:
    """What every case of a ``predict`` run shares (sent once to each Ray worker)."""

    model_dir: Path
    predict: PredictOptions
    out_dir: Path
    calibration: object | None
    options: CaseOptions
    key: str


def make_predict_job(model, members, predict: PredictOptions, calibration, options: CaseOptions, out_dir) -> PredictJob:
    names = [m.name for m in members]
    key = job_key("predict", str(Path(model.path).resolve()), predict.__dict__, names,
                  file_identity([m.checkpoint for m in members]),
                  {k: v for k, v in options.__dict__.items() if k != "extra_summary"},
                  calibration_identity(calibration))
    return PredictJob(Path(model.path), predict, Path(out_dir), calibration,
                      replace(options, n_members=len(members), member_names=names), key)


def case_key(job: PredictJob, files) -> str:
    return job_key(job.key, file_identity(files))


def _predictor(job: PredictJob):
    """This process's predictor for the job's model and settings (loaded on first use)."""
    from ..nnunet.inference import EnsemblePredictor
    from ..nnunet.model_folder import ModelFolder

    k = (str(job.model_dir), job.predict)
    if k not in _PREDICTORS:
        _PREDICTORS.clear()  # one network per process
        t = time.perf_counter()
        model = ModelFolder.open(job.model_dir)
        p = job.predict
        members = model.members(p.ensemble, list(p.folds) if p.folds else None, p.checkpoint, p.passes)
        predictor = EnsemblePredictor(model, members, device=p.device, tta=p.tta, tile_step_size=p.step_size)
        _PREDICTORS[k] = (model, members, predictor, time.perf_counter() - t)
    return _PREDICTORS[k]


def predict_case(job: PredictJob, item) -> dict:
    """One case ``(case_id, [channel files])`` -> ``<out>/<case>/``; returns its short record."""
    case_id, files = item
    model, members, predictor, load_s = _predictor(job)
    t0 = time.perf_counter()
    emit_progress("preprocess", 0.0, case=case_id, message="nnU-Net preprocessing (crop, resample)")
    case = predictor.prepare(files, case_id)
    estimate = announce_estimate(predictor, case)
    p = job.predict
    record = {
        "model_folder": str(model.path), "configuration": predictor.configuration,
        "trainer": predictor.trainer_name, "ensemble": p.ensemble, "checkpoint": p.checkpoint,
        "members": [m.name for m in members], "device": predictor.device_name, "tta": bool(p.tta), "passes": p.passes,
        "tile_step_size": p.step_size, "input_files": [str(f) for f in files],
        "timings_s": {"load_model_s": round(load_s, 4), "preprocess_s": round(case.seconds, 4)},
        "estimate": estimate.record() if estimate is not None else None,
    }
    extra = {**job.options.extra_summary, "prediction": record, "cohort": {"job_key": case_key(job, files)}}
    extra[IDENTITY_KEY] = input_identity(files[0], case_id)  # for the wrong-patient check of review and Slicer
    # process_case consumes the members before it builds summary.json, so the timings that
    # _timed_members writes into ``record`` are in place by then.
    if predictor.has_regions:  # sigmoid outputs: independent per-region Bernoullis
        from .region_case import process_region_case

        s = process_region_case(case_id, _timed_members(predictor, case, record["timings_s"]), case.geometry,
                                job.out_dir, model.region_names, predictor.label_manager.regions_class_order,
                                replace(job.options, extra_summary=extra))
    else:
        s = process_case(case_id, _timed_members(predictor, case, record["timings_s"]), case.geometry,
                         job.out_dir, job.calibration, model.class_names, replace(job.options, extra_summary=extra),
                         ct_path=files[0])
    total = time.perf_counter() - t0
    if estimate is not None and record["timings_s"].get("inference_s"):  # refine the next estimate
        from ..nnunet.inference_estimate import record_pass_time

        record_pass_time(predictor, record["timings_s"]["inference_s"] / max(estimate.n_network_passes, 1))
    del case
    return {"case": case_id, "n_regions": s["n_regions"], "regions_map": s["regions_map"],
            "timings_s": s["timings_s"], "case_aggregates": s.get("case_aggregates"), "device": predictor.device_name,
            "prediction_timings_s": {**record["timings_s"], "case_total_s": round(total, 4)}}


class _SlabsShown:
    """A member computed slab by slab (``MemberProbabilities``) whose slab reads are shown as
    progress ticks (``progress.tick("slab", ...)``): the export of a member to the image grid is
    long for a large CT. Everything else is the member's own."""

    def __init__(self, member):
        from ..uncertainty.streaming import z_slabs

        self._member = member
        n = len(list(z_slabs(tuple(member.shape[1:]))))
        self._total = n if getattr(member, "valid_probabilities", False) else 2 * n  # read once, or twice
        self._done = 0

    def __getattr__(self, name):
        return getattr(self._member, name)

    def slab(self, sl):
        out = self._member.slab(sl)
        self._done += 1
        tick("slab", min(self._done, self._total), self._total)
        return out


def _timed_members(predictor, case, timings: dict):
    """Yield each member's probabilities; record per-member and total inference seconds.

    Each member comes lazily (``MemberProbabilities``: its logits, turned into probabilities
    slab by slab as the accumulator reads them, so no member's full probability volume is ever
    allocated). No reference to a yielded member is kept while the next one is predicted, and
    the preprocessed image is dropped once the last member is done (the maps that follow do not
    need it)."""
    per_member = []
    n = len(predictor.members)
    for pred in predictor.iter_members(case, progress=(0.0, 0.6), lazy=True):
        per_member.append(round(pred.seconds, 4))
        # the member's export to the image grid runs as the accumulator reads it (slab ticks)
        emit_progress("export", 0.6 * (pred.index + 1) / n, case=case.case_id, member=pred.index + 1, n_members=n,
                      message=pred.member.name)
        timings["members_s"] = per_member
        timings["inference_s"] = round(sum(per_member), 4)
        probs = pred.probabilities
        del pred
        yield _SlabsShown(probs) if hasattr(probs, "slab") else probs
        del probs
    case.data = None
    gc.collect()


def run_predict(job: PredictJob, cases: dict, executor: ExecutorOptions | None = None, on_done=None):
    """Every case of ``cases`` ({case: [channel files]}) not yet complete. Returns the ``CohortResult``.
    ``on_done(case_id, record)``: called in this process as each case is finished (``run_cohort``)."""
    skipped = [c for c, files in cases.items() if case_is_complete(job.out_dir, c, case_key(job, files))]
    items = [(c, (c, list(files))) for c, files in cases.items() if c not in skipped]
    try:
        return run_cohort(predict_case, job, items, executor, desc="predict",
                          resources=TaskResources(num_cpus=1, gpu_if_available=True), skipped=skipped,
                          on_done=on_done)
    finally:
        _PREDICTORS.clear()  # the local executor's network is not kept after the run
