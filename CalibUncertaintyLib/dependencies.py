"""Which Python packages the prediction needs, with which version bounds, and which are missing.

Qt-free and import-light: it reads installed versions with ``importlib.metadata`` and never
imports the packages it checks (except :func:`describe_compute_device`, which imports torch
inside the function: for scripts and the CLI, never called in Slicer's process, where the run
itself reports the device it chose). :func:`torch_restart_needed` tells when the torch loaded in
this process was replaced on disk (Slicer must be restarted). The Slicer module calls :func:`missing_requirements` on the first Apply
(never at import time) and installs what is missing through ``slicer_install.SlicerInstaller``
(nnunetv2 without its declared dependencies, the rest listed in ``resources/requirements.txt``,
torch from the PyTorch extension); scripts call :func:`require`.

PyTorch is deliberately not in :data:`REQUIREMENTS`: ``pip install torch`` picks a build that may
not match the machine (a multi-GB CUDA build on a CPU box, or the wrong CUDA). In Slicer it comes
from the PyTorch extension (``PyTorchUtils``), elsewhere from the install command that fits the
machine; :data:`TORCH_MISSING_MESSAGE` says so.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from dataclasses import dataclass

from .errors import CalibUncertaintyError


@dataclass(frozen=True)
class Requirement:
    """A distribution name and a PEP 440 specifier ("" for any version)."""

    name: str
    spec: str
    why: str = ""

    def __str__(self) -> str:
        return f"{self.name}{self.spec}"


#: What ``calib-uncertainty predict`` needs besides torch. nnunetv2 is pinned: the project reads
#: nnU-Net internals (predictor, plans, trainer loading) that are checked against 2.8.1.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("nnunetv2", "==2.8.1", "runs the nnU-Net v2 members"),
    Requirement("numpy", ">=1.24", "arrays"),
    Requirement("scipy", ">=1.10", "distance transforms, connected components, temperature search"),
    Requirement("SimpleITK", ">=2.2", "reads and writes the CT and the maps"),
    Requirement("tqdm", ">=4.60", "console progress"),
    Requirement("matplotlib", ">=3.7", "reliability diagrams and review sheets"),
)

#: nnunetv2 2.8.1 declares torch>=2.1.2,!=2.9.*.
TORCH = Requirement("torch", ">=2.1.2,!=2.9.*", "neural network inference")

TORCH_MISSING_MESSAGE = (
    "PyTorch is not installed. In 3D Slicer install the 'PyTorch' extension (Extensions Manager), "
    "restart Slicer and open its module once to install the PyTorch build that fits this computer "
    "(CUDA or CPU); then press Apply again. Outside Slicer, install torch with the command from "
    "pytorch.org that matches your GPU or CPU (a plain 'pip install torch' may download a large "
    "CUDA build you cannot use)."
)


class MissingDependencyError(CalibUncertaintyError):
    """A package the prediction needs is missing or has an unusable version."""


@dataclass(frozen=True)
class Missing:
    """A requirement that is not satisfied: ``installed`` is None when the package is absent."""

    requirement: Requirement
    installed: str | None

    def __str__(self) -> str:
        if self.installed is None:
            return f"{self.requirement} (not installed)"
        return f"{self.requirement} (installed: {self.installed})"


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies the specifier ``spec`` (comma-separated PEP 440 clauses).

    Uses ``packaging`` when it is importable (it is in Slicer and in any pip-managed
    environment); otherwise compares the numeric release parts, ignoring local labels
    ("2.13.0+cpu" counts as 2.13.0).
    """
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging is present wherever pip is
        return _satisfies_simple(version, spec)
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return _satisfies_simple(version, spec)


def _release(version: str) -> tuple[int, ...]:
    nums = []
    for part in re.split(r"[.+!-]", version):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
    return tuple(nums)


def _satisfies_simple(version: str, spec: str) -> bool:
    have = _release(version)
    for clause in spec.split(","):
        m = re.match(r"\s*(==|!=|>=|<=|>|<|~=)\s*([\w.]+?)(\.\*)?\s*$", clause)
        if not m:
            raise ValueError(f"unsupported version specifier {clause!r}")
        op, want_text, wildcard = m.groups()
        if wildcard and op in ("==", "!="):       # prefix match: !=2.9.* excludes 2.9.0, 2.9.1, ...
            want = _release(want_text)
            same = have[:len(want)] == want
            if same != (op == "=="):
                return False
            continue
        want = _release(want_text)
        n = max(len(have), len(want))
        a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
        ok = {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b,
              "~=": a >= b and a[:len(want) - 1] == b[:len(want) - 1]}[op]
        if not ok:
            return False
    return True


def missing_requirements(requirements=REQUIREMENTS) -> list[Missing]:
    """The requirements that are absent or at a version outside their bounds, in list order."""
    out = []
    for req in requirements:
        have = installed_version(req.name)
        if have is None or not satisfies(have, req.spec):
            out.append(Missing(req, have))
    return out


def torch_missing() -> Missing | None:
    """None if a usable torch is installed, else what is wrong with it."""
    missing = missing_requirements((TORCH,))
    return missing[0] if missing else None


def requirement_strings(requirements=REQUIREMENTS) -> list[str]:
    """The requirements as pip arguments, e.g. ``["nnunetv2==2.8.1", "numpy>=1.24", ...]``."""
    return [str(r) for r in requirements]


def pip_install_command(missing: list[Missing] | None = None, python: str | None = None) -> list[str]:
    """The command that installs ``missing`` (default: every requirement) with ``python``."""
    reqs = [m.requirement for m in missing] if missing else list(REQUIREMENTS)
    return [python or sys.executable, "-m", "pip", "install", *requirement_strings(reqs)]


def missing_message(missing: list[Missing], python: str | None = None) -> str:
    """A message that lists what is missing and the command that installs it."""
    if not missing:
        return "All required packages are installed."
    lines = ["These Python packages are needed to run the prediction:"]
    lines += [f"  - {m}" + (f": {m.requirement.why}" if m.requirement.why else "") for m in missing]
    cmd = pip_install_command(missing, python)
    lines.append("Install them with: " + " ".join(f'"{a}"' if any(c in a for c in " <>=") else a for a in cmd))
    return "\n".join(lines)


def require(requirements=REQUIREMENTS, need_torch: bool = True) -> None:
    """Raise :class:`MissingDependencyError` saying what to install if anything is missing."""
    if need_torch:
        bad_torch = torch_missing()
        if bad_torch is not None:
            raise MissingDependencyError(f"{bad_torch}. {TORCH_MISSING_MESSAGE}")
    missing = missing_requirements(requirements)
    if missing:
        raise MissingDependencyError(missing_message(missing))


RESTART_MESSAGE = (
    "PyTorch {loaded} is loaded in this Slicer session, and PyTorch {installed} is now installed in its place "
    "(updated while Slicer was running). Restart Slicer before running a prediction, so that every module uses "
    "the installed PyTorch.")


def torch_restart_needed() -> str | None:
    """A message asking to restart Slicer when the torch imported in this process is not the torch
    installed now (it was replaced while the process ran, e.g. by the PyTorch extension), else
    None. Never imports torch: it compares the loaded module's version with the installed one."""
    loaded = sys.modules.get("torch")
    if loaded is None:
        return None
    loaded_version = str(getattr(loaded, "__version__", "") or "")
    installed = installed_version("torch")
    if not loaded_version or installed == loaded_version:
        return None
    return RESTART_MESSAGE.format(loaded=loaded_version, installed=installed or "(none)")


def describe_compute_device(requested: str = "auto") -> str:
    """One sentence saying where inference will run: the GPU found, or the CPU and why.

    ``auto`` picks CUDA, then Apple MPS, then the CPU (as ``CalibUncertaintyLib.device`` does);
    an explicit request that cannot be met says that the run falls back to the CPU.
    """
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed, so no device can be used. " + TORCH_MISSING_MESSAGE
    requested = (requested or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if cuda and (requested == "auto" or requested.startswith("cuda")):
        name = torch.cuda.get_device_name(0)
        return f"GPU: {name} (CUDA {torch.version.cuda}, PyTorch {torch.__version__})."
    if mps and requested in ("auto", "mps"):
        return f"GPU: Apple MPS (PyTorch {torch.__version__})."
    if requested == "cpu":
        return f"CPU (as requested; PyTorch {torch.__version__})."
    why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
           else "no CUDA GPU is visible to PyTorch")
    asked = "" if requested == "auto" else f"{requested.upper()} was requested but "
    return (f"{asked}{why} (PyTorch {torch.__version__}): running on the CPU instead - slower, "
            "same results.")


__all__ = [
    "Requirement", "REQUIREMENTS", "TORCH", "TORCH_MISSING_MESSAGE", "MissingDependencyError", "Missing",
    "installed_version", "satisfies", "missing_requirements", "torch_missing", "requirement_strings",
    "pip_install_command", "missing_message", "require", "describe_compute_device", "torch_restart_needed",
    "RESTART_MESSAGE",
]
