"""Ensemble member outputs on disk, computed from an nnU-Net v2 model folder and reused.

The commands that fit and evaluate calibration (``fit-temperature``, ``evaluate``) read member
folders in nnU-Net ``--save_probabilities`` layout (``io.nnunet_outputs``). This module writes
such folders from a trained model folder and raw images, member by member
(``nnunet.inference.EnsemblePredictor``: nnU-Net's preprocessing, each member's sliding-window
logits, nnU-Net's export to softmax probabilities p_m on the input grid), so the same readers
serve both ways in. Every member folder also holds the model's ``plans.json`` and ``dataset.json``
(as ``nnUNetv2_predict`` writes them), so its prediction-folder fingerprint
(``calibration.fingerprint.fingerprint_prediction_folder``) matches the model's plans.

Two writers:

- ``write_members`` (the demo's): one folder per member under ``out_root``; a folder is complete
  when its ``.calibu_member.json`` names the same checkpoint hash, cases and TTA setting, and is
  rewritten whole otherwise.
- ``cached_member_dirs`` (the commands' ``--model`` input): a cache that grows case by case and is
  reused across runs. Layout::

      <cache_dir>/<model folder name>-<12 hex of the model fingerprint>/<tta|notta>/<member>/
          plans.json  dataset.json  <case>.npz  <case>.pkl  .calibu_member.json

  The model key hashes plans.json, dataset.json and every checkpoint (``fingerprint_model_folder``),
  so another model, or the same folder retrained, never reads these outputs. Inside, a member's
  ``.calibu_member.json`` records its checkpoint's sha256, TTA, the sliding-window step, the
  member's variant (a TTA member's flip, an MC-dropout pass), for a cascade its low-resolution
  stage's hash, and per
  case the sha256 of the input image file(s) it was computed from. A (member, case) output is
  reused only when all of these match and its files exist; anything else is recomputed. The
  record is updated after each case, so an interrupted run keeps the cases it finished, and a
  case's files are written atomically before the record names them.

The device is not part of the key: CUDA and the CPU give the same probabilities up to
floating-point rounding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..progress import emit_progress
from .model_folder import DEFAULT_CHECKPOINT, Member, ModelFolder

log = logging.getLogger(__name__)

MARKER = ".calibu_member.json"
CACHE_FORMAT = "calib-uncertainty-member-cache"
CACHE_VERSION = 1
DEFAULT_TILE_STEP = 0.5


def member_dir_name(member: Member) -> str:
    """Folder name of a member: its name with '/' replaced (``fold_0_checkpoint_final``)."""
    return member.name.replace("/", "_")


# --------------------------------------------------------------------------------------------
# the demo's writer (whole folders)
# --------------------------------------------------------------------------------------------
def write_members(model_dir: Path, ensemble: str, cases: dict, out_root: Path, device: str, tta: bool,
                  folds=None) -> list[Path]:
    """Each member's probabilities for ``cases`` ({case: [channel files]}) into ``out_root/<member>/``.

    A member folder is complete when its ``.calibu_member.json`` names the same checkpoint hash,
    cases and TTA setting; complete folders are kept, the others (re)written.
    """
    from ..calibration.fingerprint import sha256_file
    from ..io.atomic import write_json
    from ..io.nnunet_outputs import write_member_probs
    from .inference import EnsemblePredictor

    model = ModelFolder.open(model_dir)
    members = model.members(ensemble, folds)
    dirs, todo = [], []
    for i, m in enumerate(members):
        d = out_root / member_dir_name(m)
        want = {"checkpoint": str(m.checkpoint), "sha256": sha256_file(m.checkpoint), "cases": sorted(cases),
                "tta": bool(tta)}
        try:
            have = json.loads((d / MARKER).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            have = None
        dirs.append(d)
        if have != want:
            todo.append((i, d, want))
    if not todo:
        return dirs
    predictor = EnsemblePredictor(model, [members[i] for i, _, _ in todo], device=device, tta=tta)
    for _, d, _ in todo:
        (d / MARKER).unlink(missing_ok=True)
        d.mkdir(parents=True, exist_ok=True)
        for name in ("plans.json", "dataset.json"):  # as nnUNetv2_predict does: the model's files
            shutil.copyfile(model.path / name, d / name)
    for n_done, (case_id, files) in enumerate(sorted(cases.items())):
        case = predictor.prepare(files, case_id)
        for pred in predictor.iter_members(case, progress=None):
            write_member_probs(todo[pred.index][1], case_id, pred.probabilities, case.geometry)
        emit_progress("demo", None, case=case_id, message=f"{ensemble} members {n_done + 1}/{len(cases)}")
    for _, d, want in todo:
        write_json(d / MARKER, want)
    return dirs


# --------------------------------------------------------------------------------------------
# the commands' cache (case by case, reused across runs)
# --------------------------------------------------------------------------------------------
@dataclass
class CachedMembers:
    """What ``cached_member_dirs`` returns.

    ``member_dirs``: one folder per member, in the ensemble's order (give them to
    ``io.nnunet_outputs.pair_cases`` with ``cases``). ``fingerprint``: the model folder's
    fingerprint (plans, dataset.json, every checkpoint) to record in / check against a
    calibration file. ``computed`` / ``reused``: (member, case) outputs predicted in this call
    and taken from the cache.
    """

    model: ModelFolder
    members: list[Member]
    member_dirs: list[Path]
    cases: list[str]
    fingerprint: dict
    cache_root: Path
    computed: list[tuple[str, str]] = field(default_factory=list)
    reused: list[tuple[str, str]] = field(default_factory=list)
    device: str | None = None

    def record(self) -> dict:
        """JSON-able description for reports (model, members, cache, what was computed)."""
        return {"model_folder": str(self.model.path), "members": [m.name for m in self.members],
                "member_dirs": [str(d) for d in self.member_dirs], "member_cache": str(self.cache_root),
                "n_computed": len(self.computed), "n_reused": len(self.reused), "device": self.device}


def model_cache_key(model: ModelFolder, fingerprint: dict) -> str:
    """``<model folder name>-<12 hex>``: the hex hashes the fingerprint's plans/dataset and checkpoint components."""
    h = hashlib.sha256()
    for key in ("plans_dataset_sha256", "checkpoints_sha256"):
        h.update(f"{key}={fingerprint.get(key)}\n".encode())
    return f"{model.path.name}-{h.hexdigest()[:12]}"


def inputs_sha256(files) -> str:
    """sha256 over the sha256 of each channel file, in channel order (what a cached case was made from)."""
    from ..calibration.fingerprint import sha256_file

    return hashlib.sha256("\n".join(sha256_file(f) for f in files).encode()).hexdigest()


def _read_marker(d: Path) -> dict | None:
    try:
        obj = json.loads((d / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def recorded_tta(member_dirs) -> bool | None:
    """The TTA setting the member folders were computed with, from their ``.calibu_member.json``
    (member cache or the demo's writer); None when a folder has no marker (e.g. written by
    ``nnUNetv2_predict``) or the folders disagree."""
    values = set()
    for d in member_dirs:
        marker = _read_marker(Path(d))
        if marker is None or not isinstance(marker.get("tta"), bool):
            return None
        values.add(marker["tta"])
    return values.pop() if len(values) == 1 else None


def _write_if_changed(path: Path, data: bytes) -> None:
    from ..io.atomic import atomic_path

    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def select_cases(images_dir, model: ModelFolder, cases=None) -> dict[str, list[Path]]:
    """{case: channel files} of the images in ``images_dir`` for ``model``, restricted to ``cases``
    (in that order; each must have an image, else InputError)."""
    from .inference import collect_cases

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"images folder not found: {images_dir} (--images must be an nnU-Net raw images "
                         "folder with <case>_0000.nii.gz files)")
    found = collect_cases(images_dir, model.n_channels, model.file_ending)
    if not cases:
        return found
    wanted = list(dict.fromkeys(cases))
    missing = [c for c in wanted if c not in found]
    if missing:
        raise InputError(f"case(s) {', '.join(missing)} have no image in {images_dir} (expected "
                         f"{missing[0]}_0000{model.file_ending}); cases there: {', '.join(sorted(found)[:8])}"
                         f"{' ...' if len(found) > 8 else ''}")
    return {c: found[c] for c in wanted}


def cached_member_dirs(model_dir, ensemble: str, folds, images_dir, cache_dir, device: str = "auto",
                       tta: bool = True, cases=None, checkpoint: str = DEFAULT_CHECKPOINT,
                       tile_step_size: float = DEFAULT_TILE_STEP, fingerprint: dict | None = None,
                       executor=None, passes: int | None = None) -> CachedMembers:
    """Member folders holding every member's probabilities for the images in ``images_dir``.

    ``ensemble``/``folds``/``checkpoint``/``passes`` choose the members (``ModelFolder.members``;
    a TTA or MC-dropout member's flip / pass is part of its cache key); ``cases``
    restricts to those case ids (each must have an image; default: every case in the folder).
    Outputs already in ``cache_dir`` for this model, checkpoint, TTA, step and input image are
    reused; the rest are predicted (the model is loaded only if something is missing) and added
    to the cache. Emits ``CALIBU_PROGRESS`` lines (stage "members") per predicted member and case.

    ``fingerprint``: ``fingerprint_model_folder(model_dir)`` when the caller already has it
    (saves hashing the checkpoints twice). ``executor``: ``cohort.executor.ExecutorOptions`` for the
    inference, one case per task (default local). Raises ModelFolderError (model folder or members),
    InputError (images or cases).
    """
    from ..calibration.fingerprint import fingerprint_model_folder

    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise InputError(f"member cache {cache_dir} is a file; give a folder (it is created if missing)")
    model = ModelFolder.open(model_dir)
    members = model.members(ensemble, folds, checkpoint, passes)
    selected = select_cases(images_dir, model, cases)
    fingerprint = fingerprint if fingerprint is not None else fingerprint_model_folder(model.path)
    root = Path(cache_dir) / model_cache_key(model, fingerprint) / ("tta" if tta else "notta")
    case_sha = {c: inputs_sha256(files) for c, files in selected.items()}

    from .cascade import previous_stage_key

    previous_stage = previous_stage_key(model)  # a cascade's outputs depend on its low-res stage too
    plans_bytes = {n: (model.path / n).read_bytes() for n in ("plans.json", "dataset.json")}
    dirs, markers, todo = [], [], {}  # todo: case -> [member index]
    out = CachedMembers(model, members, dirs, list(selected), fingerprint, root)
    for i, m in enumerate(members):
        d = root / member_dir_name(m)
        rel = m.checkpoint.relative_to(model.path).as_posix()
        key = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "checkpoint": rel,
               "sha256": fingerprint["checkpoints"][rel], "tta": bool(tta), "tile_step_size": float(tile_step_size)}
        if m.variant is not None:  # one mirrored prediction / one dropout pass of the checkpoint
            key["variant"] = m.variant
        if previous_stage is not None:
            key["previous_stage"] = previous_stage
        have = _read_marker(d)
        if have is not None and all(have.get(k) == v for k, v in key.items()) and isinstance(have.get("cases"), dict):
            done = dict(have["cases"])
        else:
            done = {}
            if d.is_dir():  # outputs of another checkpoint or setting: not trustworthy, removed
                for p in [*d.glob("*.npz"), *d.glob("*.pkl")]:
                    p.unlink()
        d.mkdir(parents=True, exist_ok=True)
        for name, data in plans_bytes.items():
            _write_if_changed(d / name, data)
        marker = {**key, "model_folder": str(model.path), "member": m.name, "cases": done}
        for c in selected:
            if done.get(c) == case_sha[c] and (d / f"{c}.npz").is_file() and (d / f"{c}.pkl").is_file():
                out.reused.append((m.name, c))
            else:
                done.pop(c, None)
                todo.setdefault(c, []).append(i)
        _save_marker(d, marker)
        dirs.append(d)
        markers.append(marker)

    n_todo = sum(len(v) for v in todo.values())
    if out.reused:
        log.info("member cache %s: reusing %d of %d member output(s)", root, len(out.reused),
                 len(out.reused) + n_todo)
    if n_todo:
        out.device = _predict_into(model, members, todo, selected, case_sha, dirs, markers, device, tta,
                                   tile_step_size, out, executor)
    emit_progress("members", 1.0, n_members=len(members),
                  message=f"{len(out.computed)} computed, {len(out.reused)} reused")
    return out


def _save_marker(d: Path, marker: dict) -> None:
    from ..io.atomic import write_json

    write_json(d / MARKER, marker)


@dataclass
class _MembersJob:
    """What every case of the cache's inference shares (sent once to each Ray worker)."""

    model_dir: Path
    members: list           # the members to load (those with a missing output)
    dirs: list              # member index (within ``members``) -> cache folder
    device: str
    tta: bool
    tile_step_size: float


_PREDICTORS: dict = {}


def _job_predictor(job: _MembersJob):
    """This process's predictor for the job's members (loaded once per process)."""
    from .inference import EnsemblePredictor

    key = (str(job.model_dir), tuple(m.checkpoint for m in job.members), job.device, job.tta, job.tile_step_size)
    if key not in _PREDICTORS:
        _PREDICTORS.clear()
        _PREDICTORS[key] = EnsemblePredictor(ModelFolder.open(job.model_dir), job.members, device=job.device,
                                             tta=job.tta, tile_step_size=job.tile_step_size)
    return _PREDICTORS[key]


def predict_case_members(job: _MembersJob, item) -> dict:
    """The per-case function (local loop or Ray task): the missing members' outputs of one case
    ``(case_id, channel files, [slots within job.members])``, each written atomically into its folder."""
    from ..io.nnunet_outputs import write_member_probs

    case_id, files, slots = item
    predictor = _job_predictor(job)
    emit_progress("preprocess", None, case=case_id, message="nnU-Net preprocessing (crop, resample)")
    case = predictor.prepare(files, case_id)
    from .inference_estimate import announce_estimate

    est = announce_estimate(predictor, case, [job.members[j] for j in slots])
    inference_s = 0.0
    for j in slots:
        emit_progress("members", None, case=case_id, member=j + 1, n_members=len(job.members),
                      message=job.members[j].name)
        t0 = time.perf_counter()
        logits = predictor.member_logits(case, j)
        inference_s += time.perf_counter() - t0
        probs = predictor.logits_to_probabilities(logits, case)
        del logits
        write_member_probs(job.dirs[j], case_id, probs, case.geometry)
        del probs
    if est is not None and inference_s > 0:  # the next case's estimate uses this device's measured time
        from .inference_estimate import record_pass_time

        record_pass_time(predictor, inference_s / max(est.n_network_passes, 1))
    return {"case": case_id, "slots": list(slots), "device": predictor.device_name}


def _predict_into(model, members, todo, selected, case_sha, dirs, markers, device, tta, tile_step_size,
                  out: CachedMembers, executor=None) -> str:
    """Predict the missing (member, case) outputs into their folders, one case per task of
    ``executor`` (``cohort.executor.run_cohort``: local loop or Ray; on Ray a case asks for a GPU
    where the cluster has one). Each member's marker records a case once its output is written
    (after each finished case, in this process). Returns the device used. A case that fails
    raises (after the others ran): fitting and evaluation need every case."""
    from ..cohort.executor import TaskResources, run_cohort

    needed = sorted({i for idx in todo.values() for i in idx})
    slot = {i: j for j, i in enumerate(needed)}  # member index -> index inside the job's members
    job = _MembersJob(model.path, [members[i] for i in needed], [dirs[i] for i in needed], device, tta,
                      tile_step_size)
    items = [(c, (c, list(selected[c]), [slot[i] for i in todo[c]])) for c in selected if c in todo]
    devices = []

    def record(case_id, value):
        for j in value["slots"]:
            i = needed[j]
            markers[i]["cases"][case_id] = case_sha[case_id]
            _save_marker(dirs[i], markers[i])
            out.computed.append((members[i].name, case_id))
        devices.append(value["device"])

    try:
        result = run_cohort(predict_case_members, job, items, executor, desc="members",
                            resources=TaskResources(num_cpus=1, gpu_if_available=True), on_done=record)
    finally:
        _PREDICTORS.clear()
    if result.failed:
        raise result.error(resumable=True)
    return devices[0] if len(set(devices)) == 1 else ", ".join(sorted(set(devices)))
