"""Peak memory of ``calib-uncertainty maps`` on nnU-Net's own ``--save_probabilities`` outputs
(issue 19): within 2K + 8 float32 volumes above what the process held after its imports, at
K = 14 with 3 members. Each member's deflated ``.npz`` is read one z slab at a time
(``io.npz_stream``); before, ``np.load`` gave the whole (K, z, y, x) array and the previous member
was still held while the next was read: 2K + 3.5K volumes (the issue measured 55.1 at K = 14).

Runs in a fresh subprocess (Linux /proc: VmHWM reset through /proc/self/clear_refs). Slabs are one
z slice, as on a 512 x 512 CT (the default slab is 2**18 voxels), so that the slab temporaries
are as small a part of a volume as at clinical size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(r'''
    import json, pickle, sys, zipfile
    from pathlib import Path
    import numpy as np
    from scipy import ndimage

    K, SHAPE, M = 14, (72, 160, 160), 3
    work = Path(sys.argv[1])
    from CalibUncertaintyLib.io.geometry import Geometry
    geo = Geometry(SHAPE, (1.0, 1.0, 2.5))
    props = {"sitk_stuff": {"spacing": geo.spacing, "origin": geo.origin, "direction": geo.direction}}
    rng = np.random.default_rng(7)
    low = rng.normal(size=(K, 9, 5, 5))
    dirs = []
    for m in range(M):  # nnU-Net's layout: deflated probabilities.npy (K, z, y, x) float32 + pkl
        z = ndimage.zoom(low * 3.0 + rng.normal(0, 0.6, low.shape), (1, 8, 32, 32), order=1).astype(np.float32)
        z[0] += 2.5
        p = np.exp(z - z.max(axis=0))
        p /= p.sum(axis=0)
        d = work / f"fold_{m}"
        d.mkdir()
        with zipfile.ZipFile(d / "case.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            with zf.open("probabilities.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, p.astype(np.float32))
        with open(d / "case.pkl", "wb") as f:
            pickle.dump(props, f)
        dirs.append(str(d))
        del z, p

    from CalibUncertaintyLib.uncertainty import streaming
    streaming.EnsembleAccumulator.__init__.__defaults__ = (SHAPE[1] * SHAPE[2],)
    streaming.z_slabs.__defaults__ = (SHAPE[1] * SHAPE[2],)
    from CalibUncertaintyLib.cli.main import main
    import CalibUncertaintyLib.calibration.roi, CalibUncertaintyLib.regions.components  # imports first
    import CalibUncertaintyLib.pipeline.case, CalibUncertaintyLib.pipeline.maps_job
    from CalibUncertaintyLib.io.nifti_stream import nifti_header
    nifti_header(geo, np.float32)  # loads ITK (about 110 MB, once)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    rc = main(["maps", "--members", *dirs, "-o", str(work / "out")])
    peak = status("VmHWM")
    files = sorted(p.name for p in (work / "out" / "case").iterdir())
    print("RESULT " + json.dumps({"rc": rc, "above": peak - base, "volume": int(np.prod(SHAPE)) * 4, "k": K,
                                  "files": files}))
''')


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_maps_on_nnunet_npz_members_stays_within_2k_plus_8_volumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert r["rc"] == 0 and len([f for f in r["files"] if f.startswith("map_")]) == 10, r["files"]
    volumes = r["above"] / r["volume"]
    print(f"maps from .npz members: peak {volumes:.1f} float32 volumes above the start at K = {r['k']}")
    # the sums while members are added are 2K + 2.25 volumes (uncertainty/streaming.py); the rest is
    # one slab per class being decoded, the validation pass's class sum (one volume) and allocator noise
    assert volumes <= 2 * r["k"] + 8, volumes
