"""Open and validate an nnU-Net v2 trained model folder and list the ensemble members it holds.

A trained model folder is what ``nnUNetv2_train`` writes under ``nnUNet_results``::

    <Trainer>__<Plans>__<Configuration>/
        plans.json
        dataset.json
        fold_0/checkpoint_final.pth   fold_0/checkpoint_best.pth
        fold_1/...                    fold_all/...
        fold_0/checkpoint_snapshot_<cycle>.pth   (cyclical-LR snapshots, this project's trainer)

Five kinds of ensemble are built from it (``ModelFolder.members``, the one member-source interface):

- ``"deep"``: one member per fold (each fold trained from its own initialisation), all with the
  same checkpoint name (default ``checkpoint_final.pth``), as ``nnUNetv2_predict -f 0 1 2 3 4``.
- ``"checkpoint"``: the snapshot checkpoints ``checkpoint_snapshot_<cycle>.pth`` of the chosen
  fold(s), one member per snapshot, in cycle order.
- ``"single"``: exactly one checkpoint of one fold (an "ensemble" of one: mutual information 0).
- ``"tta"``: one network, one member per mirroring combination of the axes its checkpoint allows
  (``single_model_members``).
- ``"dropout"``: one network with dropout layers, one member per MC-dropout pass
  (``single_model_members``; refused for a network without dropout).

Opening a folder reads only JSON and file names (no torch), so it is cheap and every problem is
reported before any inference starts; ``"tta"`` members also read the checkpoint's pickled header
(its mirroring axes), still without torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFolderError

ENSEMBLE_KINDS = ("deep", "checkpoint", "single", "tta", "dropout")
#: kinds whose members all come from one network (one checkpoint per fold)
SINGLE_MODEL_KINDS = ("tta", "dropout")
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
SNAPSHOT_PATTERN = re.compile(r"^checkpoint_snapshot_(\d+)\.pth$")
_FOLD_DIR = re.compile(r"^fold_(\d+|all)$")


def snapshot_checkpoint_name(cycle: int) -> str:
    """File name of the snapshot checkpoint saved at the end of cycle ``cycle`` (shared convention
    with the snapshot trainer): ``checkpoint_snapshot_<cycle>.pth``."""
    return f"checkpoint_snapshot_{int(cycle)}.pth"


@dataclass(frozen=True)
class Member:
    """One ensemble member: a fold and one of its checkpoint files; for the single-model kinds
    also ``flip`` (spatial axes every tile is mirrored along, ``()`` = as is) or ``dropout_pass``
    (1-based MC-dropout pass, its masks drawn from ``single_model_members.pass_seed``)."""

    fold: int | str
    checkpoint: Path
    name: str
    flip: tuple | None = None
    dropout_pass: int | None = None

    @property
    def variant(self) -> dict | None:
        """What makes this member differ from its checkpoint's plain prediction (None: nothing)."""
        if self.flip is not None:
            return {"flip": list(self.flip)}
        if self.dropout_pass is not None:
            return {"dropout_pass": int(self.dropout_pass)}
        return None


def _fold_key(fold: int | str):
    return (1, 0) if fold == "all" else (0, int(fold))


def _parse_fold(value) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ModelFolderError(f"fold {value!r} is not a fold number (0, 1, ...) or 'all'") from None


def _fmt_folds(folds) -> str:
    return ",".join(str(f) for f in sorted(folds, key=_fold_key)) or "none"


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{what} {path} could not be read as JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ModelFolderError(f"{what} {path} does not hold a JSON object")
    return obj


class ModelFolder:
    """A validated nnU-Net v2 trained model folder. Use ``ModelFolder.open(path)``."""

    def __init__(self, path: Path, plans: dict, dataset_json: dict, checkpoints: dict,
                 trainer_name: str | None, plans_name: str | None, configuration: str | None):
        self.path = path
        self.plans = plans
        self.dataset_json = dataset_json
        #: fold -> sorted list of checkpoint file names in fold_<k>/
        self.checkpoints = checkpoints
        self.trainer_name = trainer_name
        self.plans_name = plans_name
        #: configuration named by the folder (``3d_fullres``...), None when the folder name does
        #: not follow ``<Trainer>__<Plans>__<Config>`` (the checkpoint then says which one)
        self.configuration = configuration

    # --- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "ModelFolder":
        """Validate ``path`` as an nnU-Net v2 trained model folder.

        Raises ModelFolderError naming everything that is missing (plans.json, dataset.json,
        fold_<k> folders with checkpoint_*.pth files) or malformed.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise ModelFolderError(f"model folder not found: {path}")
        if not path.is_dir():
            raise ModelFolderError(f"{path} is a file; give the nnU-Net trained model folder "
                                   "(<Trainer>__<Plans>__<Configuration>, holding plans.json, dataset.json "
                                   "and fold_<k>/ folders)")
        missing = [n for n in ("plans.json", "dataset.json") if not (path / n).is_file()]
        checkpoints: dict = {}
        for sub in sorted(path.iterdir()):
            m = _FOLD_DIR.match(sub.name)
            if m and sub.is_dir():
                names = sorted(p.name for p in sub.glob("checkpoint_*.pth") if p.is_file())
                if names:
                    checkpoints[_parse_fold(m.group(1))] = names
        if not checkpoints:
            missing.append("fold_<k>/checkpoint_*.pth (no fold folder holds a checkpoint)")
        if missing:
            hint = ""
            children = [p.name for p in path.iterdir() if p.is_dir() and "__" in p.name]
            if children:
                hint = f"; it contains {', '.join(sorted(children)[:4])}: pass one of those instead"
            raise ModelFolderError(f"{path} is not an nnU-Net v2 trained model folder: missing "
                                   f"{', '.join(missing)}{hint}")
        plans = _read_json(path / "plans.json", "plans file")
        dataset_json = _read_json(path / "dataset.json", "dataset file")
        if "configurations" not in plans:
            raise ModelFolderError(f"{path / 'plans.json'} has no 'configurations': not an nnU-Net v2 plans file")
        for key in ("channel_names", "labels"):
            if key not in dataset_json and not (key == "channel_names" and "modality" in dataset_json):
                raise ModelFolderError(f"{path / 'dataset.json'} has no '{key}': not an nnU-Net v2 dataset.json")
        parts = path.name.split("__")
        trainer, plans_name, config = (parts if len(parts) == 3 else (None, None, None))
        if config is not None and config not in plans["configurations"]:
            raise ModelFolderError(f"the folder name says configuration {config!r} but plans.json only has "
                                   f"{', '.join(plans['configurations'])}")
        return cls(path, plans, dataset_json, checkpoints, trainer, plans_name, config)

    # --- facts from the JSON files -------------------------------------------------------
    @property
    def channel_names(self) -> list[str]:
        """Input channel names in channel order (dataset.json ``channel_names``)."""
        ch = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return [str(ch[k]) for k in sorted(ch, key=lambda k: int(k))]

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def class_names(self) -> list[str]:
        """Class names ordered by label value (index = class index of the probabilities).

        A region-based model has no classes (its outputs are one sigmoid per region): ModelFolderError
        (use ``region_names``; such a model runs with ``predict`` only)."""
        labels = self.dataset_json["labels"]
        items = []
        for name, value in labels.items():
            if isinstance(value, (list, tuple)) or self.is_region_based:
                raise ModelFolderError(f"{self.path.name} is a region-based model (dataset.json label {name!r} = "
                                       f"{value}, regions_class_order {self.dataset_json.get('regions_class_order')}): "
                                       "its outputs are one sigmoid per region, not a softmax over classes. It runs "
                                       "with `predict` (maps of independent per-region Bernoullis); softmax "
                                       "calibration (fit-temperature, evaluate, maps) does not apply")
            if name == "ignore":
                continue
            items.append((int(value), str(name)))
        items.sort()
        if [v for v, _ in items] != list(range(len(items))):
            raise ModelFolderError(f"dataset.json labels must be consecutive 0..K-1, got {dict(labels)}")
        return [n for _, n in items]

    @property
    def is_region_based(self) -> bool:
        """True for nnU-Net region-based training (a label given as a list of labels, or
        ``regions_class_order`` in dataset.json): sigmoid outputs, one per region."""
        labels = self.dataset_json.get("labels", {})
        return any(isinstance(v, (list, tuple)) for v in labels.values()) or \
            self.dataset_json.get("regions_class_order") is not None

    @property
    def region_names(self) -> list[str]:
        """Region names in network output order (dataset.json label order, background and ignore
        left out, as nnU-Net's LabelManager orders its regions)."""
        return [str(n) for n in self.dataset_json["labels"] if n not in ("background", "ignore")]

    @property
    def output_names(self) -> list[str]:
        """``class_names``, or for a region-based model background + ``region_names``."""
        return ["background", *self.region_names] if self.is_region_based else self.class_names

    @property
    def file_ending(self) -> str:
        return str(self.dataset_json.get("file_ending", ".nii.gz"))

    @property
    def folds(self) -> list:
        """Folds that hold at least one checkpoint, sorted (numbers first, then 'all')."""
        return sorted(self.checkpoints, key=_fold_key)

    def folds_with(self, checkpoint: str) -> list:
        return [f for f in self.folds if checkpoint in self.checkpoints[f]]

    def snapshot_checkpoints(self, fold) -> list[str]:
        """``checkpoint_snapshot_<cycle>.pth`` names of ``fold``, sorted by cycle number."""
        names = [n for n in self.checkpoints.get(fold, []) if SNAPSHOT_PATTERN.match(n)]
        return sorted(names, key=lambda n: int(SNAPSHOT_PATTERN.match(n).group(1)))

    def check_channels(self, n_given: int, what: str = "the input") -> None:
        """Raise ModelFolderError when ``n_given`` input channels differ from dataset.json's."""
        if n_given != self.n_channels:
            names = ", ".join(f"_{i:04d}={n}" for i, n in enumerate(self.channel_names))
            raise ModelFolderError(f"{what} has {n_given} channel(s) but this model expects {self.n_channels} "
                                   f"({names}, from dataset.json channel_names)")

    # --- members -------------------------------------------------------------------------
    def members(self, ensemble: str = "deep", folds=None, checkpoint: str = DEFAULT_CHECKPOINT,
                passes: int | None = None) -> list[Member]:
        """The ensemble members, in a fixed order.

        ensemble: ``"deep"`` (one member per fold, checkpoint ``checkpoint``; default folds: every
        fold holding it), ``"checkpoint"`` (every ``checkpoint_snapshot_<cycle>.pth`` of the given
        folds; default: every fold holding snapshots) or ``"single"`` (one member: the given fold, or
        fold 0 / the first fold holding ``checkpoint``). ``"tta"`` / ``"dropout"``: the chosen fold(s)
        as for single (default one fold; several folds give fold x variant members), expanded into
        one member per mirroring combination / ``passes`` MC-dropout passes (default 10).
        """
        if ensemble not in ENSEMBLE_KINDS:
            raise ModelFolderError(f"unknown ensemble kind {ensemble!r}; choose one of {', '.join(ENSEMBLE_KINDS)}")
        folds = None if folds is None else [_parse_fold(f) for f in folds]
        if folds is not None:
            if not folds:
                raise ModelFolderError("an empty list of folds was given")
            if len(set(folds)) != len(folds):
                raise ModelFolderError(f"fold list {folds} names a fold twice")
            absent = [f for f in folds if f not in self.checkpoints]
            if absent:
                wanted = "snapshot checkpoints" if ensemble == "checkpoint" else checkpoint
                raise ModelFolderError(f"fold {_fmt_folds(absent)} has no {wanted} (there is no "
                                       f"fold_{absent[0]}/checkpoint_*.pth in {self.path}); folds present: "
                                       f"{_fmt_folds(self.folds)}")

        if passes is not None and ensemble != "dropout":
            raise ModelFolderError(f"--passes applies to --ensemble dropout only (not {ensemble})")
        if ensemble in SINGLE_MODEL_KINDS:
            from .single_model_members import dropout_members, tta_members

            if folds is None:
                bases = self.members("single", None, checkpoint)
            else:
                bases = [b for f in folds for b in self.members("single", [f], checkpoint)]
            return tta_members(self, bases) if ensemble == "tta" else dropout_members(self, bases, passes)

        if ensemble == "checkpoint":
            chosen = folds if folds is not None else [f for f in self.folds if self.snapshot_checkpoints(f)]
            out = []
            for f in chosen:
                snaps = self.snapshot_checkpoints(f)
                if not snaps:
                    raise ModelFolderError(
                        f"fold {f} has no snapshot checkpoints (checkpoint_snapshot_<cycle>.pth) for a checkpoint "
                        f"ensemble; it has {', '.join(self.checkpoints[f])}. Train with the snapshot trainer "
                        "(calib-uncertainty train-snapshots) or use --ensemble deep/single")
                for n in snaps:
                    cycle = SNAPSHOT_PATTERN.match(n).group(1)
                    out.append(Member(f, self.path / f"fold_{f}" / n, f"fold_{f}/snapshot_{cycle}"))
            if not out:
                raise ModelFolderError(
                    f"no snapshot checkpoints (fold_<k>/checkpoint_snapshot_<cycle>.pth) in {self.path} for a "
                    f"checkpoint ensemble; folds present: {_fmt_folds(self.folds)}. Train with the snapshot trainer "
                    "or use --ensemble deep/single")
            return out

        have = self.folds_with(checkpoint)
        if folds is None:
            if not have:
                raise ModelFolderError(f"no fold of {self.path} has {checkpoint}; folds present: "
                                       f"{_fmt_folds(self.folds)} with {self._describe_checkpoints()}")
            chosen = have if ensemble == "deep" else [0 if 0 in have else have[0]]
        else:
            if ensemble == "single" and len(folds) != 1:
                raise ModelFolderError(f"a single-model prediction takes one fold, got {_fmt_folds(folds)}")
            chosen = folds
            for f in chosen:
                if checkpoint not in self.checkpoints[f]:
                    raise ModelFolderError(f"fold {f} has no {checkpoint}; folds present: {_fmt_folds(self.folds)}"
                                           f" ({checkpoint} in: {_fmt_folds(have)}); fold {f} has "
                                           f"{', '.join(self.checkpoints[f])}")
        stem = checkpoint[:-4] if checkpoint.endswith(".pth") else checkpoint
        return [Member(f, self.path / f"fold_{f}" / checkpoint, f"fold_{f}/{stem}") for f in chosen]

    def _describe_checkpoints(self) -> str:
        return "; ".join(f"fold_{f}: {', '.join(self.checkpoints[f])}" for f in self.folds)

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, folds={self.folds})"
