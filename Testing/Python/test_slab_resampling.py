"""nnU-Net's probability resampling reproduced one slab at a time (nnunet/slab_resampling.py):
equal to nnunetv2's own resample_data_or_seg_to_shape on the whole volume, bit for bit."""

from functools import partial

import numpy as np
import pytest

pytest.importorskip("nnunetv2")
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape  # noqa: E402

from CalibUncertaintyLib.nnunet.slab_resampling import SlabResampler  # noqa: E402

DEFAULT = partial(resample_data_or_seg_to_shape, is_seg=False, order=1, order_z=0, force_separate_z=None)


def _slabwise(r, src, n_out, step):
    return np.concatenate([r.block(src, lo, min(lo + step, n_out)) for lo in range(0, n_out, step)],
                          axis=r.axis + 1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("src_shape,dst_shape,cur,new,axis", [
    ((7, 10, 12), (23, 21, 25), (5.0, 1.5, 1.5), (1.25, 0.78, 0.78), 0),   # separate z, slices change
    ((9, 10, 12), (9, 21, 25), (3.0, 2.0, 2.0), (3.0, 0.95, 0.95), 0),     # separate z, same slice count
    ((10, 7, 12), (21, 23, 25), (1.5, 5.0, 1.5), (0.78, 1.25, 0.78), 1),   # separate along the slab axis 1
])
def test_separate_z_is_bit_exact(dtype, src_shape, dst_shape, cur, new, axis):
    rng = np.random.default_rng(0)
    src = (rng.normal(0, 4, (3, *src_shape))).astype(dtype)
    r = SlabResampler.create(DEFAULT, src_shape, dst_shape, cur, new, axis=axis)
    assert r is not None and r.separate
    whole = DEFAULT(src, dst_shape, cur, new)
    got = _slabwise(r, src, dst_shape[axis], 4)
    assert got.dtype == whole.dtype and np.array_equal(got, whole)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_trilinear_is_bit_exact(dtype):
    rng = np.random.default_rng(1)
    src_shape, dst_shape, cur, new = (11, 13, 9), (27, 30, 20), (1.0, 1.2, 1.1), (0.4, 0.52, 0.5)
    src = rng.normal(0, 4, (2, *src_shape)).astype(dtype)
    r = SlabResampler.create(DEFAULT, src_shape, dst_shape, cur, new, axis=0)
    assert r is not None and not r.separate
    whole = DEFAULT(src, dst_shape, cur, new)
    for step in (1, 5, 27):
        got = _slabwise(r, src, dst_shape[0], step)
        assert got.dtype == whole.dtype and np.array_equal(got, whole)
    # downsampling along the slab axis and in-plane, and slabs along axis 2
    src2 = rng.normal(0, 4, (2, 30, 13, 40)).astype(dtype)
    for shape2, axis in (((17, 25, 40), 0), ((30, 13, 57), 2)):
        r2 = SlabResampler.create(DEFAULT, src2.shape[1:], shape2, (1.0, 1.0, 1.0), (1.2, 0.6, 0.9), axis=axis)
        assert r2 is not None and not r2.separate
        assert np.array_equal(_slabwise(r2, src2, shape2[axis], 4), DEFAULT(src2, shape2, (1.0, 1.0, 1.0), (1.2, 0.6, 0.9)))


def test_cases_it_does_not_reproduce_fall_back():
    cubic = partial(resample_data_or_seg_to_shape, is_seg=False, order=3, order_z=0, force_separate_z=None)
    iso = ((11, 13, 9), (27, 30, 20), (1.0, 1.2, 1.1), (0.4, 0.52, 0.5))
    assert SlabResampler.create(cubic, *iso, axis=0) is None  # global spline prefilter
    aniso = ((7, 10, 12), (23, 21, 25), (5.0, 1.5, 1.5), (1.25, 0.78, 0.78))
    assert SlabResampler.create(DEFAULT, *aniso, axis=1) is None  # separate z along another axis
    assert SlabResampler.create(lambda *a, **k: None, *aniso, axis=0) is None  # not nnU-Net's function
    assert SlabResampler.create(DEFAULT, (5, 6, 7), (5, 6, 7), (1, 1, 1), (1, 1, 1), axis=0) is None
    # cubic in-plane with separate z is reproduced (each slice resized by the same call)
    assert SlabResampler.create(cubic, *aniso, axis=0) is not None
