"""Install what the prediction needs into Slicer's Python without breaking that Slicer (Qt-free).

The Slicer module calls :class:`SlicerInstaller` on the first Apply, passing Slicer's own
functions (``slicer.util`` and, when the PyTorch extension is there, a ``PyTorchUtilsLogic``);
tests pass recording fakes of the same functions. The install is done the way the mature
nnU-Net extensions do it:

1. torch comes from the PyTorch extension, asked for a version nnunetv2 accepts
   (:data:`TORCH_REQUIREMENT`: nnunetv2 2.8.1 declares ``torch>=2.1.2,!=2.9.*``), through
   ``installTorch(askConfirmation=True, torchVersionRequirement=...)``;
2. one confirmation lists every package that will be installed;
3. the packages of ``resources/requirements-no-deps.txt`` (nnunetv2 and the three DKFZ packages
   that also declare torch / SimpleITK / timm) are installed with ``--no-deps``;
4. their remaining requirements, ``resources/requirements.txt``, are installed normally, under a
   constraints file that pins the numpy, scipy, SimpleITK and torch already installed — pip can
   then choose compatible versions but never replace those.

Nothing is ever asked for torch, SimpleITK or numpy through pip. :data:`PROVIDED_BY_SLICER`
names what Slicer itself ships. When the install replaced a torch that this Slicer session had
already imported, :attr:`SlicerInstaller.restart_message` says to restart Slicer
(``dependencies.torch_restart_needed``), and the module runs nothing until then.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import dependencies
from .dependencies import Missing, Requirement, installed_version, satisfies

RESOURCES = Path(__file__).resolve().parent / "resources"
REQUIREMENTS_FILE = RESOURCES / "requirements.txt"
NO_DEPS_REQUIREMENTS_FILE = RESOURCES / "requirements-no-deps.txt"

#: Passed to the PyTorch extension: what nnunetv2 2.8.1 accepts.
TORCH_REQUIREMENT = ">=2.1.2,!=2.9.*"
#: Shipped with Slicer (or, for torch, by the PyTorch extension): never installed through pip;
#: pinned to the installed version while the other packages are installed.
PROVIDED_BY_SLICER = ("numpy", "scipy", "SimpleITK", "torch")
#: Requirements of the --no-deps packages deliberately left out (see requirements.txt).
NOT_INSTALLED = ("timm",)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*?)\s*(;.*)?$")


def load_requirements(path) -> list[Requirement]:
    """Requirements of a requirements.txt file (comments, blank lines and ``-`` options skipped),
    the format ``slicer.packaging.load_requirements`` / ``slicer.pydeps.load_requirements`` read."""
    out = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{path}: cannot read requirement {raw!r}")
        out.append(Requirement(m.group(1), m.group(3).replace(" ", "")))
    return out


@dataclass
class InstallPlan:
    """What an install would do. ``torch``: ask the PyTorch extension for torch; ``no_deps`` /
    ``with_deps``: pip requirement strings; ``pinned``: name -> installed version kept as is."""

    torch: bool = False
    no_deps: list[str] = field(default_factory=list)
    with_deps: list[str] = field(default_factory=list)
    pinned: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.torch or self.no_deps or self.with_deps)

    def describe(self) -> str:
        lines = []
        if self.torch:
            lines.append(f"PyTorch (torch{TORCH_REQUIREMENT}) through the PyTorch extension")
        if self.no_deps:
            lines.append("without their declared dependencies: " + ", ".join(self.no_deps))
        if self.with_deps:
            lines.append("then: " + ", ".join(self.with_deps))
        if self.pinned:
            lines.append("kept as installed: " + ", ".join(f"{k} {v}" for k, v in self.pinned.items()))
        return "\n".join(lines)


def _missing(reqs, installed=installed_version) -> list[Missing]:
    out = []
    for r in reqs:
        have = installed(r.name)
        if have is None or not satisfies(have, r.spec):
            out.append(Missing(r, have))
    return out


def make_plan(no_deps_file=NO_DEPS_REQUIREMENTS_FILE, with_deps_file=REQUIREMENTS_FILE,
              installed=installed_version) -> InstallPlan:
    """The plan for this Python: only what is missing or at a version outside its bounds.
    ``installed(name) -> version | None`` reads the installed versions (tests describe a fresh
    Slicer with it)."""
    for path in (no_deps_file, with_deps_file):
        bad = [r.name for r in load_requirements(path) if canonical(r.name) in
               {canonical(n) for n in PROVIDED_BY_SLICER}]
        if bad:
            raise ValueError(f"{path} must not ask pip for {', '.join(bad)} (provided by Slicer / the PyTorch extension)")
    torch_have = installed("torch")
    plan = InstallPlan(torch=torch_have is None or not satisfies(torch_have, TORCH_REQUIREMENT))
    plan.no_deps = [str(m.requirement) for m in _missing(load_requirements(no_deps_file), installed)]
    plan.with_deps = [str(m.requirement) for m in _missing(load_requirements(with_deps_file), installed)]
    plan.pinned = {n: v for n in PROVIDED_BY_SLICER if (v := installed(n)) is not None}
    return plan


def constraints_text(pinned: dict) -> str:
    return "".join(f"{name}=={version}\n" for name, version in pinned.items())


class InstallDeclined(Exception):
    """The user said no (to the PyTorch extension's or to this module's confirmation)."""


class SlicerInstaller:
    """Runs an :class:`InstallPlan` through Slicer's functions.

    ``util``: an object with ``confirmOkCancelDisplay(text, windowTitle=...)`` and
    ``pip_install(args)`` (``slicer.util``); ``torch_logic``: ``PyTorchUtilsLogic()`` or None
    when the PyTorch extension is not installed; ``requester``: shown in the messages.
    """

    def __init__(self, util, torch_logic=None, requester: str = "CalibUncertainty", temp_dir=None):
        self.util = util
        self.torch_logic = torch_logic
        self.requester = requester
        self.temp_dir = temp_dir
        #: set by install() when the torch loaded in this process was replaced: Slicer must restart
        self.restart_message: str | None = None

    def install(self, plan: InstallPlan | None = None) -> list[Missing]:
        """Install what ``plan`` (default: :func:`make_plan`) lists; return what is still missing
        afterwards (empty on success). Raises :class:`InstallDeclined` when the user says no and
        ``dependencies.MissingDependencyError`` when torch cannot come from the PyTorch extension."""
        plan = plan or make_plan()
        if plan.torch:
            self._install_torch()
        if plan.no_deps or plan.with_deps:
            message = (f"{self.requester} needs these Python packages to run the prediction:\n"
                       + plan.describe() + "\n\nInstall them now? This can take several minutes.")
            if not self.util.confirmOkCancelDisplay(message, windowTitle=f"{self.requester}: Python packages"):
                raise InstallDeclined("the user declined the installation of the Python packages")
            if plan.no_deps:
                self.util.pip_install(["--no-deps", *plan.no_deps])
            if plan.with_deps:
                with tempfile.TemporaryDirectory(prefix="calibu-constraints-", dir=self.temp_dir) as tmp:
                    constraints = Path(tmp) / "constraints.txt"
                    constraints.write_text(constraints_text(plan.pinned), encoding="utf-8")
                    self.util.pip_install([*plan.with_deps, "-c", str(constraints)])
        self.restart_message = dependencies.torch_restart_needed()
        return self.still_missing()

    def _install_torch(self) -> None:
        if self.torch_logic is None:
            raise dependencies.MissingDependencyError(dependencies.TORCH_MISSING_MESSAGE)
        result = self.torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
        if result is None:
            raise InstallDeclined("PyTorch was not installed. " + dependencies.TORCH_MISSING_MESSAGE)

    @staticmethod
    def still_missing() -> list[Missing]:
        reqs = load_requirements(NO_DEPS_REQUIREMENTS_FILE) + load_requirements(REQUIREMENTS_FILE)
        torch = Requirement("torch", TORCH_REQUIREMENT)
        return _missing([torch, *reqs, *dependencies.REQUIREMENTS])
