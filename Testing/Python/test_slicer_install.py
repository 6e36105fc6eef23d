"""How the Slicer module installs its Python packages, driven through recording fakes of Slicer's
install functions (``slicer.util.pip_install`` / ``confirmOkCancelDisplay`` and SlicerPyTorch's
``PyTorchUtilsLogic.installTorch``): a real Slicer cannot run here. The requirement files are the
real ones, read by the real ``packaging`` parser too (what ``load_requirements`` uses in Slicer)."""

from __future__ import annotations

import importlib.metadata

import pytest
from packaging.requirements import Requirement as PkgRequirement
from packaging.specifiers import SpecifierSet

from CalibUncertaintyLib import dependencies, slicer_install
from CalibUncertaintyLib.slicer_install import (NO_DEPS_REQUIREMENTS_FILE, PROVIDED_BY_SLICER, REQUIREMENTS_FILE,
                                                TORCH_REQUIREMENT, InstallDeclined, SlicerInstaller, canonical,
                                                load_requirements, make_plan)

FORBIDDEN = {"torch", "simpleitk", "numpy", "torchvision", "timm"}
#: a fresh Slicer 5.10 with the PyTorch extension not yet used: only what Slicer ships
FRESH_SLICER = {"numpy": "1.26.4", "scipy": "1.14.1", "SimpleITK": "2.4.0"}


class FakeSlicerUtil:
    def __init__(self, answer=True):
        self.answer = answer
        self.confirmations = []
        self.pip_calls = []

    def confirmOkCancelDisplay(self, text, windowTitle=None):
        self.confirmations.append(text)
        return self.answer

    def pip_install(self, args):
        assert isinstance(args, list)
        constraints = None
        if "-c" in args:
            with open(args[args.index("-c") + 1], encoding="utf-8") as f:
                constraints = f.read()
        self.pip_calls.append((list(args), constraints))


class FakeTorchLogic:
    def __init__(self, result="2.13.0+cpu"):
        self.result = result
        self.calls = []

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        self.calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement,
                           "forceComputationBackend": forceComputationBackend})
        return self.result


def _names(args) -> set:
    out = set()
    skip_next = False
    for a in args:
        if skip_next:
            skip_next = False
            continue
        if a == "-c":
            skip_next = True
            continue
        if a.startswith("-"):
            continue
        out.add(canonical(PkgRequirement(a).name))
    return out


def test_fresh_slicer_install_never_asks_pip_for_torch_simpleitk_or_numpy():
    util, torch_logic = FakeSlicerUtil(), FakeTorchLogic()
    plan = make_plan(installed=FRESH_SLICER.get)
    assert plan.torch and plan.no_deps and plan.with_deps
    SlicerInstaller(util, torch_logic).install(plan)
    # torch from the PyTorch extension, asked for a version nnunetv2 accepts
    (call,) = torch_logic.calls
    assert call["askConfirmation"] is True and call["torchVersionRequirement"] == TORCH_REQUIREMENT
    # one confirmation listing the packages, then the --no-deps install, then the rest
    assert len(util.confirmations) == 1 and "nnunetv2==2.8.1" in util.confirmations[0]
    (no_deps_args, _), (rest_args, constraints) = util.pip_calls
    assert no_deps_args[0] == "--no-deps" and "nnunetv2==2.8.1" in no_deps_args
    assert "--no-deps" not in rest_args and "-c" in rest_args
    asked = _names(no_deps_args) | _names(rest_args)
    assert not asked & FORBIDDEN, asked & FORBIDDEN
    # what Slicer ships is pinned while the rest is resolved
    pinned = dict(line.split("==") for line in constraints.split())
    assert pinned == FRESH_SLICER


def test_torch_requirement_is_one_nnunetv2_accepts():
    ours = SpecifierSet(TORCH_REQUIREMENT)
    nnunet_torch = next(PkgRequirement(r) for r in importlib.metadata.requires("nnunetv2")
                        if PkgRequirement(r).name == "torch" and PkgRequirement(r).marker is None)
    for v in ["2.0.1", "2.1.1", "2.1.2", "2.4.1", "2.8.0", "2.9.0", "2.9.1", "2.10.0", "2.13.0"]:
        if v in ours:
            assert v in nnunet_torch.specifier, v
    assert "2.9.0" not in ours and "2.9.1" not in ours and "2.13.0" in ours
    assert dependencies.satisfies("2.9.1", TORCH_REQUIREMENT) is False
    assert dependencies._satisfies_simple("2.9.1", TORCH_REQUIREMENT) is False
    assert dependencies._satisfies_simple("2.13.0+cpu", TORCH_REQUIREMENT) is True


def test_requirement_files_cover_nnunetv2s_requirements():
    """nnunetv2 and the --no-deps packages get every requirement they declare, except what Slicer
    / the PyTorch extension provide and timm (deliberately not installed)."""
    no_deps = {canonical(r.name) for r in load_requirements(NO_DEPS_REQUIREMENTS_FILE)}
    with_deps = {canonical(r.name) for r in load_requirements(REQUIREMENTS_FILE)}
    allowed = no_deps | with_deps | {canonical(n) for n in PROVIDED_BY_SLICER + slicer_install.NOT_INSTALLED}
    for dist in ["nnunetv2", *sorted(no_deps)]:
        for text in importlib.metadata.requires(dist) or []:
            req = PkgRequirement(text)
            if req.marker is not None and "extra" in str(req.marker):
                continue
            assert canonical(req.name) in allowed, f"{dist} needs {req.name}, which no requirement file installs"
    assert not (no_deps | with_deps) & FORBIDDEN


def test_requirement_files_parse_like_slicers_load_requirements():
    for path in (NO_DEPS_REQUIREMENTS_FILE, REQUIREMENTS_FILE):
        ours = load_requirements(path)
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        theirs = [PkgRequirement(ln) for ln in lines]
        assert [(canonical(r.name), SpecifierSet(r.spec)) for r in ours] == \
            [(canonical(r.name), r.specifier) for r in theirs]


def test_this_environment_needs_nothing():
    assert make_plan().empty
    assert SlicerInstaller.still_missing() == []


def test_declining_installs_nothing():
    util = FakeSlicerUtil(answer=False)
    with pytest.raises(InstallDeclined):
        SlicerInstaller(util, FakeTorchLogic()).install(make_plan(installed=FRESH_SLICER.get))
    assert util.pip_calls == []


def test_no_pytorch_extension_says_how_to_get_torch():
    util = FakeSlicerUtil()
    with pytest.raises(dependencies.MissingDependencyError, match="PyTorch"):
        SlicerInstaller(util, torch_logic=None).install(make_plan(installed=FRESH_SLICER.get))
    assert util.pip_calls == [] and util.confirmations == []
    with pytest.raises(InstallDeclined, match="PyTorch was not installed"):
        SlicerInstaller(util, FakeTorchLogic(result=None)).install(make_plan(installed=FRESH_SLICER.get))


def test_a_requirement_file_asking_for_torch_is_refused(tmp_path):
    bad = tmp_path / "requirements.txt"
    bad.write_text("pandas\ntorch>=2\n")
    with pytest.raises(ValueError, match="torch"):
        make_plan(with_deps_file=bad)


def test_slicer_version_gate():
    from CalibUncertaintyLib.slicer_support import slicer_version_problem

    msg = slicer_version_problem(5, 8, python=(3, 9))
    assert "5.10" in msg and "3.10" in msg and "3.9" in msg
    assert slicer_version_problem(5, 10, python=(3, 12)) is None
    assert slicer_version_problem(5, 12, python=(3, 12)) is None
    assert slicer_version_problem(6, 0, python=(3, 13)) is None
    assert slicer_version_problem(5, 10, python=(3, 9)) is not None


def test_forget_library_modules_makes_the_next_import_fresh():
    """The module's developer Reload drops the library so that edited files are read again."""
    import importlib
    import sys

    from CalibUncertaintyLib.slicer_support import forget_library_modules

    import CalibUncertaintyLib.progress as old
    saved = {k: v for k, v in sys.modules.items() if k == "CalibUncertaintyLib" or k.startswith("CalibUncertaintyLib.")}
    try:
        dropped = forget_library_modules()
        assert "CalibUncertaintyLib" in dropped and "CalibUncertaintyLib.progress" in dropped
        assert not any(k.startswith("CalibUncertaintyLib") for k in sys.modules)
        assert importlib.import_module("CalibUncertaintyLib.progress") is not old
    finally:  # give the rest of the suite its original module objects back
        for k in [k for k in sys.modules if k.startswith("CalibUncertaintyLib")]:
            del sys.modules[k]
        sys.modules.update(saved)
