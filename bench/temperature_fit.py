"""Benchmark: the pooled temperature fit on N ROI voxels with K classes, on one core.

Synthetic over-confident log-probabilities (row-wise log-softmax of 2 × noisy logits whose true
class is raised by 3), float32 (N, K) as ``collect_calibration_samples`` returns them. Prints the
wall and CPU seconds of ``TemperatureScaler().fit`` (safeguarded Newton on β = 1/T) and, with
``--reference``, of the former grid + bounded search on the float64 NLL, and both T.

    OMP_NUM_THREADS=1 python bench/temperature_fit.py [--n 5000000] [--k 6] [--reference]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5_000_000)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--reference", action="store_true", help="also time the former grid + bounded search")
    args = ap.parse_args(argv)
    from CalibUncertaintyLib.calibration import temperature as tm

    rng = np.random.default_rng(0)
    y = rng.integers(0, args.k, args.n)
    z = rng.standard_normal((args.n, args.k), dtype=np.float32) * np.float32(2)
    z[np.arange(args.n), y] += 3.0
    x = tm.log_softmax(z * np.float32(2), axis=1).astype(np.float32)
    del z
    print(f"N = {args.n} voxels, K = {args.k}, float32 log-probabilities; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    w, c = time.perf_counter(), time.process_time()
    s = tm.TemperatureScaler().fit(x, y)
    print(f"fit (Newton on 1/T)          T = {s.temperature_:.6f}  NLL {s.nll_before_:.6f} -> {s.nll_after_:.7f}  "
          f"wall {time.perf_counter() - w:.2f} s  CPU {time.process_time() - c:.2f} s")
    if args.reference:
        w, c = time.perf_counter(), time.process_time()
        ref = tm.TemperatureScaler()
        r = ref._grid_search(lambda t: tm._nll_pooled(x, y, t))
        print(f"former grid + bounded search T = {math.exp(r[0]):.6f}  NLL {r[2]:.6f} -> {r[1]:.7f}  "
              f"wall {time.perf_counter() - w:.2f} s  CPU {time.process_time() - c:.2f} s")
        print(f"|Δ log T| = {abs(s.log_temperature_ - r[0]):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
