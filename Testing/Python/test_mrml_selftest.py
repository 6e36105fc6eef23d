"""The module self-test body (run_self_test), as the Slicer module's runTest() calls it."""

from __future__ import annotations

import numpy as np
import pytest

from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image, write_image
from CalibUncertaintyLib.mrml.selftest import run_self_test

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer


def test_run_self_test_passes_on_the_phantom(tmp_path):
    scene = slicer.vtkMRMLScene()
    messages = []
    result = run_self_test(scene, tmp_path, log=messages.append)
    assert "passed" in messages[-1]
    assert result["review_png"].is_file() and result["review_html"].is_file()
    assert result["case"].regions and result["controller"].current_region_index == 0
    assert (tmp_path / "outputs" / "selftest" / "regions.json").is_file()


def test_run_self_test_on_a_real_ct_crop(openkbp_dir, tmp_path):
    """The self-test on real CT intensities and a real LPS grid (a 48^3 crop keeps it quick)."""
    ct_path = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    ct, geo = read_image(ct_path)
    lo = np.array([40, 40, 40])
    sub = Geometry((48, 48, 48), geo.spacing, tuple(geo.index_to_lps(lo[::-1])), geo.direction)
    crop = write_image(tmp_path / "crop.nii.gz", ct[40:88, 40:88, 40:88], sub)
    result = run_self_test(slicer.vtkMRMLScene(), tmp_path / "work", ct_path=crop, log=lambda m: None)
    assert result["case"].geometry.mismatch(sub) is None
    assert result["ct_node"].GetDisplayNode().GetWindow() == pytest.approx(400.0)


@pytest.mark.slow
def test_run_self_test_with_a_real_nnunet_model(tmp_path):
    """model_dir path: a tiny real nnU-Net v2 model folder (random weights, 2 folds = 2 members)
    predicts the CT in process (calib-uncertainty predict), then the same review checks run."""
    pytest.importorskip("torch", reason="torch is needed for nnU-Net inference")
    from tiny_nnunet import build_tiny_model_folder, write_test_ct

    model = build_tiny_model_folder(tmp_path / "model", folds=(0, 1))
    ct = write_test_ct(tmp_path / "selftest_0000.nii.gz")
    messages = []
    result = run_self_test(slicer.vtkMRMLScene(), tmp_path / "work", model_dir=model, ct_path=ct,
                           log=messages.append)
    assert any("predicting" in m for m in messages) and "passed" in messages[-1]
    assert result["case"].summary["prediction"]["members"] == ["fold_0/checkpoint_final", "fold_1/checkpoint_final"]
    assert result["case"].geometry.mismatch(read_image(ct)[1]) is None


def test_run_self_test_reports_missing_ct_for_a_model(tmp_path):
    with pytest.raises(AssertionError, match="needs a ct_path"):
        run_self_test(slicer.vtkMRMLScene(), tmp_path, model_dir=tmp_path)


def test_run_self_test_reports_a_broken_prediction(tmp_path):
    """A model folder that is not one: the self-test fails loudly instead of passing."""
    ct = write_image(tmp_path / "ct_0000.nii.gz", np.zeros((8, 8, 8), np.int16), Geometry((8, 8, 8), (1, 1, 1)))
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(AssertionError, match="prediction failed: .*not_a_model"):
        run_self_test(slicer.vtkMRMLScene(), tmp_path / "work", model_dir=tmp_path / "not_a_model", ct_path=ct)


def test_self_test_passes_without_matplotlib(tmp_path, monkeypatch):
    """A fresh Slicer has numpy, scipy, SimpleITK and VTK but no matplotlib: the self-test body
    must pass there, with a PNG sheet that says what it lacks instead of raising."""
    import sys

    from CalibUncertaintyLib.io.images import read_image as _read  # noqa: F401 (imported before blocking)

    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)   # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401
    messages = []
    result = run_self_test(slicer.vtkMRMLScene(), tmp_path, log=messages.append)
    assert any("matplotlib is not installed" in m for m in messages) and "passed" in messages[-1]
    png = result["review_png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    vtk_png = __import__("vtk").vtkPNGReader()
    vtk_png.SetFileName(str(result["review_png"]))
    vtk_png.Update()
    w, h, _ = vtk_png.GetOutput().GetDimensions()
    assert w > 3 * 256 and h >= 2 * 256          # 2 regions x 3 planes of 256 px
