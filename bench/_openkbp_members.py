"""Member predictions of ``bench/openkbp.py``: every member's probabilities for every held-out case.

Like ``CalibUncertaintyLib.demo.write_members`` (``nnunet.inference.EnsemblePredictor``: nnU-Net's
preprocessing once per case, then each member's sliding-window logits and nnU-Net's export to
softmax probabilities (K, z, y, x) on the CT's own grid), with two differences that matter for
a CPU benchmark of 8 members x 16 cases:

- the ``<case>.npz`` is written *uncompressed* (``numpy.savez``; 0.1 s instead of about 3 s of
  zlib per 50 MB member volume); readers (``numpy.load``) do not care;
- work is resumable per case: a member folder records its checkpoint hash and settings in
  ``.bench_member.json`` when it is started, and a case whose ``.npz`` and ``.pkl`` exist in a
  folder with a matching record is not predicted again (each file is written atomically).

The ``.pkl`` holds the properties ``io.nnunet_outputs.write_member_probs`` writes (``sitk_stuff``
geometry, spacing, uncropped shape and box), so ``pair_cases`` and nnU-Net's tools read the
folders; ``plans.json`` and ``dataset.json`` of the model are copied next to them, as
``nnUNetv2_predict`` does (the calibration file's fingerprint uses them).
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from pathlib import Path

import numpy as np

from CalibUncertaintyLib.io.atomic import atomic_path, write_json
from CalibUncertaintyLib.io.nnunet_outputs import validate_probs

log = logging.getLogger("bench.openkbp.members")

RECORD = ".bench_member.json"


def _write_case(folder: Path, case: str, probs: np.ndarray, geometry) -> None:
    probs = validate_probs(probs, f"case {case} for {folder.name}")
    shape = list(geometry.shape_zyx)
    props = {"sitk_stuff": {"spacing": tuple(geometry.spacing), "origin": tuple(geometry.origin),
                            "direction": tuple(geometry.direction)},
             "spacing": list(geometry.spacing_zyx), "shape_before_cropping": tuple(shape),
             "bbox_used_for_cropping": [[0, s] for s in shape],
             "shape_after_cropping_and_before_resampling": tuple(shape)}
    with atomic_path(folder / f"{case}.pkl") as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(props, f)
    with atomic_path(folder / f"{case}.npz") as tmp:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append a second ".npz"
            np.savez(f, probabilities=probs)


def predict_members(model_dir: Path, ensemble: str, cases: dict, out_root: Path, tile_step: float,
                    tta: bool = False, folds=None) -> tuple[list[Path], dict]:
    """Members of ``ensemble`` in ``model_dir`` on ``cases`` ({case: [channel files]}) into
    ``out_root/<member>/``. Returns (member folders in member order, timing record)."""
    from CalibUncertaintyLib.calibration.fingerprint import sha256_file
    from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor
    from CalibUncertaintyLib.nnunet.model_folder import ModelFolder

    model = ModelFolder.open(model_dir)
    members = model.members(ensemble, folds)
    dirs = [out_root / m.name.replace("/", "_") for m in members]
    for m, d in zip(members, dirs):
        want = {"checkpoint": str(m.checkpoint), "sha256": sha256_file(m.checkpoint), "tta": bool(tta),
                "tile_step": float(tile_step)}
        try:
            have = json.loads((d / RECORD).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            have = None
        if have != want:
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            for name in ("plans.json", "dataset.json"):
                shutil.copyfile(model.path / name, d / name)
            write_json(d / RECORD, want)
    todo = {c: f for c, f in cases.items()
            if not all((d / f"{c}.npz").is_file() and (d / f"{c}.pkl").is_file() for d in dirs)}
    timing = {"n_cases": len(cases), "n_predicted": len(todo), "member_seconds": [], "preprocess_seconds": []}
    if not todo:
        return dirs, timing
    predictor = EnsemblePredictor(model, members, device="cpu", tta=tta, tile_step_size=tile_step)
    for n, (case_id, files) in enumerate(sorted(todo.items())):
        case = predictor.prepare(files, case_id)
        timing["preprocess_seconds"].append(round(case.seconds, 2))
        for pred in predictor.iter_members(case, progress=None):
            t0 = time.perf_counter()
            _write_case(dirs[pred.index], case_id, pred.probabilities, case.geometry)
            timing["member_seconds"].append(round(pred.seconds + time.perf_counter() - t0, 2))
        log.info("%s members: case %s done (%d/%d)", ensemble, case_id, n + 1, len(todo))
    return dirs, timing
