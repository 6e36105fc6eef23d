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
from pathlib import Path

ENSEMBLE_MODES = ("pool_then_calibrate", "per_member")
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


def add_member_options(parser: argparse.ArgumentParser, images_required: bool = False,
                       labels: str = "none") -> None:
    """--members, --images, --labels (``labels``: "none", "optional" or "required"), --cases."""
    g = parser.add_argument_group("inputs")
    g.add_argument("--members", nargs="+", required=True, type=existing_dir, metavar="DIR",
                   help="one folder per ensemble member, each holding nnU-Net --save_probabilities "
                        "output (<case>.npz with 'probabilities' (K, z, y, x) + <case>.pkl). One "
                        "folder is allowed (then mutual information and EPKL are zero)")
    g.add_argument("--images", type=existing_dir, metavar="DIR", required=images_required,
                   help="nnU-Net raw images folder (<case>_0000.nii.gz): every member must be on "
                        "the image's voxel grid" + ("" if images_required else
                                                    " (optional; checks the grid, else the members' "
                                                    "pkl geometry is used)"))
    if labels != "none":
        g.add_argument("--labels", type=existing_dir, metavar="DIR", required=labels == "required",
                       help="nnU-Net raw labels folder (<case>.nii.gz), reference segmentations on "
                            "the image grid")
    g.add_argument("--cases", nargs="+", metavar="CASE",
                   help="case ids to use (default: every case present in all member folders)")


def add_roi_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("region of interest")
    g.add_argument("--roi-radius-mm", type=nonnegative_mm, default=15.0, metavar="MM",
                   help="ROI = voxels within this distance in millimetres of the foreground "
                        "(default 15 mm)")
    g.add_argument("--roi-rule", choices=ROI_RULES, default="prediction",
                   help="'prediction': around the predicted foreground (exists at deployment, "
                        "default); 'gt_union_prediction': around reference ∪ prediction "
                        "(research evaluation only)")


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
                        "(default 10 mm³)")


def add_output_option(parser: argparse.ArgumentParser, what: str, metavar: str = "DIR") -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, metavar=metavar, help=what)


# --- runtime -------------------------------------------------------------------------------
def setup_logging(verbose: int = 0) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv."""
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    if not any(getattr(h, "_calibu", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
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
    """One line of result for the person at the terminal (stdout)."""
    print(message, flush=True)
