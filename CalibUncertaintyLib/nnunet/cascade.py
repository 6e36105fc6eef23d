"""nnU-Net cascades: the low-resolution stage runs first, its segmentation feeds the full-resolution stage.

A ``3d_cascade_fullres`` configuration names ``previous_stage`` (``3d_lowres``) in plans.json.
nnU-Net predicts such a model in two steps (``nnUNetv2_predict -c 3d_lowres`` first, then the
cascade with ``-prev_stage_predictions``); here both run in one go, as nnU-Net does them:

1. the low-resolution model is the sibling folder ``<Trainer>__<Plans>__<previous stage>`` in the
   same ``nnUNet_results/<Dataset>/`` folder (what ``nnUNetv2_train`` writes). Its folds holding
   the checkpoint (all of them, as ``nnUNetv2_predict`` uses by default) are averaged in logit
   space (``predict_logits_from_preprocessed_data``) and exported to a segmentation on the input
   image's grid (``convert_predicted_logits_to_segmentation_with_correct_shape``);
2. the full-resolution stage preprocesses the image together with that segmentation
   (``DefaultPreprocessor.run_case_npy``: the segmentation is transposed, cropped and resampled
   with the image) and appends its one-hot encoding of the foreground labels as extra input
   channels (``convert_labelmap_to_one_hot``), exactly nnU-Net's data iterators' steps.

Every member of the cascade stage then sees the same input; the low-resolution stage is shared,
so the ensemble's spread is the cascade stage's. A cascade whose low-resolution folder is
missing is refused (ModelFolderError) before any inference.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from ..errors import ModelFolderError
from .model_folder import DEFAULT_CHECKPOINT, ModelFolder

log = logging.getLogger(__name__)


def previous_stage_folder(model: ModelFolder, stage: str, trainer_name: str | None = None) -> Path:
    """The folder of ``model``'s previous (low-resolution) stage, checked to exist and hold a
    checkpoint; ModelFolderError naming the expected path otherwise."""
    trainer = model.trainer_name or trainer_name
    plans_name = model.plans_name or model.plans.get("plans_name")
    if not trainer or not plans_name:
        raise ModelFolderError(f"{model.path.name} is a cascade stage (needs the {stage} prediction) but its folder "
                               "name is not <Trainer>__<Plans>__<Configuration>, so its low-resolution stage "
                               "cannot be found")
    folder = model.path.parent / f"{trainer}__{plans_name}__{stage}"
    if not folder.is_dir():
        raise ModelFolderError(f"{model.path.name} is the full-resolution stage of a cascade: it needs the {stage} "
                               f"model's prediction first, but {folder} does not exist. Put the trained {stage} "
                               f"folder next to it (nnUNetv2_train DATASET {stage} FOLD) or use a 3d_fullres model")
    return folder


class LowResStage:
    """The previous stage of a cascade: its members' mean logits -> segmentation on the input grid."""

    def __init__(self, model: ModelFolder, stage: str, trainer_name: str | None, device: str, tta: bool,
                 tile_step_size: float, checkpoint: str = DEFAULT_CHECKPOINT):
        from .inference import EnsemblePredictor

        self.folder = ModelFolder.open(previous_stage_folder(model, stage, trainer_name))
        members = self.folder.members("deep", None, checkpoint if self.folder.folds_with(checkpoint)
                                      else DEFAULT_CHECKPOINT)
        self.predictor = EnsemblePredictor(self.folder, members, device=device, tta=tta,
                                           tile_step_size=tile_step_size)
        if self.predictor.configuration != stage:
            raise ModelFolderError(f"{self.folder.path} was trained as {self.predictor.configuration}, not the "
                                   f"previous stage {stage} the cascade names")

    def segmentation(self, files, case_id: str) -> np.ndarray:
        """nnU-Net's low-resolution segmentation (z, y, x) of the case, on the input image's grid."""
        import torch
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        p = self.predictor
        case = p.prepare(files, case_id)
        total = None
        with torch.inference_mode():
            for i in range(len(p.members)):
                logits = p.member_logits(case, i).to("cpu")  # nnU-Net sums the folds on the CPU
                total = logits if total is None else total + logits  # nnU-Net's sum (fp16, on the CPU)
                del logits
            total /= len(p.members)
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                total, p.plans_manager, p.configuration_manager, p.label_manager, case.properties,
                return_probabilities=False)
        return np.asarray(seg)


def cascade_input(predictor, files, previous_seg: np.ndarray):
    """(data tensor (C + foreground labels, ...), properties) of ``files`` for the cascade stage of
    ``predictor``: the image preprocessed with the previous stage's segmentation, one-hot appended."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    rw = pm.image_reader_writer_class()
    with contextlib.redirect_stdout(io.StringIO()):
        data, props = rw.read_images([str(f) for f in files])
        # float32, as nnU-Net reads a previous-stage segmentation file (its crop writes -1 outside the body)
        data, seg, props = preprocessor.run_case_npy(data, np.asarray(previous_seg, np.float32)[None], props, pm, cm,
                                                     predictor.model.dataset_json)
    # the previous stage's labels: the same label set as this stage (nnU-Net's convention)
    onehot = convert_labelmap_to_one_hot(seg[0], predictor.label_manager.foreground_labels, data.dtype)
    data = np.vstack((data, onehot))
    return torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format), props


def previous_stage_name(model: ModelFolder) -> str | None:
    """The ``previous_stage`` of ``model``'s configuration in plans.json (following
    ``inherits_from``), e.g. ``3d_lowres`` for a cascade stage; None for any other model."""
    configs = model.plans.get("configurations", {})
    name, seen = model.configuration, set()
    while name in configs and name not in seen:
        seen.add(name)
        prev = configs[name].get("previous_stage")
        if prev:
            return prev
        name = configs[name].get("inherits_from")
    return None


def check_previous_stage(model: ModelFolder) -> None:
    """Refuse (ModelFolderError) a cascade stage whose low-resolution folder is missing, from
    plans.json and the folder names alone (before any network is loaded)."""
    prev = previous_stage_name(model)
    if prev:
        previous_stage_folder(model, prev)


def previous_stage_key(model: ModelFolder) -> str | None:
    """For a cascade stage, a sha256 of its low-resolution folder's plans, dataset.json and
    checkpoints (its outputs depend on them, so the member cache keys on it); None otherwise."""
    prev = previous_stage_name(model)
    if not prev:
        return None
    from ..calibration.fingerprint import fingerprint_model_folder

    fp = fingerprint_model_folder(previous_stage_folder(model, prev))
    return f"{fp['plans_dataset_sha256']}:{fp['checkpoints_sha256']}"
