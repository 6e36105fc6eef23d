"""nnU-Net v2 model folders and per-member inference against nnU-Net's own predictor.

The model is a tiny REAL nnU-Net model folder (tiny_nnunet.py: plans, dataset.json, random
weights of the network nnU-Net builds from the plans); the input is a block of a real OpenKBP CT
with an oblique direction, a non-zero origin, a spacing different from the plans' and a zero
border (so nnU-Net's crop box is smaller than the image).
"""

from __future__ import annotations

import logging
import shutil
import weakref

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError, ModelFolderError
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor, collect_cases, split_image_name
from CalibUncertaintyLib.nnunet.model_folder import ModelFolder, snapshot_checkpoint_name
from CalibUncertaintyLib.progress import parse_progress_line

from tiny_nnunet import build_tiny_model_folder, tiny_plans, write_test_ct

ZERO_BORDER = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, openkbp_dir):
    root = tmp_path_factory.mktemp("tiny_nnunet")
    folder = build_tiny_model_folder(root, folds=(0, 1, 2), snapshots=3, best=True)
    # a tenth cycle, to check snapshots sort by cycle number and not as text
    shutil.copy(folder / "fold_0" / "checkpoint_snapshot_3.pth", folder / "fold_0" / snapshot_checkpoint_name(10))
    ct_src = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    image = write_test_ct(root / "images" / "case_A_0000.nii.gz", source_ct=ct_src, zero_border=ZERO_BORDER)
    return {"root": root, "folder": folder, "image": image}


@pytest.fixture(scope="module")
def model(tiny):
    return ModelFolder.open(tiny["folder"])


@pytest.fixture(scope="module")
def deep_predictions(tiny, model):
    """Our three deep-ensemble members without TTA: (predictor, case, [MemberPrediction])."""
    pred = EnsemblePredictor(model, model.members("deep"), device="cpu", tta=False)
    case = pred.prepare([tiny["image"]])
    return pred, case, list(pred.iter_members(case, keep_logits=True, progress=None))


def _nnunet_predictor(folder, folds, tta, checkpoint="checkpoint_final.pth"):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=tta, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(folder), tuple(folds), checkpoint)
    return p


# --- model folder ------------------------------------------------------------------------------
def test_model_folder_lists_folds_checkpoints_and_snapshots(model):
    assert model.folds == [0, 1, 2]
    assert model.configuration == "3d_fullres" and model.trainer_name == "nnUNetTrainer"
    assert model.checkpoints[1] == ["checkpoint_best.pth", "checkpoint_final.pth"]
    assert model.snapshot_checkpoints(0) == [snapshot_checkpoint_name(c) for c in (1, 2, 3, 10)]
    assert model.snapshot_checkpoints(1) == []
    assert model.class_names == ["background", "Organ", "Tumour"]
    assert model.channel_names == ["CT"] and model.n_channels == 1


def test_members_for_each_ensemble_kind(model):
    deep = model.members("deep")
    assert [(m.fold, m.checkpoint.name, m.name) for m in deep] == [
        (f, "checkpoint_final.pth", f"fold_{f}/checkpoint_final") for f in (0, 1, 2)]
    assert [m.fold for m in model.members("deep", folds=["2", 0])] == [2, 0]
    assert {m.checkpoint.name for m in model.members("deep", checkpoint="checkpoint_best.pth")} == {"checkpoint_best.pth"}
    snaps = model.members("checkpoint")
    assert [m.name for m in snaps] == [f"fold_0/snapshot_{c}" for c in (1, 2, 3, 10)]
    assert all(m.checkpoint.is_file() for m in snaps)
    single = model.members("single")
    assert len(single) == 1 and single[0].fold == 0
    assert model.members("single", folds=[2])[0].checkpoint == model.path / "fold_2" / "checkpoint_final.pth"


def test_model_folder_errors_say_what_is_wrong(tmp_path, model):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match=r"not an nnU-Net v2 trained model folder: missing plans\.json, "
                                               r"dataset\.json, fold_<k>/checkpoint_\*\.pth"):
        ModelFolder.open(empty)
    with pytest.raises(ModelFolderError, match="pass one of those instead"):
        ModelFolder.open(model.path.parent)  # the parent of a model folder
    with pytest.raises(ModelFolderError, match="model folder not found"):
        ModelFolder.open(tmp_path / "nope")
    with pytest.raises(ModelFolderError, match=r"fold 3 has no checkpoint_final\.pth .*folds present: 0,1,2$"):
        model.members("deep", folds=[0, 3])
    with pytest.raises(ModelFolderError, match=r"fold 1 has no snapshot checkpoints"):
        model.members("checkpoint", folds=[1])
    with pytest.raises(ModelFolderError, match="takes one fold"):
        model.members("single", folds=[0, 1])
    with pytest.raises(ModelFolderError, match="unknown ensemble kind"):
        model.members("bagging")
    with pytest.raises(ModelFolderError, match=r"no fold of .* has checkpoint_latest\.pth"):
        model.members("deep", checkpoint="checkpoint_latest.pth")


def test_missing_checkpoint_in_one_fold_and_no_snapshots(tmp_path):
    folder = build_tiny_model_folder(tmp_path, folds=(0, 1, 2, 4))
    (folder / "fold_3").mkdir()
    (folder / "fold_2" / "checkpoint_final.pth").rename(folder / "fold_2" / "checkpoint_best.pth")
    mf = ModelFolder.open(folder)
    assert mf.folds == [0, 1, 2, 4]
    with pytest.raises(ModelFolderError, match=r"^fold 2 has no checkpoint_final\.pth; folds present: 0,1,2,4 "
                                               r"\(checkpoint_final\.pth in: 0,1,4\)"):
        mf.members("deep", folds=[0, 2])
    assert [m.fold for m in mf.members("deep")] == [0, 1, 4]  # default: the folds that have it
    with pytest.raises(ModelFolderError, match=r"no snapshot checkpoints .*checkpoint_snapshot_<cycle>\.pth"):
        mf.members("checkpoint")


def test_channel_count_is_checked_against_dataset_json(tmp_path, tiny):
    two = build_tiny_model_folder(tmp_path, folds=(0,), n_channels=2)
    mf = ModelFolder.open(two)
    assert mf.n_channels == 2
    with pytest.raises(ModelFolderError, match=r"the model expects 2 channel\(s\) but case_A_0001\.nii\.gz not found"):
        collect_cases(tiny["image"], n_channels=2)
    pred = EnsemblePredictor(mf, mf.members("single"), device="cpu", tta=False)
    with pytest.raises(ModelFolderError, match=r"has 1 channel\(s\) but this model expects 2 \(_0000=CT, _0001=CT1"):
        pred.prepare([tiny["image"]])


def test_collect_cases_from_file_and_folder(tmp_path, tiny):
    assert split_image_name("abc_0003.nrrd") == ("abc", 3, ".nrrd")
    assert split_image_name("abc.nii") == ("abc", None, ".nii")
    assert collect_cases(tiny["image"]) == {"case_A": [tiny["image"]]}
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b_0000.nii.gz", "b_0001.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "notes.txt"):
        (folder / name).write_bytes(b"")
    cases = collect_cases(folder, n_channels=2, file_ending=".nii.gz")
    assert list(cases) == ["a", "b"] and [p.name for p in cases["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    with pytest.raises(ModelFolderError, match=r"case a has 2 channel file\(s\) .* but the model expects 1"):
        collect_cases(folder, n_channels=1)
    with pytest.raises(InputError, match="no images found"):
        collect_cases(_empty(tmp_path))
    with pytest.raises(InputError, match="input not found"):
        collect_cases(tmp_path / "missing.nii.gz")


def _empty(tmp_path):
    d = tmp_path / "nothing_here"
    d.mkdir()
    return d


def test_bad_checkpoints_are_reported(tmp_path, tiny):
    folder = build_tiny_model_folder(tmp_path / "a", folds=(0, 1))
    (folder / "fold_1" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    mf = ModelFolder.open(folder)
    pred = EnsemblePredictor(mf, mf.members("deep"), device="cpu", tta=False)
    case = pred.prepare([tiny["image"]])
    gen = pred.iter_members(case, progress=None)
    next(gen)
    with pytest.raises(ModelFolderError, match=r"fold_1/checkpoint_final\.pth could not be loaded"):
        next(gen)
    # weights of another architecture than plans.json describes
    other = build_tiny_model_folder(tmp_path / "b", folds=(0,), plans=tiny_plans(features=(8, 16, 32)))
    shutil.copy(folder / "plans.json", other / "plans.json")
    mf2 = ModelFolder.open(other)
    with pytest.raises(ModelFolderError, match="does not fit the network that plans.json describes"):
        EnsemblePredictor(mf2, mf2.members("single"), device="cpu")


# --- inference ---------------------------------------------------------------------------------
def test_member_probabilities_are_in_the_input_geometry(tiny, deep_predictions):
    _, case, preds = deep_predictions
    _, geometry = read_image(tiny["image"])
    assert case.geometry.mismatch(geometry) is None
    assert geometry.direction[1] < -0.1 and geometry.origin != (0.0, 0.0, 0.0)  # oblique, shifted
    for p in preds:
        probs = p.probabilities
        assert probs.dtype == np.float32 and probs.shape == (3, *geometry.shape_zyx)
        assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(0), 1.0, atol=1e-5)
        # outside nnU-Net's crop-to-nonzero box (the zero slices) background is exactly 1
        assert np.all(probs[0, :ZERO_BORDER] == 1.0) and np.all(probs[1:, :ZERO_BORDER] == 0.0)
        assert probs[0, ZERO_BORDER:].min() < 0.5  # and inside it the network decides
    # members differ (different seeds)
    assert not np.allclose(preds[0].probabilities, preds[1].probabilities, atol=1e-3)


def test_mean_of_member_logits_reproduces_nnunet(tiny, deep_predictions):
    """nnUNetPredictor averages the folds' logits (fp16 sums); we expose each member's."""
    _, case, preds = deep_predictions
    ref = _nnunet_predictor(tiny["folder"], (0, 1, 2), tta=False).predict_logits_from_preprocessed_data(case.data)
    ref = ref.float().numpy()
    ours = np.mean([p.logits for p in preds], axis=0)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 1.0
    assert np.abs(ours - ref).max() <= 2e-3 * scale  # fp16 accumulation in nnU-Net's sum
    assert (ours.argmax(0) == ref.argmax(0)).mean() > 0.999


def test_single_fold_equals_nnunet_segmentation_and_probabilities(tiny, deep_predictions):
    import SimpleITK as sitk

    _, _, preds = deep_predictions
    img = sitk.ReadImage(str(tiny["image"]))
    arr = sitk.GetArrayFromImage(img)[None].astype(np.float32)
    for fold in (2,):
        p = _nnunet_predictor(tiny["folder"], (fold,), tta=False)
        seg, probs = p.predict_single_npy_array(arr, {"spacing": list(img.GetSpacing())[::-1]}, None, None, True)
        ours = preds[fold].probabilities
        assert len(np.unique(seg)) >= 2  # not a trivial all-background comparison
        np.testing.assert_array_equal(ours.argmax(0), seg)
        np.testing.assert_allclose(ours, probs, atol=1e-6)


def test_tta_matches_nnunet_and_changes_the_output(tmp_path, tiny, model, openkbp_dir):
    # a one-tile image keeps the 8 mirrored passes cheap
    ct_src = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    image = write_test_ct(tmp_path / "small_0000.nii.gz", source_ct=ct_src, shape_zyx=(12, 30, 30), zero_border=0)
    members = model.members("single", folds=[1])
    plain, tta = (EnsemblePredictor(model, members, device="cpu", tta=t) for t in (False, True))
    case = tta.prepare([image])
    with_tta = next(tta.iter_members(case, keep_logits=True, progress=None))
    without = next(plain.iter_members(case, progress=None))
    ref = _nnunet_predictor(tiny["folder"], (1,), tta=True).predict_logits_from_preprocessed_data(case.data)
    np.testing.assert_array_equal(with_tta.logits, ref.float().numpy())
    assert np.abs(with_tta.probabilities - without.probabilities).max() > 1e-3


def test_one_member_ensemble_equals_single_model(tiny, model, deep_predictions):
    _, case, preds = deep_predictions
    one = EnsemblePredictor(model, model.members("deep", folds=[2]), device="cpu", tta=False)
    single = EnsemblePredictor(model, model.members("single", folds=[2]), device="cpu", tta=False)
    a = next(one.iter_members(case, progress=None)).probabilities
    b = next(single.iter_members(case, progress=None)).probabilities
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, preds[2].probabilities)


def test_snapshot_members_run_and_progress_lines_are_emitted(tiny, model, capsys, monkeypatch):
    monkeypatch.setenv("CALIBU_PROGRESS", "1")
    members = model.members("checkpoint")[:2]
    pred = EnsemblePredictor(model, members, device="cpu", tta=False)
    case = pred.prepare([tiny["image"]], case_id="A")
    capsys.readouterr()
    out = list(pred.iter_probabilities(case, progress=(0.5, 1.0)))
    assert len(out) == 2 and not np.array_equal(out[0], out[1])
    lines = [e for e in map(parse_progress_line, capsys.readouterr().err.splitlines()) if e]
    events = [e for e in lines if "patch" not in e]  # the sliding window's patch ticks come between
    assert all(e["n_patches"] >= e["patch"] >= 0 and 0.5 <= e["fraction"] <= 1.0 for e in lines if "patch" in e)
    assert [(e["stage"], e["case"], e["member"], e["n_members"]) for e in events] == [
        ("inference", "A", 1, 2), ("inference", "A", 2, 2), ("inference", "A", 2, 2)]
    assert [e["fraction"] for e in events] == [0.5, 0.75, 1.0]
    assert events[0]["message"] == "fold_0/snapshot_1"


def test_members_are_not_kept_after_they_are_yielded(tiny, model):
    """Peak memory must not grow with M: the generator holds no finished member."""
    pred = EnsemblePredictor(model, model.members("deep"), device="cpu", tta=False)
    case = pred.prepare([tiny["image"]])
    gen = pred.iter_members(case, progress=None)
    first = next(gen)
    ref = weakref.ref(first.probabilities)
    del first
    next(gen)
    assert ref() is None


def test_spacing_far_from_plans_warns(tmp_path, tiny, model, caplog):
    image = write_test_ct(tmp_path / "coarse_0000.nii.gz", shape_zyx=(6, 20, 20), spacing=(3.9, 3.9, 9.0),
                          zero_border=0)
    pred = EnsemblePredictor(model, model.members("single"), device="cpu", tta=False)
    with caplog.at_level(logging.WARNING, logger="CalibUncertaintyLib.nnunet.inference"):
        case = pred.prepare([image])
    assert "differs from the model's training spacing" in caplog.text and "ratio 3.6" in caplog.text
    probs = next(pred.iter_probabilities(case, progress=None))
    assert probs.shape == (3, 6, 20, 20)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="CalibUncertaintyLib.nnunet.inference"):
        pred.prepare([tiny["image"]])  # 3.5/3.7/3.0 mm against 3.9/3.9/2.5: no warning
    assert "training spacing" not in caplog.text


def test_cuda_request_falls_back_to_cpu_with_a_message(tiny, model, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU fallback cannot be observed here")
    with caplog.at_level(logging.WARNING):
        pred = EnsemblePredictor(model, model.members("single"), device="cuda", tta=False)
    assert pred.device.type == "cpu"
    assert "CUDA was requested" in caplog.text and "running on the CPU" in caplog.text


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
def test_export_equals_nnunet_export(tmp_path, openkbp_dir, transpose):
    """Our lower-memory export (per-channel resampling, slab softmax into the output) gives
    nnU-Net's probabilities to the last float32 bit (the vectorised softmax may round a slab's
    short tail differently) and its segmentation exactly, with resampling, a crop box and a
    transposing plan."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from CalibUncertaintyLib.nnunet.member_probabilities import MemberProbabilities

    plans = tiny_plans()
    backward = [int(i) for i in np.argsort(transpose)]
    plans.update(transpose_forward=list(transpose), transpose_backward=backward)
    folder = build_tiny_model_folder(tmp_path, folds=(0,), plans=plans)
    ct_src = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    image = write_test_ct(tmp_path / "t_0000.nii.gz", source_ct=ct_src, zero_border=ZERO_BORDER)
    model = ModelFolder.open(folder)
    pred = EnsemblePredictor(model, model.members("deep"), device="cpu", tta=False)
    case = pred.prepare([image])
    logits = pred.member_logits(case, 0)
    assert tuple(logits.shape[1:]) != tuple(case.properties["shape_after_cropping_and_before_resampling"])
    _, ref = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.clone(), pred.plans_manager, pred.configuration_manager, pred.label_manager, case.properties,
        return_probabilities=True)
    ours = pred.logits_to_probabilities(logits.clone(), case)
    assert ours.shape == ref.shape and ours.shape[1:] == case.geometry.shape_zyx
    assert ours.flags.c_contiguous and ours.dtype == np.float32
    # read lazily in small slabs (one z slice, then the last slab short): the same volume
    lazy = pred.member_probabilities(logits.clone(), case)
    assert isinstance(lazy, MemberProbabilities) and lazy.shape == ours.shape
    plane = int(np.prod(ours.shape[2:]))
    for slab_voxels in (plane, 5 * plane):
        assembled = np.empty_like(ours)
        for sl, values in lazy.slabs(slab_voxels):
            assembled[:, sl] = values
        np.testing.assert_array_equal(assembled, ours)
    assert np.abs(ours - ref).max() <= 2.5e-7
    np.testing.assert_array_equal(ours.argmax(0), ref.argmax(0))
    assert len(np.unique(ref.argmax(0))) >= 2
    assert np.all(ours[0, :ZERO_BORDER] == 1.0) and np.all(ours[1:, :ZERO_BORDER] == 0.0)
    assert isinstance(logits, torch.Tensor)


@pytest.mark.parametrize("step, shape_zyx", [(0.5, None), (0.7, None), (0.5, (10, 20, 50))])
def test_sliding_window_equals_nnunet_bit_for_bit(tiny, model, deep_predictions, tmp_path, openkbp_dir,
                                                  step, shape_zyx):
    """Many tiles (and, for the last case, an image smaller than the patch along two axes, so
    padded): our sliding window gives nnUNetPredictor's logits exactly."""
    pred, case, _ = deep_predictions
    if shape_zyx is not None:
        ct_src = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
        image = write_test_ct(tmp_path / "s_0000.nii.gz", source_ct=ct_src, shape_zyx=shape_zyx, zero_border=0)
        case = pred.prepare([image])
        assert any(n < p for n, p in zip(case.data.shape[1:], pred.configuration_manager.patch_size))
    ours = EnsemblePredictor(model, model.members("single", folds=[1]), device="cpu", tta=False,
                             tile_step_size=step).member_logits(case, 0)
    ref = _nnunet_predictor(tiny["folder"], (1,), tta=False)
    ref.tile_step_size = step
    ref = ref.predict_logits_from_preprocessed_data(case.data)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())


def test_inference_does_not_import_nnunet_predictor_module(tiny):
    """nnunetv2.inference.predict_from_raw_data imports torch._dynamo and sympy (about 80 MB
    resident); per-member prediction must not need it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from CalibUncertaintyLib.nnunet.model_folder import ModelFolder\n"
            "from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor\n"
            f"m = ModelFolder.open({str(tiny['folder'])!r})\n"
            "p = EnsemblePredictor(m, m.members('single'), device='cpu', tta=True)\n"
            f"c = p.prepare([{str(tiny['image'])!r}])\n"
            "next(p.iter_members(c, progress=None))\n"
            "bad = sorted(n for n in ('nnunetv2.inference.predict_from_raw_data', 'torch._dynamo', 'sympy') "
            "if n in sys.modules)\n"
            "print('IMPORTED', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout
