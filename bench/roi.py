"""Benchmark: the 15 mm ROI (``calibration.roi.roi_mask``) against one 3-D distance transform.

Baseline: scipy's ``distance_transform_edt`` of the background on the foreground's bounding box
padded by the radius, thresholded at R (what a direct implementation does). ``roi_mask`` combines
in-plane transforms of the slices within reach instead. Each variant runs in a fresh process on the
same synthetic label volume (blobs in a 200×512×512 grid, spacing 2.5×1.17×1.17 mm, R = 15 mm);
printed: seconds, peak RSS of the process, ratios, and whether the masks are equal.

    python bench/roi.py [--shape 200 512 512] [--radius 15]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACING = (2.5, 1.17, 1.17)


def labels(shape):
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(0)
    lab = np.zeros(shape, np.uint8)
    z, y, x = shape
    box = (slice(z * 3 // 10, z * 7 // 10), slice(y * 3 // 10, y * 7 // 10), slice(x * 35 // 100, x * 65 // 100))
    sub = tuple(s.stop - s.start for s in box)
    lab[box] = ndimage.gaussian_filter(rng.random(sub), 3) > 0.52
    return lab


def run_variant(variant: str, shape, radius: float) -> dict:
    import numpy as np
    from scipy import ndimage

    lab = labels(shape)
    start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    if variant == "roi_mask":
        sys.path.insert(0, str(REPO))
        from CalibUncertaintyLib.calibration.roi import roi_mask

        roi = roi_mask(lab, SPACING, radius)
    else:
        fg = lab > 0
        lo, hi = [], []
        for axis in range(3):
            c = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
            pad = int(math.ceil(radius / SPACING[axis])) + 1
            lo.append(max(int(c[0]) - pad, 0))
            hi.append(min(int(c[-1]) + pad + 1, shape[axis]))
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        roi = np.zeros(shape, bool)
        roi[box] = ndimage.distance_transform_edt(~fg[box], sampling=SPACING) <= radius
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "start_mb": start_mb,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "n_roi": int(roi.sum()), "sha1": hashlib.sha1(np.packbits(roi).tobytes()).hexdigest()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(200, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--radius", type=float, default=15.0, help="ROI radius in mm (default 15)")
    ap.add_argument("--variant", choices=("roi_mask", "edt3d"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, tuple(args.shape), args.radius)))
        return 0
    rows = {}
    for variant in ("edt3d", "roi_mask"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--shape", *map(str, args.shape),
                              "--radius", str(args.radius)], capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"labels {args.shape[0]}x{args.shape[1]}x{args.shape[2]}, spacing {SPACING} mm (z, y, x), R = {args.radius:g} mm")
    print(f"{'variant':24s} {'seconds':>8s} {'peak RSS MB':>12s} {'above start MB':>15s} {'ROI voxels':>11s}")
    for name, label in (("edt3d", "3-D transform (baseline)"), ("roi_mask", "roi_mask")):
        r = rows[name]
        print(f"{label:24s} {r['seconds']:8.2f} {r['peak_mb']:12.0f} {r['peak_mb'] - r['start_mb']:15.0f} {r['n_roi']:11d}")
    a, b = rows["roi_mask"], rows["edt3d"]
    print(f"ratio roi_mask / baseline: time {a['seconds'] / b['seconds']:.2f}, memory above start "
          f"{(a['peak_mb'] - a['start_mb']) / max(b['peak_mb'] - b['start_mb'], 1e-9):.2f}; "
          f"masks equal: {a['sha1'] == b['sha1']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
