"""Session fixtures that build a tiny but REAL trained nnU-Net model on a phantom dataset.

``tiny_prepared_dataset`` and ``tiny_trained_model`` (session scope). The first writes a small
phantom dataset (6 training + 2 held-out cases, 32 x 48 x 48 voxels), plans and preprocesses it
with nnU-Net and derives the small plan; the second trains two folds with
``CalibuSnapshotTrainer`` on the CPU (fold 0: 2 LR cycles, so two snapshots; fold 1: one cycle,
a shorter run, so only checkpoint_final.pth). It checks that fold 0 learned something (Dice
of the vessel class > 0.3 on a training case, predicted with nnUNetPredictor) and fails loudly
otherwise. Everything lies under ``$CALIBU_TEST_CACHE/tiny_trained_model`` when that variable is
set (reused across sessions: every step skips when its complete output exists) or in a pytest
temporary folder. A file lock keeps two sessions from building the same cache at once.

Use it as::

    def test_something(tiny_trained_model):
        m = tiny_trained_model
        m.model_dir          # <Trainer>__<Plans>__<Config> folder: plans.json, dataset.json, fold_0/, fold_1/
        m.folds              # (0, 1): checkpoint_final.pth in each
        m.snapshots          # fold_0 snapshot checkpoint paths (cycle order); fold_1 has none
        m.images_dir, m.labels_dir, m.test_cases   # held-out raw cases (imagesTs / labelsTs)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

__all__ = ["TinyTrainedModel", "tiny_prepared_dataset", "tiny_trained_model"]

FIXTURE_SPEC_KW = dict(shape_zyx=(32, 48, 48), spacing=(1.5, 1.5, 3.0), vessel_radius_mm=(3.5, 5.0),
                       node_radius_mm=(6.0, 10.0))
DATASET_ID, DATASET_NAME = 992, "CalibTinyPhantom"
LEARNED_MIN_DICE = 0.3


@dataclass(frozen=True)
class TinyTrainedModel:
    root: Path
    model_dir: Path
    dataset: object  # CalibUncertaintyLib.synthetic.phantom.PhantomDataset
    folds: tuple = (0, 1)
    snapshot_fold: int = 0
    snapshots: tuple = ()
    cycles: int = 2
    learned_dice: dict = field(default_factory=dict)

    @property
    def images_dir(self) -> Path:
        return self.dataset.folder / "imagesTs"

    @property
    def labels_dir(self) -> Path:
        return self.dataset.folder / "labelsTs"

    @property
    def test_cases(self) -> tuple:
        return self.dataset.test_cases

    @property
    def train_cases(self) -> tuple:
        return self.dataset.train_cases

    def checkpoint(self, fold: int, name: str = "checkpoint_final.pth") -> Path:
        return self.model_dir / f"fold_{fold}" / name


def fixture_training_configs():
    """(fold 0 config, fold 1 config): what the fixture trains (also used by the tests that pin it)."""
    from CalibUncertaintyLib.nnunet.training import TrainingConfig

    fold0 = TrainingConfig(trainer="CalibuSnapshotTrainer", num_epochs=8, iterations_per_epoch=10, cycles=2,
                           initial_lr=1e-2, val_iterations=1, seed=0)
    fold1 = TrainingConfig(trainer="CalibuSnapshotTrainer", num_epochs=6, iterations_per_epoch=10, cycles=1,
                           initial_lr=1e-2, val_iterations=1, seed=1)
    return fold0, fold1


def predict_labels(model_dir: Path, fold, checkpoint_name: str, image_path: Path) -> np.ndarray:
    """Argmax segmentation (z, y, x) of one raw image with nnU-Net's own predictor (no mirroring)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from CalibUncertaintyLib.io.images import read_image

    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,),
                                                   checkpoint_name=checkpoint_name)
    img, geom = read_image(image_path)
    return predictor.predict_single_npy_array(img[None].astype(np.float32),
                                              {"spacing": list(geom.spacing_zyx)}, None, None, False)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tiny_prepared_dataset(root: Path):
    """(phantom dataset, PreparedDataset): the raw phantom and its preprocessed small plan under ``root``."""
    from CalibUncertaintyLib.nnunet.small_plan import prepare_small_plan
    from CalibUncertaintyLib.synthetic.phantom import PhantomSpec, write_phantom_dataset

    with _locked(root):
        ds = write_phantom_dataset(root / "raw", DATASET_ID, DATASET_NAME, n_train=6, n_test=2, seed=7,
                                   spec=PhantomSpec(**FIXTURE_SPEC_KW))
        prepared = prepare_small_plan(ds.folder, root / "preprocessed", max_features=32)
    return ds, prepared


def build_tiny_trained_model(root: Path, ds, prepared) -> TinyTrainedModel:
    """Train (or reuse) the 2-fold model under ``root``/results and check that it learned."""
    from CalibUncertaintyLib.io.images import read_image
    from CalibUncertaintyLib.nnunet.snapshot_trainer import snapshot_name
    from CalibUncertaintyLib.nnunet.training import train_fold

    fold0, fold1 = fixture_training_configs()
    with _locked(root):
        # overwrite: a cached fold trained with older fixture settings is retrained, not refused
        fold_dir = train_fold(prepared, root / "results", 0, fold0, device="cpu", progress=False, overwrite=True)
        train_fold(prepared, root / "results", 1, fold1, device="cpu", progress=False, overwrite=True)
    model_dir = fold_dir.parent
    case = ds.train_cases[0]
    seg = predict_labels(model_dir, 0, "checkpoint_final.pth", ds.image(case))
    ref, _ = read_image(ds.label(case))
    learned = {name: dice(seg == c, ref == c) for c, name in ((1, "node"), (2, "vessel"))}
    if max(learned.values()) <= LEARNED_MIN_DICE:
        raise AssertionError(f"the tiny fixture model did not learn: Dice on {case} = {learned} "
                             f"(need > {LEARNED_MIN_DICE} for one class)")
    snaps = tuple(fold_dir / snapshot_name(c) for c in range(fold0.cycles))
    return TinyTrainedModel(root, model_dir, ds, (0, 1), 0, snaps, fold0.cycles, learned)


def _cache_root(tmp_path_factory) -> Path:
    cache = os.environ.get("CALIBU_TEST_CACHE")
    if cache:
        return Path(cache) / "tiny_trained_model"
    from shared_builds import shared_root  # one build per run, also on several pytest-xdist workers (under _locked)

    return shared_root(tmp_path_factory) / "tiny_trained_model"


@pytest.fixture(scope="session")
def tiny_prepared_dataset(tmp_path_factory):
    """(PhantomDataset, PreparedDataset): phantom planned by nnU-Net + small plan, preprocessed."""
    return build_tiny_prepared_dataset(_cache_root(tmp_path_factory))


@pytest.fixture(scope="session")
def tiny_trained_model(tmp_path_factory, tiny_prepared_dataset) -> TinyTrainedModel:
    """The 2-fold tiny model trained on the phantom (see the module docstring)."""
    ds, prepared = tiny_prepared_dataset
    return build_tiny_trained_model(_cache_root(tmp_path_factory), ds, prepared)
