"""Benchmark: many-class models at clinical size, ``predict`` against ``nnUNetv2_predict``.

For each K (default 6, 14, 25 classes) a random-weight nnU-Net model folder is built
(Testing/Python/tiny_nnunet.py: a deliberately tiny network, 2 stages of 4 and 8 features, a large
32×128×128 patch, target spacing twice the CT's in-plane spacing, so inference is small next to
the export and nnU-Net's resampling of the logits to the image grid is exercised). The input is a
real OpenKBP CT resampled (linear) to 512×512×``--slices`` with its physical extent kept, written
to the temporary working folder (never into the repository). Printed per K:

1. the whole run: wall seconds and peak RSS of ``calib-uncertainty predict`` and of
   ``nnUNetv2_predict --save_probabilities`` (same model, folds, input, TTA off, CPU), measured as
   in ``bench/predict_vs_nnunet.py`` (``ru_maxrss`` of the process tree: the largest single
   process, nnU-Net's export worker included);
2. post-processing side by side, each in its own fresh process on the same logits (one member's,
   synthetic but deterministic, float16 on the network grid): nnU-Net's
   ``export_prediction_from_logits`` with ``save_probabilities=True`` (resample, softmax, crop
   re-insertion, ``.npz`` + segmentation writing) against everything ``predict`` does after the
   last member's logits (``MemberProbabilities``, accumulation into sums that already hold an
   earlier member, calibrated probabilities, every map, regions, writing): seconds of that step
   the process's peak RSS and the CPU seconds of that step (all threads).

    python bench/many_classes.py [--k 6 14 25] [--slices 64] [--folds 0 1] [--skip-full] [--work DIR]

Memory: nnU-Net's export holds about 2–3 K float32 volumes; check ``free -g`` and choose
``--slices`` so that 3 × K × 512 × 512 × slices × 4 bytes fits comfortably.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "Testing" / "Python"))

from _real_size_ct import make_ct  # noqa: E402
from predict_vs_nnunet import default_ct, run_measured  # noqa: E402

PATCH_ZYX = (32, 128, 128)
FEATURES = (4, 8)


def build_model(root: Path, k: int, spacing_xyz, folds) -> Path:
    """A random-weight K-class model folder (tiny_nnunet's helpers, with K labels in dataset.json)."""
    from tiny_nnunet import random_network_weights, save_checkpoint, tiny_dataset_json, tiny_plans

    target_zyx = (spacing_xyz[2], spacing_xyz[1] * 2, spacing_xyz[0] * 2)
    plans = tiny_plans(dataset_name=f"Dataset9{k:02d}_ManyClasses", patch_zyx=PATCH_ZYX, spacing_zyx=target_zyx,
                       features=FEATURES)
    dataset_json = tiny_dataset_json(2)
    dataset_json["labels"] = {"background": 0, **{f"Structure_{i:02d}": i for i in range(1, k)}}
    folder = root / f"k{k}" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    for i, fold in enumerate(folds):
        save_checkpoint(folder / f"fold_{fold}" / "checkpoint_final.pth",
                        random_network_weights(plans, dataset_json, 100 * (i + 1)), plans, dataset_json, fold)
    return folder


def synthetic_logits(data, k: int):
    """Deterministic smooth logits (K, network grid) float16 from the preprocessed CT: class c
    prefers its own band of intensities, so probabilities vary across the image as a model's do."""
    import torch

    x = data[0].float()
    out = torch.empty((k,) + tuple(x.shape), dtype=torch.float32)
    for c in range(k):
        centre = -1.5 + 3.0 * c / max(1, k - 1)
        out[c] = -4.0 * (x - centre) ** 2 + (2.0 if c == 0 else 0.0)
    return out.half()  # float16, as both nnU-Net's sliding window and predict's return them


def post_process(kind: str, model: Path, ct: Path, out: Path) -> dict:
    """One post-processing variant in this process (see module doc); returns its timings."""
    from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor
    from CalibUncertaintyLib.nnunet.model_folder import ModelFolder

    folder = ModelFolder.open(model)
    members = folder.members("deep", None, "checkpoint_final.pth")[:1]
    pred = EnsemblePredictor(folder, members, device="cpu", tta=False)
    case = pred.prepare([ct], "case")
    logits = synthetic_logits(case.data, pred.n_classes)
    out.mkdir(parents=True, exist_ok=True)
    import CalibUncertaintyLib.calibration.roi  # noqa: F401  (imports done before the clock starts,
    import CalibUncertaintyLib.pipeline.case  # noqa: F401     as they are in a predict run)
    import CalibUncertaintyLib.regions.components  # noqa: F401
    import nnunetv2.inference.export_prediction  # noqa: F401
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "nnunet":
        from nnunetv2.inference.export_prediction import export_prediction_from_logits

        export_prediction_from_logits(logits, case.properties, pred.configuration_manager, pred.plans_manager,
                                      folder.dataset_json, str(out / "case"), save_probabilities=True)
    else:
        from CalibUncertaintyLib.pipeline.case import CaseOptions, process_case

        names = list(folder.dataset_json["labels"])
        first = logits.clone()
        first[0] += 0.5  # an earlier member, slightly different, added before the clock starts

        def members():
            nonlocal t0, c0
            yield pred.member_probabilities(first, case)
            # the last member's logits are here: post-processing starts
            t0, c0 = time.perf_counter(), time.process_time()
            yield pred.member_probabilities(logits, case)

        process_case("case", members(), case.geometry, out, None, names, CaseOptions(n_members=2))
    return {"post_s": time.perf_counter() - t0, "post_cpu_s": time.process_time() - c0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[6, 14, 25])
    ap.add_argument("--slices", type=int, default=64, help="slices of the 512×512 CT (default 64)")
    ap.add_argument("--folds", nargs="+", default=["0", "1"])
    ap.add_argument("--ct", type=Path, help="source CT (default: the first OpenKBP training CT)")
    ap.add_argument("--skip-full", action="store_true", help="only the post-processing comparison")
    ap.add_argument("--smoke", action="store_true", help="post-processing in this process instead of a fresh one "
                                                         "(no memory numbers; the test suite's smoke run)")
    ap.add_argument("--inplane", type=int, default=512, help="in-plane size of the CT (default 512; smaller for a "
                                                             "smoke run)")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--_post", choices=("nnunet", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--_model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._post:
        print("POST " + json.dumps(post_process(args._post, args._model, args.ct, args._out)))
        return 0

    from CalibUncertaintyLib.io.nifti_stream import codec_name

    work = Path(args.work or tempfile.mkdtemp(prefix="calibu_many_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        inp = work / "input"
        ct = inp / "case_0000.nii.gz"
        size, spacing = make_ct((args.ct or default_ct()).resolve(), ct, args.slices, args.inplane)
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        base_env = dict(os.environ, PYTHONPATH=pythonpath, nnUNet_raw=str(work / "raw"),
                        nnUNet_preprocessed=str(work / "pre"))
        vol_mib = size[0] * size[1] * size[2] * 4 / 2**20
        print(f"input: OpenKBP CT resampled to {size[0]}x{size[1]}x{size[2]}, spacing "
              f"{', '.join(f'{s:.3g}' for s in spacing)} mm (one float32 volume = {vol_mib:.0f} MiB); "
              f"network grid: 2x the in-plane spacing; folds {' '.join(args.folds)}; TTA off; CPU, "
              f"{os.cpu_count()} cores; output codec {codec_name()}")
        header = (f"{'K':>3s} {'nnU-Net s':>10s} {'predict s':>10s} {'nnU-Net MiB':>12s} {'predict MiB':>12s} "
                  f"{'mem ratio':>9s} | {'export s':>9s} {'ours s':>7s} {'ratio':>6s} {'export MiB':>11s} "
                  f"{'ours MiB':>9s} | {'export cpu s':>12s} {'ours cpu s':>10s} {'cpu ratio':>9s}")
        rows = []
        for k in args.k:
            model = build_model(work / "models", k, spacing, args.folds)
            plans = json.loads((model / "plans.json").read_text())
            results = work / "nnUNet_results" / plans["dataset_name"]
            results.mkdir(parents=True, exist_ok=True)
            if not (results / model.name).exists():
                (results / model.name).symlink_to(model)
            env = dict(base_env, nnUNet_results=str(work / "nnUNet_results"))
            row = {"k": k}
            if not args.skip_full:
                trainer, plans_name, config = model.name.split("__")
                ours = [str(BIN / "calib-uncertainty"), "predict", "-i", str(inp), "-m", str(model),
                        "-o", str(work / f"out_calibu_{k}"), "--ensemble", "deep", "--folds", *args.folds,
                        "--device", "cpu", "--no-tta"]
                theirs = [str(BIN / "nnUNetv2_predict"), "-i", str(inp), "-o", str(work / f"out_nnunet_{k}"),
                          "-d", plans["dataset_name"], "-tr", trainer, "-p", plans_name, "-c", config,
                          "-f", *args.folds, "-device", "cpu", "--save_probabilities",
                          "--disable_progress_bar", "--disable_tta"]
                for name, cmd in (("nnunet", theirs), ("predict", ours)):
                    r = run_measured(cmd, env, work / f"{name}_{k}.log")
                    if r["rc"] != 0:
                        print((work / f"{name}_{k}.log").read_text()[-3000:], file=sys.stderr)
                        sys.exit(f"K = {k}: {name} failed with exit code {r['rc']}")
                    row[name] = r
                    shutil.rmtree(work / f"out_{'calibu' if name == 'predict' else 'nnunet'}_{k}", ignore_errors=True)
            for kind in ("nnunet", "ours"):
                if args.smoke:
                    r = {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mib": float("nan"), "rc": 0,
                         **post_process(kind, model, ct, work / f"post_{kind}_{k}")}
                    row[f"post_{kind}"] = r
                    shutil.rmtree(work / f"post_{kind}_{k}", ignore_errors=True)
                    continue
                cmd = [sys.executable, __file__, "--_post", kind, "--_model", str(model), "--ct", str(ct),
                       "--_out", str(work / f"post_{kind}_{k}")]
                log = work / f"post_{kind}_{k}.log"
                r = run_measured(cmd, env, log)
                text = log.read_text()
                if r["rc"] != 0 or "POST " not in text:
                    print(text[-3000:], file=sys.stderr)
                    sys.exit(f"K = {k}: post-processing ({kind}) failed")
                r.update(json.loads(text.split("POST ", 1)[1].splitlines()[0]))
                row[f"post_{kind}"] = r
                shutil.rmtree(work / f"post_{kind}_{k}", ignore_errors=True)
            rows.append(row)
            pn, po = row["post_nnunet"], row["post_ours"]
            full = ("" if args.skip_full else
                    f"{row['nnunet']['wall_s']:10.1f} {row['predict']['wall_s']:10.1f} "
                    f"{row['nnunet']['peak_rss_mib']:12.0f} {row['predict']['peak_rss_mib']:12.0f} "
                    f"{row['predict']['peak_rss_mib'] / row['nnunet']['peak_rss_mib']:9.2f}")
            if len(rows) == 1:
                print(header)
            print(f"{k:3d} {full or ' ' * 56} | {pn['post_s']:9.1f} {po['post_s']:7.1f} "
                  f"{po['post_s'] / pn['post_s']:6.2f} {pn['peak_rss_mib']:11.0f} {po['peak_rss_mib']:9.0f} | "
                  f"{pn['post_cpu_s']:12.1f} {po['post_cpu_s']:10.1f} {po['post_cpu_s'] / pn['post_cpu_s']:9.2f}",
                  flush=True)
        print("whole runs: wall seconds and peak RSS (MiB) of nnUNetv2_predict --save_probabilities and "
              "calib-uncertainty predict; mem ratio = predict / nnU-Net")
        print("post-processing of one member's logits, each in a fresh process: nnU-Net's export "
              "(resample + softmax + .npz + seg) vs predict's (probabilities, maps, regions, writing); "
              "ratio = ours / export; MiB = that process's peak RSS; cpu s = CPU seconds of that step, all "
              "threads (what one core would need)")
        (work / "results.json").write_text(json.dumps(rows, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
