"""``calib-uncertainty fit-temperature``: fit the calibration file on calibration cases.

Thin wrapper over ``pipeline.fit.fit_calibration`` (see there for every definition): fits the
calibrator (default ``pipeline.fit.DEFAULT_METHOD``, the local temperature T(x); the global T,
per-class T or vector scaling with ``--method``) by NLL, then τ* per map by mean UEO, the EBCU
threshold (0.95 quantile of the calibrated entropy in the ROI) and the conformal thresholds on the
same cases, and records the model's fingerprint and the ensemble. The output file is written
atomically.

Inputs: ``--members DIR...`` (nnU-Net --save_probabilities folders; fingerprint of those folders:
plans + dataset.json) or ``-m/--model MODEL_DIR --images DIR`` (the command runs every member on
the images itself, reusing the outputs kept in ``--member-cache``, default
``cli.common.default_member_cache()``, shared with ``evaluate``; fingerprint of the model folder, checkpoints included, so ``predict
--calibration`` accepts the file for this model only).

``--executor ray`` runs the per-case passes (and with --model the members' inference) as Ray
tasks; the file equals the local executor's.
"""

from __future__ import annotations

import argparse

from .nnunet_flags import SYNONYMS_HELP
from .common import (ENSEMBLE_MODES, add_executor_options, add_identity_option, add_member_options, add_output_option,
                     add_roi_options, positive_int, positive_mm, say)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fit-temperature", help="fit the calibration (default: local temperature T(x)), τ* per map, the EBCU "
                                "threshold and the conformal flag and margin thresholds",
        description="Fit post-hoc calibration of an ensemble on calibration cases with reference labels. By "
                    "default the local temperature T(x): one temperature per predicted class and distance in mm to "
                    "the predicted contour (bins 0-15 mm and an open bin beyond the ROI), each fitted by minimising "
                    "the NLL with pooling towards its parent, which never changes the segmentation; the global T is "
                    "fitted and stored too (--method temperature makes it the calibrator). Then, with the "
                    "calibration applied, the flagging threshold τ* of every uncertainty map (maximum mean UEO), "
                    "the EBCU threshold and, by conformal risk control, flag and organ-margin thresholds at "
                    "--conformal-alpha (a real guarantee needs at least 1/α − 1 calibration cases: 9 for α = 0.1; "
                    "with fewer, the command says the guarantee is the trivial one). Writes a JSON calibration "
                    "file that 'maps', 'evaluate' and 'predict' apply; it is refused for other members, another "
                    "ensemble kind or another TTA setting. The members are given as --save_probabilities folders "
                    "(--members) or computed here from an nnU-Net model folder (--model or nnU-Net's -d/-c/-tr/-p, "
                    "with --images; outputs cached for later runs). " + SYNONYMS_HELP + ".")
    add_member_options(p, images_required=False, labels="required", model_alternative=True)
    add_roi_options(p)
    g = p.add_argument_group("fitting")
    g.add_argument("--method", choices=("temperature", "vector", "class_temperature", "local_temperature"),
                   default=None,
                   help="'local_temperature' (default with the pooled ensemble): T(x) by predicted class and "
                        "distance in mm to the predicted contour (see --local-open-bin); 'temperature': one T for "
                        "all classes (the thesis's calibrator; the default with --ensemble-mode per_member); "
                        "'vector': per-class scale and bias on log-probabilities (may change the segmentation); "
                        "'class_temperature': one T per predicted class. The per-class and local ones keep the "
                        "segmentation and store the global T too")
    g.add_argument("--local-open-bin", choices=("identity", "nearest", "fitted"), default=None,
                   help="local_temperature only: the temperature of the open last distance bin (≥ 15 mm, beyond "
                        "the ROI): 'fitted' (default: fitted on voxels sampled uniformly beyond the ROI, per "
                        "case as many as the ROI sample may hold; T = 1 in a cell none of them reaches), "
                        "'identity' (T = 1, the model's own "
                        "probabilities) or 'nearest' (the outer ROI bin's T)")
    g.add_argument("--ensemble-mode", choices=ENSEMBLE_MODES, default="pool_then_calibrate",
                   help="'pool_then_calibrate': average the members, then softmax(log p̄ / T) (default); "
                        "'per_member': scale every member by T before averaging. Both are fitted and "
                        "reported; this one is stored")
    g.add_argument("--max-voxels", type=positive_int, default=2_000_000, metavar="N",
                   help="at most N ROI voxels in total (split evenly over the cases), sampled "
                        "stratified by reference class (default 2000000)")
    g.add_argument("--seed", type=int, default=0, help="seed of the voxel sampling (default 0)")
    g.add_argument("--dae-sigma-mm", type=positive_mm, default=2.0, metavar="MM",
                   help="σ in millimetres of the distance-aware entropy used for its τ* (default 2 mm)")
    g.add_argument("--ebcu-radius-mm", type=positive_mm, default=4.0, metavar="MM",
                   help="ball radius in millimetres of EBCU used for its τ* (default 4 mm)")
    g.add_argument("--conformal-alpha", type=_alpha, default=0.1, metavar="A",
                   help="α of conformal risk control (default 0.1): flags that miss at most a fraction α "
                        "of the ROI errors and organ margins (outer: holds ≥ 1 − α of the organ; inner: "
                        "precision ≥ 1 − α), in expectation over cases; needs ≥ 1/α − 1 calibration cases "
                        "(9 for 0.1), else the guarantee is the trivial one (flag the whole ROI) and every "
                        "statement of it says so")
    g.add_argument("--tolerance-mm", type=_non_negative_mm, default=3.0, metavar="MM",
                   help="tolerance in millimetres of the contour-level errors (voxels of prediction ≠ reference "
                        "whose centre lies farther than this from the other contour) and of the per-organ surface "
                        "Dice (default 3 mm)")
    g.add_argument("--conformal-error", choices=("voxel", "contour"), default="voxel",
                   help="the error the organ margins written by maps/predict cover: 'voxel' (every voxel of "
                        "prediction ≠ reference, default) or 'contour' (contour deviations beyond --tolerance-mm); "
                        "both are fitted and reported")
    g.add_argument("--exchangeability-delta", type=_alpha, default=0.1, metavar="D",
                   help="level of the per-case exchangeability check (default 0.1): a case whose combined "
                        "atypicality p-value against the calibration cases is ≤ D gets every guarantee shown as void")
    add_identity_option(p, "member outputs")
    add_executor_options(p)
    add_output_option(p, "calibration file to write (JSON), e.g. calibration.json", metavar="FILE")
    p.set_defaults(func=run)
    return p


def _alpha(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (e.g. 0.1), got {text!r}")
    return v


def _non_negative_mm(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a distance in mm, got {text!r}") from None
    if not (v >= 0.0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a distance in mm >= 0 (e.g. 3), got {text!r}")
    return v


def run(args) -> int:
    from ..io.nnunet_outputs import pair_cases
    from ..pipeline.dataset import check_member_inputs
    from ..pipeline.fit import FitOptions, fit_calibration
    from .common import ensemble_record, executor_options, member_inputs

    from ..pipeline.fit import DEFAULT_METHOD

    from .nnunet_flags import apply_nnunet_flags

    apply_nnunet_flags(args)  # --disable_tta, -d/-c/-tr/-p
    if args.method is None:  # the local calibrator is pool-then-calibrate only
        args.method = DEFAULT_METHOD if args.ensemble_mode == "pool_then_calibrate" else "temperature"
    if args.local_open_bin and args.method != "local_temperature":
        from ..errors import InputError

        raise InputError(f"--local-open-bin applies to --method local_temperature only (got --method {args.method})")
    executor = executor_options(args)
    inputs = member_inputs(args)
    pairing = pair_cases(inputs.member_dirs, args.images, args.labels, inputs.cases, require_labels=True)
    check_member_inputs(pairing, args.allow_identity_mismatch)
    opts = FitOptions(method=args.method, ensemble_mode=args.ensemble_mode, roi_radius_mm=args.roi_radius_mm,
                      roi_rule=args.roi_rule, max_voxels=args.max_voxels, seed=args.seed,
                      dae_sigma_mm=args.dae_sigma_mm, ebcu_radius_mm=args.ebcu_radius_mm,
                      conformal_alpha=args.conformal_alpha, tolerance_mm=args.tolerance_mm,
                      conformal_error=args.conformal_error, exchangeability_delta=args.exchangeability_delta,
                      **({"local_open_bin": args.local_open_bin} if args.local_open_bin else {}))
    cal = fit_calibration(pairing, opts, fingerprint=inputs.fingerprint, executor=executor)
    cal.extra["inputs"] = inputs.record
    cal.ensemble = ensemble_record(args, pairing)
    path = cal.save(args.output)
    for note in pairing.notes:
        say(f"note: {note}")
    say(cal.describe())
    say(f"EBCU threshold {cal.ebcu_threshold:.4g} nats; τ* for {len(cal.thresholds)} maps")
    ref = cal.case_reference
    if ref:
        say(f"atypicality reference ({ref['n_cases']} cases, {'body (CT >= -500 HU)' if ref['domain'] == 'body' else 'whole image (no --images)'}): "
            + ", ".join(f"{m} above {v:.4g}" for m, v in ref["u_ref"].items())
            + ("; organ volume medians" if "volume_median_mm3" in ref else ""))
    from ..calibration.conformal import describe_record
    for line in describe_record(cal.conformal):
        say(line)
    from ..calibration.organ_quality import describe_record as describe_organ_quality

    contour = (cal.conformal or {}).get("contour")
    if contour:
        say(f"  contour-level flags and margins (deviations beyond {contour['tolerance_mm']:g} mm) fitted too; "
            f"the margins maps/predict write cover {cal.conformal.get('error', 'voxel')} errors")
    for line in describe_organ_quality(cal.organ_quality):
        say(line)
    say(f"calibration file written: {path}")
    return 0
