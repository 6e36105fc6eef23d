"""Benchmark: ``calib-uncertainty predict`` against ``nnUNetv2_predict`` on the same model and image.

Both run as separate processes with the same model folder, folds, checkpoint, input, device and
TTA setting; nnU-Net with ``--save_probabilities`` (it writes the averaged probabilities and the
segmentation; ``predict`` additionally writes per-member-derived maps, calibrated probabilities and
error regions). Printed per tool: wall time and peak resident memory of the process tree
(``ru_maxrss`` from ``os.wait4``: the largest single process, including nnU-Net's worker processes
once reaped), and the ratios predict / nnU-Net.

``nnUNetv2_predict`` finds models by dataset name under ``$nnUNet_results``; the script makes a
temporary results tree of symbolic links to the model folder, so any trained model folder works.

Without ``--model`` it builds a tiny random-weight nnU-Net model folder (Testing/Python/tiny_nnunet.py)
and predicts a real OpenKBP CT (``--ct``; default: the first OpenKBP training CT in
``$CALIBU_SHARED`` or ``../shared``), linked into a temporary input folder (never copied).

    python bench/predict_vs_nnunet.py [--model DIR] [--ct FILE] [--folds 0 1 2] [--no-tta] [--device cpu] [--trace] [--tiny-folds N] [--gpu-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# where the console scripts are (CALIBU_BENCH_BIN: e.g. a `pip install --target DIR` install's DIR/bin)
BIN = Path(os.environ.get("CALIBU_BENCH_BIN") or Path(sys.executable).parent)


def default_ct() -> Path:
    shared = Path(os.environ.get("CALIBU_SHARED", REPO.parent / "shared"))
    images = shared / "data" / "openkbp" / "Dataset501_OpenKBP_HN_OAR" / "imagesTr"
    found = sorted(images.glob("*_0000.nii.gz"))
    if not found:
        sys.exit(f"no OpenKBP CT under {images}; pass --ct FILE")
    return found[0]


def run_measured(cmd: list[str], env: dict, log_path: Path) -> dict:
    """Run ``cmd``; return wall seconds, CPU seconds (user + system, the process and its reaped
    children), peak RSS in MiB and the exit code."""
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024.0,
            "rc": proc.returncode}


class GpuMemorySampler:
    """Peak of the device's used memory (MiB, ``nvidia-smi``, every 100 ms) while a command runs,
    minus what was used before it started. For a machine with one GPU and nothing else on it."""

    def __init__(self):
        self.proc = None

    @staticmethod
    def used_mib() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return max(float(v) for v in out.split())

    def __enter__(self):
        self.before = self.used_mib()
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-lms", "100"], stdout=self.log, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        self.log.seek(0)
        values = [float(v) for v in self.log.read().split() if v.replace(".", "", 1).isdigit()]
        self.peak_mib = max(values, default=self.before) - self.before
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="nnU-Net trained model folder (default: build a tiny one)")
    ap.add_argument("--ct", type=Path, help="input CT (default: first OpenKBP training CT)")
    ap.add_argument("--folds", nargs="+", default=None, help="folds (default: all folds of the model)")
    ap.add_argument("--tiny-folds", type=int, default=3, metavar="N",
                    help="without --model: number of folds of the tiny random-weight model (default 3)")
    ap.add_argument("--checkpoint", default="checkpoint_final.pth")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    ap.add_argument("--tiny-classes", type=int, default=3, metavar="K",
                    help="without --model: classes of the tiny random-weight model (default 3)")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--gpu-memory", action="store_true",
                    help="also sample the GPU's used memory with nvidia-smi during each run (bench/gpu_check.sh)")
    ap.add_argument("--nnunet-workers", type=int, default=None, metavar="N",
                    help="nnUNetv2_predict's -npp and -nps (preprocessing and export processes; default nnU-Net's "
                         "own, 3 each)")
    ap.add_argument("--skip-nnunet", action="store_true",
                    help="run predict only, no baseline and no ratios (the test suite's smoke run: nnUNetv2_predict "
                         "and its worker processes cost about 30 s of imports)")
    ap.add_argument("--trace", action="store_true",
                    help="afterwards run predict once more with a per-stage memory trace (bench/_memory_trace.py; "
                         "Linux) and print it")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="calibu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.model is None:
            sys.path.insert(0, str(REPO / "Testing" / "Python"))
            from tiny_nnunet import build_tiny_model_folder

            model = build_tiny_model_folder(work / "model", folds=tuple(range(args.tiny_folds)),
                                            n_classes=min(args.tiny_classes, 6))
        else:
            model = args.model.resolve()
        plans = json.loads((model / "plans.json").read_text())
        dataset = json.loads((model / "dataset.json").read_text())
        trainer, plans_name, config = model.name.split("__")
        folds = args.folds or sorted((p.name[5:] for p in model.glob("fold_*")
                                      if (p / args.checkpoint).is_file()), key=lambda f: (f == "all", f))
        ct = (args.ct or default_ct()).resolve()
        inp = work / "input"
        inp.mkdir(exist_ok=True)
        link = inp / f"case_0000{dataset.get('file_ending', '.nii.gz')}"
        if not link.exists():
            link.symlink_to(ct)
        results = work / "nnUNet_results" / plans["dataset_name"]
        results.mkdir(parents=True, exist_ok=True)
        if not (results / model.name).exists():
            (results / model.name).symlink_to(model)

        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=pythonpath, nnUNet_results=str(work / "nnUNet_results"),
                   nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"))
        ours = [str(BIN / "calib-uncertainty"), "predict", "-i", str(inp), "-m", str(model),
                "-o", str(work / "out_calibu"), "--ensemble", "deep", "--folds", *folds,
                "--checkpoint", args.checkpoint, "--device", args.device, "--tta" if args.tta else "--no-tta"]
        theirs = [str(BIN / "nnUNetv2_predict"), "-i", str(inp), "-o", str(work / "out_nnunet"),
                  "-d", plans["dataset_name"], "-tr", trainer, "-p", plans_name, "-c", config,
                  "-f", *folds, "-chk", args.checkpoint, "-device", args.device, "--save_probabilities",
                  "--disable_progress_bar"] + ([] if args.tta else ["--disable_tta"]) \
            + ([] if args.nnunet_workers is None else ["-npp", str(args.nnunet_workers), "-nps", str(args.nnunet_workers)])

        rows = {}
        tools = (("nnUNetv2_predict", theirs), ("calib-uncertainty predict", ours))
        for name, cmd in tools[1:] if args.skip_nnunet else tools:
            if args.gpu_memory:
                with GpuMemorySampler() as gpu:
                    r = run_measured(cmd, env, work / f"{name.split()[0]}.log")
                r["peak_gpu_mib"] = gpu.peak_mib
            else:
                r = run_measured(cmd, env, work / f"{name.split()[0]}.log")
            if r["rc"] != 0:
                print((work / f"{name.split()[0]}.log").read_text()[-3000:], file=sys.stderr)
                sys.exit(f"{name} failed with exit code {r['rc']}")
            rows[name] = r
        summary = work / "out_calibu" / "case" / "summary.json"
        timings = {}
        if summary.is_file():
            s = json.loads(summary.read_text())
            t = s["prediction"]["timings_s"]
            timings = {"load model": t["load_model_s"], "preprocess": t["preprocess_s"],
                       "inference (all members)": t["inference_s"],
                       "maps + regions + write": s["timings_s"]["total_s"] - t["inference_s"]}

        import SimpleITK as sitk

        size = sitk.ReadImage(str(ct)).GetSize()
        print(f"model: {model.name} folds {' '.join(folds)} ({args.checkpoint}), device {args.device}, "
              f"TTA {'on' if args.tta else 'off'}; input {ct.name} {size[0]}x{size[1]}x{size[2]}; "
              f"{os.cpu_count()} CPU cores")
        print(f"{'tool':28s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MiB':>13s}")
        for name, r in rows.items():
            print(f"{name:28s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss_mib']:13.0f}")
        a, b = rows["calib-uncertainty predict"], rows.get("nnUNetv2_predict")
        ratios = {} if b is None else {"wall": a["wall_s"] / b["wall_s"], "cpu": a["cpu_s"] / b["cpu_s"],
                                       "peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"]}
        if ratios:
            print(f"{'ratio predict / nnU-Net':28s} {ratios['wall']:8.2f} {ratios['cpu']:8.2f} "
                  f"{ratios['peak_rss']:13.2f}")
        if args.gpu_memory and ratios:
            for name, r in rows.items():
                print(f"{name:28s} peak GPU memory used {r['peak_gpu_mib']:8.0f} MiB (nvidia-smi, above idle)")
            ratios["peak_gpu"] = a["peak_gpu_mib"] / max(b["peak_gpu_mib"], 1.0)
            print(f"{'ratio predict / nnU-Net':28s} peak GPU memory {ratios['peak_gpu']:.2f}")
        print("(wall time depends on the load of the machine; CPU seconds much less so)")
        if timings:
            print("predict's own timings (summary.json): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        if args.trace:
            trace_cmd = [sys.executable, str(REPO / "bench" / "_memory_trace.py"), *ours[1:]]
            trace_cmd[trace_cmd.index("-o") + 1] = str(work / "out_trace")
            out = subprocess.run(trace_cmd, env=env, capture_output=True, text=True)
            print("memory trace of predict (MiB; the peak is since the previous line):")
            for line in out.stderr.splitlines():
                if line.startswith("MEMTRACE "):
                    print("  " + line[len("MEMTRACE "):])
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "timings": timings,
                                             "folds": folds, "tta": args.tta, "device": args.device,
                                             "input": ct.name}, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
