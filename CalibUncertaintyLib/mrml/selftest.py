"""The module self-test body, Qt-free: the Slicer module's runTest() and a pytest test call it.

``run_self_test`` runs the review path end to end on a small volume and raises AssertionError
with a clear message at the first thing that is wrong:

1. outputs: with ``model_dir``, the library's blocking prediction on the CT
   (``calib-uncertainty predict -i CT -m MODEL --no-tta``, its command function run in this
   process); otherwise synthetic ensemble members over the CT
   (``ct_path``, or a CT-like phantom) run through the real pipeline (sample_case.py ->
   ``pipeline.case.process_case``);
2. load the CT and the outputs as nodes; every output volume must have the CT's IJKToRAS;
   class probabilities become nodes only when shown;
3. the project's colour tables must be attached to the probability and map display nodes;
4. a threshold change must reach the display node (ApplyThreshold, lower, upper);
5. the region table must have one row per region;
6. next_region must move Red, Yellow and Green so the region's jump point lies in all three planes;
7. Slicer's own slice view (``slice_views.py``: slice logic + segmentation displayable manager,
   offscreen, in a private scene) with the case segmentation shown as the module shows it must
   show the overlay's own colour at a shown voxel of the region, and exactly the picture without
   overlay once the threshold hides every voxel; the review sheet is written (a plainer PNG when
   matplotlib is missing, as in a fresh Slicer: the self-test needs only what Slicer ships).
   Without OpenGL the segmentation cannot be drawn: logged, and the overlay checked alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..io.images import read_image, write_image


def _check(cond, message: str) -> None:
    if not cond:
        raise AssertionError(f"CalibUncertainty self-test: {message}")


def _outputs(workdir: Path, model_dir, ct_path, log) -> tuple[Path, Path]:
    """(CT file, case output folder)."""
    from .sample_case import phantom_ct, write_sample_case

    if model_dir is not None:
        if ct_path is None:
            raise AssertionError("CalibUncertainty self-test: a model_dir needs a ct_path to predict on")
        from ..cli.main import build_parser
        from ..errors import CalibUncertaintyError

        out = workdir / "predicted"
        log(f"predicting {ct_path} with the model in {model_dir} (blocking, no TTA) ...")
        # the command's own function, not cli.main.main: errors keep their message and the host
        # application's logging setup is left alone
        args = build_parser().parse_args(["predict", "-i", str(ct_path), "-m", str(model_dir),
                                          "-o", str(out), "--no-tta"])
        try:
            rc = args.func(args)
        except CalibUncertaintyError as e:
            raise AssertionError(f"CalibUncertainty self-test: prediction failed: {e}") from e
        _check(not rc, f"'calib-uncertainty predict' returned {rc}")
        cases = [d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")]
        _check(len(cases) == 1, f"expected one case folder in {out}, found {len(cases)}")
        return Path(ct_path), cases[0]
    if ct_path is not None:
        ct, geometry = read_image(ct_path)
        ct_file = Path(ct_path)
    else:
        ct, geometry = phantom_ct()
        ct_file = write_image(workdir / "selftest_ct.nii.gz", ct, geometry)
    log("building a case output folder from synthetic ensemble members ...")
    return ct_file, write_sample_case(workdir / "outputs", geometry, case_id="selftest", input_image=str(ct_file))


def run_self_test(scene, workdir, model_dir=None, ct_path=None, log=print) -> dict:
    """Run the end-to-end review check (see the module docstring) in ``scene``.

    Files go to ``workdir``. Returns a summary dict (case nodes, controller, timings, sheet
    paths) when every check passed; raises AssertionError otherwise.
    """
    from .colors import PROBABILITY, UNCERTAINTY, colour_table_id
    from .nodes import (geometry_from_volume_node, ijk_to_ras_of, load_case_outputs, load_volume_file,
                        volume_array)
    from .review import ReviewController
    from .review_sheet import NO_MATPLOTLIB_MESSAGE, matplotlib_available, write_review_sheet
    from .slice_jump import distance_to_plane_mm
    from .slice_views import SliceViews
    from .snapshots import case_segmentations
    from .view_checks import flagged_voxel, overlay_pixel_check

    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ct_file, case_dir = _outputs(workdir, model_dir, ct_path, log)

    log("loading the CT and the case outputs as nodes ...")
    ct_node = load_volume_file(scene, ct_file, name="SelfTest CT")
    case = load_case_outputs(scene, case_dir, input_volume_node=ct_node, name_prefix="SelfTest")

    ref = ijk_to_ras_of(ct_node)
    for name, node in case.layers().items():
        _check(np.allclose(ijk_to_ras_of(node), ref, atol=1e-4),
               f"{name}: IJKToRAS differs from the CT's, voxels would not line up")
        _check(geometry_from_volume_node(node).mismatch(case.geometry) is None,
               f"{name}: geometry differs from the NIfTI's")

    prob_layers = [n for n in case.layer_names() if n.startswith("prob_")]
    _check(prob_layers and not case.probabilities,
           f"expected class probabilities on demand, found {len(case.probabilities)} loaded of {len(prob_layers)}")
    case.layer_node(scene, prob_layers[0])      # loaded when first shown
    for cls, node in case.probabilities.items():
        _check(node.GetDisplayNode().GetColorNodeID() == colour_table_id(scene, PROBABILITY),
               f"P({cls}) does not use the CalibU Probability colour table")
        _check(np.allclose(ijk_to_ras_of(node), ref, atol=1e-4), f"P({cls}): IJKToRAS differs from the CT's")
    for name, node in case.maps.items():
        _check(node.GetDisplayNode().GetColorNodeID() == colour_table_id(scene, UNCERTAINTY),
               f"map {name} does not use the CalibU Uncertainty colour table")

    ctl = ReviewController(scene, case)
    _check(len(case.regions) > 0, "the case has no error regions to review")
    layer = case.regions_doc.get("map") if case.regions_doc.get("map") in case.maps else next(iter(case.maps))
    ctl.set_foreground_map(layer)
    tau = ctl.default_threshold(layer)
    disp = case.maps[layer].GetDisplayNode()
    default = ctl.default_range(layer)
    ctl.set_threshold(tau * 0.5, tau * 4 + 1.0)
    _check(disp.GetApplyThreshold() == 1 and abs(disp.GetLowerThreshold() - tau * 0.5) < 1e-6
           and abs(disp.GetUpperThreshold() - (tau * 4 + 1.0)) < 1e-6,
           f"threshold change did not reach the display node of {layer}")
    ctl.set_threshold(*default)
    ctl.set_opacity(1.0)

    _check(case.regions_table.GetNumberOfRows() == len(case.regions),
           f"region table has {case.regions_table.GetNumberOfRows()} rows for {len(case.regions)} regions")

    ctl.next_region()
    region = case.regions[ctl.current_region_index]
    for sn in ctl.slice_nodes:
        d = distance_to_plane_mm(sn, region.jump_ras)
        _check(abs(d) < 1e-3, f"{sn.GetName()} is {d:.3f} mm from region R{region.rank}'s jump point after next_region")

    # through Slicer's own slice view (slice logic + displayable managers, offscreen), with the
    # case segmentation and margins displayed as the module displays them while an overlay is
    # shown: the overlay's own colour at a shown voxel of the region (no fill drawn over it)
    lo, hi = ctl.threshold
    values = volume_array(case.maps[layer])
    zyx = flagged_voxel(values, region, lo, hi)
    _check(zyx is not None, f"region R{region.rank} has no voxel inside the shown threshold range")
    ras = tuple(case.geometry.zyx_to_ras(zyx))
    fov = 24.0 * float(min(case.geometry.spacing))      # about 10 pixels per voxel: a voxel, not its edge
    segs = case_segmentations(case)
    with SliceViews(scene) as views:
        if views.window is None:
            log(f"WARNING: {views.gl.reason}; segmentations cannot be drawn, the overlay is checked without them")
        shown = views.render(ras, "Axial", ct_node, case.maps[layer], 1.0, (240, 240), fov, segs)
        check = overlay_pixel_check(shown, ras, case.maps[layer], float(values[zyx]))
        _check(check.ok, f"the overlay is not visible inside region R{region.rank} with the segmentation shown: "
                         f"{check.message()}")
        background = views.render(ras, "Axial", ct_node, None, 1.0, (240, 240), fov, segs)
        top = float(values.max())
        ctl.set_threshold(top + 1.0, top + 2.0)
        hidden = views.render(ras, "Axial", ct_node, case.maps[layer], 1.0, (240, 240), fov, segs)
        _check(np.array_equal(hidden.rgb, background.rgb),
               "overlay still visible after the threshold hid every voxel")
    ctl.set_threshold(lo, hi)

    if not matplotlib_available():
        log(NO_MATPLOTLIB_MESSAGE)
    sheet_png = write_review_sheet(scene, case, workdir / "selftest_review.png", top_n=2, controller=ctl)
    sheet_html = write_review_sheet(scene, case, workdir / "selftest_review.html", top_n=1, controller=ctl)
    _check(sheet_png.stat().st_size > 1000 and sheet_html.stat().st_size > 1000, "review sheet not written")
    seconds = time.perf_counter() - t0
    log(f"CalibUncertainty self-test passed in {seconds:.1f} s ({len(case.maps)} maps, "
        f"{len(case.regions)} regions)")
    return {"case": case, "controller": ctl, "ct_node": ct_node, "seconds": seconds,
            "review_png": sheet_png, "review_html": sheet_html}
