"""Data side of ``bench/openkbp.py``: find the OpenKBP dataset, split it, link the training cases.

The shared data is read in place: the training dataset that nnU-Net plans is a folder of
symbolic links to the shared files (nothing is copied), and the calibration and test cases are
read from the shared ``imagesTr`` / ``labelsTr`` directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.atomic import write_json

_DATASET = re.compile(r"^Dataset\d{3}_\w+$")
ENDING = ".nii.gz"


def find_dataset(path: Path) -> Path:
    """The nnU-Net raw dataset folder: ``path`` itself, or its only ``DatasetXXX_Name`` child."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError(f"OpenKBP data not found at {path}: pass --data (the folder holding "
                         "Dataset501_OpenKBP_HN_OAR, or that folder itself)")
    if _DATASET.match(path.name) and (path / "dataset.json").is_file():
        found = path
    else:
        kids = [p for p in sorted(path.iterdir()) if _DATASET.match(p.name) and (p / "dataset.json").is_file()]
        if len(kids) != 1:
            raise InputError(f"{path} holds {len(kids)} nnU-Net dataset folders (DatasetXXX_Name with a "
                             "dataset.json); pass the one to use with --data")
        found = kids[0]
    for sub in ("imagesTr", "labelsTr"):
        if not (found / sub).is_dir():
            raise InputError(f"{found} has no {sub}/ folder (nnU-Net raw layout expected)")
    return found.resolve()


def case_ids(dataset: Path) -> list[str]:
    """Sorted ids of the cases that have both ``imagesTr/<id>_0000.nii.gz`` and ``labelsTr/<id>.nii.gz``."""
    labels = {p.name[: -len(ENDING)] for p in (dataset / "labelsTr").glob(f"*{ENDING}")}
    images = {p.name[: -len(ENDING) - 5] for p in (dataset / "imagesTr").glob(f"*_0000{ENDING}")}
    ids = sorted(labels & images)
    if not ids:
        raise InputError(f"{dataset}: no case has both an image and a label")
    return ids


def make_split(ids: list[str], n_train: int, n_cal: int, n_test: int, seed: int) -> dict:
    """Shuffle ``ids`` with ``numpy.random.default_rng(seed)`` and cut train / calibration / test.

    Each part is sorted; the parts never overlap. InputError when the sizes ask for more cases
    than exist.
    """
    need = n_train + n_cal + n_test
    if need > len(ids):
        raise InputError(f"the split asks for {need} cases ({n_train} train + {n_cal} calibration + "
                         f"{n_test} test) but the dataset has {len(ids)}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return {"seed": seed, "n_available": len(ids),
            "train": sorted(order[:n_train]),
            "calibration": sorted(order[n_train:n_train + n_cal]),
            "test": sorted(order[n_train + n_cal:need])}


def link_training_dataset(source: Path, raw_root: Path, dataset_id: int, name: str, train: list[str]) -> Path:
    """``raw_root/DatasetXXX_name`` with imagesTr/labelsTr as links to the training cases of ``source``.

    Rebuilt when it holds another set of cases; dataset.json is the source's with numTraining set.
    """
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    ds = json.loads((source / "dataset.json").read_text())
    ds["numTraining"] = len(train)
    ds["name"] = f"{ds.get('name', source.name)} -- training split of the CalibUncertainty benchmark"
    have = sorted(p.name[: -len(ENDING)] for p in (folder / "labelsTr").glob(f"*{ENDING}")) \
        if (folder / "labelsTr").is_dir() else None
    if have == sorted(train) and (folder / "dataset.json").is_file() and \
            json.loads((folder / "dataset.json").read_text()) == ds:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for c in train:
        os.symlink(source / "imagesTr" / f"{c}_0000{ENDING}", folder / "imagesTr" / f"{c}_0000{ENDING}")
        os.symlink(source / "labelsTr" / f"{c}{ENDING}", folder / "labelsTr" / f"{c}{ENDING}")
    write_json(folder / "dataset.json", ds)
    return folder


def training_records(deep_dir: Path, snap_dir: Path) -> dict:
    """{"deep": [calibu_training.json of each fold], "checkpoint": [...]}: settings, seconds, pseudo Dice."""
    from CalibUncertaintyLib.nnunet.training import FOLD_RECORD

    out = {}
    for key, d in (("deep", deep_dir), ("checkpoint", snap_dir)):
        out[key] = [json.loads(p.read_text()) for p in sorted(Path(d).glob(f"fold_*/{FOLD_RECORD}"))]
    return out


def plan_spacing(plans_file: Path) -> list[float]:
    """Target spacing (z, y, x in mm, nnU-Net's array order) of the small plan's configuration."""
    plans = json.loads(Path(plans_file).read_text())
    cfg = next(iter(plans["configurations"].values()))
    return [float(s) for s in cfg["spacing"]]
