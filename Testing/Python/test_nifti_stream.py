"""io.nifti_stream: .nii.gz written slab by slab reads back (ITK and our checks) with the exact
geometry and voxels of SimpleITK's own writer; incomplete files never appear."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image, to_sitk, write_image
from CalibUncertaintyLib.io.nifti_stream import NiftiStreamWriter, codec_name, write_volume

GEOM = Geometry((13, 17, 19), (0.8, 0.7, 2.5), (-100.5, 20.25, -300.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint16])
def test_streamed_file_equals_simpleitk_writer(tmp_path, dtype):
    rng = np.random.default_rng(0)
    a = (rng.random(GEOM.shape_zyx) * 200).astype(dtype)
    ref = tmp_path / "ref.nii.gz"
    sitk.WriteImage(to_sitk(a, GEOM), str(ref), useCompression=True)
    out = tmp_path / "s.nii.gz"
    with NiftiStreamWriter(out, GEOM, dtype) as w:
        for z0 in range(0, 13, 4):  # uneven slabs
            w.write(a[z0:z0 + 4])
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(ref.read_bytes())  # header and voxels
    b, g = read_image(out)
    assert g == read_image(ref)[1] and g.mismatch(GEOM) is None
    assert b.dtype == np.dtype(dtype) and np.array_equal(a, b)
    assert codec_name() in ("isal", "zlib")


def test_write_image_uses_it_and_keeps_geometry(tmp_path):
    a = np.linspace(0, 1, int(np.prod(GEOM.shape_zyx)), dtype=np.float64).reshape(GEOM.shape_zyx)
    write_image(tmp_path / "m.nii.gz", a, GEOM)
    b, g = read_image(tmp_path / "m.nii.gz")
    assert g.mismatch(GEOM) is None and b.dtype == np.float32 and np.array_equal(b, a.astype(np.float32))
    write_volume(tmp_path / "w.nii.gz", a.astype(np.float32), GEOM, slab_bytes=1)  # one slice at a time
    assert np.array_equal(read_image(tmp_path / "w.nii.gz")[0], b)


def test_incomplete_or_wrong_slabs_leave_nothing(tmp_path):
    out = tmp_path / "p.nii.gz"
    out.write_bytes(b"previous")
    w = NiftiStreamWriter(out, GEOM, np.float32)
    w.write(np.zeros((5, 17, 19), np.float32))
    with pytest.raises(InputError, match="only 5 of 13 z slices"):
        w.close()
    w = NiftiStreamWriter(out, GEOM, np.float32)
    with pytest.raises(InputError, match="does not continue"):
        w.write(np.zeros((5, 17, 18), np.float32))
    with pytest.raises(RuntimeError):
        with NiftiStreamWriter(out, GEOM, np.float32) as w:
            w.write(np.zeros((2, 17, 19), np.float32))
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["p.nii.gz"]
    with pytest.raises(InputError, match="streamed writing needs"):
        NiftiStreamWriter(tmp_path / "x.nrrd", GEOM, np.float32)
