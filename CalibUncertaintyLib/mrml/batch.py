"""Batch review: a review sheet for every case of an output folder, in one MRML scene.

:func:`review_folder` takes the per-case folders written by ``calib-uncertainty maps`` or
``predict`` (docs/ARCHITECTURE.md "Per-case outputs") and, one case at a time, loads the CT and
the outputs into the given scene (``slicer.mrmlScene`` in Slicer, a ``slicer.vtkMRMLScene()``
from the slicer-core wheel elsewhere), writes the case's review sheet(s) with
``review_sheet.write_review_sheet`` (the top N error regions of METHODS.md section 5: connected
components of {U > τ*} in the ROI, ranked by volume × mean U, each shown in three planes through
its RAS centroid), and removes that case's nodes again, so the scene does not grow in a loop.
Only nodes the function added are removed; the scene's other nodes are never touched.

:func:`predict_and_review` is the batch loop for Slicer's Python console: the blocking
``calib-uncertainty predict`` on an image folder (run in this process), then
:func:`review_folder` on what it wrote.

The CT of a case is, in order: ``<images>/<case>_0000.<ext>`` (nnU-Net raw layout) when an
images folder is given; the image recorded in the case's summary.json (``input_image``, or
``prediction.input_files[0]`` as ``predict`` writes it) when that file exists. Without either the
sheet is drawn on a black background (a warning is logged).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CalibUncertaintyError, InputError
from ..progress import emit_progress

log = logging.getLogger(__name__)

SHEET_FORMATS = ("png", "html")
DEFAULT_SHEET_FOLDER = "review"
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class CaseReview:
    """What happened to one case: the sheets written, or the error that stopped it."""

    case_id: str
    case_dir: Path
    input_image: Path | None = None
    sheets: list[Path] = field(default_factory=list)
    n_regions: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# --- finding cases and images -----------------------------------------------------------------
def _is_case_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / "regions.json").is_file()


def find_case_dirs(case_dirs_or_out_dir) -> list[Path]:
    """The per-case folders to review.

    Accepts one output folder of ``maps``/``predict`` (its non-hidden sub-folders holding a
    regions.json, sorted by name; the ``.<case>.partial`` folders of an unfinished run are
    skipped), one case folder, or a list of case folders. Raises InputError when a path does not
    exist or nothing reviewable is found.
    """
    if isinstance(case_dirs_or_out_dir, (str, Path)):
        paths = [Path(case_dirs_or_out_dir)]
    else:
        paths = [Path(p) for p in case_dirs_or_out_dir]
    if not paths:
        raise InputError("no output folder given to review")
    found: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise InputError(f"output folder not found: {p}")
        if _is_case_dir(p):
            found.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if _is_case_dir(d))
        if not subs:
            raise InputError(f"{p} holds no case output folder (a sub-folder with regions.json, as "
                             "'calib-uncertainty maps' or 'predict' write them)")
        found += subs
    seen, unique = set(), []
    for d in found:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def _summary(case_dir: Path) -> dict:
    try:
        doc = json.loads((case_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}                     # read_case_folder reports a broken/missing summary.json
    return doc if isinstance(doc, dict) else {}


def find_input_image(case_id: str, case_dir, images=None) -> Path | None:
    """The CT a case's outputs were computed from (module docstring), or None.

    ``images``: an nnU-Net raw images folder (``<case>_0000.nii.gz``; also .nii, .nrrd, .mha,
    .mhd) or one image file. An images folder without the case's file is an InputError (the
    reviewer asked for that folder); the summary.json record is the fallback only when no
    ``images`` is given.
    """
    case_dir = Path(case_dir)
    if images is not None:
        images = Path(images)
        if images.is_file():
            return images
        if not images.is_dir():
            raise InputError(f"images folder not found: {images}")
        for stem in (f"{case_id}_0000", case_id):
            for ending in IMAGE_ENDINGS:
                if (images / f"{stem}{ending}").is_file():
                    return images / f"{stem}{ending}"
        raise InputError(f"no image for case {case_id} in {images} (expected {case_id}_0000.nii.gz, "
                         "the nnU-Net raw layout)")
    summary = _summary(case_dir)
    pred = summary.get("prediction")
    files = pred.get("input_files") if isinstance(pred, dict) else None
    ident = summary.get("input_identity")
    candidates = [summary.get("input_image")] + (list(files[:1]) if isinstance(files, list) else []) + \
        [ident.get("file") if isinstance(ident, dict) else None]
    for c in candidates:
        if isinstance(c, str) and Path(c).is_file():
            return Path(c)
    return None


def _resolve_layer(case_nodes, map_name: str | None) -> str | None:
    """Overlay layer name for ``map_name`` ("dae", "map_dae" or "prob_<Class>"); None = the
    map the regions were cut on (write_review_sheet's default)."""
    if map_name is None:
        return None
    layers = case_nodes.layer_names()
    name = map_name[len("map_"):] if map_name.startswith("map_") and map_name not in layers else map_name
    if name not in layers:
        raise InputError(f"case {case_nodes.case_id} has no overlay {map_name!r}; available: "
                         f"{', '.join(layers)}")
    return name


def _check_options(top_n: int, formats) -> tuple[str, ...]:
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise InputError(f"top_n must be a whole number >= 1, got {top_n!r}")
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    bad = [f for f in formats if f not in SHEET_FORMATS]
    if not formats or bad:
        raise InputError(f"sheet format(s) {bad or formats} not supported; choose from {', '.join(SHEET_FORMATS)}")
    return tuple(dict.fromkeys(formats))


# --- one case ---------------------------------------------------------------------------------
def review_case(scene, case_dir, out_dir, images=None, top_n: int = 3, map_name: str | None = None,
                formats=("png",), opacity: float | None = None, size_px: int = 256,
                fov_mm: float | None = None, table_rows: int = 20,
                allow_identity_mismatch: bool = False, views=None) -> CaseReview:
    """Load one case into ``scene``, write ``<out_dir>/<case>_review.<fmt>`` per format, and
    remove every node this call added (also when it fails). Raises on failure. ``views``: an open
    ``slice_views.SliceViews`` of ``scene`` to draw with (default: one for this case)."""
    from .nodes import load_case_outputs
    from .review_sheet import write_review_sheets
    from .volumes import load_volume_file, remove_nodes

    formats = _check_options(top_n, formats)
    case_dir = Path(case_dir)
    case_id = str(_summary(case_dir).get("case") or case_dir.name)
    result = CaseReview(case_id=case_id, case_dir=case_dir)
    result.input_image = find_input_image(case_id, case_dir, images)
    if result.input_image is None:
        log.warning("case %s: no CT found (give the images folder); the sheet has no CT background", case_id)
    ct_node = None
    try:
        if result.input_image is not None:
            ct_node = load_volume_file(scene, result.input_image, name=f"{case_id} CT")
        case_nodes = load_case_outputs(scene, case_dir, input_volume_node=ct_node,
                                       allow_identity_mismatch=allow_identity_mismatch)
        try:
            layer = _resolve_layer(case_nodes, map_name)
            result.n_regions = len(case_nodes.regions)
            paths = [Path(out_dir) / f"{case_id}_review.{fmt}" for fmt in formats]
            result.sheets += write_review_sheets(scene, case_nodes, paths, top_n=top_n, layer=layer, opacity=opacity,
                                                 size_px=size_px, fov_mm=fov_mm, max_table_rows=table_rows,
                                                 views=views)
        finally:
            case_nodes.remove_from_scene(scene)
    finally:
        if ct_node is not None:
            remove_nodes(scene, [ct_node])
    return result


# --- a folder ---------------------------------------------------------------------------------
def review_folder(scene, case_dirs_or_out_dir, images=None, out_dir=None, top_n: int = 3,
                  map_name: str | None = None, formats=("png",), opacity: float | None = None,
                  size_px: int = 256, fov_mm: float | None = None, table_rows: int = 20,
                  keep_going: bool = False, results: list | None = None,
                  allow_identity_mismatch: bool = False) -> list[Path]:
    """Write a review sheet per case folder and return the paths of the sheets written.

    ``case_dirs_or_out_dir``: an output folder of ``maps``/``predict``, one case folder or a list
    of them (:func:`find_case_dirs`). ``images``: the CT folder (``<case>_0000.nii.gz``), see
    :func:`find_input_image`. ``out_dir``: where ``<case>_review.png`` / ``.html`` go (default:
    a ``review`` folder inside the output folder, or beside the first case folder). ``top_n``:
    regions shown per case (the table lists all, up to 20). ``map_name``: the overlay (a map
    name such as "dae", or "prob_<Class>"); default the map the regions were cut on.
    ``formats``: any of "png" (needs matplotlib) and "html" (needs only VTK). ``fov_mm``: width
    of each view in millimetres, centred on the region (default: each view fitted to the body). ``table_rows``: rows of the
    region table (default 20; a note counts the rest). Every sheet is written
    atomically; each case's nodes are removed from ``scene`` before the next case is loaded.

    A failing case (missing files, a CT on another voxel grid, an unknown ``map_name``) raises
    its error at once, the sheets of earlier cases staying on disk; with ``keep_going=True`` it
    is logged and skipped, and an InputError naming every failed case is raised at the end only
    if no sheet at all was written. Pass a list as ``results`` to receive one
    :class:`CaseReview` per case (sheets, region count, error). A CT that is not the image
    the outputs were computed from (summary.json ``input_identity``) is an error unless
    ``allow_identity_mismatch``.
    """
    formats = _check_options(top_n, formats)
    case_dirs = find_case_dirs(case_dirs_or_out_dir)
    if out_dir is None:
        first = Path(case_dirs_or_out_dir) if isinstance(case_dirs_or_out_dir, (str, Path)) else case_dirs[0]
        out_dir = (first.parent if _is_case_dir(first) else first) / DEFAULT_SHEET_FOLDER
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"review sheet folder {out_dir} exists and is not a folder")
    written: list[Path] = []
    failed: list[CaseReview] = []
    n = len(case_dirs)
    from .slice_views import SliceViews

    with SliceViews(scene, (size_px, size_px)) as views:      # one offscreen view for every case
        for i, case_dir in enumerate(case_dirs):
            emit_progress("review", i / n, case=case_dir.name)
            res = _review_one(scene, case_dir, out_dir, images, top_n, map_name, formats, opacity, size_px,
                              fov_mm, table_rows, allow_identity_mismatch, views, keep_going)
            if res.ok:
                written += res.sheets
            else:
                failed.append(res)
            if results is not None:
                results.append(res)
    emit_progress("done", 1.0)
    if failed and not written:
        raise InputError("no review sheet written; " + "; ".join(f"{r.case_id}: {r.error}" for r in failed))
    return written


def _review_one(scene, case_dir, out_dir, images, top_n, map_name, formats, opacity, size_px, fov_mm, table_rows,
                allow_identity_mismatch, views, keep_going) -> CaseReview:
    """review_case for one folder of review_folder; a project error is returned (keep_going) or raised."""
    try:
        res = review_case(scene, case_dir, out_dir, images, top_n, map_name, formats, opacity, size_px,
                          fov_mm, table_rows, allow_identity_mismatch, views)
    except CalibUncertaintyError as e:
        if not keep_going:
            raise
        log.warning("case %s skipped: %s", case_dir.name, e)
        return CaseReview(case_id=case_dir.name, case_dir=case_dir, error=str(e))
    log.info("case %s: %d region(s), sheet(s) %s", res.case_id, res.n_regions, ", ".join(p.name for p in res.sheets))
    return res


# --- predict, then review -----------------------------------------------------------------------
def _predict_argv(images, model_dir, out_dir, options: dict) -> list[str]:
    """``calib-uncertainty predict`` arguments for keyword options named like its options
    (``ensemble="checkpoint"``, ``folds=[0, 1]``, ``tta=False``, ``dae_sigma_mm=2.0`` ...)."""
    from ..cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices.get("predict")
    if sub is None:
        raise InputError("the predict command is not available in this installation")
    allowed = {a.dest: a for a in sub._actions if a.option_strings and a.dest not in
               ("help", "input", "model", "output", "debug", "verbose")}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"unknown predict option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(allowed))}")
    argv = ["predict", "-i", str(images), "-m", str(model_dir), "-o", str(out_dir)]
    for key, value in options.items():
        flag = next(s for s in allowed[key].option_strings if s.startswith("--"))
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            elif "--no-" + flag[2:] in allowed[key].option_strings:
                argv.append("--no-" + flag[2:])
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        argv += [flag] + [str(v) for v in values]
    return argv


def run_predict(images, model_dir, out_dir, **predict_options) -> Path:
    """Run ``calib-uncertainty predict`` in this process (blocking) and return ``out_dir``.

    The command's own function runs (not ``cli.main.main``), so its errors propagate as
    exceptions with their message and the host's logging setup is left alone; a bad option value
    is an InputError with argparse's message instead of a process exit.
    """
    from ..cli.main import build_parser

    argv = _predict_argv(images, model_dir, out_dir, predict_options)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise InputError(f"predict options rejected: {msg[-1] if msg else ' '.join(argv)}") from None
    rc = args.func(args)
    if rc:
        raise InputError(f"'calib-uncertainty {' '.join(argv)}' returned {rc}")
    return Path(out_dir)


def predict_and_review(scene, images, model_dir, out_dir, top_n: int = 3, map_name: str | None = None,
                       formats=("png",), sheets_dir=None, fov_mm: float | None = None,
                       **predict_options) -> list[Path]:
    """Predict every image of ``images`` with the nnU-Net model folder ``model_dir`` (blocking,
    in this process) into ``out_dir``, then :func:`review_folder` the cases it wrote.

    ``predict_options`` are ``predict``'s options by their Python names (``ensemble``,
    ``folds``, ``checkpoint``, ``device``, ``tta``, ``step_size``, ``calibration``,
    ``ensemble_mode``, ``dae_sigma_mm``, ``ebcu_radius_mm``, ``regions_map``, ``min_region_mm3``;
    distances in mm). Sheets go to ``sheets_dir`` (default ``<out_dir>/review``). Only the cases
    of this run are reviewed. Returns the sheet paths. Works with ``slicer.mrmlScene`` in 3D
    Slicer and with a ``slicer.vtkMRMLScene()`` from slicer-core; it blocks the caller (Slicer's
    GUI too) until done: for a non-blocking run use the module's Apply button.
    """
    from ..nnunet.inference import collect_cases

    _check_options(top_n, formats)
    out_dir = Path(out_dir)
    run_predict(images, model_dir, out_dir, **predict_options)
    try:
        from ..nnunet.model_folder import ModelFolder

        model = ModelFolder.open(model_dir)
        case_ids = list(collect_cases(images, model.n_channels, model.file_ending))
    except CalibUncertaintyError:
        case_ids = []
    case_dirs = [out_dir / c for c in case_ids if _is_case_dir(out_dir / c)] or out_dir
    sheets_dir = out_dir / DEFAULT_SHEET_FOLDER if sheets_dir is None else sheets_dir
    return review_folder(scene, case_dirs, images=images, out_dir=sheets_dir, top_n=top_n, map_name=map_name,
                         formats=formats, fov_mm=fov_mm)
