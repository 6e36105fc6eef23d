"""``calib-uncertainty predict``: run an nnU-Net v2 model folder member by member, then ``maps``.

For each input case: nnU-Net's preprocessing, then every ensemble member in turn (one network,
weights swapped; ``nnunet.inference.EnsemblePredictor``), each member's softmax probabilities
streamed straight into ``pipeline.case.process_case``: the same per-case outputs as ``maps``
(seg, calibrated probabilities, every uncertainty map, regions.json, summary.json, all on the
input image's grid). No member is written to disk and only one is in memory at a time.

summary.json additionally holds a ``prediction`` record: model folder, ensemble kind, members,
checkpoint, device, TTA and the timings (preprocessing, each member, inference total, whole case).
The cases run through ``pipeline.predict_job.run_predict`` (``--executor local|ray``; on Ray one
task per case, with a GPU where the cluster has GPUs); cases already complete for the same model,
settings and input are skipped, a failed case is reported and the others go on.
A calibration file must come from this very model (``calibration.fingerprint``: plans, dataset.json
and checkpoint hashes); another model's file is refused before any inference.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .common import (ENSEMBLE_HELP, PASSES_HELP, add_apply_calibration_options, add_executor_options, add_map_options,
                     add_output_option, fold, positive_int, probability_classes, region_max_extent, say)
from .nnunet_flags import (SYNONYMS_HELP, add_dataset_option, add_disable_tta, add_location_options,
                           apply_nnunet_flags)

log = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    from ..device import CHOICES
    from ..nnunet.model_folder import DEFAULT_CHECKPOINT, ENSEMBLE_KINDS

    p = subparsers.add_parser(
        "predict", help="run an nnU-Net v2 model as an ensemble and write calibrated maps per case",
        description="Predict CT images with an nnU-Net v2 trained model folder, keeping every ensemble "
                    "member (folds, snapshot checkpoints or a single model), and write calibrated "
                    "probabilities, a segmentation, all uncertainty maps and ranked error regions per "
                    "case on the input image's grid (the outputs of 'maps'). " + SYNONYMS_HELP + ".")
    g = p.add_argument_group("inputs")
    g.add_argument("-i", "--input", required=True, type=Path, metavar="FILE_OR_DIR",
                   help="one image (case id = file name without _0000 and extension) or an nnU-Net raw "
                        "images folder (<case>_0000.nii.gz, <case>_0001... for multi-channel models)")
    where = g.add_mutually_exclusive_group(required=True)
    where.add_argument("-m", "--model", type=Path, metavar="MODEL_DIR",
                       help="nnU-Net v2 trained model folder <Trainer>__<Plans>__<Configuration> (holding "
                            "plans.json, dataset.json and fold_<k>/checkpoint_*.pth)")
    add_dataset_option(where)
    add_location_options(p)
    g = p.add_argument_group("ensemble")
    g.add_argument("--ensemble", choices=ENSEMBLE_KINDS, default="deep", help=ENSEMBLE_HELP)
    g.add_argument("--passes", type=positive_int, default=None, metavar="N", help=PASSES_HELP)
    g.add_argument("-f", "--folds", nargs="+", type=fold, metavar="FOLD",
                   help="folds to use (numbers or 'all'; default: every fold holding the checkpoint, "
                        "for single: fold 0)")
    g.add_argument("-chk", "--checkpoint", default=DEFAULT_CHECKPOINT, metavar="NAME",
                   help=f"checkpoint file of each fold for deep/single (default {DEFAULT_CHECKPOINT})")
    g.add_argument("-device", "--device", choices=CHOICES, default="auto",
                   help="auto: CUDA, else Apple MPS, else the CPU; an unavailable device falls back to "
                        "the CPU with a warning (default auto)")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="nnU-Net's mirroring test-time augmentation (default on; --no-tta is up to 8x faster). "
                        "A calibration file fitted with the other setting is refused")
    add_disable_tta(g)
    g.add_argument("-step_size", "--step-size", type=_step_size, default=0.5, metavar="F",
                   help="sliding-window step as a fraction of the patch size (nnU-Net default 0.5)")
    add_apply_calibration_options(p, "THIS model")
    add_map_options(p)
    add_executor_options(p)
    add_output_option(p, "output folder; one sub-folder per case")
    p.set_defaults(func=run)
    return p


def _step_size(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"step size must be in (0, 1], got {text}")
    return v


def load_calibration_for_model(path, model):
    """Load a calibration file and refuse it (CalibrationMismatchError) unless it was fitted on
    ``model`` (fingerprint of plans.json, dataset.json and the checkpoints), or InputError when
    its class count differs."""
    from ..calibration.calibration_file import CalibrationFile
    from ..calibration.fingerprint import fingerprint_model_folder
    from ..errors import InputError

    cal = CalibrationFile.load(path)
    if model.is_region_based:
        from ..errors import CalibrationMismatchError

        raise CalibrationMismatchError(
            f"calibration file {path} calibrates softmax class probabilities ({cal.method}), but {model.path.name} "
            "is a region-based model (one sigmoid per region): a softmax calibration does not apply to it. Run "
            "predict without --calibration (region maps are uncalibrated)")
    cal.check_fingerprint(fingerprint_model_folder(model.path))
    if cal.class_names and len(cal.class_names) != len(model.class_names):
        raise InputError(f"calibration file {path} is for {len(cal.class_names)} classes, the model has "
                         f"{len(model.class_names)}")
    return cal


def _timing(record: dict) -> str:
    t = record["prediction_timings_s"]
    return (f"inference {t.get('inference_s', 0.0):.1f} s on {record['device']}, "
            f"case {t['case_total_s']:.1f} s")


def check_inputs(cases: dict) -> None:
    """Read every channel file of every case, so that a truncated or corrupt file or a NaN/inf
    voxel is refused before any inference (each case's identity is recorded by ``predict_case``)."""
    from ..io.images import read_image

    for files in cases.values():
        for f in files:
            read_image(f)


def run(args) -> int:
    from ..nnunet.inference import collect_cases
    from ..nnunet.cascade import check_previous_stage
    from ..nnunet.model_folder import ModelFolder
    from ..pipeline.case import CaseOptions, probability_labels
    from ..pipeline.maps_job import complete_record
    from ..pipeline.predict_job import PredictOptions, make_predict_job, run_predict
    from .common import case_finished, executor_options, finish_cohort_run, resolve_tta

    apply_nnunet_flags(args)  # --disable_tta, -d/-c/-tr/-p (also when the command function is called directly)
    executor = executor_options(args)
    model = ModelFolder.open(args.model)
    args.tta = resolve_tta(args.ensemble, args.tta)
    members = model.members(args.ensemble, args.folds, args.checkpoint, args.passes)
    check_previous_stage(model)  # a cascade without its low-resolution stage: refused before any work
    cases = collect_cases(args.input, model.n_channels, model.file_ending)
    cal = load_calibration_for_model(args.calibration, model) if args.calibration else None
    names = [m.name for m in members]
    if cal is not None:
        cal.check_ensemble(args.ensemble, names, bool(args.tta))
    check_inputs(cases)  # every input read (intact, finite) before any inference
    popts = PredictOptions(ensemble=args.ensemble, folds=tuple(args.folds) if args.folds else None,
                           checkpoint=args.checkpoint, device=args.device, tta=bool(args.tta),
                           step_size=args.step_size, passes=args.passes)
    opts = CaseOptions(ensemble_mode=args.ensemble_mode, regions_map=args.regions_map,
                       dae_sigma_mm=args.dae_sigma_mm, ebcu_radius_mm=args.ebcu_radius_mm,
                       min_region_mm3=args.min_region_mm3,
                       max_region_extent_mm=region_max_extent(args.region_max_extent_mm),
                       probability_classes=probability_classes(args.probabilities))
    if not model.is_region_based:  # an unknown --probabilities class: refused before any inference
        probability_labels(opts.probability_classes, model.class_names)
    job = make_predict_job(model, members, popts, cal, opts, args.output)
    say(f"{len(cases)} case(s), {len(members)} member(s) ({args.ensemble}: {', '.join(names)}), "
        f"TTA {'on' if args.tta else 'off'}, executor {executor.kind}")
    result = run_predict(job, cases, executor, on_done=case_finished(args.output, _timing))
    summaries, devices = [], []
    for case_id in cases:
        if case_id in result.results:
            s = result.results[case_id]
            summaries.append(s)
            devices.append(s["device"])
        elif case_id in result.skipped:
            summaries.append(complete_record(args.output, case_id))
    return finish_cohort_run(args.output, summaries,
                             {"model_folder": str(model.path), "ensemble": args.ensemble, "members": names,
                              "class_names": model.output_names,
                              "device": devices[0] if len(set(devices)) == 1 else sorted(set(devices)) or None,
                              "tta": bool(args.tta), "calibration": cal.source_path if cal else None}, result)
