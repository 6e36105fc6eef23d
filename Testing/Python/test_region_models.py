"""Region-based (sigmoid) nnU-Net models: maps of independent per-region Bernoullis (METHODS.md §7),
nnU-Net's probabilities and segmentation, ``predict`` end to end, and the refused softmax calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError, ModelFolderError
from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor
from CalibUncertaintyLib.nnunet.model_folder import ModelFolder
from CalibUncertaintyLib.uncertainty.bernoulli_regions import RegionAccumulator, region_maps, segmentation

from tiny_nnunet import write_test_ct
from tiny_nnunet_kinds import build_region_folder


def _hb(q):
    q = np.clip(q.astype(np.float64), 1e-12, 1 - 1e-12)
    return -(q * np.log(q) + (1 - q) * np.log(1 - q))


def test_region_maps_follow_the_documented_definitions():
    rng = np.random.default_rng(3)
    m, r, shape = 4, 3, (3, 5, 6)
    members = [rng.beta(0.6, 0.6, size=(r, *shape)).astype(np.float32) for _ in range(m)]
    acc = RegionAccumulator(r, shape)
    for p in members:
        acc.add(p)
    maps = region_maps(acc)
    P = np.stack(members).astype(np.float64)             # (M, R, ...)
    pbar = P.mean(0)
    pe = _hb(pbar).sum(0)
    ee = _hb(P).mean(0).sum(0)
    # EPKL: mean over all M² ordered pairs of Σ_r KL(Bern(p_m) || Bern(p_m'))
    c = lambda q: np.clip(q, 1e-12, 1 - 1e-12)  # noqa: E731
    kl = np.zeros(shape)
    for a in range(m):
        for b in range(m):
            pa, pb = c(P[a]), c(P[b])
            kl += (pa * np.log(pa / pb) + (1 - pa) * np.log((1 - pa) / (1 - pb))).sum(0)
    kl /= m * m
    np.testing.assert_allclose(maps["entropy"], pe, atol=2e-5)
    np.testing.assert_allclose(maps["entropy_norm"], pe / (r * math.log(2)), atol=1e-5)
    np.testing.assert_allclose(maps["expected_entropy"], ee, atol=2e-5)
    np.testing.assert_allclose(maps["mutual_information"], (_hb(pbar) - _hb(P).mean(0)).sum(0), atol=2e-5)
    np.testing.assert_allclose(maps["epkl"], kl, rtol=1e-4, atol=5e-5)
    assert (maps["epkl"] >= maps["mutual_information"] - 1e-6).all() and maps["mutual_information"].max() > 0.05
    # one member: no disagreement
    one = RegionAccumulator(r, shape)
    one.add(members[0])
    assert not region_maps(one)["mutual_information"].any() and not region_maps(one)["epkl"].any()
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        one.add(members[0] * 2)
    assert one.n_members == 1
    # nnU-Net's label map: later regions overwrite earlier ones where p > 0.5
    seg = segmentation(np.array([[[[0.9, 0.9, 0.2]]], [[[0.7, 0.1, 0.8]]]]), [1, 2])
    assert seg.tolist() == [[[2, 1, 2]]]


@pytest.fixture(scope="module")
def region(tmp_path_factory, openkbp_dir):
    root = tmp_path_factory.mktemp("regions")
    folder = build_region_folder(root, folds=(0, 1))
    src = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    image = write_test_ct(root / "images" / "case_R_0000.nii.gz", source_ct=src, shape_zyx=(14, 40, 36),
                          zero_border=2)
    return {"root": root, "folder": folder, "image": image}


def test_region_model_matches_nnunet(region):
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = ModelFolder.open(region["folder"])
    assert model.is_region_based and model.region_names == ["whole", "core"]
    with pytest.raises(ModelFolderError, match="region-based model"):
        model.class_names  # noqa: B018  (softmax consumers get a clear error)
    pred = EnsemblePredictor(model, model.members("single"), device="cpu", tta=False)
    assert pred.has_regions and pred.n_classes == 2
    ours = next(pred.iter_members(pred.prepare([region["image"]]), progress=None)).probabilities
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(region["folder"]), (0,), "checkpoint_final.pth")
    img = sitk.ReadImage(str(region["image"]))
    seg, probs = p.predict_single_npy_array(sitk.GetArrayFromImage(img)[None].astype(np.float32),
                                            {"spacing": list(img.GetSpacing())[::-1]}, None, None, True)
    assert ours.shape == probs.shape and len(np.unique(seg)) >= 2
    np.testing.assert_allclose(ours, probs, atol=1e-6)  # sigmoids; 0 outside the crop box
    np.testing.assert_array_equal(segmentation(ours, [1, 2]), seg)


def test_predict_region_model_writes_bernoulli_maps_and_refuses_softmax_calibration(region, tmp_path, capsys):
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.cli.main import main
    from CalibUncertaintyLib.io.images import read_image

    out = tmp_path / "out"
    assert main(["predict", "-i", str(region["image"]), "-m", str(region["folder"]), "--no-tta", "--device", "cpu",
                 "-o", str(out)]) == 0
    s = json.loads((out / "case_R" / "summary.json").read_text())
    assert s["output"] == "regions" and s["n_members"] == 2 and s["region_names"] == ["whole", "core"]
    for f in s["files"]:
        assert (out / "case_R" / f).is_file(), f
    # the written maps are the definitions applied to the two folds' members
    model = ModelFolder.open(region["folder"])
    pred = EnsemblePredictor(model, model.members("deep"), device="cpu", tta=False)
    acc = RegionAccumulator(2, pred.prepare([region["image"]]).geometry.shape_zyx)
    for mp in pred.iter_members(pred.prepare([region["image"]]), progress=None):
        acc.add(mp.probabilities)
    want = region_maps(acc)
    for name in ("entropy", "mutual_information", "epkl"):
        got, _ = read_image(out / "case_R" / f"map_{name}.nii.gz")
        np.testing.assert_allclose(got, want[name], atol=1e-6)
    assert want["mutual_information"].max() > 1e-3
    seg, _ = read_image(out / "case_R" / "seg.nii.gz")
    np.testing.assert_array_equal(seg, segmentation(acc.mean_probs(), [1, 2]))

    # the case folder loads in a real MRML scene (what the Slicer module does after predict)
    import slicer

    from CalibUncertaintyLib.mrml.nodes import load_case_outputs

    case = load_case_outputs(slicer.vtkMRMLScene(), out / "case_R", None)
    assert case.layer_names() == ["entropy", "entropy_norm", "expected_entropy", "mutual_information", "epkl",
                                  "prob_whole", "prob_core"]

    cal = CalibrationFile(temperature=2.0, class_names=["background", "whole", "core"], n_cases=1).save(
        tmp_path / "softmax.json")
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["predict", "-i", str(region["image"]), "-m", str(region["folder"]), "--calibration", str(cal),
                 "--device", "cpu", "-o", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "region-based model" in err and "softmax" in err
    assert not refused.exists() or not any(refused.iterdir())
    # softmax calibration commands refuse the model with the same reason
    assert main(["fit-temperature", "--model", str(region["folder"]), "--images", str(region["image"].parent),
                 "--labels", str(tmp_path), "--device", "cpu", "-o", str(tmp_path / "c.json")]) == 2
    assert "region-based model" in capsys.readouterr().err
