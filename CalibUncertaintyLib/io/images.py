"""Read and write 3-D images (NIfTI, NRRD, ... via SimpleITK) with their exact geometry.

Every read goes through ``verify_image_file`` first: ITK fills the missing part of a short
NIfTI file with zeros, ignores a bad gzip checksum and reads NaN / inf NIfTI voxels as 0, so a
truncated copy or a damaged CT would otherwise be read as a valid image. Images with NaN or
infinite voxels are refused (``read_image(..., allow_nonfinite=False)``, the default), whether
the file format keeps them (NRRD, MHA: checked on the array) or ITK would hide them (NIfTI:
checked on the file's bytes).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
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

#: NIfTI datatype codes of floating-point voxels -> numpy type
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


@dataclass
class FileCheck:
    """What ``verify_image_file`` found: bytes read, and for floating-point NIfTI voxels the
    count of NaN and infinite values and the first one's (z, y, x) index."""

    n_bytes: int = 0
    n_nan: int = 0
    n_inf: int = 0
    first_nonfinite_zyx: tuple | None = None
    shape_zyx: tuple | None = None


def _nifti_header(header: bytes) -> dict | None:
    """Layout of a single-file NIfTI-1/2 header: data offset and end, voxel dtype, shape (z, y, x);
    None when ``header`` is not one (then the file is left to ITK)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            if header[344:348] != b"n+1\0":
                return None  # .hdr/.img pair or Analyze: the voxels are in another file
            dims = struct.unpack(endian + "8h", header[40:56])
            code, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            if header[4:8] != b"n+2\0":
                return None
            code, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(int(struct.unpack(endian + "q", header[168:176])[0]), 544)
            break
    else:
        return None
    n_dims = int(dims[0])
    if not 1 <= n_dims <= 7 or bitpix <= 0:
        return None
    shape_xyz = [max(int(d), 1) for d in dims[1:n_dims + 1]]
    n_vox = int(np.prod(shape_xyz, dtype=np.int64))
    dtype = np.dtype(endian + _NIFTI_FLOATS[code]) if code in _NIFTI_FLOATS else None
    return {"offset": offset, "end": offset + n_vox * bitpix // 8, "dtype": dtype,
            "shape_zyx": tuple(reversed(shape_xyz))}


class _FloatScan:
    """Counts NaN / inf among the float voxels of a byte stream (``feed`` consecutive chunks)."""

    def __init__(self, hdr: dict, out: FileCheck):
        self.offset, self.end, self.dtype, self.out = hdr["offset"], hdr["end"], hdr["dtype"], out
        self.pos, self.carry = 0, b""

    def feed(self, chunk: bytes) -> None:
        start = self.pos - len(self.carry)
        data = self.carry + chunk
        self.pos += len(chunk)
        lo = max(self.offset - start, 0)
        hi = min(self.end - start, len(data))
        if hi <= lo:
            self.carry = b"" if start + len(data) >= self.offset else data
            return
        n = (hi - lo) // self.dtype.itemsize * self.dtype.itemsize
        v = np.frombuffer(data[lo:lo + n], dtype=self.dtype)
        bad = ~np.isfinite(v)
        if bad.any():
            n_nan = int(np.count_nonzero(np.isnan(v)))
            if self.out.first_nonfinite_zyx is None:
                flat = (start + lo - self.offset) // self.dtype.itemsize + int(np.argmax(bad))
                self.out.first_nonfinite_zyx = tuple(int(i) for i in np.unravel_index(flat, self.out.shape_zyx))
            self.out.n_nan += n_nan
            self.out.n_inf += int(np.count_nonzero(bad)) - n_nan
        self.carry = data[lo + n:hi]


def verify_image_file(path: str | os.PathLike) -> FileCheck:
    """Raise InputError when ``path`` is a truncated or corrupt image file; else return a FileCheck.

    gzip-compressed files (``.gz``) are decompressed once as a stream: a stream that ends early
    or fails its CRC-32 / length check is refused. For NIfTI (``.nii``, ``.nii.gz``) the
    (decompressed) file must also hold every voxel the header declares (vox_offset + voxel
    count x bytes per voxel), and floating-point voxels are scanned for NaN / inf in the same
    pass (ITK's NIfTI reader turns them into 0 without a word). Other formats are left to ITK.
    """
    path = Path(path)
    name = path.name.lower()
    gz, nifti = name.endswith(".gz"), name.endswith((".nii", ".nii.gz"))
    out = FileCheck()
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(540)
            hdr = _nifti_header(head) if nifti else None
            if hdr is not None:
                out.shape_zyx = hdr["shape_zyx"]
            scan = _FloatScan(hdr, out) if hdr is not None and hdr["dtype"] is not None else None
            out.n_bytes = len(head)
            if scan is not None:
                scan.feed(head)
            if gz or scan is not None:
                while chunk := f.read(_CHUNK):
                    out.n_bytes += len(chunk)
                    if scan is not None:
                        scan.feed(chunk)
            else:
                out.n_bytes = path.stat().st_size
    except EOFError as e:
        raise InputError(f"{path}: truncated file (the compressed stream ends before its end marker: "
                         "an interrupted copy or a full disk?); copy the file again") from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: corrupt gzip file ({e}); copy the file again") from e
    except OSError as e:
        raise InputError(f"{path}: could not be read ({e.strerror or e})") from e
    if hdr is not None and out.n_bytes < hdr["end"]:
        raise InputError(f"{path}: truncated image: the header declares {hdr['end']} bytes of header and voxels, "
                         f"the file holds {out.n_bytes} ({100.0 * out.n_bytes / hdr['end']:.0f}%); copy the file again")
    return out


def _nonfinite_message(what: str, n_nan: int, n_inf: int, n_total: int, first) -> str:
    return (f"{what}: {n_nan + n_inf} of {n_total} voxels are not finite ({n_nan} NaN, {n_inf} infinite; first at "
            f"voxel (z, y, x) {first}); a damaged image is refused rather than given maps that look certain "
            "there: repair or re-export it")


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
    check = verify_image_file(path)
    if not allow_nonfinite and check.n_nan + check.n_inf:
        raise InputError(_nonfinite_message(str(path), check.n_nan, check.n_inf,
                                            int(np.prod(check.shape_zyx)), check.first_nonfinite_zyx))
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
        raise InputError(_nonfinite_message(what, n_nan, n_bad - n_nan, array.size, first))


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
    """Write atomically (temporary name, then rename). float64 is stored as float32, bool as uint8.

    ``.nii.gz`` files of float32 / (u)int8-32 voxels go through ``io.nifti_stream`` (the header
    ITK writes, then fast deflate in slabs: ISA-L when installed); other formats through SimpleITK."""
    import SimpleITK as sitk

    from . import nifti_stream

    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if compress and nifti_stream.supported(path, arr.dtype):
        if tuple(arr.shape) != geometry.shape_zyx:
            raise InputError(f"array shape {arr.shape} does not match geometry shape {geometry.shape_zyx}")
        return nifti_stream.write_volume(path, arr, geometry)
    img = to_sitk(arr, geometry)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=compress)
    return Path(path)
