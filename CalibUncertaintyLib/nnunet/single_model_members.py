"""Ensemble members from ONE trained network: mirrored predictions (TTA) and MC-dropout passes.

A single fold (TotalSegmentator's one fold per task, ``-f all`` models) gives no deep ensemble.
Two member sources make one network an ensemble (``ModelFolder.members("tta" | "dropout")``):

- ``"tta"``: one member per mirroring combination of the axes the checkpoint allows
  (``inference_allowed_mirroring_axes``, what nnU-Net's own test-time augmentation flips): the
  identity, then every non-empty combination in nnU-Net's order ((0,), (1,), (2,), (0, 1), ...),
  8 members for the usual 3-D axes (0, 1, 2), 4 for a 2-D model. Member ``f`` runs the sliding
  window with every tile flipped along ``f`` and its logits flipped back. nnU-Net's TTA averages
  exactly these tile logits before its Gaussian weighting, so the mean of the members' logits is
  nnU-Net's mirrored prediction (up to float16 rounding of the separate sums).
- ``"dropout"``: ``passes`` stochastic forward passes with the network's dropout layers kept
  active (MC dropout); every other layer is in inference mode. Pass ``i`` (1-based) draws its
  dropout masks from a fixed seed (``pass_seed(i)``) so a pass is reproducible (the member cache
  relies on it) and passes differ from each other. A network without dropout layers (nnU-Net's
  default plans have ``dropout_op: null``) is refused: its passes would all be equal.

Both kinds take their folds like ``"single"`` (default: fold 0, else the first fold holding the
checkpoint); several folds give fold x variant members. Reading a checkpoint's mirroring axes needs
no torch (``checkpoint_info`` reads only the pickled header of the checkpoint's zip archive).
"""

from __future__ import annotations

import itertools
import pickle
import zipfile
from functools import lru_cache
from pathlib import Path

from ..errors import ModelFolderError

DEFAULT_PASSES = 10
_SEED_BASE = 20_251_127


def pass_seed(dropout_pass: int) -> int:
    """The seed of MC-dropout pass ``dropout_pass`` (1-based); fixed so passes are reproducible."""
    return _SEED_BASE + int(dropout_pass)


def mirror_combinations(axes) -> list[tuple[int, ...]]:
    """The identity ``()`` then every non-empty combination of ``axes``, by size, in
    ``itertools.combinations`` order (the order of nnU-Net's mirrored passes)."""
    axes = tuple(int(a) for a in axes)
    return [()] + [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]


def flip_label(flip: tuple[int, ...]) -> str:
    return "mirror_none" if not flip else "mirror_" + "_".join(str(a) for a in flip)


# --------------------------------------------------------------------------------------------
# reading a checkpoint's header without torch
# --------------------------------------------------------------------------------------------
class _Stub:
    """Stands in for every non-builtin object of a checkpoint's pickle (tensors, torch.device)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()


class _HeaderUnpickler(pickle.Unpickler):
    _SAFE = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
             ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) in self._SAFE:
            return super().find_class(module, name)
        return _Stub

    def persistent_load(self, pid):
        return None


@lru_cache(maxsize=64)
def _checkpoint_info(path: str, mtime_ns: int, size: int) -> dict:
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise ModelFolderError(f"{path} is not a PyTorch checkpoint archive (no data.pkl)")
            with z.open(names[0]) as f:
                obj = _HeaderUnpickler(f).load()
    except zipfile.BadZipFile:
        return _checkpoint_info_torch(path)
    except ModelFolderError:
        raise
    except Exception as e:  # noqa: BLE001  (a damaged pickle raises many types)
        raise ModelFolderError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e
    return _info_from(obj, path)


def _checkpoint_info_torch(path: str) -> dict:
    """Legacy (non-zip) checkpoints: torch.load."""
    try:
        import torch
    except ImportError as e:
        raise ModelFolderError(f"{path} is not a zip checkpoint and PyTorch is not installed to read it") from e

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ModelFolderError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e})") from e
    return _info_from(obj, path)


def _info_from(obj, path) -> dict:
    if not isinstance(obj, dict) or "network_weights" not in obj:
        raise ModelFolderError(f"{path} is not an nnU-Net checkpoint (no 'network_weights')")
    axes = obj.get("inference_allowed_mirroring_axes")
    init = obj.get("init_args") if isinstance(obj.get("init_args"), dict) else {}
    return {"mirror_axes": None if axes is None else tuple(int(a) for a in axes),
            "configuration": init.get("configuration") if isinstance(init.get("configuration"), str) else None,
            "trainer_name": obj.get("trainer_name") if isinstance(obj.get("trainer_name"), str) else None}


def checkpoint_info(path) -> dict:
    """``{"mirror_axes": tuple | None, "configuration": str | None, "trainer_name": str | None}``
    of an nnU-Net checkpoint, read from the pickle header of its archive (no tensor is loaded, no
    torch import for the zip format torch has written since 1.6). Raises ModelFolderError."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ModelFolderError(f"checkpoint {p} cannot be read: {e}") from e
    return _checkpoint_info(str(p), st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------------------------
# dropout in the plans and in the network
# --------------------------------------------------------------------------------------------
def plans_dropout(plans: dict, configuration: str) -> tuple[str | None, float]:
    """(dropout op name, p) of ``configuration``'s network in ``plans`` (inheriting
    configurations resolved); (None, 0.0) when the plans build no dropout layer."""
    configs = plans.get("configurations", {})
    arch: dict = {}
    seen = set()
    name = configuration
    chain = []
    while name in configs and name not in seen:
        seen.add(name)
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    for c in reversed(chain):
        a = c.get("architecture")
        if isinstance(a, dict):
            arch = a
    kwargs = arch.get("arch_kwargs") or {}
    op = kwargs.get("dropout_op")
    p = float((kwargs.get("dropout_op_kwargs") or {}).get("p", 0.5 if op else 0.0))
    return (op, p) if op else (None, 0.0)


def dropout_modules(network) -> list:
    """The network's dropout layers with p > 0."""
    from torch.nn.modules.dropout import _DropoutNd

    return [m for m in network.modules() if isinstance(m, _DropoutNd) and float(m.p) > 0.0]


def enable_mc_dropout(network) -> int:
    """Put the dropout layers of ``network`` (already in eval mode) into training mode, so each
    forward pass draws new masks; normalisation layers stay in inference mode. Returns their count."""
    mods = dropout_modules(network)
    for m in mods:
        m.train()
    return len(mods)


# --------------------------------------------------------------------------------------------
# the members
# --------------------------------------------------------------------------------------------
def tta_members(model, bases) -> list:
    """One member per mirroring combination of each base member's checkpoint's allowed axes."""
    from .model_folder import Member

    out = []
    for b in bases:
        axes = checkpoint_info(b.checkpoint)["mirror_axes"]
        if not axes:
            raise ModelFolderError(f"{b.checkpoint} allows no mirroring (inference_allowed_mirroring_axes is "
                                   f"{axes!r}: the model was trained without mirroring), so test-time "
                                   "augmentation has no members; use --ensemble dropout (if the network has "
                                   "dropout) or deep")
        for f in mirror_combinations(axes):
            out.append(Member(b.fold, b.checkpoint, f"{b.name}/{flip_label(f)}", flip=f))
    return out


def dropout_members(model, bases, passes: int | None) -> list:
    """``passes`` MC-dropout members of each base member; refused (ModelFolderError) when the
    plans build no dropout layer."""
    from .model_folder import Member

    passes = DEFAULT_PASSES if passes is None else int(passes)
    if passes < 2:
        raise ModelFolderError(f"--passes must be at least 2 for an MC-dropout ensemble, got {passes}")
    configuration = model.configuration or checkpoint_info(bases[0].checkpoint)["configuration"]
    if configuration is None:
        raise ModelFolderError(f"cannot tell the configuration of {model.path} (folder name and checkpoint "
                               "do not say it)")
    op, p = plans_dropout(model.plans, configuration)
    if op is None or p <= 0.0:
        raise ModelFolderError(f"the network of {model.path.name} ({configuration}) has no dropout layers "
                               f"(plans.json arch_kwargs dropout_op is {op!r}"
                               f"{'' if op is None else f', p = {p}'}), so MC-dropout passes would all be "
                               "equal; use --ensemble tta for a single model, or a model trained with dropout")
    return [Member(b.fold, b.checkpoint, f"{b.name}/dropout_{i}", dropout_pass=i)
            for b in bases for i in range(1, passes + 1)]
