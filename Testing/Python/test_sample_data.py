"""The extension's sample data (sample_data.py): built by the project from its phantom demo
machinery, a real tiny nnU-Net ensemble that ``predict`` (what Apply runs) accepts."""

from __future__ import annotations

import inspect
import zipfile

import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.sample_data import (CALIBRATION_NAME, CT_FILE, MODEL_ZIP, SAMPLE_BASE_URL,
                                             build_sample_data, sample_data_sources, split_downloaded,
                                             unpack_sample_model)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    pytest.importorskip("torch", reason="training the sample model needs torch")
    return build_sample_data(tmp_path_factory.mktemp("sample"), quick=True)


@pytest.mark.slow
def test_sample_files_are_small_and_complete(sample):
    from CalibUncertaintyLib.sample_data import SUMS_NAME, read_sums, sha256_of

    assert sample.ct.name == CT_FILE and sample.model_zip.name == MODEL_ZIP
    sums = read_sums(sample.ct.parent / SUMS_NAME)     # what a release publishes and records
    assert sums == {p.name: f"SHA256:{sha256_of(p)}" for p in (sample.ct, sample.model_zip)}
    names = zipfile.ZipFile(sample.model_zip).namelist()
    assert CALIBRATION_NAME in names
    assert sum(n.endswith("/fold_0/checkpoint_final.pth") or n.endswith("/fold_1/checkpoint_final.pth")
               for n in names) == 2
    assert sample.ct.stat().st_size + sample.model_zip.stat().st_size < 5_000_000


@pytest.mark.slow
def test_apply_runs_on_the_sample(sample, tmp_path):
    """What the module's Apply does with the sample inputs: predict with the calibration."""
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.cli.main import build_parser
    from CalibUncertaintyLib.nnunet.model_folder import ModelFolder

    model_dir, calibration = unpack_sample_model(sample.model_zip, tmp_path / "unpacked")
    assert len(ModelFolder.open(model_dir).members("deep", None)) == 2
    assert CalibrationFile.load(calibration).temperature > 0
    args = build_parser().parse_args(["predict", "-i", str(sample.ct), "-m", str(model_dir), "--calibration",
                                      str(calibration), "--no-tta", "--device", "cpu", "-o", str(tmp_path / "out")])
    assert not args.func(args)
    (case_dir,) = [d for d in (tmp_path / "out").iterdir() if d.is_dir()]
    assert (case_dir / "regions.json").is_file() and (case_dir / "map_dae.nii.gz").is_file()


def test_unpack_refuses_what_is_not_a_sample(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../evil.txt", "x")
    with pytest.raises(InputError, match="outside"):
        unpack_sample_model(bad, tmp_path / "dest")
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "x")
    with pytest.raises(InputError, match="not a CalibUncertainty sample model"):
        unpack_sample_model(other, tmp_path / "dest2")
    (tmp_path / "plain.zip").write_text("not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        unpack_sample_model(tmp_path / "plain.zip", tmp_path / "dest3")


def _register_custom_sample_data_source(category="Custom", sampleName=None, uris=None, fileNames=None,
                                        nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                        loadFileTypes=None, loadFiles=None, loadFileProperties={}, checksums=None,
                                        loadFileType=None):
    """The parameter list of SampleData.SampleDataLogic.registerCustomSampleDataSource (Slicer main;
    5.10 has the same names except loadFileTypes)."""


def test_sample_data_source_matches_slicers_registration_call():
    from CalibUncertaintyLib.sample_data import recorded_checksums

    (source,) = sample_data_sources(thumbnail="icon.png")
    inspect.signature(_register_custom_sample_data_source).bind(**source)
    # SHA-256 of the published files, as Slicer's template registers them (SampleData verifies)
    recorded = recorded_checksums()
    assert source["checksums"] == [recorded[CT_FILE], recorded[MODEL_ZIP]]
    assert all(c.startswith("SHA256:") and len(c) == 7 + 64 for c in source["checksums"])
    assert "loadFileTypes" not in source          # also accepted by Slicer 5.10
    assert source["uris"] == [f"{SAMPLE_BASE_URL}/{CT_FILE}", f"{SAMPLE_BASE_URL}/{MODEL_ZIP}"]
    assert SAMPLE_BASE_URL.startswith("https://github.com/") and "/SlicerCalibUncertainty/releases/download/" in SAMPLE_BASE_URL
    assert source["loadFiles"] == [True, False] and source["nodeNames"][1] is None
    assert len({len(source[k]) for k in ("uris", "fileNames", "nodeNames", "loadFiles", "loadFileType", "checksums")}) == 1


def test_model_zip_is_the_same_bytes_for_the_same_model(tmp_path):
    """A rebuilt zip of the same files has the same checksum (fixed member order and times)."""
    import os
    import time

    from CalibUncertaintyLib.sample_data import read_sums, sha256_of, write_model_zip

    model = tmp_path / "m" / "Trainer__Plans__3d"
    (model / "fold_0").mkdir(parents=True)
    for name, text in (("dataset.json", "{}"), ("plans.json", "{}"), ("fold_0/checkpoint_final.pth", "w")):
        (model / name).write_text(text)
    cal = tmp_path / "calibration.json"
    cal.write_text("{}")
    a = sha256_of(write_model_zip(tmp_path / "a.zip", model, cal, (0,), "readme\n"))
    os.utime(model / "plans.json", (time.time() + 100, time.time() + 100))
    b = sha256_of(write_model_zip(tmp_path / "b.zip", model, cal, (0,), "readme\n"))
    assert a == b
    model_dir, calibration = unpack_sample_model(tmp_path / "b.zip", tmp_path / "out")
    assert (model_dir / "fold_0" / "checkpoint_final.pth").read_text() == "w" and calibration.is_file()
    (tmp_path / "bad.sha256").write_text("nothex  file.zip\n")
    with pytest.raises(InputError, match="expected '<sha256 hex>  <file name>'"):
        read_sums(tmp_path / "bad.sha256")


def test_split_downloaded(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core gives a real volume node")
    node = slicer.vtkMRMLScalarVolumeNode()
    (tmp_path / MODEL_ZIP).write_bytes(b"zip")
    ct, z = split_downloaded([node, str(tmp_path / MODEL_ZIP)])
    assert ct is node and z == tmp_path / MODEL_ZIP
    with pytest.raises(InputError, match="expected the CT node"):
        split_downloaded([str(tmp_path / MODEL_ZIP)])
    (tmp_path / MODEL_ZIP).unlink()        # SampleData deletes a download that fails its checksum
    with pytest.raises(InputError, match="SHA-256"):
        split_downloaded([node, str(tmp_path / MODEL_ZIP)])
