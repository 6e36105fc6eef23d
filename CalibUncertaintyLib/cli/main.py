"""``calib-uncertainty``: the command-line entry point.

Commands are registered from the modules named in ``COMMANDS`` (``CalibUncertaintyLib.cli.<name>``);
each exposes ``register(subparsers)``, which adds its parser with ``set_defaults(func=run)``.
A module that does not exist (yet) is skipped, but only when the ModuleNotFoundError is about
that module itself: a missing dependency inside an existing command module is a real error.

Errors raised on purpose by the library (``errors.CalibUncertaintyError`` and subclasses) print
``error: <message>`` on stderr and exit with code 2, without a traceback (``--debug`` shows it).
Bad command-line values are reported by argparse, also with exit code 2. Ctrl-C exits with 130.
The output location (-o/--output, --member-cache) is checked (kind, writable) before any work.
``--progress`` (or CALIBU_PROGRESS=1) turns on the machine-readable progress lines.
An unknown flag gets argparse's error with the closest known option ("did you mean ...?",
``nnunet_flags``); the commands fold nnU-Net's spellings in first (``nnunet_flags.apply_nnunet_flags``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from .. import __version__
from ..errors import CalibUncertaintyError
from .common import add_global_options, setup_logging

COMMANDS = ("fit_temperature", "maps", "evaluate", "predict", "train_snapshots", "demo", "review")

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calib-uncertainty",
        description="Calibrated nnU-Net v2 ensembles and reviewable uncertainty maps for CT "
                    "segmentation. Every distance option is in millimetres.",
        epilog="Run 'calib-uncertainty COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        modname = f"{__package__}.{name}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                log.debug("command module %s not available, skipped", modname)
                continue
            raise
        module.register(sub)
    for subparser in sub.choices.values():
        known = {opt for a in subparser._actions for opt in a.option_strings}
        if "--debug" not in known and "-v" not in known:
            add_global_options(subparser, suppress_defaults=True)
    return parser


def sub_parser(parser: argparse.ArgumentParser, command: str | None):
    """The parser of ``command`` (None when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return None


def check_outputs(args) -> None:
    """Refuse a bad -o/--output (wrong kind, not writable) and --member-cache before any work."""
    from ..io.output_paths import check_output_path

    if getattr(args, "output", None) is not None and getattr(args, "output_kind", None):
        check_output_path(args.output, args.output_kind)
    if getattr(args, "member_cache", None) is not None:
        check_output_path(args.member_cache, "dir", "member cache folder")


def _display():
    """The live progress display for a person (``live_progress.LiveProgress``), installed for the
    command; none when the machine-readable lines are on (a GUI draws them) or when a display is
    already installed (a command run by another, e.g. the demo's steps)."""
    import contextlib

    from ..progress import has_display, progress_enabled, reporting
    from .live_progress import LiveProgress

    if progress_enabled() or has_display():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(reporting(stack.enter_context(LiveProgress())))
    return stack


def main(argv=None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return the exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse's error path (usage, message, exit 2), with "did you mean"
        from .nnunet_flags import unknown_arguments_message

        command = sub_parser(parser, getattr(args, "command", None)) or parser
        command.error(unknown_arguments_message(extras, command))
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    setup_logging(getattr(args, "verbose", 0) or 0)
    from ..progress import ENV_VAR

    progress_before = os.environ.get(ENV_VAR)
    if getattr(args, "progress", False):
        os.environ[ENV_VAR] = "1"  # also reaches child processes (e.g. Ray workers)
    try:
        with _display():
            check_outputs(args)
            rc = args.func(args)
    except CalibUncertaintyError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    finally:  # main() may be called in-process (tests, Slicer): leave the environment as it was
        if progress_before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = progress_before
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
