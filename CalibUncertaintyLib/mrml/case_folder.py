"""Read and validate one per-case output folder (docs/ARCHITECTURE.md, "Per-case outputs"), no MRML.

A folder holds ``seg.nii.gz``, ``prob_<Class>.nii.gz`` per foreground class, ``map_<name>.nii.gz``
per uncertainty map, ``regions.json`` and ``summary.json``. :func:`read_case_folder` reads all of
it into memory (so that the MRML side can add nodes only once everything was read), checks that
every image shares the segmentation's voxel grid, and raises one InputError that lists every
missing file at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.geometry import Geometry
from ..io.images import read_image

# Display order of maps (the MAP_NAMES contract); unknown map names follow alphabetically.
MAP_ORDER = ("confidence", "entropy", "entropy_norm", "expected_entropy", "mutual_information",
             "epkl", "fg_variance", "vote_disagreement", "dae", "ebcu")
REQUIRED_FILES = ("seg.nii.gz", "regions.json", "summary.json")
REGION_KEYS = ("rank", "centroid_ras", "volume_mm3", "mean_u", "max_u")


@dataclass
class Region:
    """One error region of regions.json (METHODS.md section 5): a connected component of
    {U > τ*} in the ROI, ranked by volume × mean U; centroid in RAS millimetres."""

    rank: int
    class_name: str
    volume_mm3: float
    mean_u: float
    max_u: float
    centroid_ras: tuple[float, float, float]
    n_voxels: int | None = None
    class_index: int | None = None
    score: float | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        """Markup label, e.g. ``R1 Brainstem 123 mm³``."""
        cls = f" {self.class_name}" if self.class_name else ""
        return f"R{self.rank}{cls} {self.volume_mm3:.0f} mm³"


@dataclass
class CaseData:
    """Everything a case folder holds, in memory. Arrays are (z, y, x)."""

    case_dir: Path
    case_id: str
    geometry: Geometry
    seg: np.ndarray
    class_names: dict[int, str]                 # foreground label -> name
    probabilities: dict[str, np.ndarray]        # class name -> float32 (only those read)
    maps: dict[str, np.ndarray]                 # map name -> float32
    regions_doc: dict
    summary: dict
    regions: list[Region]
    probability_files: dict[str, Path] = field(default_factory=dict)  # class name -> prob_<Class>.nii.gz


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); re-run the prediction for this case") from e
    if not isinstance(doc, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    return doc


def class_names_from(doc: dict, summary: dict) -> dict[int, str] | None:
    """Foreground label -> class name, from ``class_names`` in regions.json (else summary.json).

    Accepted forms: a list indexed by label with the background at index 0 (nnU-Net's
    dataset.json order), a {label: name} mapping or a {name: label} mapping. The background
    (label 0) is dropped. Returns None when neither file gives class names.
    """
    names = doc.get("class_names", summary.get("class_names"))
    if names is None:
        labels = summary.get("labels")            # dataset.json style {"name": label}
        names = labels if isinstance(labels, dict) else None
    if names is None:
        return None
    out: dict[int, str] = {}
    if isinstance(names, list):
        out = {i: str(n) for i, n in enumerate(names)}
    elif isinstance(names, dict):
        for k, v in names.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[int(v)] = str(k)
            else:
                try:
                    out[int(k)] = str(v)
                except ValueError:
                    raise InputError(f"class_names entry {k!r}: {v!r} is neither label->name "
                                     "nor name->label") from None
    else:
        raise InputError(f"class_names must be a list or a mapping, got {type(names).__name__}")
    out.pop(0, None)
    return dict(sorted(out.items()))


def _regions(doc: dict, path: Path, class_names: dict[int, str]) -> list[Region]:
    raw = doc.get("regions")
    if raw is None:
        raise InputError(f"{path} has no 'regions' list")
    if not isinstance(raw, list):
        raise InputError(f"{path}: 'regions' must be a list")
    out = []
    for n, r in enumerate(raw, 1):
        missing = [k for k in REGION_KEYS if k not in r]
        if missing:
            raise InputError(f"{path}: region {n} lacks {', '.join(missing)}")
        c = np.asarray(r["centroid_ras"], dtype=float)
        if c.shape != (3,) or not np.all(np.isfinite(c)):
            raise InputError(f"{path}: region {n} centroid_ras must be 3 finite numbers (mm)")
        cls = r.get("class_name")
        if cls is None and r.get("class_index") is not None:
            cls = class_names.get(int(r["class_index"]), f"class {r['class_index']}")
        out.append(Region(rank=int(r["rank"]), class_name=str(cls or ""),
                          volume_mm3=float(r["volume_mm3"]), mean_u=float(r["mean_u"]),
                          max_u=float(r["max_u"]), centroid_ras=tuple(float(v) for v in c),
                          n_voxels=r.get("n_voxels"), class_index=r.get("class_index"),
                          score=r.get("score"), raw=dict(r)))
    out.sort(key=lambda reg: reg.rank)
    return out


def prob_file_stems(class_names: dict[int, str]) -> dict[int, str]:
    """label -> the ``<Class>`` part of its ``prob_<Class>.nii.gz``, named as pipeline/case.py
    names them: ``safe_name(class name)``, with ``_<label>`` appended to a repeated name."""
    from ..pipeline.case import safe_name

    out, used = {}, set()
    for label, name in sorted(class_names.items()):
        stem = safe_name(name)
        if stem in used:
            stem = f"{stem}_{label}"
        used.add(stem)
        out[label] = stem
    return out


def _map_sort_key(name: str):
    return (MAP_ORDER.index(name), "") if name in MAP_ORDER else (len(MAP_ORDER), name)


@dataclass
class CaseFiles:
    """What a case folder holds, before any volume is read (``scan_case_folder``)."""

    case_dir: Path
    case_id: str
    regions_doc: dict
    summary: dict
    class_names: dict[int, str] | None          # None: from the segmentation's labels
    prob_files: dict[str, Path]                 # file stem -> prob_<stem>.nii.gz
    map_files: dict[str, Path]                  # map name -> map_<name>.nii.gz, in display order

    @property
    def seg_path(self) -> Path:
        return self.case_dir / "seg.nii.gz"

    def probability_files(self, class_names: dict[int, str]) -> dict[str, Path]:
        """class name -> its probability file (classes without a file are left out; files of
        classes not in ``class_names`` keep their file stem)."""
        stems = prob_file_stems(class_names)
        out = {class_names[lab]: self.prob_files[stem] for lab, stem in stems.items() if stem in self.prob_files}
        out.update({stem: p for stem, p in self.prob_files.items() if stem not in stems.values()})
        return out

    def regions(self, class_names: dict[int, str]) -> list[Region]:
        return _regions(self.regions_doc, self.case_dir / "regions.json", class_names)


def scan_case_folder(case_dir) -> CaseFiles:
    """List and check a per-case output folder without reading its volumes.

    Raises InputError listing every missing file (the required ones, a ``prob_<Class>`` per class
    named in class_names - or, when summary.json has ``probability_classes`` (the classes
    ``--probabilities`` wrote), per class listed there - at least one ``map_*``)."""
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(f"case output folder not found: {case_dir}")
    missing = [f for f in REQUIRED_FILES if not (case_dir / f).is_file()]
    regions_doc = _read_json(case_dir / "regions.json") if "regions.json" not in missing else {}
    summary = _read_json(case_dir / "summary.json") if "summary.json" not in missing else {}
    class_names = class_names_from(regions_doc, summary)

    prob_files = {p.name[len("prob_"):-len(".nii.gz")]: p for p in sorted(case_dir.glob("prob_*.nii.gz"))}
    map_files = {p.name[len("map_"):-len(".nii.gz")]: p for p in sorted(case_dir.glob("map_*.nii.gz"))}
    written = summary.get("probability_classes")  # pipeline/case.py: the classes given a prob file
    if class_names is not None:
        expected = prob_file_stems(class_names)
        if isinstance(written, list):
            expected = {lab: stem for lab, stem in expected.items() if class_names[lab] in written}
        missing += [f"prob_{stem}.nii.gz" for stem in expected.values() if stem not in prob_files]
    elif not prob_files and not isinstance(written, list):
        missing.append("prob_<Class>.nii.gz (one per foreground class)")
    if not map_files:
        missing.append("map_<name>.nii.gz (at least one uncertainty map)")
    if missing:
        raise InputError(f"case folder {case_dir} is incomplete; missing: {', '.join(missing)}. "
                         "Re-run the prediction (or 'calib-uncertainty maps') for this case.")
    case_id = str(regions_doc.get("case") or summary.get("case") or case_dir.name)
    return CaseFiles(case_dir=case_dir, case_id=case_id, regions_doc=regions_doc, summary=summary,
                     class_names=class_names, prob_files=prob_files,
                     map_files={n: map_files[n] for n in sorted(map_files, key=_map_sort_key)})


def read_case_folder(case_dir, probabilities: bool = True) -> CaseData:
    """Read a per-case output folder completely; raise before anything is returned.

    ``probabilities=False`` reads only the headers of the ``prob_<Class>`` files (their grid is
    still checked) and leaves ``CaseData.probabilities`` empty: a 40-class case then costs the
    memory of its maps, not of 40 probability volumes; ``probability_files`` says where each
    class's volume is, to be read when it is shown (:func:`read_probability`).

    Raises InputError listing every missing file (``scan_case_folder``), and
    GeometryMismatchError when an image is not on the segmentation's voxel grid.
    """
    files = scan_case_folder(case_dir)
    seg, geometry = read_image(files.seg_path)
    class_names = files.class_names
    if class_names is None:
        labels = [int(v) for v in np.unique(seg) if v != 0]
        class_names = {lab: f"Class_{lab}" for lab in labels}

    def read_same(path: Path) -> np.ndarray:
        arr, geo = read_image(path, dtype=np.float32)
        geo.require_same(geometry, path.name, "seg.nii.gz")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{path} contains NaN or infinite values")
        return arr

    probability_files = files.probability_files(class_names)
    if probabilities:
        probs = {cls: read_same(p) for cls, p in probability_files.items()}
    else:
        from ..io.images import read_header_geometry

        for path in probability_files.values():
            read_header_geometry(path).require_same(geometry, path.name, "seg.nii.gz")
        probs = {}
    maps = {n: read_same(p) for n, p in files.map_files.items()}
    return CaseData(case_dir=files.case_dir, case_id=files.case_id, geometry=geometry, seg=seg,
                    class_names=class_names, probabilities=probs, maps=maps,
                    regions_doc=files.regions_doc, summary=files.summary,
                    regions=files.regions(class_names), probability_files=probability_files)


def read_probability(path, geometry: Geometry) -> np.ndarray:
    """One ``prob_<Class>.nii.gz`` as float32, checked to lie on ``geometry`` and to be finite."""
    path = Path(path)
    arr, geo = read_image(path, dtype=np.float32)
    geo.require_same(geometry, path.name, "the case's segmentation")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{path} contains NaN or infinite values")
    return arr


def threshold_for_map(name: str, regions_doc: dict, summary: dict) -> tuple[float, str, bool] | None:
    """(τ*, where it came from, flags_below) for map ``name``, or None when the folder gives none.

    τ* is the threshold of METHODS.md section 4 (maximising mean UEO on the calibration cases),
    in the map's own units. Looked up, in order: regions.json's ``threshold`` when its ``map`` is
    ``name`` (the value the regions were cut at); then summary.json's ``thresholds[name]`` (as
    pipeline/case.py writes it: ``tau_abs`` in map units, ``flag`` "above"/"below", ``source``),
    or a plain number there. ``flags_below`` is True for maps where low values are the
    uncertain ones (confidence: flagged where map < τ). A ``tau`` without ``tau_abs`` is used
    only when it is absolute and on the map's own scale.
    """
    def below(entry) -> bool:
        return isinstance(entry, dict) and entry.get("flag") == "below"

    entry = (summary.get("thresholds") or {}).get(name) if isinstance(summary.get("thresholds"), dict) else None
    if regions_doc.get("map") == name and regions_doc.get("threshold") is not None:
        src = regions_doc.get("threshold_source") or "regions.json"
        return float(regions_doc["threshold"]), str(src), regions_doc.get("flag") == "below" or below(entry)
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry), "summary.json thresholds", False
    if isinstance(entry, dict):
        src = f"summary.json thresholds ({entry['source']})" if entry.get("source") else "summary.json thresholds"
        if "tau_abs" in entry:
            return (float(entry["tau_abs"]), src, below(entry)) if entry["tau_abs"] is not None else None
        if entry.get("tau") is not None and entry.get("kind", "absolute") == "absolute" \
                and entry.get("score", "map") == "map":
            return float(entry["tau"]), src, below(entry)
    return None
