"""Read and write 3-D images (NIfTI, NRRD, ... via SimpleITK) with their exact geometry.

Every read goes through ``verify_image_file`` first: ITK fills the missing part of a short
NIfTI file with zeros and ignores a bad gzip checksum, so a truncated copy would otherwise be
read as a valid image. Floating-point images are refused when any voxel is NaN or infinite
(``read_image(..., allow_nonfinite=False)``, the default).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from .atomic import atomic_path
from .geometry import Geometry


def geometry_of(img) -> Geometry:
    """Geometry of a SimpleITK image (must be 3-D, one component)."""
    size = img.GetSize()
    return Geometry(tuple(reversed(size)), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


_CHUNK = 1 << 20


def _nifti_data_end(header: bytes) -> int | None:
    """Byte offset where the voxel data of a single-file NIfTI-1/2 header ends, or None when
    ``header`` is not a NIfTI header (then the file is left to ITK)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            if header[344:348] != b"n+1\0":
                return None  # .hdr/.img pair or Analyze: data is in another file
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            if header[4:8] != b"n+2\0":
                return None
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(int(struct.unpack(endian + "q", header[168:176])[0]), 544)
            break
    else:
        return None
    n_dims = int(dims[0])
    if not 1 <= n_dims <= 7 or bitpix <= 0:
        return None
    n_vox = 1
    for d in dims[1:n_dims + 1]:
        n_vox *= max(int(d), 1)
    return offset + n_vox * bitpix // 8


def verify_image_file(path: str | os.PathLike) -> None:
    """Raise InputError when ``path`` is a truncated or corrupt image file.

    gzip-compressed files (``.gz``) are decompressed once as a stream: a stream that ends early
    or fails its CRC-32 / length check is refused. For NIfTI (``.nii``, ``.nii.gz``) the
    (decompressed) file must also hold every voxel the header declares (vox_offset + voxel
    count x bytes per voxel). Other formats are left to ITK's own checks.
    """
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        head, total = b"", 0
        try:
            with gzip.open(path, "rb") as f:
                while True:
                    chunk = f.read(_CHUNK)
                    if not chunk:
                        break
                    if len(head) < 540:
                        head += chunk[:540 - len(head)]
                    total += len(chunk)
        except EOFError as e:
            raise InputError(f"{path}: truncated file (the compressed stream ends before its end marker: "
                             "an interrupted copy or a full disk?); copy the file again") from e
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise InputError(f"{path}: corrupt gzip file ({e}); copy the file again") from e
    else:
        with open(path, "rb") as f:
            head = f.read(540)
        total = path.stat().st_size
    if path.name.lower().endswith((".nii", ".nii.gz")):
        end = _nifti_data_end(head)
        if end is not None and total < end:
            raise InputError(f"{path}: truncated image: the header declares {end} bytes of header and voxels, "
                             f"the file holds {total} ({100.0 * total / end:.0f}%); copy the file again")


def read_image(path: str | os.PathLike, dtype=None,
               allow_nonfinite: bool = False) -> tuple[np.ndarray, Geometry]:
    """Read a 3-D single-channel image. Returns (array in (z, y, x) order, geometry).

    Raises InputError for a missing, truncated or corrupt file (``verify_image_file``), a 2-D or
    4-D image, a multi-component image, or NaN/inf voxels (unless ``allow_nonfinite``).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    verify_image_file(path)
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
    if not allow_nonfinite:
        check_finite(arr, str(path))
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr, geometry_of(img)


def check_finite(array: np.ndarray, what: str) -> None:
    """InputError naming ``what``, the count of NaN / infinite voxels and the first one (z, y, x)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        n_nan = int(np.count_nonzero(np.isnan(array)))
        raise InputError(f"{what}: {n_bad} of {array.size} voxels are not finite ({n_nan} NaN, {n_bad - n_nan} "
                         f"infinite; first at voxel (z, y, x) {first}); a damaged image is refused rather than "
                         "given maps that look certain there: repair or re-export it")


def read_header_geometry(path: str | os.PathLike, verify: bool = True) -> Geometry:
    """Geometry of a 3-D single-channel image from its header (voxels are not decoded).

    Raises InputError for a missing, unreadable, truncated or corrupt file (``verify``: the whole
    file is checked by ``verify_image_file``, cheap next to decoding it), a 2-D or 4-D image, or
    a multi-component image (each channel must be its own file)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    if verify:
        verify_image_file(path)
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
