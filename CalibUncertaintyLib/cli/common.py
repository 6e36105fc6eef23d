"""Helpers shared by the command modules: option groups, value types, logging, progress bars.

Every distance a user sets is in millimetres; the option names end in ``-mm`` and the help
text says so. Value types raise ``argparse.ArgumentTypeError`` so a bad value is reported by
argparse ("argument --roi-radius-mm: ...", exit code 2) before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ENSEMBLE_MODES = ("pool_then_calibrate", "per_member")
ENSEMBLE_HELP = ("deep: one member per fold (default); checkpoint: the snapshot checkpoints "
                 "checkpoint_snapshot_<cycle>.pth of the chosen fold(s); single: one model; tta: one model, "
                 "one member per mirroring combination of the axes its checkpoint allows (8 for 3-D); "
                 "dropout: one model with dropout layers, one member per MC-dropout pass (--passes)")
PASSES_HELP = "MC-dropout passes with --ensemble dropout (default 10, at least 2)"
ROI_RULES = ("prediction", "gt_union_prediction")


# --- value types ---------------------------------------------------------------------------
def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_mm(text: str) -> float:
    """A distance in millimetres > 0."""
    v = _number(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a distance in mm > 0, got {text}")
    return v


def nonnegative_mm(text: str) -> float:
    """A distance (or volume) in millimetres >= 0."""
    v = _number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a value in mm >= 0, got {text}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return v


def nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return v


def fold(text: str) -> str:
    """A fold number or 'all' (kept as text, as nnU-Net's -f takes it)."""
    t = text.strip()
    if t.isdigit() or t == "all":
        return t
    hint = f" (-f{t} is read as -f {t}: write -f 0 or --folds 0)" if t.isalpha() else ""
    raise argparse.ArgumentTypeError(f"expected a fold number (0, 1, ...) or 'all', got {text!r}{hint}")


def existing_dir(text: str) -> Path:
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {text}")
    return p


def existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return p


# --- option groups -------------------------------------------------------------------------
def add_global_options(parser: argparse.ArgumentParser, suppress_defaults: bool = False) -> None:
    """--debug and -v/--verbose (also accepted after the command name)."""
    kw = {"default": argparse.SUPPRESS} if suppress_defaults else {}
    parser.add_argument("--debug", action="store_true", help="on an error, show the full Python "
                        "traceback instead of the one-line message", **kw)
    parser.add_argument("-v", "--verbose", action="count", help="more log output (-v info, -vv debug)",
                        **({"default": argparse.SUPPRESS} if suppress_defaults else {"default": 0}))
    parser.add_argument("--progress", action="store_true",
                        help="print machine-readable 'CALIBU_PROGRESS {...}' lines on stderr for a GUI "
                             "(same as the environment variable CALIBU_PROGRESS=1)", **kw)


def add_member_options(parser: argparse.ArgumentParser, images_required: bool = False,
                       labels: str = "none", model_alternative: bool = False) -> None:
    """--members, --images, --labels (``labels``: "none", "optional" or "required"), --cases.

    ``model_alternative``: --members or -m/--model (exactly one, checked by argparse), plus the
    options of ``add_model_run_options``; ``member_inputs`` then turns either into member folders.
    """
    g = parser.add_argument_group("inputs")
    members_help = ("one folder per ensemble member, each holding nnU-Net --save_probabilities "
                    "output (<case>.npz with 'probabilities' (K, z, y, x) + <case>.pkl). One "
                    "folder is allowed (then mutual information and EPKL are zero)")
    if model_alternative:
        x = g.add_mutually_exclusive_group(required=True)
        x.add_argument("--members", nargs="+", type=existing_dir, metavar="DIR",
                       help=members_help + ". Give either --members or --model")
        x.add_argument("-m", "--model", type=Path, metavar="MODEL_DIR",
                       help="instead of --members: an nnU-Net v2 trained model folder "
                            "<Trainer>__<Plans>__<Configuration> (plans.json, dataset.json, "
                            "fold_<k>/checkpoint_*.pth); every member is run on the --images "
                            "(required then) and its outputs are kept in --member-cache for reuse. "
                            "The calibration fingerprint is then the model's, checkpoints included")
        from .nnunet_flags import add_dataset_option

        add_dataset_option(x)
    else:
        g.add_argument("--members", nargs="+", required=True, type=existing_dir, metavar="DIR",
                       help=members_help)
    if model_alternative:
        images_help = ("nnU-Net raw images folder (<case>_0000.nii.gz): with --model the images "
                       "the model is run on (required); with --members every member must be on "
                       "the image's voxel grid" + ("" if images_required else " (optional with "
                                                  "--members: checks the grid, else the members' "
                                                  "pkl geometry is used)"))
    else:
        images_help = ("nnU-Net raw images folder (<case>_0000.nii.gz): every member must be on "
                       "the image's voxel grid" + ("" if images_required else
                                                   " (optional; checks the grid, else the members' "
                                                   "pkl geometry is used)"))
    g.add_argument("--images", type=existing_dir, metavar="DIR", required=images_required, help=images_help)
    if labels != "none":
        g.add_argument("--labels", type=existing_dir, metavar="DIR", required=labels == "required",
                       help="nnU-Net raw labels folder (<case>.nii.gz), reference segmentations on "
                            "the image grid")
    g.add_argument("--cases", nargs="+", metavar="CASE",
                   help="case ids to use (default: every case present in all member folders"
                        + (", or with --model every image in --images)" if model_alternative else ")"))
    if model_alternative:
        from .nnunet_flags import add_location_options

        add_location_options(parser)
        add_model_run_options(parser)


def add_model_run_options(parser: argparse.ArgumentParser) -> None:
    """How a --model is run: --ensemble, --folds, --checkpoint, --device, --tta, --member-cache."""
    from ..device import CHOICES
    from ..nnunet.model_folder import DEFAULT_CHECKPOINT, ENSEMBLE_KINDS
    from .nnunet_flags import add_disable_tta

    g = parser.add_argument_group("running a model (with --model or -d only)")
    g.add_argument("--ensemble", choices=ENSEMBLE_KINDS, default=None,
                   help=ENSEMBLE_HELP)
    g.add_argument("-f", "--folds", nargs="+", type=fold, metavar="FOLD",
                   help="folds to use (numbers or 'all'; default: every fold holding the checkpoint, "
                        "for single: fold 0)")
    g.add_argument("-chk", "--checkpoint", default=None, metavar="NAME",
                   help=f"checkpoint file of each fold for deep/single (default {DEFAULT_CHECKPOINT})")
    g.add_argument("--passes", type=positive_int, default=None, metavar="N",
                   help=PASSES_HELP)
    g.add_argument("-device", "--device", choices=CHOICES, default=None,
                   help="auto: CUDA, else Apple MPS, else the CPU; an unavailable device falls back to "
                        "the CPU with a warning (default auto)")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="nnU-Net's mirroring test-time augmentation (default on; --no-tta is up to 8x "
                        "faster). Use the same setting as 'predict' will: a calibration is refused by a run "
                        "with the other setting")
    add_disable_tta(g)
    g.add_argument("--member-cache", type=Path, metavar="DIR", default=None,
                   help="folder keeping every member's probabilities per case (nnU-Net "
                        "--save_probabilities layout, under <model>-<hash>/<tta|notta>/<member>/), "
                        "reused by later runs when the model's checkpoints, the TTA setting and the "
                        "input image are unchanged. Default, the same for fit-temperature and evaluate: "
                        "$CALIBU_CACHE_DIR/members, else $XDG_CACHE_HOME (~/.cache)/calib-uncertainty/members")


def default_member_cache() -> Path:
    """The member cache both fit-temperature and evaluate use without --member-cache, so the
    second command reuses what the first computed: ``$CALIBU_CACHE_DIR/members``, else
    ``$XDG_CACHE_HOME/calib-uncertainty/members`` (``~/.cache`` when XDG_CACHE_HOME is unset).
    Entries are keyed by model hash, TTA setting and member, and checked against the input
    image's sha256, so one cache serves every model and image set."""
    import os

    root = os.environ.get("CALIBU_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "members"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "calib-uncertainty" / "members"


@dataclass
class MemberInputs:
    """Member folders to pair with images and labels, from --members or from --model.

    ``fingerprint``: the model folder's fingerprint with --model (None with --members: the
    pipeline then fingerprints the member folders). ``record``: what the report states as inputs.
    """

    member_dirs: list
    cases: list | None
    fingerprint: dict | None
    record: dict
    model: object = None


def member_inputs(args, default_cache: Path | None = None, fingerprint: dict | None = None) -> MemberInputs:
    """Resolve --members or --model (``add_member_options(model_alternative=True)``).

    With --model: checks --images is given and, when the command has --labels, that every
    case has a label (before any inference), then runs or reuses every member on the images
    (``nnunet.member_cache.cached_member_dirs``, cache --member-cache or ``default_cache``) and
    says how many outputs were computed and reused. ``fingerprint``: the model's, if the caller
    already computed it. Raises InputError / ModelFolderError.
    """
    from ..errors import InputError
    from ..nnunet.model_folder import DEFAULT_CHECKPOINT

    run_opts = {"--ensemble": "ensemble", "--folds": "folds", "--checkpoint": "checkpoint", "--device": "device",
                "--tta/--no-tta": "tta", "--member-cache": "member_cache", "--passes": "passes"}
    if getattr(args, "model", None) is None:
        given = [opt for opt, attr in run_opts.items() if getattr(args, attr, None) is not None]
        if given:
            raise InputError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --model or -d "
                             "(running a model folder); with --members the members are already computed")
        return MemberInputs(list(args.members), args.cases, None,
                            {"members": [str(d) for d in args.members]})
    if args.images is None:
        raise InputError("--model needs --images DIR: the nnU-Net raw images folder (<case>_0000.nii.gz) "
                         "to run the model on")
    from ..io.nnunet_outputs import list_label_cases
    from ..nnunet.member_cache import cached_member_dirs, select_cases
    from ..nnunet.model_folder import ModelFolder

    args.ensemble = args.ensemble or "deep"
    args.checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    args.device = args.device or "auto"
    args.tta = resolve_tta(args.ensemble, args.tta)

    model = ModelFolder.open(args.model)
    if model.is_region_based:  # sigmoid outputs: softmax calibration does not apply (the reason, from class_names)
        model.class_names  # noqa: B018
    model.members(args.ensemble, args.folds, args.checkpoint, args.passes)  # a bad member request fails here, first
    from ..nnunet.cascade import check_previous_stage

    check_previous_stage(model)
    cases = list(select_cases(args.images, model, args.cases))
    if getattr(args, "labels", None) is not None:
        have = list_label_cases(args.labels)
        missing = [c for c in cases if c not in have]
        if missing:
            raise InputError(f"case(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} have an "
                             f"image but no label <case>.nii.gz in {args.labels}; pass --cases with the "
                             "labelled cases")
    cache = args.member_cache if args.member_cache is not None else (default_cache or default_member_cache())
    cm = cached_member_dirs(model.path, args.ensemble, args.folds, args.images, cache, device=args.device,
                            tta=args.tta, cases=cases, checkpoint=args.checkpoint, fingerprint=fingerprint,
                            executor=executor_options(args), passes=args.passes)
    say(f"{len(cm.members)} member(s) ({args.ensemble}: {', '.join(m.name for m in cm.members)}) x "
        f"{len(cm.cases)} case(s): {len(cm.computed)} output(s) computed"
        f"{' on ' + cm.device if cm.device else ''}, {len(cm.reused)} reused from {cm.cache_root}")
    record = {**cm.record(), "ensemble": args.ensemble, "checkpoint": args.checkpoint, "tta": bool(args.tta)}
    return MemberInputs(cm.member_dirs, cm.cases, cm.fingerprint, record, cm.model)


def resolve_tta(ensemble: str | None, tta: bool | None) -> bool:
    """The TTA setting for ``ensemble``: given or on by default; ``--ensemble tta`` makes every
    mirrored prediction a member, so it is on by definition and ``--no-tta`` contradicts it."""
    from ..errors import InputError

    if ensemble == "tta":
        if tta is False:
            raise InputError("--ensemble tta makes each mirrored prediction a member; it cannot be combined "
                             "with --no-tta")
        return True
    return True if tta is None else bool(tta)


def add_identity_option(parser: argparse.ArgumentParser, what: str) -> None:
    """--allow-identity-mismatch: the explicit override of the wrong-patient check."""
    parser.add_argument("--allow-identity-mismatch", action="store_true",
                        help=f"use {what} even when it records another input image than the one given "
                             "(another patient, or another version of the scan); only when you know it is "
                             "the same patient")


def ensemble_record(args, pairing) -> dict:
    """What the members are, for the calibration file's ``ensemble`` record and its check:
    with --model the ensemble kind, member names and TTA; with --members the folder names and
    the TTA setting their markers record (None for folders without one, e.g. nnUNetv2_predict's)."""
    from ..io.nnunet_outputs import member_name
    from ..nnunet.member_cache import recorded_tta

    dirs = pairing.cases[0].member_dirs if pairing.cases else []
    names = [member_name(d) for d in dirs]
    if getattr(args, "model", None) is None:
        return {"kind": None, "members": names, "tta": recorded_tta(dirs)}
    return {"kind": args.ensemble, "members": names, "tta": bool(args.tta)}


def add_roi_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("region of interest")
    g.add_argument("--roi-radius-mm", type=nonnegative_mm, default=15.0, metavar="MM",
                   help="ROI = voxels within this distance in millimetres of the foreground "
                        "(default 15 mm)")
    g.add_argument("--roi-rule", choices=ROI_RULES, default="prediction",
                   help="'prediction': around the predicted foreground (exists at deployment, "
                        "default); 'gt_union_prediction': around reference ∪ prediction "
                        "(research evaluation only)")


def add_apply_calibration_options(parser: argparse.ArgumentParser, whose_model: str) -> None:
    """--calibration and --ensemble-mode of the commands that apply a calibration file (maps, predict)."""
    parser.add_argument("--calibration", metavar="FILE",
                        help=f"calibration file from 'fit-temperature' fitted on {whose_model} (default: none, "
                             "uncalibrated outputs and the default thresholds)")
    parser.add_argument("--ensemble-mode", choices=ENSEMBLE_MODES, default=None,
                        help="how to combine members (default: the calibration file's mode, else "
                             "pool_then_calibrate)")


def add_map_options(parser: argparse.ArgumentParser) -> None:
    from ..uncertainty.maps import MAP_NAMES

    g = parser.add_argument_group("uncertainty maps and error regions")
    g.add_argument("--dae-sigma-mm", type=positive_mm, default=2.0, metavar="MM",
                   help="distance-aware entropy: width σ in millimetres of the weight "
                        "1 − exp(−d²/2σ²) that removes the entropy shell along the predicted "
                        "contour (default 2 mm)")
    g.add_argument("--ebcu-radius-mm", type=positive_mm, default=4.0, metavar="MM",
                   help="EBCU: radius in millimetres of the ball over which the excess of the "
                        "predictive entropy above its threshold is averaged (default 4 mm)")
    g.add_argument("--regions-map", choices=MAP_NAMES, default="dae",
                   help="map whose thresholded connected components become the error regions in "
                        "regions.json (default dae)")
    g.add_argument("--min-region-mm3", type=nonnegative_mm, default=10.0, metavar="MM3",
                   help="drop error regions smaller than this volume in cubic millimetres "
                        "(default 10 mm³; a single voxel is never a region)")
    g.add_argument("--region-max-extent-mm", type=nonnegative_mm, default=50.0, metavar="MM",
                   help="cut error regions larger than this along any axis into parts around "
                        "their uncertainty peaks, so that each fits one view (default 50 mm; "
                        "0 keeps whole connected components)")
    g.add_argument("--probabilities", nargs="+", default=["all"], metavar="CLASS",
                   help="which foreground classes get a calibrated probability file "
                        "prob_<Class>.nii.gz: 'all' (default), 'none', or class names / label "
                        "numbers (e.g. --probabilities Liver 3); the segmentation and the maps do "
                        "not depend on it (a 25-class model writes 24 probability volumes by default)")


def region_max_extent(value: float) -> float | None:
    """``--region-max-extent-mm`` -> ``CaseOptions.max_region_extent_mm``: None (whole components) for 0."""
    return float(value) if value else None


def probability_classes(values) -> tuple[str, ...] | None:
    """``--probabilities`` -> ``CaseOptions.probability_classes``: None for all, () for none."""
    from ..errors import InputError

    values = list(values or ["all"])
    if values == ["all"]:
        return None
    if values == ["none"]:
        return ()
    if "all" in values or "none" in values:
        raise InputError("--probabilities: give 'all', 'none' or class names, not a mix")
    return tuple(values)


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    """--executor, --ray-address, --max-retries, --workers: where the cases of a cohort run."""
    g = parser.add_argument_group("cohort execution")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one case after the other in this process (default); ray: every case is "
                        "a Ray task (pip install 'calib-uncertainty[ray]'), on a local Ray runtime "
                        "started for the run or on --ray-address")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join this running Ray cluster (e.g. auto, or ray://HEAD:10001) instead of "
                        "starting a local Ray runtime (with --executor ray)")
    g.add_argument("--max-retries", type=nonnegative_int, default=2, metavar="N",
                   help="retries per case after its worker died or a transient error (I/O, memory); "
                        "then the case is reported as failed and the others go on (default 2)")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="with --executor ray: at most N cases at once (and the CPU count of a local "
                        "Ray runtime started here); default: as the cluster's CPUs/GPUs allow")


def executor_options(args):
    """The typed ``cohort.executor.ExecutorOptions`` of the options added by ``add_executor_options``."""
    from ..cohort.executor import ExecutorOptions
    from ..errors import InputError

    kind = getattr(args, "executor", "local")
    if kind != "ray" and (getattr(args, "ray_address", None) or getattr(args, "workers", None)):
        raise InputError("--ray-address and --workers only apply with --executor ray")
    return ExecutorOptions(kind=kind, ray_address=getattr(args, "ray_address", None),
                           max_retries=getattr(args, "max_retries", 2), workers=getattr(args, "workers", None))


def add_output_option(parser: argparse.ArgumentParser, what: str, metavar: str = "DIR") -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, metavar=metavar, help=what)
    # checked (kind, writable) by cli.main before the command does any work
    parser.set_defaults(output_kind="file" if metavar == "FILE" else "dir")


# --- runtime -------------------------------------------------------------------------------
class _CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is when a record is logged.

    The handler is installed once per process; binding it to the stderr object of that moment
    would keep writing to a replaced (and possibly closed) stream after a GUI, a runner or a test
    swaps ``sys.stderr``."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler assigns it; the current sys.stderr is always used
        pass

    def emit(self, record):
        from ..progress import before_output

        before_output()  # a live status line is cleared first
        super().emit(record)


def setup_logging(verbose: int = 0) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv."""
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    if not any(getattr(h, "_calibu", False) for h in root.handlers):
        h = _CurrentStderrHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        h._calibu = True
        root.addHandler(h)
    root.setLevel(level)


def progress_bar(iterable, total: int | None = None, desc: str = ""):
    """A tqdm bar on stderr (shown only when stderr is a terminal)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=None, unit="case",
                dynamic_ncols=True, leave=False)


def say(message: str) -> None:
    """One line of result for the person at the terminal (stdout); a live status line is cleared first."""
    from ..progress import before_output

    before_output()
    print(message, flush=True)


def case_finished(out_dir, extra=None):
    """An ``on_done(case_id, record)`` for ``run_maps`` / ``run_predict``: says the case's verdict
    (``report.verdict``: what to look at) as soon as the case is finished. ``extra(record)``: more
    text for the line (e.g. predict's timings)."""
    from pathlib import Path

    from ..report.verdict import folder_verdict

    def on_done(case_id, record) -> None:
        try:
            line = folder_verdict(Path(out_dir) / case_id)
        except (OSError, ValueError):  # the folder is complete when on_done runs; never fail the run for a line
            line = f"{case_id}: done"
        say(line + (f" ({extra(record)})" if extra else ""))

    return on_done


def finish_cohort_run(out_dir, summaries: list, run: dict, result) -> int:
    """After ``maps``/``predict`` ran their cases: merge the records into the folder index, say
    which earlier cases were replaced and how the run went; raise the run's error when a case
    failed (the others are complete). Returns the exit code 0."""
    from ..pipeline.folder_index import update_folder_index

    replaced = update_folder_index(out_dir, summaries, run, cohort=result.record())
    if replaced:
        say(f"replaced the earlier outputs of {len(replaced)} case(s): {', '.join(replaced)}")
    say(f"{len(summaries)} case(s) in {out_dir}: {result.describe()}")
    from ..metrics.atypicality import atypical_summary_line

    atypical = atypical_summary_line(summaries)  # the cases unlike the calibration cases, with p-values
    if atypical:
        say(atypical)
    if result.failed:
        raise result.error()
    return 0
