"""Synthetic ensemble members in nnU-Net ``--save_probabilities`` layout, built from label maps.

Used by the tests and the demo where no trained model is at hand. Each member is a softmax of
per-class logits made from signed distances to the reference label, perturbed so the members
make errors, and deliberately over-confident so temperature scaling has something to fix:

- sd_c(x): signed distance in mm to the surface of class c (positive inside), clipped to
  +-``margin_mm``; background uses sd_0 = -max_{c>=1} sd_c (the signed distance to the union).
- perturbation per class: a smooth random field (Gaussian white noise smoothed with
  ``noise_sigma_mm``, scaled to unit standard deviation) times ``shared_noise_mm`` that is the
  same for every member of a case (the ensemble's common mistakes), plus a member-specific field
  times ``member_noise_mm`` and a member-specific translation of up to ``max_shift_mm`` per axis
  (members disagree).
- logits z_c = sharpen * (sd_c + noise_c) / scale_mm; probabilities softmax(z).

The default members share most of their error (the shared field) and differ only by a small
field and a sub-voxel shift: members that disagree a lot make p̄ take the discrete values
1/M, 2/M, ... at almost certain voxels, a pattern no single temperature can calibrate, whereas
real ensembles of one architecture mostly agree.

With ``sharpen`` > 1 the probabilities are sharper than the errors justify (a boundary error of
a few mm gets near-certain confidence), so a fitted temperature comes out > 1. Everything is
deterministic given ``seed`` and the case id (each case has its own random stream, so a case
gets the same members whichever other cases are generated with it). All distances are in mm.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..io.atomic import write_json
from ..io.geometry import Geometry
from ..io.images import read_image
from ..io.nnunet_outputs import (class_names_from_dataset, find_dataset_json, list_label_cases,
                                 read_dataset_json, write_member_probs)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberSpec:
    """Parameters of the synthetic members (distances in mm)."""

    sharpen: float = 4.0
    scale_mm: float = 2.0
    shared_noise_mm: float = 4.0
    member_noise_mm: float = 0.5
    noise_sigma_mm: float = 4.0
    max_shift_mm: float = 0.5
    margin_mm: float = 25.0

    def __post_init__(self):
        for name in ("sharpen", "scale_mm", "noise_sigma_mm", "margin_mm"):
            if not getattr(self, name) > 0:
                raise InputError(f"synthetic member parameter {name} must be > 0, got {getattr(self, name)}")
        for name in ("shared_noise_mm", "member_noise_mm", "max_shift_mm"):
            if getattr(self, name) < 0:
                raise InputError(f"synthetic member parameter {name} must be >= 0, got {getattr(self, name)}")


def _case_rng(seed: int, case: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(case.encode("utf-8"))])


def _crop_box(labels: np.ndarray, margin_vox: np.ndarray) -> tuple[slice, ...] | None:
    fg = np.nonzero(labels)
    if fg[0].size == 0:
        return None
    lo = [max(int(a.min()) - int(m), 0) for a, m in zip(fg, margin_vox)]
    hi = [min(int(a.max()) + 1 + int(m), s) for a, m, s in zip(fg, margin_vox, labels.shape)]
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _signed_distances(labels: np.ndarray, n_classes: int, spacing_zyx, margin_mm: float) -> np.ndarray:
    """(K, ...) float32 signed distances in mm (positive inside), clipped to +-margin_mm."""
    from scipy import ndimage

    sd = np.full((n_classes,) + labels.shape, -margin_mm, dtype=np.float32)
    for c in range(1, n_classes):
        mask = labels == c
        if not mask.any():
            continue
        d_in = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
        d_out = ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)
        sd[c] = np.clip(d_in - d_out, -margin_mm, margin_mm)
    sd[0] = -sd[1:].max(axis=0)
    return sd


def _smooth_field(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    std = float(f.std())
    return f / std if std > 0 else f


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=0, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=0, keepdims=True)
    return z


def member_probabilities(labels: np.ndarray, geometry: Geometry, n_classes: int, n_members: int,
                         case: str = "case", seed: int = 0,
                         spec: MemberSpec | None = None) -> Iterator[np.ndarray]:
    """Yield ``n_members`` float32 (K, z, y, x) softmax volumes for one label map.

    The random work happens inside the foreground bounding box grown by ``spec.margin_mm``;
    outside it every member predicts background with the clipped (saturated) logits. An empty
    label map gives all-background members (confident background everywhere).
    """
    from scipy import ndimage

    spec = spec or MemberSpec()
    labels = np.asarray(labels)
    if labels.shape != geometry.shape_zyx:
        raise InputError(f"case {case}: label shape {labels.shape} != geometry {geometry.shape_zyx}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise InputError(f"case {case}: label values {int(labels.min())}..{int(labels.max())} outside "
                         f"0..{n_classes - 1}")
    if n_members < 1:
        raise InputError(f"n_members must be >= 1, got {n_members}")
    spacing = np.asarray(geometry.spacing_zyx)
    margin_vox = np.ceil(spec.margin_mm / spacing).astype(int)
    rng = _case_rng(seed, case)
    box = _crop_box(labels, margin_vox)

    k_scale = spec.sharpen / spec.scale_mm
    sat = np.zeros((n_classes,), dtype=np.float32) - k_scale * spec.margin_mm
    sat[0] = k_scale * spec.margin_mm
    background = _softmax(sat[:, None].astype(np.float64))[:, 0].astype(np.float32)

    if box is None:
        for _ in range(n_members):
            yield np.broadcast_to(background[:, None, None, None], (n_classes,) + labels.shape).copy()
        return

    crop = labels[box]
    sd = _signed_distances(crop, n_classes, spacing, spec.margin_mm)
    sigma_vox = spec.noise_sigma_mm / spacing
    shared = np.stack([_smooth_field(rng, crop.shape, sigma_vox) for _ in range(n_classes)])
    base = sd + spec.shared_noise_mm * shared
    for _ in range(n_members):
        shift_vox = rng.uniform(-spec.max_shift_mm, spec.max_shift_mm, size=3) / spacing
        own = np.stack([_smooth_field(rng, crop.shape, sigma_vox) for _ in range(n_classes)])
        z = np.empty_like(base)
        for c in range(n_classes):
            shifted = ndimage.shift(base[c], shift_vox, order=1, mode="nearest")
            z[c] = k_scale * (shifted + spec.member_noise_mm * own[c])
        p_crop = _softmax(z)
        probs = np.broadcast_to(background[:, None, None, None], (n_classes,) + labels.shape).copy()
        probs[(slice(None),) + box] = p_crop
        yield probs


def make_member_folders(labels_dir: str | os.PathLike, out_root: str | os.PathLike, cases=None,
                        n_members: int = 3, seed: int = 0, spec: MemberSpec | None = None,
                        n_classes: int | None = None, prefix: str = "member_") -> list[Path]:
    """Write ``out_root/<prefix><m>/`` (m = 0..n_members-1) nnU-Net-style member folders.

    Each folder gets ``<case>.npz`` + ``<case>.pkl`` per case (the label's geometry), a copy of
    the dataset.json found beside ``labels_dir`` (if any), ``synthetic_members.json`` with the
    generator parameters, seed and member index, and a ``plans.json`` stand-in holding the
    generator parameters and seed (the same in every member folder, as nnU-Net's plans.json is
    for the folds of one model), so the prediction-folder fingerprint of the calibration file
    tells two synthetic "models" (other seed or parameters) apart. ``n_classes`` defaults to dataset.json's label count,
    else max label + 1 over the cases. Returns the member folder paths.
    """
    labels_dir, out_root = Path(labels_dir), Path(out_root)
    available = list_label_cases(labels_dir)
    cases = sorted(available) if cases is None else list(cases)
    missing = [c for c in cases if c not in available]
    if missing:
        raise InputError(f"no label file for case(s) {', '.join(missing)} in {labels_dir}")
    spec = spec or MemberSpec()
    ds_path = find_dataset_json(labels_dir)
    dataset = read_dataset_json(ds_path) if ds_path else None
    loaded = {}
    if n_classes is None:
        if dataset is not None:
            n_classes = len(dataset["labels"])
        else:
            loaded = {c: read_image(available[c]) for c in cases}
            n_classes = max(int(a.max()) for a, _ in loaded.values()) + 1
            n_classes = max(n_classes, 2)
    if dataset is not None:
        class_names_from_dataset(dataset, n_classes)  # validates the label set
    member_dirs = [out_root / f"{prefix}{m}" for m in range(n_members)]
    meta = {"generator": "CalibUncertaintyLib.synthetic.members", "seed": int(seed),
            "n_members": int(n_members), "n_classes": int(n_classes), "spec": asdict(spec)}
    plans = {"plans_name": "synthetic_members", "note": "not an nnU-Net plans file: these members "
             "were generated from labels by CalibUncertaintyLib.synthetic.members", **meta}
    for m, d in enumerate(member_dirs):
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "synthetic_members.json", dict(meta, member=m))
        write_json(d / "plans.json", plans)
        if dataset is not None:
            write_json(d / "dataset.json", dataset)
    for case in cases:
        labels, geom = loaded.pop(case, None) or read_image(available[case])
        for m, probs in enumerate(member_probabilities(labels, geom, n_classes, n_members, case, seed, spec)):
            write_member_probs(member_dirs[m], case, probs, geom)
        log.info("synthetic members written for case %s", case)
    return member_dirs


def load_spec(path: str | os.PathLike) -> MemberSpec:
    """MemberSpec from a ``synthetic_members.json`` written by make_member_folders."""
    return MemberSpec(**json.loads(Path(path).read_text())["spec"])
