"""GPU check, second half (issue 9, item 5): the CUDA path of the sliding window against nnU-Net's.

On one real CT crop and a random-weight nnU-Net model, compares on the given device:

1. our ``sliding_window_logits`` (sums on the device, CUDA autocast) with
   ``nnUNetPredictor.predict_logits_from_preprocessed_data`` (``perform_everything_on_device=True``),
   with and without mirroring;
2. our device-memory fallback (sums kept on the CPU, the network on the device: what
   ``sliding_window_logits`` does after the device runs out of memory) with nnU-Net's own
   ``perform_everything_on_device=False`` path;
3. the fallback as it really happens: the process's CUDA memory is capped
   (``torch.cuda.set_per_process_memory_fraction``) below what the on-device sums need, so the
   allocation fails, and the result must still equal nnU-Net's.

4. the maps on the device (issue 19): one case's members (float16 logits on a coarser network
   grid, K = 14 classes, nnU-Net's resampling per slab) through ``process_case`` with the torch
   backend on the device against the numpy path on the CPU: the resampled logits bit for bit, and
   every output file (probabilities, segmentation, each map) to float32 precision.

Prints the largest absolute difference and whether the float16 logits are equal bit for bit.
Exit code 1 if a comparison differs beyond bit equality (nnU-Net and this project accumulate in the
same order and dtype, so equality is expected on the same device), or beyond float32 precision for 4.

    python bench/gpu_equivalence.py --device cuda [--ct FILE]
    python bench/gpu_equivalence.py --device cpu     # dry run of the same comparisons (1-3 skip 3;
                                                     # 4 runs the torch backend on the CPU)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "Python"))
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--ct", type=Path, help="source CT (default: first OpenKBP training CT)")
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 128, 128), metavar=("Z", "Y", "X"),
                    help="crop of the CT in voxels for comparisons 1-2 (default 48 128 128)")
    ap.add_argument("--fallback-shape", type=int, nargs=3, default=(96, 320, 320), metavar=("Z", "Y", "X"),
                    help="crop for comparison 3, large enough that the sums need >= 64 MiB (default 96 320 320)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor
    from CalibUncertaintyLib.nnunet.model_folder import ModelFolder
    from CalibUncertaintyLib.nnunet.sliding_window import sliding_window_logits
    from predict_vs_nnunet import default_ct
    from tiny_nnunet import build_tiny_model_folder, write_test_ct

    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="calibu_gpu_eq_") as tmp:
        tmp = Path(tmp)
        folder = build_tiny_model_folder(tmp / "model", folds=(0,), n_classes=4)
        image = write_test_ct(tmp / "c_0000.nii.gz", source_ct=args.ct or default_ct(), shape_zyx=tuple(args.shape),
                              zero_border=0)
        model = ModelFolder.open(folder)
        ours_pred = EnsemblePredictor(model, model.members("single"), device=args.device, tta=False)
        case = ours_pred.prepare([image])
        print(f"preprocessed image {tuple(case.data.shape)}, patch {tuple(ours_pred.configuration_manager.patch_size)}")

        def reference(on_device: bool, tta: bool, data=None):
            p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=tta, device=device,
                                perform_everything_on_device=on_device, allow_tqdm=False)
            p.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
            data = case.data if data is None else data
            return p, p.predict_logits_from_preprocessed_data(data).float().cpu().numpy()

        def compare(name: str, ours, ref) -> None:
            nonlocal failures
            ours = ours.float().cpu().numpy() if hasattr(ours, "cpu") else np.asarray(ours, np.float32)
            same = ours.shape == ref.shape and np.array_equal(ours, ref)
            diff = float(np.max(np.abs(ours - ref))) if ours.shape == ref.shape else float("nan")
            seg = float(np.mean(ours.argmax(0) == ref.argmax(0))) if ours.shape == ref.shape else float("nan")
            print(f"{name:58s} bit-equal {str(same):5s} max |diff| {diff:.3g}  argmax agreement {seg:.6f}")
            failures += 0 if same else 1

        for tta in (False, True):
            p, ref = reference(True, tta)
            axes = p.allowed_mirroring_axes if tta else None
            net = p.network
            ours = sliding_window_logits(net, case.data, p.configuration_manager.patch_size,
                                         p.label_manager.num_segmentation_heads, device, 0.5, mirror_axes=axes)
            compare(f"1. sums on {device.type}, TTA {'on' if tta else 'off'} vs nnU-Net on device", ours, ref)
        from CalibUncertaintyLib.nnunet import sliding_window as sw
        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        p, ref = reference(False, False)
        with torch.inference_mode(), (torch.autocast("cuda") if device.type == "cuda" else _null()):
            data, revert = pad_nd_image(case.data, tuple(p.configuration_manager.patch_size), "constant",
                                        {"value": 0}, True, None)
            slicers = sw.tile_slicers(data.shape[1:], p.configuration_manager.patch_size, 0.5)
            p.network.to(device).eval()
            fallback = sw._accumulate(p.network, data, slicers, p.configuration_manager.patch_size,
                                      p.label_manager.num_segmentation_heads, device, torch.device("cpu"), None)
        compare("2. sums on the CPU, network on device vs nnU-Net's", fallback[(slice(None), *revert[1:])], ref)
        if device.type == "cuda":
            big_image = write_test_ct(tmp / "b_0000.nii.gz", source_ct=args.ct or default_ct(),
                                      shape_zyx=tuple(args.fallback_shape), zero_border=0)
            big_case = ours_pred.prepare([big_image])
            p, ref = reference(False, False, big_case.data)
            data = big_case.data
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            sums_bytes = 2 * (p.label_manager.num_segmentation_heads + 1) * int(np.prod(data.shape[1:]))
            used = torch.cuda.memory_reserved()
            # allow the network and a few tiles, but not the sums
            cap = used + sums_bytes // 2
            if cap < sums_bytes + used:
                torch.cuda.set_per_process_memory_fraction(cap / total)
                records = []
                handler = logging.Handler()
                handler.emit = records.append
                logging.getLogger("CalibUncertaintyLib.nnunet.sliding_window").addHandler(handler)
                big = sliding_window_logits(p.network, big_case.data, p.configuration_manager.patch_size,
                                            p.label_manager.num_segmentation_heads, device, 0.5)
                fell_back = any("do not fit" in r.getMessage() for r in records)
                torch.cuda.set_per_process_memory_fraction(1.0)
                print(f"3. image {tuple(data.shape)}; device capped at {cap / 2**20:.0f} MiB (sums need {sums_bytes / 2**20:.0f} MiB): "
                      f"fallback message {'seen' if fell_back else 'NOT seen'}")
                failures += 0 if fell_back else 1
                compare("3. real out-of-memory fallback vs nnU-Net's CPU-sums path", big, ref)
            else:
                print("3. skipped: the sums are too small to cap the device below them")
        failures += maps_on_device(device, tmp)
    print("all equal" if failures == 0 else f"{failures} comparison(s) differ")
    return 1 if failures else 0


def maps_on_device(device, tmp: Path, k: int = 14) -> int:
    """Comparison 4 (module doc); returns the number of failures."""
    from functools import partial
    from types import SimpleNamespace

    import numpy as np
    import torch
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    from scipy import ndimage

    from CalibUncertaintyLib.io.geometry import Geometry
    from CalibUncertaintyLib.io.images import read_image
    from CalibUncertaintyLib.nnunet.member_probabilities import MemberProbabilities
    from CalibUncertaintyLib.nnunet.slab_resampling import block_device
    from CalibUncertaintyLib.pipeline.case import CaseOptions, process_case
    from CalibUncertaintyLib.uncertainty.backend import NUMPY, TorchBackend

    shape, net = (40, 192, 160), (40, 96, 80)
    geo = Geometry(shape, (1.0, 1.0, 3.5))
    props = {"spacing": [3.5, 1.0, 1.0], "shape_after_cropping_and_before_resampling": shape,
             "shape_before_cropping": shape, "bbox_used_for_cropping": [[0, s] for s in shape]}
    pm = SimpleNamespace(transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2])
    cm = SimpleNamespace(spacing=[3.5, 2.0, 2.0], resampling_fn_probabilities=partial(
        resample_data_or_seg_to_shape, is_seg=False, order=1, order_z=0, force_separate_z=None))
    lm = SimpleNamespace(inference_nonlin=lambda x: torch.softmax(x, 0), has_regions=False)
    rng = np.random.default_rng(0)
    base = ndimage.gaussian_filter(rng.normal(size=(k,) + net), (0, 1, 3, 3)) * 12
    logits = [(base + rng.normal(0, 0.8, base.shape)).astype(np.float16) for _ in range(3)]
    be = TorchBackend(device)

    def members(backend):
        return (MemberProbabilities(torch.from_numpy(z), pm, cm, lm, props, shape, backend=backend) for z in logits)

    failures = 0
    host, dev = next(members(NUMPY)), next(members(be))
    same = all(np.array_equal(host._resampler.block(host._logits.numpy(), lo, lo + 8),
                              block_device(dev._resampler, be, dev._logits, lo, lo + 8).cpu().numpy())
               for lo in range(0, shape[0], 8))
    print(f"{'4. resampled logits on ' + device.type + ' vs the host path':58s} bit-equal {same}")
    failures += 0 if same else 1
    names = ["background"] + [f"S{c}" for c in range(1, k)]
    for key, backend in (("cpu", NUMPY), ("device", be)):
        process_case("c", members(backend), geo, tmp / f"maps_{key}", None, names, CaseOptions(n_members=3))
    h_max = float(read_image(tmp / "maps_cpu" / "c" / "map_entropy.nii.gz")[0].max())
    worst = {}
    for f in sorted(p.name for p in (tmp / "maps_cpu" / "c").glob("*.nii.gz")):
        a = read_image(tmp / "maps_device" / "c" / f)[0].astype(np.float64)
        b = read_image(tmp / "maps_cpu" / "c" / f)[0].astype(np.float64)
        scale = h_max if ("mutual_information" in f or "ebcu" in f) else max(float(np.abs(b).max()), 1e-30)
        worst[f] = float(np.abs(a - b).max()) / scale
    bad = {f: v for f, v in worst.items() if v > (0 if f == "seg.nii.gz" else 1e-5)}
    print(f"{'4. every output of process_case, torch on ' + device.type + ' vs numpy':58s} "
          f"within float32 precision {not bad}  worst relative {max(worst.values()):.3g} "
          f"({max(worst, key=worst.get)})")
    for f, v in bad.items():
        print(f"   {f}: {v:.3g}")
    return failures + (1 if bad else 0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
