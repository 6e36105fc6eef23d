"""Where a trained nnU-Net v2 model lives under ``nnUNet_results``, from nnU-Net's own vocabulary.

``nnUNetv2_predict -d DATASET -c CONFIGURATION -tr TRAINER -p PLANS`` finds its model folder as
``$nnUNet_results/<DatasetXXX_Name>/<TRAINER>__<PLANS>__<CONFIGURATION>``. The dataset is given
either as its folder name (anything starting with ``Dataset``, taken as it is) or as its numeric id,
which names the one folder ``DatasetXXX_*`` (id zero-padded to three digits) found under any of
``nnUNet_preprocessed``, ``nnUNet_raw`` and ``nnUNet_results`` (the three environment variables
nnU-Net reads; unset ones are not searched). ``resolve_model_folder`` does the same here, without
importing nnU-Net (whose path module reads the environment once, at import), and every error names
the folders it looked in.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelFolderError

DEFAULT_TRAINER = "nnUNetTrainer"
DEFAULT_PLANS = "nnUNetPlans"
#: nnU-Net's environment variables, in the order nnU-Net searches them for a dataset id
ENV_ROOTS = ("nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results")


def _env_path(var: str, env) -> Path | None:
    value = (env if env is not None else os.environ).get(var)
    return Path(value).expanduser() if value else None


def dataset_folder_name(dataset: str | int, env=None) -> str:
    """``DatasetXXX_Name`` for a dataset name or id, as ``nnUNetv2_predict -d`` resolves it.

    ``env``: the environment to read (default ``os.environ``). ModelFolderError when the id is
    not a number, matches no folder or more than one."""
    text = str(dataset).strip()
    if text.startswith("Dataset"):
        return text
    try:
        did = int(text)
    except ValueError:
        raise ModelFolderError(f"-d {text!r}: give a dataset id (e.g. 501) or a dataset folder name starting with "
                               "'Dataset' (e.g. Dataset501_HeadNeck), as nnUNetv2_predict takes them") from None
    if did < 0:
        raise ModelFolderError(f"-d {text}: a dataset id is a whole number >= 0")
    prefix = f"Dataset{did:03d}_"
    looked, found = [], set()
    for var in ENV_ROOTS:
        root = _env_path(var, env)
        if root is None:
            looked.append(f"${var} (not set)")
            continue
        looked.append(f"${var}={root}")
        if root.is_dir():
            found.update(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    if not found:
        raise ModelFolderError(f"no dataset with id {did} ({prefix}*) in {'; '.join(looked)}. Set nnUNet_results to the "
                               "folder nnU-Net trained into, or pass the model folder itself with -m MODEL_DIR")
    if len(found) > 1:
        raise ModelFolderError(f"dataset id {did} names {len(found)} different folders ({', '.join(sorted(found))}) in "
                               f"{'; '.join(looked)}; pass the full name with -d (e.g. -d {sorted(found)[0]})")
    return found.pop()


def model_folder_name(trainer: str, plans: str, configuration: str) -> str:
    """``<trainer>__<plans>__<configuration>``, nnU-Net's name of a trained model folder."""
    return f"{trainer}__{plans}__{configuration}"


def resolve_model_folder(dataset: str | int, configuration: str | None, trainer: str | None = None,
                         plans: str | None = None, env=None) -> Path:
    """The model folder ``$nnUNet_results/<DatasetXXX_Name>/<trainer>__<plans>__<configuration>``.

    ``trainer`` / ``plans`` default to nnU-Net's (``nnUNetTrainer``, ``nnUNetPlans``);
    ``configuration`` is required, as for ``nnUNetv2_predict``. ModelFolderError naming the path
    looked at (and the model folders that do exist for the dataset) when it is not there."""
    trainer = trainer or DEFAULT_TRAINER
    plans = plans or DEFAULT_PLANS
    results = _env_path("nnUNet_results", env)
    if results is None:
        raise ModelFolderError("-d needs the environment variable nnUNet_results (the folder nnU-Net trained into, "
                               "holding DatasetXXX_Name/<trainer>__<plans>__<configuration>/), as nnUNetv2_predict "
                               "does; set it (export nnUNet_results=/path/to/nnUNet_results) or pass the model "
                               "folder itself with -m MODEL_DIR")
    name = dataset_folder_name(dataset, env)
    dataset_dir = results / name
    existing = sorted(p.name for p in dataset_dir.iterdir() if p.is_dir() and p.name.count("__") == 2) \
        if dataset_dir.is_dir() else []
    if not configuration:
        hint = f" (trained here: {', '.join(existing)})" if existing else ""
        raise ModelFolderError(f"-d {dataset} needs -c CONFIGURATION (e.g. 3d_fullres), as nnUNetv2_predict does{hint}")
    folder = dataset_dir / model_folder_name(trainer, plans, configuration)
    if not folder.is_dir():
        if not dataset_dir.is_dir():
            where = f"{dataset_dir} does not exist (nnUNet_results={results})"
        elif existing:
            where = f"the dataset folder holds {', '.join(existing)}: choose them with -tr TRAINER -p PLANS -c CONFIG"
        else:
            where = f"{dataset_dir} holds no trained model folder <trainer>__<plans>__<configuration>"
        raise ModelFolderError(f"no trained model at {folder}; {where}")
    return folder
