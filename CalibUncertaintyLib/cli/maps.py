"""``calib-uncertainty maps``: per-case outputs from saved member probabilities.

Thin wrapper over ``pipeline.maps_job.run_maps`` (``pipeline.case.process_case`` per case, on the
local executor or on Ray): for every case present in all member folders, writes ``<out>/<case>/``
(seg, calibrated probabilities, every uncertainty map, regions.json, summary.json) and
``<out>/summary.json`` listing the cases done, skipped (already complete for the same inputs and
options) and failed. A case folder appears only when complete; a failing case is reported and
the other cases go on (exit code 2 when any failed), leaving any older output of the failing case intact.
"""

from __future__ import annotations

import argparse

from .common import (probability_classes, region_max_extent, add_apply_calibration_options, add_executor_options, add_identity_option, add_map_options,
                     add_member_options, add_output_option, say)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "maps", help="calibrated probabilities, uncertainty maps and error regions per case",
        description="Combine ensemble members (nnU-Net --save_probabilities folders) into calibrated "
                    "probabilities, a segmentation, all uncertainty maps and ranked error regions per "
                    "case, written as NIfTI files on the image grid plus regions.json and summary.json. "
                    "Cases already complete for the same inputs and options are skipped.")
    add_member_options(p, images_required=False, labels="none")
    add_apply_calibration_options(p, "these members' model")
    add_map_options(p)
    add_identity_option(p, "member outputs")
    add_executor_options(p)
    add_output_option(p, "output folder; one sub-folder per case")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..io.images import read_image
    from ..io.nnunet_outputs import member_name, pair_cases
    from ..pipeline.case import CaseOptions, probability_labels
    from ..pipeline.dataset import check_member_inputs, load_checked_calibration
    from ..pipeline.maps_job import complete_record, run_maps
    from .common import case_finished, executor_options, finish_cohort_run

    executor = executor_options(args)
    pairing = pair_cases(args.members, args.images, None, args.cases)
    check_member_inputs(pairing, args.allow_identity_mismatch)
    cal = load_checked_calibration(args.calibration, pairing) if args.calibration else None
    if cal is not None:
        from ..nnunet.member_cache import recorded_tta

        cal.check_ensemble(None, [member_name(d) for d in args.members], recorded_tta(args.members))
    for cf in pairing.cases:  # every image read (intact, finite) before any case is computed
        for path in cf.image_paths[:1]:
            read_image(path)
    names = [member_name(d) for d in args.members]
    for note in pairing.notes:
        say(f"note: {note}")
    opts = CaseOptions(ensemble_mode=args.ensemble_mode, regions_map=args.regions_map,
                       dae_sigma_mm=args.dae_sigma_mm, ebcu_radius_mm=args.ebcu_radius_mm,
                       min_region_mm3=args.min_region_mm3,
                       max_region_extent_mm=region_max_extent(args.region_max_extent_mm),
                       n_members=len(names), member_names=names,
                       probability_classes=probability_classes(args.probabilities))
    probability_labels(opts.probability_classes, pairing.class_names)  # an unknown class: refused up front
    result = run_maps(pairing, cal, opts, args.output, executor,
                      on_done=case_finished(args.output, lambda s: f"{s['timings_s']['total_s']:.1f} s"))
    summaries = []
    for cf in pairing.cases:
        if cf.case in result.results:
            summaries.append(result.results[cf.case])
        elif cf.case in result.skipped:
            summaries.append(complete_record(args.output, cf.case))
    return finish_cohort_run(args.output, summaries,
                             {"n_members": pairing.n_members, "class_names": pairing.class_names,
                              "calibration": cal.source_path if cal else None, "notes": pairing.notes}, result)
