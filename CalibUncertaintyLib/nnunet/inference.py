"""Per-member nnU-Net v2 inference: each member's softmax probabilities in the input image's grid.

nnU-Net's own predictor averages the logits of all folds before anyone sees them, so it cannot
give per-member uncertainty (METHODS.md section 1 needs every p_m). ``EnsemblePredictor`` runs the
members one at a time through nnU-Net's own machinery and yields each member's probabilities:

1. the image is read and preprocessed once with the configuration's preprocessor
   (``DefaultPreprocessor.run_case``: transpose, crop to the non-zero box, normalise, resample to
   the plans' spacing), exactly as ``nnUNetPredictor`` does;
2. ONE network instance is built from the plans; for member m its checkpoint's weights are loaded
   into it and ``sliding_window.sliding_window_logits`` gives the member's logits z_m by nnU-Net's
   scheme (Gaussian-weighted tiles, optional mirroring test-time augmentation, fp16
   accumulation): the same numbers as ``nnUNetPredictor.predict_sliding_window_return_logits``;
3. z_m goes through the steps of nnU-Net's export
   (``convert_predicted_logits_to_segmentation_with_correct_shape``): logits resampled to the
   original spacing with the configuration's resampling function, softmax p_m = softmax(z_m),
   re-inserted into the crop box with background probability 1 outside it, transposed back
   (``logits_to_probabilities``, arranged to hold less memory at once). p_m is (K, z, y, x)
   float32 on the input's exact voxel grid, the layout of nnU-Net's ``--save_probabilities`` npz.

Hence a one-member run reproduces nnU-Net's probabilities and segmentation for that fold, and the
mean of the members' logits is what ``nnUNetPredictor.predict_logits_from_preprocessed_data``
computes. Members are yielded one by one and nothing of a finished member is kept, so peak memory
does not grow with the number of members M (feed them to ``EnsembleAccumulator``).

The network is built from the plans (``get_network_from_plans``, what ``nnUNetTrainer`` does), not
through nnU-Net's trainer discovery, so checkpoints of trainers that live outside the nnunetv2
package (this project's snapshot trainer) load too, and nothing imports torchvision.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError, ModelFolderError
from ..io.geometry import Geometry
from ..progress import emit_progress
from .model_folder import Member, ModelFolder

log = logging.getLogger(__name__)

#: readers whose arrays are SimpleITK's (z, y, x) with the geometry kept in ``sitk_stuff``
SUPPORTED_READERS = ("SimpleITKIO",)
#: spacing ratio (image / plans, either way) above which a warning is logged
SPACING_WARN_RATIO = 2.0
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl.gz", ".gipl")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# --------------------------------------------------------------------------------------------
# input discovery
# --------------------------------------------------------------------------------------------
def split_image_name(name: str) -> tuple[str, int | None, str]:
    """``"case_0001.nii.gz"`` -> ``("case", 1, ".nii.gz")``; no channel suffix -> channel None.

    Raises InputError for a name without a known image extension."""
    lower = name.lower()
    for ending in IMAGE_ENDINGS:
        if lower.endswith(ending):
            stem, ext = name[: -len(ending)], name[-len(ending):]
            m = _CHANNEL_SUFFIX.match(stem)
            if m:
                return m.group("case"), int(m.group("channel")), ext
            return stem, None, ext
    raise InputError(f"{name}: not an image file this tool reads (expected one of {', '.join(IMAGE_ENDINGS)})")


def collect_cases(input_path, n_channels: int = 1, file_ending: str | None = None) -> dict[str, list[Path]]:
    """Map case id -> channel files (channel order) for a single image file or an nnU-Net raw folder.

    A file ``<case>_0000.nii.gz`` gives case ``<case>``; for a model with several channels its
    siblings ``<case>_0001...`` are taken from the same folder. A file without the ``_XXXX``
    suffix is a one-channel case named after the file. A folder is read as nnU-Net's
    ``imagesTs`` layout (``<case>_<XXXX><file_ending>``); its files without a suffix are
    one-channel cases too. Raises InputError (nothing to read) or ModelFolderError (channel
    files missing or extra for the model's channel count).
    """
    path = Path(input_path).expanduser()
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_file():
        case, channel, ext = split_image_name(path.name)
        if channel is None:
            if n_channels != 1:
                raise ModelFolderError(f"{path.name} is one image (1 channel) but the model expects {n_channels} "
                                       f"channels: name the files {case}_0000{ext} ... {case}_{n_channels - 1:04d}{ext}")
            return {case: [path]}
        files = [path.parent / f"{case}_{c:04d}{ext}" for c in range(n_channels)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFolderError(f"case {case}: the model expects {n_channels} channel(s) "
                                   f"but {', '.join(missing)} not found next to {path.name}")
        return {case: files}
    if not path.is_dir():
        raise InputError(f"{path} is neither an image file nor a folder")
    groups: dict[str, dict[int | None, Path]] = {}
    entries = [f for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")]
    # when the folder holds images with the model's file ending, other formats are ignored
    only = file_ending.lower() if file_ending and any(f.name.lower().endswith(file_ending.lower())
                                                      for f in entries) else None
    for f in entries:
        try:
            case, channel, ext = split_image_name(f.name)
        except InputError:
            continue
        if only is not None and ext.lower() != only:
            continue
        chans = groups.setdefault(case, {})
        if channel in chans:
            raise InputError(f"case {case} has two files for channel {channel}: {chans[channel].name}, {f.name}")
        chans[channel] = f
    if not groups:
        raise InputError(f"no images found in {path} (expected nnU-Net raw names like "
                         f"<case>_0000{file_ending or '.nii.gz'})")
    cases = {}
    for case, chans in sorted(groups.items()):
        if None in chans:
            if len(chans) > 1:
                raise InputError(f"case {case}: both {chans[None].name} and channel-suffixed files exist")
            if n_channels != 1:
                raise ModelFolderError(f"case {case}: {chans[None].name} is one channel but the model expects "
                                       f"{n_channels} (<case>_0000 ... <case>_{n_channels - 1:04d})")
            cases[case] = [chans[None]]
            continue
        if sorted(chans) != list(range(n_channels)):
            raise ModelFolderError(f"case {case} has {len(chans)} channel file(s) (_{', _'.join(f'{c:04d}' for c in sorted(chans))}) "
                                   f"but the model expects {n_channels} (_0000 ... _{n_channels - 1:04d}, "
                                   "from dataset.json channel_names)")
        cases[case] = [chans[c] for c in range(n_channels)]
    return cases


def check_input_files(files: Sequence[Path]) -> Geometry:
    """Read the header of every channel file; return the geometry of channel 0.

    Raises InputError for unreadable, non-3-D or multi-component files and for channels that are
    not on the same voxel grid."""
    from ..io.images import read_header_geometry

    geometry = None
    for f in files:
        g = read_header_geometry(f)
        if geometry is None:
            geometry = g
        else:
            geometry.require_same(g, Path(files[0]).name, Path(f).name)
    return geometry


# --------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------
@dataclass
class PreparedCase:
    """One preprocessed case: nnU-Net's preprocessed tensor and what the export needs."""

    case_id: str
    files: list
    geometry: Geometry
    data: object            # torch.Tensor (C, ...) float32 in the plans' spacing, cropped
    properties: dict        # nnU-Net's data_properties (spacing, crop box, shapes, sitk_stuff)
    seconds: float = 0.0


@dataclass
class MemberPrediction:
    """One member's output. ``probabilities``: (K, z, y, x) float32 in the input geometry.
    ``logits``: the member's sliding-window logits in nnU-Net's preprocessed space (before
    resampling), float32, only when requested."""

    index: int
    member: Member
    probabilities: np.ndarray
    seconds: float
    logits: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def _load_checkpoint(path: Path) -> dict:
    import torch

    try:
        ckpt = torch.load(str(path), map_location=torch.device("cpu"), weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a bad file)
        raise ModelFolderError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); "
                               "the file is damaged or not an nnU-Net checkpoint") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ModelFolderError(f"{path} is not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt


class EnsemblePredictor:
    """Run the members of an nnU-Net v2 model folder one at a time on one image after another.

    ``device``: "auto" | "cuda" | "mps" | "cpu" (``device.resolve_device``: an unavailable
    request falls back to the CPU with a logged warning). ``tta``: nnU-Net's mirroring test-time
    augmentation over the axes the checkpoint allows. ``tile_step_size``: sliding-window step as a
    fraction of the patch (nnU-Net default 0.5).
    """

    def __init__(self, model: ModelFolder | str | Path, members: Sequence[Member], device: str = "auto",
                 tta: bool = True, tile_step_size: float = 0.5):
        import torch
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from ..device import resolve_device

        self.model = model if isinstance(model, ModelFolder) else ModelFolder.open(model)
        self.members = list(members)
        if not self.members:
            raise ModelFolderError("no ensemble members to run")
        self.tta = bool(tta)
        self.device = resolve_device(device)
        self.plans_manager = PlansManager(self.model.plans)
        reader = self.model.plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in SUPPORTED_READERS:
            raise ModelFolderError(
                f"this model reads images with {reader}; per-member prediction supports {', '.join(SUPPORTED_READERS)} "
                "(whose arrays and geometry match the input file). Run nnUNetv2_predict --save_probabilities per "
                "fold and use `calib-uncertainty maps` on its outputs instead")
        first = _load_checkpoint(self.members[0].checkpoint)
        self.configuration = str(first.get("init_args", {}).get("configuration") or self.model.configuration or "")
        if not self.configuration:
            raise ModelFolderError(f"{self.members[0].checkpoint} does not say its configuration and the folder name "
                                   f"{self.model.path.name} is not <Trainer>__<Plans>__<Configuration>")
        if self.model.configuration and self.model.configuration != self.configuration:
            log.warning("checkpoint %s was trained with configuration %s but the folder is named for %s; using %s "
                        "(as nnU-Net does)", self.members[0].checkpoint, self.configuration,
                        self.model.configuration, self.configuration)
        try:
            self.configuration_manager = self.plans_manager.get_configuration(self.configuration)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ModelFolderError(f"plans.json has no usable configuration {self.configuration!r}: {e}") from e
        self.trainer_name = str(first.get("trainer_name", self.model.trainer_name or "nnUNetTrainer"))
        #: a cascade's low-resolution stage (``cascade.LowResStage``), run first in ``prepare``
        self.previous_stage = None
        if self.configuration_manager.previous_stage_name is not None:
            from .cascade import LowResStage

            self.previous_stage = LowResStage(self.model, self.configuration_manager.previous_stage_name,
                                              self.trainer_name, device, tta, tile_step_size)
        self.label_manager = self.plans_manager.get_label_manager(self.model.dataset_json)
        #: region-based model: ``n_classes`` sigmoid outputs, one per region (bernoulli_regions)
        self.has_regions = bool(self.label_manager.has_regions)
        self.n_classes = self.label_manager.num_segmentation_heads
        self.network = self._build_network()
        if any(m.dropout_pass is not None for m in self.members):
            from .single_model_members import dropout_modules

            if not dropout_modules(self.network):
                raise ModelFolderError(f"the network of {self.model.path.name} has no dropout layers with p > 0, "
                                       "so MC-dropout passes would all be equal; use --ensemble tta for a single "
                                       "model, or a model trained with dropout")
        self._load_weights(first, self.members[0])
        self._loaded = 0
        del first

        self.tile_step_size = float(tile_step_size)
        self._torch = torch
        from ..uncertainty.backend import backend_for

        #: where each member is resampled, softmaxed and accumulated and the maps computed: on the
        #: model's device (torch) for CUDA / MPS, numpy on the CPU (``uncertainty.backend``)
        self.backend = backend_for(self.device)

    # --- network and weights -------------------------------------------------------------
    def _build_network(self):
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        cm = self.configuration_manager
        n_in = determine_num_input_channels(self.plans_manager, cm, self.model.dataset_json)
        try:
            return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                          cm.network_arch_init_kwargs_req_import, n_in, self.n_classes,
                                          allow_init=False, deep_supervision=False)
        except Exception as e:  # noqa: BLE001
            raise ModelFolderError(f"could not build the network {cm.network_arch_class_name} from plans.json "
                                   f"({type(e).__name__}: {e})") from e

    def _load_weights(self, ckpt: dict, member: Member) -> None:
        init = ckpt.get("init_args", {})
        if init.get("configuration") not in (None, self.configuration):
            raise ModelFolderError(f"{member.checkpoint} was trained with configuration {init.get('configuration')} "
                                   f"but the other members with {self.configuration}; members must share a network")
        try:
            self.network.load_state_dict(ckpt["network_weights"])
        except RuntimeError as e:
            first_line = str(e).strip().splitlines()[0]
            raise ModelFolderError(f"{member.checkpoint} (trainer {ckpt.get('trainer_name')}) does not fit the network "
                                   f"that plans.json describes: {first_line}. Trainers that change the architecture "
                                   "are not supported") from e
        self._mirror_axes = ckpt.get("inference_allowed_mirroring_axes")

    def _activate(self, index: int) -> None:
        # members of one network (TTA flips, dropout passes) share a checkpoint: loaded once
        if self._loaded != index and self.members[self._loaded].checkpoint != self.members[index].checkpoint:
            self._load_weights(_load_checkpoint(self.members[index].checkpoint), self.members[index])
        self._loaded = index

    # --- reading -------------------------------------------------------------------------
    def prepare(self, files: Sequence, case_id: str | None = None) -> PreparedCase:
        """Read and preprocess one case (channel files in channel order) with nnU-Net's
        preprocessor for this configuration. Warns when the image spacing is more than 2x away
        from the plans' target spacing along any axis."""
        import torch

        files = [Path(f) for f in files]
        self.model.check_channels(len(files), f"case {case_id or files[0].name}")
        geometry = check_input_files(files)
        case_id = case_id or split_image_name(files[0].name)[0]
        t0 = time.perf_counter()
        if self.previous_stage is not None:  # a cascade: the low-resolution stage first, as nnU-Net
            from .cascade import cascade_input

            data, props = cascade_input(self, files, self.previous_stage.segmentation(files, case_id))
            self._warn_spacing(case_id, props["spacing"])
            return PreparedCase(case_id, files, geometry, data, props, time.perf_counter() - t0)
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        with contextlib.redirect_stdout(io.StringIO()):
            data, _, props = preprocessor.run_case([str(f) for f in files], None, self.plans_manager,
                                                   self.configuration_manager, self.model.dataset_json)
        self._warn_spacing(case_id, props["spacing"])
        data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
        return PreparedCase(case_id, files, geometry, data, props, time.perf_counter() - t0)

    def _warn_spacing(self, case_id: str, spacing_zyx) -> None:
        tf = self.plans_manager.transpose_forward
        image = np.asarray([spacing_zyx[i] for i in tf], dtype=float)
        target = np.asarray(self.configuration_manager.spacing, dtype=float)
        if target.size < image.size:  # 2d configuration: slice spacing unchanged
            target = np.concatenate([image[:1], target])
        ratio = np.maximum(image / target, target / image)
        if np.any(ratio > SPACING_WARN_RATIO):
            log.warning("case %s: image spacing %s mm differs from the model's training spacing %s mm by more than "
                        "%.0fx along an axis (ratio %.1f); nnU-Net resamples it, but a model rarely works well that "
                        "far from the resolution it was trained on", case_id,
                        [round(float(s), 3) for s in image], [round(float(s), 3) for s in target],
                        SPACING_WARN_RATIO, float(ratio.max()))

    # --- per-member prediction -----------------------------------------------------------
    def member_logits(self, case: PreparedCase, index: int):
        """Sliding-window logits of member ``index`` in the preprocessed space (torch, fp16 as
        nnU-Net accumulates them): left on the device when the maps are computed there
        (``backend``), else on the CPU."""
        from nnunetv2.configuration import default_num_processes

        from .sliding_window import sliding_window_logits

        self._activate(index)
        member = self.members[index]
        torch = self._torch
        n_threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, n_threads))
        # a TTA member is one mirrored prediction; the other members use nnU-Net's TTA if asked
        mirror = None if member.flip is not None or not self.tta else self._mirror_axes
        try:
            with self._dropout_rng(member):
                logits = sliding_window_logits(self.network, case.data, self.configuration_manager.patch_size,
                                               self.n_classes, self.device, self.tile_step_size, mirror,
                                               flip=member.flip, mc_dropout=member.dropout_pass is not None)
            if not self.backend.is_torch:
                logits = logits.to("cpu")
        finally:
            torch.set_num_threads(n_threads)
        return logits

    def _dropout_rng(self, member: Member):
        """For an MC-dropout member: the RNG seeded for its pass (forked, so the caller's RNG
        state is untouched); otherwise nothing."""
        if member.dropout_pass is None:
            return contextlib.nullcontext()
        from .single_model_members import pass_seed

        torch = self._torch
        kwargs = {"devices": [self.device], "device_type": "cuda"} if self.device.type == "cuda" else {"devices": []}
        ctx = torch.random.fork_rng(**kwargs)
        seed = pass_seed(member.dropout_pass)

        @contextlib.contextmanager
        def seeded():
            with ctx:
                torch.manual_seed(seed)
                yield

        return seeded()

    def member_probabilities(self, logits, case: PreparedCase):
        """nnU-Net's export of one member's logits, computed slab by slab on demand: a
        ``MemberProbabilities`` ((K, z, y, x) float32 in ``case.geometry``; ``np.asarray`` or
        ``to_array()`` gives the volume, ``EnsembleAccumulator.add`` reads it slab by slab).
        Falls back to nnU-Net's own export (an array) if its crop box does not fit the image."""
        from .member_probabilities import MemberProbabilities, crop_box_fits

        if not crop_box_fits(case.properties, case.geometry.shape_zyx, self.plans_manager.transpose_forward):
            return self._nnunet_export(logits.to("cpu") if hasattr(logits, "to") else logits, case)
        return MemberProbabilities(logits, self.plans_manager, self.configuration_manager, self.label_manager,
                                   case.properties, case.geometry.shape_zyx, backend=self.backend)

    def logits_to_probabilities(self, logits, case: PreparedCase) -> np.ndarray:
        """nnU-Net's export: resample logits to the original spacing, softmax, reinsert into the
        crop box (background 1 outside), transpose back -> (K, z, y, x) float32 in ``case.geometry``
        (``member_probabilities`` as one array)."""
        probs = self.member_probabilities(logits, case)
        return probs if isinstance(probs, np.ndarray) else probs.to_array()

    def _nnunet_export(self, logits, case: PreparedCase) -> np.ndarray:
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, case.properties,
            return_probabilities=True)
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        if tuple(probs.shape[1:]) != case.geometry.shape_zyx:
            raise RuntimeError(f"internal error: probabilities {probs.shape} do not match the image "
                               f"{case.geometry.shape_zyx}")
        return probs

    def iter_members(self, case: PreparedCase, keep_logits: bool = False,
                     progress: tuple[float, float] | None = (0.0, 1.0), lazy: bool = False) -> Iterator[MemberPrediction]:
        """Yield each member's prediction in turn (peak memory: one member at a time).

        ``lazy``: ``probabilities`` is a ``MemberProbabilities`` computed slab by slab when read
        (feed it to ``EnsembleAccumulator.add`` straight away, before asking for the next member),
        not a full array. Emits a progress line (stage "inference", member numbered 1..M) as each
        member starts and one when the last is done; ``progress`` maps this case onto an overall
        (start, end) fraction, None to stay silent."""
        n = len(self.members)
        for i, member in enumerate(self.members):
            if progress is not None:
                lo, hi = progress
                emit_progress("inference", lo + (hi - lo) * i / n, case=case.case_id, member=i + 1,
                              n_members=n, message=member.name, span_end=lo + (hi - lo) * (i + 1) / n)
            t0 = time.perf_counter()
            kept = None
            if keep_logits:
                logits = self.member_logits(case, i)
                kept = logits.float().cpu().numpy()
                probs = self.member_probabilities(logits, case)
                del logits
            else:  # no reference here: resampled logits replace the sliding window's
                probs = self.member_probabilities(self.member_logits(case, i), case)
            if not lazy and not isinstance(probs, np.ndarray):
                probs = probs.to_array()
            seconds = time.perf_counter() - t0
            log.info("case %s: member %d/%d (%s) in %.1f s", case.case_id, i + 1, n, member.name, seconds)
            yield MemberPrediction(i, member, probs, seconds, kept)
            del probs, kept
        if progress is not None:
            emit_progress("inference", progress[1], case=case.case_id, member=n, n_members=n, message="done")

    def iter_probabilities(self, case: PreparedCase, progress=(0.0, 1.0)) -> Iterator[np.ndarray]:
        """Just the probability volumes, for ``pipeline.case.process_case(members=...)``."""
        for pred in self.iter_members(case, progress=progress):
            probs = pred.probabilities
            del pred  # hold no member while the next one is predicted
            yield probs
            del probs

    @property
    def device_name(self) -> str:
        return str(self.device)
