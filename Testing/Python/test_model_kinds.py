"""Model kinds users have: ResEnc plans, multi-channel inputs, an ignore label, cascades.

Each is a tiny REAL nnU-Net model folder (tiny_nnunet_kinds.py, random weights); one member's
probabilities and segmentation are compared with ``nnUNetPredictor`` on the same input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from CalibUncertaintyLib.errors import ModelFolderError
from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor
from CalibUncertaintyLib.nnunet.model_folder import ModelFolder

from tiny_nnunet import save_checkpoint, write_test_ct
from tiny_nnunet_kinds import (build_cascade_folders, build_ignore_label_folder, build_multichannel_folder,
                               build_resenc_folder, network_weights)


@pytest.fixture(scope="module")
def images(tmp_path_factory, openkbp_dir):
    root = tmp_path_factory.mktemp("kinds_images")
    src = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))
    a = write_test_ct(root / "case_A_0000.nii.gz", source_ct=src[0], shape_zyx=(14, 40, 36), zero_border=2)
    b = write_test_ct(root / "case_A_0001.nii.gz", source_ct=src[1], shape_zyx=(14, 40, 36), zero_border=2)
    return [a, b]


def _nnunet(folder, image_files, prev_seg=None):
    """nnUNetPredictor's (segmentation, probabilities) for fold 0, no TTA."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    imgs = [sitk.ReadImage(str(f)) for f in image_files]
    arr = np.stack([sitk.GetArrayFromImage(i) for i in imgs]).astype(np.float32)
    props = {"spacing": list(imgs[0].GetSpacing())[::-1]}
    prev = None if prev_seg is None else prev_seg.astype(np.float32)[None]  # as nnU-Net reads a seg file
    return p.predict_single_npy_array(arr, props, prev, None, True)


def _ours(folder, image_files):
    model = ModelFolder.open(folder)
    pred = EnsemblePredictor(model, model.members("single"), device="cpu", tta=False)
    case = pred.prepare(image_files)
    return pred, next(pred.iter_members(case, progress=None)).probabilities


def _same_as_nnunet(ours, seg, probs):
    assert len(np.unique(seg)) >= 2  # not a trivial all-background comparison
    np.testing.assert_array_equal(ours.argmax(0), seg)
    np.testing.assert_allclose(ours, probs, atol=1e-6)


def test_resenc_plans_load_and_match_nnunet(tmp_path, images):
    folder = build_resenc_folder(tmp_path)
    pred, ours = _ours(folder, images[:1])
    assert type(pred.network).__name__ == "ResidualEncoderUNet"
    _same_as_nnunet(ours, *_nnunet(folder, images[:1]))


def test_multichannel_model_matches_nnunet(tmp_path, images):
    folder = build_multichannel_folder(tmp_path)
    model = ModelFolder.open(folder)
    assert model.n_channels == 2
    with pytest.raises(ModelFolderError, match="2"):
        EnsemblePredictor(model, model.members("single"), device="cpu", tta=False).prepare(images[:1])
    _, ours = _ours(folder, images)
    _same_as_nnunet(ours, *_nnunet(folder, images))


def test_ignore_label_is_not_a_class_and_matches_nnunet(tmp_path, images):
    folder = build_ignore_label_folder(tmp_path)
    model = ModelFolder.open(folder)
    assert model.class_names == ["background", "Organ", "Tumour"]
    pred, ours = _ours(folder, images[:1])
    assert pred.n_classes == 3 and ours.shape[0] == 3
    _same_as_nnunet(ours, *_nnunet(folder, images[:1]))


def test_cascade_runs_low_res_stage_first_and_matches_nnunet(tmp_path, images):
    cascade, low = build_cascade_folders(tmp_path)
    pred, ours = _ours(cascade, images[:1])
    assert pred.previous_stage is not None and pred.previous_stage.folder.path == low
    # nnU-Net's two steps: the low-res model's segmentation, then the cascade given it
    low_seg, _ = _nnunet(low, images[:1])
    assert len(np.unique(low_seg)) >= 2
    np.testing.assert_array_equal(pred.previous_stage.segmentation(images[:1], "case_A"), low_seg)
    seg, probs = _nnunet(cascade, images[:1], prev_seg=low_seg)
    _same_as_nnunet(ours, seg, probs)
    # the low-res stage matters: without it (an all-background previous stage) the output differs
    seg0, probs0 = _nnunet(cascade, images[:1], prev_seg=np.zeros_like(low_seg))
    assert np.abs(probs0 - probs).max() > 1e-3


def test_cascade_without_low_res_stage_is_a_clear_error(tmp_path, images, capsys):
    from CalibUncertaintyLib.cli.main import main

    cascade, _ = build_cascade_folders(tmp_path, lowres=False)
    model = ModelFolder.open(cascade)
    with pytest.raises(ModelFolderError, match="3d_lowres.*does not exist"):
        EnsemblePredictor(model, model.members("single"), device="cpu", tta=False)
    assert main(["predict", "-i", str(images[0]), "-m", str(cascade), "--device", "cpu",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "full-resolution stage of a cascade" in err and "nnUNetTrainer__nnUNetPlans__3d_lowres" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_member_cache_of_a_cascade_keys_on_its_low_res_stage(tmp_path, images):
    from CalibUncertaintyLib.nnunet.member_cache import cached_member_dirs

    cascade, low = build_cascade_folders(tmp_path / "m")
    img_dir = images[0].parent / "only_A"
    img_dir.mkdir(exist_ok=True)
    (img_dir / images[0].name).write_bytes(images[0].read_bytes())
    first = cached_member_dirs(cascade, "single", None, img_dir, tmp_path / "cache", device="cpu", tta=False)
    again = cached_member_dirs(cascade, "single", None, img_dir, tmp_path / "cache", device="cpu", tta=False)
    assert len(first.computed) == 1 and len(again.reused) == 1 and not again.computed
    # retrain (here: new weights for) the low-res stage: the cascade's cached outputs are stale
    plans = json.loads((low / "plans.json").read_text())
    ds = json.loads((low / "dataset.json").read_text())
    save_checkpoint(low / "fold_0" / "checkpoint_final.pth", network_weights(plans, ds, "3d_lowres", 77), plans, ds, 0,
                    configuration="3d_lowres")
    third = cached_member_dirs(cascade, "single", None, img_dir, tmp_path / "cache", device="cpu", tta=False)
    assert len(third.computed) == 1 and not third.reused


def test_cascade_fingerprint_covers_its_low_res_stage(tmp_path):
    """A calibration file fitted on a cascade must not be applied after its low-resolution stage
    was retrained: the model fingerprint covers the low-res folder's checkpoints too."""
    from CalibUncertaintyLib.calibration.fingerprint import compare_fingerprints, fingerprint_model_folder

    cascade, low = build_cascade_folders(tmp_path / "m")
    before = fingerprint_model_folder(cascade)
    assert before["previous_stage_sha256"] and "previous_stage_sha256" not in fingerprint_model_folder(low)
    plans = json.loads((low / "plans.json").read_text())
    ds = json.loads((low / "dataset.json").read_text())
    save_checkpoint(low / "fold_0" / "checkpoint_final.pth", network_weights(plans, ds, "3d_lowres", 78), plans, ds, 0,
                    configuration="3d_lowres")
    after = fingerprint_model_folder(cascade)
    assert after["checkpoints"] == before["checkpoints"]  # the cascade's own files did not change
    reason = compare_fingerprints(before, after)
    assert reason is not None and "checkpoint" in reason
