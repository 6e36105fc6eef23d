"""``calib-uncertainty review``: review sheets for every case of a ``maps``/``predict`` output folder.

Creates an MRML scene of its own (the slicer-core wheel: Slicer's MRML without the application)
and runs ``mrml.batch.review_folder``: per case, the CT and the outputs are loaded as nodes, the
top N error regions (METHODS.md section 5) are rendered in three planes through their RAS
centroids with the chosen map as overlay, and ``<case>_review.png`` (and/or ``.html``) is written
to the sheets folder; the case's nodes are removed before the next case.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_output_option, existing_dir, positive_int, positive_mm, say


def register(subparsers) -> argparse.ArgumentParser:
    from ..mrml.batch import SHEET_FORMATS

    p = subparsers.add_parser(
        "review", help="a review sheet (PNG/HTML) with the top error regions for every case of an output folder",
        description="Render the top error regions of every case written by 'maps' or 'predict' into a "
                    "review sheet: header, legend, region table and axial/sagittal/coronal views through "
                    "each region's centroid, drawn by Slicer's own slice view (the CT, the chosen "
                    "uncertainty map, the predicted organs as outlines). Needs the slicer-core package "
                    "(Slicer's MRML library) and OpenGL (Mesa's EGL without a display); without OpenGL "
                    "the views say so on a red banner.")
    p.add_argument("--outputs", nargs="+", required=True, type=existing_dir, metavar="DIR",
                   help="an output folder of 'maps'/'predict' (one sub-folder per case), or case folders")
    p.add_argument("--images", type=Path, metavar="DIR_OR_FILE",
                   help="the CT images (nnU-Net raw folder with <case>_0000.nii.gz, or one file); default: "
                        "the input recorded in each case's summary.json (written by 'predict')")
    p.add_argument("--top-n", type=positive_int, default=3, metavar="N",
                   help="error regions shown per case, largest score first (default 3)")
    p.add_argument("--map", dest="map_name", default=None, metavar="NAME",
                   help="overlay: an uncertainty map (dae, entropy, mutual_information, ...) or "
                        "prob_<Class> (default: the map the regions were cut on)")
    p.add_argument("--format", dest="formats", nargs="+", choices=SHEET_FORMATS, default=["png"],
                   help="sheet format(s): png (needs matplotlib) and/or html (default png)")
    p.add_argument("--fov-mm", type=positive_mm, default=None, metavar="MM",
                   help="width of each view in millimetres, centred on the region (default: each view "
                        "fitted to the body, through the region)")
    p.add_argument("--opacity", type=_opacity, default=0.6, metavar="F",
                   help="overlay opacity between 0 and 1 (default 0.6)")
    p.add_argument("--size-px", type=positive_int, default=256, metavar="PX",
                   help="pixel size of each snapshot (default 256)")
    p.add_argument("--table-rows", type=positive_int, default=20, metavar="N",
                   help="rows of the region table on each sheet (default 20; a note counts the rest)")
    p.add_argument("--allow-identity-mismatch", action="store_true",
                   help="show outputs on a CT that is not the image they were computed from (summary.json "
                        "records its case id and voxel hash); only when you know it is the same patient")
    p.add_argument("--keep-going", action="store_true",
                   help="skip a case that cannot be reviewed (reported at the end) instead of stopping")
    add_output_option(p, "folder for the review sheets (<case>_review.png / .html)")
    p.set_defaults(func=run)
    return p


def _opacity(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"opacity must be between 0 and 1, got {text}")
    return v


def new_scene():
    """A fresh ``vtkMRMLScene`` from slicer-core; a clear error when the package is missing."""
    from ..errors import CalibUncertaintyError

    try:
        import slicer

        return slicer.vtkMRMLScene()
    except (ImportError, AttributeError) as e:
        raise CalibUncertaintyError(
            f"'calib-uncertainty review' needs Slicer's MRML library, which is not importable here ({e}): "
            "pip install slicer-core (or run the batch review from 3D Slicer's Python console with "
            "CalibUncertaintyLib.mrml.batch.review_folder(slicer.mrmlScene, ...))") from e


def run(args) -> int:
    from ..mrml.batch import review_folder

    scene = new_scene()
    results: list = []
    outputs = args.outputs[0] if len(args.outputs) == 1 else args.outputs
    sheets = review_folder(scene, outputs, images=args.images, out_dir=args.output, top_n=args.top_n,
                           map_name=args.map_name, formats=tuple(args.formats), opacity=args.opacity,
                           size_px=args.size_px, fov_mm=args.fov_mm, table_rows=args.table_rows,
                           keep_going=args.keep_going, results=results,
                           allow_identity_mismatch=args.allow_identity_mismatch)
    for r in results:
        if r.ok:
            say(f"{r.case_id}: {r.n_regions} region(s) -> {', '.join(str(p) for p in r.sheets)}")
        else:
            say(f"{r.case_id}: FAILED: {r.error}")
    failed = [r for r in results if not r.ok]
    say(f"{len(sheets)} sheet(s) written to {args.output}" + (f"; {len(failed)} case(s) failed" if failed else ""))
    return 1 if failed else 0
