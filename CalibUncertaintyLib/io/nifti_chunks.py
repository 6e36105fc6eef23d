"""Read a NIfTI volume a piece at a time, so that a GUI thread is never blocked by one big read.

:class:`ChunkedNiftiReader` decodes a single-file NIfTI (``.nii`` or ``.nii.gz``) into an array a
bounded number of bytes per :meth:`~ChunkedNiftiReader.read` call, directly into the destination
(for example the voxel buffer of a volume node: no second copy). It gives exactly what
``io.images.read_image`` gives - the voxels in (z, y, x) order as ITK's reader returns them and the
geometry ITK reads from the header (``read_header_geometry``, header only) - with the same checks
in the same single pass: the gzip stream must end with a valid CRC-32 and length, the file must
hold every voxel the header declares, and floating-point voxels must be finite.

Files it cannot decode exactly as ITK does (a scaling slope/intercept other than 1/0, more or fewer
than three dimensions, an unusual voxel type, a two-file .hdr/.img pair, NRRD...) are read in one
piece by ``read_image`` instead (``chunked`` is then False): correct, only not incremental.

    reader = ChunkedNiftiReader(path, dtype=np.float32)
    while not reader.done:
        reader.read(32 << 20)        # at most 32 MiB of voxels per call
    array, geometry = reader.array, reader.geometry
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from .geometry import Geometry

#: NIfTI datatype codes read here -> numpy type (ITK maps them to the same pixel types)
NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
               1024: "i8", 1280: "u8"}
DEFAULT_CHUNK_BYTES = 16 << 20


def _open(path: Path):
    if path.name.lower().endswith(".gz"):
        try:  # ISA-L's gzip reader: same format and checks, several times faster
            from isal import igzip

            return igzip.open(path, "rb")
        except ImportError:
            return gzip.open(path, "rb")
    return open(path, "rb")


def parse_header(head: bytes) -> dict | None:
    """Voxel layout of a single-file NIfTI-1/2 header, or None when this reader cannot decode
    the file exactly as ITK does (see the module docstring)."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            if head[344:348] != b"n+1\0":
                return None
            dims = struct.unpack(endian + "8h", head[40:56])
            code = struct.unpack(endian + "h", head[70:72])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            slope, inter = struct.unpack(endian + "2f", head[112:120])
            offset = max(offset, 352)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            if head[4:8] != b"n+2\0":
                return None
            code = struct.unpack(endian + "h", head[12:14])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = max(int(struct.unpack(endian + "q", head[168:176])[0]), 544)
            slope, inter = struct.unpack(endian + "2d", head[176:192])
            break
    else:
        return None
    if int(dims[0]) != 3 or code not in NIFTI_TYPES or min(int(d) for d in dims[1:4]) < 1:
        return None
    if not (slope == 0 or (slope == 1 and inter == 0)) or not np.isfinite([slope, inter]).all():
        return None  # ITK rescales such voxels to float: leave them to ITK
    shape_zyx = (int(dims[3]), int(dims[2]), int(dims[1]))
    dtype = np.dtype(endian + NIFTI_TYPES[code])
    return {"offset": offset, "dtype": dtype, "shape_zyx": shape_zyx,
            "n_bytes": int(np.prod(shape_zyx, dtype=np.int64)) * dtype.itemsize}


class ChunkedNiftiReader:
    """Decode ``path`` into ``out`` (or a new array of ``dtype``) piece by piece.

    ``out``: a C-contiguous (z, y, x) array of the image's shape to fill (e.g. a volume node's
    voxels); ``dtype``: the type of a new array when ``out`` is None (default: the file's).
    ``allow_nonfinite``: accept NaN / inf voxels (as ``read_image``). Raises InputError as
    ``read_image`` does: missing, truncated, corrupt or non-3-D file, another shape than ``out``.
    """

    def __init__(self, path, dtype=None, out: np.ndarray | None = None, allow_nonfinite: bool = False):
        from .images import read_header_geometry

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"image not found: {self.path}")
        self.allow_nonfinite = allow_nonfinite
        self.geometry: Geometry = read_header_geometry(self.path, verify=False)
        self._file = None
        self._pos = 0
        self.done = False
        try:
            self._file = _open(self.path)
            head = self._file.read(544)
        except (OSError, EOFError, zlib.error) as e:
            self.close()
            raise self._error(e) from e
        self.header = parse_header(head)
        self.chunked = self.header is not None and self.header["shape_zyx"] == self.geometry.shape_zyx
        if not self.chunked:
            self.close()
            self.array = self._whole(dtype, out)
            self.done = True
            return
        want = np.dtype(dtype) if dtype is not None else self.header["dtype"].newbyteorder("=")
        if out is None:
            out = np.empty(self.header["shape_zyx"], dtype=want)
        elif tuple(out.shape) != self.header["shape_zyx"] or not out.flags.c_contiguous:
            self.close()
            raise InputError(f"{self.path.name}: the destination array has shape {out.shape}, the image "
                             f"{self.header['shape_zyx']}")
        self.array = out
        self._flat_bytes = out.reshape(-1).view(np.uint8)
        self._direct = out.dtype == self.header["dtype"]  # same type and byte order: decode in place
        self._check_floats = np.issubdtype(self.header["dtype"], np.floating) and not allow_nonfinite
        skip = self.header["offset"]
        self._pending = head[skip:]  # voxel bytes already read with the header
        if len(head) < skip:
            self._discard(skip - len(head))

    # ------------------------------------------------------------------ public
    @property
    def fraction(self) -> float:
        return 1.0 if self.done else self._pos / max(self.header["n_bytes"], 1)

    def read(self, max_bytes: int = DEFAULT_CHUNK_BYTES) -> float:
        """Decode at most ``max_bytes`` more voxel bytes; returns the fraction done. At the end the
        stream is checked (CRC, length) and the file closed."""
        if self.done:
            return 1.0
        total = self.header["n_bytes"]
        itemsize = self.header["dtype"].itemsize
        n = min(max(int(max_bytes) // itemsize * itemsize, itemsize), total - self._pos)
        try:
            got, raw = self._take(n)
        except (OSError, EOFError, zlib.error) as e:
            self.close()
            raise self._error(e) from e
        if got < n:
            self.close()
            raise InputError(f"{self.path}: truncated image: the header declares {total} bytes of voxels, the file "
                             f"holds {self._pos + got} ({100.0 * (self._pos + got) / total:.0f}%); copy the file again")
        self._store(raw, n)
        self._pos += n
        if self._pos >= total:
            self._finish()
        return self.fraction

    def read_all(self) -> np.ndarray:
        while not self.done:
            self.read(64 << 20)
        return self.array

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # ------------------------------------------------------------------ internals
    def _take(self, n: int):
        """(bytes obtained, the bytes or None when they were decoded into the destination)."""
        if self._pending:
            head, self._pending = self._pending[:n], self._pending[n:]
            data = head if len(head) == n else head + self._file.read(n - len(head))
            return len(data), data
        if not self._direct:
            data = self._file.read(n)
            return len(data), data
        view = memoryview(self._flat_bytes[self._pos:self._pos + n])  # straight into the destination
        got = 0
        while got < n:
            more = self._file.readinto(view[got:])
            if not more:
                break
            got += more
        return got, None

    def _store(self, raw, n: int) -> None:
        dtype = self.header["dtype"]
        start = self._pos // dtype.itemsize
        if raw is None:
            values = self._flat_bytes[self._pos:self._pos + n].view(dtype)
        else:
            values = np.frombuffer(raw, dtype=dtype)
            self.array.reshape(-1)[start:start + values.size] = values
        if self._check_floats:
            bad = ~np.isfinite(values)
            if bad.any():
                self.close()
                n_nan = int(np.count_nonzero(np.isnan(values)))
                first = tuple(int(i) for i in np.unravel_index(start + int(np.argmax(bad)), self.header["shape_zyx"]))
                raise InputError(f"{self.path}: NaN or infinite voxels ({n_nan} NaN, {int(bad.sum()) - n_nan} "
                                 f"infinite in this part; first at voxel (z, y, x) {first}); a damaged image is "
                                 "refused rather than given maps that look certain there: repair or re-export it")

    def _discard(self, n: int) -> None:
        while n > 0:
            got = self._file.read(min(n, 1 << 20))
            if not got:
                break
            n -= len(got)

    def _finish(self) -> None:
        try:
            while self._file.read(1 << 20):  # to the end: the gzip reader checks CRC and length there
                pass
        except (OSError, EOFError, zlib.error) as e:
            self.close()
            raise self._error(e) from e
        self.close()
        self.done = True

    def _error(self, e) -> InputError:
        if isinstance(e, EOFError):
            return InputError(f"{self.path}: truncated file (the compressed stream ends before its end marker: an "
                              "interrupted copy or a full disk?); copy the file again")
        if isinstance(e, (gzip.BadGzipFile, zlib.error)) or type(e).__name__ in ("BadGzipFile", "IsalError"):
            return InputError(f"{self.path}: corrupt gzip file ({e}); copy the file again")
        return InputError(f"{self.path}: could not be read ({getattr(e, 'strerror', None) or e})")

    def _whole(self, dtype, out):
        from .images import read_image

        arr, geo = read_image(self.path, dtype=dtype, allow_nonfinite=self.allow_nonfinite)
        self.geometry = geo
        if out is not None:
            if tuple(out.shape) != arr.shape:
                raise InputError(f"{self.path.name}: the destination array has shape {out.shape}, the image {arr.shape}")
            out[...] = arr
            return out
        return arr


def read_chunked(path, dtype=None, out=None, allow_nonfinite: bool = False) -> tuple[np.ndarray, Geometry]:
    """The whole image through :class:`ChunkedNiftiReader` (same result as ``read_image``)."""
    reader = ChunkedNiftiReader(path, dtype=dtype, out=out, allow_nonfinite=allow_nonfinite)
    return reader.read_all(), reader.geometry


__all__ = ["ChunkedNiftiReader", "read_chunked", "parse_header", "DEFAULT_CHUNK_BYTES"]

