"""Phantom dataset: determinism, geometry, label content, nnU-Net raw layout, reuse and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.synthetic.phantom import (LABELS, PhantomSpec, make_phantom_case,
                                                   write_phantom_dataset)

SMALL = PhantomSpec(shape_zyx=(20, 32, 32), spacing=(2.0, 2.0, 4.0))


def test_same_seed_same_case_other_seed_other_case():
    a_img, a_lab, a_geo = make_phantom_case(3)
    b_img, b_lab, b_geo = make_phantom_case(3)
    c_img, c_lab, c_geo = make_phantom_case(4)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab) and a_geo == b_geo
    assert not np.array_equal(a_img, c_img)
    assert a_geo.origin != c_geo.origin


def test_case_content_and_geometry():
    spec = PhantomSpec()
    img, lab, geo = make_phantom_case(0, spec)
    assert img.shape == lab.shape == spec.shape_zyx == geo.shape_zyx
    assert img.dtype == np.int16 and lab.dtype == np.uint8
    assert geo.spacing == spec.spacing and len(set(geo.spacing)) > 1  # anisotropic
    assert max(abs(o - s) for o, s in zip(geo.origin, spec.origin)) <= spec.origin_jitter_mm
    assert geo.origin != (0.0, 0.0, 0.0)
    assert set(np.unique(lab)) == {0, 1, 2}
    # small structures: each foreground class is well under 2 % of the volume
    for c in (1, 2):
        assert 0 < (lab == c).mean() < 0.02
    # CT-like intensities: air outside, soft tissue inside, nodes darker and vessels brighter than tissue
    assert img.min() <= -900 and np.median(img[lab == 2]) > np.median(img[lab == 1]) + 100
    tissue = img[(lab == 0) & (img > -50) & (img < 150)]
    assert np.median(img[lab == 1]) < np.median(tissue) - 30 < np.median(img[lab == 2]) - 100


def test_label_noise_only_touches_borders():
    clean = PhantomSpec(label_noise=0.0)
    noisy = PhantomSpec(label_noise=0.3)
    img0, lab0, _ = make_phantom_case(5, clean)
    img1, lab1, _ = make_phantom_case(5, noisy)
    assert np.array_equal(img0, img1)  # the image does not depend on the label noise
    changed = lab0 != lab1
    assert changed.any()
    from scipy import ndimage

    fg = lab0 > 0
    border = ndimage.binary_dilation(fg) & ~ndimage.binary_erosion(fg)
    assert not (changed & ~border).any()


def test_dataset_layout_reuse_and_geometry_on_disk(tmp_path):
    ds = write_phantom_dataset(tmp_path, dataset_id=7, name="P", n_train=3, n_test=2, seed=1, spec=SMALL)
    assert ds.folder.name == "Dataset007_P"
    dj = json.loads((ds.folder / "dataset.json").read_text())
    assert dj["labels"] == LABELS and dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 3
    assert dj["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (ds.folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in ds.train_cases]
    assert sorted(p.name for p in (ds.folder / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in ds.test_cases]
    img, geo = read_image(ds.image(ds.test_cases[0]))
    lab, lgeo = read_image(ds.label(ds.test_cases[0]))
    assert geo.mismatch(lgeo) is None and geo.shape_zyx == SMALL.shape_zyx
    assert np.allclose(geo.spacing, SMALL.spacing)
    # byte-identical to a direct draw: deterministic per (seed, case index)
    again = write_phantom_dataset(tmp_path / "again", dataset_id=7, name="P", n_train=3, n_test=2, seed=1, spec=SMALL)
    a, _ = read_image(again.image(again.train_cases[1]))
    b, _ = read_image(ds.image(ds.train_cases[1]))
    assert np.array_equal(a, b)
    # a complete dataset is reused (files untouched); other parameters regenerate it
    before = ds.image(ds.train_cases[0]).stat().st_mtime_ns
    write_phantom_dataset(tmp_path, dataset_id=7, name="P", n_train=3, n_test=2, seed=1, spec=SMALL)
    assert ds.image(ds.train_cases[0]).stat().st_mtime_ns == before
    write_phantom_dataset(tmp_path, dataset_id=7, name="P", n_train=3, n_test=2, seed=2, spec=SMALL)
    c, _ = read_image(ds.image(ds.train_cases[0]))
    assert not np.array_equal(c, read_image(again.image(again.train_cases[0]))[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset_id=1000), "three digits"),
    (dict(name="bad name"), "letters, digits"),
    (dict(n_train=1), "at least 2 training"),
])
def test_bad_dataset_arguments(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        write_phantom_dataset(tmp_path, **{"spec": SMALL, **kwargs})
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_spec():
    with pytest.raises(InputError, match="label_noise"):
        PhantomSpec(label_noise=1.5)
    with pytest.raises(InputError, match=">= 16 voxels"):
        PhantomSpec(shape_zyx=(8, 32, 32))
