"""Plan and preprocess a dataset with nnU-Net, then derive a deliberately small plan for CPU runs.

nnU-Net's own planner sizes the network for a GPU (3d_fullres: 32 -> 320 features, 4-5 s per
training iteration on two CPU cores). Demos, tests and CPU benchmarks need a network that
learns something in a few hundred iterations, so this module

1. runs nnU-Net's fingerprint extraction and default ``ExperimentPlanner`` through its Python
   API (``nnUNetPlans.json``; skipped when present),
2. derives a small configuration from one of its configurations (fewer stages, fewer features,
   a patch that fits the images, a small batch) and writes it as a plans file of its own
   (default ``nnUNetPlans_tiny.json``, with its own ``data_identifier``), and
3. runs nnU-Net's preprocessing for that plan only, marking it complete with a small record so
   that a rerun with the same plan skips it.

nnU-Net finds its folders through the ``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` environment variables, read when used; ``nnunet_paths`` sets them for the
duration of a block and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io.atomic import write_json

log = logging.getLogger(__name__)

TINY_PLANS_NAME = "nnUNetPlans_tiny"
BASE_PLANS_NAME = "nnUNetPlans"
DONE_SUFFIX = ".calibu_preprocessed.json"
_DATASET_RE = re.compile(r"^Dataset(\d{3})_\w+$")


@contextlib.contextmanager
def nnunet_paths(raw=None, preprocessed=None, results=None, unset_others: bool = False):
    """Set nnU-Net's folder environment variables for this block and restore them afterwards.

    A variable given as None is left as it is, or unset inside the block with ``unset_others``
    (nnU-Net resolves a dataset id by searching all three folders, so a user's own
    ``nnUNet_results`` holding another dataset with the same id would make it ambiguous).
    """
    wanted = {"nnUNet_raw": raw, "nnUNet_preprocessed": preprocessed, "nnUNet_results": results}
    saved = {k: os.environ.get(k) for k in wanted}
    try:
        for k, v in wanted.items():
            if v is not None:
                Path(v).mkdir(parents=True, exist_ok=True)
                os.environ[k] = str(Path(v).resolve())
            elif unset_others:
                os.environ.pop(k, None)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_dataset_folder(folder: str | os.PathLike) -> tuple[Path, str, int]:
    """``.../DatasetXXX_Name`` -> (raw root, dataset name, id). Raises InputError otherwise."""
    folder = Path(folder)
    m = _DATASET_RE.match(folder.name)
    if not m:
        raise InputError(f"{folder} is not an nnU-Net raw dataset folder: its name must look like "
                         "DatasetXXX_Name (three-digit id)")
    if not (folder / "dataset.json").is_file():
        raise InputError(f"{folder} has no dataset.json: not an nnU-Net raw dataset folder")
    if not (folder / "imagesTr").is_dir() or not (folder / "labelsTr").is_dir():
        raise InputError(f"{folder} needs imagesTr/ and labelsTr/ (nnU-Net raw layout) to be planned and trained")
    return folder.parent, folder.name, int(m.group(1))


def _divisor(strides: list[list[int]]) -> list[int]:
    out = [1] * len(strides[0])
    for s in strides:
        out = [o * int(v) for o, v in zip(out, s)]
    return out


def derive_small_plan(base_plans: dict, plans_name: str = TINY_PLANS_NAME, configuration: str = "3d_fullres",
                      n_stages: int = 4, base_features: int = 8, max_features: int = 64,
                      patch_size: list[int] | None = None, batch_size: int = 2,
                      n_conv_per_stage: int = 2) -> dict:
    """A copy of ``base_plans`` whose only configuration is a small version of ``configuration``.

    Keeps nnU-Net's spacing, normalisation, resampling and the first ``n_stages`` kernel sizes
    and strides; features double per stage from ``base_features`` up to ``max_features``; the
    patch is ``patch_size`` or the planned patch capped at the median image size, rounded down
    to a multiple of the network's total stride on every axis. The configuration keeps its name
    (so model folders read ``<Trainer>__<plans_name>__3d_fullres``) and gets the data identifier
    ``<plans_name>_<configuration>``, so its preprocessed data never mixes with the base plan's.
    """
    configs = base_plans.get("configurations", {})
    if configuration not in configs:
        raise InputError(f"configuration {configuration!r} is not in plans {base_plans.get('plans_name')!r} "
                         f"(available: {', '.join(configs) or 'none'})")
    if not re.fullmatch(r"[A-Za-z0-9_]+", plans_name):
        raise InputError(f"plans name must be letters, digits and '_', got {plans_name!r}")
    src = copy.deepcopy(configs[configuration])
    # resolve inheritance (3d_cascade_fullres style configurations)
    while "inherits_from" in src:
        parent = copy.deepcopy(configs[src.pop("inherits_from")])
        parent.update(src)
        src = parent
    arch = src["architecture"]["arch_kwargs"]
    planned = len(arch["strides"])
    if not 2 <= n_stages <= planned:
        raise InputError(f"n_stages must be between 2 and the planned {planned}, got {n_stages}")
    if base_features < 1 or max_features < base_features:
        raise InputError(f"need 1 <= base_features <= max_features, got {base_features}, {max_features}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    strides = [list(map(int, s)) for s in arch["strides"][:n_stages]]
    kernels = [list(map(int, k)) for k in arch["kernel_sizes"][:n_stages]]
    div = _divisor(strides)
    if patch_size is None:
        median = [int(round(v)) for v in src.get("median_image_size_in_voxels", src["patch_size"])]
        cap = [min(int(p), m) for p, m in zip(src["patch_size"], median)]
        patch = [max(d, (c // d) * d) for c, d in zip(cap, div)]
    else:
        patch = [int(p) for p in patch_size]
        if len(patch) != len(div):
            raise InputError(f"patch_size needs {len(div)} values for {configuration}, got {patch_size}")
        bad = [(p, d) for p, d in zip(patch, div) if p < d or p % d]
        if bad:
            raise InputError(f"patch_size {patch} must be a multiple of the network's total stride {div} "
                             "on every axis")
    conv_key = "n_conv_per_stage" if "n_conv_per_stage" in arch else "n_blocks_per_stage"
    arch.update({
        "n_stages": n_stages,
        "features_per_stage": [min(base_features * 2 ** i, max_features) for i in range(n_stages)],
        "kernel_sizes": kernels,
        "strides": strides,
        conv_key: [n_conv_per_stage] * n_stages,
        "n_conv_per_stage_decoder": [n_conv_per_stage] * (n_stages - 1),
    })
    src.update({"patch_size": patch, "batch_size": int(batch_size),
                "data_identifier": f"{plans_name}_{configuration}"})
    src.pop("next_stage", None)
    src.pop("previous_stage", None)
    plans = copy.deepcopy(base_plans)
    plans["plans_name"] = plans_name
    plans["configurations"] = {configuration: src}
    plans["calibu_derived_from"] = {"plans_name": base_plans.get("plans_name"), "configuration": configuration}
    return plans


@dataclass(frozen=True)
class PreparedDataset:
    """A dataset planned and preprocessed for one small plan: what training needs to know."""

    dataset_name: str
    dataset_id: int
    raw_root: Path
    preprocessed_root: Path
    plans_name: str
    configuration: str

    @property
    def preprocessed_folder(self) -> Path:
        return self.preprocessed_root / self.dataset_name

    @property
    def plans_file(self) -> Path:
        return self.preprocessed_folder / f"{self.plans_name}.json"

    @property
    def raw_folder(self) -> Path:
        return self.raw_root / self.dataset_name


def _case_ids(raw_folder: Path, file_ending: str) -> list[str]:
    return sorted(p.name[: -len(file_ending)] for p in (raw_folder / "labelsTr").glob(f"*{file_ending}"))


def _preprocessing_record(plans: dict, configuration: str, dataset_json: dict, cases: list[str]) -> dict:
    blob = json.dumps({"c": plans["configurations"][configuration], "d": dataset_json,
                       "t": plans.get("transpose_forward"), "cases": cases}, sort_keys=True)
    return {"plans_name": plans["plans_name"], "configuration": configuration, "n_cases": len(cases),
            "sha256": hashlib.sha256(blob.encode()).hexdigest()}


def prepare_small_plan(dataset_folder: str | os.PathLike, preprocessed_root: str | os.PathLike,
                       plans_name: str = TINY_PLANS_NAME, configuration: str = "3d_fullres",
                       num_processes: int = 2, **small_plan_kwargs) -> PreparedDataset:
    """Fingerprint + plan with nnU-Net (skipped when done), derive and write the small plan,
    preprocess it with nnU-Net (skipped when a record shows the same plan, data and cases).

    ``small_plan_kwargs`` go to ``derive_small_plan`` (n_stages, base_features, max_features,
    patch_size, batch_size). The raw dataset is only read.
    """
    raw_root, name, dataset_id = parse_dataset_folder(dataset_folder)
    preprocessed_root = Path(preprocessed_root)
    out = PreparedDataset(name, dataset_id, raw_root.resolve(), preprocessed_root.resolve(), plans_name, configuration)
    if num_processes < 1:
        raise InputError(f"num_processes must be >= 1, got {num_processes}")
    with nnunet_paths(raw=raw_root, preprocessed=preprocessed_root, unset_others=True):
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset)

        folder = out.preprocessed_folder
        if not (folder / "dataset_fingerprint.json").is_file():
            log.info("extracting nnU-Net dataset fingerprint of %s", name)
            extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=True,
                                        clean=True, verbose=False, show_progress_bar=False)
        base_file = folder / f"{BASE_PLANS_NAME}.json"
        if not base_file.is_file() or not (folder / "dataset.json").is_file():
            log.info("planning %s with nnU-Net's ExperimentPlanner", name)
            plan_experiment_dataset(dataset_id, ExperimentPlanner)
        base = json.loads(base_file.read_text())
        small = derive_small_plan(base, plans_name, configuration, **small_plan_kwargs)
        if not out.plans_file.is_file() or json.loads(out.plans_file.read_text()) != json.loads(json.dumps(small)):
            write_json(out.plans_file, small)

        dataset_json = json.loads((folder / "dataset.json").read_text())
        cases = _case_ids(out.raw_folder, dataset_json.get("file_ending", ".nii.gz"))
        record = _preprocessing_record(small, configuration, dataset_json, cases)
        done_file = folder / (small["configurations"][configuration]["data_identifier"] + DONE_SUFFIX)
        data_dir = folder / small["configurations"][configuration]["data_identifier"]
        if _record_matches(done_file, record) and data_dir.is_dir():
            log.info("preprocessed data for %s / %s is complete; reusing it", name, plans_name)
            return out
        done_file.unlink(missing_ok=True)
        log.info("preprocessing %s for %s (%s)", name, plans_name, configuration)
        preprocess_dataset(dataset_id, plans_name, (configuration,), [num_processes], verbose=False,
                           show_progress_bar=False)
        write_json(done_file, record)
    return out


def _record_matches(path: Path, record: dict) -> bool:
    try:
        return json.loads(path.read_text()) == record
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def is_prepared(prepared: PreparedDataset) -> bool:
    """True when the small plan's preprocessing record exists (the data was completely written)."""
    try:
        plans = json.loads(prepared.plans_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    ident = plans["configurations"][prepared.configuration]["data_identifier"]
    return (prepared.preprocessed_folder / (ident + DONE_SUFFIX)).is_file()
