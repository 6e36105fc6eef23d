"""Uncertainty maps from ensemble members (METHODS.md §1).

``streaming.EnsembleAccumulator`` keeps O(K) running sums over members; ``measures`` turns them
into per-voxel measures; ``distance_aware`` (DAE) and ``ebcu`` (EBCU) are the project's own
spatial maps; ``maps.compute_maps`` computes them all at once with pool-then-calibrate.
"""

from .distance_aware import distance_aware_entropy, distance_weight, surface_distance_mm
from .ebcu import ball_offsets, default_threshold, ebcu
from .maps import MAP_DESCRIPTIONS, MAP_NAMES, calibrated_mean_probs, compute_maps, segmentation
from .streaming import EPS, EnsembleAccumulator

__all__ = ["EPS", "EnsembleAccumulator", "MAP_NAMES", "MAP_DESCRIPTIONS", "compute_maps",
           "calibrated_mean_probs", "segmentation", "distance_aware_entropy", "distance_weight",
           "surface_distance_mm", "ebcu", "ball_offsets", "default_threshold"]
