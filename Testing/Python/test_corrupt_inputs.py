"""Truncated / corrupt image files and NaN voxels are refused, never read as a valid image (issue 12, items 1-2).

Inputs are real OpenKBP files cut to half their length (as an interrupted copy leaves them), in
gzip and plain .nii form; ITK reads such a file without complaint and fills the missing half with
zeros. A CT with a block of NaN voxels must not be given maps either: refused with the voxel count,
the same in the CLI and on the Slicer path (the module exports the volume node and runs `predict`).
"""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.images import read_header_geometry, read_image, write_image
from CalibUncertaintyLib.progress import parse_progress_line
from CalibUncertaintyLib.synthetic.members import make_member_folders

from tiny_nnunet import build_tiny_model_folder, write_test_ct

CASE = "OKBP_train_001"


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if parse_progress_line(ln) is None]
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def _half(src, dst, plain: bool):
    """A copy of ``src`` cut to half its length; ``plain``: of its decompressed .nii bytes."""
    data = gzip.decompress(src.read_bytes()) if plain else src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture(scope="module")
def real(openkbp_dir):
    return {"ct": openkbp_dir / "imagesTr" / f"{CASE}_0000.nii.gz", "label": openkbp_dir / "labelsTr" / f"{CASE}.nii.gz"}


@pytest.mark.parametrize("kind", ["ct", "label"])
@pytest.mark.parametrize("plain", [False, True], ids=["nii.gz", "nii"])
def test_half_length_copies_are_refused(real, tmp_path, kind, plain):
    from CalibUncertaintyLib.io.images import verify_image_file

    src = real[kind]
    bad = _half(src, tmp_path / ("half.nii" if plain else "half.nii.gz"), plain)
    # what the issue found: ITK reads the short file as if it were complete, half of it zeros
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(bad)))
    assert arr.shape == (128, 128, 128)
    for reader in (verify_image_file, read_image, read_header_geometry):
        with pytest.raises(InputError, match="truncated") as exc:
            reader(bad)
        assert str(bad) in str(exc.value)
    verify_image_file(src)  # the intact file passes


def test_bad_gzip_checksum_is_refused(real, tmp_path):
    data = bytearray(real["ct"].read_bytes())
    data[-8] ^= 0xFF  # the CRC-32 of the stream; the voxels decompress fine
    bad = tmp_path / "crc.nii.gz"
    bad.write_bytes(bytes(data))
    sitk.ReadImage(str(bad))  # ITK does not notice
    with pytest.raises(InputError, match="corrupt gzip") as exc:
        read_image(bad)
    assert "crc.nii.gz" in str(exc.value)


@pytest.fixture(scope="module")
def model_setup(tmp_path_factory, openkbp_dir):
    root = tmp_path_factory.mktemp("corrupt_predict")
    model = build_tiny_model_folder(root / "model", folds=(0,))
    ct = write_test_ct(root / "good" / "hn_0000.nii.gz", source_ct=openkbp_dir / "imagesTr" / f"{CASE}_0000.nii.gz",
                       shape_zyx=(18, 40, 36))
    return {"root": root, "model": model, "ct": ct}


def _predict(setup, image, out):
    return main(["predict", "-i", str(image), "-m", str(setup["model"]), "--ensemble", "single", "--no-tta",
                 "--device", "cpu", "-o", str(out)])


def test_predict_refuses_a_truncated_ct_before_inference(model_setup, tmp_path, capsys):
    bad = _half(model_setup["ct"], tmp_path / "in" / "hn_0000.nii.gz", plain=False)
    assert _predict(model_setup, bad, tmp_path / "out") == 2
    msg = _error(capsys)
    assert "truncated" in msg and "hn_0000.nii.gz" in msg
    assert not (tmp_path / "out").exists()


def test_fit_temperature_refuses_a_truncated_label(openkbp_dir, tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(openkbp_dir / "dataset.json", tmp_path / "dataset.json")
    _half(openkbp_dir / "labelsTr" / f"{CASE}.nii.gz", labels / f"{CASE}.nii.gz", plain=False)
    members = make_member_folders(openkbp_dir / "labelsTr", tmp_path / "pred", [CASE], n_members=2, seed=0)
    out = tmp_path / "cal.json"
    assert main(["fit-temperature", "--members", *map(str, members), "--labels", str(labels), "-o", str(out)]) == 2
    msg = _error(capsys)
    assert "truncated" in msg and f"{CASE}.nii.gz" in msg
    assert not out.exists()


def test_maps_refuses_a_truncated_plain_nii_ct(openkbp_dir, tmp_path, capsys):
    images = tmp_path / "images"
    _half(openkbp_dir / "imagesTr" / f"{CASE}_0000.nii.gz", images / f"{CASE}_0000.nii", plain=True)
    members = make_member_folders(openkbp_dir / "labelsTr", tmp_path / "pred", [CASE], n_members=2, seed=0)
    assert main(["maps", "--members", *map(str, members), "--images", str(images), "-o", str(tmp_path / "out")]) == 2
    msg = _error(capsys)
    assert "truncated" in msg and f"{CASE}_0000.nii" in msg
    assert not (tmp_path / "out").exists()


def test_slicer_load_refuses_a_truncated_segmentation(sample_case_files, tmp_path):
    import slicer

    from CalibUncertaintyLib.mrml.nodes import load_case_outputs

    _, case_dir = sample_case_files
    broken = tmp_path / "sample"
    shutil.copytree(case_dir, broken)
    _half(case_dir / "seg.nii.gz", broken / "seg.nii.gz", plain=False)
    scene = slicer.vtkMRMLScene()
    n_before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="truncated") as exc:
        load_case_outputs(scene, broken)
    assert "seg.nii.gz" in str(exc.value)
    assert scene.GetNumberOfNodes() == n_before


# --- NaN / inf voxels ---------------------------------------------------------------------------
def _nan_ct(src, dst):
    arr, geo = read_image(src)
    arr = arr.astype(np.float32)
    arr[5:8, 10:20, 10:20] = np.nan  # 300 voxels
    arr[9, 0, 0] = np.inf
    return write_image(dst, arr, geo)


def test_predict_refuses_a_ct_with_nan_voxels(model_setup, tmp_path, capsys):
    bad = _nan_ct(model_setup["ct"], tmp_path / "in" / "hn_0000.nii.gz")
    assert _predict(model_setup, bad, tmp_path / "out") == 2
    msg = _error(capsys)
    assert "301 of" in msg and "300 NaN, 1 infinite" in msg and "hn_0000.nii.gz" in msg
    assert not (tmp_path / "out").exists()


def test_maps_refuses_a_ct_with_nan_voxels(openkbp_dir, tmp_path, capsys):
    images = tmp_path / "images"
    _nan_ct(openkbp_dir / "imagesTr" / f"{CASE}_0000.nii.gz", images / f"{CASE}_0000.nii.gz")
    members = make_member_folders(openkbp_dir / "labelsTr", tmp_path / "pred", [CASE], n_members=2, seed=0)
    assert main(["maps", "--members", *map(str, members), "--images", str(images), "-o", str(tmp_path / "out")]) == 2
    assert "300 NaN, 1 infinite" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_slicer_path_refuses_a_volume_node_with_nan_voxels(model_setup, tmp_path, capsys):
    """The module runs `predict` on the exported volume node (runner.py): the same refusal."""
    from CalibUncertaintyLib.mrml.volumes import export_volume_node, new_volume_node

    arr, geo = read_image(model_setup["ct"])
    arr = arr.astype(np.float32)
    arr[4:6, 0:10, 0:10] = np.nan
    node = new_volume_node(arr, geo, "CT with NaN")
    exported = export_volume_node(node, tmp_path / "in" / "hn_0000.nrrd")
    assert _predict(model_setup, exported, tmp_path / "out") == 2
    assert "200 NaN" in _error(capsys)
