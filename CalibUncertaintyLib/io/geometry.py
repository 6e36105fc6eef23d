"""Voxel-grid geometry in SimpleITK conventions (LPS, x-y-z order) and conversions to RAS.

Arrays in this library use numpy order (z, y, x), exactly as ``SimpleITK.GetArrayFromImage``
returns them and as nnU-Net stores probabilities (C, z, y, x). ``Geometry`` keeps spacing,
origin and direction in ITK order (x, y, z) and LPS; ``spacing_zyx`` gives the spacing in array
axis order, which is what distance transforms and ball kernels need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import GeometryMismatchError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Shape (z, y, x), spacing (x, y, z) mm, origin (x, y, z) mm LPS, direction row-major 3x3."""

    shape_zyx: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "shape_zyx", tuple(int(s) for s in self.shape_zyx))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in self.direction))
        if len(self.shape_zyx) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise GeometryMismatchError("geometry must be 3-D (shape, spacing and origin of length 3)")
        if len(self.direction) != 9:
            raise GeometryMismatchError("direction must have 9 entries (row-major 3x3)")
        if min(self.spacing) <= 0 or not np.all(np.isfinite(self.spacing)):
            raise GeometryMismatchError(f"spacing must be positive and finite, got {self.spacing}")

    # --- derived -----------------------------------------------------------------------
    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in numpy array axis order, for distance transforms and kernels."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_lps(self, ijk) -> np.ndarray:
        """Continuous index (i, j, k) = (x, y, z) order, shape (..., 3) -> LPS mm."""
        ijk = np.asarray(ijk, dtype=float)
        m = self.direction_matrix * np.asarray(self.spacing)[None, :]
        return ijk @ m.T + np.asarray(self.origin)

    def index_to_ras(self, ijk) -> np.ndarray:
        return self.index_to_lps(ijk) @ LPS_TO_RAS.T

    def zyx_to_ras(self, zyx) -> np.ndarray:
        """Array index (z, y, x), shape (..., 3) -> RAS mm."""
        zyx = np.asarray(zyx, dtype=float)
        return self.index_to_ras(zyx[..., ::-1])

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 IJK (x, y, z index) -> RAS matrix, as a Slicer volume node stores it."""
        m = np.eye(4)
        m[:3, :3] = LPS_TO_RAS @ self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = LPS_TO_RAS @ np.asarray(self.origin)
        return m

    # --- comparison --------------------------------------------------------------------
    def mismatch(self, other: "Geometry", spacing_tol: float = 1e-3, origin_tol_mm: float = 1e-2,
                 direction_tol: float = 1e-4) -> str | None:
        """A human-readable description of the first difference, or None when they match."""
        if self.shape_zyx != other.shape_zyx:
            return f"shape (z, y, x) {self.shape_zyx} != {other.shape_zyx}"
        if not np.allclose(self.spacing, other.spacing, rtol=spacing_tol, atol=0):
            return f"spacing (x, y, z) mm {self.spacing} != {other.spacing}"
        if not np.allclose(self.origin, other.origin, atol=origin_tol_mm, rtol=0):
            return f"origin (LPS mm) {self.origin} != {other.origin}"
        if not np.allclose(self.direction, other.direction, atol=direction_tol, rtol=0):
            return f"direction {self.direction} != {other.direction}"
        return None

    def require_same(self, other: "Geometry", what: str = "image", other_what: str = "reference") -> None:
        diff = self.mismatch(other)
        if diff is not None:
            raise GeometryMismatchError(f"{what} and {other_what} are not on the same voxel grid: {diff}")

    # --- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"shape_zyx": list(self.shape_zyx), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(d["shape_zyx"]), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))
