"""The project's own training entry: run this project's nnU-Net trainers without nnU-Net's discovery.

``nnUNetv2_train -tr NAME`` looks trainers up by name inside the installed ``nnunetv2`` package
(and crashes on this CPU setup before it would reach ``nnUNet_extTrainer``), so this module
instantiates ``CalibuTinyTrainer`` / ``CalibuSnapshotTrainer`` itself, the way nnU-Net's
``run_training`` does (plans dict with ``continue_training`` set, ``dataset.json`` from the
preprocessed folder), and calls ``run_training()``. It writes nnU-Net's standard model folder::

    <results>/<DatasetXXX_Name>/<Trainer>__<Plans>__<Config>/
        plans.json  dataset.json  dataset_fingerprint.json
        fold_<k>/checkpoint_final.pth [checkpoint_snapshot_<c>.pth ...] calibu_training.json

which ``nnUNetPredictor.initialize_from_trained_model_folder`` and the project's ModelFolder
load (checkpoints name ``nnUNetTrainer`` as their trainer, see ``snapshot_trainer``).
``calibu_training.json`` is written last: a fold folder without it (or with other settings) is
incomplete and is trained again from scratch; a complete one is reused.

CPU threads: ``num_threads``, else ``$CALIBU_TORCH_THREADS``, else (training on the CPU) half the
logical CPUs, at least one. Oversubscribed OpenMP threads are very slow for these small networks:
measured on two shared cores, 2.4 s vs 10 s per iteration (1 vs 2 threads, four jobs running),
and the test fixture trained in 49 s with one thread vs 137 s with two at a load of about 2.5.

Data augmentation runs in the main process (``nnUNet_n_proc_DA=0``: no worker processes, which
on two cores is faster and reproducible) and ``torch.compile`` is off unless ``nnUNet_compile``
is set. nnU-Net's final validation (a spawn pool over the validation cases) is not run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..device import resolve_device
from ..errors import InputError, ModelFolderError
from ..io.atomic import write_json
from ..progress import emit_progress
from .small_plan import PreparedDataset, nnunet_paths
from .snapshot_trainer import FINAL_CHECKPOINT, SNAPSHOT, TINY, get_trainer_class, snapshot_name

log = logging.getLogger(__name__)

FOLD_RECORD = "calibu_training.json"


@dataclass(frozen=True)
class TrainingConfig:
    """Length and schedule of one fold's run (see ``snapshot_trainer`` for the LR formulas).

    ``cycles`` only matters for the snapshot trainer (one snapshot per cycle; ``num_epochs``
    must be a multiple of it); the tiny trainer always runs one poly-decay cycle.
    """

    trainer: str = SNAPSHOT
    num_epochs: int = 9
    iterations_per_epoch: int = 25
    cycles: int = 3
    initial_lr: float = 3e-3
    min_lr: float | None = None
    val_iterations: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.trainer not in (TINY, SNAPSHOT):
            raise InputError(f"unknown trainer {self.trainer!r}; choose {TINY} or {SNAPSHOT}")
        if self.trainer == TINY and self.cycles != 1:
            object.__setattr__(self, "cycles", 1)
        if self.num_epochs < 1 or self.iterations_per_epoch < 1 or self.val_iterations < 1:
            raise InputError("num_epochs, iterations_per_epoch and val_iterations must be >= 1")
        if self.cycles < 1 or self.num_epochs % self.cycles:
            raise InputError(f"num_epochs ({self.num_epochs}) must be a positive multiple of cycles ({self.cycles})")
        if not self.initial_lr > 0:
            raise InputError(f"initial_lr must be > 0, got {self.initial_lr}")

    def record(self) -> dict:
        return asdict(self)

    def checkpoint_names(self) -> list[str]:
        """Files a complete fold folder holds for this configuration."""
        names = [FINAL_CHECKPOINT]
        if self.trainer == SNAPSHOT and self.cycles > 1:  # one cycle: no snapshot (it would be the final)
            names += [snapshot_name(c) for c in range(self.cycles)]
        return names


def model_folder_path(results_root: str | os.PathLike, dataset_name: str, trainer: str, plans_name: str,
                      configuration: str) -> Path:
    """nnU-Net's model folder: ``<results>/<dataset>/<trainer>__<plans>__<configuration>``."""
    return Path(results_root) / dataset_name / f"{trainer}__{plans_name}__{configuration}"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def fold_is_complete(fold_dir: str | os.PathLike, config: TrainingConfig) -> bool:
    """True when ``fold_dir`` holds every checkpoint of ``config`` (and no other snapshot) and its
    record matches it."""
    fold_dir = Path(fold_dir)
    rec = _read_json(fold_dir / FOLD_RECORD)
    if not rec or rec.get("config") != json.loads(json.dumps(config.record())):
        return False
    base = fold_dir.parent
    names = config.checkpoint_names()
    snapshots = {p.name for p in fold_dir.glob("checkpoint_snapshot_*.pth")}
    if snapshots != {n for n in names if n.startswith("checkpoint_snapshot_")}:
        return False  # stale or missing snapshots would make a wrong checkpoint ensemble
    return all((fold_dir / n).is_file() for n in names) and \
        (base / "plans.json").is_file() and (base / "dataset.json").is_file()


def model_is_complete(model_dir: str | os.PathLike, folds, config: TrainingConfig) -> bool:
    return all(fold_is_complete(Path(model_dir) / f"fold_{f}", config) for f in folds)


@contextlib.contextmanager
def _training_env():
    """nnUNet_n_proc_DA=0 (augment in-process) and compile off unless the user chose otherwise."""
    saved = {k: os.environ.get(k) for k in ("nnUNet_n_proc_DA", "nnUNet_compile")}
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ.setdefault("nnUNet_compile", "false")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _torch_threads(num_threads: int | None, device_type: str = "cpu"):
    """Use ``num_threads`` (or $CALIBU_TORCH_THREADS, or on the CPU half the logical CPUs) torch
    threads inside the block."""
    if num_threads is None and os.environ.get("CALIBU_TORCH_THREADS"):
        try:
            num_threads = int(os.environ["CALIBU_TORCH_THREADS"])
        except ValueError:
            raise InputError("CALIBU_TORCH_THREADS must be a whole number, got "
                             f"{os.environ['CALIBU_TORCH_THREADS']!r}") from None
    if num_threads is None and device_type == "cpu":
        num_threads = max(1, (os.cpu_count() or 2) // 2)
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise InputError(f"num_threads must be >= 1, got {num_threads}")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_fold(prepared: PreparedDataset, results_root: str | os.PathLike, fold: int | str,
               config: TrainingConfig = TrainingConfig(), device: str = "auto", overwrite: bool = False,
               progress: bool = True, member: int = 0, n_members: int = 1, num_threads: int | None = None) -> Path:
    """Train one fold (an int of nnU-Net's 5-fold split, or "all") and return its fold folder.

    Reuses a complete fold trained with the same ``config``. A complete fold trained with other
    settings raises InputError unless ``overwrite``; an incomplete one (a crashed run) is
    removed and trained again. ``member``/``n_members`` place this fold in the overall
    progress (``stage="training"`` lines on stderr).
    """
    if fold != "all":
        try:
            fold = int(fold)
        except (TypeError, ValueError):
            raise InputError(f"fold must be an integer or 'all', got {fold!r}") from None
        if fold < 0:
            raise InputError(f"fold must be >= 0, got {fold}")
    if not prepared.plans_file.is_file():
        raise ModelFolderError(f"plans file {prepared.plans_file} is missing: plan and preprocess the dataset first "
                               "(CalibUncertaintyLib.nnunet.small_plan.prepare_small_plan)")
    model_dir = model_folder_path(results_root, prepared.dataset_name, config.trainer, prepared.plans_name,
                                  prepared.configuration)
    fold_dir = model_dir / f"fold_{fold}"
    if fold_is_complete(fold_dir, config):
        log.info("%s is complete; reusing it", fold_dir)
        if progress:
            emit_progress("training", (member + 1) / n_members, member=member + 1, n_members=n_members,
                          message=f"fold {fold} reused")
        return fold_dir
    if fold_dir.exists():
        old = _read_json(fold_dir / FOLD_RECORD)
        same = old is not None and old.get("config") == json.loads(json.dumps(config.record()))
        if old is not None and not same and not overwrite:
            raise InputError(f"{fold_dir} was trained with other settings ({old.get('config')}); pass "
                             "overwrite=True (--overwrite) to replace it or choose another results folder")
        log.info("removing incomplete or replaced fold folder %s", fold_dir)
        shutil.rmtree(fold_dir)

    plans = json.loads(prepared.plans_file.read_text())
    dataset_json = json.loads((prepared.preprocessed_folder / "dataset.json").read_text())
    if prepared.configuration not in plans.get("configurations", {}):
        raise InputError(f"configuration {prepared.configuration!r} is not in {prepared.plans_file.name}")

    def on_epoch(done, total, trainer):
        if progress:
            emit_progress("training", (member + done / total) / n_members, member=member + 1,
                          n_members=n_members, message=f"fold {fold} epoch {done}/{total}")

    t0 = time.time()
    dev = resolve_device(device)
    with nnunet_paths(raw=prepared.raw_root, preprocessed=prepared.preprocessed_root, results=results_root), \
            _training_env(), _torch_threads(num_threads, dev.type):
        trainer_cls = get_trainer_class(config.trainer)
        plans["continue_training"] = False  # popped by nnUNetTrainer.__init__ (run_training sets it)
        trainer = trainer_cls(plans=plans, configuration=prepared.configuration, fold=fold,
                              dataset_json=dataset_json, device=dev)
        trainer.configure(config.num_epochs, config.iterations_per_epoch, config.initial_lr, config.min_lr,
                          config.val_iterations, config.cycles, config.seed)
        trainer.progress_callback = on_epoch
        if progress:
            emit_progress("training", member / n_members, member=member + 1, n_members=n_members,
                          message=f"fold {fold}: {config.trainer}, {config.num_epochs} epochs x "
                                  f"{config.iterations_per_epoch} iterations on {dev.type}")
        trainer.run_training()
        logger = trainer.logger
        summary = {
            "config": config.record(),
            "trainer_class": type(trainer).__name__,
            "checkpoint_trainer_name": "nnUNetTrainer",
            "dataset": prepared.dataset_name, "plans": prepared.plans_name,
            "configuration": prepared.configuration, "fold": fold, "device": str(dev),
            "seconds": round(time.time() - t0, 1),
            "final_train_loss": float(logger.get_value("train_losses", step=-1)),
            "final_val_loss": float(logger.get_value("val_losses", step=-1)),
            "final_pseudo_dice": [float(v) for v in logger.get_value("dice_per_class_or_region", step=-1)],
            "checkpoints": config.checkpoint_names(),
        }
        missing = [n for n in config.checkpoint_names() if not (fold_dir / n).is_file()]
        if missing:
            raise ModelFolderError(f"training of {fold_dir} ended without writing {', '.join(missing)}")
        write_json(fold_dir / FOLD_RECORD, summary)
    log.info("trained %s in %.0f s (pseudo Dice %s)", fold_dir, summary["seconds"], summary["final_pseudo_dice"])
    return fold_dir


def train_folds(prepared: PreparedDataset, results_root: str | os.PathLike, folds=(0, 1, 2, 3, 4),
                config: TrainingConfig = TrainingConfig(), device: str = "auto", overwrite: bool = False,
                progress: bool = True, num_threads: int | None = None) -> Path:
    """Train several folds (one ensemble member each) into one model folder; returns the folder."""
    folds = list(folds)
    if not folds:
        raise InputError("no folds to train")
    for i, f in enumerate(folds):
        train_fold(prepared, results_root, f, config, device, overwrite, progress, member=i, n_members=len(folds),
                   num_threads=num_threads)
    return model_folder_path(results_root, prepared.dataset_name, config.trainer, prepared.plans_name,
                             prepared.configuration)
