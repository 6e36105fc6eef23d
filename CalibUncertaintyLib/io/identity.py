"""Which image a result was computed from: record it, and refuse to show the result on another one.

Two CTs of different patients often share a voxel grid (same scanner protocol), so a grid check
alone lets case A's maps be shown on case B's CT. ``image_identity`` records, in every case's
``summary.json`` (key ``input_identity``), the case id, the file, the grid and a SHA-256 of the voxel
values; ``identity_mismatch`` compares a record with an image at hand. Qt-free and MRML-free:
the CLI, ``review``, ``evaluate`` and the Slicer loaders all call the same two functions.

Voxel hash: SHA-256 over the shape and the voxel values as little-endian float32, slice by slice.
Every int16/uint8/float32 CT value is exact in float32, and a float64 volume node is exported as
float32 (``io.images.write_image``) before ``predict`` reads it, so the hash of a CT read from its
file and of the same CT held in a Slicer volume node (whatever its scalar type) agree.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .geometry import Geometry

#: summary.json key holding the record
SUMMARY_KEY = "input_identity"


class IdentityMismatchError(InputError):
    """The outputs were computed from another image than the one they are shown on / compared with."""


def voxels_sha256(array: np.ndarray) -> str:
    """SHA-256 of the shape and the voxel values (as little-endian float32), independent of dtype."""
    h = VoxelsHasher(np.shape(array))
    h.update_slices(array)
    return h.hexdigest()


class VoxelsHasher:
    """``voxels_sha256`` a few z slices at a time (``update_slices`` with consecutive slices of
    the volume whose shape was given), for callers that must not block for a whole volume."""

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)
        self._h = hashlib.sha256(("shape=" + ",".join(str(s) for s in self.shape) + ";").encode())

    def update_slices(self, slices: np.ndarray) -> None:
        a = np.asarray(slices)
        if a.ndim == 0:
            self._h.update(np.asarray(a, dtype="<f4").tobytes())
            return
        for z in range(a.shape[0]):
            self._h.update(np.ascontiguousarray(a[z], dtype="<f4").tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def image_identity(array: np.ndarray, geometry: Geometry, case: str | None = None,
                   path: str | os.PathLike | None = None) -> dict:
    """The identity record of one image: case id, file, grid, voxel hash."""
    return {"case": case, "file": str(path) if path is not None else None,
            "geometry": geometry.to_dict(), "voxels_sha256": voxels_sha256(array)}


def file_identity(path: str | os.PathLike, case: str | None = None) -> dict:
    """Read ``path`` (``io.images.read_image``: refuses truncated/corrupt files and NaN/inf voxels)
    and return its identity record."""
    from .images import read_image

    array, geometry = read_image(path)
    return image_identity(array, geometry, case, path)


def describe(identity: dict | None) -> str:
    """One line: case, file, grid and the first 12 hex digits of the voxel hash."""
    if not identity:
        return "(no identity recorded)"
    g = identity.get("geometry") or {}
    shape = "x".join(str(s) for s in g.get("shape_zyx", ())) or "?"
    parts = [f"case {identity['case']}"] if identity.get("case") else []
    if identity.get("file"):
        parts.append(f"file {Path(identity['file']).name}")
    parts.append(f"grid {shape}")
    parts.append(f"voxels sha256 {str(identity.get('voxels_sha256', '?'))[:12]}")
    return ", ".join(parts)


def identity_mismatch(recorded: dict | None, actual: dict) -> str | None:
    """None when ``actual`` is the image ``recorded`` describes (same voxel hash and grid), else a
    message printing both identities. A missing record (outputs of an older version, or ``maps``
    run without ``--images``) is not a mismatch: the caller warns."""
    if not recorded or not recorded.get("voxels_sha256"):
        return None
    diff = None
    if recorded.get("geometry") and actual.get("geometry"):
        diff = Geometry.from_dict(recorded["geometry"]).mismatch(Geometry.from_dict(actual["geometry"]))
    if diff is None and recorded["voxels_sha256"] == actual.get("voxels_sha256"):
        return None
    why = f"grid differs ({diff})" if diff else "same grid, different voxel values"
    return (f"the outputs were computed from another image: recorded {describe(recorded)}; "
            f"this image {describe(actual)} ({why})")


def check_identity(recorded: dict | None, actual: dict, what: str, allow_mismatch: bool = False,
                   override_hint: str = "") -> str | None:
    """Raise IdentityMismatchError (naming ``what``) when ``actual`` is not the recorded image.

    ``allow_mismatch``: the user overrode the check explicitly; the message is returned (for a
    warning) instead of raised. Returns None when the identities agree or nothing was recorded."""
    msg = identity_mismatch(recorded, actual)
    if msg is None:
        return None
    msg = f"{what}: {msg}"
    if allow_mismatch:
        return msg
    raise IdentityMismatchError(msg + (f". If this really is the same patient, {override_hint}"
                                       if override_hint else ""))
