"""Benchmark: streaming uncertainty maps vs a naive numpy baseline that holds every member.

For a (z, y, x) volume (default 300×512×512, spacing 0.8×0.8×2.5 mm), K = 2 classes and
M = 5 and 10 members, each variant runs in a fresh subprocess and reports its wall seconds and
peak memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that subprocess):

- streaming: members are generated one at a time, added to ``EnsembleAccumulator`` and dropped;
  then ``compute_maps`` computes all ten maps (DAE, EBCU and the 15 mm ROI included).
- naive: all M members are generated and held; the voxel measures are computed from the stack
  literally (EPKL as the mean of KL over all M² ordered member pairs, the variance with
  the textbook mean of squares minus squared mean); DAE and EBCU use the same library functions on the same p̄.

Members are synthetic: an ellipsoid "organ" whose logit is its signed distance in mm, an
interior blob of low-margin logits (a region of real doubt) and per-member Gaussian noise,
so the maps have both a contour shell and a blob. Generation time is measured separately and
excluded from the compute columns.

Usage:  python bench/maps.py                 # full size (about 15 minutes on 2 busy cores; naive M=10 peaks near 13 GB)
        python bench/maps.py --shape 64 128 128
        python bench/maps.py --ebcu            # EBCU alone: row decomposition vs sparse vs FFT
A subprocess is started per variant; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

SPACING_XYZ = (0.8, 0.8, 2.5)


def _base_logit(shape):
    """Signed-distance logit (positive inside) of an ellipsoid organ plus a doubtful blob, float32."""
    nz, ny, nx = shape
    sx, sy, sz = SPACING_XYZ
    z = ((np.arange(nz, dtype=np.float32) - nz / 2) * sz)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - ny / 2) * sy)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) - nx / 2) * sx)[None, None, :]
    rad = np.float32(0.35) * np.array([nz * sz, ny * sy, nx * sx], dtype=np.float32)
    # approximate signed distance (mm) to the ellipsoid surface, positive inside
    q = np.sqrt((z / rad[0]) ** 2 + (y / rad[1]) ** 2 + (x / rad[2]) ** 2)
    q -= np.float32(1.0)
    q *= np.float32(-rad.min())
    # a blob of doubt (radius 0.15 of the organ's smallest radius) off-centre inside the organ
    br = np.float32(0.15) * rad.min()
    blob = (z - rad[0] / 3) ** 2 + (y - rad[1] / 3) ** 2 + (x - rad[2] / 3) ** 2 <= br * br
    q[blob] = np.float32(0.3)
    return q


@np.errstate(over="ignore")
def _member(base, m, noise=0.5):
    """Member m: K=2 probabilities (2, z, y, x) float32 from base logit + member noise."""
    rng = np.random.default_rng(1000 + m)
    logit = rng.standard_normal(base.shape, dtype=np.float32)
    logit *= np.float32(noise)
    logit += base * np.float32(1.0 + 0.1 * m)
    np.negative(logit, out=logit)
    np.exp(logit, out=logit)
    logit += np.float32(1.0)
    p = np.empty((2,) + base.shape, dtype=np.float32)
    np.divide(np.float32(1.0), logit, out=p[1])
    np.subtract(np.float32(1.0), p[1], out=p[0])
    return p


def _naive_maps(members, geometry):
    """All maps from the held member list, the straightforward way (see module doc)."""
    from CalibUncertaintyLib.uncertainty.distance_aware import distance_aware_entropy
    from CalibUncertaintyLib.uncertainty.ebcu import default_threshold, ebcu
    from CalibUncertaintyLib.calibration.roi import roi_mask

    eps = np.float32(1e-12)
    m = len(members)
    k = members[0].shape[0]
    pbar = sum(members) / np.float32(m)
    out = {"confidence": pbar.max(axis=0)}
    pe = -(pbar * np.log(np.maximum(pbar, eps))).sum(axis=0)
    out["entropy"] = pe
    out["entropy_norm"] = pe / np.float32(np.log(k))
    ee = sum(-(p * np.log(np.maximum(p, eps))).sum(axis=0) for p in members) / np.float32(m)
    out["expected_entropy"] = ee
    out["mutual_information"] = np.maximum(pe - ee, 0)
    kl = np.zeros(pbar.shape[1:], np.float32)
    for a in members:
        for b in members:
            kl += (a * (np.log(np.maximum(a, eps)) - np.log(np.maximum(b, eps)))).sum(axis=0)
    out["epkl"] = kl / np.float32(m * m)
    pfg_mean = sum(1 - p[0] for p in members) / np.float32(m)
    out["fg_variance"] = np.maximum(sum((1 - p[0]) ** 2 for p in members) / np.float32(m) - pfg_mean ** 2, 0)
    q = sum((p.argmax(axis=0) > 0).astype(np.float32) for p in members) / np.float32(m)
    out["vote_disagreement"] = 1 - np.abs(2 * q - 1)
    seg = pbar.argmax(axis=0).astype(np.uint8)
    out["dae"] = distance_aware_entropy(pe, seg, geometry.spacing_zyx)
    t = default_threshold(pe, roi_mask(seg, geometry.spacing_zyx, 15.0, allow_empty=True))
    out["ebcu"] = ebcu(pe, geometry.spacing_zyx, 4.0, t)
    return out


def _child(variant, m, shape):
    from CalibUncertaintyLib.io.geometry import Geometry
    from CalibUncertaintyLib.uncertainty import EnsembleAccumulator, compute_maps

    t_start = time.perf_counter()
    geometry = Geometry(shape, SPACING_XYZ)
    base = _base_logit(shape)
    gen_s = time.perf_counter() - t_start
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    add_s = maps_s = 0.0
    if variant == "streaming":
        acc = EnsembleAccumulator(2, shape)
        for i in range(m):
            t0 = time.perf_counter()
            p = _member(base, i)
            t1 = time.perf_counter()
            acc.add(p)
            del p
            gen_s += t1 - t0
            add_s += time.perf_counter() - t1
        t0 = time.perf_counter()
        maps = compute_maps(acc, geometry)
        maps_s = time.perf_counter() - t0
    elif variant == "naive":
        t0 = time.perf_counter()
        members = [_member(base, i) for i in range(m)]
        gen_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        maps = _naive_maps(members, geometry)
        maps_s = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown variant {variant}")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checksum = {name: float(np.float64(a.sum(dtype=np.float64))) for name, a in maps.items()}
    print(json.dumps({"variant": variant, "m": m, "gen_s": gen_s, "add_s": add_s, "maps_s": maps_s,
                      "compute_s": add_s + maps_s, "wall_s": time.perf_counter() - t_start,
                      "peak_mb": peak_kb / 1024, "ready_mb": rss_ready / 1024, "sums": checksum}))


def _ebcu_child(shape):
    """Time EBCU on the synthetic entropy map: row decomposition, sparse scatter, and an FFT
    convolution (scipy.signal.fftconvolve, float32) as the reference alternative."""
    from scipy.signal import fftconvolve

    from CalibUncertaintyLib.calibration.roi import roi_mask
    from CalibUncertaintyLib.io.geometry import Geometry
    from CalibUncertaintyLib.uncertainty.ebcu import ball_kernel, default_threshold, ebcu
    from CalibUncertaintyLib.uncertainty.measures import entropy

    geometry = Geometry(shape, SPACING_XYZ)
    p = _member(_base_logit(shape), 0)
    h = entropy(p)
    seg = (p[1] > p[0]).astype(np.uint8)
    del p
    t = default_threshold(h, roi_mask(seg, geometry.spacing_zyx, 15.0, allow_empty=True))
    rows = {"excess voxels %": 100.0 * float((h > t).mean())}
    ref = None
    for method in ("auto", "rows", "sparse"):
        t0 = time.perf_counter()
        e = ebcu(h, geometry.spacing_zyx, 4.0, t, method=method)
        rows[method] = time.perf_counter() - t0
        ref = e if ref is None else ref
    t0 = time.perf_counter()
    k = ball_kernel(4.0, geometry.spacing_zyx).astype(np.float32)
    f = fftconvolve(np.maximum(h - np.float32(t), 0), k, mode="same") / np.float32(k.sum())
    rows["fft"] = time.perf_counter() - t0
    rows["fft max abs diff"] = float(np.abs(f - ref).max())
    print(json.dumps(rows))


def _run_child(variant, m, shape):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, str(m), "--shape", *map(str, shape)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{variant} M={m} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--members", type=int, nargs="+", default=(5, 10))
    ap.add_argument("--ebcu", action="store_true", help="time the EBCU methods (and an FFT) instead")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "M"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        if args.child[0] == "ebcu":
            _ebcu_child(shape)
        else:
            _child(args.child[0], int(args.child[1]), shape)
        return
    if args.ebcu:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "ebcu", "0", "--shape", *map(str, shape)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"EBCU on {shape} (r = 4 mm, t = 0.95 quantile of PE in the ROI; "
              f"{r['excess voxels %']:.2f} % of voxels above t), seconds:")
        for key in ("auto", "rows", "sparse", "fft"):
            print(f"  {key:7s} {r[key]:7.2f}")
        print(f"  FFT vs EBCU max abs difference: {r['fft max abs diff']:.2e}")
        return
    vox = int(np.prod(shape))
    print(f"volume {shape[0]}x{shape[1]}x{shape[2]} (z,y,x) = {vox / 1e6:.1f} M voxels, K = 2, "
          f"spacing {SPACING_XYZ} mm; one float32 volume = {vox * 4 / 2**20:.0f} MB")
    results = {}
    for m in args.members:
        for variant in ("streaming", "naive"):
            r = _run_child(variant, m, shape)
            results[(variant, m)] = r
            print(f"  done {variant:9s} M={m:<3d} compute {r['compute_s']:7.1f} s  peak {r['peak_mb']:8.0f} MB",
                  flush=True)
    print()
    print("start MB: RSS after imports and the shared synthetic logit field (same for both variants)")
    print(f"{'M':>3} | {'variant':9} | {'gen s':>6} | {'compute s':>9} | {'start MB':>8} | {'peak RSS MB':>11} | "
          f"{'naive/stream time':>17} | {'naive/stream mem':>16}")
    print("-" * 101)
    for m in args.members:
        s, n = results[("streaming", m)], results[("naive", m)]
        for r in (s, n):
            ratio_t = n["compute_s"] / s["compute_s"] if r is n else 1.0
            ratio_m = n["peak_mb"] / s["peak_mb"] if r is n else 1.0
            print(f"{m:>3} | {r['variant']:9} | {r['gen_s']:6.1f} | {r['compute_s']:9.1f} | "
                  f"{r['ready_mb']:8.0f} | {r['peak_mb']:11.0f} | {ratio_t:17.2f} | {ratio_m:16.2f}")
        worst = max(abs(s["sums"][k] - n["sums"][k]) / max(abs(n["sums"][k]), 1e-9) for k in s["sums"])
        print(f"    max relative difference of map sums, streaming vs naive: {worst:.2e}")
    ms = sorted(args.members)
    if len(ms) > 1:
        lo, hi = results[("streaming", ms[0])]["peak_mb"], results[("streaming", ms[-1])]["peak_mb"]
        nlo, nhi = results[("naive", ms[0])]["peak_mb"], results[("naive", ms[-1])]["peak_mb"]
        print(f"streaming peak memory M={ms[0]} -> M={ms[-1]}: {lo:.0f} -> {hi:.0f} MB ({hi / lo:.2f}x); "
              f"naive: {nlo:.0f} -> {nhi:.0f} MB ({nhi / nlo:.2f}x)")


if __name__ == "__main__":
    main()
