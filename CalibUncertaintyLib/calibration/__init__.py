"""Post-hoc calibration (METHODS.md §2): ROI, stratified sampling, temperature and vector scaling,
model fingerprints and the calibration file. ``calibrate_thresholds`` (τ* by UEO, METHODS.md §4)
lives in ``thresholds.py`` and is imported on first use.
"""

from .calibration_file import FORMAT_NAME, SCHEMA_VERSION, CalibrationFile
from .fingerprint import (compare_fingerprints, fingerprint_model_folder, fingerprint_prediction_folder,
                          short_hash)
from .roi import DEFAULT_RADIUS_MM, ROI_RULES, describe_roi, roi_mask
from .sampling import stratified_sample_indices
from .temperature import (EPS, ENSEMBLE_MODES, TemperatureScaler, apply_temperature, apply_temperature_logits,
                          collect_calibration_samples, log_softmax, per_member_nll, safe_log, softmax,
                          temperature_nll)
from .vector_scaling import PlattScaler, VectorScaler, apply_vector_scaling

__all__ = [
    "FORMAT_NAME", "SCHEMA_VERSION", "CalibrationFile",
    "compare_fingerprints", "fingerprint_model_folder", "fingerprint_prediction_folder", "short_hash",
    "DEFAULT_RADIUS_MM", "ROI_RULES", "describe_roi", "roi_mask",
    "stratified_sample_indices",
    "EPS", "ENSEMBLE_MODES", "TemperatureScaler", "apply_temperature", "apply_temperature_logits",
    "collect_calibration_samples", "log_softmax", "per_member_nll", "safe_log", "softmax", "temperature_nll",
    "PlattScaler", "VectorScaler", "apply_vector_scaling",
]


def __getattr__(name):
    if name == "calibrate_thresholds":
        from .thresholds import calibrate_thresholds

        return calibrate_thresholds
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
