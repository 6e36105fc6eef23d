"""What a saved scene needs to bring a review back: the case record and the review state.

A loaded case (nodes.load_case_outputs) is recorded on its segmentation node, the case's *hub*:

- attribute ``CalibU.Case``: JSON with the case id, its folder, the name prefix, regions.json and
  summary.json as read, the default thresholds, shown ranges and colour windows of every layer,
  the probability files not loaded yet with their size and modification time at loading (a file
  replaced since - another run into the same folder - is refused, not shown under this case's
  name), and the voxel grid;
- node references (kept by Slicer when a scene is saved, loaded or imported, even when node IDs
  change): ``CalibU.input`` (the CT), ``CalibU.layer`` (every map and probability node; each
  carries its name in ``CalibU.Role``), ``CalibU.regionsMarkups``, ``CalibU.regionsTable`` and ``CalibU.organTable`` (per-organ quality);
- attribute ``CalibU.Review``: JSON of the review (shown layer, opacity, threshold per layer,
  current region), rewritten by ReviewController on every change.

Node attributes and references are part of the MRML file, so ``.mrml`` and ``.mrb`` scenes carry
them. :func:`restore_case_nodes` rebuilds a :class:`~.nodes.CaseNodes` from them without the case
folder on disk; only probability volumes that were never shown need their file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..io.geometry import Geometry

CASE_ATTRIBUTE = "CalibU.Case"
REVIEW_ATTRIBUTE = "CalibU.Review"
INPUT_REF = "CalibU.input"
LAYER_REF = "CalibU.layer"
MARKUPS_REF = "CalibU.regionsMarkups"
TABLE_REF = "CalibU.regionsTable"
ORGAN_TABLE_REF = "CalibU.organTable"
RECORD_VERSION = 1


def _pairs(d: dict) -> dict:
    return {k: [float(x) if not isinstance(x, str) else x for x in v] for k, v in d.items()}


def record_case(case) -> None:
    """Write the case record and the node references on ``case.segmentation`` (the hub)."""
    hub = case.segmentation
    doc = {
        "version": RECORD_VERSION,
        "case_id": case.case_id,
        "case_dir": str(case.case_dir),
        "name_prefix": case.name_prefix,
        "geometry": case.geometry.to_dict(),
        "regions_doc": case.regions_doc,
        "summary": case.summary,
        "default_thresholds": _pairs(case.default_thresholds),
        "default_shown": _pairs(case.default_shown),
        "value_ranges": _pairs(case.value_ranges),
        "probability_files": {c: str(p) for c, p in case.probability_files.items()},
        "probability_stamps": {c: list(v) for c, v in (case.probability_stamps or {}).items()},
        "owns_input": bool(case.owns_input),
    }
    hub.SetAttribute(CASE_ATTRIBUTE, json.dumps(doc, default=str))
    hub.SetNodeReferenceID(INPUT_REF, case.input_volume.GetID() if case.input_volume is not None else None)
    hub.RemoveNodeReferenceIDs(LAYER_REF)
    for node in case.layers().values():
        hub.AddNodeReferenceID(LAYER_REF, node.GetID())
    hub.SetNodeReferenceID(MARKUPS_REF, case.regions_markups.GetID() if case.regions_markups is not None else None)
    hub.SetNodeReferenceID(TABLE_REF, case.regions_table.GetID() if case.regions_table is not None else None)
    organ_table = getattr(case, "organ_table", None)
    hub.SetNodeReferenceID(ORGAN_TABLE_REF, organ_table.GetID() if organ_table is not None else None)


def add_layer_reference(case, node) -> None:
    """Record a layer node added after loading (a probability shown for the first time)."""
    case.segmentation.AddNodeReferenceID(LAYER_REF, node.GetID())


def case_hubs(scene) -> list:
    """The segmentation nodes of ``scene`` that carry a case record, in scene order."""
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    out = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    return [n for n in out if n.GetAttribute(CASE_ATTRIBUTE)]


def _record(hub) -> dict:
    text = hub.GetAttribute(CASE_ATTRIBUTE) if hub is not None else None
    if not text:
        raise InputError(f"node {hub.GetName() if hub else None!r} carries no CalibUncertainty case record")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"the CalibUncertainty case record of {hub.GetName()!r} is not valid JSON ({e})") from e
    if doc.get("version") != RECORD_VERSION:
        raise InputError(f"the case record of {hub.GetName()!r} has version {doc.get('version')!r}; "
                         f"this CalibUncertainty reads version {RECORD_VERSION}")
    return doc


def _referenced(hub, role: str) -> list:
    return [hub.GetNthNodeReference(role, i) for i in range(hub.GetNumberOfNodeReferences(role))
            if hub.GetNthNodeReference(role, i) is not None]


def restore_case_nodes(scene, hub=None):
    """Rebuild the CaseNodes of a recorded case from ``scene`` (its first case when ``hub`` is None).

    The layers are the referenced map/probability nodes still in the scene; regions come from
    the recorded regions.json; a region markups list that came back empty (a scene saved where
    markups are not stored) is filled again from the regions. Raises InputError when the scene
    holds no recorded case or the case has no map left.
    """
    from .case_folder import _regions, class_names_from
    from .nodes import CaseNodes, _sh_node

    if hub is None:
        hubs = case_hubs(scene)
        if not hubs:
            raise InputError("this scene holds no CalibUncertainty case to review")
        hub = hubs[0]
    doc = _record(hub)
    maps, probs = {}, {}
    for node in _referenced(hub, LAYER_REF):
        role = node.GetAttribute("CalibU.Role") or ""
        if role.startswith("map_"):
            maps[role[len("map_"):]] = node
        elif role.startswith("prob_"):
            probs[role[len("prob_"):]] = node
    if not maps:
        raise InputError(f"case {doc['case_id']}: none of its uncertainty maps is in the scene any more")
    from .case_folder import MAP_ORDER

    maps = dict(sorted(maps.items(), key=lambda kv: (MAP_ORDER.index(kv[0]) if kv[0] in MAP_ORDER
                                                      else len(MAP_ORDER), kv[0])))
    regions_doc, summary = doc.get("regions_doc") or {}, doc.get("summary") or {}
    class_names = class_names_from(regions_doc, summary) or {}
    regions = _regions(regions_doc, Path(doc["case_dir"]) / "regions.json", class_names) \
        if regions_doc.get("regions") is not None else []
    markups = hub.GetNodeReference(MARKUPS_REF)
    if markups is not None and markups.GetNumberOfControlPoints() != len(regions):
        _refill_markups(markups, regions)
    sh = _sh_node(scene)
    folder = 0
    if sh is not None:
        item = sh.GetItemByDataNode(hub)
        folder = sh.GetItemParent(item) if item else 0
        if folder and sh.GetItemLevel(folder) != "Folder":
            folder = 0
    return CaseNodes(
        case_id=doc["case_id"], case_dir=Path(doc["case_dir"]), geometry=Geometry.from_dict(doc["geometry"]),
        input_volume=hub.GetNodeReference(INPUT_REF), segmentation=hub, probabilities=probs, maps=maps,
        regions_markups=markups, regions_table=hub.GetNodeReference(TABLE_REF), regions=regions,
        default_thresholds={k: (float(v[0]), str(v[1])) for k, v in doc["default_thresholds"].items()},
        default_shown={k: (float(v[0]), float(v[1])) for k, v in doc["default_shown"].items()},
        value_ranges={k: (float(v[0]), float(v[1])) for k, v in doc["value_ranges"].items()},
        regions_doc=regions_doc, summary=summary, folder_item=folder, owns_input=bool(doc.get("owns_input")),
        probability_files={c: Path(p) for c, p in doc.get("probability_files", {}).items()},
        probability_stamps={c: list(v) for c, v in (doc.get("probability_stamps") or {}).items()},
        name_prefix=doc.get("name_prefix") or doc["case_id"], organ_table=hub.GetNodeReference(ORGAN_TABLE_REF))


def _refill_markups(markups, regions) -> None:
    from .nodes import fill_region_markups

    fill_region_markups(markups, regions)


# --- review state ------------------------------------------------------------------------------
def save_review_state(hub, state: dict) -> None:
    hub.SetAttribute(REVIEW_ATTRIBUTE, json.dumps(state))


def load_review_state(hub) -> dict:
    """The recorded review state ({} when none or unreadable)."""
    text = hub.GetAttribute(REVIEW_ATTRIBUTE) if hub is not None else None
    if not text:
        return {}
    try:
        state = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return state if isinstance(state, dict) else {}
