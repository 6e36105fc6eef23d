"""Large volumes on their own memory mappings (CalibUncertaintyLib/memory.py)."""

from __future__ import annotations

import gc
import mmap
import weakref

import numpy as np

from CalibUncertaintyLib import memory


def test_large_arrays_get_their_own_mapping_small_ones_do_not():
    big = memory.empty((4, 256, 256), np.float32)  # 1 MiB
    assert isinstance(big.base, mmap.mmap) and big.shape == (4, 256, 256) and big.dtype == np.float32
    assert big.flags.c_contiguous and big.flags.writeable
    small = memory.empty((10, 10), np.float32)
    assert not isinstance(small.base, mmap.mmap)
    z = memory.zeros((2, 512, 512), np.uint16)
    assert isinstance(z.base, mmap.mmap) and not z.any()
    f = memory.full((3, 300, 300), np.inf, np.float32)
    assert np.all(np.isinf(f))
    b = memory.zeros((1 << 21,), bool)
    b[5] = True
    assert b.sum() == 1 and b.dtype == np.bool_


def test_mapping_is_released_with_the_last_view():
    a = memory.zeros((1 << 20,), np.float32)
    ref = weakref.ref(a.base)
    view = a[10:20]
    del a
    gc.collect()
    assert ref() is not None  # a view still uses it
    view[:] = 1.0
    del view
    gc.collect()
    assert ref() is None
