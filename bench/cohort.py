"""Benchmark: cases per hour of ``maps`` over a cohort, local executor vs Ray with 1 and 2 workers.

Real OpenKBP planning CTs (128³, read in place from ../shared/data/openkbp) with synthetic
nnU-Net-style members made from their labels (``synthetic.members.make_member_folders``; made
once into the work folder and reused; not timed). Each configuration writes the same cohort into
a fresh output folder through the library's ``pipeline.maps_job.run_maps`` — the code path of
``calib-uncertainty maps [--executor ray --workers N]``:

- local: the local executor (one case after the other in this process);
- ray-1 / ray-2: a local Ray runtime with 1 / 2 CPUs started for the run, one task per case.

Cases per hour are given on the wall time of the cohort (Ray: without and with the runtime's
start and stop, timed separately), with ratios to the local executor from the same run. The
per-stage seconds of each case come from its summary.json. Then a written estimate for 1,000
CTs from these per-stage times (and the per-member inference time measured by bench/openkbp.py),
with its arithmetic.

Usage:  python bench/cohort.py                        # 20 cases, 5 members
        python bench/cohort.py --cases 6 --members 3  # quicker
Writes the printed text to --out-md (default bench/results/cohort.md) when given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._openkbp_data import case_ids, find_dataset  # noqa: E402

# bench/openkbp.py (bench/results/openkbp.md): one tiny nnU-Net member on one 128³ CT, CPU, no TTA
OPENKBP_MEMBER_S_MEDIAN = 6.0


def _members(dataset: Path, work: Path, cases: list[str], n_members: int) -> list[Path]:
    from CalibUncertaintyLib.synthetic.members import make_member_folders

    root = work / f"members_{n_members}"
    record = root / "cases.json"
    if record.is_file() and json.loads(record.read_text()) == cases:
        return sorted(p for p in root.iterdir() if p.is_dir())
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    dirs = make_member_folders(dataset / "labelsTr", root, cases, n_members=n_members, seed=0)
    record.write_text(json.dumps(cases))
    print(f"(members made in {time.perf_counter() - t:.0f} s, not timed below)", flush=True)
    return dirs


def _run(name: str, pairing, work: Path, executor) -> dict:
    from CalibUncertaintyLib.cohort.ray_backend import ray_runtime
    from CalibUncertaintyLib.io.nnunet_outputs import member_name
    from CalibUncertaintyLib.pipeline.case import CaseOptions
    from CalibUncertaintyLib.pipeline.maps_job import run_maps

    out = work / f"out_{name}"
    shutil.rmtree(out, ignore_errors=True)
    names = [member_name(d) for d in pairing.cases[0].member_dirs]
    opts = CaseOptions(n_members=len(names), member_names=names)
    start_s = stop_s = 0.0
    if executor.kind == "ray":
        t0 = time.perf_counter()
        ctx = ray_runtime(executor)
        ctx.__enter__()
        start_s = time.perf_counter() - t0
    try:
        t = time.perf_counter()
        result = run_maps(pairing, None, opts, out, executor)
        run_s = time.perf_counter() - t
    finally:
        if executor.kind == "ray":
            t = time.perf_counter()
            ctx.__exit__(None, None, None)
            stop_s = time.perf_counter() - t
    if result.failed:
        raise SystemExit(f"{name}: cases failed: {result.failed}")
    stages = [json.loads((out / c / "summary.json").read_text())["timings_s"] for c in result.done]
    shutil.rmtree(out, ignore_errors=True)
    return {"name": name, "n": len(result.done), "run_s": run_s, "start_s": start_s, "stop_s": stop_s,
            "stages": stages}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "openkbp")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/calibu-bench-cohort"))
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--executors", nargs="+", default=["local", "ray-1", "ray-2"], choices=("local", "ray-1", "ray-2"),
                    help="executors to time (default all three; the estimate needs ray-1 and ray-2)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from CalibUncertaintyLib.cohort.executor import ExecutorOptions
    from CalibUncertaintyLib.io.nnunet_outputs import pair_cases

    dataset = find_dataset(args.data)
    cases = case_ids(dataset)[: args.cases]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    dirs = _members(dataset, work, cases, args.members)
    pairing = pair_cases(dirs, dataset / "imagesTr", None, cases)
    shape = "x".join(str(s) for s in pairing.cases[0].geometry.shape_zyx)

    options = {"local": ExecutorOptions(), "ray-1": ExecutorOptions(kind="ray", workers=1),
               "ray-2": ExecutorOptions(kind="ray", workers=2)}
    runs = [_run(name, pairing, work, options[name]) for name in ["local"] + [e for e in args.executors if e != "local"]]

    n = len(cases)
    lines = [f"maps over {n} OpenKBP CTs ({shape} voxels, z y x; {pairing.n_classes} classes), "
             f"{args.members} synthetic members each; {os.cpu_count()} CPU cores, {platform.machine()}, "
             f"Python {platform.python_version()}",
             "",
             "executor  | cases | cohort wall s | cases/hour | ratio to local | Ray start+stop s | "
             "cases/hour incl. start"]
    base = runs[0]["run_s"]
    for r in runs:
        cph = 3600 * r["n"] / r["run_s"]
        total = r["run_s"] + r["start_s"] + r["stop_s"]
        lines.append(f"{r['name']:<9} | {r['n']:>5} | {r['run_s']:>13.1f} | {cph:>10.0f} | "
                     f"{base / r['run_s']:>14.2f} | {r['start_s'] + r['stop_s']:>16.1f} | "
                     f"{3600 * r['n'] / total:>22.0f}")
    local = runs[0]["stages"]
    med = {k: statistics.median(s[k] for s in local) for k in local[0]}
    lines += ["", "per case, local executor (median of the cases' summary.json timings, s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in med.items())]

    t_maps = med["total_s"]
    t_member = OPENKBP_MEMBER_S_MEDIAN
    m = 5
    per_case_cpu = m * t_member + t_maps
    lines += ["", "Estimate for 1,000 CTs (arithmetic from the numbers above):", "",
              f"- maps stage per case, measured here: t_maps = {t_maps:.2f} s (one CPU, 128³).",
              f"- inference per member and case, measured by bench/openkbp.py on this machine (tiny CPU "
              f"nnU-Net, 128³ at 5 mm, no TTA): median t_inf = {t_member:.1f} s.",
              f"- one case with M = {m} members on one worker: M x t_inf + t_maps = {m} x {t_member:.1f} + "
              f"{t_maps:.2f} = {per_case_cpu:.1f} s.",
              f"- 1,000 cases on N workers, cases independent (no shared state but the results): "
              f"T(N) = ceil(1000 / N) x {per_case_cpu:.1f} s"]
    for nw in (1, 2, 8, 16):
        tn = math.ceil(1000 / nw) * per_case_cpu
        lines.append(f"  - N = {nw:>2}: ceil(1000/{nw}) x {per_case_cpu:.1f} s = {tn:,.0f} s = {tn / 3600:.2f} h")
    by = {r["name"]: r for r in runs}
    if "ray-1" in by and "ray-2" in by:
        r1, r2 = by["ray-1"], by["ray-2"]
        eff = (r1["run_s"] / r2["run_s"]) / 2
        lines += [f"- measured here: 2 Ray workers ran the cohort {r1['run_s'] / r2['run_s']:.2f}x as fast as 1 "
                  f"(parallel efficiency {eff:.2f} on this shared 2-core machine); the formula assumes 1.0, "
                  "i.e. each worker has its own cores/GPU and reads its case from shared storage."]
    lines += ["- on GPU workers replace t_inf by the GPU time of one member of your model (not measured in "
              "this project: no GPU here); the maps stage stays on the CPU: with C CPU cores beside N GPUs, "
              "throughput = min(N / (M x t_inf), C / t_maps) cases per second, and "
              "T = 1000 / that throughput."]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out_md:
        cmd = "python bench/cohort.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out_md.write_text(f"# Cohort benchmark: maps, local vs Ray\n\nCommand (repository root): "
                               f"`{cmd.strip()}`\n\nRun {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
                               f"printed:\n\n```\n{text}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
