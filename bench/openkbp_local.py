"""Benchmark on real CT (issue 11): over-confident 2d nnU-Net models on OpenKBP; global, per-class and
local temperature and vector scaling on held-out cases; case triage and the out-of-distribution check.

A sibling of ``bench/openkbp.py`` (same data helpers, step records and member writer). What differs:

1. Models as over-confident as real nnU-Net models: nnU-Net's **2d** configuration (whole 128 x 128
   slices at ``--spacing-mm`` in-plane, default 4 mm, close to OpenKBP's native 3.9 mm), trained with
   Adam and nnU-Net's own loss (Dice + cross-entropy with deep supervision: ``CalibuTinyTrainer`` and
   ``CalibuSnapshotTrainer`` subclass ``nnUNetTrainer`` and keep its ``_build_loss``), for as many
   iterations as the CPU budget allows (default: Adam lr 3e-3, batch 4, 40 x 25 iterations per fold,
   0.25-0.5 s per iteration on one shared core). Deep ensemble = ``--folds`` folds; checkpoint
   ensemble = snapshots of fold 0; single model = fold 0 of the deep ensemble; ``tta`` = fold 0 with
   one member per mirroring (``ModelFolder.members("tta")``, 4 for a 2d model). Every configuration
   is checked to have learned: per-organ Dice of its pooled members on the calibration cases,
   printed, and an error when the mean is below ``--min-dice``. Members are predicted for the
   calibration and test cases and the OOD CT; ``<workdir>/READY.txt`` says where the models, member
   folders, split and fitted calibrators are (for other scripts), rewritten after each configuration.
2. Calibrators, all fitted on the same stratified ROI voxels of the calibration cases (ROI = voxels
   within 15 mm of the uncalibrated predicted foreground), pool then calibrate:
   ``global`` (``TemperatureScaler``), ``class`` (``ClassTemperatureScaler``), ``local``
   (``LocalTemperatureScaler``: T = 1 in the open distance bin beyond the ROI), ``local_nearest``
   (open bin = the outer ROI bin's T), ``local_beyond`` (open bin fitted on up to
   ``--max-voxels-per-case`` voxels per case sampled uniformly beyond the ROI: the library's default,
   ``fit-temperature --local-open-bin fitted``), ``vector`` (``VectorScaler``). Leave-one-case-out NLL of
   the temperature calibrators on the calibration rows, and the selection evidence for the open-bin
   rule: leave-one-case-out over the calibration cases measured on each left-out *whole volume*
   (ROI and image NLL and ECE); no test case enters any choice.
3. Test cases, every calibrator: ROI NLL, top-label ECE, per-class (foreground) ECE averaged over the
   organs, multi-class Brier, mean Dice, voxels whose segmentation changed; inside the *shared* ROI
   (that of the uncalibrated prediction, the same voxels for every calibrator) and over the whole
   image. Means over the test cases.
4. Triage (METHODS.md §6): per-case aggregates of the calibrated predictive entropy of the default
   calibrator (τ = 0.95 quantile of the calibration cases' ROI entropy), their risk–coverage curve
   (risk = 1 − mean organ Dice) on the test cases, and the OOD CT ``../shared/data/ood_ct`` ranked
   against the test cases by each aggregate.

Report: ``bench/results/openkbp_local.md`` and ``.json``.

    nice -n 5 .venv/bin/python bench/openkbp_local.py [--workdir /tmp/calibu_openkbp_local] [--n-train 30
        --n-cal 6 --n-test 10] [--folds 3] [--deep-epochs 40] [--snapshot-epochs 45] [--iterations 25]
        [--configurations single deep checkpoint tta]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from CalibUncertaintyLib.io.atomic import write_json, write_text  # noqa: E402
from openkbp import _display_path, default_data, prepare_run, run_cli, setup_logging, signature, train_ensembles  # noqa: E402

log = logging.getLogger("bench.openkbp_local")
DATASET_ID, DATASET_NAME = 502, "OpenKBPLocal"
CONFIGURATIONS = ("single", "deep", "checkpoint", "tta")
READY = "READY.txt"


def write_ready(workdir: Path, root: Path, split: dict, members: dict, deep_dir: Path, snap_dir: Path,
                cases: dict, learned: dict, labels: Path) -> None:
    """``<workdir>/READY.txt``: where the trained models, member caches, split and calibrators are, for
    other scripts (rewritten after each configuration's members exist)."""
    lines = ["OpenKBP 2d nnU-Net models and member predictions of bench/openkbp_local.py (issue 11).", "",
             f"split (calibration / test case ids, also training): {root / 'split.json'}",
             "calibration cases: " + " ".join(split["calibration"]),
             "test cases: " + " ".join(split["test"]),
             "cases predicted by every configuration (ids -> CT): "
             + "; ".join(f"{c} = {f[0]}" for c, f in sorted(cases.items())), "",
             f"model folders (nnU-Net format): deep ensemble folds 0..: {deep_dir}",
             f"                                checkpoint ensemble (fold 0, snapshots): {snap_dir}", "",
             "member caches (one folder per member; <case>.npz holds 'probabilities' (K, z, y, x) on the CT's "
             "grid, <case>.pkl nnU-Net's properties; plans.json/dataset.json copied; usable as --members DIR...):"]
    for cfg in CONFIGURATIONS:
        if cfg in members:
            lines.append(f"  {cfg}: " + " ".join(str(d) for d in members[cfg]))
            if cfg in learned:
                lines.append(f"    mean organ Dice on the calibration cases {learned[cfg]['mean_dice']:.3f} "
                             f"(per organ {learned[cfg]['per_class']})")
        else:
            lines.append(f"  {cfg}: not yet (being predicted)")
    lines += ["", f"fitted calibrators of the bench (global T, per-class T, local T(x) records, vector scaling) per "
                  f"configuration, once evaluated: {root / 'calibrators'}/<configuration>.json",
              "  (the local records load with CalibUncertaintyLib.calibration.local_temperature."
              "_TableTemperature.from_record)",
              "a calibration file of the library for a configuration (fitted on the calibration cases only):",
              f"  calib-uncertainty fit-temperature --members <that configuration's folders> --labels {labels} "
              f"--cases {' '.join(split['calibration'])} --method local_temperature -o cal_<configuration>.json",
              "  (--method temperature for the global T)", ""]
    write_text(workdir / READY, "\n".join(lines) + "\n")
    log.info("wrote %s", workdir / READY)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data())
    p.add_argument("--ood", type=Path, default=default_data().parent / "ood_ct" / "abdomen_ct_3mm.nii.gz",
                   help="out-of-distribution CT (default ../shared/data/ood_ct/abdomen_ct_3mm.nii.gz)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/calibu_openkbp_local"))
    p.add_argument("--n-train", type=int, default=30)
    p.add_argument("--n-cal", type=int, default=6)
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing-mm", type=float, default=4.0, help="in-plane target spacing of the 2d plan")
    p.add_argument("--n-stages", type=int, default=5)
    p.add_argument("--base-features", type=int, default=8)
    p.add_argument("--max-features", type=int, default=64)
    p.add_argument("--patch", type=int, nargs=2, default=[128, 128])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--deep-epochs", type=int, default=40)
    p.add_argument("--snapshot-epochs", type=int, default=45)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--iterations", type=int, default=25)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-voxels-per-case", type=int, default=60_000)
    p.add_argument("--default-calibrator", default="local_beyond",
                   choices=("global", "class", "local", "local_nearest", "local_beyond", "vector"),
                   help="the calibrator the triage uses and the report compares with global T (default: local T(x) "
                        "with the open bin fitted beyond the ROI, the library's default)")
    p.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=CONFIGURATIONS,
                   help="ensembles to evaluate (tta: fold 0 of the deep ensemble, one member per mirroring)")
    p.add_argument("--min-dice", type=float, default=0.1,
                   help="fail when the mean organ Dice of a configuration on the calibration cases is below this "
                        "(the models did not learn)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--loco", action=argparse.BooleanOptionalAction, default=True,
                   help="--model-folder: leave-one-case-out selection evidence on the first split (default on)")
    p.add_argument("--splits", type=int, default=5, help="--model-folder: random calibration / test splits of its "
                                                         "held-out cases (default 5; --n-cal of them calibrate)")
    p.add_argument("--name", default=None, help="report file stem (default openkbp_local; openkbp_local_stock with "
                                                "--model-folder)")
    from _stock_members import add_model_arguments

    add_model_arguments(p)
    a = p.parse_args(argv)
    a.name = a.name or ("openkbp_local_stock" if a.model_folder else "openkbp_local")
    a.workdir = a.workdir.expanduser().resolve()
    if a.workdir == REPO or REPO in a.workdir.parents:
        p.error(f"--workdir {a.workdir} lies inside the repository")
    if a.snapshot_epochs % a.cycles:
        p.error("--snapshot-epochs must be a multiple of --cycles")
    return a


def main(argv=None) -> int:
    import _openkbp_data as data

    args = parse_args(argv)
    setup_logging("bench.openkbp_local", "bench.openkbp")
    t_start = time.time()
    import torch

    torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(x) for x in [".venv/bin/python", "bench/openkbp_local.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    if args.model_folder is not None:
        return main_model_folder(args, command, t_start)
    source, split, root, steps, pre, res, prepared, plan_kw = prepare_run(args, DATASET_ID, DATASET_NAME, "2d")

    deep_cfg, snap_cfg, deep_dir, snap_dir = train_ensembles(steps, args, prepared, res, split)
    training = data.training_records(deep_dir, snap_dir)

    from _openkbp_members import predict_members

    images = source / "imagesTr"
    held_out = split["calibration"] + split["test"]
    cases = {c: [images / f"{c}_0000.nii.gz"] for c in held_out}
    ood_id = "OOD_abdomen"
    if args.ood.is_file():
        cases[ood_id] = [args.ood]
    import _local_eval as ev

    labels = source / "labelsTr"
    class_names = [n for n, _ in sorted(json.loads((source / "dataset.json").read_text())["labels"].items(),
                                        key=lambda kv: kv[1])]
    members, inference, learned, results = {}, {}, {}, {}
    sources = [("deep", deep_dir, None, "deep"), ("checkpoint", snap_dir, [0], "checkpoint")]
    if "tta" in args.configurations:  # fold 0 of the deep ensemble, one member per mirroring
        sources.append(("tta", deep_dir, [0], "deep"))
    for ens, model_dir, folds, trained in sources:
        inputs = {"model": str(model_dir), "train": training[trained], "cases": sorted(cases)}
        if ens == "tta":
            inputs["ensemble"] = "tta"

        def predict(ens=ens, model_dir=model_dir, folds=folds):
            dirs, timing = predict_members(model_dir, ens, cases, root / "members" / ens, 1.0, False, folds)
            return {"dirs": [str(d) for d in dirs], "timing": timing}

        out = steps.run(f"members_{ens}", inputs, [root / "members" / ens], predict)
        members[ens], inference[ens] = out["dirs"], out["timing"]
        if ens == "deep":
            members["single"] = members["deep"][:1]
        # did the models learn? per-organ Dice of the pooled members on the calibration cases
        for cfg in (("single", "deep") if ens == "deep" else (ens,)):
            learned[cfg] = ev.check_learned([Path(d) for d in members[cfg]], labels, split["calibration"],
                                            class_names, args.min_dice, cfg)
        write_ready(args.workdir, root, split, members, deep_dir, snap_dir, cases, learned, labels)
        # evaluate what these members provide now (a partial report survives a later failure)
        for cfg in [c for c in CONFIGURATIONS if c in args.configurations and c in members and c not in results]:
            results[cfg] = evaluate_step(steps, root, cfg, members[cfg], labels, split,
                                         ood_id if ood_id in cases else None, args)
            results[cfg]["learned"] = learned[cfg]
            write_outputs(args, results, steps, command, t_start, source, split, plan_kw, prepared, deep_cfg,
                          snap_cfg, training, inference, class_names)
    return 0


def main_model_folder(args, command: str, t_start: float) -> int:
    """``--model-folder``: no training; the model's members (product member cache) on its held-out
    cases and the OOD CT; every calibrator fitted and measured on ``--splits`` random splits
    (``--n-cal`` calibration cases, the rest test); leave-one-case-out selection evidence on the
    first split's calibration cases only."""
    import _local_eval as ev
    import _local_report as report
    import _openkbp_data as data
    from _stock_members import machine, model_cases, model_members, ood_id, random_splits

    source = data.find_dataset(args.data)
    cases = model_cases(args)
    ood_files = [args.ood] if args.ood and Path(args.ood).is_file() else []
    mem = model_members(args, source / "imagesTr", cases, ood_files=ood_files, work=args.workdir)
    ood = ood_id(args.ood) if ood_files else None
    splits = random_splits(cases, args.n_cal, args.splits, args.seed)
    labels = source / "labelsTr"
    class_names = [n for n, _ in sorted(json.loads((source / "dataset.json").read_text())["labels"].items(),
                                        key=lambda kv: kv[1])]
    results = {}
    for cfg in [c for c in ("single", "deep") if c in args.configurations]:
        dirs = [Path(d) for d in mem[cfg]]
        ev.keep_in_memory(True)
        per_split = []
        for i, split in enumerate(splits):
            t0 = time.time()
            res = ev.evaluate_configuration(dirs, labels, split["calibration"], split["test"], ood,
                                            args.max_voxels_per_case, args.default_calibrator, seed=args.seed,
                                            loco=(i == 0 and args.loco))
            res.pop("fitted_records", None)
            res["split"] = split
            res["seconds"] = round(time.time() - t0, 1)
            per_split.append(res)
            log.info("%s: split %d of %d evaluated in %.0f s", cfg, i + 1, len(splits), time.time() - t0)
        ev.keep_in_memory(False)
        results[cfg] = {"members": [d.name for d in dirs], "splits": per_split,
                        "summary": report.summarise_splits(per_split, args.default_calibrator)}
    out = {"run": {"command": command, "wall_s": round(time.time() - t_start, 1), "machine": machine(),
                   "model_folder": str(args.model_folder), "member_cache": mem["record"], "cases": cases,
                   "n_cal": args.n_cal, "n_splits": len(splits), "seed": args.seed, "ood": ood,
                   "default_calibrator": args.default_calibrator, "class_names": class_names,
                   "max_voxels_per_case": args.max_voxels_per_case},
           "configurations": results}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / f"{args.name}.json", out)
    write_text(args.results / f"{args.name}.md", report.render_model_folder(out))
    log.info("wrote %s (%.0f s)", args.results / f"{args.name}.md", time.time() - t_start)
    return 0


def code_signature() -> str:
    """Hash of the evaluation code, so a changed evaluation is not reused from the work folder."""
    lib = REPO / "CalibUncertaintyLib" / "calibration"
    return signature([(REPO / "bench" / f).read_text() for f in ("_local_eval.py",)]
                     + [(lib / f).read_text() for f in ("local_temperature.py", "temperature.py", "vector_scaling.py")])


def evaluate_step(steps, root: Path, ens: str, member_dirs, labels: Path, split: dict, ood_id, args) -> dict:
    """Fit and evaluate every calibrator for one configuration (a resumable step)."""
    import _local_eval as ev

    dirs = [Path(d) for d in member_dirs]
    inputs = {"members": [str(d) for d in dirs], "split": split, "ood": ood_id, "max_vox": args.max_voxels_per_case,
              "default": args.default_calibrator, "seed": args.seed, "code": code_signature()}

    def run():
        t0 = time.time()
        res = ev.evaluate_configuration(dirs, labels, split["calibration"], split["test"], ood_id,
                                        args.max_voxels_per_case, args.default_calibrator, seed=args.seed)
        res["members"] = [d.name for d in dirs]
        if "fitted_records" in res:  # the bench's fitted calibrators, for other scripts
            write_json(root / "calibrators" / f"{ens}.json", res.pop("fitted_records"))
        res.setdefault("n_test", len(split["test"]))
        res["seconds"] = round(time.time() - t0, 1)
        write_json(root / "evaluation" / f"{ens}.json", res)
        log.info("%s: evaluated in %.0f s", ens, time.time() - t0)
        return res

    return steps.run(f"evaluate_{ens}", inputs, [root / "evaluation" / f"{ens}.json"], run)


def write_outputs(args, results, steps, command, t_start, source, split, plan_kw, prepared, deep_cfg, snap_cfg,
                  training, inference, class_names) -> None:
    import _local_report as report
    import _openkbp_data as data
    from _openkbp_members import RECORD

    run_info = {
        "command": command, "wall_s": round(time.time() - t_start, 1),
        "all_steps_s": round(sum(steps.seconds.values()), 1), "step_seconds": steps.seconds,
        "steps_run": steps.ran, "steps_reused": steps.reused,
        "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch_threads": args.threads,
                    "load_average_at_end": list(os.getloadavg())},
        "data": _display_path(source), "ood": _display_path(args.ood), "split": split,
        "plan": {**plan_kw, "configuration": "2d", "target_spacing_mm": args.spacing_mm,
                 "spacing": data.plan_spacing(prepared.plans_file)},
        "training": {"deep": deep_cfg.record(), "checkpoint": snap_cfg.record(), "records": training},
        "inference": inference, "class_names": class_names, "default_calibrator": args.default_calibrator,
        "member_record": RECORD,
    }
    out = {"run": run_info, "configurations": results}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / f"{args.name}.json", out)
    write_text(args.results / f"{args.name}.md", report.render(out))
    log.info("wrote %s (%.0f s)", args.results / f"{args.name}.md", time.time() - t_start)


if __name__ == "__main__":
    run_cli(main)
