"""``calib-uncertainty predict``: run an nnU-Net v2 model folder member by member, then ``maps``.

For each input case: nnU-Net's preprocessing, then every ensemble member in turn (one network,
weights swapped; ``nnunet.inference.EnsemblePredictor``), each member's softmax probabilities
streamed straight into ``pipeline.case.process_case``: the same per-case outputs as ``maps``
(seg, calibrated probabilities, every uncertainty map, regions.json, summary.json, all on the
input image's grid). No member is written to disk and only one is in memory at a time.

summary.json additionally holds a ``prediction`` record: model folder, ensemble kind, members,
checkpoint, device, TTA and the timings (preprocessing, each member, inference total, whole case).
A calibration file must come from this very model (``calibration.fingerprint``: plans, dataset.json
and checkpoint hashes); another model's file is refused before any inference.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from pathlib import Path

from .common import add_apply_calibration_options, add_map_options, add_output_option, progress_bar, say

log = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    from ..device import CHOICES
    from ..nnunet.model_folder import DEFAULT_CHECKPOINT, ENSEMBLE_KINDS

    p = subparsers.add_parser(
        "predict", help="run an nnU-Net v2 model as an ensemble and write calibrated maps per case",
        description="Predict CT images with an nnU-Net v2 trained model folder, keeping every ensemble "
                    "member (folds, snapshot checkpoints or a single model), and write calibrated "
                    "probabilities, a segmentation, all uncertainty maps and ranked error regions per "
                    "case on the input image's grid (the outputs of 'maps').")
    g = p.add_argument_group("inputs")
    g.add_argument("-i", "--input", required=True, type=Path, metavar="FILE_OR_DIR",
                   help="one image (case id = file name without _0000 and extension) or an nnU-Net raw "
                        "images folder (<case>_0000.nii.gz, <case>_0001... for multi-channel models)")
    g.add_argument("-m", "--model", required=True, type=Path, metavar="MODEL_DIR",
                   help="nnU-Net v2 trained model folder <Trainer>__<Plans>__<Configuration> (holding "
                        "plans.json, dataset.json and fold_<k>/checkpoint_*.pth)")
    g = p.add_argument_group("ensemble")
    g.add_argument("--ensemble", choices=ENSEMBLE_KINDS, default="deep",
                   help="deep: one member per fold (default); checkpoint: the snapshot checkpoints "
                        "checkpoint_snapshot_<cycle>.pth of the chosen fold(s); single: one model")
    g.add_argument("--folds", nargs="+", metavar="FOLD",
                   help="folds to use (numbers or 'all'; default: every fold holding the checkpoint, "
                        "for single: fold 0)")
    g.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, metavar="NAME",
                   help=f"checkpoint file of each fold for deep/single (default {DEFAULT_CHECKPOINT})")
    g.add_argument("--device", choices=CHOICES, default="auto",
                   help="auto: CUDA, else Apple MPS, else the CPU; an unavailable device falls back to "
                        "the CPU with a warning (default auto)")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="nnU-Net's mirroring test-time augmentation (default on; --no-tta is up to 8x faster)")
    g.add_argument("--step-size", type=_step_size, default=0.5, metavar="F",
                   help="sliding-window step as a fraction of the patch size (nnU-Net default 0.5)")
    add_apply_calibration_options(p, "THIS model")
    add_map_options(p)
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
    cal.check_fingerprint(fingerprint_model_folder(model.path))
    if cal.class_names and len(cal.class_names) != len(model.class_names):
        raise InputError(f"calibration file {path} is for {len(cal.class_names)} classes, the model has "
                         f"{len(model.class_names)}")
    return cal


def input_identities(cases: dict) -> dict:
    """{case: identity record of its first channel}; every channel file is read first, so a
    truncated or corrupt file or a NaN/inf voxel is refused before any inference."""
    from ..io.identity import file_identity
    from ..io.images import read_image

    out = {}
    for case_id, files in cases.items():
        out[case_id] = file_identity(files[0], case_id)
        for f in files[1:]:
            read_image(f)
    return out


def run(args) -> int:
    from ..io.identity import SUMMARY_KEY
    from ..nnunet.inference import EnsemblePredictor, collect_cases
    from ..nnunet.model_folder import ModelFolder
    from ..pipeline.case import CaseOptions, process_case
    from ..pipeline.folder_index import update_folder_index

    model = ModelFolder.open(args.model)
    members = model.members(args.ensemble, args.folds, args.checkpoint)
    cases = collect_cases(args.input, model.n_channels, model.file_ending)
    cal = load_calibration_for_model(args.calibration, model) if args.calibration else None
    if cal is not None:
        cal.check_ensemble(args.ensemble, [m.name for m in members], bool(args.tta))
    identities = input_identities(cases)  # every input read (intact, finite) before any inference
    t_load = time.perf_counter()
    predictor = EnsemblePredictor(model, members, device=args.device, tta=args.tta, tile_step_size=args.step_size)
    load_s = time.perf_counter() - t_load
    names = [m.name for m in members]
    say(f"{len(cases)} case(s), {len(members)} member(s) ({args.ensemble}: {', '.join(names)}) on "
        f"{predictor.device_name}, TTA {'on' if args.tta else 'off'}")
    summaries = []
    for case_id, files in progress_bar(cases.items(), total=len(cases), desc="predict"):
        t0 = time.perf_counter()
        case = predictor.prepare(files, case_id)
        record = {
            "model_folder": str(model.path), "configuration": predictor.configuration,
            "trainer": predictor.trainer_name, "ensemble": args.ensemble, "checkpoint": args.checkpoint,
            "members": names, "device": predictor.device_name, "tta": bool(args.tta),
            "tile_step_size": args.step_size, "input_files": [str(f) for f in files],
            "timings_s": {"load_model_s": round(load_s, 4), "preprocess_s": round(case.seconds, 4)},
        }
        opts = CaseOptions(ensemble_mode=args.ensemble_mode, regions_map=args.regions_map,
                           dae_sigma_mm=args.dae_sigma_mm, ebcu_radius_mm=args.ebcu_radius_mm,
                           min_region_mm3=args.min_region_mm3, n_members=len(members), member_names=names,
                           extra_summary={"prediction": record, SUMMARY_KEY: identities[case_id]})
        # process_case consumes the members before it builds summary.json, so the timings that
        # _timed_members writes into ``record`` are in place by then.
        s = process_case(case_id, _timed_members(predictor, case, record["timings_s"]), case.geometry,
                         args.output, cal, model.class_names, opts)
        total = time.perf_counter() - t0
        summaries.append({"case": case_id, "n_regions": s["n_regions"], "timings_s": s["timings_s"],
                          "prediction_timings_s": {**record["timings_s"], "case_total_s": round(total, 4)}})
        t = record["timings_s"]
        say(f"{case_id}: {s['n_regions']} region(s) on {s['regions_map']}; inference {t['inference_s']:.1f} s, "
            f"total {total:.1f} s")
        del case
    replaced = update_folder_index(args.output, summaries,
                                   {"model_folder": str(model.path), "ensemble": args.ensemble, "members": names,
                                    "class_names": model.class_names, "device": predictor.device_name,
                                    "tta": bool(args.tta), "calibration": cal.source_path if cal else None})
    if replaced:
        say(f"replaced the earlier outputs of {len(replaced)} case(s): {', '.join(replaced)}")
    say(f"{len(summaries)} case(s) written to {args.output}")
    return 0


def _timed_members(predictor, case, timings: dict):
    """Yield each member's probabilities; record per-member and total inference seconds.

    Each member comes lazily (``MemberProbabilities``: its logits, turned into probabilities
    slab by slab as the accumulator reads them, so no member's full probability volume is ever
    allocated). No reference to a yielded member is kept while the next one is predicted, and
    the preprocessed image is dropped once the last member is done (the maps that follow do not
    need it)."""
    per_member = []
    for pred in predictor.iter_members(case, progress=(0.0, 0.6), lazy=True):
        per_member.append(round(pred.seconds, 4))
        timings["members_s"] = per_member
        timings["inference_s"] = round(sum(per_member), 4)
        probs = pred.probabilities
        del pred
        yield probs
        del probs
    case.data = None
    gc.collect()
