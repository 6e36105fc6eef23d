"""Members of a model folder a user has, for the OpenKBP benches' ``--model-folder`` mode.

The benches that measure calibration, guarantees and triage on real CT (``openkbp_local.py``,
``conformal_openkbp.py``, ``triage_openkbp.py``) can read the members of any trained nnU-Net v2
model folder instead of training their own tiny models. The members are computed by the product's
own path, ``nnunet.member_cache.cached_member_dirs`` (what ``fit-temperature`` / ``evaluate --model
... --member-cache DIR`` run: nnU-Net's preprocessing, each fold's sliding window, nnU-Net's export
to probabilities on the CT's grid), into a member cache that every bench and every rerun reuses
(keyed by the model's fingerprint, the member, TTA, the sliding-window step and each input's
sha256). Options (``add_model_arguments``):

- ``--model-folder``: the ``<Trainer>__<Plans>__<configuration>`` folder;
- ``--cases``: the held-out case ids (or a JSON list file); default: ``calibration_cases.json``
  beside the model folder (the shared stock model names its 25 cases no fold trained on there);
- ``--member-cache``: the cache folder (default ``/tmp/calibu_member_cache``);
- ``--ood``: out-of-distribution CT file(s), predicted too (case id = file name without
  ``.nii.gz`` and ``_0000``);
- ``--tta`` (default off: nnU-Net's mirroring multiplies CPU time by the number of mirrorings),
  ``--device`` (default cpu), ``--model-folds`` (default all: the deep ensemble; "single" = its first).

Splits (``random_splits``, ``shifted_split``): repeated random calibration / test splits of the
held-out cases, and a *shifted* split that calibrates on the lowest case ids and tests on the
highest (patients from another part of the cohort, as a new site brings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DEFAULT_CACHE = Path("/tmp/calibu_member_cache")


def add_model_arguments(p, required: bool = False) -> None:
    g = p.add_argument_group("a model folder a user has (instead of training the bench's own models)")
    g.add_argument("--model-folder", type=Path, required=required,
                   help="trained nnU-Net v2 model folder (<Trainer>__<Plans>__<configuration>, fold_k/ inside)")
    g.add_argument("--cases", nargs="+", default=None,
                   help="held-out case ids, or one JSON file listing them (default: calibration_cases.json "
                        "beside the model folder)")
    g.add_argument("--member-cache", type=Path, default=DEFAULT_CACHE,
                   help=f"member cache folder (the product's --member-cache; default {DEFAULT_CACHE})")
    g.add_argument("--model-folds", type=int, nargs="+", default=None,
                   help="folds of the deep ensemble (default all; 'single' = the first)")
    have = p._option_string_actions  # a bench that has its own --tta / --device keeps it
    if "--tta" not in have:
        g.add_argument("--tta", action="store_true", help="nnU-Net's mirroring TTA inside each member (default off)")
    if "--device" not in have:
        g.add_argument("--device", default="cpu", help="inference device for missing members (default cpu)")


def model_cases(args) -> list[str]:
    """The held-out case ids: ``--cases`` (ids or one JSON list file) or ``calibration_cases.json``
    beside the model folder."""
    from CalibUncertaintyLib.errors import InputError

    if args.cases:
        if len(args.cases) == 1 and args.cases[0].endswith(".json"):
            return list(json.loads(Path(args.cases[0]).read_text()))
        return list(args.cases)
    path = Path(args.model_folder).parent / "calibration_cases.json"
    if not path.is_file():
        raise InputError(f"no --cases given and no {path}: name the held-out cases (ids or a JSON list file)")
    return list(json.loads(path.read_text()))


def ood_id(path: Path) -> str:
    name = Path(path).name
    for end in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(end):
            name = name[: -len(end)]
            break
    return name[:-5] if name.endswith("_0000") else name


def link_ood_images(ood_files, folder: Path) -> dict:
    """``folder/<id>_0000.nii.gz`` links to each OOD CT; {id: link}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for f in ood_files or []:
        f = Path(f).resolve()
        link = folder / f"{ood_id(f)}_0000.nii.gz"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f)
        out[ood_id(f)] = link
    return out


def model_members(args, images_dir: Path, cases: list[str], ood_files=(), work: Path | None = None) -> dict:
    """Member folders of the deep ensemble for ``cases`` (images in ``images_dir``) and the OOD CTs,
    computed into / reused from ``args.member_cache``. Returns {"deep": [dirs], "single": [first dir],
    "record": {...}, "ood_ids": [...], "ood_images": folder}."""
    import time

    from CalibUncertaintyLib.nnunet.member_cache import cached_member_dirs

    t0 = time.time()
    common = dict(device=getattr(args, "device", "cpu"), tta=bool(args.tta))
    cm = cached_member_dirs(args.model_folder, "deep", args.model_folds, images_dir, args.member_cache, cases=cases,
                            **common)
    ood_ids, ood_dir = [], None
    if ood_files:
        ood_dir = (work or Path(args.member_cache)) / "ood_images"
        linked = link_ood_images(ood_files, ood_dir)
        co = cached_member_dirs(args.model_folder, "deep", args.model_folds, ood_dir, args.member_cache,
                                cases=list(linked), fingerprint=cm.fingerprint, **common)
        if [str(d) for d in co.member_dirs] != [str(d) for d in cm.member_dirs]:
            raise RuntimeError("the OOD members landed in other member folders than the cases'")
        ood_ids = list(linked)
        cm.computed += co.computed
        cm.reused += co.reused
    rec = {**cm.record(), "tta": bool(args.tta), "cases": cases, "ood": ood_ids,
           "seconds": round(time.time() - t0, 1)}
    return {"deep": list(cm.member_dirs), "single": list(cm.member_dirs[:1]), "record": rec, "ood_ids": ood_ids,
            "ood_images": ood_dir}


def random_splits(cases: list[str], n_cal: int, n_splits: int, seed: int) -> list[dict]:
    """``n_splits`` random calibration / test splits of ``cases`` (``n_cal`` calibration cases, the
    rest test), from ``numpy.random.default_rng(seed)``; each part sorted."""
    from CalibUncertaintyLib.errors import InputError

    if not 0 < n_cal < len(cases):
        raise InputError(f"--n-cal {n_cal} must leave at least one of the {len(cases)} cases for testing")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_splits):
        perm = rng.permutation(len(cases))
        out.append({"calibration": sorted(cases[i] for i in perm[:n_cal]),
                    "test": sorted(cases[i] for i in perm[n_cal:])})
    return out


def shifted_split(cases: list[str], n_cal: int) -> dict:
    """Calibrate on the ``n_cal`` lowest case ids, test on the rest (another part of the cohort)."""
    order = sorted(cases)
    return {"calibration": order[:n_cal], "test": order[n_cal:], "rule": f"calibration = the {n_cal} lowest case ids"}


def machine() -> str:
    import platform

    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), {platform.platform()}; load average "
            + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end")
