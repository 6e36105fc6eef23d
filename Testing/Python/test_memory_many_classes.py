"""Peak memory of a 14-class case (issue 9): ``process_case`` — accumulation, calibrated
probabilities, every map, regions, writing — stays within 2K + 3 float32 volumes above what the
process held before the first member: about the memory nnU-Net's own export needs for the same
probabilities (its logits resampled, their softmax and the re-inserted probabilities; see
bench/results/many_classes.md for the side-by-side measurement). Members come as predict gives them: computed per z
slab on demand (no member volume), as ``nnunet.member_probabilities.MemberProbabilities`` does.

Runs in a fresh subprocess (Linux /proc: VmHWM reset through /proc/self/clear_refs)."""

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
    import json, sys
    import numpy as np
    from CalibUncertaintyLib.io.geometry import Geometry
    from CalibUncertaintyLib.pipeline.case import CaseOptions, process_case
    import CalibUncertaintyLib.calibration.roi, CalibUncertaintyLib.regions.components  # imports first
    import scipy.ndimage
    from CalibUncertaintyLib.io.nifti_stream import nifti_header

    K, SHAPE = 14, (72, 160, 160)
    geom = Geometry(SHAPE, (2.5, 1.0, 1.0))
    # one z slice per slab, as on a 512 x 512 CT (the default slab is 2**18 voxels): the slab
    # temporaries then stay as small a part of a volume as they are at clinical size
    from CalibUncertaintyLib.uncertainty import streaming
    streaming.EnsembleAccumulator.__init__.__defaults__ = (SHAPE[1] * SHAPE[2],)
    streaming.z_slabs.__defaults__ = (SHAPE[1] * SHAPE[2],)

    class Member:  # softmax of smooth class "organs" plus member noise, per z slab on demand
        ndim, dtype = 4, np.dtype(np.float32)
        valid_probabilities = True
        def __init__(self, m):
            self.m, self.shape = m, (K,) + SHAPE
        def slab(self, sl):
            z, y, x = np.ogrid[sl, :SHAPE[1], :SHAPE[2]]
            out = np.empty((K, sl.stop - sl.start) + SHAPE[1:], np.float32)
            for c in range(K):
                cy, cx = 20 + 9 * c, 25 + 8 * c
                d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2 + ((z - 36) * 2.5) ** 2) - 14
                out[c] = -d / (2.0 + 0.3 * self.m) + (3.0 if c == 0 else 0.0)
            out -= out.max(axis=0)
            np.exp(out, out=out)
            out /= out.sum(axis=0)
            return out

    class LogitsMember:  # as predict gives them: float16 logits on a network grid of half the
        # in-plane resolution, resampled per output slab (nnunet.slab_resampling), softmax per slab
        def __new__(cls, m):
            from functools import partial
            from types import SimpleNamespace
            import torch
            from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
            from CalibUncertaintyLib.nnunet.member_probabilities import MemberProbabilities
            net = (SHAPE[0], SHAPE[1] // 2, SHAPE[2] // 2)
            z, y, x = (a.astype(np.float32) for a in np.ogrid[:net[0], :net[1], :net[2]])
            logits = np.empty((K,) + net, np.float16)
            for c in range(K):  # one float32 network-grid temporary at a time
                d = ((z - 36) * 2.5) ** 2 + (2 * y - 20 - 9 * c) ** 2
                d = d + (2 * x - 25 - 8 * c) ** 2
                np.sqrt(d, out=d)
                d -= 14
                d *= np.float32(-1.0 / (2.0 + 0.3 * m))
                logits[c] = d + (3.0 if c == 0 else 0.0)
                del d
            props = {"spacing": [2.5, 1.0, 1.0], "shape_after_cropping_and_before_resampling": SHAPE,
                     "shape_before_cropping": SHAPE, "bbox_used_for_cropping": [[0, s] for s in SHAPE]}
            pm = SimpleNamespace(transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2])
            cm = SimpleNamespace(spacing=[2.5, 2.0, 2.0], resampling_fn_probabilities=partial(
                resample_data_or_seg_to_shape, is_seg=False, order=1, order_z=0, force_separate_z=None))
            lm = SimpleNamespace(inference_nonlin=lambda t: torch.softmax(t, 0), has_regions=False)
            member = MemberProbabilities(torch.from_numpy(logits), pm, cm, lm, props, SHAPE)
            assert member._resampler is not None
            return member

    make = LogitsMember if sys.argv[2] == "logits" else Member
    if sys.argv[2] == "logits":
        import torch
        from CalibUncertaintyLib.nnunet import member_probabilities, slab_resampling
        LogitsMember(0).slab(slice(0, 1))

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    Member(0).slab(slice(0, 2))
    nifti_header(geom, np.float32)  # loads ITK (about 110 MB, once), as reading the CT does in predict
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    s = process_case("c", (make(m) for m in range(3)), geom, sys.argv[1], None,
                     ["background"] + [f"S{c}" for c in range(1, K)], CaseOptions(n_members=3))
    peak = status("VmHWM")
    print("RESULT " + json.dumps({"above": peak - base, "volume": int(np.prod(SHAPE)) * 4, "k": K,
                                  "files": len(s["files"])}))
''')


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
@pytest.mark.parametrize("members", ["slabs", "logits"])
def test_fourteen_class_case_stays_within_about_two_k_volumes(tmp_path, members):
    """``slabs``: members computed per slab (``maps`` reading member files gives the same peak);
    ``logits``: members as ``predict`` gives them, float16 logits on a coarser network grid
    (held, K/8 float32 volumes here) resampled to the image grid per slab."""
    if members == "logits":
        pytest.importorskip("nnunetv2")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), members], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert r["files"] == 1 + 13 + 10 + 2  # seg, 13 probabilities, 10 maps, regions, summary
    volumes = r["above"] / r["volume"]
    print(f"peak above the start: {volumes:.1f} float32 volumes at K = {r['k']}")
    # 2K float32 volumes (about what nnU-Net's export holds for the same probabilities) plus 3 for
    # the copies the ROI statistics and thresholds take (a mask-selected copy of a map, its sorted
    # float64 copy in calibration/thresholds.py) and slab temporaries, plus 1 for the map being
    # compressed in the writer thread while the next is computed (measured: 2K + 2.3); before
    # issue 9 the sums alone were 2K + 2.5 and the calibrated probabilities another K. Since issue
    # 19 the peak is the accumulation of the third member: the sums with float32 Jensen gaps
    # (2K + 2.25 volumes; EPKL exact, uncertainty/streaming.py) plus one slab read ahead and the
    # member's temporaries (measured 2K + 3.2; the maps stage, after the gaps are reduced to one
    # volume, stays below it). Members
    # as predict gives them also hold their float16 logits on the network grid (K / 8 volumes
    # here; nnU-Net's export receives the same logits) and torch's per-slab resampling
    # temporaries. That peak varies from run to run with the timing of the writer threads (each
    # thread's glibc malloc arena keeps what it freed until trimmed): 2K + 4.6 to 2K + 5.8 over six
    # runs here and in CI (with MALLOC_ARENA_MAX=1: 2K + 3.2 to 2K + 4.2), hence one more volume
    # of allowance for the logits case (since issue 19: 2K + 5.6, the third member's accumulation;
    # one slab read ahead instead of two, and the previous member no longer held while the next is
    # made). A regression of one extra copy of the sums or of the
    # probabilities (K volumes) still fails both cases by far.
    held_logits = r["k"] * 2 / 4 / 4 + 1.0 if members == "logits" else 0.0
    assert volumes <= 2 * r["k"] + 4 + held_logits, volumes
