"""The extension's sample data: a phantom CT, a tiny trained nnU-Net ensemble and its calibration.

Built by the project itself from the demo's machinery (``synthetic.phantom`` -> nnU-Net plan and
preprocessing -> ``CalibuTinyTrainer`` folds -> member outputs on calibration cases ->
``fit-temperature``), so that a fresh install can try Apply in one click. Nothing here is
downloaded; :func:`build_sample_data` writes two files into a folder:

- ``CalibUncertaintyPhantomCT.nii.gz``: a held-out phantom CT (never seen in training or calibration);
- ``CalibUncertaintyPhantomModel.zip``: ``<model folder>/`` (dataset.json, plans.json,
  ``fold_<k>/checkpoint_final.pth``) and ``calibration.json``.

The Slicer module registers them with SampleData (category "CalibUncertainty"), which fetches
them from the repository's release assets (:data:`SAMPLE_BASE_URL`) and checks each download
against its SHA-256 (``checksums="SHA256:..."``, as Slicer's extension template registers its
sources; a file that does not match is deleted and not loaded). The checksums of the published
files are recorded in ``resources/sample_data.sha256`` (:func:`recorded_checksums`). To publish:
``python -m CalibUncertaintyLib.sample_data OUT_DIR --record`` builds the two files (a few minutes
on a CPU), writes ``OUT_DIR/SHA256SUMS`` and records the same checksums in the resource file;
upload exactly those two files to the ``sample-data-v1`` release and commit the resource file.
:func:`unpack_sample_model` turns the downloaded zip into (model folder, calibration file) for the
module's inputs. The same files serve the module's self-test in CI (workflow).

Built files are cached: a rebuild with the same settings reuses the finished steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
#: SHA-256 of the published sample files, in ``sha256sum`` format (``<hex>  <file name>``)
CHECKSUMS_FILE = Path(__file__).resolve().parent / "resources" / "sample_data.sha256"
SUMS_NAME = "SHA256SUMS"
#: a fixed timestamp for every zip member, so the same model gives the same zip bytes
ZIP_DATE = (2025, 1, 1, 0, 0, 0)


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
    zip_path = write_model_zip(out_dir / MODEL_ZIP, model_dir, calibration, s.deep_folds,
                               f"CalibUncertainty sample model: {len(s.deep_folds)}-fold tiny nnU-Net v2 ensemble "
                               f"trained on CT-like phantoms (dataset {ds.name}); not a clinical model.\n")
    files = SampleFiles(ct, zip_path)
    write_sums(out_dir, files)
    return files


def write_model_zip(zip_path, model_dir, calibration, folds, readme: str) -> Path:
    """The sample model zip: ``<model folder>/`` (dataset.json, plans.json,
    ``fold_<k>/checkpoint_final.pth``), ``calibration.json`` and README.txt. Members are written
    in a fixed order with a fixed timestamp, so the same files always give the same zip bytes."""
    zip_path, model_dir = Path(zip_path), Path(model_dir)
    members = [(model_dir / n, f"{model_dir.name}/{n}") for n in ("dataset.json", "plans.json")]
    members += [(model_dir / f"fold_{f}" / "checkpoint_final.pth", f"{model_dir.name}/fold_{f}/checkpoint_final.pth")
                for f in folds]
    members.append((Path(calibration), CALIBRATION_NAME))
    tmp = zip_path.with_name(zip_path.name + ".part")
    with zipfile.ZipFile(tmp, "w") as z:
        for src, name in [*members, (None, "README.txt")]:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, readme.encode() if src is None else src.read_bytes())
    os.replace(tmp, zip_path)
    return zip_path


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sums(out_dir, files: SampleFiles) -> Path:
    """``out_dir/SHA256SUMS`` of the two sample files (``sha256sum -c`` reads it)."""
    path = Path(out_dir) / SUMS_NAME
    path.write_text("".join(f"{sha256_of(p)}  {p.name}\n" for p in (files.ct, files.model_zip)), encoding="utf-8")
    return path


def read_sums(path) -> dict[str, str]:
    """{file name: "SHA256:<hex>"} from a ``sha256sum``-format file; InputError for a bad line."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *]?(\S+)", line)
        if not m:
            raise InputError(f"{path}:{n}: expected '<sha256 hex>  <file name>', got {line!r}")
        out[m.group(2)] = f"SHA256:{m.group(1)}"
    return out


def recorded_checksums() -> dict[str, str]:
    """{file name: "SHA256:<hex>"} of the published sample files (``resources/sample_data.sha256``)."""
    return read_sums(CHECKSUMS_FILE)


def record_checksums(files: SampleFiles, path=None) -> Path:
    """Record the checksums of freshly built sample files as the published ones (release step)."""
    path = Path(path) if path is not None else CHECKSUMS_FILE
    text = ("# SHA-256 of the sample-data release assets (python -m CalibUncertaintyLib.sample_data OUT_DIR --record)\n"
            + "".join(f"{sha256_of(p)}  {p.name}\n" for p in (files.ct, files.model_zip)))
    path.write_text(text, encoding="utf-8")
    return path


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


def sample_data_sources(base_url: str = SAMPLE_BASE_URL, thumbnail: str | None = None,
                        checksums: dict | None = None) -> list[dict]:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource``: the CT
    (loaded as a volume) and the model zip (downloaded only; the module unpacks it), each with its
    ``SHA256:<hex>`` checksum (default: :func:`recorded_checksums`)."""
    sums = recorded_checksums() if checksums is None else checksums
    missing = [f for f in (CT_FILE, MODEL_ZIP) if f not in sums]
    if missing:
        raise InputError(f"no SHA-256 recorded for {', '.join(missing)} in {CHECKSUMS_FILE}")
    common = {"category": SAMPLE_CATEGORY, "thumbnailFileName": thumbnail}
    return [
        dict(common, sampleName=SAMPLE_NAME, uris=[f"{base_url}/{CT_FILE}", f"{base_url}/{MODEL_ZIP}"],
             fileNames=[CT_FILE, MODEL_ZIP], nodeNames=[SAMPLE_NAME, None], loadFiles=[True, False],
             loadFileType=["VolumeFile", None], checksums=[sums[CT_FILE], sums[MODEL_ZIP]]),
    ]


def split_downloaded(results) -> tuple:
    """(CT volume node, model zip path) from what ``SampleDataLogic.downloadSamples`` returns for
    :data:`SAMPLE_NAME` (loaded nodes and, for the zip it only downloads, the file path)."""
    ct = next((r for r in results if hasattr(r, "IsA") and r.IsA("vtkMRMLScalarVolumeNode")), None)
    zips = [Path(r) for r in results if isinstance(r, (str, os.PathLike)) and str(r).endswith(".zip")]
    if ct is None or len(zips) != 1 or not zips[0].is_file():
        raise InputError("SampleData could not download and verify the sample: a file that does not match its "
                         "SHA-256 checksum is deleted, not loaded. Check the network connection and SampleData's "
                         f"log, then try again (SampleData gave {results!r}; expected the CT node and {MODEL_ZIP})")
    return ct, zips[0]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m CalibUncertaintyLib.sample_data OUT_DIR [--quick] [--record]\n"
              "Builds the extension's sample data (phantom CT + tiny trained model + calibration) and\n"
              "OUT_DIR/SHA256SUMS; --record also records those checksums as the published ones\n"
              f"({CHECKSUMS_FILE}): upload exactly these two files to the {SAMPLE_RELEASE} release.")
        return 0 if argv else 2
    files = build_sample_data(argv[0], quick="--quick" in argv)
    result = {"ct": str(files.ct), "model_zip": str(files.model_zip),
              "bytes": files.ct.stat().st_size + files.model_zip.stat().st_size,
              "sha256": read_sums(Path(argv[0]) / SUMS_NAME)}
    if "--record" in argv:
        result["recorded_in"] = str(record_checksums(files))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
