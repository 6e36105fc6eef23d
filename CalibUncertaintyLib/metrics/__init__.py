"""Evaluation metrics (METHODS.md §3, §4, §6): Dice, NLL/Brier, ECE family, pECE, uncertainty as
an error detector, multi-rater and case-level quality. numpy (and scipy inside functions) only.
"""

from .case_quality import AGGREGATES, case_aggregates, case_quality_summary, correlations, risk_coverage
from .dice import confusion_counts, dice_masks, dice_per_class, mean_dice
from .ece import (DEFAULT_BINS, adaptive_calibration_error, bin_edges, bin_index, calibration_errors,
                  class_confidence, expected_calibration_error, foreground_ece, maximum_calibration_error,
                  reliability_table, top_label_confidence, top_label_ece)
from .error_detection import (boundary_split, budget_curve, contour_zone, detection_at_threshold,
                              error_detection_report, error_mask, ueo, voxel_auroc)
from .multirater import (consensus_regions, crps_normal, multirater_metrics, soft_reference,
                         volume_crps)
from .nll_brier import EPS, binary_brier, brier, nll
from .pece import PECE_BINS, PECE_LAMBDA, pece, pece_from_confidences
from .summary import calibration_summary

