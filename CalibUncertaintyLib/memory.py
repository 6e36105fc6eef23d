"""Full-size volumes on their own memory mappings, so that freeing one gives its memory back.

A case's large arrays (a member's probabilities, the ensemble sums, each uncertainty map) are
allocated, freed and allocated again while PyTorch and SciPy allocate beside them. Through
``malloc`` such arrays end up in the process heap once glibc has raised its mmap threshold (it
does after the first large block is freed), and a freed volume in the middle of the heap stays
resident: the process's peak memory then grows with every member and every map. ``empty`` and
``zeros`` put arrays of ``MAPPED_MIN_BYTES`` or more on an anonymous memory mapping instead; the
mapping is unmapped when the last view of the array is gone. Smaller arrays are plain numpy ones.

Fresh mappings read as zeros, so ``zeros`` costs no more than ``empty``.
"""

from __future__ import annotations

import mmap

import numpy as np

MAPPED_MIN_BYTES = 1 << 20
"""Arrays of at least this many bytes get their own mapping (1 MiB)."""


def _mapped(shape, dtype) -> np.ndarray | None:
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MAPPED_MIN_BYTES:
        return None
    return np.ndarray(shape, dtype=dtype, buffer=mmap.mmap(-1, nbytes))


def empty(shape, dtype=np.float32) -> np.ndarray:
    """Like ``np.empty`` (C order); large arrays on their own mapping (module doc)."""
    a = _mapped(shape, dtype)
    return np.empty(shape, dtype=dtype) if a is None else a


def zeros(shape, dtype=np.float32) -> np.ndarray:
    """Like ``np.zeros`` (C order); large arrays on their own mapping (module doc)."""
    a = _mapped(shape, dtype)
    return np.zeros(shape, dtype=dtype) if a is None else a


def full(shape, value, dtype=np.float32) -> np.ndarray:
    """Like ``np.full`` (C order); large arrays on their own mapping (module doc)."""
    a = empty(shape, dtype)
    a.fill(value)
    return a


_TRIM = None


def release_heap() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Slab temporaries (a few MB each, below ``MAPPED_MIN_BYTES`` of a volume but above glibc's
    raised mmap threshold) come from the heap; freed between members they leave resident holes
    that the next member's temporaries do not always reuse, so a process's peak would grow by a
    few volumes over a case (measured: 4 float32 volumes at K = 14 in
    Testing/Python/test_memory_many_classes.py). Called once per member, it costs microseconds
    to milliseconds."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _TRIM = libc.malloc_trim
            _TRIM.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)
