"""The end-to-end demo (``calib-uncertainty demo``): phantom CTs -> trained ensembles -> calibrated maps.

On a fresh machine, on the CPU, in one working folder:

1. ``phantom``: a CT-like phantom dataset in nnU-Net raw layout (``synthetic.phantom``): training
   cases in imagesTr/labelsTr, held-out cases in imagesTs/labelsTs, split into *calibration*
   cases (fit T and the thresholds) and *test* cases (evaluated, never used for fitting).
2. ``plan``: nnU-Net fingerprint + plan, the small plan and its preprocessing (``nnunet.small_plan``).
3. ``train``: a deep ensemble (``CalibuTinyTrainer``, one model per fold of nnU-Net's 5-fold
   split) and a checkpoint ensemble (``CalibuSnapshotTrainer``, one fold, one snapshot per
   cyclical-LR cycle) (``nnunet.training``).
4. ``members``: every member's softmax probabilities for every held-out case, written as
   nnU-Net ``--save_probabilities`` folders (``nnunet.inference.EnsemblePredictor``), with the
   model's plans.json and dataset.json next to them.
5. For each ensemble -- ``single`` (fold 0 of the deep ensemble alone), ``deep``, ``checkpoint``
   -- the project's own commands, run in-process: ``fit-temperature`` on the calibration cases,
   ``maps`` and ``evaluate`` on the test cases.
6. ``predict``: the user-facing command on one test image with the deep ensemble and its
   calibration file (what a Slicer user runs).
7. ``REPORT.md`` and ``demo_summary.json``: one table comparing the three ensembles (Dice,
   NLL / ECE / Brier before and after temperature scaling in the ROI, error detection).

Every step records what it was made from in ``<workdir>/.steps/<step>.json`` and is skipped
when that record matches and its outputs exist, so a rerun reuses trained models and finished
outputs (training folds have their own completeness record, see ``nnunet.training``). Progress:
``CALIBU_PROGRESS {"stage": "demo", ...}`` lines (and nnU-Net's "training" lines) on stderr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import CalibUncertaintyError, InputError
from .io.atomic import write_json, write_text
from .nnunet.member_cache import write_members  # also imported from here by bench/openkbp.py
from .progress import emit_progress
from .synthetic.phantom import PhantomSpec

log = logging.getLogger(__name__)

ENSEMBLES = ("single", "deep", "checkpoint")
#: torch CPU threads for training and inference unless the caller gives a number: a fixed count,
#: not one that follows the machine's CPU count, because the thread count changes the order of
#: floating-point sums in training and so the tiny models and every number after them
DEMO_THREADS = 1
STEP_DIR = ".steps"


def _deep_config():
    from .nnunet.training import TrainingConfig

    return TrainingConfig(trainer="CalibuTinyTrainer", num_epochs=16, iterations_per_epoch=10, initial_lr=1e-2,
                          val_iterations=1, seed=0)


def _snapshot_config():
    from .nnunet.training import TrainingConfig

    return TrainingConfig(trainer="CalibuSnapshotTrainer", num_epochs=18, iterations_per_epoch=10, cycles=3,
                          initial_lr=1e-2, val_iterations=1, seed=100)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo builds. The defaults fit the 10-minute budget on two CPU cores."""

    dataset_id: int = 990
    dataset_name: str = "CalibPhantomDemo"
    n_train: int = 10
    n_calibration: int = 4
    n_test: int = 4
    seed: int = 0
    spec: PhantomSpec = PhantomSpec(shape_zyx=(32, 48, 48), spacing=(1.5, 1.5, 3.0),
                                    vessel_radius_mm=(3.5, 5.0), node_radius_mm=(6.0, 10.0))
    small_plan: dict = field(default_factory=lambda: {"max_features": 32})
    deep: object = field(default_factory=_deep_config)          # TrainingConfig
    deep_folds: tuple = (0, 1, 2, 3, 4)
    snapshot: object = field(default_factory=_snapshot_config)  # TrainingConfig
    snapshot_fold: int = 0
    tta: bool = False  # mirroring TTA multiplies CPU inference time by up to 8

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A seconds-long version of every step (tests): tiny volumes, a few iterations, 2 folds."""
        from .nnunet.training import TrainingConfig

        return cls(dataset_id=989, dataset_name="CalibPhantomQuick", n_train=5, n_calibration=2, n_test=2,
                   spec=PhantomSpec(shape_zyx=(20, 32, 32), spacing=(2.0, 2.0, 4.0),
                                    vessel_radius_mm=(3.5, 5.0), node_radius_mm=(6.0, 10.0)),
                   small_plan={"max_features": 16, "n_stages": 3},
                   deep=TrainingConfig(trainer="CalibuTinyTrainer", num_epochs=1, iterations_per_epoch=4,
                                       initial_lr=1e-2, val_iterations=1),
                   deep_folds=(0, 1),
                   snapshot=TrainingConfig(trainer="CalibuSnapshotTrainer", num_epochs=2, iterations_per_epoch=3,
                                           cycles=2, initial_lr=1e-2, val_iterations=1))

    def record(self) -> dict:
        d = asdict(replace(self, deep=None, snapshot=None))
        d["deep"], d["snapshot"] = self.deep.record(), self.snapshot.record()
        return json.loads(json.dumps(d))


@dataclass
class DemoResult:
    workdir: Path
    summary: dict
    report: Path
    steps_run: list
    steps_skipped: list


class _Steps:
    """Skip a step when ``.steps/<name>.json`` records the same inputs and its outputs exist."""

    def __init__(self, workdir: Path):
        self.dir = workdir / STEP_DIR
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.seconds: dict[str, float] = {}

    def run(self, name: str, inputs: dict, outputs: list[Path], fn):
        rec_path = self.dir / f"{name}.json"
        want = json.loads(json.dumps(inputs, default=str))
        try:
            have = json.loads(rec_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            have = None
        if have is not None and have.get("inputs") == want and all(Path(o).exists() for o in outputs):
            self.skipped.append(name)
            return have.get("result")
        t0 = time.time()
        result = fn()
        self.seconds[name] = round(time.time() - t0, 1)
        write_json(rec_path, {"inputs": want, "result": result, "seconds": self.seconds[name], "finished_utc": _utc()})
        self.ran.append(name)
        return result

    def records(self) -> dict:
        """{step: {"seconds", "finished_utc"}} of every step as the run that computed it recorded it."""
        out = {}
        for name in self.ran + self.skipped:
            try:
                have = json.loads((self.dir / f"{name}.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            out[name] = {"seconds": have.get("seconds"),
                         "finished_utc": have.get("finished_utc") or _utc((self.dir / f"{name}.json").stat().st_mtime)}
        return out


def _utc(timestamp: float | None = None) -> str:
    from datetime import datetime, timezone

    when = datetime.now(timezone.utc) if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)
    return when.isoformat(timespec="seconds")


def _sig(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cli(argv: list[str]) -> None:
    """Run one ``calib-uncertainty`` command in this process; a non-zero exit is an error."""
    from .cli.main import main

    log.info("demo: calib-uncertainty %s", " ".join(argv))
    rc = main(argv)
    if rc:
        raise CalibUncertaintyError(f"demo step 'calib-uncertainty {argv[0]}' failed (exit code {rc}); "
                                    "its message is printed above")


def _summary_row(ensemble: str, n_members: int, evaluation: dict) -> dict:
    """One row of the comparison table from an evaluation.json (means over the test cases)."""
    agg = evaluation.get("aggregate", {})
    row = {"ensemble": ensemble, "members": n_members,
           "temperature": (evaluation.get("calibration") or {}).get("temperature")}
    for m in agg.get("metrics", []):
        if m.get("region") == "roi":
            for key in ("nll", "ece_top", "brier_multiclass"):
                row[f"{key}_{m['calibration']}"] = m.get(f"{key}.mean")
    dice = (agg.get("dice") or [{}])[0]
    for k, v in dice.items():
        if k.startswith("dice_") and k.endswith(".mean"):
            row[k[:-5]] = v
    for d in agg.get("error_detection", []):
        if d.get("map") in ("entropy", "mutual_information", "dae", "ebcu"):
            row[f"auroc_{d['map']}"] = d.get("auroc.mean")
    return row


def reproducibility(num_threads: int, device: str) -> dict:
    """What the numbers depend on beyond the seeds: threads, device, CPU, library versions."""
    import platform

    import numpy
    import torch

    return {"torch_threads": num_threads, "device": device, "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "note": "seeds fix data, splits, initialisation and augmentation; a rerun with the same threads on the "
                    "same CPU and library versions repeats the numbers, another thread count, CPU instruction "
                    "set or library version changes the tiny models' training and so the numbers"}


def comparison_table(rows: list[dict]) -> list[str]:
    """The README's table (Markdown lines) from the comparison rows this run produced."""
    dice_cols = sorted({k for r in rows for k in r if k.startswith("dice_")})
    head = ["ensemble", "members", "T", *[f"Dice {c[len('dice_'):]}" for c in dice_cols],
            "ROI NLL before → after", "ROI ECE (top-label) before → after"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["ensemble"], str(r["members"]), _fmt(r.get("temperature")), *[_fmt(r.get(c)) for c in dice_cols],
                 f"{_fmt(r.get('nll_before'))} → {_fmt(r.get('nll_after'))}",
                 f"{_fmt(r.get('ece_top_before'))} → {_fmt(r.get('ece_top_after'))}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _seconds(v) -> str:
    return "–" if v is None else f"{float(v):.1f}"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def methods_link(workdir: Path) -> str:
    """A Markdown link to the repository's docs/METHODS.md relative to ``workdir`` when that file
    exists (a clone), else its name in plain text (an installed package has no docs folder)."""
    methods = Path(__file__).resolve().parent.parent / "docs" / "METHODS.md"
    if methods.is_file():
        return f"[docs/METHODS.md]({Path(os.path.relpath(methods, workdir)).as_posix()})"
    return "docs/METHODS.md in the CalibUncertainty repository"


def _link(workdir: Path, path: str | Path) -> str:
    """A relative Markdown link from REPORT.md to ``path`` (which exists), shown as that relative path."""
    rel = Path(os.path.relpath(Path(path), workdir)).as_posix()
    return f"[{rel}]({rel})"


def render_report(summary: dict, workdir: Path | None = None) -> str:
    """REPORT.md: the comparison table, where the outputs are (links to files that exist) and the
    record of the run that computed the numbers (kept on a rerun that only reused them)."""
    workdir = Path(workdir) if workdir is not None else Path(summary["paths"]["calibration files"]).parent
    rows = summary["comparison"]
    present = {k for r in rows for k in r}
    dice_cols = sorted(k for k in present if k.startswith("dice_"))
    cols = ["ensemble", "members", "temperature", *dice_cols]
    for key in ("nll", "ece_top", "brier_multiclass"):
        cols += [f"{key}_before", f"{key}_after"]
    cols += [f"auroc_{m}" for m in ("entropy", "mutual_information", "dae", "ebcu")]
    cols = [c for c in cols if c in present]
    lines = ["# CalibUncertainty demo", "",
             f"Phantom dataset {summary['dataset']}: {summary['n_train']} training cases, "
             f"{len(summary['calibration_cases'])} calibration cases ({', '.join(summary['calibration_cases'])}), "
             f"{len(summary['test_cases'])} test cases ({', '.join(summary['test_cases'])}).", "",
             "Means over the test cases, inside the ROI (15 mm around the predicted foreground) for NLL, ECE "
             "(top-label, 15 bins) and Brier (multi-class); `_before` = averaged member probabilities, `_after` = "
             "with the temperature fitted on the calibration cases. `auroc_<map>`: voxel AUROC of the map for the "
             f"errors (prediction ≠ reference) in the ROI. Definitions: {methods_link(workdir)}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    rep = (summary.get("computed_by") or {}).get("reproducibility") or summary.get("reproducibility") or {}
    if rep:
        lines += ["", f"Computed with {rep['torch_threads']} torch thread(s) on {rep['device']} ({rep['machine']}, "
                      f"{rep['cpu_count']} CPUs), torch {rep['torch']}, numpy {rep['numpy']}: {rep['note']}."]
    lines += ["", "## Where things are", ""]
    for k, v in summary["paths"].items():
        lines.append(f"- {k}: {_link(workdir, v) if Path(v).exists() else '`' + str(v) + '` (missing)'}")
    reports = [workdir / "evaluation" / e / "report.md" for e in ENSEMBLES]
    lines += ["", "Evaluation reports: " + ", ".join(_link(workdir, r) for r in reports if r.is_file()) + ".", "",
              "Open a test case in 3D Slicer with the CalibUncertainty module (load the image from the raw "
              "dataset's `imagesTs` and the case folder under `maps/<ensemble>/`), or review it without Slicer: "
              "`calib-uncertainty review --outputs maps/deep -o sheets`.", ""]
    lines += ["## The run that computed these numbers", ""]
    computed = summary.get("computed_by") or {}
    if computed:
        lines += [f"Computed by the run that finished {computed.get('finished_utc', '?')} in "
                  f"{computed.get('seconds', 0):.0f} s (steps run then: {', '.join(computed.get('steps_run', []))}; "
                  "nnU-Net planning and training are not counted per step).", ""]
    steps = summary.get("step_records") or {}
    if steps:
        lines += ["| step | computed (UTC) | seconds |", "|---|---|---|"]
        lines += [f"| {name} | {rec.get('finished_utc') or '–'} | {_seconds(rec.get('seconds'))} |"
                  for name, rec in steps.items()]
        lines.append("")
    if not summary["steps_run"]:
        lines += [f"The latest invocation ({summary.get('finished_utc', '?')}, {summary['seconds']:.0f} s) reused "
                  "every step; the numbers above are those of the run recorded here.", ""]
    return "\n".join(lines)


def run_demo(workdir: str | os.PathLike = "demo_output", device: str = "auto",
             settings: DemoSettings = DemoSettings(), num_threads: int | None = None) -> DemoResult:
    """Run (or resume) the whole demo in ``workdir``; see the module docstring for the steps."""
    from .nnunet.inference import collect_cases
    from .nnunet.small_plan import prepare_small_plan
    from .nnunet.training import _torch_threads, train_folds
    from .synthetic.phantom import write_phantom_dataset

    t_start = time.time()
    num_threads = DEMO_THREADS if num_threads is None else int(num_threads)
    workdir = Path(workdir).resolve()
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is a file; give a folder (it is created if missing)")
    workdir.mkdir(parents=True, exist_ok=True)
    s = settings
    if s.n_calibration < 1 or s.n_test < 1:
        raise InputError("the demo needs at least one calibration and one test case")
    steps = _Steps(workdir)
    raw, pre, res = workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed", workdir / "nnUNet_results"
    total_steps = 6

    def stage(i, msg):
        emit_progress("demo", i / total_steps, message=msg)

    stage(0, "phantom dataset")
    ds = write_phantom_dataset(raw, s.dataset_id, s.dataset_name, n_train=s.n_train,
                               n_test=s.n_calibration + s.n_test, seed=s.seed, spec=s.spec)
    calib_cases = list(ds.test_cases[: s.n_calibration])
    test_cases = list(ds.test_cases[s.n_calibration:])

    stage(1, "nnU-Net plan and preprocessing")
    prepared = prepare_small_plan(ds.folder, pre, **s.small_plan)

    stage(2, "training")
    deep_dir = train_folds(prepared, res, s.deep_folds, s.deep, device=device, num_threads=num_threads)
    snap_dir = train_folds(prepared, res, [s.snapshot_fold], s.snapshot, device=device, num_threads=num_threads)

    stage(3, "member predictions")
    all_cases = collect_cases(ds.folder / "imagesTs")
    members = {}
    with _torch_threads(num_threads, "cpu"):  # the same thread count as training (DEMO_THREADS)
        _member_steps(members, steps, deep_dir, snap_dir, all_cases, workdir, device, s)
    members["single"] = members["deep"][:1]

    stage(4, "calibration, maps, evaluation")
    imagesTs, labelsTs = ds.folder / "imagesTs", ds.folder / "labelsTs"
    rows = []
    for ens in ENSEMBLES:
        dirs = members[ens]
        msig = _sig([json.loads((Path(d) / ".calibu_member.json").read_text()) for d in dirs])
        cal = workdir / "calibration" / f"{ens}.json"
        steps.run(f"fit_{ens}", {"members": msig, "cases": calib_cases}, [cal],
                  lambda dirs=dirs, cal=cal: _cli(["fit-temperature", "--members", *dirs, "--images", str(imagesTs),
                                                   "--labels", str(labelsTs), "--cases", *calib_cases,
                                                   "--method", "temperature", "-o", str(cal)]))
        csig = _sig([msig, _file_sha(cal)])
        maps_out = workdir / "maps" / ens
        steps.run(f"maps_{ens}", {"calibration": csig, "cases": test_cases}, [maps_out / "summary.json"],
                  lambda dirs=dirs, cal=cal, out=maps_out: _cli(["maps", "--members", *dirs, "--images", str(imagesTs),
                                                                 "--cases", *test_cases, "--calibration", str(cal),
                                                                 "-o", str(out)]))
        ev_out = workdir / "evaluation" / ens
        steps.run(f"evaluate_{ens}", {"calibration": csig, "cases": test_cases}, [ev_out / "evaluation.json"],
                  lambda dirs=dirs, cal=cal, out=ev_out: _cli(["evaluate", "--members", *dirs, "--images",
                                                               str(imagesTs), "--labels", str(labelsTs), "--cases",
                                                               *test_cases, "--calibration", str(cal), "-o", str(out)]))
        rows.append(_summary_row(ens, len(dirs), json.loads((ev_out / "evaluation.json").read_text())))

    stage(5, "predict (the user command) on one test image")
    example = test_cases[0]
    pred_out = workdir / "predict_example"
    deep_cal = workdir / "calibration" / "deep.json"
    steps.run("predict_example", {"model": _sig(sorted(members["deep"])), "cal": _file_sha(deep_cal),
                                  "case": example, "tta": s.tta},
              [pred_out / example / "summary.json"],
              lambda: _cli(["predict", "-i", str(ds.image(example)), "-m", str(deep_dir), "--ensemble", "deep",
                            "--calibration", str(deep_cal), "--device", device,
                            "--tta" if s.tta else "--no-tta", "-o", str(pred_out)]))

    stage(6, "report")
    summary = {
        "format": "calib-uncertainty-demo", "dataset": ds.name, "n_train": s.n_train,
        "calibration_cases": calib_cases, "test_cases": test_cases, "settings": s.record(),
        "comparison": rows,
        "paths": {"raw dataset": str(ds.folder), "deep ensemble model": str(deep_dir),
                  "checkpoint ensemble model": str(snap_dir),
                  "calibration files": str(workdir / "calibration"), "maps": str(workdir / "maps"),
                  "evaluation reports": str(workdir / "evaluation"),
                  "predict example": str(pred_out / example)},
        "steps_run": steps.ran, "steps_skipped": steps.skipped, "step_seconds": steps.seconds,
        "step_records": steps.records(), "seconds": round(time.time() - t_start, 1), "finished_utc": _utc(),
        "reproducibility": reproducibility(num_threads, device),
    }
    summary["computed_by"] = _computed_by(workdir, summary)
    write_json(workdir / "demo_summary.json", summary)
    report = write_text(workdir / "REPORT.md", render_report(summary, workdir))
    emit_progress("demo", 1.0, message="done")
    return DemoResult(workdir, summary, report, steps.ran, steps.skipped)


def _computed_by(workdir: Path, summary: dict) -> dict:
    """The record of the run that computed the numbers: this run when it ran any step, else the one
    the previous demo_summary.json names (a warm rerun only reused them). A record written before
    runs stored their finishing time gets it from its step records' modification times."""
    if summary["steps_run"]:
        return {"finished_utc": summary["finished_utc"], "seconds": summary["seconds"],
                "steps_run": list(summary["steps_run"]), "reproducibility": summary["reproducibility"]}
    try:
        before = json.loads((workdir / "demo_summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        before = {}
    rec = before.get("computed_by")
    if not rec and before.get("steps_run"):  # written before this record existed: its own fields are that run's
        rec = {"finished_utc": before.get("finished_utc"), "seconds": before.get("seconds"),
               "steps_run": before["steps_run"], "reproducibility": before.get("reproducibility")}
    if rec and not rec.get("finished_utc"):
        stamps = [(workdir / STEP_DIR / f"{name}.json").stat().st_mtime for name in rec.get("steps_run", [])
                  if (workdir / STEP_DIR / f"{name}.json").is_file()]
        if stamps:
            rec = {**rec, "finished_utc": _utc(max(stamps))}
    return rec or {}


def _member_steps(members, steps, deep_dir, snap_dir, all_cases, workdir, device, s) -> None:
    for ens, model_dir, folds in (("deep", deep_dir, None), ("checkpoint", snap_dir, [s.snapshot_fold])):
        members[ens] = steps.run(
            f"members_{ens}", {"model": str(model_dir), "cases": sorted(all_cases), "tta": s.tta,
                               "train": s.record()},
            [workdir / "members" / ens],
            lambda ens=ens, model_dir=model_dir, folds=folds: [
                str(p) for p in write_members(model_dir, ens, all_cases, workdir / "members" / ens, device,
                                              s.tta, folds)])


def _file_sha(path: Path) -> str:
    from .calibration.fingerprint import sha256_file

    return sha256_file(path)
