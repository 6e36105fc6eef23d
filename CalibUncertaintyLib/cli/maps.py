"""``calib-uncertainty maps``: per-case outputs from saved member probabilities.

Thin wrapper over ``pipeline.case.process_case``: for every case present in all member folders,
writes ``<out>/<case>/`` (seg, calibrated probabilities, every uncertainty map, regions.json,
summary.json) and ``<out>/summary.json`` listing the cases. A case folder appears only when
complete; a failing case stops the run and leaves earlier cases (and any older output of the
failing case) intact.
"""

from __future__ import annotations

import argparse

from .common import (add_apply_calibration_options, add_identity_option, add_map_options, add_member_options,
                     add_output_option, progress_bar, say)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "maps", help="calibrated probabilities, uncertainty maps and error regions per case",
        description="Combine ensemble members (nnU-Net --save_probabilities folders) into calibrated "
                    "probabilities, a segmentation, all uncertainty maps and ranked error regions per "
                    "case, written as NIfTI files on the image grid plus regions.json and summary.json.")
    add_member_options(p, images_required=False, labels="none")
    add_apply_calibration_options(p, "these members' model")
    add_map_options(p)
    add_identity_option(p, "member outputs")
    add_output_option(p, "output folder; one sub-folder per case")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..io.identity import SUMMARY_KEY, file_identity
    from ..io.nnunet_outputs import member_name, pair_cases
    from ..pipeline.case import CaseOptions, process_case
    from ..pipeline.dataset import check_member_inputs, load_checked_calibration
    from ..pipeline.folder_index import update_folder_index

    pairing = pair_cases(args.members, args.images, None, args.cases)
    check_member_inputs(pairing, args.allow_identity_mismatch)
    cal = load_checked_calibration(args.calibration, pairing) if args.calibration else None
    if cal is not None:
        cal.check_ensemble(None, [member_name(d) for d in args.members], None)
    # every image read (intact, finite) and fingerprinted before any case is computed
    identities = {cf.case: file_identity(cf.image_paths[0], cf.case) for cf in pairing.cases if cf.image_paths}
    names = [member_name(d) for d in args.members]
    summaries = []
    for note in pairing.notes:
        say(f"note: {note}")
    for cf in progress_bar(pairing.cases, total=len(pairing.cases), desc="maps"):
        opts = CaseOptions(ensemble_mode=args.ensemble_mode, regions_map=args.regions_map,
                           dae_sigma_mm=args.dae_sigma_mm, ebcu_radius_mm=args.ebcu_radius_mm,
                           min_region_mm3=args.min_region_mm3, n_members=len(names), member_names=names,
                           extra_summary={SUMMARY_KEY: identities.get(cf.case)})
        s = process_case(cf.case, cf.load_members(pairing.n_classes), cf.geometry, args.output, cal,
                         pairing.class_names, opts)
        summaries.append({"case": cf.case, "n_regions": s["n_regions"], "timings_s": s["timings_s"]})
        say(f"{cf.case}: {s['n_regions']} region(s) on {s['regions_map']}, {s['timings_s']['total_s']:.1f} s")
    replaced = update_folder_index(args.output, summaries,
                                   {"n_members": pairing.n_members, "class_names": pairing.class_names,
                                    "calibration": cal.source_path if cal else None, "notes": pairing.notes})
    if replaced:
        say(f"replaced the earlier outputs of {len(replaced)} case(s): {', '.join(replaced)}")
    say(f"{len(summaries)} case(s) written to {args.output}")
    return 0
