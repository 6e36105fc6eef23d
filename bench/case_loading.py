"""Benchmark: loading a clinical-size case into a scene without blocking Slicer's GUI thread.

The case (``_big_case.py``): 512 x 512 x ``--slices`` voxels, ``--organs`` organs (default 40),
six maps, one probability and one margins file per organ, as ``predict`` writes them. It is
loaded into a fresh MRML scene (slicer-core) by ``mrml.case_loader.CaseLoader`` the way the
Slicer module drives it - ``step()`` after ``step()`` from a timer - and the time of every step
is recorded: the longest one is what the GUI thread is blocked for at most (wall seconds; the CPU
seconds of the same step are printed beside, as the wall time also counts other processes on a
shared machine). ``--one-shot`` also times ``load_case_outputs`` in one call (the same loader run
to the end) for the total.

    python bench/case_loading.py [--slices 300] [--organs 40] [--work DIR] [--one-shot] [--json OUT]

Prints one JSON object: steps, max / p99 / median step (wall and CPU seconds), total seconds,
peak RSS, and what the loaded case holds (maps, segments, margins segments).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--organs", type=int, default=40)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "calibu_bench_case_loading"))
    p.add_argument("--one-shot", action="store_true", help="also time load_case_outputs in one call")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)

    import numpy as np
    import slicer
    import vtk  # noqa: F401  (loaded before any module runs in Slicer; its first import is not loading)

    from _big_case import build_big_case
    from CalibUncertaintyLib.mrml.case_loader import CaseLoader

    t = time.perf_counter()
    case_dir = build_big_case(a.work, a.slices, a.organs)
    print(f"case folder ready in {time.perf_counter() - t:.1f} s: {case_dir}", file=sys.stderr)

    scene = slicer.vtkMRMLScene()
    loader = CaseLoader(scene, case_dir)
    walls, cpus, texts = [], [], []
    t0 = time.perf_counter()
    while not loader.done:
        w, c = time.perf_counter(), time.thread_time()
        loader.step()
        walls.append(time.perf_counter() - w)
        cpus.append(time.thread_time() - c)
        texts.append(loader.progress[1])
    total = time.perf_counter() - t0
    case = loader.result
    walls_a, cpus_a = np.array(walls), np.array(cpus)
    worst = int(np.argmax(walls_a))
    out = {
        "case": {"shape_zyx": [a.slices, 512, 512], "organs": a.organs, "maps": len(case.maps),
                 "segments": case.segmentation.GetSegmentation().GetNumberOfSegments(),
                 "margin_segments": case.margins.GetSegmentation().GetNumberOfSegments() if case.margins else 0,
                 "files_mb": round(sum(f.stat().st_size for f in Path(case_dir).iterdir()) / 1e6, 1)},
        "step_seconds_setting": loader.step_seconds,
        "steps": len(walls),
        "max_step_wall_s": round(float(walls_a.max()), 3), "max_step_during": texts[worst],
        "p99_step_wall_s": round(float(np.quantile(walls_a, 0.99)), 3),
        "median_step_wall_s": round(float(np.median(walls_a)), 3),
        "max_step_cpu_s": round(float(cpus_a.max()), 3),
        "p99_step_cpu_s": round(float(np.quantile(cpus_a, 0.99)), 3),
        "top_cpu_steps": [[round(float(cpus_a[i]), 3), round(float(walls_a[i]), 3), texts[i]]
                          for i in np.argsort(cpus_a)[::-1][:8]],
        "total_s": round(total, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    }
    if a.one_shot:
        from CalibUncertaintyLib.mrml.nodes import load_case_outputs

        scene2 = slicer.vtkMRMLScene()
        t = time.perf_counter()
        load_case_outputs(scene2, case_dir)
        out["one_call_s"] = round(time.perf_counter() - t, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
