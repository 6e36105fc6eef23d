"""nnU-Net's vocabulary on the command line (issue 17): the synonyms parse to the project's options,
-d/-c/-tr/-p find the model folder under nnUNet_results as nnUNetv2_predict does (errors name the
path looked at), an unknown flag gets "did you mean", and every --help is plain text with help for
every option. Parsing only (no model is run here; test_docs.py runs them on the quick demo)."""

from __future__ import annotations

import argparse

import pytest

from CalibUncertaintyLib.cli.main import build_parser, main, sub_parser
from CalibUncertaintyLib.errors import ModelFolderError
from CalibUncertaintyLib.nnunet.results_folder import dataset_folder_name, resolve_model_folder
from cli_errors import error_line


def _results(tmp_path):
    """A results tree as nnU-Net leaves it (folders only: resolution reads no file)."""
    res = tmp_path / "nnUNet_results"
    for name in ("nnUNetTrainer__nnUNetPlans__3d_fullres", "nnUNetTrainer__nnUNetResEncUNetMPlans__2d"):
        (res / "Dataset042_Liver" / name).mkdir(parents=True)
    (res / "Dataset043_Other").mkdir()
    return res


def test_predict_accepts_nnunet_flags_as_synonyms(tmp_path, monkeypatch):
    from CalibUncertaintyLib.cli.nnunet_flags import apply_nnunet_flags

    res = _results(tmp_path)
    monkeypatch.setenv("nnUNet_results", str(res))
    args = build_parser().parse_args(["predict", "-i", "ct.nii.gz", "-d", "42", "-c", "3d_fullres", "-tr",
                                      "nnUNetTrainer", "-p", "nnUNetPlans", "-f", "0", "1", "-chk",
                                      "checkpoint_best.pth", "-device", "cpu", "-step_size", "0.75", "--disable_tta",
                                      "-o", "out"])
    assert (args.nnunet_dataset, args.configuration, args.trainer, args.plans) == \
        ("42", "3d_fullres", "nnUNetTrainer", "nnUNetPlans")
    assert args.folds == ["0", "1"] and args.checkpoint == "checkpoint_best.pth" and args.device == "cpu"
    assert args.step_size == 0.75 and args.disable_tta and args.model is None
    apply_nnunet_flags(args)  # what every command does first
    assert args.tta is False and args.model == res / "Dataset042_Liver" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    same = build_parser().parse_args(["predict", "-i", "x", "-m", "M", "--folds", "0", "1", "--checkpoint",
                                      "checkpoint_best.pth", "--device", "cpu", "--step-size", "0.75", "--no-tta",
                                      "-o", "out"])
    assert (same.folds, same.checkpoint, same.device, same.step_size, same.tta) == \
        (args.folds, args.checkpoint, args.device, args.step_size, args.tta)
    for command in ("fit-temperature", "evaluate"):  # the commands that run a model take them too
        extra = ["--calibration", "c.json"] if command == "evaluate" else []
        a = build_parser().parse_args([command, "-d", "Dataset042_Liver", "-c", "2d", "-f", "all", "-device", "cpu",
                                       "--disable_tta", "--images", ".", "--labels", ".", *extra, "-o", "o.json"])
        assert a.nnunet_dataset == "Dataset042_Liver" and a.folds == ["all"] and a.disable_tta


def test_help_lists_the_synonyms_and_is_plain(capsys):
    parser = build_parser()
    for command in ("predict", "fit-temperature", "evaluate"):
        text = sub_parser(parser, command).format_help()
        for flag in ("-d DATASET", "-c CONFIG", "-tr TRAINER", "-p PLANS", "-f FOLD", "-chk NAME",
                     "-device {auto,cuda,mps,cpu}", "--disable_tta"):
            assert flag in text, (command, flag)
    assert "-step_size F, --step-size F" in sub_parser(parser, "predict").format_help()
    fit = " ".join(sub_parser(parser, "fit-temperature").format_help().split())
    assert "By default the local temperature T(x)" in fit and "bounded search on log T" not in fit
    for name, sub in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.items():
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text, name
        for action in sub._actions:
            if action.option_strings or action.dest != "help":
                assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_dataset_resolution_as_nnunet(tmp_path, monkeypatch):
    res = _results(tmp_path)
    env = {"nnUNet_results": str(res)}
    assert dataset_folder_name("42", env) == "Dataset042_Liver"
    assert dataset_folder_name("Dataset999_Anything", env) == "Dataset999_Anything"  # a name is taken as it is
    assert resolve_model_folder("42", "3d_fullres", env=env) == res / "Dataset042_Liver" / \
        "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert resolve_model_folder("Dataset042_Liver", "2d", plans="nnUNetResEncUNetMPlans", env=env).name == \
        "nnUNetTrainer__nnUNetResEncUNetMPlans__2d"
    raw = tmp_path / "raw"
    (raw / "Dataset042_Kidney").mkdir(parents=True)  # the same id under another name: ambiguous, as in nnU-Net
    with pytest.raises(ModelFolderError, match="names 2 different folders"):
        dataset_folder_name(42, {**env, "nnUNet_raw": str(raw)})
    with pytest.raises(ModelFolderError, match=r"no dataset with id 7 \(Dataset007_\*\) in \$nnUNet_preprocessed "
                                               r"\(not set\); \$nnUNet_raw \(not set\); \$nnUNet_results=" + str(res)):
        dataset_folder_name("7", env)
    with pytest.raises(ModelFolderError, match="needs -c CONFIGURATION.*trained here: nnUNetTrainer__nnUNetPlans__3d_fullres"):
        resolve_model_folder("42", None, env=env)
    with pytest.raises(ModelFolderError, match="no trained model at .*nnUNetTrainer__nnUNetPlans__3d_lowres; the dataset "
                                               "folder holds nnUNetTrainer__nnUNetPlans__3d_fullres"):
        resolve_model_folder("42", "3d_lowres", env=env)
    with pytest.raises(ModelFolderError, match="Dataset043_Other holds no trained model folder"):
        resolve_model_folder("43", "3d_fullres", env=env)
    with pytest.raises(ModelFolderError, match="needs the environment variable nnUNet_results"):
        resolve_model_folder("42", "3d_fullres", env={})


def test_cli_errors_name_the_path(tmp_path, monkeypatch, capsys):
    res = _results(tmp_path)
    monkeypatch.setenv("nnUNet_results", str(res))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"")
    assert main(["predict", "-i", str(ct), "-d", "42", "-c", "3d_lowres", "-o", str(tmp_path / "o")]) == 2
    assert f"no trained model at {res}/Dataset042_Liver/nnUNetTrainer__nnUNetPlans__3d_lowres" in error_line(capsys)
    assert main(["predict", "-i", str(ct), "-m", str(res), "-c", "3d_fullres", "-o", str(tmp_path / "o")]) == 2
    assert "-c only applies with -d DATASET" in error_line(capsys)
    assert main(["predict", "-i", str(ct), "-m", str(res), "--tta", "--disable_tta", "-o", str(tmp_path / "o")]) == 2
    assert "--disable_tta and --tta contradict each other" in error_line(capsys)
    # -d resolved to a folder that is not a trained model (empty): predict's own check speaks next
    assert main(["predict", "-i", str(ct), "-d", "42", "-c", "3d_fullres", "-o", str(tmp_path / "o")]) == 2
    assert "nnUNetTrainer__nnUNetPlans__3d_fullres" in error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("typed, hint", [
    ("--disable-tta", "--disable-tta: did you mean --disable_tta?"),
    ("--flods", "--flods: did you mean --folds?"),
    ("--devcie", "--devcie: did you mean --device?"),
    ("--calibraton", "--calibraton: did you mean --calibration?"),
    ("-npp", "-npp (nnU-Net) is not needed: preprocessing runs in this process"),
    ("--save_probabilities", "--save_probabilities (nnU-Net) is not needed: predict always writes the calibrated "
                             "probabilities"),
])
def test_unknown_flag_gets_did_you_mean(typed, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "-i", "ct.nii.gz", "-m", "M", "-o", "out", typed, *(["3"] if typed == "-npp" else [])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: calib-uncertainty predict")  # argparse's own error path
    assert "error: unrecognized arguments: " + typed in err and hint in err


def test_glued_short_flag_is_explained(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "-i", "x", "-m", "M", "-fold", "0", "-o", "out"])
    assert "expected a fold number (0, 1, ...) or 'all', got 'old' (-fold is read as -f old: write -f 0 or --folds 0)" \
        in capsys.readouterr().err
