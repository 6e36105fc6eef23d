"""Load a per-case output folder into an MRML scene as Slicer nodes.

Everything takes the scene as an argument (no ``slicer.mrmlScene``), so it runs in real Slicer
and in the slicer-core wheel alike. Volumes keep the NIfTI geometry exactly (volumes.py: voxel
(i, j, k) of every output lies at the RAS point of the input's voxel (i, j, k)); the volume
helpers (``load_volume_file``, ``export_volume_node``, ...) are re-exported here.

Display (see colors.py for the tables):

- ``prob_<Class>``: "CalibU Probability", window 0-1, shown only where p ≥ PROB_DISPLAY_THRESHOLD
  (0.1: the soft margin where the class still gets ≥ 10 %); below it transparent. By default a
  class's probability volume becomes a node only when it is first shown
  (:meth:`CaseNodes.layer_node`): a 40-class case adds its maps, one segmentation and no
  probability volume until one is asked for.
- ``map_<name>``: "CalibU Uncertainty", window 0 to the robust max (:func:`robust_max`), shown only
  at or above the map's default threshold (at or below it for maps flagged where low, i.e.
  confidence): τ* from the case folder (regions.json / summary.json,
  METHODS.md section 4) or, when the folder gives none, the 0.95 quantile of the map's
  non-negligible voxels (:func:`fallback_threshold`, labelled "fallback q95").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GeometryMismatchError, InputError
from ..io.geometry import Geometry
from ..io.images import read_image
from .identity_check import check_case_on_volume
from .margins import add_margins_node
from .organ_table import add_organ_table
from . import colors
from .case_folder import CaseData, Region, read_case_folder, threshold_for_map
from .volumes import (display_ct, display_overlay, export_volume_node,  # noqa: F401 (re-exported)
                      geometry_from_volume_node, ijk_to_ras_of, load_volume_file, new_volume_node,
                      remove_nodes, segment_array, volume_array)

log = logging.getLogger(__name__)

PROB_DISPLAY_THRESHOLD = 0.1
FALLBACK_QUANTILE = 0.95
ROBUST_MAX_QUANTILE = 0.995
ROLE_ATTRIBUTE = "CalibU.Role"


@dataclass
class CaseNodes:
    """The nodes one case's outputs became. ``owns_input`` says whether the input volume was
    loaded by :func:`load_case_outputs` (and so is removed with the outputs)."""

    case_id: str
    case_dir: Path
    geometry: Geometry
    input_volume: object | None
    segmentation: object
    probabilities: dict                          # class name -> vtkMRMLScalarVolumeNode
    maps: dict                                   # map name -> vtkMRMLScalarVolumeNode
    regions_markups: object                      # vtkMRMLMarkupsFiducialNode
    regions_table: object                        # vtkMRMLTableNode
    regions: list[Region]
    default_thresholds: dict                     # layer name -> (threshold, source)
    default_shown: dict                          # layer name -> (lo, hi) shown by default
    value_ranges: dict                           # layer name -> colour window (0, robust max)
    regions_doc: dict = field(default_factory=dict, repr=False)
    summary: dict = field(default_factory=dict, repr=False)
    folder_item: int = 0                         # subject-hierarchy folder item id (0 = none)
    owns_input: bool = False
    probability_files: dict = field(default_factory=dict)  # class name -> prob file (loaded on demand)
    name_prefix: str = ""
    margins: object = None                       # vtkMRMLSegmentationNode of the organ margins, or None
    organ_table: object = None                   # vtkMRMLTableNode of the per-organ quality (mrml.organ_table), or None

    def layers(self) -> dict:
        """Overlay layers that are nodes now, by name: map names first, then ``prob_<Class>``."""
        out = dict(self.maps)
        out.update({f"prob_{c}": n for c, n in self.probabilities.items()})
        return out

    def layer_names(self) -> list:
        """Every selectable overlay: the maps, then ``prob_<Class>`` for every class, whether its
        volume is loaded yet or not."""
        classes = list(self.probabilities) + [c for c in self.probability_files if c not in self.probabilities]
        return list(self.maps) + [f"prob_{c}" for c in classes]

    def layer_node(self, scene, name: str):
        """The volume node of overlay ``name``; a class probability is read from its file and
        added to ``scene`` the first time it is asked for (or again if the user deleted it).

        Raises InputError for an unknown name, for a map node the user deleted, and for a
        probability whose node is gone and whose file is not on disk."""
        if name in self.maps:
            node = self.maps[name]
            if node.GetScene() is not scene:
                raise InputError(f"the {name} map of case {self.case_id} was deleted from the scene; "
                                 "load the case again to review it")
            return node
        cls = name[len("prob_"):] if name.startswith("prob_") else None
        if cls is None or (cls not in self.probabilities and cls not in self.probability_files):
            raise InputError(f"no overlay named {name!r}; available: {', '.join(self.layer_names())}")
        node = self.probabilities.get(cls)
        if node is not None and node.GetScene() is scene:
            return node
        return _load_probability_node(scene, self, cls)

    def output_nodes(self) -> list:
        nodes = [self.segmentation, *self.probabilities.values(), *self.maps.values(),
                 self.regions_markups, self.regions_table, self.margins, self.organ_table]
        if self.owns_input and self.input_volume is not None:
            nodes.append(self.input_volume)
        return [n for n in nodes if n is not None]

    def remove_from_scene(self, scene) -> None:
        """Remove every node this case added (with display/storage nodes and its SH folder)."""
        remove_nodes(scene, self.output_nodes())
        _remove_sh_item(scene, self.folder_item)
        self.folder_item = 0


# --- display ---------------------------------------------------------------------------------
def robust_max(array: np.ndarray, quantile: float = ROBUST_MAX_QUANTILE) -> float:
    """Upper end of a map's colour window: the ``quantile`` (0.995) of its positive voxels, so a
    few outliers do not wash the colours out; the plain max if that is 0; 1.0 for an all-zero map."""
    a = np.asarray(array)
    pos = a[a > 0]
    if pos.size == 0:
        return 1.0
    hi = float(np.quantile(pos, quantile))
    return hi if hi > 0 else float(pos.max())


def colour_window(array: np.ndarray, tau: float) -> tuple[float, float]:
    """Colour window (0, hi) of a map shown above ``tau``: hi is the robust max of the voxels at or
    above τ (the ones the reviewer sees), so they spread over the colour table instead of all
    saturating when most of the map lies below τ; the whole map's robust max if none reach τ."""
    a = np.asarray(array)
    shown = a[a >= tau] if np.isfinite(tau) else a
    hi = robust_max(shown) if shown.size else robust_max(a)
    return (0.0, max(hi, float(tau)) if np.isfinite(tau) else hi)


def fallback_threshold(array: np.ndarray, quantile: float = FALLBACK_QUANTILE) -> float:
    """Threshold for a map the case folder gives no τ* for: the 0.95 quantile of the map over its
    non-negligible voxels (value > 1 % of the map's maximum), so that the near-zero values a
    softmax leaves everywhere do not drag it down; 0 for an all-zero map."""
    a = np.asarray(array)
    top = float(a.max()) if a.size else 0.0
    if top <= 0:
        return 0.0
    return float(np.quantile(a[a > 0.01 * top], quantile))


def _sh_node(scene):
    import slicer

    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def _remove_sh_item(scene, item: int) -> None:
    if not item:
        return
    sh = _sh_node(scene)
    if sh is not None and sh.GetItemName(item):
        sh.RemoveItem(item, False, True)


def _sh_item(sh, node, parent: int) -> int:
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)
    return item


def _check_input_geometry(input_volume_node, geometry: Geometry) -> None:
    geo = geometry_from_volume_node(input_volume_node)
    diff = geo.mismatch(geometry)
    if diff is not None:
        raise GeometryMismatchError(
            f"the case outputs are not on the voxel grid of input volume {input_volume_node.GetName()!r}: "
            f"{diff}. Load the outputs with the volume they were computed from.")


def _input_from_summary(data: CaseData) -> Path | None:
    """The input image recorded in summary.json (``input_image``, or the first of
    ``prediction.input_files`` as ``predict`` writes it), when that file still exists."""
    pred = data.summary.get("prediction")
    files = pred.get("input_files") if isinstance(pred, dict) else None
    candidates = [data.summary.get("input_image")] + (list(files[:1]) if isinstance(files, list) else [])
    for v in candidates:
        if isinstance(v, str) and Path(v).is_file():
            return Path(v)
    return None


def _segmentation_node(scene, data: CaseData, name: str):
    import slicer

    seg_node = slicer.vtkMRMLSegmentationNode()
    seg_node.SetName(name)
    scene.AddNode(seg_node)
    seg_node.CreateDefaultDisplayNodes()
    labelmap = new_volume_node(data.seg.astype(np.uint8 if data.seg.max() < 256 else np.int32),
                               data.geometry, f"{name} labelmap", "vtkMRMLLabelMapVolumeNode")
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg_node):
        raise InputError(f"could not turn {data.case_dir / 'seg.nii.gz'} into a segmentation")
    segmentation = seg_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        label = int(segment.GetLabelValue())
        segment.SetName(data.class_names.get(label, f"Class_{label}"))
        segment.SetColor(*colors.class_colour(label))
    return seg_node


def _markups_node(scene, regions: list[Region], name: str):
    import slicer
    import vtk

    node = slicer.vtkMRMLMarkupsFiducialNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    for r in regions:
        idx = node.AddControlPoint(vtk.vtkVector3d(*r.centroid_ras), r.label)
        node.SetNthControlPointLocked(idx, True)
        node.SetNthControlPointDescription(idx, f"mean U {r.mean_u:.3g}, max U {r.max_u:.3g}")
    node.SetLocked(True)
    return node


TABLE_COLUMNS = ("rank", "class", "volume mm³", "mean uncertainty", "max uncertainty", "R", "A", "S")


def _table_node(scene, regions: list[Region], name: str):
    import slicer
    import vtk

    node = slicer.vtkMRMLTableNode()
    node.SetName(name)
    scene.AddNode(node)
    table = node.GetTable()
    cols = [vtk.vtkIntArray(), vtk.vtkStringArray()] + [vtk.vtkDoubleArray() for _ in TABLE_COLUMNS[2:]]
    for col, title in zip(cols, TABLE_COLUMNS):
        col.SetName(title)
        table.AddColumn(col)
    table.SetNumberOfRows(len(regions))
    for row, r in enumerate(regions):
        values = [r.rank, r.class_name, r.volume_mm3, r.mean_u, r.max_u, *r.centroid_ras]
        for c, v in enumerate(values):
            table.SetValue(row, c, vtk.vtkVariant(v))
    node.SetColumnUnitLabel("volume mm³", "mm³")
    for axis in "RAS":
        node.SetColumnUnitLabel(axis, "mm")
    node.SetLocked(True)
    node.Modified()
    return node


def default_thresholds(data: CaseData) -> tuple[dict, dict]:
    """Per layer: (threshold, source) and the shown range (lo, hi).

    Maps: τ* from the case folder (case_folder.threshold_for_map), else
    :func:`fallback_threshold` ("fallback q95"); shown range [τ, max] or, for maps flagged where
    they are low (confidence), [min, τ]. Probabilities: [PROB_DISPLAY_THRESHOLD, 1].
    """
    thresholds, shown = {}, {}
    for name, arr in data.maps.items():
        found = threshold_for_map(name, data.regions_doc, data.summary)
        tau, src, below = found if found is not None else (fallback_threshold(arr), "fallback q95", False)
        thresholds[name] = (tau, src)
        lo, hi = float(arr.min()), float(arr.max())
        shown[name] = (min(lo, tau), tau) if below else (tau, max(hi, tau))
    for cls in list(data.probabilities) + [c for c in data.probability_files if c not in data.probabilities]:
        thresholds[f"prob_{cls}"] = (PROB_DISPLAY_THRESHOLD, "display default")
        shown[f"prob_{cls}"] = (PROB_DISPLAY_THRESHOLD, 1.0)
    return thresholds, shown


def load_case_outputs(scene, case_dir, input_volume_node=None, name_prefix: str | None = None,
                      probabilities: str = "on_demand", allow_identity_mismatch: bool = False) -> CaseNodes:
    """Load one per-case output folder as nodes of ``scene`` and return them as CaseNodes.

    Creates a segmentation (segments named from class_names), the organ margins segmentation
    when the folder has one (``margins.add_margins_node``: inner / prediction / outer per organ), the class probability volumes
    (``probabilities="on_demand"``, the default: none now, each when first shown through
    :meth:`CaseNodes.layer_node`; ``"all"``: one per class now), one volume per map, a locked markups point list of region centroids (labels like
    "R1 Brainstem 123 mm³"), a table of regions (rank, class, volume mm³, mean and max
    uncertainty, centroid R/A/S mm), all in a subject-hierarchy folder under the input volume's
    item. ``input_volume_node`` is the CT the outputs were computed from (its grid is checked);
    without it, the input named in summary.json (``input_image``) is loaded when that file exists.

    The folder is read completely before the scene is touched; if adding nodes fails half way,
    every node added is removed again. Raises InputError (missing files, listed) and
    GeometryMismatchError; IdentityMismatchError when summary.json's ``input_identity`` is another
    image than the CT (unless ``allow_identity_mismatch``: then a warning).
    """
    if probabilities not in ("on_demand", "all"):
        raise InputError(f"probabilities must be 'on_demand' or 'all', got {probabilities!r}")
    data = read_case_folder(case_dir, probabilities=probabilities == "all")
    if input_volume_node is not None:
        _check_input_geometry(input_volume_node, data.geometry)
        check_case_on_volume(data.summary, data.case_dir, input_volume_node,
                             allow_identity_mismatch=allow_identity_mismatch)
    prefix = name_prefix or data.case_id
    thresholds, shown = default_thresholds(data)
    ranges = {n: colour_window(a, thresholds[n][0]) for n, a in data.maps.items()}
    ranges.update({f"prob_{c}": (0.0, 1.0) for c in [*data.probabilities, *data.probability_files]})
    input_array = None
    input_path = _input_from_summary(data) if input_volume_node is None else None
    if input_path is not None:
        input_array, input_geo = read_image(input_path)
        input_geo.require_same(data.geometry, str(input_path), "the case outputs")
        check_case_on_volume(data.summary, data.case_dir, array=input_array, geometry=input_geo,
                             allow_identity_mismatch=allow_identity_mismatch)

    before = _node_ids(scene)
    case = None
    try:
        scene.StartState(scene.BatchProcessState)
        try:
            case = _add_case_nodes(scene, data, input_volume_node, input_array, prefix, thresholds, shown, ranges)
        finally:
            scene.EndState(scene.BatchProcessState)
        # after the batch state, so that Slicer's own subject-hierarchy items exist to be moved
        case.folder_item = _place_in_hierarchy(scene, case, f"{prefix} CalibUncertainty")
        from .case_record import record_case

        record_case(case)  # what a saved scene needs to bring the review back
    except BaseException:
        if case is not None and case.folder_item:
            _remove_sh_item(scene, case.folder_item)
        _rollback(scene, before)
        raise
    log.info("loaded case %s from %s: %d maps, %d classes, %d regions", data.case_id, data.case_dir,
             len(case.maps), len(case.probabilities), len(case.regions))
    return case


def _add_case_nodes(scene, data: CaseData, input_volume_node, input_array, prefix: str,
                    thresholds: dict, shown: dict, ranges: dict) -> CaseNodes:
    colors.ensure_default_colour_nodes(scene)
    colors.ensure_colour_tables(scene)
    owns_input = False
    if input_array is not None:
        input_volume_node = new_volume_node(input_array, data.geometry, f"{prefix} CT")
        scene.AddNode(input_volume_node)
        display_ct(scene, input_volume_node, input_array)
        owns_input = True
    seg_node = _segmentation_node(scene, data, f"{prefix} segmentation")
    probs = {}
    for cls, arr in data.probabilities.items():
        probs[cls] = _add_probability_node(scene, arr, data.geometry, prefix, cls, shown[f"prob_{cls}"])
    maps = {}
    for name, arr in data.maps.items():
        node = new_volume_node(arr, data.geometry, f"{prefix} {name}")
        node.SetAttribute(ROLE_ATTRIBUTE, f"map_{name}")
        scene.AddNode(node)
        display_overlay(scene, node, colors.UNCERTAINTY, ranges[name], *shown[name])
        maps[name] = node
    case = CaseNodes(case_id=data.case_id, case_dir=data.case_dir, geometry=data.geometry,
                     input_volume=input_volume_node, segmentation=seg_node, probabilities=probs, maps=maps,
                     regions_markups=_markups_node(scene, data.regions, f"{prefix} regions"),
                     regions_table=_table_node(scene, data.regions, f"{prefix} region table"),
                     regions=data.regions, default_thresholds=thresholds, default_shown=shown,
                     value_ranges=ranges,
                     regions_doc=data.regions_doc, summary=data.summary, owns_input=owns_input,
                     probability_files=dict(data.probability_files), name_prefix=prefix,
                     margins=add_margins_node(scene, data.case_dir, data.summary, data.geometry, f"{prefix} margins"),
                     organ_table=add_organ_table(scene, data.summary, f"{prefix} organ quality"))
    # outputs follow the input volume's parent transform, so they stay on its voxels
    transform_id = input_volume_node.GetTransformNodeID() if input_volume_node is not None else None
    if transform_id:
        for node in case.output_nodes():
            if node is not input_volume_node and hasattr(node, "SetAndObserveTransformNodeID"):
                node.SetAndObserveTransformNodeID(transform_id)
    return case


def _add_probability_node(scene, array, geometry: Geometry, prefix: str, cls: str, shown):
    node = new_volume_node(array, geometry, f"{prefix} P({cls})")
    node.SetAttribute(ROLE_ATTRIBUTE, f"prob_{cls}")
    scene.AddNode(node)
    display_overlay(scene, node, colors.PROBABILITY, (0.0, 1.0), *shown)
    return node


def _load_probability_node(scene, case: CaseNodes, cls: str):
    """Read class ``cls``'s probability file and add it as a node of the case (SH folder, input
    transform, scene record). Raises InputError when the file is not there any more."""
    from .case_folder import read_probability
    from .case_record import add_layer_reference

    path = case.probability_files.get(cls)
    if path is None or not Path(path).is_file():
        raise InputError(f"the probability volume of {cls!r} (case {case.case_id}) is not in the scene and its "
                         f"file {path or 'prob_<Class>.nii.gz'} is not on disk; load the case folder again")
    array = read_probability(path, case.geometry)
    colors.ensure_colour_tables(scene)
    node = _add_probability_node(scene, array, case.geometry, case.name_prefix or case.case_id, cls,
                                 case.default_shown[f"prob_{cls}"])
    transform_id = case.input_volume.GetTransformNodeID() if case.input_volume is not None \
        and case.input_volume.GetScene() is scene else None
    if transform_id:
        node.SetAndObserveTransformNodeID(transform_id)
    case.probabilities[cls] = node
    if case.folder_item:
        sh = _sh_node(scene)
        if sh is not None and sh.GetItemName(case.folder_item):
            _sh_item(sh, node, case.folder_item)
    add_layer_reference(case, node)
    log.info("loaded the probability volume of %s for case %s", cls, case.case_id)
    return node


def _place_in_hierarchy(scene, case: CaseNodes, folder_name: str) -> int:
    sh = _sh_node(scene)
    parent = sh.GetSceneItemID()
    if case.input_volume is not None:
        parent = sh.GetItemByDataNode(case.input_volume) or sh.CreateItem(parent, case.input_volume)
    folder = sh.CreateFolderItem(parent, folder_name)
    for node in case.output_nodes():
        if node is not case.input_volume:
            _sh_item(sh, node, folder)
    return folder


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _rollback(scene, before: set) -> None:
    """Remove every node added since ``before`` was taken (newest first)."""
    added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    for node in reversed([n for n in added if n.GetID() not in before]):
        if node.GetScene() is scene:
            scene.RemoveNode(node)
