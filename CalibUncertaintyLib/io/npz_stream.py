"""A member's probabilities read from nnU-Net's ``.npz`` one z slab at a time (issue 19).

nnU-Net's ``--save_probabilities`` writes ``<case>.npz``: a zip archive holding one ``.npy``
member, ``probabilities.npy``, (K, z, y, x) in C order, deflated (``np.savez_compressed``) or
stored (``np.savez``). ``np.load`` decompresses the whole array; beside the ensemble's sums that
is K more float32 volumes (and while the next member is read, the previous one was still held:
``maps`` peaked at 2K + 3.5K volumes). ``NpzProbabilities`` reads it instead as the accumulator
reads members, one z slab of every class at a time:

- C order puts class c's z slab ``[z0, z1)`` at one contiguous byte range,
  ``header + (c·Z + z0)·plane`` .. ``header + (c·Z + z1)·plane``; a z slab of all classes is K
  such ranges, one per class, in increasing order of z within each class.
- A **stored** archive member is read at those offsets directly (``os.pread``).
- A **deflated** member is one raw deflate stream, which can only be decoded front to back. One
  sequential pass (``validate``) decodes it class by class, checks every value and the archive's
  CRC-32, and keeps a copy of the decoder's state at the start of each class (``zlib``'s
  ``Decompress.copy()``: about 40 KB each, plus at most one input chunk). The slabs are then read
  by K decoders, each started from its class's copy and advancing by one slab of its class per
  ``slab()`` call: the stream is decoded twice in all (validation, accumulation), and nothing
  volume-sized is ever allocated but the one float32 sum over classes that validation needs.

Validation (``validate``, before any sum changes): every value finite, in [−1e-6, 1 + 1e-3], the
class sum within 1e-3 of one at every voxel (``nnunet_outputs.validate_probs`` and the
accumulator's checks, the same messages); then ``valid_probabilities`` is True and the
accumulator reads the member once. Other layouts (Fortran order, other compression methods, an
encrypted member) fall back to ``np.load`` of the whole array (``NpzLayoutError``).
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .. import memory
from ..errors import InputError

ARRAY_NAME = "probabilities.npy"
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_INPUT_CHUNK = 1 << 16  # compressed bytes read from the file at a time, per decoder
_PASS_BYTES = 1 << 20  # decoded bytes handled at a time in the validation pass
NEGATIVE_TOLERANCE = 1e-6  # as uncertainty.streaming (a softmax is never below 0)
RANGE_TOLERANCE = 1e-3  # as nnunet_outputs.SUM_TOL


class NpzLayoutError(Exception):
    """The archive member cannot be streamed (layout, method); the caller loads it whole."""


class _Inflater:
    """Raw-deflate decoder over a byte range of a file, with exact-length reads and copies."""

    def __init__(self, fd: int, start: int, end: int):
        self.fd, self.pos, self.end = fd, start, end
        self.d = zlib.decompressobj(-zlib.MAX_WBITS)
        self.tail = b""

    def copy(self) -> "_Inflater":
        c = _Inflater.__new__(_Inflater)
        c.fd, c.pos, c.end, c.d, c.tail = self.fd, self.pos, self.end, self.d.copy(), self.tail
        return c

    def read_into(self, buf: memoryview) -> None:
        """Decode exactly ``len(buf)`` bytes into ``buf``."""
        got, n = 0, len(buf)
        while got < n:
            if not self.tail:
                if self.d.eof or self.pos >= self.end:
                    raise EOFError("the compressed data ends before the array does")
                size = min(_INPUT_CHUNK, self.end - self.pos)
                self.tail = os.pread(self.fd, size, self.pos)
                if len(self.tail) != size:
                    raise EOFError("the file is shorter than its zip directory says")
                self.pos += size
            out = self.d.decompress(self.tail, n - got)
            self.tail = self.d.unconsumed_tail
            buf[got:got + len(out)] = out
            got += len(out)
            if not out and not self.tail and self.d.eof:
                raise EOFError("the compressed data ends before the array does")

    def skip(self, n: int) -> None:
        scratch = bytearray(min(n, _PASS_BYTES))
        while n > 0:
            step = min(n, len(scratch))
            self.read_into(memoryview(scratch)[:step])
            n -= step


class NpzProbabilities:
    """Probabilities (K, z, y, x) of one ``.npz`` member, read per z slab (module doc).

    ``what`` names the member in messages (folder, case, file). Call ``validate()`` once (it
    raises InputError for a bad file or values); ``slab(sl)`` then gives (K, dz, y, x) float32.
    """

    ndim = 4

    def __init__(self, path, what: str | None = None):
        self.path = Path(path)
        self.what = what or str(self.path)
        self.valid_probabilities = False
        self.dtype = np.dtype(np.float32)
        self._lock = threading.Lock()
        try:
            with zipfile.ZipFile(self.path) as zf:
                if ARRAY_NAME not in zf.namelist():
                    raise InputError(f"{self.what}: no 'probabilities' array (found {sorted(zf.namelist())})")
                info = zf.getinfo(ARRAY_NAME)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise InputError(f"{self.what}: not a readable .npz file ({e})") from e
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise NpzLayoutError(f"{ARRAY_NAME}: compression method {info.compress_type} / flags "
                                 f"{info.flag_bits:#x} cannot be streamed")
        self.crc, self.size, self.deflated = info.CRC, info.file_size, info.compress_type == zipfile.ZIP_DEFLATED
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            head = os.pread(self._fd, _LOCAL_HEADER.size, info.header_offset)
            fields = _LOCAL_HEADER.unpack(head) if len(head) == _LOCAL_HEADER.size else None
            if fields is None or fields[0] != b"PK\x03\x04":
                raise InputError(f"{self.what}: not a readable .npz file (bad local header)")
            self._start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
            self._end = self._start + info.compress_size
            self._header_len, shape, dtype = self._read_npy_header()
        except BaseException:
            os.close(self._fd)
            raise
        if len(shape) != 4:
            self.close()
            raise InputError(f"{self.what}: probabilities must be (K, z, y, x), got shape {shape}")
        self.shape = tuple(int(s) for s in shape)
        self.source_dtype = dtype
        k, z, y, x = self.shape
        self._plane = y * x * dtype.itemsize
        self._class_bytes = z * self._plane
        if self._header_len + k * self._class_bytes != self.size:
            self.close()
            raise InputError(f"{self.what}: not a readable .npz file (the array's size does not match its header)")
        self._checkpoints = None  # deflated: a decoder at the start of each class
        self._cursors = None
        self._z = 0  # the z slice every cursor stands at

    # --- reading the npy header -----------------------------------------------------------
    def _read_npy_header(self):
        prefix = self._raw(0, min(self.size, 1 << 16))
        import io

        f = io.BytesIO(prefix)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise InputError(f"{self.what}: not a readable .npy array inside the .npz ({e})") from e
        if fortran or dtype.hasobject or dtype.kind not in "fiu":
            raise NpzLayoutError(f"{ARRAY_NAME}: fortran order {fortran}, dtype {dtype} cannot be streamed")
        return f.tell(), shape, dtype

    def _raw(self, offset: int, n: int) -> bytes:
        """``n`` bytes of the uncompressed array file from ``offset`` (header reads only)."""
        if not self.deflated:
            return os.pread(self._fd, n, self._start + offset)
        inf = _Inflater(self._fd, self._start, self._end)
        buf = bytearray(offset + n)
        try:
            inf.read_into(memoryview(buf))
        except (zlib.error, EOFError) as e:
            raise InputError(f"{self.what}: not a readable .npz file ({e})") from e
        return bytes(buf[offset:])

    # --- validation pass ------------------------------------------------------------------
    def validate(self) -> None:
        """One sequential pass: the archive CRC and every value (module doc). Deflated members
        keep a decoder copy at the start of each class. Raises InputError naming the problem."""
        if self.valid_probabilities:
            return
        k, nz, ny, nx = self.shape
        per_plane = ny * nx
        total = memory.zeros((nz, ny, nx), np.float32)
        inf = _Inflater(self._fd, self._start, self._end) if self.deflated else None
        crc = 0
        checkpoints = []
        try:
            head = bytearray(self._header_len)
            if inf is not None:
                inf.read_into(memoryview(head))
            else:
                head[:] = os.pread(self._fd, self._header_len, self._start)
            crc = zlib.crc32(head, crc)
            planes = max(1, _PASS_BYTES // self._plane)
            buf = bytearray(planes * self._plane)
            for c in range(k):
                if inf is not None:
                    checkpoints.append(inf.copy())
                for z0 in range(0, nz, planes):
                    z1 = min(z0 + planes, nz)
                    view = memoryview(buf)[:(z1 - z0) * self._plane]
                    if inf is not None:
                        inf.read_into(view)
                    else:
                        off = self._start + self._header_len + c * self._class_bytes + z0 * self._plane
                        data = os.pread(self._fd, len(view), off)
                        if len(data) != len(view):
                            raise EOFError("the file is shorter than its zip directory says")
                        view[:] = data
                    crc = zlib.crc32(view, crc)
                    vals = np.frombuffer(view, dtype=self.source_dtype).reshape(z1 - z0, ny, nx)
                    self._check_values(vals.astype(np.float32, copy=False), c, z0)
                    total[z0:z1] += vals
        except (zlib.error, EOFError) as e:
            raise InputError(f"{self.what}: not a readable .npz file ({e})") from e
        if crc != self.crc:
            raise InputError(f"{self.what}: not a readable .npz file (CRC-32 mismatch: the file is damaged)")
        total -= np.float32(1.0)
        np.abs(total, out=total)
        worst = float(total.max())
        if worst > RANGE_TOLERANCE:
            n_bad = int(np.count_nonzero(total > RANGE_TOLERANCE))
            raise InputError(f"{self.what}: probabilities do not sum to one over the {k} classes at {n_bad} "
                             f"voxels (largest deviation {worst:.3g}, tolerance {RANGE_TOLERANCE:g})")
        del total
        self._checkpoints = checkpoints or None
        self.valid_probabilities = True

    def _check_values(self, v: np.ndarray, c: int, z0: int) -> None:
        finite = np.isfinite(v)
        if not finite.all():
            raise InputError(f"{self.what}: {int(v.size - np.count_nonzero(finite))} non-finite values (NaN or inf) "
                             f"in the probabilities (class {c}, from z slice {z0})")
        lo, hi = float(v.min()), float(v.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise InputError(f"{self.what}: probabilities outside [0, 1] (min {lo:.4g}, max {hi:.4g} in class {c}); "
                             "these look like logits, not softmax outputs")
        if lo < -NEGATIVE_TOLERANCE:
            zz, yy, xx = np.unravel_index(int(np.argmin(v)), v.shape)
            raise InputError(f"{self.what}: negative probability {lo:.3g} for class {c} at voxel (z, y, x) = "
                             f"({zz + z0}, {yy}, {xx}); pass softmax probabilities, not logits")

    # --- slabs ----------------------------------------------------------------------------
    def slab(self, sl: slice) -> np.ndarray:
        """Probabilities of z slices ``sl`` (step 1): (K, dz, y, x) float32. Reading the slabs in
        increasing z is the fast path (each class's decoder moves forward); an earlier slab
        restarts the decoders from their class checkpoints."""
        if not self.valid_probabilities:
            self.validate()
        k, nz, ny, nx = self.shape
        z0, z1, _ = sl.indices(nz)
        out = np.empty((k, z1 - z0, ny, nx), np.float32)
        nbytes = (z1 - z0) * self._plane
        with self._lock:
            if not self.deflated:
                for c in range(k):
                    off = self._start + self._header_len + c * self._class_bytes + z0 * self._plane
                    data = os.pread(self._fd, nbytes, off)
                    out[c] = np.frombuffer(data, dtype=self.source_dtype).reshape(z1 - z0, ny, nx)
                return out
            if self._cursors is None or z0 < self._z:
                self._cursors = [cp.copy() for cp in self._checkpoints]
                self._z = 0
            buf = bytearray(nbytes)
            view = memoryview(buf)
            try:
                for c, cur in enumerate(self._cursors):
                    if z0 > self._z:
                        cur.skip((z0 - self._z) * self._plane)
                    cur.read_into(view)
                    out[c] = np.frombuffer(buf, dtype=self.source_dtype).reshape(z1 - z0, ny, nx)
            except (zlib.error, EOFError) as e:
                self._cursors = None
                raise InputError(f"{self.what}: not a readable .npz file ({e})") from e
            self._z = z1
            if z1 >= nz:  # the last slab: the decoders are not needed until a reread
                self._cursors = None
        return out

    def to_array(self) -> np.ndarray:
        """The whole volume (K, z, y, x) float32 (for callers that keep a member)."""
        out = memory.empty(self.shape, np.float32)
        from ..uncertainty.streaming import z_slabs

        for sl in z_slabs(self.shape[1:]):
            out[:, sl] = self.slab(sl)
        return out

    def __array__(self, dtype=None, copy=None):
        a = self.to_array()
        return a if dtype is None else a.astype(dtype, copy=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole float32 volume (as an array of it would hold)."""
        return int(np.prod(self.shape)) * 4

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        self._checkpoints = self._cursors = None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass
