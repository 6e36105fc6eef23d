"""The extension's sample data: a phantom CT, a tiny trained nnU-Net ensemble and its calibration.

Built by the project itself from the demo's machinery (``synthetic.phantom`` -> nnU-Net plan and
preprocessing -> ``CalibuTinyTrainer`` folds -> member outputs on calibration cases ->
``fit-temperature``), so that a fresh install can try Apply in one click. Nothing here is
downloaded; :func:`build_sample_data` writes two files into a folder:

- ``CalibUncertaintyPhantomCT.nii.gz``: a held-out phantom CT (never seen in training or calibration);
- ``CalibUncertaintyPhantomModel.zip``: ``<model folder>/`` (dataset.json, plans.json,
  ``fold_<k>/checkpoint_final.pth``) and ``calibration.json``.

The Slicer module registers them with SampleData (category "CalibUncertainty"), which fetches
them from the repository's release assets (:data:`SAMPLE_BASE_URL`); publish the two files
there (``python -m CalibUncertaintyLib.sample_data OUT_DIR`` builds them, a few minutes on a
CPU). :func:`unpack_sample_model` turns the downloaded zip into (model folder, calibration file)
for the module's inputs. The same files serve the module's self-test in CI (workflow).

Built files are cached: a rebuild with the same settings reuses the finished steps.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .slicer_support import REPOSITORY_URL

SAMPLE_RELEASE = "sample-data-v1"
SAMPLE_BASE_URL = f"{REPOSITORY_URL}/releases/download/{SAMPLE_RELEASE}"
CT_FILE = "CalibUncertaintyPhantomCT.nii.gz"
MODEL_ZIP = "CalibUncertaintyPhantomModel.zip"
CALIBRATION_NAME = "calibration.json"
SAMPLE_CATEGORY = "CalibUncertainty"
SAMPLE_NAME = "CalibUncertaintyPhantom"


@dataclass(frozen=True)
class SampleFiles:
    ct: Path
    model_zip: Path


def sample_settings(quick: bool = False):
    """DemoSettings for the sample: 8 training phantoms, a 2-fold deep ensemble, 2 calibration
    cases and 1 held-out CT (``quick``: the demo's seconds-long settings, for tests)."""
    from dataclasses import replace

    from .demo import DemoSettings
    from .nnunet.training import TrainingConfig

    if quick:
        return replace(DemoSettings.quick(), dataset_id=988, dataset_name="CalibPhantomSampleQuick", n_test=1)
    return replace(DemoSettings(), dataset_id=987, dataset_name="CalibPhantomSample", n_train=8,
                   n_calibration=2, n_test=1, deep_folds=(0, 1),
                   deep=TrainingConfig(trainer="CalibuTinyTrainer", num_epochs=12, iterations_per_epoch=10,
                                       initial_lr=1e-2, val_iterations=1, seed=0))


def build_sample_data(out_dir, workdir=None, quick: bool = False, device: str = "cpu",
                      num_threads: int | None = None) -> SampleFiles:
    """Train the sample ensemble and write the two sample files into ``out_dir`` (see the module
    docstring); ``workdir`` holds the intermediate nnU-Net folders (default ``out_dir/.work``)."""
    from .demo import _cli
    from .nnunet.inference import collect_cases
    from .nnunet.member_cache import write_members
    from .nnunet.small_plan import prepare_small_plan
    from .nnunet.training import train_folds
    from .synthetic.phantom import write_phantom_dataset

    s = sample_settings(quick)
    out_dir = Path(out_dir)
    work = Path(workdir) if workdir is not None else out_dir / ".work"
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = write_phantom_dataset(work / "nnUNet_raw", s.dataset_id, s.dataset_name, n_train=s.n_train,
                               n_test=s.n_calibration + s.n_test, seed=s.seed, spec=s.spec)
    calib_cases = list(ds.test_cases[: s.n_calibration])
    sample_case = ds.test_cases[s.n_calibration]
    prepared = prepare_small_plan(ds.folder, work / "nnUNet_preprocessed", **s.small_plan)
    model_dir = train_folds(prepared, work / "nnUNet_results", s.deep_folds, s.deep, device=device,
                            num_threads=num_threads, progress=False)
    cases = {c: f for c, f in collect_cases(ds.folder / "imagesTs").items() if c in calib_cases}
    members = write_members(model_dir, "deep", cases, work / "members", device, False)
    calibration = work / CALIBRATION_NAME
    _cli(["fit-temperature", "--members", *[str(m) for m in members], "--images", str(ds.folder / "imagesTs"),
          "--labels", str(ds.folder / "labelsTs"), "--cases", *calib_cases, "-o", str(calibration)])

    ct = out_dir / CT_FILE
    shutil.copyfile(ds.image(sample_case), ct)
    zip_path = out_dir / MODEL_ZIP
    tmp = zip_path.with_name(zip_path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in ("dataset.json", "plans.json"):
            z.write(model_dir / name, f"{model_dir.name}/{name}")
        for fold in s.deep_folds:
            z.write(model_dir / f"fold_{fold}" / "checkpoint_final.pth",
                    f"{model_dir.name}/fold_{fold}/checkpoint_final.pth")
        z.write(calibration, CALIBRATION_NAME)
        z.writestr("README.txt", f"CalibUncertainty sample model: {len(s.deep_folds)}-fold tiny nnU-Net v2 "
                                 f"ensemble trained on CT-like phantoms (dataset {ds.name}); not a clinical model.\n")
    os.replace(tmp, zip_path)
    return SampleFiles(ct, zip_path)


def unpack_sample_model(zip_path, dest) -> tuple[Path, Path]:
    """Unpack the sample model zip into ``dest`` -> (model folder, calibration file).

    Refuses members that would land outside ``dest``. Raises InputError for a zip that is not
    a sample model (no ``calibration.json`` or no model folder with ``plans.json``)."""
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        z = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"{zip_path} is not a readable zip file: {e}") from e
    with z:
        names = z.namelist()
        root = dest.resolve()
        for n in names:
            if not (root / n).resolve().is_relative_to(root):
                raise InputError(f"{zip_path}: member {n!r} would be written outside {dest}")
        plans = [n for n in names if n.count("/") == 1 and n.endswith("/plans.json")]
        if CALIBRATION_NAME not in names or len(plans) != 1:
            raise InputError(f"{zip_path} is not a CalibUncertainty sample model (it needs {CALIBRATION_NAME} "
                             "and one model folder with plans.json)")
        z.extractall(dest)
    return dest / plans[0].split("/")[0], dest / CALIBRATION_NAME


def sample_data_sources(base_url: str = SAMPLE_BASE_URL, thumbnail: str | None = None) -> list[dict]:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource``: the CT
    (loaded as a volume) and the model zip (downloaded only; the module unpacks it)."""
    common = {"category": SAMPLE_CATEGORY, "thumbnailFileName": thumbnail}
    return [
        dict(common, sampleName=SAMPLE_NAME, uris=[f"{base_url}/{CT_FILE}", f"{base_url}/{MODEL_ZIP}"],
             fileNames=[CT_FILE, MODEL_ZIP], nodeNames=[SAMPLE_NAME, None], loadFiles=[True, False],
             loadFileType=["VolumeFile", None]),
    ]


def split_downloaded(results) -> tuple:
    """(CT volume node, model zip path) from what ``SampleDataLogic.downloadSamples`` returns for
    :data:`SAMPLE_NAME` (loaded nodes and, for the zip it only downloads, the file path)."""
    ct = next((r for r in results if hasattr(r, "IsA") and r.IsA("vtkMRMLScalarVolumeNode")), None)
    zips = [Path(r) for r in results if isinstance(r, (str, os.PathLike)) and str(r).endswith(".zip")]
    if ct is None or len(zips) != 1:
        raise InputError(f"the sample data download gave {results!r}; expected the CT node and {MODEL_ZIP}")
    return ct, zips[0]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m CalibUncertaintyLib.sample_data OUT_DIR [--quick]\n"
              "Builds the extension's sample data (phantom CT + tiny trained model + calibration).")
        return 0 if argv else 2
    files = build_sample_data(argv[0], quick="--quick" in argv)
    print(json.dumps({"ct": str(files.ct), "model_zip": str(files.model_zip),
                      "bytes": files.ct.stat().st_size + files.model_zip.stat().st_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
