"""The maps on a device (issue 19): the torch backend gives the numpy path's numbers.

``uncertainty.backend.TorchBackend`` runs the same pipeline (accumulation, every map, the
calibrated probability, DAE's distance passes, EBCU's ball sums, a member's resampling and softmax)
with torch kernels on a device. No GPU here: the torch path runs on the CPU device, against the
numpy path, map by map, to float32 precision (CUDA and MPS run the same torch code; see
bench/gpu_check.sh for the run on a GPU)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from CalibUncertaintyLib.io.geometry import Geometry  # noqa: E402
from CalibUncertaintyLib.pipeline.ensemble import accumulate, calibrated_slabs, mean_argmax  # noqa: E402
from CalibUncertaintyLib.uncertainty.backend import NUMPY, TorchBackend, backend_for  # noqa: E402
from CalibUncertaintyLib.uncertainty.maps import MAP_NAMES, compute_maps  # noqa: E402

SHAPE = (10, 36, 32)
K = 5


def _members(m, seed=3, shape=SHAPE, k=K):
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=(k,) + shape), (0, 1.0, 2.5, 2.5)) * 7.0
    out = []
    for _ in range(m):
        z = base + rng.normal(0.0, 0.7, base.shape)
        p = np.exp(z - z.max(axis=0))
        out.append((p / p.sum(axis=0)).astype(np.float32))
    return out


def assert_close(a, b, name, rel=2e-6, scale=None):
    """Equal to float32 precision: within ``rel`` of the map's scale (or ``scale``) everywhere."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(b).max()) if scale is None else float(scale), 1e-30)
    err = float(np.abs(a - b).max()) / scale
    assert err <= rel, (name, err)


def test_backend_choice():
    assert backend_for(None) is NUMPY and backend_for("cpu") is NUMPY
    assert backend_for(torch.device("cpu")) is NUMPY
    assert backend_for("cuda").is_torch and str(backend_for("cuda:1").device) == "cuda:1"


@pytest.mark.parametrize("temperature", [None, 1.3])
def test_every_map_on_the_torch_backend_equals_the_numpy_path(temperature):
    members = _members(3)
    geo = Geometry(SHAPE, (0.8, 0.9, 2.5))
    ref_acc = accumulate(members)
    dev_acc = accumulate(members, backend=TorchBackend("cpu"))
    assert dev_acc.backend.is_torch and dev_acc.reduced
    assert_close(dev_acc.sum_probs, ref_acc.sum_probs, "sum_p", 1e-7)
    assert_close(dev_acc.sum_entropy, ref_acc.sum_entropy, "sum_entropy")
    assert_close(dev_acc.fg_sq_dev, ref_acc.fg_sq_dev, "fg_sq_dev", 1e-5)
    np.testing.assert_array_equal(dev_acc.fg_votes, ref_acc.fg_votes)
    np.testing.assert_array_equal(mean_argmax(dev_acc), mean_argmax(ref_acc))
    info_ref, info_dev = {}, {}
    ref = compute_maps(ref_acc, geo, temperature=temperature, info=info_ref, release_sums=True)
    dev = compute_maps(dev_acc, geo, temperature=temperature, info=info_dev, release_sums=True)
    assert info_dev["ebcu_threshold"] == pytest.approx(info_ref["ebcu_threshold"], rel=1e-5)
    for name in MAP_NAMES:
        assert dev[name].dtype == np.float32
        # MI = H(p̄) − EE and EBCU = mean (H − t)₊ are differences: float32 precision of the
        # entropies they subtract (and of the quantile t), in the entropy's units
        scale = ref["entropy"].max() if name in ("mutual_information", "ebcu") else None
        assert_close(dev[name], ref[name], name, 2e-6, scale)
    assert ref["dae"].max() > 0 and ref["ebcu"].max() > 0 and ref["epkl"].max() > 0


def test_calibrated_slabs_on_the_device():
    """The calibrated probability of each calibration kind, per slab, on the device and as numpy."""
    from CalibUncertaintyLib.calibration.temperature import apply_temperature

    members = _members(2, seed=5)
    t = SimpleNamespace(method="temperature", temperature=1.7, ensemble_mode="pool_then_calibrate",
                        class_names=None, transform_probs=lambda p: apply_temperature(p, 1.7))
    for cal, mode in ((None, "pool_then_calibrate"), (t, "pool_then_calibrate")):
        ref = calibrated_slabs(accumulate(members), cal, mode).to_array()
        dev = calibrated_slabs(accumulate(members, backend=TorchBackend("cpu")), cal, mode).to_array()
        assert_close(dev, ref, f"calibrated {mode} {cal and cal.method}")
    class Slabs:  # members computed per slab: per-member scaling then runs on the device
        ndim, dtype = 4, np.dtype(np.float32)

        def __init__(self, a):
            self.a, self.shape = a, a.shape

        def slab(self, sl):
            return self.a[:, sl]

    per_member = accumulate([Slabs(p) for p in members], t, "per_member")
    dev = accumulate([Slabs(p) for p in members], t, "per_member", backend=TorchBackend("cpu"))
    assert_close(dev.sum_probs, per_member.sum_probs, "per-member scaled sums")


def _logit_member(backend, separate: bool, seed: int = 0):
    """A member as predict gives it: float16 logits on a coarser network grid, resampled per slab
    with nnU-Net's configuration (separate z or trilinear), softmax per slab."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    from CalibUncertaintyLib.nnunet.member_probabilities import MemberProbabilities

    shape = (12, 40, 36)
    net = (12 if separate else 7, 20, 18)
    rng = np.random.default_rng(seed)
    logits = (ndimage.gaussian_filter(rng.normal(size=(K,) + net), (0, 1, 2, 2)) * 9).astype(np.float16)
    spacing = [3.5, 1.0, 1.0] if separate else [1.2, 1.0, 1.0]
    net_spacing = [3.5, 2.0, 2.0] if separate else [spacing[0] * shape[0] / net[0], 2.0, 2.0]
    props = {"spacing": spacing, "shape_after_cropping_and_before_resampling": shape,
             "shape_before_cropping": shape, "bbox_used_for_cropping": [[0, s] for s in shape]}
    pm = SimpleNamespace(transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2])
    cm = SimpleNamespace(spacing=net_spacing, resampling_fn_probabilities=partial(
        resample_data_or_seg_to_shape, is_seg=False, order=1, order_z=0, force_separate_z=None))
    lm = SimpleNamespace(inference_nonlin=lambda x: torch.softmax(x, 0), has_regions=False)
    return MemberProbabilities(torch.from_numpy(logits), pm, cm, lm, props, shape, backend=backend)


@pytest.mark.parametrize("separate", [True, False])
def test_member_resampled_and_softmaxed_on_the_device(separate):
    """nnU-Net's probability export of a member (resampling per slab, softmax) on the device equals
    the host path's, and accumulating such members there gives the host sums."""
    from CalibUncertaintyLib.nnunet.slab_resampling import block_device

    host = _logit_member(NUMPY, separate)
    dev = _logit_member(TorchBackend("cpu"), separate)
    assert host._resampler is not None and dev._on_device
    assert host._resampler.separate == separate
    for lo, hi in ((0, 3), (3, 12), (11, 12)):  # nnU-Net's resampled logits, bit for bit (float16)
        np.testing.assert_array_equal(block_device(dev._resampler, dev.backend, dev._logits, lo, hi).numpy(),
                                      host._resampler.block(host._logits.numpy(), lo, hi))
    for sl in (slice(0, 3), slice(3, 12)):
        d = dev.slab(sl)
        assert isinstance(d, torch.Tensor)
        assert_close(d.numpy(), host.slab(sl), f"member slab {sl}", 1e-6)
    ref = accumulate([_logit_member(NUMPY, separate, s) for s in range(2)])
    got = accumulate([_logit_member(TorchBackend("cpu"), separate, s) for s in range(2)])
    assert got.backend.is_torch
    assert_close(got.sum_probs, ref.sum_probs, "sums of device members", 1e-6)


def test_process_case_on_the_device_writes_the_numpy_paths_outputs(tmp_path):
    """The whole case (accumulation, calibrated probabilities, every map, regions, files) with the
    members on a torch device gives the CPU path's files to float32 precision."""
    from CalibUncertaintyLib.io.images import read_image
    from CalibUncertaintyLib.pipeline.case import CaseOptions, process_case

    geo = Geometry((12, 40, 36), (1.0, 1.0, 3.0))
    names = ["background"] + [f"S{c}" for c in range(1, K)]
    outs = {}
    for key, be in (("cpu", NUMPY), ("device", TorchBackend("cpu"))):
        members = (_logit_member(be, True, s) for s in range(3))
        outs[key] = process_case("c", members, geo, tmp_path / key, None, names, CaseOptions(n_members=3))
    files = outs["cpu"]["files"]
    assert outs["device"]["files"] == files and len([f for f in files if f.startswith("map_")]) == len(MAP_NAMES)
    for f in files:
        if not f.endswith(".nii.gz"):
            continue
        a, _ = read_image(tmp_path / "device" / "c" / f)
        b, _ = read_image(tmp_path / "cpu" / "c" / f)
        if f == "seg.nii.gz":
            np.testing.assert_array_equal(a, b)
        else:
            h = read_image(tmp_path / "cpu" / "c" / "map_entropy.nii.gz")[0].max()
            assert_close(a, b, f, 2e-6, h if ("mutual_information" in f or "ebcu" in f) else None)
    assert outs["device"]["n_regions"] == outs["cpu"]["n_regions"]
