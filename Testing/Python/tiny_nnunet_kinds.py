"""Tiny REAL nnU-Net v2 model folders of the kinds clinicians use (random weights, built in < 1 s each).

- ``build_resenc_folder``: ``nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres`` with a
  ``ResidualEncoderUNet`` (nnU-Net's ResEnc presets' network class);
- ``build_multichannel_folder``: two input channels (two normalisation schemes);
- ``build_ignore_label_folder``: dataset.json with an ``ignore`` label (not a network output);
- ``build_cascade_folders``: ``3d_lowres`` and ``3d_cascade_fullres`` folders side by side (the
  cascade network takes the image plus one channel per foreground label);
- ``build_region_folder``: a region-based model (BraTS-style nested regions, sigmoid outputs,
  ``regions_class_order``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tiny_nnunet import CT_PROPERTIES, save_checkpoint, tiny_dataset_json, tiny_plans


def network_weights(plans: dict, dataset_json: dict, configuration: str, seed: int, head_scale: float = 30.0):
    """Random state dict of the network nnU-Net builds for ``configuration`` (input channels as
    nnU-Net counts them, cascade one-hot channels included)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    torch.manual_seed(seed)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=True,
                                 deep_supervision=False)
    with torch.no_grad():
        head = net.decoder.seg_layers[-1]
        head.weight.mul_(head_scale)
        head.bias.normal_(0.0, 0.5)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_folder(root, plans: dict, dataset_json: dict, configuration: str, plans_name: str = "nnUNetPlans",
                 folds=(0,), seed: int = 0) -> Path:
    folder = Path(root) / f"nnUNetTrainer__{plans_name}__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    plans = {**plans, "plans_name": plans_name}
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    for i, fold in enumerate(folds):
        save_checkpoint(folder / f"fold_{fold}" / "checkpoint_final.pth",
                        network_weights(plans, dataset_json, configuration, seed + 100 * (i + 1)),
                        plans, dataset_json, fold, configuration=configuration)
    return folder


def build_resenc_folder(root, folds=(0,)) -> Path:
    plans = tiny_plans()
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kw = arch["arch_kwargs"]
    kw["n_blocks_per_stage"] = [1, 2, 2]
    del kw["n_conv_per_stage"]
    return write_folder(root, plans, tiny_dataset_json(3), "3d_fullres", "nnUNetResEncUNetMPlans", folds)


def build_multichannel_folder(root, folds=(0,)) -> Path:
    plans = tiny_plans()
    c = plans["configurations"]["3d_fullres"]
    c["normalization_schemes"] = ["CTNormalization", "ZScoreNormalization"]
    c["use_mask_for_norm"] = [False, False]
    plans["foreground_intensity_properties_per_channel"] = {"0": dict(CT_PROPERTIES), "1": dict(CT_PROPERTIES)}
    return write_folder(root, plans, tiny_dataset_json(3, n_channels=2), "3d_fullres", folds=folds)


def build_ignore_label_folder(root, folds=(0,)) -> Path:
    ds = tiny_dataset_json(3)
    ds["labels"]["ignore"] = 3
    return write_folder(root, tiny_plans(), ds, "3d_fullres", folds=folds)


def build_cascade_folders(root, folds=(0,), lowres: bool = True) -> tuple[Path, Path | None]:
    """(cascade folder, low-res folder or None): plans with 3d_fullres, 3d_lowres (coarser spacing)
    and 3d_cascade_fullres (inherits 3d_fullres, previous_stage 3d_lowres)."""
    plans = tiny_plans()
    full = plans["configurations"]["3d_fullres"]
    low = copy.deepcopy(full)
    low["data_identifier"] = "nnUNetPlans_3d_lowres"
    low["spacing"] = [s * 1.6 for s in full["spacing"]]
    low["next_stage"] = ["3d_cascade_fullres"]
    plans["configurations"]["3d_lowres"] = low
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    ds = tiny_dataset_json(3)
    cascade = write_folder(root, plans, ds, "3d_cascade_fullres", folds=folds, seed=1)
    low_folder = write_folder(root, plans, ds, "3d_lowres", folds=folds, seed=2) if lowres else None
    return cascade, low_folder


REGION_LABELS = {"background": 0, "whole": [1, 2], "core": 2}


def build_region_folder(root, folds=(0, 1)) -> Path:
    ds = tiny_dataset_json(3)
    ds["labels"] = dict(REGION_LABELS)
    ds["regions_class_order"] = [1, 2]
    return write_folder(root, tiny_plans(), ds, "3d_fullres", folds=folds)
