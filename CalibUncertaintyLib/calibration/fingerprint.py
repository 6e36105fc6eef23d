"""Model fingerprints, so a calibration file is never applied to another model (METHODS.md §2:
"a fingerprint of the model (plans + dataset.json + checkpoint hashes). Applying it to another
model is an error").

A fingerprint is a JSON-able dict with these components (None where unknown):

- ``plans_dataset_sha256``: sha256 of plans.json and dataset.json in *canonical* JSON form
  (parsed, then dumped with sorted keys and no whitespace). Canonical, because
  ``nnUNetv2_predict`` re-writes both files into its output folder rather than copying them
  byte for byte, and the model folder and its prediction folders must agree.
- ``checkpoints_sha256``: sha256 over the sorted lines "relpath:sha256" of every
  ``fold_*/checkpoint_*.pth`` in a model folder; ``checkpoints`` maps relpath -> file sha256
  (files hashed in 1 MiB chunks). For a cascade stage (``3d_cascade_fullres``) the hash also covers
  the low-resolution stage's folder (``previous_stage_sha256``): the stage's outputs depend on it.
  Unknown for prediction folders.
- ``member_names_sha256``: only for the weak fallback (``source = "member_names"``) when a
  prediction folder has neither plans.json nor dataset.json: sha256 of the class count and the
  sorted member folder names. It says "same folder names", not "same weights".
- ``n_classes`` and ``source`` ("model_folder" | "prediction_folder" | "member_names").

``compare_fingerprints`` compares every component known on both sides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelFolderError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
COMPONENTS = ("n_classes", "plans_dataset_sha256", "checkpoints_sha256", "member_names_sha256")


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _load_json(path: Path, err) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise err(f"cannot read {path} as JSON: {exc}") from exc


def _plans_dataset(folder: Path, err) -> tuple[str, int | None]:
    """(sha256 of canonical plans.json + dataset.json, class count from dataset.json labels)."""
    h = hashlib.sha256()
    dataset = None
    for name in ("plans.json", "dataset.json"):
        obj = _load_json(folder / name, err)
        if name == "dataset.json":
            dataset = obj
        h.update(name.encode() + b"\n")
        h.update(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest(), _n_classes_from_dataset(dataset)


def _n_classes_from_dataset(dataset) -> int | None:
    labels = dataset.get("labels") if isinstance(dataset, dict) else None
    if isinstance(labels, dict) and labels and all(isinstance(v, int) for v in labels.values()):
        return len(labels)
    return None  # region-based or unusual dataset.json: class count not derived


def fingerprint_model_folder(folder: str | os.PathLike) -> dict:
    """Fingerprint of an nnU-Net trained model folder (plans.json, dataset.json, fold_*/checkpoint_*.pth)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder not found: {folder}")
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise ModelFolderError(f"{folder} has no {name}: not an nnU-Net trained model folder "
                                   "(it should hold plans.json, dataset.json and fold_*/checkpoint_*.pth)")
    plans_sha, n_classes = _plans_dataset(folder, ModelFolderError)
    ckpts = sorted(p for p in folder.glob("fold_*/checkpoint_*.pth") if p.is_file())
    if not ckpts:
        raise ModelFolderError(f"{folder} has no fold_*/checkpoint_*.pth: train the model first or "
                               "point to the folder that holds the fold_* subfolders")
    per_file = {p.relative_to(folder).as_posix(): sha256_file(p) for p in ckpts}
    combined = _combine(per_file)
    previous = _previous_stage_key(folder)
    if previous is not None:  # a cascade stage: its outputs depend on the low-resolution model too
        combined = _sha_lines([combined, f"previous_stage:{previous}"])
    fp = {
        "source": "model_folder",
        "n_classes": n_classes,
        "plans_dataset_sha256": plans_sha,
        "checkpoints_sha256": combined,
        "checkpoints": per_file,
        "member_names_sha256": None,
    }
    if previous is not None:
        fp["previous_stage_sha256"] = previous
    return fp


def _previous_stage_key(folder: Path) -> str | None:
    """For a cascade stage, the fingerprint key of its low-resolution stage's folder (plans,
    dataset.json, checkpoints; ``nnunet.cascade.previous_stage_key``); None for any other model."""
    plans = _load_json(folder / "plans.json", ModelFolderError)
    configs = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configs, dict) or not any(isinstance(c, dict) and c.get("previous_stage")
                                                for c in configs.values()):
        return None
    from ..nnunet.cascade import previous_stage_key
    from ..nnunet.model_folder import ModelFolder

    return previous_stage_key(ModelFolder.open(folder))


def fingerprint_prediction_folder(folders, n_classes: int | None = None) -> dict:
    """Fingerprint of nnU-Net prediction folder(s) (one per ensemble member, or one folder).

    Uses plans.json + dataset.json that ``nnUNetv2_predict`` writes next to its outputs
    (checkpoints unknown). If several folders carry different files (an ensemble of different
    models), the component hashes their sorted distinct hashes. When no folder has both files,
    falls back to the weak ``"member_names"`` fingerprint: class count (``n_classes``, or read
    from the header of the first ``*.npz``) and the sorted folder names.
    """
    paths = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
    if not paths:
        raise InputError("fingerprint_prediction_folder needs at least one folder")
    for p in paths:
        if not p.is_dir():
            raise InputError(f"prediction folder not found: {p}")
    hashes, classes = [], []
    for p in paths:
        have = [(p / n).is_file() for n in ("plans.json", "dataset.json")]
        if all(have):
            sha, k = _plans_dataset(p, InputError)
            hashes.append(sha)
            classes.append(k)
        elif any(have):
            log.warning("%s has only one of plans.json / dataset.json; ignoring it for the fingerprint", p)
    if hashes:
        distinct = sorted(set(hashes))
        if len(distinct) > 1:
            log.info("member folders come from %d different plans/dataset files", len(distinct))
        if len(hashes) < len(paths):
            log.warning("%d of %d member folders lack plans.json/dataset.json", len(paths) - len(hashes), len(paths))
        known = [k for k in classes if k is not None]
        return {
            "source": "prediction_folder",
            "n_classes": known[0] if known else n_classes,
            "plans_dataset_sha256": distinct[0] if len(distinct) == 1 else _sha_lines(distinct),
            "checkpoints_sha256": None,
            "checkpoints": {},
            "member_names_sha256": None,
        }

    if n_classes is None:
        n_classes = _n_classes_from_npz(paths[0])
    names = sorted(p.resolve().name for p in paths)
    log.warning("no plans.json/dataset.json in the prediction folders: using a weak fingerprint "
                "(class count + member folder names), which cannot tell two models apart")
    return {
        "source": "member_names",
        "n_classes": int(n_classes),
        "plans_dataset_sha256": None,
        "checkpoints_sha256": None,
        "checkpoints": {},
        "member_names_sha256": _sha_lines([f"n_classes={int(n_classes)}", *names]),
        "member_names": names,
        "weak": True,
    }


def compare_fingerprints(a: dict | None, b: dict | None) -> str | None:
    """None when ``a`` and ``b`` agree on every component known on both sides, else the reason.

    Also a reason when the two share no component at all (nothing could be verified).
    """
    if not a or not b:
        return "a fingerprint is missing, so the model cannot be verified"
    compared = 0
    for key in COMPONENTS:
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            continue
        compared += 1
        if va != vb:
            if key == "n_classes":
                return f"class counts differ ({va} vs {vb})"
            if key == "checkpoints_sha256":
                ca, cb = a.get("checkpoints") or {}, b.get("checkpoints") or {}
                diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
                more = f": {', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}" if diff else ""
                return f"checkpoint files differ{more}"
            if key == "plans_dataset_sha256":
                return "plans.json/dataset.json differ"
            return "member folder names or class count differ"
    if compared == 0:
        return "the two fingerprints share no comparable component"
    return None


def differing_component(a: dict | None, b: dict | None) -> str | None:
    """The first component known on both sides that differs (``compare_fingerprints`` order), or None."""
    for key in COMPONENTS:
        va, vb = (a or {}).get(key), (b or {}).get(key)
        if va is not None and vb is not None and va != vb:
            return key
    return None


def short_hash(fp: dict | None, key: str | None = None) -> str:
    """Identifies a fingerprint in messages: component ``key`` when given (so two fingerprints
    that differ print two different values), else 12 hex digits of the checkpoints, else of
    plans/dataset.json, else of the member names."""
    if fp and key:
        v = fp.get(key)
        if v is None:
            return "unknown"
        return f"{v} classes" if key == "n_classes" else f"{key.replace('_sha256', '')} {str(v)[:12]}"
    if fp:
        for key in ("checkpoints_sha256", "plans_dataset_sha256", "member_names_sha256"):
            if fp.get(key):
                return fp[key][:12]
    return "unknown"


def _combine(per_file: dict[str, str]) -> str:
    return _sha_lines(f"{k}:{v}" for k, v in sorted(per_file.items()))


def _sha_lines(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _n_classes_from_npz(folder: Path) -> int:
    """Class count from the header of the first ``<case>.npz`` (``probabilities`` (K, z, y, x))."""
    npzs = sorted(folder.glob("*.npz"))
    if not npzs:
        raise InputError(f"{folder} has no plans.json/dataset.json and no .npz probabilities; "
                         "pass n_classes to fingerprint it")
    try:
        with zipfile.ZipFile(npzs[0]) as zf, zf.open("probabilities.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = reader(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read the 'probabilities' array header of {npzs[0]}: {exc}") from exc
    if len(shape) != 4:
        raise InputError(f"{npzs[0]}: probabilities must be (K, z, y, x), got shape {shape}")
    return int(shape[0])
