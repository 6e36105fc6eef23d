"""Ensembles from one network: mirrored predictions (``--ensemble tta``) and MC-dropout passes
(``--ensemble dropout``), on tiny REAL nnU-Net model folders, against nnU-Net's own predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CalibUncertaintyLib.errors import ModelFolderError
from CalibUncertaintyLib.nnunet.inference import EnsemblePredictor
from CalibUncertaintyLib.nnunet.model_folder import ModelFolder
from CalibUncertaintyLib.nnunet.single_model_members import checkpoint_info, mirror_combinations
from CalibUncertaintyLib.uncertainty.measures import mutual_information
from CalibUncertaintyLib.uncertainty.streaming import EnsembleAccumulator

from tiny_nnunet import build_tiny_model_folder, tiny_plans, write_test_ct


def dropout_plans(p: float = 0.3) -> dict:
    plans = tiny_plans()
    kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kw["dropout_op"] = "torch.nn.modules.dropout.Dropout3d"
    kw["dropout_op_kwargs"] = {"p": p, "inplace": False}
    return plans


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, openkbp_dir):
    root = tmp_path_factory.mktemp("single_model")
    plain = build_tiny_model_folder(root / "plain", folds=(0,))
    with_dropout = build_tiny_model_folder(root / "dropout", folds=(0,), plans=dropout_plans())
    ct_src = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    # one tile: cheap, and still several classes
    image = write_test_ct(root / "images" / "case_A_0000.nii.gz", source_ct=ct_src, shape_zyx=(12, 30, 30),
                          zero_border=0)
    return {"root": root, "plain": plain, "dropout": with_dropout, "image": image}


def _nnunet_tta_logits(folder, data):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    return p.predict_logits_from_preprocessed_data(data).float().numpy()


def test_tta_members_one_per_mirror_combination_read_without_torch(tiny):
    model = ModelFolder.open(tiny["plain"])
    assert checkpoint_info(model.path / "fold_0" / "checkpoint_final.pth")["mirror_axes"] == (0, 1, 2)
    members = model.members("tta")
    assert [m.flip for m in members] == mirror_combinations((0, 1, 2))
    assert len(members) == 8 and members[0].flip == () and members[-1].flip == (0, 1, 2)
    assert members[0].name == "fold_0/checkpoint_final/mirror_none"
    assert members[4].name == "fold_0/checkpoint_final/mirror_0_1"
    assert len({m.name for m in members}) == 8
    with pytest.raises(ModelFolderError, match="--passes applies to --ensemble dropout only"):
        model.members("tta", passes=3)


def test_tta_members_average_to_nnunet_tta_and_disagree(tiny):
    """Each mirrored prediction is a member: their logits average to nnU-Net's mirrored TTA
    prediction, and where the mirrored predictions disagree the mutual information is > 0."""
    model = ModelFolder.open(tiny["plain"])
    pred = EnsemblePredictor(model, model.members("tta"), device="cpu", tta=True)
    case = pred.prepare([tiny["image"]])
    preds = list(pred.iter_members(case, keep_logits=True, progress=None))
    assert len(preds) == 8
    ref = _nnunet_tta_logits(tiny["plain"], case.data)
    mean = np.mean([p.logits for p in preds], axis=0)
    scale = np.abs(ref).max()
    assert scale > 1.0
    assert np.abs(mean - ref).max() <= 2e-3 * scale  # float16 sums, one per member vs one in total
    assert (mean.argmax(0) == ref.argmax(0)).mean() > 0.999
    # the identity member is the plain (no-TTA) prediction
    plain = EnsemblePredictor(model, model.members("single"), device="cpu", tta=False)
    np.testing.assert_array_equal(preds[0].logits, next(plain.iter_members(case, keep_logits=True,
                                                                             progress=None)).logits)

    acc = EnsembleAccumulator(3, case.geometry.shape_zyx)
    for p in preds:
        acc.add(p.probabilities)
    mi = mutual_information(acc)
    votes = np.stack([p.probabilities.argmax(0) for p in preds])
    disagree = (votes != votes[0]).any(0)
    assert disagree.sum() > 20  # the mirrored predictions do disagree somewhere
    assert (mi[disagree] > 1e-4).all()
    assert mi[disagree].mean() > 10 * max(mi[~disagree].mean(), 1e-9)


def test_dropout_passes_differ_are_reproducible_and_keep_norms_in_eval(tiny):
    model = ModelFolder.open(tiny["dropout"])
    members = model.members("dropout", passes=3)
    assert [m.name for m in members] == [f"fold_0/checkpoint_final/dropout_{i}" for i in (1, 2, 3)]
    assert len(model.members("dropout")) == 10
    pred = EnsemblePredictor(model, members, device="cpu", tta=False)
    case = pred.prepare([tiny["image"]])
    import torch

    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    probs = [p.probabilities for p in pred.iter_members(case, progress=None)]
    assert torch.rand(1) == before  # the passes' seeds do not touch the caller's RNG
    assert np.abs(probs[0] - probs[1]).max() > 1e-2 and np.abs(probs[1] - probs[2]).max() > 1e-2
    again = EnsemblePredictor(model, members[1:2], device="cpu", tta=False)
    np.testing.assert_array_equal(next(again.iter_members(case, progress=None)).probabilities, probs[1])
    assert not pred.network.training and not any(m.training for m in pred.network.modules())


def test_dropout_is_refused_on_a_network_without_dropout(tiny):
    model = ModelFolder.open(tiny["plain"])
    with pytest.raises(ModelFolderError, match="has no dropout layers"):
        model.members("dropout", passes=4)
    # the predictor checks the built network too (plans that name no dropout op but say p > 0)
    fake = ModelFolder.open(tiny["dropout"])
    members = fake.members("dropout", passes=2)
    plain = ModelFolder.open(tiny["plain"])
    with pytest.raises(ModelFolderError, match="no dropout layers"):
        EnsemblePredictor(plain, [m.__class__(m.fold, plain.path / "fold_0" / "checkpoint_final.pth", m.name,
                                              dropout_pass=m.dropout_pass) for m in members], device="cpu")
    with pytest.raises(ModelFolderError, match="at least 2"):
        fake.members("dropout", passes=1)


def test_cli_predict_tta_and_fit_evaluate_record_the_kind(tiny, tmp_path, capsys):
    """predict --ensemble tta gives a single fold MI > 0; fit-temperature with --model --ensemble
    dropout records the kind, and applying it to another kind or pass count is refused."""
    from CalibUncertaintyLib.cli.main import main
    from CalibUncertaintyLib.io.images import read_image

    images = tiny["image"].parent
    out = tmp_path / "pred"
    rc = main(["predict", "-i", str(images), "-m", str(tiny["plain"]), "--ensemble", "tta", "--device", "cpu",
               "-o", str(out)])
    assert rc == 0
    s = json.loads((out / "case_A" / "summary.json").read_text())
    assert s["prediction"]["ensemble"] == "tta" and len(s["prediction"]["members"]) == 8
    mi, _ = read_image(out / "case_A" / "map_mutual_information.nii.gz")
    assert mi.max() > 1e-3
    capsys.readouterr()
    assert main(["predict", "-i", str(images), "-m", str(tiny["plain"]), "--ensemble", "tta", "--no-tta",
                 "-o", str(tmp_path / "x")]) == 2
    assert "cannot be combined with --no-tta" in capsys.readouterr().err
    assert main(["predict", "-i", str(images), "-m", str(tiny["plain"]), "--ensemble", "dropout",
                 "-o", str(tmp_path / "x")]) == 2
    assert "has no dropout layers" in capsys.readouterr().err

    # a label for the fit: the TTA segmentation itself, with a few voxels changed
    seg, geo = read_image(out / "case_A" / "seg.nii.gz")
    labels = tmp_path / "labels"
    from CalibUncertaintyLib.io.images import write_image

    lab = seg.astype(np.uint8)
    lab[:, :4] = 1
    write_image(labels / "case_A.nii.gz", lab, geo)
    cache = tmp_path / "cache"
    cal = tmp_path / "cal.json"
    rc = main(["fit-temperature", "--model", str(tiny["dropout"]), "--ensemble", "dropout", "--passes", "2",
               "--no-tta", "--device", "cpu", "--images", str(images), "--labels", str(labels),
               "--member-cache", str(cache), "-o", str(cal)])
    assert rc == 0
    rec = json.loads(cal.read_text())["ensemble"]
    assert rec["kind"] == "dropout"
    assert rec["members"] == ["fold_0_checkpoint_final_dropout_1", "fold_0_checkpoint_final_dropout_2"]
    markers = sorted(cache.rglob(".calibu_member.json"))
    assert sorted(json.loads(m.read_text())["variant"]["dropout_pass"] for m in markers) == [1, 2]
    # a TTA fit: one cached member per mirroring, keyed by its flip; the file records kind tta
    cal_tta = tmp_path / "cal_tta.json"
    assert main(["fit-temperature", "--model", str(tiny["plain"]), "--ensemble", "tta", "--device", "cpu",
                 "--images", str(images), "--labels", str(labels), "--member-cache", str(cache),
                 "-o", str(cal_tta)]) == 0
    rec = json.loads(cal_tta.read_text())["ensemble"]
    assert rec["kind"] == "tta" and rec["tta"] is True and len(rec["members"]) == 8
    flips = sorted(tuple(json.loads(m.read_text())["variant"]["flip"]) for m in cache.rglob(".calibu_member.json")
                   if "flip" in json.loads(m.read_text()).get("variant", {}))
    assert flips == sorted(mirror_combinations((0, 1, 2)))
    # evaluate with the same ensemble reuses the cache; another pass count or kind is refused
    rc = main(["evaluate", "--model", str(tiny["dropout"]), "--ensemble", "dropout", "--passes", "2", "--no-tta",
               "--device", "cpu", "--images", str(images), "--labels", str(labels), "--member-cache", str(cache),
               "--calibration", str(cal), "-o", str(tmp_path / "ev")])
    assert rc == 0
    for extra, why in ((["--ensemble", "dropout", "--passes", "3"], "when fitted, 3"),
                       (["--ensemble", "tta"], "fitted on dropout, applied to tta")):
        capsys.readouterr()
        assert main(["evaluate", "--model", str(tiny["dropout"]), *extra, "--device", "cpu", "--images",
                     str(images), "--labels", str(labels), "--member-cache", str(cache), "--calibration",
                     str(cal), "-o", str(tmp_path / "ev2")]) == 2
        err = capsys.readouterr().err
        assert "fitted on another ensemble" in err and why in err, err


def test_slicer_runner_options_for_tta_and_dropout(tiny, tmp_path):
    """The Slicer module's ensemble selector goes through runner.PredictOptions (Qt-free)."""
    from CalibUncertaintyLib import runner
    from CalibUncertaintyLib.runner import PredictOptions

    ct = tiny["image"]
    assert PredictOptions(ct, tiny["plain"], ensemble="tta").problems() == []
    (p,) = PredictOptions(ct, tiny["plain"], ensemble="tta", tta=False).problems()
    assert "turn mirroring (TTA) on" in p
    (p,) = PredictOptions(ct, tiny["plain"], ensemble="dropout").problems()
    assert "has no dropout layers" in p
    assert PredictOptions(ct, tiny["dropout"], ensemble="dropout", passes=4).problems() == []
    cmd = runner.build_predict_command(PredictOptions(ct, tiny["dropout"], ensemble="dropout", passes=4), "/o")
    assert cmd[cmd.index("--ensemble") + 1] == "dropout" and cmd[cmd.index("--passes") + 1] == "4"
    cmd = runner.build_predict_command(PredictOptions(ct, tiny["plain"], ensemble="tta", passes=4), "/o")
    assert "--passes" not in cmd and "--tta" in cmd  # passes only for dropout: the GUI keeps its value
    # and the command line it builds is accepted by the CLI's parser
    from CalibUncertaintyLib.cli.main import build_parser

    args = build_parser().parse_args(runner.build_predict_command(
        PredictOptions(ct, tiny["dropout"], ensemble="dropout", passes=4), str(tmp_path / "o"))[3:])
    assert args.ensemble == "dropout" and args.passes == 4
