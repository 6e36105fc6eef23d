"""Benchmark on real CT (issue 3): tiny nnU-Net ensembles on OpenKBP, temperature scaling, uncertainty.

What it does, on the CPU, every step cached in a work folder outside the repository:

1. ``split``: the 115 OpenKBP head-and-neck CTs (128³, about 3.9 x 3.9 x 2.5 mm, labels
   0 background, 1 brainstem, 2 spinal cord, 3/4 left/right parotid, 5 mandible) are shuffled
   with a fixed seed and cut into training / calibration / test cases (sizes are options).
2. ``plan``: an nnU-Net raw dataset of the training cases only (symbolic links to the shared
   files, never copies) is fingerprinted, planned and preprocessed by nnU-Net, with the project's
   small plan derived from its 3d_fullres configuration and one stated change
   (``_openkbp_plan``): the target spacing is 5 mm isotropic instead of the native ~3.9 x 3.9 x
   2.5 mm (downsampling by nnU-Net's own resampling; 2-3x less CPU time per prediction). nnU-Net's
   export resamples the logits back, so probabilities, metrics and maps are on the native grid,
   compared with the original labels. No cropping.
3. ``train``: a 5-fold *deep ensemble* (``CalibuTinyTrainer``: Adam + poly LR, one model per fold
   of nnU-Net's split of the training cases) and a *checkpoint ensemble* (``CalibuSnapshotTrainer``
   on fold 0: Adam + cyclical cosine LR, one snapshot per cycle) (``nnunet.training``). The
   *single-model* baseline is fold 0 of the deep ensemble alone.
4. ``members``: every member's softmax probabilities for the calibration and test cases, in
   nnU-Net ``--save_probabilities`` layout (``nnunet.inference.EnsemblePredictor`` via
   ``_openkbp_members``), sliding-window step 1.0 of the patch, no mirroring TTA.
5. Per configuration (single, deep, checkpoint): ``calib-uncertainty fit-temperature`` on the
   calibration cases (pool then calibrate: T minimises the NLL of softmax(log p̄ / T) over the ROI
   = voxels within 15 mm of the predicted foreground, METHODS.md §2; τ* per map maximises the
   mean UEO, §4) and ``calib-uncertainty evaluate`` on the test cases (before = p̄, after =
   softmax(log p̄ / T); §3 metrics in the ROI; error detection at τ*, §4).
6. ``report``: ``bench/results/openkbp.md`` and ``.json`` (``_openkbp_report``): the command, the
   machine, the wall time, the split, one table per configuration, the learned-something check
   (test Dice of the mandible > 0) and a comparison with the seed thesis.

A rerun skips every step whose record in ``<case folder>/.steps/`` matches its inputs and whose
outputs exist (trained folds have their own completeness record). The run exits with code 1 when
a configuration's mean test Dice on the mandible is 0 (the model learned nothing: its calibration
numbers mean nothing), after writing the report that says so.

Usage (defaults are sized for about 35 minutes on two shared CPU cores):

    .venv/bin/python bench/openkbp.py [--data ../shared/data/openkbp] [--workdir /tmp/calibu_openkbp]
        [--n-train 30 --n-cal 6 --n-test 10 --seed 0] [--threads 1] [--spacing-mm 5] [--tile-step 1.0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

from CalibUncertaintyLib.errors import CalibUncertaintyError  # noqa: E402
from CalibUncertaintyLib.io.atomic import write_json  # noqa: E402

log = logging.getLogger("bench.openkbp")

CONFIGS = ("single", "deep", "checkpoint")
DATASET_ID, DATASET_NAME = 501, "OpenKBPBench"
STEPS = ".steps"


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
def _display_path(path: Path) -> str:
    """``path`` relative to the repository's parent (``../shared/...``) when it lies there, so the
    report names no machine-specific absolute path."""
    try:
        return str(Path("..") / Path(path).resolve().relative_to(REPO.parent.resolve()))
    except ValueError:
        return str(path)


def default_data() -> Path:
    """``<repo>/../shared/data/openkbp`` (``$CALIBU_SHARED/data/openkbp`` when that is set)."""
    return Path(os.environ.get("CALIBU_SHARED", REPO.parent / "shared")) / "data" / "openkbp"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data(),
                   help="OpenKBP folder (holding Dataset501_OpenKBP_HN_OAR) or the dataset folder itself "
                        "(default <repo>/../shared/data/openkbp)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/calibu_openkbp"),
                   help="work folder for nnU-Net data, models, member outputs and evaluations (default "
                        "/tmp/calibu_openkbp; must lie outside the repository)")
    g = p.add_argument_group("split")
    g.add_argument("--n-train", type=int, default=30)
    g.add_argument("--n-cal", type=int, default=6)
    g.add_argument("--n-test", type=int, default=10)
    g.add_argument("--seed", type=int, default=0, help="seed of the case shuffle (default 0)")
    g = p.add_argument_group("small plan")
    g.add_argument("--spacing-mm", type=float, default=5.0,
                   help="isotropic target spacing in mm that nnU-Net resamples the CTs to for training and "
                        "inference (default 5; probabilities are resampled back to the native grid)")
    g.add_argument("--n-stages", type=int, default=4)
    g.add_argument("--base-features", type=int, default=8)
    g.add_argument("--max-features", type=int, default=64)
    g.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], metavar="N",
                   help="training patch in voxels of the target spacing, nnU-Net's axis order (default 32 32 32 "
                        "= 16 cm: 0.2 s per iteration here; 48³ took 0.6 s and learned more slowly per iteration)")
    g.add_argument("--batch-size", type=int, default=2)
    g = p.add_argument_group("training")
    g.add_argument("--folds", type=int, default=5, help="deep-ensemble members = folds 0..N-1 (default 5)")
    g.add_argument("--deep-epochs", type=int, default=16)
    g.add_argument("--snapshot-epochs", type=int, default=30)
    g.add_argument("--cycles", type=int, default=3, help="snapshot cycles = checkpoint-ensemble members")
    g.add_argument("--iterations", type=int, default=25, help="training iterations per epoch (default 25)")
    g.add_argument("--lr", type=float, default=1e-2,
                   help="Adam initial learning rate (default 1e-2: with 3e-3 nothing was segmented after 125 "
                        "iterations; with 1e-2 the mandible reached pseudo Dice 0.66 after 400)")
    g.add_argument("--threads", type=int, default=1, choices=range(1, 65), metavar="N",
                   help="torch CPU threads for training and inference (default 1: on this shared 2-core machine "
                        "one thread ran a tile 3-4x faster than two)")
    g = p.add_argument_group("inference and evaluation")
    g.add_argument("--tile-step", type=float, default=1.0,
                   help="nnU-Net sliding-window step as a fraction of the patch (default 1.0: tiles overlap only "
                        "where the image is not a multiple of the patch; nnU-Net's default 0.5 costs 2-3x)")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="nnU-Net mirroring test-time augmentation (default off: up to 8x CPU time)")
    g.add_argument("--roi-radius-mm", type=float, default=15.0, help="ROI radius in mm (default 15)")
    g = p.add_argument_group("outputs")
    g.add_argument("--results", type=Path, default=REPO / "bench" / "results",
                   help="folder for openkbp.md and openkbp.json (default bench/results)")
    g.add_argument("--name", default=None, help="report file stem under --results (default openkbp; openkbp_stock "
                                                "with --model-folder)")
    g.add_argument("--configs", nargs="+", default=["single", "deep"], choices=("single", "deep"),
                   help="--model-folder: configurations (default single deep)")
    from _stock_members import add_model_arguments

    add_model_arguments(p)
    a = p.parse_args(argv)
    a.name = a.name or ("openkbp_stock" if a.model_folder else "openkbp")
    for name in ("n_train", "n_cal", "n_test", "folds", "deep_epochs", "snapshot_epochs", "cycles", "iterations"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.n_train < a.folds:
        p.error(f"--n-train ({a.n_train}) must be at least --folds ({a.folds})")
    if a.snapshot_epochs % a.cycles:
        p.error(f"--snapshot-epochs ({a.snapshot_epochs}) must be a multiple of --cycles ({a.cycles})")
    if not a.roi_radius_mm > 0 or not a.spacing_mm > 0:
        p.error("--roi-radius-mm and --spacing-mm must be > 0")
    if not 0 < a.tile_step <= 1:
        p.error("--tile-step must be in (0, 1]")
    a.workdir = a.workdir.expanduser().resolve()
    if a.workdir == REPO or REPO in a.workdir.parents:
        p.error(f"--workdir {a.workdir} lies inside the repository; choose a folder outside it")
    return a


# ----------------------------------------------------------------------------------------------
# step records
# ----------------------------------------------------------------------------------------------
class Steps:
    """Run a step unless ``.steps/<name>.json`` records the same inputs and its outputs exist."""

    def __init__(self, root: Path):
        self.dir = root / STEPS
        self.ran: list[str] = []
        self.reused: list[str] = []
        self.seconds: dict[str, float] = {}

    def run(self, name: str, inputs: dict, outputs: list[Path], fn):
        path = self.dir / f"{name}.json"
        want = json.loads(json.dumps(inputs, default=str))
        try:
            have = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            have = None
        if have and have.get("inputs") == want and all(Path(o).exists() for o in outputs):
            self.reused.append(name)
            self.seconds[name] = have.get("seconds", 0.0)
            log.info("step %s: reused (%.0f s when it ran)", name, self.seconds[name])
            return have.get("result")
        log.info("step %s: running", name)
        t0 = time.time()
        result = fn()
        self.seconds[name] = round(time.time() - t0, 1)
        write_json(path, {"inputs": want, "result": result, "seconds": self.seconds[name]})
        self.ran.append(name)
        log.info("step %s: done in %.0f s", name, self.seconds[name])
        return result


def train_ensembles(steps, args, prepared, res: Path, split: dict):
    """Train the deep ensemble (folds 0..args.folds-1) and the checkpoint ensemble (fold 0, cyclical
    LR) as resumable steps; returns (deep config, snapshot config, deep model folder, snapshot model
    folder). Shared by this bench and ``openkbp_local.py``."""
    from CalibUncertaintyLib.nnunet.training import FOLD_RECORD, TrainingConfig, model_folder_path, train_folds

    deep_cfg = TrainingConfig(trainer="CalibuTinyTrainer", num_epochs=args.deep_epochs,
                              iterations_per_epoch=args.iterations, initial_lr=args.lr, val_iterations=1, seed=0)
    snap_cfg = TrainingConfig(trainer="CalibuSnapshotTrainer", num_epochs=args.snapshot_epochs,
                              iterations_per_epoch=args.iterations, cycles=args.cycles, initial_lr=args.lr,
                              val_iterations=1, seed=100)

    def done(cfg, folds):
        d = model_folder_path(res, prepared.dataset_name, cfg.trainer, prepared.plans_name, prepared.configuration)
        return [d / f"fold_{f}" / FOLD_RECORD for f in folds]

    plan_sig = signature(prepared.plans_file.read_text())
    deep_dir = Path(steps.run("train_deep", {"split": split, "plan": plan_sig, "config": deep_cfg.record(),
                                             "folds": args.folds}, done(deep_cfg, range(args.folds)),
                              lambda: str(train_folds(prepared, res, list(range(args.folds)), deep_cfg, device="cpu",
                                                      num_threads=args.threads))))
    snap_dir = Path(steps.run("train_checkpoint", {"split": split, "plan": plan_sig, "config": snap_cfg.record()},
                              done(snap_cfg, [0]),
                              lambda: str(train_folds(prepared, res, [0], snap_cfg, device="cpu",
                                                      num_threads=args.threads))))
    return deep_cfg, snap_cfg, deep_dir, snap_dir


def signature(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_run(args, dataset_id: int, dataset_name: str, configuration: str | None = None):
    """The split, its working folder (named by the split's signature), the training dataset (links)
    and the small bench plan, each step skipped when its outputs are there. Returns (source, split,
    root, steps, preprocessed root, results root, prepared plan, the plan's keywords)."""
    import _openkbp_data as data
    from _openkbp_plan import bench_plans_name, prepare_bench_plan

    source = data.find_dataset(args.data)
    split = data.make_split(data.case_ids(source), args.n_train, args.n_cal, args.n_test, args.seed)
    root = args.workdir / f"split_{signature([split, str(source)])}"
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "split.json", split)
    steps = Steps(root)
    raw, pre, res = root / "nnUNet_raw", root / "nnUNet_preprocessed", root / "nnUNet_results"
    train_folder = data.link_training_dataset(source, raw, dataset_id, dataset_name, split["train"])
    plan_kw = dict(n_stages=args.n_stages, base_features=args.base_features, max_features=args.max_features,
                   patch_size=list(args.patch), batch_size=args.batch_size)
    cfg_kw, key = {}, {"split": split, "plan": plan_kw, "spacing_mm": args.spacing_mm}
    if configuration is not None:
        cfg_kw, key["cfg"] = {"configuration": configuration}, configuration
    plans_file = pre / train_folder.name / f"{bench_plans_name(args.spacing_mm)}.json"
    steps.run("plan", key, [plans_file],
              lambda: str(prepare_bench_plan(train_folder, pre, args.spacing_mm, **cfg_kw, **plan_kw).plans_file))
    prepared = prepare_bench_plan(train_folder, pre, args.spacing_mm, **cfg_kw, **plan_kw)  # reuses what is there
    return source, split, root, steps, pre, res, prepared, plan_kw


def setup_logging(*names: str) -> None:
    """INFO logging; the commands run in-process reconfigure the root logger, so the benchmark's
    own loggers (``names``) get their own handler and stay visible."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    for name in names:
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False


def run_cli(main) -> None:
    """``__main__`` of the OpenKBP benches: a project error is one line on stderr and exit code 2."""
    try:
        sys.exit(main())
    except CalibUncertaintyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli(argv: list[str]) -> None:
    """Run ``calib-uncertainty <argv>`` in this process; a non-zero exit code is an error."""
    from CalibUncertaintyLib.cli.main import main

    log.info("calib-uncertainty %s", " ".join(argv))
    rc = main(argv)
    if rc:
        raise CalibUncertaintyError(f"'calib-uncertainty {argv[0]}' failed with exit code {rc} (message above)")


# ----------------------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------------------
def _member_record(d: Path) -> dict:
    """What a member folder's outputs depend on: the bench's own record or the member cache's marker."""
    from _openkbp_members import RECORD

    from CalibUncertaintyLib.nnunet.member_cache import MARKER

    return json.loads(((d / RECORD) if (d / RECORD).is_file() else (d / MARKER)).read_text())


def train_and_predict(args, data):
    """Steps 1-4: the training dataset (links) and the small plan, training, the members' predictions
    for the calibration and test cases, each a resumable step. Returns (source, split, root, steps,
    images folder, {config: member folders}, inference timing, (prepared plan, plan keywords, deep
    config, snapshot config, deep model folder, snapshot model folder, training records))."""
    # 1-2: training dataset (links) and the small plan
    source, split, root, steps, pre, res, prepared, plan_kw = prepare_run(args, DATASET_ID, DATASET_NAME)

    # 3: training
    deep_cfg, snap_cfg, deep_dir, snap_dir = train_ensembles(steps, args, prepared, res, split)
    training = data.training_records(deep_dir, snap_dir)

    # 4: member predictions for the calibration and test cases
    from _openkbp_members import predict_members

    held_out = split["calibration"] + split["test"]
    images = source / "imagesTr"
    cases = {c: [images / f"{c}_0000.nii.gz"] for c in held_out}
    members, inference = {}, {}
    for ens, model_dir, folds in (("deep", deep_dir, None), ("checkpoint", snap_dir, [0])):
        inputs = {"model": str(model_dir), "train": training[ens], "cases": held_out, "tta": args.tta,
                  "tile_step": args.tile_step}

        def predict(ens=ens, model_dir=model_dir, folds=folds):
            dirs, timing = predict_members(model_dir, ens, cases, root / "members" / ens, args.tile_step,
                                           args.tta, folds)
            return {"dirs": [str(d) for d in dirs], "timing": timing}

        out = steps.run(f"members_{ens}", inputs, [root / "members" / ens], predict)
        members[ens], inference[ens] = out["dirs"], out["timing"]
    members["single"] = members["deep"][:1]
    return (source, split, root, steps, images, members, inference,
            (prepared, plan_kw, deep_cfg, snap_cfg, deep_dir, snap_dir, training))


def main(argv=None) -> int:
    import _openkbp_data as data
    import _openkbp_report as report

    args = parse_args(argv)
    setup_logging("bench.openkbp")
    t_start = time.time()
    import torch

    torch.set_num_threads(args.threads)  # inference; training sets it per fold as well
    command = " ".join(shlex.quote(x) for x in [".venv/bin/python", "bench/openkbp.py", *(sys.argv[1:]
                                                                                        if argv is None else argv)])
    if args.model_folder is not None:  # a model folder a user has: no plan, no training
        from _stock_members import model_cases, model_members, random_splits

        source = data.find_dataset(args.data)
        held_out = model_cases(args)
        split = {**random_splits(held_out, args.n_cal, 1, args.seed)[0], "seed": args.seed,
                 "n_available": len(held_out), "train": []}
        mem = model_members(args, source / "imagesTr", held_out)
        root = args.workdir / f"model_{signature([str(args.model_folder), split, str(source)])}"
        root.mkdir(parents=True, exist_ok=True)
        steps = Steps(root)
        members = {"single": [str(d) for d in mem["single"]], "deep": [str(d) for d in mem["deep"]]}
        inference = {}
        images = source / "imagesTr"
        configs = tuple(args.configs)
    else:
        # 1-4: training dataset (links), small plan, training, member predictions
        source, split, root, steps, images, members, inference, trained = train_and_predict(args, data)
        configs = CONFIGS

    # 5: fit on the calibration cases, evaluate on the test cases
    labels = source / "labelsTr"
    evaluations = {}
    for ens in configs:
        dirs = members[ens]
        msig = signature([_member_record(Path(d)) for d in dirs])
        cal = root / "calibration" / f"{ens}.json"
        steps.run(f"fit_{ens}", {"members": msig, "cases": split["calibration"], "roi": args.roi_radius_mm},
                  [cal], lambda dirs=dirs, cal=cal: cli(
                      ["fit-temperature", "--members", *dirs, "--images", str(images), "--labels", str(labels),
                       "--cases", *split["calibration"], "--roi-radius-mm", str(args.roi_radius_mm),
                       "--method", "temperature", "-o", str(cal)]))  # the thesis comparison: one global T
        ev = root / "evaluation" / ens
        steps.run(f"evaluate_{ens}", {"members": msig, "calibration": signature(cal.read_text()),
                                      "cases": split["test"]},
                  [ev / "evaluation.json"], lambda dirs=dirs, cal=cal, ev=ev: cli(
                      ["evaluate", "--members", *dirs, "--images", str(images), "--labels", str(labels),
                       "--cases", *split["test"], "--calibration", str(cal), "-o", str(ev)]))
        evaluations[ens] = {"evaluation": json.loads((ev / "evaluation.json").read_text()),
                            "calibration": json.loads(cal.read_text()), "n_members": len(dirs),
                            "members": [Path(d).name for d in dirs]}

    # 6: report
    run_info = {
        "command": command, "wall_s": round(time.time() - t_start, 1),
        "all_steps_s": round(sum(steps.seconds.values()), 1),
        "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch_threads": args.threads, "load_average_at_end": list(os.getloadavg())},
        "steps_run": steps.ran, "steps_reused": steps.reused, "step_seconds": steps.seconds,
        "workdir": str(root), "data": _display_path(source), "split": split,
        "tta": args.tta, "tile_step": args.tile_step, "inference": inference, "roi_radius_mm": args.roi_radius_mm,
    }
    if args.model_folder is not None:
        run_info.update(model_folder=str(args.model_folder), member_cache=mem["record"], tile_step=0.5)
    else:
        prepared, plan_kw, deep_cfg, snap_cfg, deep_dir, snap_dir, training = trained
        run_info.update(
            plan={**plan_kw, "target_spacing_mm": args.spacing_mm, "plans_file": str(prepared.plans_file),
                  "spacing_zyx": data.plan_spacing(prepared.plans_file)},
            training={"deep": deep_cfg.record(), "checkpoint": snap_cfg.record(), "records": training,
                      "deep_model": str(deep_dir), "checkpoint_model": str(snap_dir)})
    result = report.build(run_info, evaluations)
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / f"{args.name}.json", result)
    from CalibUncertaintyLib.io.atomic import write_text

    write_text(args.results / f"{args.name}.md", report.render(result))
    log.info("wrote %s and %s (%.0f s)", args.results / f"{args.name}.md", args.results / f"{args.name}.json",
             time.time() - t_start)
    if not result["learned"]["ok"]:
        log.error("a model did not learn (mandible Dice 0): %s", result["learned"])
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)  # bad input or a failed step: one line saying what and where
