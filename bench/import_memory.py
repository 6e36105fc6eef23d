"""Resident memory of the imports ``predict`` needs, with and without nnU-Net's predictor module.

``nnunetv2.inference.predict_from_raw_data`` (home of ``nnUNetPredictor``) imports
``torch._dynamo`` and with it sympy; ``nnunet/sliding_window.py`` exists so that ``predict`` does
not need it. Each line is a fresh process; printed: its RSS after the imports.

    python bench/import_memory.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREDICT = ("CalibUncertaintyLib.cli.predict", "CalibUncertaintyLib.nnunet.inference",
           "CalibUncertaintyLib.nnunet.sliding_window", "CalibUncertaintyLib.nnunet.member_probabilities",
           "CalibUncertaintyLib.pipeline.case", "nnunetv2.utilities.plans_handling.plans_handler",
           "nnunetv2.preprocessing.preprocessors.default_preprocessor",
           "nnunetv2.inference.sliding_window_prediction", "nnunetv2.utilities.get_network_from_plans")
VARIANTS = {
    "torch alone": ("torch",),
    "what predict imports": PREDICT,
    "... + nnunetv2.inference.predict_from_raw_data": PREDICT + ("nnunetv2.inference.predict_from_raw_data",),
}


def rss_after(modules) -> float:
    code = ("import importlib, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def main(argv=None) -> int:
    import argparse
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="check that every module of every variant exists and "
                                                        "measure one light import only (the test suite's smoke run)")
    args = ap.parse_args(argv)
    if args.smoke:
        missing = [m for mods in VARIANTS.values() for m in mods if importlib.util.find_spec(m) is None]
        if missing:
            print(f"modules not found: {', '.join(missing)}", file=sys.stderr)
            return 1
        print(f"{'numpy alone (smoke)':48s} {rss_after(('numpy',)):7.0f} MiB")
        return 0
    rows = {name: rss_after(mods) for name, mods in VARIANTS.items()}
    for name, mb in rows.items():
        print(f"{name:48s} {mb:7.0f} MiB")
    extra = rows["... + nnunetv2.inference.predict_from_raw_data"] - rows["what predict imports"]
    print(f"importing nnU-Net's predictor module would add {extra:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
