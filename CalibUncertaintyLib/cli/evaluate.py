"""``calib-uncertainty evaluate``: metrics before and after calibration on held-out cases.

Thin wrapper over ``pipeline.evaluate`` (definitions there): CSV and JSON tables per case and
aggregated, inside the ROI and over the whole image, reliability diagrams, error-detection
plots and report.md, all written atomically into the output folder.

Inputs: ``--members DIR...`` or ``-m/--model MODEL_DIR`` (members run on ``--images`` here, their
outputs kept in ``--member-cache``, default ``cli.common.default_member_cache()``, shared with
``fit-temperature``). With --model the calibration
file is checked against the model folder's fingerprint (plans, dataset.json, checkpoints) before
any inference. ``--executor ray`` runs the per-case work (and with --model the members' inference)
as Ray tasks; the merged tables equal the local executor's.
"""

from __future__ import annotations

import argparse

from .nnunet_flags import SYNONYMS_HELP
from .common import (ROI_RULES, add_executor_options, add_identity_option, add_member_options, add_output_option,
                     nonnegative_mm, positive_mm, say)


def register(subparsers) -> argparse.ArgumentParser:
    from ..metrics.triage import DEFAULT_PRIORITY, PRIORITIES
    from ..uncertainty.maps import MAP_NAMES

    p = subparsers.add_parser(
        "evaluate", help="calibration, segmentation and error-detection metrics before/after calibration",
        description="Evaluate the ensemble with and without the calibration file on cases with "
                    "reference labels (use cases not used for fitting): NLL, Brier, ECE/MCE/ACE, pECE "
                    "inside the ROI and over the whole image, Dice, error detection of every map at its "
                    "τ*, case-level quality; tables (CSV, JSON), figures (PNG) and report.md. The members are "
                    "given as --save_probabilities folders (--members) or computed here from an nnU-Net "
                    "model folder (--model or nnU-Net's -d/-c/-tr/-p; outputs cached for later runs). "
                    + SYNONYMS_HELP + ".")
    add_member_options(p, images_required=True, labels="required", model_alternative=True)
    p.add_argument("--calibration", required=True, metavar="FILE",
                   help="calibration file from 'fit-temperature' for these members' model (with --model: "
                        "fitted on this very model folder, else it is refused)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--roi-radius-mm", type=nonnegative_mm, default=None, metavar="MM",
                   help="ROI radius in millimetres (default: the calibration file's, normally 15 mm)")
    g.add_argument("--roi-rule", choices=ROI_RULES, default=None,
                   help="ROI rule (default: the calibration file's); 'gt_union_prediction' also uses "
                        "the reference and is for research evaluation only")
    g.add_argument("--regions-map", choices=MAP_NAMES, default="dae",
                   help="map used for the error regions and case-level quality (default dae)")
    g.add_argument("--dae-sigma-mm", type=positive_mm, default=2.0, metavar="MM",
                   help="σ in millimetres of the distance-aware entropy (default 2 mm)")
    g.add_argument("--ebcu-radius-mm", type=positive_mm, default=4.0, metavar="MM",
                   help="EBCU ball radius in millimetres (default 4 mm)")
    g.add_argument("--min-region-mm3", type=nonnegative_mm, default=10.0, metavar="MM3",
                   help="smallest error region counted, in cubic millimetres (default 10 mm³)")
    g.add_argument("--priority", choices=PRIORITIES, default=DEFAULT_PRIORITY,
                   help="case-level aggregate that orders the cases for review, highest first (default "
                        f"{DEFAULT_PRIORITY}: the fraction of the predicted foreground the regions map flags, "
                        "chosen on a stock nnU-Net model's held-out cases); high_*_body_fraction need a "
                        "calibration file with an atypicality reference (fit-temperature writes one)")
    add_identity_option(p, "member outputs")
    add_executor_options(p)
    add_output_option(p, "output folder for tables, figures and report.md")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..errors import CalibUncertaintyError
    from ..io.nnunet_outputs import pair_cases
    from ..pipeline.dataset import check_member_inputs, load_checked_calibration
    from ..pipeline.evaluate import EvalOptions, evaluate_cases, write_evaluation
    from .common import ensemble_record, executor_options, member_inputs

    from .nnunet_flags import apply_nnunet_flags

    apply_nnunet_flags(args)  # --disable_tta, -d/-c/-tr/-p
    executor = executor_options(args)
    cal, fingerprint = None, None
    if args.model is not None:  # refuse another model's calibration file before any inference
        from ..calibration.fingerprint import fingerprint_model_folder
        from ..nnunet.model_folder import ModelFolder

        model = ModelFolder.open(args.model)
        fingerprint = fingerprint_model_folder(model.path)
        cal = load_checked_calibration(args.calibration, fingerprint=fingerprint, n_classes=len(model.class_names))
        from ..nnunet.model_folder import DEFAULT_CHECKPOINT

        from .common import resolve_tta

        run_members = model.members(args.ensemble or "deep", args.folds, args.checkpoint or DEFAULT_CHECKPOINT,
                                    args.passes)
        cal.check_ensemble(args.ensemble or "deep", [m.name for m in run_members],
                           resolve_tta(args.ensemble, args.tta))
    members = member_inputs(args, fingerprint=fingerprint)
    pairing = pair_cases(members.member_dirs, args.images, args.labels, members.cases, require_labels=True)
    check_member_inputs(pairing, args.allow_identity_mismatch)
    if cal is None:
        cal = load_checked_calibration(args.calibration, pairing)
    rec = ensemble_record(args, pairing)
    cal.check_ensemble(rec["kind"], rec["members"], rec["tta"])
    opts = EvalOptions(roi_radius_mm=args.roi_radius_mm, roi_rule=args.roi_rule, regions_map=args.regions_map,
                       dae_sigma_mm=args.dae_sigma_mm, ebcu_radius_mm=args.ebcu_radius_mm,
                       min_region_mm3=args.min_region_mm3, priority=args.priority)
    inputs = {**members.record, "images": str(args.images), "labels": str(args.labels),
              "calibration": str(args.calibration)}
    ev = evaluate_cases(pairing, cal, opts, inputs=inputs, executor=executor)
    write_evaluation(args.output, ev)
    for note in ev["notes"]:
        say(f"note: {note}")
    for row in ev["aggregate"]["metrics"]:
        if row["region"] == "roi":
            say(f"ROI {row['calibration']:>6}: NLL {row['nll.mean']:.4f}  ECE {row['ece_top.mean']:.4f}  "
                f"Brier {row['brier_multiclass.mean']:.4f}")
    t = ev.get("triage") or {}
    if t.get("ranking"):
        rc = (t["aggregates"].get(t["priority"]) or {}).get("risk_coverage") or {}
        say(f"review priority {t['priority']}: first {t['ranking'][0]['case']}; risk-coverage AURC "
            f"{rc.get('aurc', float('nan')):.4f} (oracle {rc.get('aurc_optimal', float('nan')):.4f})")
    say(f"report written: {args.output / 'report.md'} ({len(ev['per_case'])} case(s); "
        f"{len(ev['cohort']['failed'])} failed)")
    if ev["cohort"]["failed"]:
        raise CalibUncertaintyError(f"{len(ev['cohort']['failed'])} case(s) failed and are left out of the report "
                                    f"({'; '.join(f['case'] + ': ' + f['error'] for f in ev['cohort']['failed'][:3])})")
    return 0
