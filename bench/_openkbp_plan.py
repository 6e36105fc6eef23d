"""The benchmark's nnU-Net plan: the project's small plan, at a coarser target spacing.

``CalibUncertaintyLib.nnunet.small_plan.prepare_small_plan`` keeps nnU-Net's target spacing
(the median voxel, here about 3.9 x 3.9 x 2.5 mm), at which one CPU member prediction of an
OpenKBP CT takes 25-50 s on this machine. The benchmark needs 8 members x 20 cases of them, so
this module does the same three steps with one change, the target spacing:

1. nnU-Net fingerprint and default ``ExperimentPlanner`` (skipped when done);
2. ``small_plan.derive_small_plan`` on 3d_fullres, then ``spacing`` set to ``spacing_mm``
   (isotropic, so nnU-Net's axis transposition does not matter), written as its own plans file
   with its own data identifier;
3. nnU-Net's preprocessing for that plan, marked complete by a record of the plan and the cases
   (a rerun with the same plan and cases skips it).

nnU-Net resamples each CT to the target spacing for training and inference, and its export
resamples the predicted logits back to the CT's own grid before the softmax, so every
probability, metric and map is still on the native grid, compared with the original labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.atomic import write_json
from CalibUncertaintyLib.nnunet.small_plan import (BASE_PLANS_NAME, PreparedDataset, derive_small_plan,
                                                   nnunet_paths, parse_dataset_folder)

log = logging.getLogger("bench.openkbp.plan")

DONE_SUFFIX = ".bench_preprocessed.json"


def bench_plans_name(spacing_mm: float) -> str:
    """``nnUNetPlans_bench5mm`` for 5.0, ``nnUNetPlans_bench4p5mm`` for 4.5."""
    return "nnUNetPlans_bench" + f"{spacing_mm:g}".replace(".", "p") + "mm"


def prepare_bench_plan(dataset_folder: Path, preprocessed_root: Path, spacing_mm: float,
                       num_processes: int = 2, configuration: str = "3d_fullres", **small_plan_kwargs) -> PreparedDataset:
    """Plan (nnU-Net) + small plan at ``spacing_mm`` isotropic + preprocessing; returns the dataset.

    ``small_plan_kwargs`` go to ``derive_small_plan`` (n_stages, base_features, max_features,
    patch_size, batch_size). Each step is skipped when its complete output exists.
    """
    if not spacing_mm > 0:
        raise InputError(f"target spacing must be > 0 mm, got {spacing_mm}")
    raw_root, name, dataset_id = parse_dataset_folder(dataset_folder)
    plans_name = bench_plans_name(spacing_mm)
    out = PreparedDataset(name, dataset_id, raw_root.resolve(), Path(preprocessed_root).resolve(), plans_name,
                          configuration)
    with nnunet_paths(raw=raw_root, preprocessed=preprocessed_root):
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset)

        folder = out.preprocessed_folder
        if not (folder / "dataset_fingerprint.json").is_file():
            extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=True,
                                        clean=True, verbose=False, show_progress_bar=False)
        if not (folder / f"{BASE_PLANS_NAME}.json").is_file() or not (folder / "dataset.json").is_file():
            plan_experiment_dataset(dataset_id, ExperimentPlanner)
        base = json.loads((folder / f"{BASE_PLANS_NAME}.json").read_text())
        plans = derive_small_plan(base, plans_name, configuration, **small_plan_kwargs)
        cfg = plans["configurations"][configuration]
        cfg["spacing"] = [float(spacing_mm)] * len(cfg["spacing"])
        plans["calibu_bench_spacing_mm"] = float(spacing_mm)
        plans = json.loads(json.dumps(plans))
        if not out.plans_file.is_file() or json.loads(out.plans_file.read_text()) != plans:
            write_json(out.plans_file, plans)

        cases = sorted(p.name[: -len(".nii.gz")] for p in (out.raw_folder / "labelsTr").glob("*.nii.gz"))
        record = {"plans_sha256": hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest(),
                  "cases": cases}
        done = folder / (cfg["data_identifier"] + DONE_SUFFIX)
        try:
            complete = json.loads(done.read_text()) == record and (folder / cfg["data_identifier"]).is_dir()
        except (FileNotFoundError, json.JSONDecodeError):
            complete = False
        if not complete:
            done.unlink(missing_ok=True)
            log.info("preprocessing %s for %s (%g mm)", name, plans_name, spacing_mm)
            preprocess_dataset(dataset_id, plans_name, (configuration,), [num_processes], verbose=False,
                               show_progress_bar=False)
            write_json(done, record)
    return out
