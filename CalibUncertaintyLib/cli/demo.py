"""``calib-uncertainty demo``: the whole pipeline on a generated phantom dataset, on the CPU.

Generates CT-like phantoms, plans and preprocesses them with nnU-Net, trains a small deep
ensemble (5 folds) and a checkpoint ensemble (cyclical-LR snapshots), fits the temperature on
calibration cases, writes calibrated probabilities, uncertainty maps and error regions for the
test cases, evaluates single model / deep ensemble / checkpoint ensemble before and after
calibration, and writes REPORT.md. A rerun reuses every finished step (see ``CalibUncertaintyLib/demo.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import positive_int, say

DESCRIPTION = (
    "The whole pipeline on a generated phantom dataset, on the CPU: generates CT-like phantoms, plans and "
    "preprocesses them with nnU-Net, trains a small deep ensemble (5 folds) and a checkpoint ensemble "
    "(cyclical-LR snapshots), fits the temperature on calibration cases, writes calibrated probabilities, "
    "uncertainty maps and error regions for the test cases, evaluates single model / deep ensemble / checkpoint "
    "ensemble before and after calibration, runs predict on one test image and writes REPORT.md. Training "
    "dominates the time (measured times, with their machine, in docs/BENCHMARKS.md); a rerun reuses every "
    "finished step and keeps the record of the run that computed the numbers.")


def register(subparsers) -> argparse.ArgumentParser:
    from ..device import CHOICES

    p = subparsers.add_parser("demo", help="the whole pipeline on a generated phantom dataset, on the CPU "
                                           "(what scripts/demo.sh runs)",
                              description=DESCRIPTION)
    p.add_argument("--workdir", type=Path, default=Path("demo_output"),
                   help="folder for everything the demo writes (default ./demo_output; reused on rerun)")
    p.add_argument("--device", choices=CHOICES, default="auto",
                   help="auto: CUDA, else Apple MPS, else the CPU (default auto)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads for training and inference (default 1, whatever the machine: the "
                        "thread count changes the tiny models and so the numbers)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run of every step (tiny volumes, few iterations): checks the "
                        "installation, the numbers mean nothing")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..demo import DemoSettings, comparison_table, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    result = run_demo(args.workdir, device=args.device, settings=settings, num_threads=args.threads)
    for row in result.summary["comparison"]:
        say(f"{row['ensemble']:>10} ({row['members']} member(s)): T = {_f(row.get('temperature'))}, "
            f"ROI NLL {_f(row.get('nll_before'))} -> {_f(row.get('nll_after'))}, "
            f"ECE {_f(row.get('ece_top_before'))} -> {_f(row.get('ece_top_after'))}")
    say("the table this run produced:")
    for line in comparison_table(result.summary["comparison"]):
        say(line)
    rep = result.summary.get("reproducibility") or {}
    say(f"({rep.get('torch_threads')} torch thread(s), {rep.get('machine')}, torch {rep.get('torch')}: the same "
        "settings on the same CPU repeat it; other thread counts or CPUs give other numbers)")
    say(f"report: {result.report}")
    say(f"done in {result.summary['seconds']:.0f} s (reused: {', '.join(result.steps_skipped) or 'nothing'})")
    computed = result.summary.get("computed_by") or {}
    if not result.steps_run and computed:
        say(f"every step was reused: these numbers are those of the run that finished {computed.get('finished_utc')} "
            f"in {computed.get('seconds', 0):.0f} s (its record stays in REPORT.md)")
    return 0


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
