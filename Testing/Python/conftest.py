"""Shared pytest fixtures: paths to the project and to the real data in ../shared."""

from __future__ import annotations

import fcntl
import os
import pickle
from pathlib import Path

import pytest

from shared_builds import shared_root

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CALIBU_SHARED", REPO.parent / "shared"))
OPENKBP = SHARED / "data" / "openkbp" / "Dataset501_OpenKBP_HN_OAR"
LIDC = SHARED / "data" / "lidc_multirater"
OOD_CT = SHARED / "data" / "ood_ct" / "abdomen_ct_3mm.nii.gz"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the project reads ../shared/data in place; "
                    "set CALIBU_SHARED to its location)")
    return path


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    return _require(OPENKBP)


@pytest.fixture(scope="session")
def lidc_dir() -> Path:
    return _require(LIDC)


@pytest.fixture(scope="session")
def ood_ct_path() -> Path:
    return _require(OOD_CT)


@pytest.fixture(scope="session")
def sample_case_files(tmp_path_factory):
    """(CT path, case output folder) of the synthetic sample case (mrml.sample_case), shared by
    the MRML review and snapshot tests, which only read it."""
    from CalibUncertaintyLib.io.images import write_image
    from CalibUncertaintyLib.mrml.sample_case import phantom_ct, write_sample_case

    root = tmp_path_factory.mktemp("mrml_sample")
    ct, geo = phantom_ct()
    return write_image(root / "ct.nii.gz", ct, geo), write_sample_case(root / "out", geo, case_id="sample")


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """(workdir, DemoResult) of the quick demo (``calib-uncertainty demo --quick``: phantoms, tiny
    deep and checkpoint ensembles, calibration, maps, evaluation, predict), run once per session;
    test_demo.py checks it, test_docs.py runs the documentation's blocks on its outputs and the
    pixel tests of Slicer's views (test_slice_views.py) render its case; they only read it
    (test_demo's rerun leaves it as it is)."""
    pytest.importorskip("torch", reason="the quick demo trains tiny nnU-Net models (torch is not in the "
                                        "slicer-core wheel venvs)")
    from CalibUncertaintyLib.demo import DemoSettings, run_demo

    root = shared_root(tmp_path_factory)
    workdir, record = root / "quick_demo", root / "quick_demo.pickle"
    with open(root / "quick_demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker runs it, the others wait and read its result
        if record.is_file():
            return workdir, pickle.loads(record.read_bytes())
        workdir.mkdir(exist_ok=True)
        first = run_demo(workdir, device="cpu", settings=DemoSettings.quick())
        record.write_bytes(pickle.dumps(first))
    return workdir, first



# Fixtures that build tiny REAL nnU-Net models live in their own modules; import them here so
# every test file can request them by name.
from trained_models import *  # noqa: E402,F401,F403  (tiny_prepared_dataset, tiny_trained_model)

