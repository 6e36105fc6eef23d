"""Load a per-case output folder into an MRML scene as Slicer nodes.

Everything takes the scene as an argument (no ``slicer.mrmlScene``), so it runs in real Slicer
and in the slicer-core wheel alike. Volumes keep the NIfTI geometry exactly (volumes.py: voxel
(i, j, k) of every output lies at the RAS point of the input's voxel (i, j, k)); the volume
helpers (``load_volume_file``, ``export_volume_node``, ...) are re-exported here.

Display (see colors.py for the tables):

- ``prob_<Class>``: "CalibU Probability", window 0.1-1, shown only where p ≥ PROB_DISPLAY_THRESHOLD
  (0.1: the soft margin where the class still gets ≥ 10 %); below it transparent. By default a
  class's probability volume becomes a node only when it is first shown
  (:meth:`CaseNodes.layer_node`): a 40-class case adds its maps, one segmentation and no
  probability volume until one is asked for.
- ``map_<name>``: "CalibU Uncertainty", window from the shown range's lower end to the robust max
  (:func:`colour_window`, overlay_display.overlay_window: the colours span what is shown), shown only
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
from . import colors
from .overlay_display import overlay_window
from .case_folder import CaseData, Region, threshold_for_map
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
    probability_stamps: dict = field(default_factory=dict)  # class name -> [size, mtime_ns] of its file at load
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
# (display_range.py computes them a slab at a time; re-exported here)
from .display_range import colour_window, fallback_threshold, robust_max  # noqa: E402,F401


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
    """The input image recorded in summary.json (``input_image``, the first of
    ``prediction.input_files`` as ``predict`` writes it, or ``input_identity.file``), when that
    file still exists."""
    pred = data.summary.get("prediction")
    files = pred.get("input_files") if isinstance(pred, dict) else None
    ident = data.summary.get("input_identity")
    candidates = [data.summary.get("input_image")] + (list(files[:1]) if isinstance(files, list) else []) + \
        [ident.get("file") if isinstance(ident, dict) else None]
    for v in candidates:
        if isinstance(v, str) and Path(v).is_file():
            return Path(v)
    return None


def _markups_node(scene, regions: list[Region], name: str):
    import slicer

    node = slicer.vtkMRMLMarkupsFiducialNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    fill_region_markups(node, regions)
    return node


def fill_region_markups(node, regions: list[Region], current: int | None = None) -> None:
    """The regions' markups: one locked control point per region at its jump point (its most
    uncertain part, inside it), labelled like "R1 Mandible 1234 mm³", the class, volumes, mean and
    max U in its description. Labels never collide in a view: only the current region's point
    and label are shown (:func:`show_current_region`), and the list's own name label is off."""
    import vtk

    was = node.StartModify()
    node.SetLocked(False)
    node.RemoveAllControlPoints()
    for r in regions:
        idx = node.AddControlPoint(vtk.vtkVector3d(*r.jump_ras), r.label)
        node.SetNthControlPointLocked(idx, True)
        node.SetNthControlPointDescription(idx, f"mean U {r.mean_u:.3g}, max U {r.max_u:.3g}")
    disp = node.GetDisplayNode()
    if disp is not None:
        disp.SetPropertiesLabelVisibility(False)
        disp.SetPointLabelsVisibility(True)
    show_current_region(node, current)
    node.SetLocked(True)
    node.EndModify(was)


def show_current_region(node, current: int | None) -> None:
    """Show (and select) only control point ``current`` of the regions' markups; None hides all.
    The others stay in the list, reachable by Next / Previous and the region table."""
    was = node.StartModify()
    for k in range(node.GetNumberOfControlPoints()):
        node.SetNthControlPointVisibility(k, k == current)
        node.SetNthControlPointSelected(k, k == current)
    node.EndModify(was)


def visible_labels(node) -> list[tuple[str, tuple]]:
    """(text, RAS) of every label the views can draw for a markups node: its visible control
    points' labels when point labels are on, and its name label when that is on."""
    disp = node.GetDisplayNode()
    if disp is not None and not disp.GetVisibility():
        return []
    out = []
    if disp is None or disp.GetPointLabelsVisibility():
        for k in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointVisibility(k) and node.GetNthControlPointLabel(k):
                out.append((node.GetNthControlPointLabel(k), tuple(node.GetNthControlPointPosition(k))))
    if (disp is None or disp.GetPropertiesLabelVisibility()) and node.GetNumberOfControlPoints():
        out.append((node.GetName(), tuple(node.GetNthControlPointPosition(0))))
    return out


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
    for row, r in enumerate(regions):  # R, A, S: the point the views jump to
        values = [r.rank, r.class_name, r.volume_mm3, r.mean_u, r.max_u, *r.jump_ras]
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

    Creates a segmentation (one segment per organ, named from class_names, with the input's
    reference geometry), the organ margins segmentation when the folder has one
    (``margins``: inner / prediction / outer per organ), the class probability volumes
    (``probabilities="on_demand"``, the default: none now, each when first shown through
    :meth:`CaseNodes.layer_node`; ``"all"``: one per class now), one volume per map, a locked markups point list of the regions' jump points (labels like
    "R1 Brainstem 123 mm³", only the current region's shown: :func:`fill_region_markups`), a table of regions (rank, class, volume mm³, mean and max
    uncertainty, jump point R/A/S mm), all in a subject-hierarchy folder under the input volume's
    item. ``input_volume_node`` is the CT the outputs were computed from (its grid is checked);
    without it, the input named in summary.json (``input_image``) is loaded when that file exists.

    The folder is read completely before the scene is touched; if adding nodes fails half way,
    every node added is removed again. Raises InputError (missing files, listed) and
    GeometryMismatchError; IdentityMismatchError when summary.json's ``input_identity`` is another
    image than the CT (unless ``allow_identity_mismatch``: then a warning). The work is
    ``case_loader.CaseLoader``'s, run to the end (the Slicer module runs it a step at a time).
    """
    from .case_loader import CaseLoader

    return CaseLoader(scene, case_dir, input_volume_node, name_prefix=name_prefix, probabilities=probabilities,
                      allow_identity_mismatch=allow_identity_mismatch).run()


def _add_probability_node(scene, array, geometry: Geometry, prefix: str, cls: str, shown):
    node = new_volume_node(array, geometry, f"{prefix} P({cls})")
    node.SetAttribute(ROLE_ATTRIBUTE, f"prob_{cls}")
    scene.AddNode(node)
    display_overlay(scene, node, colors.PROBABILITY, overlay_window(*shown, 1.0), *shown)
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
    stamp = case.probability_stamps.get(cls)
    if stamp is not None and list(file_stamp(path)) != list(stamp):
        raise InputError(f"the probability file {path} of case {case.case_id} was replaced after the case was loaded "
                         "(another run or command wrote into the same folder); it would show another run's "
                         "probabilities under this case's name: load that case folder again to review it")
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


def file_stamp(path) -> tuple[int, int]:
    """(size, modification time in ns) of a file: what tells a file from its replacement."""
    st = Path(path).stat()
    return int(st.st_size), int(st.st_mtime_ns)


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
