"""The wrong patient cannot be shown on a CT (issue 12, item 4) and reruns keep the folder index
whole (item 5).

Two real OpenKBP cases on the same voxel grid (128³, 3.906 x 3.906 x 2.5 mm, same origin):
OKBP_train_001 and OKBP_train_004. Their outputs pass every grid check on each other's CT; only
the recorded input identity (voxel hash) tells them apart. Members are synthetic, made from the
real labels (synthetic/members.py).
"""

from __future__ import annotations

import json
import shutil

import pytest

from CalibUncertaintyLib.cli.main import main
from CalibUncertaintyLib.io.images import read_header_geometry
from CalibUncertaintyLib.synthetic.members import make_member_folders
from cli_errors import error_line

A, B = "OKBP_train_001", "OKBP_train_004"


_error = error_line  # one-line `error: ...`, no traceback


@pytest.fixture(scope="module")
def cases(openkbp_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    images = openkbp_dir / "imagesTr"
    assert read_header_geometry(images / f"{A}_0000.nii.gz").mismatch(
        read_header_geometry(images / f"{B}_0000.nii.gz")) is None  # same grid: the dangerous case
    members = [str(d) for d in make_member_folders(openkbp_dir / "labelsTr", root / "pred", [A, B], n_members=2,
                                                   seed=0)]
    out = root / "maps"
    rc_a = main(["maps", "--members", *members, "--images", str(images), "--cases", A, "-o", str(out)])
    index_after_a = json.loads((out / "summary.json").read_text())
    rc_b = main(["maps", "--members", *members, "--images", str(images), "--cases", B, "-o", str(out)])
    swapped = root / "swapped"  # A's file name holding B's CT, and the reverse
    swapped.mkdir()
    shutil.copy(images / f"{B}_0000.nii.gz", swapped / f"{A}_0000.nii.gz")
    shutil.copy(images / f"{A}_0000.nii.gz", swapped / f"{B}_0000.nii.gz")
    return {"root": root, "images": images, "members": members, "out": out, "swapped": swapped,
            "rc": (rc_a, rc_b), "index_after_a": index_after_a}


def test_summary_records_the_input_identity(cases):
    from CalibUncertaintyLib.io.identity import SUMMARY_KEY, file_identity, identity_mismatch

    assert cases["rc"] == (0, 0)
    for case in (A, B):
        rec = json.loads((cases["out"] / case / "summary.json").read_text())[SUMMARY_KEY]
        assert rec["case"] == case and rec["file"].endswith(f"{case}_0000.nii.gz")
        assert rec == file_identity(cases["images"] / f"{case}_0000.nii.gz", case)
    a = file_identity(cases["images"] / f"{A}_0000.nii.gz", A)
    b = file_identity(cases["images"] / f"{B}_0000.nii.gz", B)
    msg = identity_mismatch(a, b)
    assert msg and "same grid, different voxel values" in msg
    assert a["voxels_sha256"][:12] in msg and b["voxels_sha256"][:12] in msg  # both identities printed


def test_review_refuses_the_swapped_ct_unless_overridden(cases, tmp_path, capsys):
    base = ["review", "--outputs", str(cases["out"]), "--images", str(cases["swapped"]), "--format", "html"]
    assert main([*base, "-o", str(tmp_path / "sheets")]) == 2
    msg = _error(capsys)
    from CalibUncertaintyLib.io.identity import file_identity

    b_sha = file_identity(cases["images"] / f"{B}_0000.nii.gz")["voxels_sha256"]
    assert "another image" in msg and f"case {A}" in msg and b_sha[:12] in msg and "--allow-identity-mismatch" in msg
    assert msg.count("voxels sha256") == 2  # both identities
    assert not (tmp_path / "sheets").exists() or not list((tmp_path / "sheets").iterdir())
    assert main([*base, "--allow-identity-mismatch", "-o", str(tmp_path / "forced")]) == 0
    assert sorted(p.name for p in (tmp_path / "forced").iterdir()) == [f"{A}_review.html", f"{B}_review.html"]
    assert main(["review", "--outputs", str(cases["out"]), "--images", str(cases["images"]), "--format", "html",
                 "-o", str(tmp_path / "right")]) == 0


def test_slicer_load_refuses_the_other_patients_ct(cases, caplog):
    import slicer

    from CalibUncertaintyLib.io.identity import IdentityMismatchError, file_identity
    from CalibUncertaintyLib.mrml.nodes import load_case_outputs
    from CalibUncertaintyLib.mrml.volumes import load_volume_file

    scene = slicer.vtkMRMLScene()
    ct_b = load_volume_file(scene, cases["images"] / f"{B}_0000.nii.gz", name="CT of B")
    n_before = scene.GetNumberOfNodes()
    with pytest.raises(IdentityMismatchError) as exc:
        load_case_outputs(scene, cases["out"] / A, input_volume_node=ct_b)
    b_sha = file_identity(cases["images"] / f"{B}_0000.nii.gz")["voxels_sha256"]
    assert "allow_identity_mismatch=True" in str(exc.value) and A in str(exc.value) and b_sha[:12] in str(exc.value)
    assert scene.GetNumberOfNodes() == n_before  # nothing added
    forced = load_case_outputs(scene, cases["out"] / A, input_volume_node=ct_b, allow_identity_mismatch=True)
    assert forced.case_id == A and any("another image" in r.getMessage() for r in caplog.records)
    forced.remove_from_scene(scene)
    ok = load_case_outputs(scene, cases["out"] / B, input_volume_node=ct_b)
    assert ok.case_id == B


def test_rerun_keeps_the_index_whole_and_says_what_it_replaced(cases, capsys):
    out = cases["out"]
    assert [c["case"] for c in cases["index_after_a"]["cases"]] == [A]
    index = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in index["cases"]] == [A, B] and index["n_cases"] == 2 and index["replaced"] == []
    capsys.readouterr()
    assert main(["maps", "--members", *cases["members"], "--images", str(cases["images"]), "--cases", A,
                 "-o", str(out)]) == 0
    assert f"replaced the earlier outputs of 1 case(s): {A}" in capsys.readouterr().out
    index = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in index["cases"]] == [A, B] and index["replaced"] == [A]
    assert index["cases"][1]["run"]["n_members"] == 2


def test_update_folder_index_unit(tmp_path):
    from CalibUncertaintyLib.pipeline.folder_index import update_folder_index

    for case in ("c1", "c2", "c3"):
        (tmp_path / case).mkdir()
        (tmp_path / case / "summary.json").write_text(json.dumps({"case": case, "n_regions": 1, "n_members": 3}))
    (tmp_path / ".c4.partial").mkdir()  # an interrupted case is not listed
    (tmp_path / "c5").mkdir()           # nor a folder without summary.json
    assert update_folder_index(tmp_path, [{"case": "c1", "n_regions": 7}], {"n_members": 5}) == []
    index = json.loads((tmp_path / "summary.json").read_text())
    assert [c["case"] for c in index["cases"]] == ["c1", "c2", "c3"]
    assert index["cases"][0] == {"case": "c1", "n_regions": 7, "run": {"n_members": 5}}
    assert index["cases"][1]["run"]["n_members"] == 3  # built from the case's own summary.json
    shutil.rmtree(tmp_path / "c3")
    assert update_folder_index(tmp_path, [{"case": "c1", "n_regions": 8}, {"case": "c2", "n_regions": 0}]) == ["c1", "c2"]
    index = json.loads((tmp_path / "summary.json").read_text())
    assert [(c["case"], c["n_regions"]) for c in index["cases"]] == [("c1", 8), ("c2", 0)]


def test_identity_of_a_volume_node_matches_its_exported_file(openkbp_dir, tmp_path):
    """The module's own path: a volume node (here float64) is exported, predict records the
    file's identity, and the outputs are then loaded back onto that node: no false mismatch."""
    import numpy as np

    from CalibUncertaintyLib.io.identity import file_identity, identity_mismatch, image_identity
    from CalibUncertaintyLib.io.images import read_image
    from CalibUncertaintyLib.mrml.volumes import export_volume_node, geometry_from_volume_node, new_volume_node, \
        volume_array

    arr, geo = read_image(openkbp_dir / "imagesTr" / f"{A}_0000.nii.gz")
    node = new_volume_node(arr.astype(np.float64) + 0.1, geo, "CT")
    path = export_volume_node(node, tmp_path / "ct.nii.gz")
    from_file = file_identity(path, A)
    from_node = image_identity(volume_array(node), geometry_from_volume_node(node))
    assert identity_mismatch(from_file, from_node) is None

