"""Exceptions with messages meant for the person running the tool."""


class CalibUncertaintyError(Exception):
    """Base class: every error this library raises on purpose derives from it."""


class InputError(CalibUncertaintyError, ValueError):
    """Bad input data: wrong shape, channel count, NaNs, probabilities not summing to one..."""


class GeometryMismatchError(InputError):
    """Two images that must share a voxel grid (shape, spacing, origin, direction) do not."""


class CalibrationMismatchError(CalibUncertaintyError):
    """A calibration file was fitted on another model than the one it is applied to."""


class ModelFolderError(CalibUncertaintyError):
    """An nnU-Net model folder is incomplete or not an nnU-Net model folder."""
