"""Snapshot / tiny trainers: LR schedules, one snapshot per cycle, nnU-Net-loadable checkpoints,
reuse of complete folds, progress lines, and a model that learned (the session fixture)."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.nnunet.snapshot_trainer import (cyclic_cosine_lr, get_trainer_class, poly_lr,
                                                         snapshot_name)
from CalibUncertaintyLib.nnunet.training import (FOLD_RECORD, TrainingConfig, fold_is_complete, train_fold)
from CalibUncertaintyLib.progress import parse_progress_line


def _load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def test_lr_formulas():
    lr0, lmin, L = 1e-2, 1e-4, 10
    assert cyclic_cosine_lr(0, L, lr0, lmin) == pytest.approx(lr0)
    assert cyclic_cosine_lr(5, L, lr0, lmin) == pytest.approx((lr0 + lmin) / 2)
    assert cyclic_cosine_lr(9, L, lr0, lmin) == pytest.approx(lmin + (lr0 - lmin) * (1 + math.cos(0.9 * math.pi)) / 2)
    assert cyclic_cosine_lr(10, L, lr0, lmin) == pytest.approx(lr0)  # warm restart
    assert cyclic_cosine_lr(23, L, lr0, lmin) == pytest.approx(cyclic_cosine_lr(3, L, lr0, lmin))
    seq = [cyclic_cosine_lr(i, L, lr0, lmin) for i in range(L)]
    assert all(a > b for a, b in zip(seq, seq[1:]))  # decreasing within a cycle
    assert poly_lr(0, 100, 3e-3) == pytest.approx(3e-3)
    assert poly_lr(50, 100, 3e-3) == pytest.approx(3e-3 * 0.5 ** 0.9)
    assert poly_lr(100, 100, 3e-3) == 0.0
    with pytest.raises(InputError):
        cyclic_cosine_lr(0, 0, lr0)


def test_training_config_validation():
    with pytest.raises(InputError, match="multiple of cycles"):
        TrainingConfig(num_epochs=5, cycles=2)
    with pytest.raises(InputError, match="unknown trainer"):
        TrainingConfig(trainer="nnUNetTrainer")
    with pytest.raises(InputError, match="initial_lr"):
        TrainingConfig(initial_lr=0)
    assert TrainingConfig(trainer="CalibuTinyTrainer", cycles=3, num_epochs=4).cycles == 1
    assert TrainingConfig(cycles=3, num_epochs=9).checkpoint_names() == [
        "checkpoint_final.pth", "checkpoint_snapshot_0.pth", "checkpoint_snapshot_1.pth", "checkpoint_snapshot_2.pth"]
    with pytest.raises(InputError, match="unknown trainer"):
        get_trainer_class("nnUNetTrainerV2")


def test_snapshot_run_lr_restarts_snapshots_reuse_and_progress(tiny_prepared_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBU_PROGRESS", "1")
    _, prepared = tiny_prepared_dataset
    cfg = TrainingConfig(num_epochs=4, iterations_per_epoch=3, cycles=2, initial_lr=1e-2, min_lr=1e-4,
                         val_iterations=1, seed=3)
    err = io.StringIO()
    with redirect_stderr(err):
        fold_dir = train_fold(prepared, tmp_path, 0, cfg, device="cpu", progress=True, member=1, n_members=2)
    assert fold_dir == tmp_path / prepared.dataset_name / "CalibuSnapshotTrainer__nnUNetPlans_tiny__3d_fullres" / "fold_0"
    assert fold_is_complete(fold_dir, cfg)
    names = {p.name for p in fold_dir.glob("checkpoint_*.pth")}
    assert {"checkpoint_final.pth", snapshot_name(0), snapshot_name(1)} <= names
    assert snapshot_name(2) not in names

    # per-iteration LR: cosine within each 6-iteration cycle, restarted at iteration 6
    final = _load(fold_dir / "checkpoint_final.pth")
    lrs = final["calibu"]["lr_history"]
    assert lrs == pytest.approx([cyclic_cosine_lr(i, 6, 1e-2, 1e-4) for i in range(12)])
    assert lrs[0] == lrs[6] == pytest.approx(1e-2) and lrs[5] < 2e-3
    # nnU-Net's own per-epoch LR log shows the restart too (epoch 2 starts cycle 1)
    assert final["logging"]["lrs"] == pytest.approx([1e-2, (1e-2 + 1e-4) / 2, 1e-2, (1e-2 + 1e-4) / 2])
    s0, s1 = _load(fold_dir / snapshot_name(0)), _load(fold_dir / snapshot_name(1))
    assert s0["calibu"]["iteration"] == 6 and s1["calibu"]["iteration"] == 12
    assert s0["trainer_name"] == final["trainer_name"] == "nnUNetTrainer"
    assert final["calibu"]["trainer"] == "CalibuSnapshotTrainer" and final["init_args"]["fold"] == 0
    w0, w1, wf = s0["network_weights"], s1["network_weights"], final["network_weights"]
    assert all(np.array_equal(w1[k].numpy(), wf[k].numpy()) for k in wf)  # last snapshot == final
    assert any(not np.array_equal(w0[k].numpy(), wf[k].numpy()) for k in wf)
    rec = json.loads((fold_dir / FOLD_RECORD).read_text())
    assert rec["config"]["cycles"] == 2 and rec["checkpoint_trainer_name"] == "nnUNetTrainer"
    for f in ("plans.json", "dataset.json"):
        assert (fold_dir.parent / f).is_file()

    events = [e for e in map(parse_progress_line, err.getvalue().splitlines()) if e]
    assert events[0]["stage"] == "device"  # the run first says where it trains
    events = [e for e in events if e["stage"] != "device"]
    assert events and all(e["stage"] == "training" and e["member"] == 2 and e["n_members"] == 2 for e in events)
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.5 and fractions[-1] == 1.0

    # a complete fold is reused as it is; other settings are refused unless overwrite
    stamp = (fold_dir / "checkpoint_final.pth").stat().st_mtime_ns
    assert train_fold(prepared, tmp_path, 0, cfg, device="cpu", progress=False) == fold_dir
    assert (fold_dir / "checkpoint_final.pth").stat().st_mtime_ns == stamp
    other = TrainingConfig(num_epochs=2, iterations_per_epoch=2, cycles=1, val_iterations=1)
    with pytest.raises(InputError, match="other settings"):
        train_fold(prepared, tmp_path, 0, other, device="cpu", progress=False)
    assert fold_is_complete(fold_dir, cfg)  # untouched by the refused run


def test_tiny_trainer_poly_schedule_and_incomplete_fold_retrained(tiny_prepared_dataset, tmp_path):
    _, prepared = tiny_prepared_dataset
    cfg = TrainingConfig(trainer="CalibuTinyTrainer", num_epochs=2, iterations_per_epoch=2, initial_lr=3e-3,
                         val_iterations=1)
    stale = tmp_path / prepared.dataset_name / "CalibuTinyTrainer__nnUNetPlans_tiny__3d_fullres" / "fold_2"
    stale.mkdir(parents=True)
    (stale / "checkpoint_snapshot_7.pth").write_bytes(b"left over from a crashed run")
    fold_dir = train_fold(prepared, tmp_path, 2, cfg, device="cpu", progress=False)
    assert fold_dir == stale and fold_is_complete(fold_dir, cfg)
    assert sorted(p.name for p in fold_dir.glob("checkpoint_*.pth")) == ["checkpoint_best.pth", "checkpoint_final.pth"]
    ck = _load(fold_dir / "checkpoint_final.pth")
    assert ck["calibu"]["schedule"] == "poly" and ck["calibu"]["optimizer"] == "Adam"
    assert ck["calibu"]["lr_history"] == pytest.approx([poly_lr(i, 4, 3e-3) for i in range(4)])
    (fold_dir / "checkpoint_snapshot_5.pth").write_bytes(b"stale")  # would be a wrong ensemble member
    assert not fold_is_complete(fold_dir, cfg)


def test_fixture_model_learned_and_loads_in_nnunet_predictor(tiny_trained_model):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from trained_models import LEARNED_MIN_DICE, dice, predict_labels
    from CalibUncertaintyLib.io.images import read_image

    m = tiny_trained_model
    assert max(m.learned_dice.values()) > LEARNED_MIN_DICE
    for f in m.folds:
        assert m.checkpoint(f).is_file()
    assert not list((m.model_dir / "fold_1").glob("checkpoint_snapshot_*.pth"))  # one cycle: no snapshot
    assert [p.name for p in m.snapshots] == [snapshot_name(0), snapshot_name(1)] and all(p.is_file() for p in m.snapshots)

    # nnU-Net's predictor loads a snapshot by name from the model folder and it segments held-out data
    case = m.test_cases[0]
    ref, _ = read_image(m.labels_dir / f"{case}.nii.gz")
    seg = predict_labels(m.model_dir, 0, snapshot_name(1), m.images_dir / f"{case}_0000.nii.gz")
    assert seg.shape == ref.shape and dice(seg == 2, ref == 2) > 0.2

    # ... and manual_initialization takes the snapshots as a list of state dicts (a checkpoint ensemble)
    pm = PlansManager(str(m.model_dir / "plans.json"))
    cm = pm.get_configuration("3d_fullres")
    dataset_json = json.loads((m.model_dir / "dataset.json").read_text())
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3, allow_init=True,
                                 deep_supervision=False)
    params = [_load(p)["network_weights"] for p in m.snapshots]
    pred = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.manual_initialization(net, pm, cm, params, dataset_json, "nnUNetTrainer", (0, 1, 2))
    x = torch.randn(1, *cm.patch_size)
    logits = pred.predict_logits_from_preprocessed_data(x)
    assert tuple(logits.shape) == (3, *cm.patch_size) and torch.isfinite(logits).all()


def test_cli_train_snapshots(tiny_prepared_dataset, tmp_path, capsys, monkeypatch):
    from CalibUncertaintyLib.cli.main import main

    ds, prepared = tiny_prepared_dataset
    args = ["train-snapshots", str(ds.folder), "--preprocessed", str(prepared.preprocessed_root),
            "--results", str(tmp_path), "--cycles", "2", "--epochs-per-cycle", "1", "--iterations-per-epoch", "2",
            "--max-features", "32", "--device", "cpu", "--fold", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    fold = tmp_path / prepared.dataset_name / "CalibuSnapshotTrainer__nnUNetPlans_tiny__3d_fullres" / "fold_3"
    assert str(fold.parent) in out and "checkpoint_snapshot_1.pth" in out
    assert (fold / snapshot_name(0)).is_file() and (fold / snapshot_name(1)).is_file()
    rec = json.loads((fold / FOLD_RECORD).read_text())
    assert rec["config"]["cycles"] == 2 and rec["config"]["iterations_per_epoch"] == 2

    # a dataset id needs a raw folder; a missing one is a clear error (exit code 2), not a traceback
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["train-snapshots", "992", "--results", str(tmp_path)]) == 2
    assert "pass --raw or set $nnUNet_raw" in capsys.readouterr().err
    assert main(["train-snapshots", "993", "--raw", str(ds.folder.parent), "--results", str(tmp_path),
                 "--preprocessed", str(tmp_path)]) == 2
    assert "exactly one Dataset993_* folder" in capsys.readouterr().err
