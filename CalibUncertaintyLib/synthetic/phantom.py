"""A small CT-like phantom dataset in nnU-Net raw layout, for demos, tests and CPU training.

Each case is a (z, y, x) int16 volume in Hounsfield-like units on an anisotropic grid with a
non-identity origin:

- air (-1000 HU) around an elliptic "body" cylinder of soft tissue (~40 HU) with a thin
  subcutaneous fat rim (~-90 HU) and a bright "spine" (~650 HU) at the back;
- class 1 ``node``: one or two small hypodense ellipsoids (radii 5-9 mm, ~70 HU darker than the
  surrounding tissue, i.e. a contrast-to-noise ratio of about 4);
- class 2 ``vessel``: a tube (radius 2.5-3.5 mm) that meanders along z, ~120 HU brighter;
- partial-volume blur, correlated tissue texture and Gaussian noise;
- label noise: a fraction of the voxels on each structure's border is flipped in or out, as
  two annotators would disagree there.

Everything is drawn from ``numpy.random.default_rng`` seeded by (seed, case index), so the same
seed always gives byte-identical images and labels. Sizes are in millimetres; the grid
(shape and spacing) only decides how finely they are sampled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import write_json
from ..io.geometry import Geometry
from ..io.images import write_image

log = logging.getLogger(__name__)

LABELS = {"background": 0, "node": 1, "vessel": 2}
CLASS_NAMES = ("background", "node", "vessel")
RECORD_NAME = "phantom.json"  # written last: its presence (with equal parameters) marks a complete dataset


@dataclass(frozen=True)
class PhantomSpec:
    """Grid and appearance of one phantom case. Lengths in mm, intensities in HU."""

    shape_zyx: tuple[int, int, int] = (40, 64, 64)
    spacing: tuple[float, float, float] = (1.25, 1.25, 2.5)  # (x, y, z) mm: anisotropic
    origin: tuple[float, float, float] = (-40.0, -130.0, 310.0)  # (x, y, z) mm LPS, jittered per case
    origin_jitter_mm: float = 5.0
    tissue_hu: float = 40.0
    node_contrast_hu: float = -70.0
    vessel_contrast_hu: float = 120.0
    noise_sd_hu: float = 18.0
    node_radius_mm: tuple[float, float] = (5.0, 9.0)
    vessel_radius_mm: tuple[float, float] = (2.5, 3.5)
    label_noise: float = 0.15  # fraction of border voxels flipped
    max_nodes: int = 2

    def __post_init__(self):
        if len(self.shape_zyx) != 3 or min(self.shape_zyx) < 16:
            raise InputError(f"phantom shape must be 3-D with every side >= 16 voxels, got {self.shape_zyx}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise InputError(f"phantom spacing must be 3 positive numbers (mm), got {self.spacing}")
        if not 0.0 <= self.label_noise < 1.0:
            raise InputError(f"label_noise is a fraction in [0, 1), got {self.label_noise}")
        if self.max_nodes < 1:
            raise InputError(f"max_nodes must be >= 1, got {self.max_nodes}")


def case_geometry(spec: PhantomSpec, rng: np.random.Generator) -> Geometry:
    jitter = rng.uniform(-spec.origin_jitter_mm, spec.origin_jitter_mm, size=3)
    origin = tuple(float(o + j) for o, j in zip(spec.origin, jitter))
    return Geometry(spec.shape_zyx, spec.spacing, origin)


def _mm_grids(spec: PhantomSpec):
    """Coordinates in mm of every voxel centre along z, y, x (relative to the first voxel)."""
    sz, sy, sx = spec.spacing[2], spec.spacing[1], spec.spacing[0]
    nz, ny, nx = spec.shape_zyx
    return np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx


def _border_flip(label: np.ndarray, cls: int, fraction: float, rng: np.random.Generator) -> None:
    """Flip ``fraction`` of the voxels just inside / just outside class ``cls``'s border (in place).

    Outside voxels only take the class where they are background, so structures never eat
    each other; inside voxels become background.
    """
    from scipy import ndimage

    if fraction <= 0:
        return
    mask = label == cls
    if not mask.any():
        return
    inner = mask & ~ndimage.binary_erosion(mask)
    outer = ndimage.binary_dilation(mask) & ~mask & (label == 0)
    flip_in = inner & (rng.random(label.shape) < fraction)
    flip_out = outer & (rng.random(label.shape) < fraction)
    label[flip_in] = 0
    label[flip_out] = cls


def make_phantom_case(seed: int, spec: PhantomSpec = PhantomSpec()) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One phantom case: (image int16 (z, y, x) HU, label uint8 (z, y, x) in {0, 1, 2}, geometry)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    geometry = case_geometry(spec, rng)
    zc, yc, xc = _mm_grids(spec)
    Z, Y, X = np.meshgrid(zc, yc, xc, indexing="ij")
    ext_y, ext_x = yc[-1], xc[-1]

    # Body: elliptic cylinder along z, centre and size jittered.
    cy, cx = ext_y / 2 + rng.uniform(-2, 2), ext_x / 2 + rng.uniform(-2, 2)
    ay, ax = ext_y * rng.uniform(0.40, 0.45), ext_x * rng.uniform(0.42, 0.47)
    r_body = np.sqrt(((Y - cy) / ay) ** 2 + ((X - cx) / ax) ** 2)
    body = r_body <= 1.0
    fat = body & (r_body > 1.0 - 4.0 / min(ay, ax))  # ~4 mm rim
    img = np.full(spec.shape_zyx, -1000.0, dtype=np.float32)
    img[body] = spec.tissue_hu
    img[fat] = -90.0
    # Spine: a bright disc at the back of the body (larger y is posterior in LPS).
    sy_c, sx_c, s_r = cy + 0.6 * ay, cx + rng.uniform(-2, 2), rng.uniform(6.0, 8.0)
    spine = ((Y - sy_c) ** 2 + (X - sx_c) ** 2 <= s_r ** 2) & body
    img[spine] = 650.0

    label = np.zeros(spec.shape_zyx, dtype=np.uint8)
    inner_body = body & ~fat & ~ndimage.binary_dilation(spine, iterations=2)

    # Vessel (class 2): tube of radius r around a centreline that meanders along z.
    v_r = rng.uniform(*spec.vessel_radius_mm)
    v_y0 = cy + rng.uniform(-0.35, 0.05) * ay
    v_x0 = cx + rng.choice([-1, 1]) * rng.uniform(0.25, 0.45) * ax
    amp_y, amp_x = rng.uniform(2, 6), rng.uniform(2, 6)
    period, phase = rng.uniform(0.8, 1.6) * zc[-1], rng.uniform(0, 2 * np.pi)
    line_y = v_y0 + amp_y * np.sin(2 * np.pi * Z / period + phase)
    line_x = v_x0 + amp_x * np.cos(2 * np.pi * Z / period + phase)
    vessel = (((Y - line_y) ** 2 + (X - line_x) ** 2) <= v_r ** 2) & inner_body
    label[vessel] = 2

    # Nodes (class 1): small axis-aligned ellipsoids away from the vessel.
    n_nodes = int(rng.integers(1, spec.max_nodes + 1))
    vessel_zone = ndimage.binary_dilation(vessel, iterations=3)
    placed = 0
    for _ in range(40 * n_nodes):
        if placed == n_nodes:
            break
        radii = rng.uniform(*spec.node_radius_mm, size=3)  # (z, y, x) mm
        centre = (rng.uniform(radii[0] + 5, zc[-1] - radii[0] - 5),
                  cy + rng.uniform(-0.6, 0.5) * ay, cx + rng.uniform(-0.6, 0.6) * ax)
        node = (((Z - centre[0]) / radii[0]) ** 2 + ((Y - centre[1]) / radii[1]) ** 2
                + ((X - centre[2]) / radii[2]) ** 2) <= 1.0
        if not node.any() or (node & ~inner_body).any() or (node & vessel_zone).any() or (node & (label == 1)).any():
            continue
        label[node] = 1
        placed += 1
    if placed == 0:  # extremely unlikely; keep every case with both classes
        centre = np.array([zc[-1] / 2, cy, cx - 0.2 * ax])
        node = ((Z - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (X - centre[2]) ** 2) <= 5.0 ** 2
        label[node & inner_body & ~vessel_zone] = 1

    img[label == 1] += spec.node_contrast_hu
    img[label == 2] += spec.vessel_contrast_hu

    # Partial volume (blur ~0.6 mm in-plane), correlated texture, white noise.
    sigma_vox = tuple(0.6 / s for s in geometry.spacing_zyx)
    img = ndimage.gaussian_filter(img, sigma=sigma_vox)
    texture = ndimage.gaussian_filter(rng.standard_normal(spec.shape_zyx).astype(np.float32),
                                      sigma=tuple(2.0 / s for s in geometry.spacing_zyx))
    texture *= 8.0 / max(float(texture.std()), 1e-6)
    img += np.where(body, texture, 0.0)
    img += rng.normal(0.0, spec.noise_sd_hu, size=spec.shape_zyx).astype(np.float32)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)

    # Label noise on the borders (drawn after the image, so the image does not depend on it).
    for cls in (1, 2):
        _border_flip(label, cls, spec.label_noise, rng)
    return img, label, geometry


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise InputError(f"nnU-Net dataset ids have three digits (1..999), got {dataset_id}")
    if not name or not name.replace("_", "").isalnum():
        raise InputError(f"dataset name must be letters, digits and '_', got {name!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


@dataclass(frozen=True)
class PhantomDataset:
    """Where a written phantom dataset lies, and which cases it holds."""

    folder: Path
    dataset_id: int
    train_cases: tuple[str, ...]
    test_cases: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.folder.name

    def image(self, case: str) -> Path:
        sub = "imagesTr" if case in self.train_cases else "imagesTs"
        return self.folder / sub / f"{case}_0000.nii.gz"

    def label(self, case: str) -> Path:
        sub = "labelsTr" if case in self.train_cases else "labelsTs"
        return self.folder / sub / f"{case}.nii.gz"


def write_phantom_dataset(raw_root: str | os.PathLike, dataset_id: int = 991, name: str = "CalibPhantom",
                          n_train: int = 10, n_test: int = 4, seed: int = 0,
                          spec: PhantomSpec = PhantomSpec()) -> PhantomDataset:
    """Write ``<raw_root>/DatasetXXX_<name>/`` in nnU-Net raw layout and return where it is.

    imagesTr/<case>_0000.nii.gz + labelsTr/<case>.nii.gz hold ``n_train`` training cases (what
    nnU-Net plans, preprocesses and trains on); imagesTs/ + labelsTs/ hold ``n_test`` held-out
    cases (for calibration and testing; nnU-Net never sees them). dataset.json follows nnU-Net v2
    (channel "CT", labels background/node/vessel). Case ``phantom_<i>`` is drawn with seed
    ``(seed, i)``. A complete dataset with the same parameters is reused as it is; every file
    is written atomically and ``phantom.json`` last.
    """
    if n_train < 2:
        raise InputError(f"a phantom dataset needs at least 2 training cases, got n_train={n_train}")
    if n_test < 0:
        raise InputError(f"n_test must be >= 0, got {n_test}")
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    train = tuple(f"phantom_{i:03d}" for i in range(n_train))
    test = tuple(f"phantom_{i:03d}" for i in range(n_train, n_train + n_test))
    result = PhantomDataset(folder, int(dataset_id), train, test)
    record = {"generator": "CalibUncertaintyLib.synthetic.phantom", "seed": int(seed), "n_train": n_train,
              "n_test": n_test, "spec": asdict(spec)}
    record = json.loads(json.dumps(record))  # tuples -> lists, as they come back from disk
    record_path = folder / RECORD_NAME
    if record_path.is_file():
        try:
            same = json.loads(record_path.read_text()) == record
        except json.JSONDecodeError:
            same = False
        if same and all(result.image(c).is_file() and result.label(c).is_file() for c in train + test):
            log.info("phantom dataset %s is complete; reusing it", folder)
            return result
        record_path.unlink()  # parameters changed: regenerate everything below

    for i, case in enumerate(train + test):
        img, lab, geom = make_phantom_case(_case_seed(seed, i), spec)
        write_image(result.image(case), img, geom)
        write_image(result.label(case), lab, geom)
    write_json(folder / "dataset.json", {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Synthetic CT-like phantom (CalibUncertainty): low-contrast nodes and a vessel-like tube",
    })
    write_json(record_path, record)
    return result


def _case_seed(seed: int, index: int) -> int:
    """An independent, reproducible stream per (dataset seed, case index)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])
