"""nnU-Net trainers for short runs: Adam + poly ("tiny") and Adam + cyclical cosine LR with snapshots.

Two subclasses of ``nnunetv2``'s ``nnUNetTrainer`` (same constructor, same network, data
pipeline, loss and checkpoint format; only the optimiser, the learning-rate schedule and the
checkpoints written differ):

- ``CalibuTinyTrainer``: Adam, learning rate ``lr(t) = lr0 * (1 - t / T) ** 0.9`` per
  iteration t of T. One model per fold: the members of a *deep ensemble* (one per fold).
- ``CalibuSnapshotTrainer``: Adam with a cyclical cosine schedule with warm restarts
  (SGDR, Loshchilov & Hutter 2017; snapshot ensembles, Huang et al. 2017): the run is split into
  C equal cycles of L iterations and, at iteration t,
  ``lr(t) = lr_min + (lr0 - lr_min) * (1 + cos(pi * (t mod L) / L)) / 2``;
  at the end of cycle c (0-based) it saves ``checkpoint_snapshot_<c>.pth``. The C snapshots of
  one run form a *checkpoint ensemble*; ``checkpoint_final.pth`` is the last one. A run of one
  cycle saves no snapshot (its only one would be ``checkpoint_final.pth``).

Why Adam: nnU-Net's SGD (lr 0.01, momentum 0.99, poly over 1000 epochs) learns nothing in a
few hundred CPU iterations (docs/PLATFORM.md); Adam at ~3e-3 does.

Checkpoints follow nnU-Net's format (``network_weights``, ``init_args``, ``trainer_name``,
``inference_allowed_mirroring_axes``, ...) so ``nnUNetPredictor`` loads them. Their
``trainer_name`` is recorded as ``"nnUNetTrainer"``: nnU-Net's loader looks the trainer class up
by name inside the installed ``nnunetv2`` package only, and at inference it needs nothing from
the class but ``build_network_architecture``, which these trainers inherit unchanged, so the
network built is identical. The real class, the schedule and the LR of every iteration so far
(``lr_history``) are kept under the ``"calibu"`` key.
Checkpoints are written to a temporary name and renamed, so none is ever half-written.

``torch`` and ``nnunetv2`` are imported only when ``trainer_classes()`` is first called.
"""

from __future__ import annotations

import functools
import math
import re

from ..errors import InputError

SNAPSHOT_PATTERN = re.compile(r"^checkpoint_snapshot_(\d+)\.pth$")
FINAL_CHECKPOINT = "checkpoint_final.pth"
LOADER_TRAINER_NAME = "nnUNetTrainer"  # what the checkpoints say, so that nnUNetPredictor finds a class
TINY = "CalibuTinyTrainer"
SNAPSHOT = "CalibuSnapshotTrainer"


def snapshot_name(cycle: int) -> str:
    """File name of the snapshot saved at the end of cycle ``cycle`` (0-based)."""
    return f"checkpoint_snapshot_{int(cycle)}.pth"


def poly_lr(iteration: int, total_iterations: int, lr0: float, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay, per iteration: ``lr0 * (1 - t / T) ** exponent``."""
    t = min(max(int(iteration), 0), int(total_iterations))
    return float(lr0) * (1.0 - t / float(total_iterations)) ** exponent


def cyclic_cosine_lr(iteration: int, iterations_per_cycle: int, lr0: float, lr_min: float = 0.0) -> float:
    """Cosine annealing with warm restarts: ``lr_min + (lr0 - lr_min)(1 + cos(pi (t mod L)/L))/2``.

    Equals ``lr0`` at the first iteration of every cycle (the restart) and approaches ``lr_min``
    at its last one.
    """
    if iterations_per_cycle < 1:
        raise InputError(f"iterations_per_cycle must be >= 1, got {iterations_per_cycle}")
    phase = (int(iteration) % int(iterations_per_cycle)) / float(iterations_per_cycle)
    return float(lr_min) + (float(lr0) - float(lr_min)) * 0.5 * (1.0 + math.cos(math.pi * phase))


@functools.lru_cache(maxsize=None)
def trainer_classes() -> dict:
    """{name: class} of this project's trainers (built on first call: imports torch and nnunetv2)."""
    import random

    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch._dynamo import OptimizedModule

    from ..io.atomic import atomic_path

    class _IterationLR:
        """Stands in for nnU-Net's per-epoch scheduler; the trainer sets the LR every iteration."""

        def __init__(self, trainer):
            self.trainer = trainer

        def step(self, epoch=None):
            it = (self.trainer.current_epoch if epoch is None else int(epoch)) * self.trainer.num_iterations_per_epoch
            self.trainer._set_lr(self.trainer.lr_at(it))

        def state_dict(self):
            return {}

    class CalibuTinyTrainer(nnUNetTrainer):
        """Adam + per-iteration poly decay; short runs (defaults: 8 epochs x 25 iterations, lr 3e-3)."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.initial_lr = 3e-3
            self.min_lr = 3e-5
            self.num_epochs = 8
            self.num_iterations_per_epoch = 25
            self.num_val_iterations_per_epoch = 2
            self.n_cycles = 1
            self.seed = 0
            self.save_every = 10 ** 9  # no checkpoint_latest during these short runs
            self.lr_history: list[float] = []  # the LR used at each training iteration
            self.progress_callback = None  # f(epochs_done, num_epochs, trainer) after every epoch
            self._iteration = 0
            plot = self.logger.plot_progress_png

            def plot_at_end_only(folder):  # matplotlib every epoch costs more than a tiny epoch
                if self.current_epoch >= self.num_epochs - 1:
                    plot(folder)

            self.logger.plot_progress_png = plot_at_end_only

        # --- configuration -------------------------------------------------------------
        def configure(self, num_epochs: int, iterations_per_epoch: int, initial_lr: float = 3e-3,
                      min_lr: float | None = None, val_iterations: int = 2, cycles: int = 1, seed: int = 0):
            """Set the run's length and schedule; call before training starts."""
            if self.was_initialized:
                raise RuntimeError("configure() must be called before the trainer is initialised")
            if num_epochs < 1 or iterations_per_epoch < 1 or val_iterations < 1:
                raise InputError("num_epochs, iterations_per_epoch and val_iterations must all be >= 1 "
                                 f"(got {num_epochs}, {iterations_per_epoch}, {val_iterations})")
            if not initial_lr > 0:
                raise InputError(f"initial_lr must be > 0, got {initial_lr}")
            if cycles < 1 or num_epochs % cycles:
                raise InputError(f"num_epochs ({num_epochs}) must be a positive multiple of cycles ({cycles})")
            self.num_epochs = int(num_epochs)
            self.num_iterations_per_epoch = int(iterations_per_epoch)
            self.num_val_iterations_per_epoch = int(val_iterations)
            self.initial_lr = float(initial_lr)
            self.min_lr = float(initial_lr) * 0.01 if min_lr is None else float(min_lr)
            self.n_cycles = int(cycles)
            self.seed = int(seed)

        @property
        def total_iterations(self) -> int:
            return self.num_epochs * self.num_iterations_per_epoch

        def lr_at(self, iteration: int) -> float:
            return poly_lr(iteration, self.total_iterations, self.initial_lr)

        def _set_lr(self, lr: float) -> None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

        # --- nnU-Net hooks -------------------------------------------------------------
        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr,
                                         weight_decay=self.weight_decay)
            return optimizer, _IterationLR(self)

        def on_train_start(self):
            fold_offset = self.fold if isinstance(self.fold, int) else 0
            seed = self.seed * 1000 + fold_offset
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            self._iteration = self.current_epoch * self.num_iterations_per_epoch
            super().on_train_start()

        def train_step(self, batch: dict) -> dict:
            lr = self.lr_at(self._iteration)
            self._set_lr(lr)
            self.lr_history.append(lr)
            out = super().train_step(batch)
            self._iteration += 1
            return out

        def on_epoch_end(self):
            super().on_epoch_end()  # increments current_epoch
            if self.progress_callback is not None:
                self.progress_callback(self.current_epoch, self.num_epochs, self)

        def calibu_record(self) -> dict:
            """What the checkpoints and calibu_training.json record about the run."""
            return {"trainer": type(self).__name__, "optimizer": "Adam", "schedule": "poly",
                    "initial_lr": self.initial_lr,
                    "min_lr": self.min_lr, "num_epochs": self.num_epochs,
                    "iterations_per_epoch": self.num_iterations_per_epoch, "cycles": self.n_cycles,
                    "seed": self.seed}

        def save_checkpoint(self, filename: str) -> None:
            """nnU-Net's checkpoint dict (so nnUNetPredictor loads it), written atomically."""
            if self.local_rank != 0:
                return
            if self.disable_checkpointing:
                self.print_to_log_file("No checkpoint written, checkpointing is disabled")
                return
            mod = self.network.module if self.is_ddp else self.network
            if isinstance(mod, OptimizedModule):
                mod = mod._orig_mod
            checkpoint = {
                "network_weights": mod.state_dict(),
                "optimizer_state": self.optimizer.state_dict(),
                "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                "logging": self.logger.get_checkpoint(),
                "_best_ema": self._best_ema,
                "current_epoch": self.current_epoch + 1,
                "init_args": self.my_init_kwargs,
                "trainer_name": LOADER_TRAINER_NAME,
                "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
                "calibu": dict(self.calibu_record(), iteration=self._iteration,
                               lr_history=list(self.lr_history)),
            }
            with atomic_path(filename, suffix=".pth") as tmp:
                torch.save(checkpoint, str(tmp))

    class CalibuSnapshotTrainer(CalibuTinyTrainer):
        """Adam + cyclical cosine LR with warm restarts; one snapshot checkpoint per cycle."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.n_cycles = 3
            self.num_epochs = 9
            self.snapshots_saved: list[str] = []

        @property
        def epochs_per_cycle(self) -> int:
            return self.num_epochs // self.n_cycles

        @property
        def iterations_per_cycle(self) -> int:
            return self.epochs_per_cycle * self.num_iterations_per_epoch

        def lr_at(self, iteration: int) -> float:
            return cyclic_cosine_lr(iteration, self.iterations_per_cycle, self.initial_lr, self.min_lr)

        def on_epoch_end(self):
            done = self.current_epoch + 1
            if self.n_cycles > 1 and done % self.epochs_per_cycle == 0:
                cycle = done // self.epochs_per_cycle - 1
                path = f"{self.output_folder}/{snapshot_name(cycle)}"
                self.save_checkpoint(path)
                self.snapshots_saved.append(path)
                self.print_to_log_file(f"end of LR cycle {cycle}: saved {snapshot_name(cycle)}")
            super().on_epoch_end()

        def calibu_record(self) -> dict:
            rec = super().calibu_record()
            rec.update(schedule="cosine_warm_restarts", epochs_per_cycle=self.epochs_per_cycle)
            return rec

    return {TINY: CalibuTinyTrainer, SNAPSHOT: CalibuSnapshotTrainer}


def get_trainer_class(name: str):
    """The trainer class called ``name`` (``CalibuTinyTrainer`` or ``CalibuSnapshotTrainer``)."""
    classes = trainer_classes()
    if name not in classes:
        raise InputError(f"unknown trainer {name!r}; this project trains with {', '.join(classes)}")
    return classes[name]
