"""Member folders in nnU-Net --save_probabilities layout: read, write, validate, pair with images."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from CalibUncertaintyLib.errors import GeometryMismatchError, InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image, write_image
from CalibUncertaintyLib.io.nnunet_outputs import (class_names_from_dataset, list_image_cases,
                                                   list_member_cases, load_member_geometry,
                                                   load_member_probs, pair_cases, probs_shape,
                                                   validate_probs, write_member_probs)

GEOM = Geometry((6, 7, 8), (0.8, 0.9, 2.5), (10.0, -5.0, 3.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
K = 3


def _probs(seed=0, geom=GEOM, k=K):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(k,) + geom.shape_zyx) * 3
    p = np.exp(z - z.max(0))
    return (p / p.sum(0)).astype(np.float32)


def _dataset(root, n_channels=1, k=K):
    ds = {"channel_names": {str(i): f"ch{i}" for i in range(n_channels)},
          "labels": {"background": 0, **{f"organ{i}": i for i in range(1, k)}},
          "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(ds))


def _raw(root, cases=("a", "b"), geom=GEOM):
    img, lab = root / "imagesTr", root / "labelsTr"
    for c in cases:
        write_image(img / f"{c}_0000.nii.gz", np.zeros(geom.shape_zyx, np.int16), geom)
        write_image(lab / f"{c}.nii.gz", np.zeros(geom.shape_zyx, np.uint8), geom)
    _dataset(root)
    return img, lab


def _members(root, names=("fold_0", "fold_1", "fold_2"), cases=("a", "b"), geom=GEOM):
    dirs = []
    for i, n in enumerate(names):
        for j, c in enumerate(cases):
            write_member_probs(root / n, c, _probs(10 * i + j, geom), geom)
        dirs.append(root / n)
    return dirs


def test_roundtrip_keeps_probabilities_and_geometry(tmp_path):
    p = _probs()
    npz = write_member_probs(tmp_path / "m", "case1", p, GEOM)
    assert npz.name == "case1.npz" and (tmp_path / "m" / "case1.pkl").is_file()
    assert probs_shape(npz) == (K,) + GEOM.shape_zyx
    q, g = load_member_probs(tmp_path / "m", "case1")
    assert q.dtype == np.float32 and np.array_equal(q, p)
    assert g == GEOM and load_member_geometry(tmp_path / "m", "case1") == GEOM
    assert list_member_cases(tmp_path / "m") == ["case1"]
    with open(tmp_path / "m" / "case1.pkl", "rb") as f:
        props = pickle.load(f)
    assert tuple(props["sitk_stuff"]["spacing"]) == GEOM.spacing
    assert list(props["spacing"]) == list(GEOM.spacing_zyx)  # nnU-Net's reversed spacing
    # no temporary files left behind
    assert sorted(x.name for x in (tmp_path / "m").iterdir()) == ["case1.npz", "case1.pkl"]


def test_nnunet_writer_accepts_our_properties(tmp_path):
    """nnU-Net's own SimpleITK writer places a segmentation on our pkl's grid exactly."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    write_member_probs(tmp_path / "m", "c", _probs(), GEOM)
    with open(tmp_path / "m" / "c.pkl", "rb") as f:
        props = pickle.load(f)
    seg = _probs().argmax(0).astype(np.uint8)
    SimpleITKIO().write_seg(seg, str(tmp_path / "seg.nii.gz"), props)
    arr, geom = read_image(tmp_path / "seg.nii.gz")
    assert geom.mismatch(GEOM) is None and np.array_equal(arr, seg)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.__setitem__((0, 1, 1, 1), np.nan), "non-finite"),
    (lambda p: p.__imul__(0.9), "do not sum to one"),
    (lambda p: p.__imul__(20.0), "outside [0, 1]"),
])
def test_bad_probabilities_are_rejected_with_file_and_problem(tmp_path, mutate, message):
    write_member_probs(tmp_path / "fold_1", "x", _probs(), GEOM)
    p = _probs()
    mutate(p)
    np.savez_compressed(tmp_path / "fold_1" / "x.npz", probabilities=p)  # bypass our writer's checks
    with pytest.raises(InputError) as e:
        load_member_probs(tmp_path / "fold_1", "x")
    assert message in str(e.value) and "fold_1" in str(e.value) and "x.npz" in str(e.value)


def test_validate_probs_shapes_and_class_count():
    with pytest.raises(InputError, match="must be"):
        validate_probs(np.ones((4, 4, 4), np.float32), "m")
    with pytest.raises(InputError, match="3 class channels, but"):
        validate_probs(_probs(), "m", n_classes=4)
    with pytest.raises(InputError, match="need background"):
        validate_probs(np.ones((1, 2, 2, 2), np.float32), "m")
    assert validate_probs(_probs().astype(np.float64), "m").dtype == np.float32


def test_missing_and_broken_member_files(tmp_path):
    write_member_probs(tmp_path / "fold_0", "x", _probs(), GEOM)
    (tmp_path / "fold_0" / "x.pkl").unlink()
    with pytest.raises(InputError, match="properties file missing"):
        load_member_probs(tmp_path / "fold_0", "x")
    with open(tmp_path / "fold_0" / "x.pkl", "wb") as f:
        pickle.dump({"spacing": [1, 1, 1]}, f)
    with pytest.raises(InputError, match="sitk_stuff"):
        load_member_probs(tmp_path / "fold_0", "x")
    (tmp_path / "fold_0" / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable"):
        probs_shape(tmp_path / "fold_0" / "x.npz")
    with pytest.raises(InputError, match="not found"):
        list_member_cases(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no <case>.npz"):
        list_member_cases(tmp_path / "empty")


def test_pairing_ok_and_single_member_note(tmp_path):
    img, lab = _raw(tmp_path)
    dirs = _members(tmp_path / "pred")
    pairing = pair_cases(dirs, img, lab)
    assert [c.case for c in pairing.cases] == ["a", "b"] and pairing.n_members == 3
    assert pairing.class_names == ["background", "organ1", "organ2"] and pairing.notes == []
    assert pairing.cases[0].label_path.name == "a.nii.gz"
    loaded = list(pairing.cases[1].load_members(pairing.n_classes))
    assert len(loaded) == 3 and all(p.shape == (K,) + GEOM.shape_zyx for p in loaded)
    one = pair_cases(dirs[:1], img, lab, cases=["b"])
    assert [c.case for c in one.cases] == ["b"] and one.n_members == 1
    assert "mutual information and EPKL are zero" in one.notes[0]


def test_pairing_spacing_mismatch_names_member_case_and_both_spacings(tmp_path):
    img, lab = _raw(tmp_path)
    dirs = _members(tmp_path / "pred", names=("fold_0", "fold_1", "fold_2"))
    other = Geometry(GEOM.shape_zyx, (1.0, 0.9, 2.5), GEOM.origin, GEOM.direction)
    dirs2 = _members(tmp_path / "pred2", names=("fold_0", "fold_1", "fold_2"))
    write_member_probs(dirs2[2], "b", _probs(geom=other), other)
    # member vs member (no image to compare with)
    with pytest.raises(GeometryMismatchError, match=r"member fold_2 case b: spacing .* \(vs member fold_0\)"):
        pair_cases(dirs2)
    # with the image: the odd member is named against the image
    with pytest.raises(GeometryMismatchError, match=r"member fold_2 case b: spacing .* != image spacing"):
        pair_cases(dirs2, img, lab)
    # every member on the other grid: member vs image
    for d in dirs:
        write_member_probs(d, "b", _probs(geom=other), other)
    with pytest.raises(GeometryMismatchError) as e:
        pair_cases(dirs, img, lab)
    msg = str(e.value)
    assert msg.startswith("member fold_0 case b: spacing") and "!= image spacing" in msg
    assert "spacing (x, y, z) mm (1, 0.9, 2.5) != image spacing (0.8, 0.9, 2.5)" in msg


def test_pairing_shape_mismatch(tmp_path):
    img, lab = _raw(tmp_path)
    small = Geometry((6, 7, 7), GEOM.spacing, GEOM.origin, GEOM.direction)
    dirs = _members(tmp_path / "pred", names=("fold_0",), cases=("a",), geom=small)
    with pytest.raises(GeometryMismatchError, match=r"member fold_0 case a: shape \(z, y, x\) \(6, 7, 7\) != image shape"):
        pair_cases(dirs, img, lab)


def test_pairing_extra_channel_missing_files_and_k_mismatch(tmp_path):
    img, lab = _raw(tmp_path)
    dirs = _members(tmp_path / "pred")
    write_image(img / "a_0001.nii.gz", np.zeros(GEOM.shape_zyx, np.int16), GEOM)
    with pytest.raises(InputError, match=r"case a: found channel files a_0000.nii.gz, a_0001.nii.gz, expected 1 channel"):
        pair_cases(dirs, img, lab)
    (img / "a_0001.nii.gz").unlink()
    (lab / "b.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case b: no label b.nii.gz"):
        pair_cases(dirs, img, lab)
    with pytest.raises(InputError, match=r"case zz: no zz.npz in member folder\(s\) fold_0, fold_1, fold_2"):
        pair_cases(dirs, img, cases=["zz"])
    (dirs[1] / "a.npz").unlink()
    with pytest.raises(InputError, match=r"case a is missing from member folder\(s\) fold_1"):
        pair_cases(dirs, img)
    write_member_probs(dirs[1], "a", _probs(k=4), GEOM)
    with pytest.raises(InputError, match=r"member fold_1 case a: 4 class channels, other members have 3"):
        pair_cases(dirs, img)
    with pytest.raises(InputError, match="same member folder is given twice"):
        pair_cases([dirs[0], dirs[0]], img)


def test_label_off_grid_and_dataset_labels(tmp_path):
    img, lab = _raw(tmp_path, cases=("a",))
    dirs = _members(tmp_path / "pred", cases=("a",))
    shifted = Geometry(GEOM.shape_zyx, GEOM.spacing, (11.0, -5.0, 3.0), GEOM.direction)
    write_image(lab / "a.nii.gz", np.zeros(GEOM.shape_zyx, np.uint8), shifted)
    with pytest.raises(GeometryMismatchError, match=r"label of case a .* origin"):
        pair_cases(dirs, img, lab)
    with pytest.raises(InputError, match="do not match the 4 probability"):
        class_names_from_dataset({"labels": {"background": 0, "x": 1, "y": 2}}, 4)
    assert class_names_from_dataset(None, 3) == ["background", "class_1", "class_2"]
    with pytest.raises(InputError, match="must be named <case>_0000"):
        write_image(img / "weird.nii.gz", np.zeros(GEOM.shape_zyx, np.int16), GEOM)
        list_image_cases(img)
