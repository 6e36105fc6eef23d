"""How big and how long a case's inference will be, said before inference starts.

After nnU-Net's preprocessing the network's input size is known: the CT cropped to its non-zero box
and resampled to the plans' spacing. The sliding window then runs ``n_patches`` tiles per member
(``sliding_window.tile_slicers`` on the image padded to at least one patch) and every tile costs
``passes_per_patch`` network evaluations (2^k with nnU-Net's mirroring over k axes, 1 without it or
for a TTA member, which is one mirroring). The expected time is

    n_network_passes = Σ_members n_patches × passes_per_patch,   seconds ≈ n_network_passes × t_pass

with ``t_pass`` one forward pass of this network on this device: the time recorded by earlier runs
of the same network, patch size and device (``patch_times.json`` in the cache folder, refreshed with
each case's measured inference time per pass), else one pass on a blank patch timed now (the
estimate's ``source`` says which). The preprocessing, the export of every member to the image grid
and the maps come on top; the estimate covers the network passes, which dominate on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TIMES_FILE = "patch_times.json"


def cache_root() -> Path:
    """``$CALIBU_CACHE_DIR``, else ``$XDG_CACHE_HOME/calib-uncertainty`` (``~/.cache`` when unset)."""
    root = os.environ.get("CALIBU_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "calib-uncertainty"


@dataclass
class InferenceEstimate:
    """What ``estimate_inference`` found (module docstring). Shapes in nnU-Net's axis order."""

    case: str
    image_shape: list
    image_spacing: list
    network_shape: list
    network_spacing: list
    patch_size: list
    n_members: int
    n_patches: int
    n_network_passes: int
    seconds_per_pass: float
    source: str
    device: str

    @property
    def seconds(self) -> float:
        return self.n_network_passes * self.seconds_per_pass

    def describe(self) -> str:
        """One line for the person waiting."""
        from ..progress import format_duration as duration

        def size(shape):
            return "×".join(str(int(s)) for s in shape)

        def mm(sp):
            return "×".join(f"{float(s):g}" for s in sp)

        per_member = self.n_network_passes // max(self.n_members, 1)
        mirror = per_member // max(self.n_patches, 1)
        return (f"CT {size(self.image_shape)} voxels at {mm(self.image_spacing)} mm, resampled to "
                f"{size(self.network_shape)} at {mm(self.network_spacing)} mm for the network; "
                f"{self.n_patches} patch(es) of {size(self.patch_size)}"
                + (f" × {mirror} mirrorings" if mirror > 1 else "")
                + f" × {self.n_members} member(s) = {self.n_network_passes} network passes, about "
                f"{duration(self.seconds)} of inference on {self.device} ({self.seconds_per_pass:.3g} s per pass, "
                f"{self.source}); export and maps come on top")

    def record(self) -> dict:
        out = asdict(self)
        out["estimated_s"] = round(self.seconds, 2)
        return out


def passes_per_patch(predictor, member) -> int:
    """Network evaluations per tile for ``member`` (nnU-Net's mirroring: 2^k; else 1)."""
    axes = getattr(predictor, "_mirror_axes", None)
    if member.flip is not None or not predictor.tta or not axes:
        return 1
    return 2 ** len(tuple(axes))


def count_patches(network_shape, patch_size, step: float) -> int:
    """Tiles of the sliding window on an image of ``network_shape`` (padded to at least one patch)."""
    from .sliding_window import tile_slicers

    patch = [int(p) for p in patch_size]
    shape = [int(s) for s in network_shape]
    lead = len(shape) - len(patch)
    padded = shape[:lead] + [max(s, p) for s, p in zip(shape[lead:], patch)]
    return len(tile_slicers(padded, patch, step))


def _time_key(predictor) -> str:
    cm = predictor.configuration_manager
    torch = predictor._torch
    arch = json.dumps([cm.network_arch_class_name, cm.network_arch_init_kwargs, list(cm.patch_size),
                       predictor.n_classes], sort_keys=True, default=str)
    dev = predictor.device
    name = dev.type
    if dev.type == "cuda":
        try:
            name = f"cuda:{torch.cuda.get_device_name(dev)}"
        except Exception:  # noqa: BLE001
            pass
    threads = torch.get_num_threads() if dev.type == "cpu" else 0
    return f"{name}|threads={threads}|{hashlib.sha256(arch.encode()).hexdigest()[:16]}"


def _read_times() -> dict:
    try:
        data = json.loads((cache_root() / TIMES_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_pass_time(predictor, seconds_per_pass: float) -> None:
    """Remember this network's measured seconds per pass on this device (best effort)."""
    from ..io.atomic import write_json

    if not (seconds_per_pass and seconds_per_pass > 0):
        return
    times = _read_times()
    times[_time_key(predictor)] = {"seconds_per_pass": float(seconds_per_pass),
                                   "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / TIMES_FILE, times)
    except OSError as exc:  # a read-only home: the next run measures again
        log.debug("could not record the pass time: %s", exc)


def measure_pass(predictor, n_channels: int) -> float:
    """Seconds of one forward pass of the loaded network on a blank patch on its device."""
    from nnunetv2.configuration import default_num_processes

    torch = predictor._torch
    network = predictor.network.to(predictor.device)
    network.eval()
    x = torch.zeros((1, int(n_channels), *[int(p) for p in predictor.configuration_manager.patch_size]),
                    device=predictor.device)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(min(default_num_processes, n_threads))
    try:
        autocast = torch.autocast(predictor.device.type, enabled=True) if predictor.device.type == "cuda" else None
        with torch.inference_mode():
            if autocast is not None:
                with autocast:
                    t0 = time.perf_counter()
                    network(x)
                    torch.cuda.synchronize(predictor.device)
            else:
                t0 = time.perf_counter()
                network(x)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(n_threads)
        del x


def estimate_inference(predictor, case, members=None) -> InferenceEstimate:
    """The estimate for ``case`` (a ``PreparedCase``) with ``members`` (default: all of
    ``predictor``'s) (module docstring)."""
    members = list(predictor.members if members is None else members)
    cm = predictor.configuration_manager
    patch = [int(p) for p in cm.patch_size]
    shape = [int(s) for s in case.data.shape[1:]]
    n_patches = count_patches(shape, patch, predictor.tile_step_size)
    passes = sum(n_patches * passes_per_patch(predictor, m) for m in members)
    known = _read_times().get(_time_key(predictor))
    if isinstance(known, dict) and isinstance(known.get("seconds_per_pass"), (int, float)):
        t_pass, source = float(known["seconds_per_pass"]), "measured by earlier runs on this device"
    else:
        t_pass, source = measure_pass(predictor, case.data.shape[0]), "one pass timed just now"
    props = case.properties or {}
    tf = predictor.plans_manager.transpose_forward
    image_shape = [int(case.geometry.shape_zyx[i]) for i in tf]
    image_spacing = [float(props.get("spacing", case.geometry.spacing_zyx)[i]) for i in tf]
    network_spacing = [float(s) for s in cm.spacing]
    if len(network_spacing) < len(shape):  # a 2-D configuration keeps the slice spacing
        network_spacing = image_spacing[:1] + network_spacing
    return InferenceEstimate(case=case.case_id, image_shape=image_shape, image_spacing=image_spacing,
                             network_shape=shape, network_spacing=network_spacing, patch_size=patch,
                             n_members=len(members), n_patches=n_patches, n_network_passes=int(passes),
                             seconds_per_pass=float(t_pass), source=source, device=str(predictor.device))


def announce_estimate(predictor, case, members=None) -> InferenceEstimate | None:
    """``estimate_inference``, announced as a progress event (stage ``estimate``, message =
    ``describe()``) before inference starts; None if it cannot be made (never a reason to fail)."""
    from ..progress import emit_progress

    try:
        est = estimate_inference(predictor, case, members)
    except Exception as exc:  # noqa: BLE001  (an estimate is a courtesy)
        log.debug("no inference estimate for %s: %s", case.case_id, exc)
        return None
    emit_progress("estimate", 0.0, message=est.describe(), **est.record())
    return est
