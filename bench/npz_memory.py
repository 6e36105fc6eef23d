"""Benchmark: peak memory of ``maps`` / ``fit-temperature`` / ``evaluate`` on nnU-Net's own outputs.

For each K (default 6, 14, 25) three member folders are written as ``nnUNetv2_predict
--save_probabilities`` writes them (``<case>.npz`` deflated, holding ``probabilities``
(K, z, y, x) float32, ``<case>.pkl`` with ``sitk_stuff``; here deflate level 1 to save time, the
format is the same), plus a CT-like image and a label map, on a ``--shape`` grid (default
80 x 512 x 512, as issue 19 measured). Each command then runs in a fresh process, in-process
through the CLI's ``main``: the resident memory after the imports is the baseline, and the peak
above it (``VmHWM`` after ``/proc/self/clear_refs``; Linux) is printed in float32 volumes of the
grid, against the issue's budget 2K + 8.

    python bench/npz_memory.py [--k 6 14 25] [--shape 80 512 512] [--members 3]
                               [--commands maps fit-temperature evaluate] [--work DIR]

Big grids need memory: writing a member holds K float32 volumes in this process (K = 25 at
80 x 512 x 512: 2.1 GB); on a shared machine, run it when no other big job runs (e.g. under ``flock`` on a lock file the jobs share).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMANDS = ("maps", "fit-temperature", "evaluate")
SPACING_XYZ = (0.98, 0.98, 2.5)


def member_probabilities(k: int, shape, m: int) -> np.ndarray:
    """Softmax of smooth class fields (one low-resolution field per class, upsampled) plus a
    member-specific perturbation: organ-like blobs that members draw a little differently."""
    from scipy import ndimage

    rng = np.random.default_rng(1000 * k)
    nz, ny, nx = shape
    low = (max(2, nz // 8), max(2, ny // 32), max(2, nx // 32))
    field = rng.normal(size=(k,) + low).astype(np.float32)
    noise = np.random.default_rng(1000 * k + m + 1).normal(size=(k,) + low).astype(np.float32)
    out = np.empty((k,) + tuple(shape), np.float32)
    for c in range(k):
        f = field[c] * 3.0 + noise[c] * 0.6 + (2.5 if c == 0 else 0.0)
        out[c] = ndimage.zoom(f, [s / lo for s, lo in zip(shape, low)], order=1)[:nz, :ny, :nx]
    out -= out.max(axis=0)
    np.exp(out, out=out)
    out /= out.sum(axis=0)
    return out


def write_npz(path: Path, probs: np.ndarray) -> None:
    """``probabilities`` as np.savez_compressed stores it (a deflated probabilities.npy), level 1."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("probabilities.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, probs, allow_pickle=False)


def write_case(work: Path, k: int, shape, n_members: int) -> dict:
    from CalibUncertaintyLib.io.geometry import Geometry
    from CalibUncertaintyLib.io.images import write_image

    geo = Geometry(tuple(shape), SPACING_XYZ)
    props = {"sitk_stuff": {"spacing": geo.spacing, "origin": geo.origin, "direction": geo.direction},
             "spacing": list(geo.spacing_zyx), "shape_before_cropping": tuple(shape),
             "bbox_used_for_cropping": [[0, s] for s in shape],
             "shape_after_cropping_and_before_resampling": tuple(shape)}
    dataset = {"labels": {"background": 0, **{f"Structure_{c:02d}": c for c in range(1, k)}},
               "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    dirs, mean = [], None
    for m in range(n_members):
        d = work / f"fold_{m}"
        d.mkdir(parents=True, exist_ok=True)
        p = member_probabilities(k, shape, m)
        write_npz(d / "case.npz", p)
        with open(d / "case.pkl", "wb") as f:
            pickle.dump(props, f)
        (d / "dataset.json").write_text(json.dumps(dataset))
        if mean is None:
            mean = p
        else:
            mean += p
        del p
        dirs.append(d)
    seg = np.argmax(mean, axis=0).astype(np.uint8)
    del mean
    # the reference: the ensemble's prediction with a slab of one organ relabelled (errors to find)
    ref = seg.copy()
    z = shape[0] // 2
    ref[z:z + 2][ref[z:z + 2] == 1] = 2 % k
    write_image(work / "labels" / "case.nii.gz", ref, geo)
    ct = np.where(seg > 0, 40, -1000).astype(np.int16)
    ct[:, : shape[1] // 16] = -1024
    write_image(work / "images" / "case_0000.nii.gz", ct, geo)
    return {"members": [str(d) for d in dirs], "labels": str(work / "labels"), "images": str(work / "images")}


def child(command: str, case: dict, work: Path) -> None:
    """Run one command in this process; print the peak resident memory above the post-import baseline."""
    from CalibUncertaintyLib.cli.main import main as cli
    import CalibUncertaintyLib.calibration.roi  # noqa: F401  (what the commands import, first)
    import CalibUncertaintyLib.pipeline.case  # noqa: F401
    import CalibUncertaintyLib.pipeline.evaluate  # noqa: F401
    import CalibUncertaintyLib.pipeline.fit  # noqa: F401
    import CalibUncertaintyLib.regions.components  # noqa: F401
    import CalibUncertaintyLib.report.plots  # noqa: F401
    import scipy.ndimage  # noqa: F401

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    cal = str(work / "cal.json")
    argv = {"maps": ["maps", "--members", *case["members"], "-o", str(work / "out_maps")],
            "fit-temperature": ["fit-temperature", "--members", *case["members"], "--labels", case["labels"],
                                "-o", cal],
            "evaluate": ["evaluate", "--members", *case["members"], "--labels", case["labels"], "--images",
                         case["images"], "--calibration", cal, "-o", str(work / "out_eval")]}[command]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    rc = cli(argv)
    peak = status("VmHWM")
    print("RESULT " + json.dumps({"rc": rc, "above": peak - base, "wall_s": time.perf_counter() - t0,
                                  "cpu_s": time.process_time() - c0}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[6, 14, 25])
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    ap.add_argument("--work", type=Path)
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        child(args._child[0], json.loads(args._child[1]), Path(args._child[2]))
        return 0

    work_root = Path(args.work or tempfile.mkdtemp(prefix="calibu_npzmem_"))
    vol = int(np.prod(args.shape)) * 4
    print(f"grid {args.shape[0]}x{args.shape[1]}x{args.shape[2]} (one float32 volume = {vol / 2**20:.0f} MiB), "
          f"{args.members} members as nnU-Net writes them (deflated .npz); peak resident memory above the "
          f"imports, in float32 volumes; budget 2K + 8", flush=True)
    print(f"{'K':>3s} {'command':>16s} {'peak MiB':>9s} {'volumes':>8s} {'2K+8':>6s} {'wall s':>7s} {'cpu s':>7s}")
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    try:
        for k in args.k:
            work = work_root / f"k{k}"
            shutil.rmtree(work, ignore_errors=True)
            case = write_case(work, k, args.shape, args.members)
            for command in args.commands:
                out = subprocess.run([sys.executable, __file__, "--_child", command, json.dumps(case), str(work)],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0 or "RESULT " not in out.stdout:
                    print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
                if r["rc"] != 0:
                    print(out.stderr[-4000:], file=sys.stderr)
                    return 1
                volumes = r["above"] / vol
                rows.append({"k": k, "command": command, **r, "volumes": volumes})
                print(f"{k:3d} {command:>16s} {r['above'] / 2**20:9.0f} {volumes:8.1f} {2 * k + 8:6d} "
                      f"{r['wall_s']:7.1f} {r['cpu_s']:7.1f}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
