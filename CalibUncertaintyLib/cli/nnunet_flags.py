"""nnU-Net's own command-line vocabulary, and "did you mean" for flags the parser does not know.

People who run ``nnUNetv2_predict`` type its flags. The commands that run a model accept them as
synonyms of their own options (``-f`` = ``--folds``, ``-chk`` = ``--checkpoint``, ``-device`` =
``--device``, ``-step_size`` = ``--step-size``, ``--disable_tta`` = ``--no-tta``) and locate the
model as nnU-Net does: ``-d DATASET -c CONFIGURATION [-tr TRAINER] [-p PLANS]`` under
``$nnUNet_results`` (``nnunet.results_folder``), instead of ``-m MODEL_DIR``.

An unknown flag is answered on argparse's error path (usage, ``error: ...``, exit code 2) with the
closest known option ("did you mean --folds?"), or, for an nnU-Net flag this tool has no use for
(``-npp``, ``--save_probabilities``, ...), with what to do instead.
"""

from __future__ import annotations

import argparse
import difflib

#: the help line every command that runs a model carries
SYNONYMS_HELP = ("nnU-Net's flags work as in nnUNetv2_predict: -d DATASET -c CONFIG [-tr TRAINER] [-p PLANS] "
                 "(model folder under $nnUNet_results) instead of -m, -f = --folds, -chk = --checkpoint, "
                 "-device = --device, -step_size = --step-size, --disable_tta = --no-tta")

#: nnUNetv2_predict flags without a synonym here, and what to do instead
NOT_NEEDED = {
    "--save_probabilities": "predict always writes the calibrated probabilities (prob_<Class>.nii.gz; choose "
                            "them with --probabilities)",
    "--continue_prediction": "cases already complete are always skipped on a rerun",
    "--c": "cases already complete are always skipped on a rerun",
    "-npp": "preprocessing runs in this process, one case at a time (use --executor ray --workers N for "
            "several cases at once)",
    "-nps": "export runs in this process, slab by slab (use --executor ray --workers N for several cases at once)",
    "-num_parts": "spread the cases over machines with --executor ray instead",
    "-part_id": "spread the cases over machines with --executor ray instead",
    "-prev_stage_predictions": "a cascade's 3d_lowres stage is run first automatically from its sibling folder",
    "--verbose": "use -v (info) or -vv (debug)",
    "--disable_progress_bar": "the live bar is drawn only on a terminal; piped output gets a plain line every "
                              "few seconds (CALIBU_PROGRESS_INTERVAL seconds)",
    "--not_on_device": "the ensemble's sums stay on the device and fall back to the CPU by themselves when "
                       "the device runs out of memory",
}


def add_dataset_option(group) -> None:
    """``-d/--dataset`` (in the caller's group, e.g. mutually exclusive with ``-m``)."""
    group.add_argument("-d", "--dataset", dest="nnunet_dataset", metavar="DATASET",
                       help="instead of -m, as nnUNetv2_predict -d: a dataset id (501) or name (Dataset501_Name); "
                            "the model folder is $nnUNet_results/DatasetXXX_Name/<TRAINER>__<PLANS>__<CONFIG> "
                            "(-tr, -p, -c)")


def add_location_options(parser: argparse.ArgumentParser) -> None:
    """``-c``, ``-tr``, ``-p``: the rest of nnU-Net's model location (with ``-d`` only)."""
    from ..nnunet.results_folder import DEFAULT_PLANS, DEFAULT_TRAINER

    g = parser.add_argument_group("the model by nnU-Net's names (with -d only)")
    g.add_argument("-c", "--configuration", metavar="CONFIG",
                   help="nnU-Net configuration, e.g. 3d_fullres (required with -d, as for nnUNetv2_predict)")
    g.add_argument("-tr", "--trainer", metavar="TRAINER", default=None,
                   help=f"trainer class name (default {DEFAULT_TRAINER})")
    g.add_argument("-p", "--plans", metavar="PLANS", default=None,
                   help=f"plans identifier (default {DEFAULT_PLANS})")


def add_disable_tta(group) -> None:
    """``--disable_tta``: nnU-Net's spelling of ``--no-tta`` (its own dest, so that option lists
    built from the parser keep ``--tta/--no-tta`` as one option; ``apply_nnunet_flags`` folds it in)."""
    group.add_argument("--disable_tta", action="store_true", help="nnU-Net's spelling of --no-tta")


def apply_nnunet_flags(args) -> None:
    """Fold nnU-Net's spellings into the project's options, in place: ``--disable_tta`` ->
    ``args.tta = False``; ``-d/-c/-tr/-p`` -> ``args.model`` (the model folder, resolved as
    ``nnUNetv2_predict`` does); ``-c/-tr/-p`` without ``-d`` are refused. Idempotent; a no-op for
    commands without these options. Every command that has them calls it first. Raises
    ModelFolderError / InputError."""
    from ..errors import InputError

    if getattr(args, "disable_tta", False):
        if getattr(args, "tta", None) is True:
            raise InputError("--disable_tta and --tta contradict each other; give one of them")
        args.tta = False
    if not hasattr(args, "nnunet_dataset"):
        return
    given = [flag for flag, attr in (("-c", "configuration"), ("-tr", "trainer"), ("-p", "plans"))
             if getattr(args, attr, None) is not None]
    if args.nnunet_dataset is None:
        if given:
            raise InputError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with -d DATASET "
                             "(nnU-Net's way to name a model under $nnUNet_results); with -m give the model folder")
        return
    from ..nnunet.results_folder import resolve_model_folder

    args.model = resolve_model_folder(args.nnunet_dataset, args.configuration, args.trainer, args.plans)


def _spellings(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string of ``parser`` -> the spelling a suggestion names (its first ``--`` form)."""
    out = {}
    for a in parser._actions:
        longs = [s for s in a.option_strings if s.startswith("--")]
        for s in a.option_strings:
            if s not in ("-h", "--help"):
                out[s] = longs[0] if longs else s
    return out


def unknown_arguments_message(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's "unrecognized arguments" message, with a hint for every unknown flag: what to do
    instead of an nnU-Net flag this tool does not need, else the closest known option."""
    spellings = _spellings(parser)
    hints = []
    for arg in extras:
        if not arg.startswith("-") or _is_number(arg):
            continue
        flag = arg.split("=", 1)[0]
        if flag in NOT_NEEDED:
            hints.append(f"{flag} (nnU-Net) is not needed: {NOT_NEEDED[flag]}")
            continue
        close = closest_option(flag, spellings)
        if close:
            hints.append(f"{flag}: did you mean {close}?")
    msg = f"unrecognized arguments: {' '.join(extras)}"
    return msg + ("; " + "; ".join(hints) if hints else "")


def closest_option(flag: str, spellings: dict[str, str]) -> str | None:
    """The known option closest to ``flag`` (compared without leading dashes, '_' read as '-'),
    named by its long spelling; None when nothing is close."""
    def norm(s: str) -> str:
        return s.lstrip("-").replace("_", "-").lower()

    by_norm: dict[str, str] = {}
    for option, spelling in spellings.items():
        by_norm.setdefault(norm(option), spelling)
    hit = difflib.get_close_matches(norm(flag), list(by_norm), n=1, cutoff=0.6)
    return by_norm[hit[0]] if hit else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
