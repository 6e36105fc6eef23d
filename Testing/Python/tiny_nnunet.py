"""Build a tiny but REAL nnU-Net v2 trained model folder (random weights) for tests.

``build_tiny_model_folder(root)`` writes ``<root>/nnUNetTrainer__nnUNetPlans__3d_fullres/`` with

- ``plans.json``: a valid nnU-Net v2 plans file with one ``3d_fullres`` configuration: a
  ``PlainConvUNet`` of 3 stages, 4 -> 8 -> 16 features, patch 16 x 32 x 32 (z, y, x), target
  spacing 2.5 x 3.9 x 3.9 mm (z, y, x, as OpenKBP), CT normalisation, nnU-Net's default
  resampling functions;
- ``dataset.json``: one CT channel and ``n_classes`` labels;
- ``fold_<k>/checkpoint_final.pth`` (and optionally ``checkpoint_best.pth`` and
  ``checkpoint_snapshot_<cycle>.pth``): the state dict of the network nnU-Net itself builds from
  these plans, randomly initialised with nnU-Net's own initialiser and a different seed per
  checkpoint, saved in the dictionary layout ``nnUNetTrainer.save_checkpoint`` writes and
  ``nnUNetPredictor.initialize_from_trained_model_folder`` reads.

The segmentation head is rescaled so that an untrained network still produces spatially varying
argmax maps (several classes present), which keeps "our segmentation equals nnU-Net's" from
being trivially true on an all-background prediction. Building takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

PATCH_ZYX = (16, 32, 32)
SPACING_ZYX = (2.5, 3.9, 3.9)
CT_PROPERTIES = {"max": 3000.0, "mean": 40.0, "median": 35.0, "min": -1024.0,
                 "percentile_00_5": -1000.0, "percentile_99_5": 1500.0, "std": 350.0}


def tiny_plans(dataset_name: str = "Dataset999_Tiny", patch_zyx=PATCH_ZYX, spacing_zyx=SPACING_ZYX,
               features=(4, 8, 16)) -> dict:
    """A minimal valid nnU-Net v2 plans dict with a single ``3d_fullres`` configuration."""
    n_stages = len(features)
    kernel_sizes = [[1, 3, 3]] + [[3, 3, 3]] * (n_stages - 1)
    strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n_stages - 2)
    resample_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch_zyx),
        "median_image_size_in_voxels": [64, 128, 128],
        "spacing": list(spacing_zyx),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample_kwargs,
        "resampling_fn_seg_kwargs": {**resample_kwargs, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resample_kwargs, "order": 1},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": list(features),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": kernel_sizes,
                "strides": strides,
                "n_conv_per_stage": [2] * n_stages,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing_zyx),
        "original_median_shape_after_transp": [64, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_PROPERTIES)},
    }


def tiny_dataset_json(n_classes: int = 3, n_channels: int = 1) -> dict:
    names = ["background", "Organ", "Tumour", "Gland", "Vessel", "Bone"][:n_classes]
    return {
        "channel_names": {str(i): ("CT" if i == 0 else f"CT{i}") for i in range(n_channels)},
        "labels": {n: i for i, n in enumerate(names)},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }


def random_network_weights(plans: dict, dataset_json: dict, seed: int, head_scale: float = 30.0) -> dict:
    """State dict of the network nnU-Net builds from ``plans`` (no deep supervision), initialised
    by nnU-Net's initialiser under ``seed``; the final 1x1 convolution is scaled by ``head_scale``
    so that the random logits differ enough between voxels to give several classes."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    n_in = len(dataset_json["channel_names"])
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    torch.manual_seed(seed)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                 allow_init=True, deep_supervision=False)
    with torch.no_grad():
        head = net.decoder.seg_layers[-1]
        head.weight.mul_(head_scale)
        head.bias.normal_(0.0, 0.5)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def save_checkpoint(path: Path, weights: dict, plans: dict, dataset_json: dict, fold,
                    trainer_name: str = "nnUNetTrainer", configuration: str = "3d_fullres") -> Path:
    """Write ``weights`` in nnUNetTrainer.save_checkpoint's dictionary layout."""
    import torch

    checkpoint = {
        "network_weights": weights,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                      "dataset_json": dataset_json, "device": torch.device("cpu")},
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def build_tiny_model_folder(root, folds=(0, 1, 2), n_classes: int = 3, n_channels: int = 1,
                            snapshots: int = 0, best: bool = False, seed: int = 0,
                            plans: dict | None = None, name: str = "nnUNetTrainer__nnUNetPlans__3d_fullres") -> Path:
    """Write a tiny trained-model folder under ``root``; return its path.

    folds: fold numbers (or "all") that get a ``checkpoint_final.pth``, seed ``seed + 100*k``.
    snapshots: number of ``checkpoint_snapshot_<cycle>.pth`` files (cycles 1..snapshots) written
    into the first fold, each with its own seed. best: also write ``checkpoint_best.pth``.
    """
    root = Path(root)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    plans = tiny_plans() if plans is None else plans
    dataset_json = tiny_dataset_json(n_classes, n_channels)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    for i, fold in enumerate(folds):
        fold_seed = seed + 100 * (i + 1)
        fdir = folder / f"fold_{fold}"
        save_checkpoint(fdir / "checkpoint_final.pth", random_network_weights(plans, dataset_json, fold_seed),
                        plans, dataset_json, fold)
        if best:
            save_checkpoint(fdir / "checkpoint_best.pth", random_network_weights(plans, dataset_json, fold_seed + 1),
                            plans, dataset_json, fold)
        if snapshots and i == 0:
            for cycle in range(1, snapshots + 1):
                save_checkpoint(fdir / f"checkpoint_snapshot_{cycle}.pth",
                                random_network_weights(plans, dataset_json, fold_seed + 10 + cycle),
                                plans, dataset_json, fold)
    return folder


def write_test_ct(path, source_ct=None, shape_zyx=(24, 48, 40), spacing=(3.5, 3.7, 3.0),
                  origin=(12.5, -30.25, 7.0), rotation_deg: float = 25.0, zero_border: int = 3) -> Path:
    """Write a small CT for inference tests and return its path.

    With ``source_ct`` (a real CT file) the central block of ``shape_zyx`` voxels of that CT is
    used; otherwise a smooth synthetic body. The image gets an oblique direction (rotation of
    ``rotation_deg`` about z), a non-zero origin, a spacing (x, y, z mm) different from the plans',
    and ``zero_border`` slices of exact zeros at the low-z end, so nnU-Net's crop-to-nonzero box is
    smaller than the image (tests the background = 1 reinsertion outside the box).
    """
    import numpy as np
    import SimpleITK as sitk

    z, y, x = shape_zyx
    if source_ct is not None:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(source_ct))).astype(np.int16)
        cz, cy, cx = (np.array(arr.shape) - np.array(shape_zyx)) // 2
        arr = arr[cz:cz + z, cy:cy + y, cx:cx + x].copy()
    else:
        zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
        arr = np.where(zz ** 2 + yy ** 2 + xx ** 2 < 0.7, 40 + 300 * np.sin(5 * xx) * np.cos(4 * yy), -1000)
        arr = arr.astype(np.int16)
    arr[:zero_border] = 0
    t = np.deg2rad(rotation_deg)
    direction = (np.cos(t), -np.sin(t), 0.0, np.sin(t), np.cos(t), 0.0, 0.0, 0.0, 1.0)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path
