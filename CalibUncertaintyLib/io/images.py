"""Read and write 3-D images (NIfTI, NRRD, ... via SimpleITK) with their exact geometry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .atomic import atomic_path
from .geometry import Geometry


def geometry_of(img) -> Geometry:
    """Geometry of a SimpleITK image (must be 3-D, one component)."""
    size = img.GetSize()
    return Geometry(tuple(reversed(size)), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def read_image(path: str | os.PathLike, dtype=None) -> tuple[np.ndarray, Geometry]:
    """Read a 3-D single-channel image. Returns (array in (z, y, x) order, geometry).

    Raises InputError for a missing file, a 2-D or 4-D image, or a multi-component image.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"could not read image {path}: {str(e).strip().splitlines()[-1]}") from e
    if img.GetDimension() != 3:
        raise InputError(f"{path.name}: expected a 3-D image, got {img.GetDimension()}-D "
                         f"(size {img.GetSize()}); 2-D slices and 4-D series are not supported")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name}: expected one channel, got {img.GetNumberOfComponentsPerPixel()} "
                         "components per voxel")
    arr = sitk.GetArrayFromImage(img)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr, geometry_of(img)


def read_header_geometry(path: str | os.PathLike) -> Geometry:
    """Geometry of a 3-D single-channel image from its header only (no voxel data read).

    Raises InputError for a missing or unreadable file, a 2-D or 4-D image, or a multi-component
    image (each channel must be its own file)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"could not read image {path}: {str(e).strip().splitlines()[-1]}") from e
    if reader.GetDimension() != 3:
        raise InputError(f"{path.name}: expected a 3-D image, got {reader.GetDimension()}-D "
                         f"(size {reader.GetSize()})")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path.name}: expected one component per voxel, got {reader.GetNumberOfComponents()}; "
                         "give each channel as its own file <case>_0000, <case>_0001, ...")
    return Geometry(tuple(reversed(reader.GetSize())), reader.GetSpacing(), reader.GetOrigin(),
                    reader.GetDirection())


def to_sitk(array: np.ndarray, geometry: Geometry):
    import SimpleITK as sitk

    array = np.asarray(array)
    if tuple(array.shape) != geometry.shape_zyx:
        raise InputError(f"array shape {array.shape} does not match geometry shape {geometry.shape_zyx}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, compress: bool = True) -> Path:
    """Write atomically (temporary name, then rename). float64 is stored as float32, bool as uint8."""
    import SimpleITK as sitk

    img = to_sitk(array, geometry)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=compress)
    return Path(path)
