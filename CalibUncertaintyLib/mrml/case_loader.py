"""Load a per-case output folder into a scene a short step at a time (Qt-free, scene-explicit).

``nodes.load_case_outputs`` is ``CaseLoader(...).run()``; the Slicer module instead calls
:meth:`CaseLoader.step` from a timer, so that loading a 40-organ 512 x 512 x 300 case never holds
the GUI thread for long (each step works for ``step_seconds``, made of units of a few tens of
milliseconds: 4 MiB of a file decoded, one z slab of a statistic, one segment added) and the panel
shows :attr:`CaseLoader.progress`. :meth:`CaseLoader.cancel` stops at once and removes whatever
was added.

Two phases, as before: everything is read and checked first (files listed and their grids
compared, seg, maps, margins, the input identity) without touching the scene; then nodes are
added, and any failure removes every node added so far. Volumes are decoded straight into the
voxel buffers of their (not yet added) nodes (``io.nifti_chunks``): no second copy of a map.
What the loaded case holds - nodes, names, thresholds, shown ranges, colour windows, segments,
margins, the case record - is what ``load_case_outputs`` always produced.

    loader = CaseLoader(scene, case_dir, ct_node)
    while not loader.done:
        fraction = loader.step()          # a QTimer slot in the module
        label.text = loader.progress[1]
    case = loader.result                   # CaseNodes
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from ..errors import GeometryMismatchError, InputError
from ..io.geometry import Geometry
from . import colors, display_range
from .case_folder import scan_case_folder, threshold_for_map

log = logging.getLogger(__name__)

#: seconds of work per step (the widget's timer calls ``step`` again right away)
STEP_SECONDS = 0.15
#: bytes decoded per unit of reading
READ_BYTES = 4 << 20
#: voxels per unit of a statistic or a hash
SLAB_VOXELS = 1 << 20
PROB_DISPLAY_THRESHOLD = 0.1


class CaseLoader:
    """See the module docstring. Arguments as ``nodes.load_case_outputs``; ``input_file``: without
    ``input_volume_node``, the CT file to load with the case (else the one summary.json names)."""

    def __init__(self, scene, case_dir, input_volume_node=None, name_prefix: str | None = None,
                 probabilities: str = "on_demand", allow_identity_mismatch: bool = False,
                 step_seconds: float = STEP_SECONDS, input_file=None):
        if probabilities not in ("on_demand", "all"):
            raise InputError(f"probabilities must be 'on_demand' or 'all', got {probabilities!r}")
        self.scene = scene
        self.case_dir = Path(case_dir)
        self.input_volume_node = input_volume_node
        self.input_file = Path(input_file) if input_file is not None else None  # the CT file, when no node
        self.name_prefix = name_prefix
        self.probabilities = probabilities
        self.allow_identity_mismatch = allow_identity_mismatch
        self.step_seconds = float(step_seconds)
        self.done = False
        self.cancelled = False
        self.result = None
        self.progress: tuple[float, str] = (0.0, "starting")
        self.steps = 0
        self._weight_done = 0.0
        self._weight_total = 1.0
        self._before: set | None = None
        self._folder_item = 0
        self._open = []
        self._work = self._units()

    # ------------------------------------------------------------------ driving
    def step(self, seconds: float | None = None) -> float:
        """Work for about ``seconds`` (default ``step_seconds``); returns the fraction done.
        Raises what loading raises (the scene is then as it was before)."""
        if self.done:
            return 1.0
        deadline = time.perf_counter() + (self.step_seconds if seconds is None else seconds)
        self.steps += 1
        try:
            while True:
                next(self._work)
                if time.perf_counter() >= deadline:
                    break
        except StopIteration as stop:
            self.result = stop.value
            self.done = True
            self.progress = (1.0, "loaded")
        except BaseException:
            self._abort()
            raise
        return self.progress[0]

    def run(self):
        """Load to the end in one call (scripts, tests); -> CaseNodes."""
        while not self.done:
            self.step(math.inf)
        return self.result

    def cancel(self) -> None:
        """Stop now and remove every node this loader added (nothing is half-loaded)."""
        if self.done:
            return
        self._abort()
        self.cancelled = True

    # ------------------------------------------------------------------ internals
    def _abort(self) -> None:
        self._work.close()
        for reader in self._open:
            reader.close()
        self._open.clear()
        if self._before is not None:
            from .nodes import _remove_sh_item, _rollback

            if self._folder_item:
                _remove_sh_item(self.scene, self._folder_item)
            _rollback(self.scene, self._before)
        self.done = True

    def _advance(self, weight: float, text: str | None = None) -> None:
        self._weight_done += weight
        frac = min(self._weight_done / self._weight_total, 0.99)
        self.progress = (frac, text if text is not None else self.progress[1])

    def _read_into(self, path: Path, out: np.ndarray, what: str, geometry: Geometry | None):
        """Decode ``path`` into ``out`` a unit at a time; checks its grid against ``geometry``."""
        from ..io.nifti_chunks import ChunkedNiftiReader

        reader = ChunkedNiftiReader(path, out=out)
        if geometry is not None:
            reader.geometry.require_same(geometry, path.name, "seg.nii.gz")
        self._open.append(reader)
        size = max(out.nbytes, 1)
        while not reader.done:
            before = reader.fraction
            reader.read(READ_BYTES)
            self._advance((reader.fraction - before) * size, f"reading {what}")
            yield
        self._open.remove(reader)
        return reader.geometry

    def _slabs(self, array: np.ndarray, weight_per_voxel: float, text: str):
        for s in display_range.slabs(array, SLAB_VOXELS):
            yield s
            self._advance(s.size * weight_per_voxel, text)

    def _units(self):
        from ..io.images import read_header_geometry
        from .nodes import _check_input_geometry, _input_from_summary

        self.progress = (0.0, "reading the case folder")
        # modules imported on first use get a unit each (a few tenths of a second cold; vtk is
        # already loaded in Slicer)
        import vtk  # noqa: F401
        yield
        from scipy import ndimage  # noqa: F401
        yield
        files = scan_case_folder(self.case_dir)
        seg_geo = read_header_geometry(files.seg_path, verify=False)
        if self.input_volume_node is not None:
            _check_input_geometry(self.input_volume_node, seg_geo)
        yield
        n_vox = int(np.prod(seg_geo.shape_zyx))
        margin_list = _margin_files(files)
        input_path = None
        if self.input_volume_node is None:
            input_path = self.input_file if self.input_file is not None else _input_from_summary_files(files)
        prob_paths = sorted(files.prob_files.values())
        # the weights: bytes to decode, voxels to scan, nodes to add (a rough common unit)
        self._weight_total = float(n_vox * (1 + 4 * len(files.map_files) * 3 + len(margin_list) * 2
                                            + (4 if input_path else 0)
                                            + (4 * len(prob_paths) if self.probabilities == "all" else 0))
                                   + n_vox * 0.5 + 1)
        for path in [*files.map_files.values(), *prob_paths, *(p for _o, _c, p in margin_list)]:
            read_header_geometry(path, verify=False).require_same(seg_geo, path.name, "seg.nii.gz")
            yield

        # ---- the segmentation and its organs' boxes
        from ..io.nifti_chunks import ChunkedNiftiReader

        probe = ChunkedNiftiReader(files.seg_path)
        seg_dtype = probe.array.dtype if not probe.chunked else probe.header["dtype"].newbyteorder("=")
        probe.close()
        seg = np.empty(seg_geo.shape_zyx, dtype=seg_dtype) if probe.chunked else probe.array
        if probe.chunked:
            yield from self._read_into(files.seg_path, seg, "the segmentation", None)
        from .segments import LabelBoxes

        boxes = LabelBoxes()
        z0 = 0
        for s in self._slabs(seg, 0.5, "finding the organs"):
            boxes.add(z0, s)
            z0 += s.shape[0]
            yield
        class_names = files.class_names
        if class_names is None:
            class_names = {lab: f"Class_{lab}" for lab in boxes.labels()}
        probability_files = files.probability_files(class_names)
        from .nodes import file_stamp

        stamps = {cls: list(file_stamp(p)) for cls, p in probability_files.items()}
        regions = files.regions(class_names)
        geometry = seg_geo

        # ---- the input CT: identity of the node given, or the file summary.json names
        input_node, owns_input = self.input_volume_node, False
        if input_node is None and input_path is not None:
            input_node = _new_volume(geometry, f"{self.name_prefix or files.case_id} CT",
                                     _file_dtype(input_path))
            geo = yield from self._read_into(input_path, _voxels(input_node), "the input CT", None)
            geo.require_same(geometry, str(input_path), "the case outputs")
            owns_input = True
        if input_node is not None or input_path is not None:
            yield from self._check_identity(files, input_node, geometry)

        # ---- maps: decoded into their nodes' voxels, then their display statistics
        thresholds, shown, ranges, maps = {}, {}, {}, {}
        prefix = self.name_prefix or files.case_id
        for name, path in files.map_files.items():
            node = _new_volume(geometry, f"{prefix} {name}", np.float32)
            arr = _voxels(node)
            yield from self._read_into(path, arr, f"map {name}", geometry)
            _touch(node)
            yield from self._map_display(files, name, arr, thresholds, shown, ranges)
            maps[name] = node
        classes = list(probability_files)
        for cls in classes:
            thresholds[f"prob_{cls}"] = (PROB_DISPLAY_THRESHOLD, "display default")
            shown[f"prob_{cls}"] = (PROB_DISPLAY_THRESHOLD, 1.0)
            ranges[f"prob_{cls}"] = (0.0, 1.0)
        prob_nodes = {}
        if self.probabilities == "all":
            for cls, path in probability_files.items():
                node = _new_volume(geometry, f"{prefix} P({cls})", np.float32)
                yield from self._read_into(path, _voxels(node), f"probability of {cls}", geometry)
                _touch(node)
                prob_nodes[cls] = node

        # ---- margins: each organ's file, cropped to its outer contour
        margins = []
        if margin_list:
            from .margins import trivial_outer_organs

            trivial = trivial_outer_organs(files.summary)  # a whole-image outer contour is not drawn
            levels = np.empty(geometry.shape_zyx, np.uint8)
            for organ, c, path in margin_list:
                yield from self._read_into(path, levels, f"margins of {organ}", geometry)
                lowest = 2 if organ in trivial else 1
                mboxes = LabelBoxes()
                z0 = 0
                for s in self._slabs(levels, 0.5, f"margins of {organ}"):
                    mboxes.add(z0, (s >= lowest).view(np.uint8))
                    z0 += s.shape[0]
                    yield
                box = mboxes.box(1)
                crop = levels[box].copy() if box is not None else None
                margins.append((organ, c, box, crop, lowest))
            del levels

        # ---- the scene
        self._before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        case = yield from self._add_to_scene(files, geometry, seg, boxes, class_names, input_node, owns_input,
                                             maps, prob_nodes, probability_files, regions, margins,
                                             thresholds, shown, ranges, prefix, stamps)
        return case

    def _check_identity(self, files, node, geometry):
        from ..io.identity import SUMMARY_KEY, VoxelsHasher, check_identity
        from .identity_check import OVERRIDE_HINT
        from .volumes import geometry_from_volume_node

        recorded = files.summary.get(SUMMARY_KEY) if isinstance(files.summary, dict) else None
        if not isinstance(recorded, dict):
            log.warning("%s: summary.json records no input image identity; cannot check that the outputs belong "
                        "to this CT", files.case_dir)
            return
        voxels = _voxels(node)
        hasher = VoxelsHasher(voxels.shape)
        for s in self._slabs(voxels, 0.5, "checking the CT's identity"):
            hasher.update_slices(s)
            yield
        node_geo = geometry_from_volume_node(node) if node.GetImageData() is not None else geometry
        actual = {"geometry": node_geo.to_dict(), "voxels_sha256": hasher.hexdigest()}
        what = (f"case folder {files.case_dir} on volume {node.GetName()!r}" if node is self.input_volume_node
                else f"case folder {files.case_dir}")
        msg = check_identity(recorded, actual, what, self.allow_identity_mismatch, OVERRIDE_HINT)
        if msg:
            log.warning("%s (loaded anyway: allow_identity_mismatch)", msg)

    def _map_display(self, files, name, arr, thresholds, shown, ranges):
        text = f"display range of {name}"
        found = threshold_for_map(name, files.regions_doc, files.summary)
        lo, hi = yield from self._stat(display_range.min_max(arr, SLAB_VOXELS), arr, text)
        if found is not None:
            tau, src, below = found
        else:
            tau = yield from self._stat(display_range.fallback_threshold_work(arr, SLAB_VOXELS), arr, text)
            src, below = "fallback q95", False
        thresholds[name] = (tau, src)
        shown[name] = (min(lo, tau), tau) if below else (tau, max(hi, tau))
        ranges[name] = yield from self._stat(display_range.colour_window_work(arr, float(tau), SLAB_VOXELS), arr, text)

    def _stat(self, work, arr, text):
        per_slab = min(SLAB_VOXELS, arr.size) * 0.25
        while True:
            try:
                next(work)
            except StopIteration as stop:
                return stop.value
            self._advance(per_slab, text)
            yield

    def _add_to_scene(self, files, geometry, seg, boxes, class_names, input_node, owns_input, maps, prob_nodes,
                      probability_files, regions, margins, thresholds, shown, ranges, prefix, stamps):
        import slicer

        from .case_record import record_case
        from .margins import add_organ_margins, new_margins_node
        from .organ_table import add_organ_table
        from .nodes import (ROLE_ATTRIBUTE, CaseNodes, _markups_node, _place_in_hierarchy, _table_node)
        from .segments import add_mask_segment, set_reference_geometry
        from .overlay_display import overlay_window
        from .volumes import display_ct, display_overlay

        scene = self.scene
        colors.ensure_default_colour_nodes(scene)
        colors.ensure_colour_tables(scene)
        if owns_input:
            scene.AddNode(input_node)
            ct_min = math.inf
            for s in self._slabs(_voxels(input_node), 0.1, "adding the CT"):
                ct_min = min(ct_min, float(s.min()))
                yield
            display_ct(scene, input_node, np.array([ct_min]))
        # the segmentation: one segment per organ, from the box it occupies
        seg_node = slicer.vtkMRMLSegmentationNode()
        seg_node.SetName(f"{prefix} segmentation")
        scene.AddNode(seg_node)
        seg_node.CreateDefaultDisplayNodes()
        set_reference_geometry(seg_node, geometry, input_node)
        segmentation = seg_node.GetSegmentation()
        for label in boxes.labels():
            box = boxes.box(label)
            name = class_names.get(label, f"Class_{label}")
            add_mask_segment(segmentation, name, seg[box] == label, box, geometry,
                             colour=colors.class_colour(label, name, scene))
            self._advance(1, "adding the organs")
            yield
        for name, node in maps.items():
            node.SetAttribute(ROLE_ATTRIBUTE, f"map_{name}")
            scene.AddNode(node)
            display_overlay(scene, node, colors.UNCERTAINTY, overlay_window(*shown[name], ranges[name][1]), *shown[name])
            self._advance(1, "adding the maps")
            yield
        for cls, node in prob_nodes.items():
            node.SetAttribute(ROLE_ATTRIBUTE, f"prob_{cls}")
            scene.AddNode(node)
            display_overlay(scene, node, colors.PROBABILITY, overlay_window(*shown[f"prob_{cls}"], 1.0),
                            *shown[f"prob_{cls}"])
            yield
        markups = _markups_node(scene, regions, f"{prefix} regions")
        table = _table_node(scene, regions, f"{prefix} region table")
        yield
        margins_node = None
        if margins:
            margins_node = new_margins_node(scene, f"{prefix} margins", geometry, input_node)
            for organ, c, box, crop, lowest in margins:
                masks = {} if crop is None else {part: crop >= level for part, level in
                                                 (("inner", 3), ("prediction", 2), ("outer", 1)) if level >= lowest}
                add_organ_margins(margins_node, organ, c, box, masks, geometry)
                self._advance(1, "adding the organ margins")
                yield
        case = CaseNodes(case_id=files.case_id, case_dir=files.case_dir, geometry=geometry, input_volume=input_node,
                         segmentation=seg_node, probabilities=prob_nodes, maps=maps, regions_markups=markups,
                         regions_table=table, regions=regions, default_thresholds=thresholds, default_shown=shown,
                         value_ranges=ranges, regions_doc=files.regions_doc, summary=files.summary,
                         owns_input=owns_input, probability_files=dict(probability_files), name_prefix=prefix,
                         margins=margins_node, probability_stamps=stamps,
                         organ_table=add_organ_table(scene, files.summary, f"{prefix} organ quality"))
        # outputs follow the input volume's parent transform, so they stay on its voxels
        transform_id = input_node.GetTransformNodeID() if input_node is not None else None
        if transform_id:
            for node in case.output_nodes():
                if node is not input_node and hasattr(node, "SetAndObserveTransformNodeID"):
                    node.SetAndObserveTransformNodeID(transform_id)
        self._folder_item = case.folder_item = _place_in_hierarchy(scene, case, f"{prefix} CalibUncertainty")
        record_case(case)  # what a saved scene needs to bring the review back
        log.info("loaded case %s from %s: %d maps, %d classes, %d regions in %d steps", case.case_id, case.case_dir,
                 len(case.maps), len(case.probability_files), len(case.regions), self.steps)
        return case


# ---------------------------------------------------------------------------------- helpers
def _margin_files(files) -> list:
    from .margins import margin_files

    return margin_files(files.case_dir, files.summary)


def _input_from_summary_files(files) -> Path | None:
    from .nodes import _input_from_summary

    return _input_from_summary(files)


def _file_dtype(path: Path):
    from ..io.nifti_chunks import ChunkedNiftiReader

    reader = ChunkedNiftiReader(path)
    reader.close()
    return reader.header["dtype"].newbyteorder("=") if reader.chunked else reader.array.dtype


_VTK_TYPES = {np.dtype(np.float32): "VTK_FLOAT", np.dtype(np.float64): "VTK_DOUBLE", np.dtype(np.uint8): "VTK_UNSIGNED_CHAR",
              np.dtype(np.int8): "VTK_SIGNED_CHAR", np.dtype(np.int16): "VTK_SHORT", np.dtype(np.uint16): "VTK_UNSIGNED_SHORT",
              np.dtype(np.int32): "VTK_INT", np.dtype(np.uint32): "VTK_UNSIGNED_INT", np.dtype(np.int64): "VTK_LONG_LONG",
              np.dtype(np.uint64): "VTK_UNSIGNED_LONG_LONG"}


def _new_volume(geometry: Geometry, name: str, dtype, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node (not in a scene) on ``geometry`` with an allocated, unfilled voxel buffer."""
    import slicer
    import vtk

    from .volumes import _vtk_matrix

    node = getattr(slicer, class_name)()
    node.SetName(name)
    image = vtk.vtkImageData()
    z, y, x = geometry.shape_zyx
    image.SetDimensions(x, y, z)
    image.AllocateScalars(getattr(vtk, _VTK_TYPES[np.dtype(dtype)]), 1)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_vtk_matrix(geometry.ijk_to_ras_matrix()))
    return node


def _voxels(node) -> np.ndarray:
    import slicer

    return slicer.util.arrayFromVolume(node)


def _touch(node) -> None:
    import slicer

    slicer.util.arrayFromVolumeModified(node)


__all__ = ["CaseLoader", "STEP_SECONDS"]
