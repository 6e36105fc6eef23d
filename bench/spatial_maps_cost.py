"""CPU seconds of the three spatial computations of a case (ROI, DAE, EBCU) when the predicted
labels are scattered over the whole image, as a random-weight model's are (issue 9, item 2).

A synthetic 3-label volume of ``nz`` × 512 × 512 voxels (smoothed noise cut at its 0.5 and 0.8
quantiles) and a synthetic entropy; spacing ``sz`` × 0.976 × 0.976 mm.

    python bench/spatial_maps_cost.py [nz=64] [sz=5.0]
"""

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CalibUncertaintyLib.calibration.roi import roi_mask  # noqa: E402
from CalibUncertaintyLib.uncertainty.distance_aware import distance_aware_entropy  # noqa: E402
from CalibUncertaintyLib.uncertainty.ebcu import ebcu, effective_radius_mm  # noqa: E402


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    nz = int(argv[0]) if len(argv) > 0 else 64
    sz = float(argv[1]) if len(argv) > 1 else 5.0
    rng = np.random.default_rng(0)
    n = ndimage.gaussian_filter(rng.standard_normal((nz, 256, 256)).astype(np.float32), 2)
    n = ndimage.zoom(n, (1, 2, 2), order=1)
    lab = np.digitize(n, np.quantile(n, [0.5, 0.8])).astype(np.uint8)
    h = (np.abs(np.sin(n * 20)) * 0.7).astype(np.float32)
    sp = (sz, 0.976, 0.976)
    print(f"{nz}x512x512, spacing {sz:g} x 0.976 x 0.976 mm, 3 labels scattered over the image")
    for name, fn in (("ROI (15 mm)", lambda: roi_mask(lab, sp, 15.0, allow_empty=True)),
                     ("DAE", lambda: distance_aware_entropy(h, lab, sp, 2.0)),
                     ("EBCU", lambda: ebcu(h, sp, effective_radius_mm(4.0, sp), float(np.quantile(h, 0.95))))):
        c = time.process_time()
        fn()
        print(f"{name:12s} {time.process_time() - c:6.2f} s CPU", flush=True)


if __name__ == "__main__":
    main()
