"""nnU-Net v2 side: model folders, per-member inference, small plans and snapshot training.

Importing this package imports neither torch nor nnunetv2 (they load inside the functions that
need them). Per-member prediction: ``ModelFolder.open(path).members(...)`` then
``EnsemblePredictor(model, members).iter_members(predictor.prepare(files))``.
"""

from .inference import EnsemblePredictor, MemberPrediction, PreparedCase, collect_cases
from .model_folder import ENSEMBLE_KINDS, Member, ModelFolder, snapshot_checkpoint_name

__all__ = ["ENSEMBLE_KINDS", "EnsemblePredictor", "Member", "MemberPrediction", "ModelFolder", "PreparedCase",
           "collect_cases", "snapshot_checkpoint_name"]
