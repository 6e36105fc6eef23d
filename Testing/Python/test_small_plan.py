"""Small plan: derived from nnU-Net's own plan, loadable by nnU-Net, preprocessed once, bad input."""

from __future__ import annotations

import json

import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.nnunet.small_plan import (DONE_SUFFIX, derive_small_plan, is_prepared,
                                                   parse_dataset_folder, prepare_small_plan)


def _base_plans(prepared) -> dict:
    return json.loads((prepared.preprocessed_folder / "nnUNetPlans.json").read_text())


def test_small_plan_file_is_nnunet_plans(tiny_prepared_dataset):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    import torch

    ds, prepared = tiny_prepared_dataset
    assert prepared.plans_file.name == "nnUNetPlans_tiny.json" and is_prepared(prepared)
    pm = PlansManager(str(prepared.plans_file))
    assert pm.plans_name == "nnUNetPlans_tiny" and pm.available_configurations == ["3d_fullres"]
    cm = pm.get_configuration("3d_fullres")
    base = PlansManager(_base_plans(prepared)).get_configuration("3d_fullres")
    assert cm.data_identifier == "nnUNetPlans_tiny_3d_fullres" != base.data_identifier
    assert cm.spacing == base.spacing and cm.normalization_schemes == base.normalization_schemes
    kw = cm.network_arch_init_kwargs
    assert kw["n_stages"] == 4 and kw["features_per_stage"] == [8, 16, 32, 32]
    assert sum(kw["features_per_stage"]) < sum(base.network_arch_init_kwargs["features_per_stage"]) / 5
    assert cm.batch_size == 2 and list(cm.patch_size) == [32, 48, 48]
    # nnU-Net builds the network from it and a patch goes through
    net = get_network_from_plans(cm.network_arch_class_name, kw, cm.network_arch_init_kwargs_req_import,
                                 1, 3, allow_init=True, deep_supervision=False)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *cm.patch_size))
    assert tuple(out.shape) == (1, 3, *cm.patch_size)
    # nnU-Net's preprocessing wrote every training case for the small plan's data identifier
    data = prepared.preprocessed_folder / cm.data_identifier
    assert sorted(p.name for p in data.glob("*.pkl")) == [f"{c}.pkl" for c in ds.train_cases]


def test_derive_patch_rounding_and_options(tiny_prepared_dataset):
    _, prepared = tiny_prepared_dataset
    base = _base_plans(prepared)
    p = derive_small_plan(base, "nnUNetPlans_x", n_stages=3, base_features=4, max_features=8, batch_size=1)
    c = p["configurations"]["3d_fullres"]
    strides = c["architecture"]["arch_kwargs"]["strides"]
    assert len(strides) == 3 and c["architecture"]["arch_kwargs"]["features_per_stage"] == [4, 8, 8]
    assert len(c["architecture"]["arch_kwargs"]["n_conv_per_stage_decoder"]) == 2
    div = [1, 1, 1]
    for s in strides:
        div = [d * v for d, v in zip(div, s)]
    assert all(ps % d == 0 for ps, d in zip(c["patch_size"], div)) and c["batch_size"] == 1
    assert p["plans_name"] == "nnUNetPlans_x" and c["data_identifier"] == "nnUNetPlans_x_3d_fullres"
    assert base["plans_name"] == "nnUNetPlans"  # the input is not modified
    p2 = derive_small_plan(base, patch_size=[16, 32, 24])
    assert p2["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 24]


@pytest.mark.parametrize("kwargs, match", [
    (dict(configuration="3d_lowres"), "not in plans"),
    (dict(n_stages=9), "n_stages"),
    (dict(n_stages=1), "n_stages"),
    (dict(patch_size=[30, 48, 48]), "multiple of the network's total stride"),
    (dict(patch_size=[32, 48]), "needs 3 values"),
    (dict(base_features=16, max_features=8), "base_features"),
    (dict(plans_name="tiny plans"), "plans name"),
])
def test_derive_rejects_bad_options(tiny_prepared_dataset, kwargs, match):
    _, prepared = tiny_prepared_dataset
    with pytest.raises(InputError, match=match):
        derive_small_plan(_base_plans(prepared), **kwargs)


def test_prepare_reuses_complete_preprocessing(tiny_prepared_dataset):
    ds, prepared = tiny_prepared_dataset
    done = prepared.preprocessed_folder / ("nnUNetPlans_tiny_3d_fullres" + DONE_SUFFIX)
    before = (done.stat().st_mtime_ns, prepared.plans_file.stat().st_mtime_ns)
    again = prepare_small_plan(ds.folder, prepared.preprocessed_root, max_features=32)
    assert again == prepared
    assert (done.stat().st_mtime_ns, prepared.plans_file.stat().st_mtime_ns) == before


def test_parse_dataset_folder_errors(tmp_path):
    with pytest.raises(InputError, match="DatasetXXX_Name"):
        parse_dataset_folder(tmp_path / "phantom")
    bad = tmp_path / "Dataset012_X"
    bad.mkdir()
    with pytest.raises(InputError, match="no dataset.json"):
        parse_dataset_folder(bad)
    (bad / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match="imagesTr"):
        parse_dataset_folder(bad)
