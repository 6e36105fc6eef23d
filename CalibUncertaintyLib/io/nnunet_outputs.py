"""Ensemble member folders in nnU-Net ``--save_probabilities`` layout, and pairing them with images.

A member folder holds, per case, ``<case>.npz`` with one array ``probabilities`` of shape
(K, z, y, x) (softmax, sums to one over K) and ``<case>.pkl``, nnU-Net's properties dict whose
``sitk_stuff`` entry carries the image geometry (spacing, origin, direction in ITK x-y-z order).
It may also hold ``dataset.json`` and ``plans.json`` (nnU-Net copies them there).

Images and labels are nnU-Net raw folders: ``<case>_0000.nii.gz`` (one file per channel,
``_0001`` ... for more channels) and ``<case>.nii.gz``.

``pair_cases`` checks everything a run needs before any work starts (files present, member
grids equal to the image grid, channel count as dataset.json says, same K in all members), so
a run fails early with a message naming the member, the case and the problem.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GeometryMismatchError, InputError
from .atomic import atomic_path
from .geometry import Geometry
from .images import read_header_geometry

log = logging.getLogger(__name__)

SUM_TOL = 1e-3
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


# --------------------------------------------------------------------------------------------
# members: reading and writing one case
# --------------------------------------------------------------------------------------------
def list_member_cases(member_dir: str | os.PathLike) -> list[str]:
    """Sorted case ids that have a ``<case>.npz`` in ``member_dir`` (InputError if none)."""
    member_dir = Path(member_dir)
    if not member_dir.is_dir():
        raise InputError(f"member folder not found: {member_dir}")
    cases = sorted(p.name[:-4] for p in member_dir.glob("*.npz") if not p.name.startswith("."))
    if not cases:
        raise InputError(f"member folder {member_dir} holds no <case>.npz files: run nnU-Net "
                         "prediction with --save_probabilities into it")
    return cases


def member_name(member_dir: str | os.PathLike) -> str:
    """Short name used in messages: the folder name (e.g. ``fold_2``)."""
    return Path(member_dir).name


def _member_files(member_dir: Path, case: str) -> tuple[Path, Path]:
    npz, pkl = member_dir / f"{case}.npz", member_dir / f"{case}.pkl"
    for path, what in ((npz, "probabilities"), (pkl, "properties")):
        if not path.is_file():
            raise InputError(f"member {member_name(member_dir)} case {case}: {what} file missing: {path}")
    return npz, pkl


def load_member_geometry(member_dir: str | os.PathLike, case: str) -> Geometry:
    """Geometry of a member's case from its ``.pkl`` (``sitk_stuff``) and the npz shape.

    Reads only the pickle and the npy header inside the npz (no decompression of the data).
    """
    member_dir = Path(member_dir)
    npz, pkl = _member_files(member_dir, case)
    shape = probs_shape(npz)
    if len(shape) != 4:
        raise InputError(f"member {member_name(member_dir)} case {case}: {npz.name} holds "
                         f"'probabilities' of shape {shape}; expected (K, z, y, x)")
    return _geometry_from_pkl(pkl, shape[1:], f"member {member_name(member_dir)} case {case}")


def probs_shape(npz_path: str | os.PathLike) -> tuple[int, ...]:
    """Shape of the ``probabilities`` array in an nnU-Net npz, read from the npy header only."""
    npz_path = Path(npz_path)
    try:
        with zipfile.ZipFile(npz_path) as zf:
            if "probabilities.npy" not in zf.namelist():
                raise InputError(f"{npz_path}: no 'probabilities' array (found {sorted(zf.namelist())}); "
                                 "expected nnU-Net --save_probabilities output")
            with zf.open("probabilities.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, _ = read_header(f)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise InputError(f"{npz_path}: not a readable .npz file ({e})") from e
    return tuple(int(s) for s in shape)


def _geometry_from_pkl(pkl: Path, shape_zyx, what: str) -> Geometry:
    try:
        with open(pkl, "rb") as f:
            props = pickle.load(f)
    except Exception as e:  # a truncated or foreign pickle
        raise InputError(f"{what}: could not read properties file {pkl} ({type(e).__name__}: {e})") from e
    stuff = props.get("sitk_stuff") if isinstance(props, dict) else None
    if not isinstance(stuff, dict) or not {"spacing", "origin", "direction"} <= set(stuff):
        raise InputError(f"{what}: {pkl.name} has no 'sitk_stuff' with spacing/origin/direction; "
                         "expected the .pkl nnU-Net writes next to the .npz")
    if len(stuff["spacing"]) != 3:
        raise InputError(f"{what}: {pkl.name} describes a {len(stuff['spacing'])}-D image; only 3-D is supported")
    return Geometry(tuple(shape_zyx), tuple(stuff["spacing"]), tuple(stuff["origin"]),
                    tuple(stuff["direction"]))


def validate_probs(probs: np.ndarray, what: str, n_classes: int | None = None,
                   tol: float = SUM_TOL) -> np.ndarray:
    """Return ``probs`` as float32 (K, z, y, x) or raise InputError naming ``what`` and the problem.

    Checks: 4-D, K >= 2 (and == ``n_classes`` when given), every value finite, in [0, 1] up to
    ``tol``, and the sum over K equal to one within ``tol`` at every voxel.
    """
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise InputError(f"{what}: probabilities must be (K, z, y, x), got shape {probs.shape}")
    k = probs.shape[0]
    if k < 2:
        raise InputError(f"{what}: {k} class channel(s); need background plus at least one class")
    if n_classes is not None and k != n_classes:
        raise InputError(f"{what}: {k} class channels, but the other members / dataset.json have "
                         f"{n_classes}; all members must be predictions of the same label set")
    probs = probs.astype(np.float32, copy=False)
    s = probs.sum(axis=0, dtype=np.float32)  # a NaN or inf anywhere makes its voxel's sum non-finite
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(probs)).sum())
        raise InputError(f"{what}: {bad} non-finite values (NaN or inf) in the probabilities")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < -tol or hi > 1 + tol:
        raise InputError(f"{what}: probabilities outside [0, 1] (min {lo:.4g}, max {hi:.4g}); "
                         "these look like logits, not softmax outputs")
    s -= 1.0
    np.abs(s, out=s)
    worst = float(s.max())
    if worst > tol:
        n_bad = int((s > tol).sum())
        raise InputError(f"{what}: probabilities do not sum to one over the {k} classes at {n_bad} "
                         f"voxels (largest deviation {worst:.3g}, tolerance {tol:g})")
    return probs


def load_member_probs(member_dir: str | os.PathLike, case: str,
                      n_classes: int | None = None) -> tuple[np.ndarray, Geometry]:
    """Load one member's probabilities for ``case``: (float32 (K, z, y, x), Geometry).

    Validated with ``validate_probs``; every error names the member folder, the case and the file.
    """
    member_dir = Path(member_dir)
    npz, pkl = _member_files(member_dir, case)
    what = f"member {member_name(member_dir)} case {case} ({npz.name})"
    try:
        with np.load(npz, allow_pickle=False) as data:
            if "probabilities" not in data.files:
                raise InputError(f"{what}: no 'probabilities' array (found {data.files})")
            probs = data["probabilities"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise InputError(f"{what}: not a readable .npz file ({e})") from e
    probs = validate_probs(probs, what, n_classes)
    geometry = _geometry_from_pkl(pkl, probs.shape[1:], what)
    return probs, geometry


def open_member_probs(member_dir: str | os.PathLike, case: str, n_classes: int | None = None):
    """One member's probabilities for ``case`` as an ``npz_stream.NpzProbabilities`` (read one z
    slab at a time, validated by one pass over the file: never a whole (K, z, y, x) array), and
    its Geometry. An archive that cannot be streamed (another compression method, Fortran
    order) is loaded whole by ``load_member_probs``. Errors name the member folder, the case and
    the file."""
    from .npz_stream import NpzLayoutError, NpzProbabilities

    member_dir = Path(member_dir)
    npz, pkl = _member_files(member_dir, case)
    what = f"member {member_name(member_dir)} case {case} ({npz.name})"
    try:
        probs = NpzProbabilities(npz, what)
    except NpzLayoutError as e:
        log.info("%s: %s; loading the whole array", what, e)
        return load_member_probs(member_dir, case, n_classes)
    try:
        k = probs.shape[0]
        if k < 2:
            raise InputError(f"{what}: {k} class channel(s); need background plus at least one class")
        if n_classes is not None and k != n_classes:
            raise InputError(f"{what}: {k} class channels, but the other members / dataset.json have "
                             f"{n_classes}; all members must be predictions of the same label set")
        geometry = _geometry_from_pkl(pkl, probs.shape[1:], what)
        probs.validate()
    except BaseException:
        probs.close()
        raise
    return probs, geometry


def write_member_probs(member_dir: str | os.PathLike, case: str, probs: np.ndarray,
                       geometry: Geometry, extra_properties: dict | None = None) -> Path:
    """Write ``<case>.npz`` + ``<case>.pkl`` as nnU-Net ``--save_probabilities`` does, atomically.

    The pkl holds ``sitk_stuff`` (spacing, origin, direction), nnU-Net's reversed ``spacing`` and
    the uncropped shape/bbox entries, so nnU-Net's own tools accept the folder too.
    Returns the npz path.
    """
    member_dir = Path(member_dir)
    probs = validate_probs(probs, f"case {case} to write into {member_dir}")
    if tuple(probs.shape[1:]) != geometry.shape_zyx:
        raise GeometryMismatchError(f"case {case}: probabilities shape {probs.shape[1:]} != geometry "
                                    f"shape {geometry.shape_zyx}")
    shape = list(geometry.shape_zyx)
    props = {
        "sitk_stuff": {"spacing": tuple(geometry.spacing), "origin": tuple(geometry.origin),
                       "direction": tuple(geometry.direction)},
        "spacing": list(geometry.spacing_zyx),
        "shape_before_cropping": tuple(shape),
        "bbox_used_for_cropping": [[0, s] for s in shape],
        "shape_after_cropping_and_before_resampling": tuple(shape),
    }
    if extra_properties:
        props.update(extra_properties)
    npz = member_dir / f"{case}.npz"
    with atomic_path(member_dir / f"{case}.pkl") as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(props, f)
    with atomic_path(npz) as tmp:
        np.savez_compressed(tmp, probabilities=probs)
    return npz


# --------------------------------------------------------------------------------------------
# dataset.json, images and labels
# --------------------------------------------------------------------------------------------
def find_dataset_json(*folders) -> Path | None:
    """First ``dataset.json`` found in the given folders or their parents (None if none)."""
    for folder in folders:
        if folder is None:
            continue
        folder = Path(folder)
        for cand in (folder / "dataset.json", folder.parent / "dataset.json"):
            if cand.is_file():
                return cand
    return None


def read_dataset_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"could not read {path}: {e}") from e
    if not isinstance(d, dict) or "labels" not in d:
        raise InputError(f"{path} is not an nnU-Net dataset.json (no 'labels' entry)")
    return d


def class_names_from_dataset(dataset: dict | None, n_classes: int) -> list[str]:
    """Class names in channel order (index 0 = background) from dataset.json ``labels``.

    Falls back to ``background, class_1, ...`` without a dataset.json. Region-based labels
    (a list of values for one name) are not supported: the members must be softmax outputs.
    """
    if dataset is None:
        return ["background"] + [f"class_{i}" for i in range(1, n_classes)]
    labels = dataset["labels"]
    by_value = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputError(f"dataset.json label {name!r} is region-based ({value}): these members are "
                             "sigmoid region outputs, and only plain softmax label sets are supported here; run "
                             "`calib-uncertainty predict -m MODEL_FOLDER` for a region-based model (maps of "
                             "independent per-region Bernoullis)")
        by_value[int(value)] = str(name)
    if sorted(by_value) != list(range(n_classes)):
        raise InputError(f"dataset.json labels {labels} do not match the {n_classes} probability "
                         f"channels of the members (expected values 0..{n_classes - 1})")
    return [by_value[i] for i in range(n_classes)]


def _strip_ending(name: str) -> str | None:
    for end in IMAGE_ENDINGS:
        if name.endswith(end):
            return name[: -len(end)]
    return None


def list_image_cases(images_dir: str | os.PathLike, n_channels: int | None = 1) -> dict[str, list[Path]]:
    """{case: [channel files in order]} from an nnU-Net raw images folder.

    With ``n_channels`` given (from dataset.json ``channel_names``; default one channel), a case
    with a missing channel or an extra one (e.g. ``_0001`` when one channel is expected) is an
    InputError. ``n_channels=None`` accepts any contiguous set ``_0000 .. _000N``.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"images folder not found: {images_dir}")
    found: dict[str, dict[int, Path]] = {}
    for p in sorted(images_dir.iterdir()):
        stem = _strip_ending(p.name)
        if stem is None or p.name.startswith("."):
            continue
        m = _CHANNEL_RE.match(stem)
        if m is None:
            raise InputError(f"{p.name} in {images_dir}: image files must be named <case>_0000"
                             f"{p.name[len(stem):]} (nnU-Net raw layout, one file per channel)")
        found.setdefault(m["case"], {})[int(m["ch"])] = p
    if not found:
        raise InputError(f"images folder {images_dir} holds no <case>_0000.nii.gz files")
    out = {}
    for case, chans in sorted(found.items()):
        idx = sorted(chans)
        expected = list(range(n_channels if n_channels is not None else len(idx)))
        if idx != expected:
            want = f"{n_channels} channel(s) (dataset.json)" if n_channels is not None else "contiguous channels"
            names = ", ".join(chans[i].name for i in idx)
            raise InputError(f"case {case}: found channel files {names}, expected {want} "
                             f"_0000..._{len(expected) - 1:04d}")
        out[case] = [chans[i] for i in idx]
    return out


def list_label_cases(labels_dir: str | os.PathLike) -> dict[str, Path]:
    """{case: label file} from an nnU-Net raw labels folder (``<case>.nii.gz``)."""
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise InputError(f"labels folder not found: {labels_dir}")
    out = {}
    for p in sorted(labels_dir.iterdir()):
        stem = _strip_ending(p.name)
        if stem is not None and not p.name.startswith("."):
            out[stem] = p
    if not out:
        raise InputError(f"labels folder {labels_dir} holds no <case>.nii.gz files")
    return out


# --------------------------------------------------------------------------------------------
# pairing members x images x labels
# --------------------------------------------------------------------------------------------
@dataclass
class CaseFiles:
    """Everything on disk for one case: member folders, image channels, label (if any)."""

    case: str
    member_dirs: list[Path]
    geometry: Geometry
    image_paths: list[Path] = field(default_factory=list)
    label_path: Path | None = None

    def load_members(self, n_classes: int | None = None):
        """Yield each member's validated probabilities, one at a time: an
        ``npz_stream.NpzProbabilities`` read one z slab at a time (``open_member_probs``; never
        the whole array), so a member costs no volume while the accumulator adds it. The
        generator holds no member while it opens the next."""
        for d in self.member_dirs:
            probs, geom = open_member_probs(d, self.case, n_classes)
            diff = geom.mismatch(self.geometry)
            if diff is not None:
                raise GeometryMismatchError(f"member {member_name(d)} case {self.case}: {diff} "
                                            "(reference grid of this case)")
            yield probs
            del probs


@dataclass
class Pairing:
    """Result of ``pair_cases``: the cases to process and what is known about the label set."""

    cases: list[CaseFiles]
    n_classes: int
    class_names: list[str]
    dataset_json: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def n_members(self) -> int:
        return len(self.cases[0].member_dirs) if self.cases else 0


def pair_cases(member_dirs, images_dir=None, labels_dir=None, cases=None,
               require_images: bool = False, require_labels: bool = False) -> Pairing:
    """Pair the member folders with images and labels and check them all before any work.

    ``cases`` restricts to those ids (each must exist); otherwise the cases present in every
    member folder are used (a case missing from some member is an InputError naming it).
    Checks per case: npz + pkl in every member, all members on the same grid and with the same
    K, the image (if an images folder is given) with the channel count of dataset.json and the
    same shape/spacing/origin/direction as the members, the label (if a labels folder is given)
    on the image grid. One member is allowed; ``notes`` then says MI and EPKL are zero.
    """
    member_dirs = [Path(d) for d in member_dirs]
    if not member_dirs:
        raise InputError("no member folders given (--members)")
    names = [member_name(d) for d in member_dirs]
    if len(set(map(str, member_dirs))) != len(member_dirs):
        raise InputError(f"the same member folder is given twice: {[str(d) for d in member_dirs]}")
    per_member = {d: set(list_member_cases(d)) for d in member_dirs}
    common = set.intersection(*per_member.values())
    if cases:
        cases = list(dict.fromkeys(cases))
        for c in cases:
            missing = [member_name(d) for d in member_dirs if c not in per_member[d]]
            if missing:
                raise InputError(f"case {c}: no {c}.npz in member folder(s) {', '.join(missing)}")
    else:
        union = set.union(*per_member.values())
        if union != common:
            c = sorted(union - common)[0]
            missing = [member_name(d) for d in member_dirs if c not in per_member[d]]
            raise InputError(f"case {c} is missing from member folder(s) {', '.join(missing)} "
                             f"({len(union - common)} case(s) not in every member); pass --cases to "
                             "choose the cases present in all members")
        cases = sorted(common)
    if not cases:
        raise InputError("no case is present in every member folder")

    ds_path = find_dataset_json(*member_dirs, images_dir, labels_dir)
    dataset = read_dataset_json(ds_path) if ds_path is not None else None
    n_channels = len(dataset["channel_names"]) if dataset and "channel_names" in dataset else (
        1 if dataset else None)
    images = list_image_cases(images_dir, n_channels) if images_dir is not None else {}
    labels = list_label_cases(labels_dir) if labels_dir is not None else {}
    if require_images and images_dir is None:
        raise InputError("an images folder is required (--images)")
    if require_labels and labels_dir is None:
        raise InputError("a labels folder is required (--labels)")

    out, n_classes = [], None
    for case in cases:
        image_paths, img_geom = [], None
        if images_dir is not None:
            if case not in images:
                raise InputError(f"case {case}: no image {case}_0000.nii.gz in {images_dir}")
            image_paths = images[case]
            img_geom = read_header_geometry(image_paths[0])
        ref_geom, ref_name = img_geom, None
        for d in member_dirs:
            npz, _ = _member_files(d, case)
            k = probs_shape(npz)[0]
            if n_classes is None:
                n_classes = k
            elif k != n_classes:
                raise InputError(f"member {member_name(d)} case {case}: {k} class channels, other "
                                 f"members have {n_classes}")
            g = load_member_geometry(d, case)
            if ref_geom is None:
                ref_geom, ref_name = g, member_name(d)
            elif g.mismatch(ref_geom) is not None:
                if img_geom is not None:
                    raise GeometryMismatchError(
                        f"member {member_name(d)} case {case}: {_member_vs_image(g, img_geom)}; the "
                        "members must be predictions of this image on its own grid")
                raise GeometryMismatchError(f"member {member_name(d)} case {case}: {g.mismatch(ref_geom)} "
                                            f"(vs member {ref_name})")
        label_path = None
        if labels_dir is not None:
            if case not in labels:
                raise InputError(f"case {case}: no label {case}.nii.gz in {labels_dir}")
            label_path = labels[case]
            diff = read_header_geometry(label_path).mismatch(ref_geom)
            if diff is not None:
                raise GeometryMismatchError(f"label of case {case} ({label_path.name}) is not on the "
                                            f"image grid: {diff}")
        out.append(CaseFiles(case, list(member_dirs), ref_geom, image_paths, label_path))

    class_names = class_names_from_dataset(dataset, n_classes)
    notes = []
    if len(member_dirs) == 1:
        notes.append(f"one member ({names[0]}): mutual information and EPKL are zero, vote "
                     "disagreement and foreground variance carry no ensemble information")
        log.warning(notes[-1])
    return Pairing(out, n_classes, class_names, ds_path, notes)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _member_vs_image(member: Geometry, image: Geometry) -> str:
    """'<field> <member value> != image <field> <image value>' for the first differing field."""
    what = member.mismatch(image).partition(" ")[0]
    units = {"shape": "shape (z, y, x)", "spacing": "spacing (x, y, z) mm", "origin": "origin (LPS mm)",
             "direction": "direction"}[what]
    a, b = getattr(member, "shape_zyx" if what == "shape" else what), getattr(
        image, "shape_zyx" if what == "shape" else what)
    return f"{units} {_fmt(a)} != image {what} {_fmt(b)}"
