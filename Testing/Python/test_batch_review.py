"""Batch review (mrml/batch.py, ``calib-uncertainty review``) on real OpenKBP CTs.

Outputs come from ``calib-uncertainty maps`` over synthetic members built from the cases' real
labels (synthetic/members.py); the review runs in a real MRML scene (slicer-core).
predict_and_review runs a tiny real nnU-Net model folder (random weights, tiny_nnunet.py) on a
block of a real CT.
"""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pytest

from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.errors import CalibUncertaintyError, GeometryMismatchError, InputError
from CalibUncertaintyLib.mrml import batch
from CalibUncertaintyLib.mrml.nodes import ROLE_ATTRIBUTE, load_volume_file
from CalibUncertaintyLib.synthetic.members import make_member_folders

from tiny_nnunet import build_tiny_model_folder, write_test_ct

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer

CASES = ["OKBP_train_009", "OKBP_train_013"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def outputs(openkbp_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_review")
    members = [str(d) for d in make_member_folders(openkbp_dir / "labelsTr", root / "members", CASES,
                                                   n_members=3, seed=0)]
    rc = main(["maps", "--members", *members, "--images", str(openkbp_dir / "imagesTr"),
               "-o", str(root / "maps")])
    assert rc == 0
    return {"root": root, "maps": root / "maps", "images": openkbp_dir / "imagesTr"}


def _read_png(path) -> np.ndarray:
    from matplotlib import image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return (image.imread(io.BytesIO(data), format="png")[..., :3] * 255).round().astype(np.uint8)


def _case_nodes_left(scene, case_ids) -> list[str]:
    left = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        name = node.GetName() or ""
        if node.GetAttribute(ROLE_ATTRIBUTE) or any(name.startswith(c) for c in case_ids):
            left.append(f"{node.GetClassName()} {name!r}")
    return left


def test_review_command_writes_a_sheet_per_case(outputs, tmp_path, capsys):
    sheets = tmp_path / "sheets"
    rc = main(["review", "--outputs", str(outputs["maps"]), "--images", str(outputs["images"]),
               "--top-n", "2", "--map", "dae", "--fov-mm", "240", "--format", "png", "html", "-o", str(sheets)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert sorted(p.name for p in sheets.iterdir()) == sorted(
        f"{c}_review.{ext}" for c in CASES for ext in ("png", "html"))
    n_regions = []
    for case in CASES:
        img = _read_png(sheets / f"{case}_review.png")
        regions = json.loads((outputs["maps"] / case / "regions.json").read_text())["regions"]
        n_regions.append(len(regions))
        # 10 in at 100 dpi wide; header, legend, table and one block of 3.3 in per region shown
        # (at most 2; the table leaves out background regions; a case without any gets one block)
        assert img.shape[1] == 1000 and 600 < img.shape[0] < 2000, img.shape
        spread = img.max(axis=2).astype(int) - img.min(axis=2)
        grey = (spread < 4) & (img.mean(axis=2) > 30) & (img.mean(axis=2) < 225)
        assert grey.sum() > 20000, "the CT (grey pixels) is not visible on the sheet"
        if regions:
            assert (spread > 60).sum() > 200, "no overlay colour on the sheet"
        html = (sheets / f"{case}_review.html").read_text()
        assert f"case {case}" in html and "overlay: dae" in html
        # three views per region listed (single voxels and background regions are not listed)
        listed = [r for r in regions if r["n_voxels"] >= 2 and r["class_index"] != 0]
        assert html.count("<figure>") == 3 * max(1, min(2, len(listed)))
        assert f"{case}: {len(regions)} region(s)" in out
    # single voxels are never regions (METHODS.md §5): at the default τ the synthetic members of
    # OKBP_train_009 flag only single voxels, OKBP_train_013 small multi-voxel regions
    assert n_regions[1] >= 2, n_regions
    assert "4 sheet(s) written" in out


def test_review_folder_leaves_no_case_nodes_and_keeps_the_users(outputs, tmp_path):
    scene = slicer.vtkMRMLScene()
    user = load_volume_file(scene, outputs["images"] / f"{CASES[0]}_0000.nii.gz", name="my own CT")
    n_before = scene.GetNumberOfNodes()
    results = []
    sheets = batch.review_folder(scene, outputs["maps"], images=outputs["images"], out_dir=tmp_path / "s",
                                 top_n=1, map_name="map_entropy", formats="png", results=results)
    assert sheets == [tmp_path / "s" / f"{c}_review.png" for c in CASES]
    assert all(p.stat().st_size > 10_000 for p in sheets)
    assert [r.case_id for r in results] == CASES and all(r.ok for r in results)
    assert results[0].input_image == outputs["images"] / f"{CASES[0]}_0000.nii.gz"
    assert _case_nodes_left(scene, CASES) == []
    assert scene.GetNodeByID(user.GetID()) is user
    # only scene-wide colour tables (created once, shared by every case) may have been added
    added = [scene.GetNthNode(i) for i in range(n_before, scene.GetNumberOfNodes())]
    assert all(n.IsA("vtkMRMLColorNode") or n.IsA("vtkMRMLSubjectHierarchyNode") for n in added), \
        [n.GetClassName() for n in added]
    n_after = scene.GetNumberOfNodes()
    batch.review_folder(scene, [outputs["maps"] / CASES[1]], images=outputs["images"], out_dir=tmp_path / "s")
    assert scene.GetNumberOfNodes() == n_after          # a second run does not grow the scene


def test_ct_found_from_summary_and_default_sheet_folder(outputs, tmp_path):
    case_dir = tmp_path / "out" / CASES[0]
    shutil.copytree(outputs["maps"] / CASES[0], case_dir)
    summary = json.loads((case_dir / "summary.json").read_text())
    summary["input_image"] = str(outputs["images"] / f"{CASES[0]}_0000.nii.gz")
    (case_dir / "summary.json").write_text(json.dumps(summary))
    assert batch.find_input_image(CASES[0], case_dir) == outputs["images"] / f"{CASES[0]}_0000.nii.gz"
    scene = slicer.vtkMRMLScene()
    sheets = batch.review_folder(scene, tmp_path / "out")
    assert sheets == [tmp_path / "out" / "review" / f"{CASES[0]}_review.png"]
    # the sheet folder beside the cases is not mistaken for a case on the next run
    assert batch.find_case_dirs(tmp_path / "out") == [case_dir]


def test_failures_are_clear_and_leave_the_scene_clean(outputs, tmp_path, capsys):
    out = tmp_path / "out"
    for case in CASES:
        shutil.copytree(outputs["maps"] / case, out / case)
    (out / CASES[0] / "map_dae.nii.gz").unlink()
    (out / CASES[0] / "map_entropy.nii.gz").write_bytes(b"not a nifti")
    scene = slicer.vtkMRMLScene()
    with pytest.raises(InputError, match=CASES[0]):
        batch.review_folder(scene, out, images=outputs["images"], out_dir=tmp_path / "s")
    assert _case_nodes_left(scene, CASES) == [] and not (tmp_path / "s").exists()
    # keep going: the broken case is reported, the good one reviewed
    results = []
    sheets = batch.review_folder(scene, out, images=outputs["images"], out_dir=tmp_path / "s",
                                 keep_going=True, results=results)
    assert sheets == [tmp_path / "s" / f"{CASES[1]}_review.png"]
    assert not results[0].ok and "map_entropy" in results[0].error
    assert _case_nodes_left(scene, CASES) == []
    rc = main(["review", "--outputs", str(out), "--images", str(outputs["images"]), "--keep-going",
               "-o", str(tmp_path / "s2")])
    text = capsys.readouterr().out
    assert rc == 1 and f"{CASES[0]}: FAILED" in text and "1 sheet(s) written" in text
    # a CT on another grid, an unknown map, an images folder without the case, nothing to review
    other_ct = outputs["images"] / f"{CASES[1]}_0000.nii.gz"
    with pytest.raises(GeometryMismatchError):
        batch.review_case(scene, outputs["maps"] / CASES[0], tmp_path / "s3", images=other_ct)
    with pytest.raises(InputError, match="no overlay 'nonsense'.*dae"):
        batch.review_case(scene, outputs["maps"] / CASES[0], tmp_path / "s3", outputs["images"], map_name="nonsense")
    with pytest.raises(InputError, match=f"no image for case {CASES[0]}.*_0000.nii.gz"):
        batch.review_case(scene, outputs["maps"] / CASES[0], tmp_path / "s3", images=tmp_path)
    assert _case_nodes_left(scene, CASES) == [] and not (tmp_path / "s3").exists()
    with pytest.raises(InputError, match="holds no case output folder"):
        batch.review_folder(scene, tmp_path / "s")
    with pytest.raises(InputError, match="top_n"):
        batch.review_folder(scene, out, top_n=0)
    rc = main(["review", "--outputs", str(outputs["maps"]), "--map", "nonsense", "-o", str(tmp_path / "s4")])
    assert rc == 2 and "no overlay 'nonsense'" in capsys.readouterr().err


def test_missing_slicer_core_gives_the_install_command(outputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "slicer", None)       # as if slicer-core were not installed
    rc = main(["review", "--outputs", str(outputs["maps"]), "-o", str(tmp_path / "s")])
    assert rc == 2 and "pip install slicer-core" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_predict_options_become_predict_arguments():
    argv = batch._predict_argv("imgs", "model", "out", {"tta": False, "folds": [0, 1], "device": "cpu",
                                                        "dae_sigma_mm": 3.0, "calibration": None})
    assert argv == ["predict", "-i", "imgs", "-m", "model", "-o", "out", "--no-tta", "--folds", "0", "1",
                    "--device", "cpu", "--dae-sigma-mm", "3.0"]
    assert batch._predict_argv("imgs", "model", "out", {"tta": True})[-1] == "--tta"
    with pytest.raises(InputError, match="unknown predict option.*tta"):
        batch._predict_argv("imgs", "model", "out", {"tta_on": True})
    with pytest.raises(InputError, match="step size"):
        batch.run_predict("imgs", "model", "out", step_size=2.0)


def test_predict_and_review_on_a_real_ct_block(openkbp_dir, tmp_path):
    pytest.importorskip("torch", reason="predict runs a real nnU-Net model (torch is not in the slicer-core wheel venvs)")
    model = build_tiny_model_folder(tmp_path / "model", folds=(0, 1))
    ct = sorted((openkbp_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    images = tmp_path / "images"
    write_test_ct(images / "hn_0000.nii.gz", source_ct=ct, shape_zyx=(18, 40, 36))
    scene = slicer.vtkMRMLScene()
    sheets = batch.predict_and_review(scene, images, model, tmp_path / "pred", top_n=1, formats=("png", "html"),
                                      tta=False, device="cpu")
    assert sheets == [tmp_path / "pred" / "review" / f"hn_review.{e}" for e in ("png", "html")]
    assert json.loads((tmp_path / "pred" / "hn" / "summary.json").read_text())["n_members"] == 2
    assert _read_png(sheets[0]).shape[1] == 1000
    assert _case_nodes_left(scene, ["hn"]) == []
    with pytest.raises(CalibUncertaintyError):
        batch.predict_and_review(scene, images, tmp_path / "not_a_model", tmp_path / "pred2", device="cpu")
