"""``calib-uncertainty train-snapshots``: train this project's nnU-Net trainers without nnU-Net's discovery.

Default: a *checkpoint ensemble* -- one fold trained with Adam and a cyclical cosine learning
rate, one snapshot ``checkpoint_snapshot_<cycle>.pth`` saved per cycle. With ``--trainer tiny``
and several ``--fold`` values it trains a short *deep ensemble* (one Adam + poly model per fold).

The dataset is an nnU-Net raw folder (``DatasetXXX_Name`` with imagesTr/, labelsTr/,
dataset.json) or its id (then ``--raw`` or ``$nnUNet_raw`` says where raw datasets are). When
the plans file ``--plans`` does not exist yet (or was derived by this project before), the
dataset is fingerprinted and planned by nnU-Net and a small plan is derived and preprocessed
(see ``nnunet/small_plan.py``); any other existing plans file is used as it is and must already
be preprocessed. Progress: ``CALIBU_PROGRESS {"stage": "training", ...}`` lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import InputError
from .common import positive_int, say

TRAINER_CHOICES = {"snapshot": "CalibuSnapshotTrainer", "tiny": "CalibuTinyTrainer"}

#: what --help says (plain text: argparse re-wraps it)
DESCRIPTION = (
    "Train this project's nnU-Net v2 trainers without nnU-Net's trainer discovery. Default: a checkpoint "
    "ensemble, one fold trained with Adam and a cyclical cosine learning rate, saving one snapshot "
    "checkpoint_snapshot_<cycle>.pth per cycle (predict --ensemble checkpoint uses them). With --trainer tiny "
    "and several --fold values: a short deep ensemble, one Adam + poly model per fold. DATASET is an nnU-Net "
    "raw dataset folder (DatasetXXX_Name with imagesTr/, labelsTr/, dataset.json) or its id, found in --raw or "
    "$nnUNet_raw. When the plans file --plans does not exist yet (or was derived by this command before), the "
    "dataset is fingerprinted and planned by nnU-Net and a small plan is derived from it and preprocessed (the "
    "options under 'small plan'); any other existing plans file is used as it is and must already be "
    "preprocessed. The model folder is <results>/<DatasetXXX_Name>/<Trainer>__<Plans>__<Config>.")


def _fold(text: str):
    if text == "all":
        return "all"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number (0, 1, ...) or 'all', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"fold must be >= 0, got {text}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return v


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-snapshots", help="train a checkpoint ensemble (cyclical LR snapshots) or a short deep ensemble",
        description=DESCRIPTION)
    p.add_argument("dataset", metavar="DATASET", help="nnU-Net raw dataset folder (DatasetXXX_Name) or its id (with --raw / $nnUNet_raw)")
    p.add_argument("--raw", type=Path, metavar="DIR", help="folder holding raw datasets (default $nnUNet_raw); only with an id")
    p.add_argument("--preprocessed", type=Path, metavar="DIR", help="nnU-Net preprocessed folder (default $nnUNet_preprocessed)")
    p.add_argument("--results", type=Path, metavar="DIR", help="nnU-Net results folder (default $nnUNet_results); the model "
                   "folder is <results>/<dataset>/<Trainer>__<Plans>__<Config>")
    p.add_argument("--plans", default="nnUNetPlans_tiny", help="plans name (default nnUNetPlans_tiny, derived "
                   "from nnU-Net's plan when missing)")
    p.add_argument("--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("--trainer", choices=sorted(TRAINER_CHOICES), default="snapshot",
                   help="snapshot: Adam + cosine warm restarts, one snapshot per cycle (default); "
                        "tiny: Adam + poly decay, one model per fold (deep ensemble)")
    p.add_argument("--fold", "--folds", dest="folds", nargs="+", type=_fold, default=[0], metavar="FOLD",
                   help="fold(s) of nnU-Net's 5-fold split, or 'all' (default 0)")
    p.add_argument("--cycles", type=positive_int, default=3, metavar="N",
                   help="learning-rate cycles = snapshots (default 3)")
    p.add_argument("--epochs-per-cycle", type=positive_int, default=3, metavar="N",
                   help="epochs per cycle (snapshot) or in all (tiny: cycles x epochs-per-cycle) (default 3)")
    p.add_argument("--iterations-per-epoch", type=positive_int, default=25, metavar="N",
                   help="training iterations per epoch "
                   "(default 25)")
    p.add_argument("--lr", type=_positive_float, default=3e-3, metavar="LR",
                   help="peak Adam learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: CUDA, then MPS, then CPU (default)")
    g = p.add_argument_group("small plan (only when it is derived)")
    g.add_argument("--n-stages", type=positive_int, default=4, metavar="N",
                   help="resolution stages of the derived U-Net (default 4)")
    g.add_argument("--base-features", type=positive_int, default=8, metavar="N",
                   help="feature maps of the first stage, doubled per stage (default 8)")
    g.add_argument("--max-features", type=positive_int, default=64, metavar="N",
                   help="cap on the feature maps of any stage (default 64)")
    g.add_argument("--batch-size", type=positive_int, default=2, metavar="N",
                   help="training batch size of the derived plan (default 2)")
    g.add_argument("--num-processes", type=positive_int, default=2, metavar="N", help="processes for nnU-Net's "
                   "fingerprint and preprocessing (default 2)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads (default $CALIBU_TORCH_THREADS, else half the logical CPUs)")
    p.add_argument("--overwrite", action="store_true", help="retrain folds that were trained with other settings")
    p.set_defaults(func=run)


def _env_path(value, var: str, what: str) -> Path:
    if value is not None:
        return Path(value)
    if os.environ.get(var):
        return Path(os.environ[var])
    raise InputError(f"no {what} folder: pass --{what} or set ${var}")


def resolve_dataset_folder(dataset: str, raw: Path | None) -> Path:
    """A raw dataset folder from a path or an id (searched in ``raw`` / $nnUNet_raw)."""
    p = Path(dataset)
    if p.is_dir():
        return p
    try:
        did = int(dataset)
    except ValueError:
        raise InputError(f"dataset {dataset!r} is neither an existing folder nor a dataset id") from None
    root = _env_path(raw, "nnUNet_raw", "raw")
    hits = sorted(root.glob(f"Dataset{did:03d}_*"))
    if len(hits) != 1:
        raise InputError(f"expected exactly one Dataset{did:03d}_* folder in {root}, found "
                         f"{len(hits) or 'none'}{': ' + ', '.join(h.name for h in hits) if hits else ''}")
    return hits[0]


def prepare(args, dataset_folder: Path, preprocessed: Path):
    """Derive + preprocess the small plan, or take an existing nnU-Net plan as it is."""
    from ..nnunet.small_plan import PreparedDataset, parse_dataset_folder, prepare_small_plan

    raw_root, name, _ = parse_dataset_folder(dataset_folder)
    plans_file = preprocessed / name / f"{args.plans}.json"
    derived = True
    if plans_file.is_file():
        derived = "calibu_derived_from" in json.loads(plans_file.read_text())
    if derived:
        return prepare_small_plan(dataset_folder, preprocessed, args.plans, args.configuration,
                                  num_processes=args.num_processes, n_stages=args.n_stages,
                                  base_features=args.base_features, max_features=args.max_features,
                                  batch_size=args.batch_size)
    plans = json.loads(plans_file.read_text())
    conf = plans.get("configurations", {}).get(args.configuration)
    if conf is None:
        raise InputError(f"configuration {args.configuration!r} is not in {plans_file}")
    ident = conf.get("data_identifier", f"{args.plans}_{args.configuration}")
    if not (preprocessed / name / ident).is_dir():
        raise InputError(f"{plans_file.name} is not preprocessed yet ({preprocessed / name / ident} is missing): "
                         f"run nnUNetv2_preprocess -d {name} -plans_name {args.plans} -c {args.configuration}")
    return PreparedDataset(name, int(name[7:10]), raw_root.resolve(), preprocessed.resolve(), args.plans,
                           args.configuration)


def run(args) -> int:
    from ..nnunet.training import TrainingConfig, train_folds

    dataset_folder = resolve_dataset_folder(args.dataset, args.raw)
    preprocessed = _env_path(args.preprocessed, "nnUNet_preprocessed", "preprocessed")
    results = _env_path(args.results, "nnUNet_results", "results")
    trainer = TRAINER_CHOICES[args.trainer]
    cycles = args.cycles if args.trainer == "snapshot" else 1
    config = TrainingConfig(trainer=trainer, num_epochs=args.cycles * args.epochs_per_cycle,
                            iterations_per_epoch=args.iterations_per_epoch, cycles=cycles,
                            initial_lr=args.lr, seed=args.seed)
    prepared = prepare(args, dataset_folder, preprocessed)
    model_dir = train_folds(prepared, results, args.folds, config, device=args.device, overwrite=args.overwrite,
                            num_threads=args.threads)
    say(f"model folder: {model_dir}")
    for f in args.folds:
        say(f"  fold_{f}: {', '.join(config.checkpoint_names())}")
    return 0
