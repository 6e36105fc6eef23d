"""A real CT at clinical size for benchmarks: an OpenKBP CT resampled to 512x512xSLICES."""
from __future__ import annotations

from pathlib import Path


def make_ct(src: Path, dst: Path, slices: int, inplane: int = 512) -> tuple:
    """``src`` resampled (linear) to ``inplane`` x ``inplane`` x ``slices`` (default 512 in-plane) over
    the same physical extent; returns the new size (x, y, z) and spacing (mm)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    size = img.GetSize()
    new_size = (int(inplane), int(inplane), int(slices))
    spacing = tuple(img.GetSpacing()[i] * size[i] / new_size[i] for i in range(3))
    out = sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                        img.GetDirection(), -1000.0, sitk.sitkInt16)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(dst), useCompression=True)
    return new_size, spacing
