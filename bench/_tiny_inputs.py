"""Tiny inputs for the benches' smoke runs (``Testing/Python/test_bench_smoke.py``).

Every OpenKBP bench reads an nnU-Net raw dataset folder (``imagesTr`` / ``labelsTr``); its smoke run
reads a few real OpenKBP cases cropped to a small block around their organs instead (real CT and
labels, geometry kept: the crop's origin is the position of its first voxel), so a bench runs end to
end in seconds. ``tiny_model`` writes a random-weight nnU-Net v2 model folder of the right class
count (``Testing/Python/tiny_nnunet.py``) for the benches' ``--model-folder`` path.

Nothing here is a benchmark input for numbers: smoke runs check that the code runs, not what it finds.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset501_OpenKBP_HN_OAR"


def _crop(array, geometry, start_zyx, shape_zyx):
    from CalibUncertaintyLib.io.geometry import Geometry

    start = [max(0, min(int(s), n - w)) for s, n, w in zip(start_zyx, array.shape, shape_zyx)]
    box = tuple(slice(s, s + w) for s, w in zip(start, shape_zyx))
    origin = geometry.index_to_lps(np.asarray(start[::-1], dtype=float))  # (x, y, z) index of the first voxel
    return array[box].copy(), Geometry(array[box].shape, geometry.spacing, tuple(origin), geometry.direction)


def tiny_openkbp(source: Path, dst: Path, cases=None, n_cases: int = 4, shape_zyx=(24, 40, 48)) -> Path:
    """``dst/Dataset501_OpenKBP_HN_OAR`` holding ``n_cases`` cases of the OpenKBP dataset folder
    ``source`` (the first ones by id, or ``cases``), each cropped to ``shape_zyx`` voxels centred on
    its labelled organs. Returns the dataset folder (with ``dataset.json``)."""
    from CalibUncertaintyLib.io.images import read_image, write_image

    source = Path(source)
    if (source / DATASET).is_dir():
        source = source / DATASET
    ids = list(cases) if cases else sorted(p.name[:-len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    out = Path(dst) / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for case in ids[:n_cases]:
        lab, geo = read_image(source / "labelsTr" / f"{case}.nii.gz")
        ct, _ = read_image(source / "imagesTr" / f"{case}_0000.nii.gz")
        nz = np.nonzero(lab)
        centre = [(int(a.min()) + int(a.max())) // 2 for a in nz]
        start = [c - w // 2 for c, w in zip(centre, shape_zyx)]
        lab_c, g = _crop(np.asarray(lab), geo, start, shape_zyx)
        ct_c, _ = _crop(np.asarray(ct), geo, start, shape_zyx)
        write_image(out / "labelsTr" / f"{case}.nii.gz", lab_c.astype(np.uint8), g)
        write_image(out / "imagesTr" / f"{case}_0000.nii.gz", ct_c.astype(np.int16), g)
    ds = json.loads((source / "dataset.json").read_text())
    ds["numTraining"] = min(n_cases, len(ids))
    (out / "dataset.json").write_text(json.dumps(ds, indent=1))
    return out


def tiny_ct(source: Path, dst: Path, shape_zyx=(20, 32, 32)) -> Path:
    """The central ``shape_zyx`` block of the CT ``source`` written to ``dst`` (its geometry kept)."""
    from CalibUncertaintyLib.io.images import read_image, write_image

    ct, geo = read_image(source)
    start = [(n - w) // 2 for n, w in zip(np.shape(ct), shape_zyx)]
    arr, g = _crop(np.asarray(ct), geo, start, shape_zyx)
    return write_image(dst, arr.astype(np.int16), g)


def tiny_model(dst: Path, n_classes: int = 6, folds=(0, 1), class_names=None) -> Path:
    """A random-weight nnU-Net v2 model folder (``tiny_nnunet.build_tiny_model_folder``) with
    ``n_classes`` outputs named like the dataset's labels (``class_names``, background first)."""
    sys.path.insert(0, str(REPO / "Testing" / "Python"))
    from tiny_nnunet import build_tiny_model_folder

    folder = build_tiny_model_folder(dst, folds=folds, n_classes=n_classes)
    if class_names:
        ds = json.loads((folder / "dataset.json").read_text())
        ds["labels"] = {name: i for i, name in enumerate(class_names)}
        (folder / "dataset.json").write_text(json.dumps(ds, indent=1))
    return folder


def copy_tree(src: Path, dst: Path) -> Path:
    """``dst`` as a fresh copy of ``src`` (a bench that writes into its work folder gets its own)."""
    if Path(dst).exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return Path(dst)
