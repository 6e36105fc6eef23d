"""process_case: members -> calibrated probabilities, maps, regions and files in the input geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
from CalibUncertaintyLib.calibration.temperature import apply_temperature
from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.io.images import read_image
from CalibUncertaintyLib.pipeline import case as case_mod
from CalibUncertaintyLib.pipeline.case import CaseOptions, process_case, safe_name
from CalibUncertaintyLib.progress import parse_progress_line
from CalibUncertaintyLib.synthetic.members import member_probabilities
from CalibUncertaintyLib.uncertainty.maps import MAP_NAMES

GEOM = Geometry((20, 24, 28), (1.25, 0.875, 2.0), (10.5, -20.25, 5.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
NAMES = ["background", "Left Parotid", "Cord"]
REGION_KEYS = {"rank", "n_voxels", "volume_mm3", "mean_u", "max_u", "class_index", "class_name",
               "centroid_ras", "centroid_zyx", "bbox_zyx_min", "bbox_zyx_max", "score"}


@pytest.fixture(scope="module")
def labels():
    z, y, x = np.indices(GEOM.shape_zyx)
    lab = np.zeros(GEOM.shape_zyx, np.uint8)
    lab[(z - 10) ** 2 * 4 + (y - 12) ** 2 * 0.8 + (x - 10) ** 2 * 1.44 < 60] = 1
    lab[4:16, 6:14, 18:24] = 2
    return lab


@pytest.fixture(scope="module")
def members(labels):
    return list(member_probabilities(labels, GEOM, 3, 3, "c1", seed=5))


def _cal(**kw):
    base = dict(method="temperature", temperature=2.0, class_names=NAMES, fingerprint={"n_classes": 3},
                ebcu_threshold=0.3)
    base.update(kw)
    return CalibrationFile(**base).validate()


def test_outputs_follow_the_contract(tmp_path, members, capsys, monkeypatch):
    monkeypatch.setenv("CALIBU_PROGRESS", "1")
    s = process_case("c1", iter(members), GEOM, tmp_path, None, NAMES, CaseOptions(n_members=3))
    d = tmp_path / "c1"
    expected = {"seg.nii.gz", "prob_Left_Parotid.nii.gz", "prob_Cord.nii.gz", "regions.json", "summary.json"}
    expected |= {f"map_{n}.nii.gz" for n in MAP_NAMES}
    assert {p.name for p in d.iterdir()} == expected
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left
    pbar = np.mean(members, axis=0)
    seg, g = read_image(d / "seg.nii.gz")
    assert g == GEOM and seg.dtype == np.uint8 and np.array_equal(seg, pbar.argmax(0))
    for f in expected - {"regions.json", "summary.json"}:
        arr, g = read_image(d / f)
        assert g.mismatch(GEOM) is None and g.direction == GEOM.direction, f
        assert np.all(np.isfinite(arr)), f
    p1, _ = read_image(d / "prob_Left_Parotid.nii.gz")
    assert np.allclose(p1, pbar[1], atol=1e-6)  # uncalibrated: p̄ itself
    regions = json.loads((d / "regions.json").read_text())
    assert regions["case"] == "c1" and regions["map"] == "dae" and regions["class_names"] == NAMES
    assert regions["threshold_source"].startswith("default") and regions["roi"]["radius_mm"] == 15.0
    for r in regions["regions"]:
        assert set(r) >= REGION_KEYS and r["volume_mm3"] >= 10.0
        assert np.allclose(r["centroid_ras"], GEOM.zyx_to_ras(np.array(r["centroid_zyx"])))
    assert [r["rank"] for r in regions["regions"]] == list(range(1, len(regions["regions"]) + 1))
    summary = json.loads((d / "summary.json").read_text())
    assert summary == json.loads(json.dumps(s)) and summary["n_members"] == 3 and summary["calibration"] is None
    assert Geometry.from_dict(summary["geometry"]) == GEOM
    assert set(summary["timings_s"]) >= {"accumulate_s", "maps_s", "regions_s", "write_s", "total_s"}
    assert summary["thresholds"]["confidence"]["flag"] == "below"
    events = [e for e in map(parse_progress_line, capsys.readouterr().err.splitlines()) if e]
    assert [e["member"] for e in events if e["stage"] == "accumulate" and "member" in e] == [1, 2, 3]
    assert events[-1]["stage"] == "done" and events[-1]["fraction"] == 1.0


def test_temperature_changes_probabilities_not_segmentation(tmp_path, members):
    cal = _cal(thresholds={"dae": {"tau": 0.05, "kind": "absolute"}})
    process_case("c1", members, GEOM, tmp_path / "raw", None, NAMES)
    process_case("c1", members, GEOM, tmp_path / "cal", cal, NAMES)
    seg_raw, _ = read_image(tmp_path / "raw" / "c1" / "seg.nii.gz")
    seg_cal, _ = read_image(tmp_path / "cal" / "c1" / "seg.nii.gz")
    assert np.array_equal(seg_raw, seg_cal)
    p_cal, _ = read_image(tmp_path / "cal" / "c1" / "prob_Cord.nii.gz")
    expected = apply_temperature(np.mean(members, axis=0), 2.0)[2]
    assert np.allclose(p_cal, expected, atol=1e-5)
    regions = json.loads((tmp_path / "cal" / "c1" / "regions.json").read_text())
    assert regions["threshold"] == pytest.approx(0.05) and regions["threshold_source"] == "calibration file"
    summary = json.loads((tmp_path / "cal" / "c1" / "summary.json").read_text())
    assert summary["calibration"]["temperature"] == 2.0 and summary["ebcu_threshold"] == pytest.approx(0.3)


def test_per_member_mode_scales_each_member(tmp_path, members):
    cal = _cal(ensemble_mode="per_member")
    process_case("c1", members, GEOM, tmp_path, cal, NAMES, CaseOptions(map_names=("entropy",), regions_map="entropy"))
    p, _ = read_image(tmp_path / "c1" / "prob_Left_Parotid.nii.gz")
    expected = np.mean([apply_temperature(m, 2.0) for m in members], axis=0)[1]
    assert np.allclose(p, expected, atol=1e-5)
    assert {f.name for f in (tmp_path / "c1").glob("map_*")} == {"map_entropy.nii.gz"}
    with pytest.raises(InputError, match="fitted in 'per_member' mode"):
        process_case("c1", members, GEOM, tmp_path, cal, NAMES, CaseOptions(ensemble_mode="pool_then_calibrate"))


def test_one_member_is_stated_and_mi_is_zero(tmp_path, members):
    s = process_case("c1", members[:1], GEOM, tmp_path, None, NAMES)
    mi, _ = read_image(tmp_path / "c1" / "map_mutual_information.nii.gz")
    assert s["n_members"] == 1 and not mi.any() and "mutual information and EPKL are zero" in s["notes"][0]


def test_empty_prediction_gives_no_regions(tmp_path):
    empty = np.zeros(GEOM.shape_zyx, np.uint8)
    s = process_case("e", member_probabilities(empty, GEOM, 3, 2), GEOM, tmp_path, None, NAMES)
    regions = json.loads((tmp_path / "e" / "regions.json").read_text())
    assert regions["regions"] == [] and s["roi"]["n_voxels"] == 0
    assert any("ROI is empty" in n for n in s["notes"])


def test_bad_members_and_options(tmp_path, members):
    bad = members[1].copy()
    bad[0, 3, 3, 3] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        process_case("c1", [members[0], bad], GEOM, tmp_path, None, NAMES)
    with pytest.raises(InputError, match="members have shape"):
        process_case("c1", members, Geometry((20, 24, 29), GEOM.spacing), tmp_path, None, NAMES)
    with pytest.raises(InputError, match="2 class names for 3"):
        process_case("c1", members, GEOM, tmp_path, None, NAMES[:2])
    with pytest.raises(InputError, match="unknown map name"):
        process_case("c1", members, GEOM, tmp_path, None, NAMES, CaseOptions(regions_map="nope"))
    with pytest.raises(InputError, match="no ensemble member"):
        process_case("c1", [], GEOM, tmp_path, None, NAMES)
    assert not (tmp_path / "c1").exists() and list(tmp_path.iterdir()) == []
    assert safe_name("Left Parotid (L)") == "Left_Parotid_L"


def test_failure_while_writing_keeps_the_previous_case_folder(tmp_path, members, monkeypatch):
    process_case("c1", members, GEOM, tmp_path, None, NAMES)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c1").iterdir()}
    calls = {"n": 0}
    real = case_mod.write_image

    def failing_write(path, array, geometry):  # fault injection: the disk fills up on the 4th file
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(path, array, geometry)

    monkeypatch.setattr(case_mod, "write_image", failing_write)
    with pytest.raises(OSError):
        process_case("c1", members, GEOM, tmp_path, _cal(), NAMES)
    after = {p.name: p.read_bytes() for p in (tmp_path / "c1").iterdir()}
    assert after == before  # the complete earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1"]  # the half-written folder is removed
    (tmp_path / ".c1.partial").mkdir()  # as a killed run would leave it
    monkeypatch.setattr(case_mod, "write_image", real)
    process_case("c1", members, GEOM, tmp_path, _cal(), NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1"]
    assert json.loads((tmp_path / "c1" / "summary.json").read_text())["calibration"]["temperature"] == 2.0


def test_pooled_reliability_tables_equal_the_table_of_all_voxels():
    """report.tables: merging per-case tables = one table over the concatenated voxels (METHODS §3)."""
    from CalibUncertaintyLib.metrics.ece import expected_calibration_error, reliability_table
    from CalibUncertaintyLib.report.tables import aggregate_rows, ece_from_table, merge_reliability_tables

    rng = np.random.default_rng(0)
    conf = [rng.uniform(0.3, 1.0, n) for n in (500, 1300)]
    correct = [rng.uniform(size=c.size) < c ** 2 for c in conf]
    merged = merge_reliability_tables([reliability_table(c, k) for c, k in zip(conf, correct)])
    whole = reliability_table(np.concatenate(conf), np.concatenate(correct))
    for a, b in zip(merged, whole):
        assert a["count"] == b["count"]
        if a["count"]:
            assert a["mean_confidence"] == pytest.approx(b["mean_confidence"]) and a["accuracy"] == pytest.approx(b["accuracy"])
    assert ece_from_table(merged) == pytest.approx(expected_calibration_error(np.concatenate(conf), np.concatenate(correct)))
    agg = aggregate_rows([{"case": "a", "g": "x", "v": 1.0}, {"case": "b", "g": "x", "v": 3.0},
                          {"case": "c", "g": "x", "v": None}], group_by=("g",))
    assert agg == [{"g": "x", "n_cases": 3, "v.mean": 2.0, "v.std": pytest.approx(2 ** 0.5), "v.median": 2.0,
                    "v.min": 1.0, "v.max": 3.0, "v.n": 2}]


class SlabSource:
    """A member computed slab by slab on demand (the shape of nnunet.member_probabilities)."""

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, array):
        self.array, self.shape, self.reads = np.asarray(array, np.float32), np.shape(array), 0

    def slab(self, sl):
        self.reads += 1
        return self.array[:, sl].copy()


@pytest.mark.parametrize("mode", ["pool_then_calibrate", "per_member"])
def test_members_computed_slab_by_slab_give_the_same_outputs(tmp_path, members, mode):
    cal = _cal(ensemble_mode=mode)
    opts = CaseOptions(map_names=("entropy", "epkl", "dae"), regions_map="dae")
    sources = [SlabSource(m) for m in members]
    a = process_case("c1", members, GEOM, tmp_path / "arrays", cal, NAMES, opts)
    b = process_case("c1", sources, GEOM, tmp_path / "slabs", cal, NAMES, opts)
    assert all(s.reads >= 2 for s in sources)  # validated, then accumulated
    assert a["maps"] == b["maps"] and a["n_regions"] == b["n_regions"]
    for name in ("prob_Cord.nii.gz", "map_epkl.nii.gz", "seg.nii.gz"):
        np.testing.assert_array_equal(read_image(tmp_path / "arrays" / "c1" / name)[0],
                                      read_image(tmp_path / "slabs" / "c1" / name)[0])


def test_bad_member_computed_slab_by_slab_is_refused_before_anything_is_added(members):
    from CalibUncertaintyLib.uncertainty.streaming import EnsembleAccumulator

    acc = EnsembleAccumulator(3, GEOM.shape_zyx, slab_voxels=200)
    acc.add(SlabSource(members[0]))
    before = acc.sum_probs.copy()
    bad = members[1].copy()
    bad[:, -1, 0, 0] = np.nan  # in the last slab only
    with pytest.raises(InputError, match="non-finite probability"):
        acc.add(SlabSource(bad), name="lazy")
    assert acc.n_members == 1
    np.testing.assert_array_equal(acc.sum_probs, before)


def test_probability_files_only_for_the_classes_asked_for(tmp_path, members):
    """--probabilities: a subset (by name or label) or none; seg and maps unchanged; the Slicer
    reader (mrml/case_folder.py) then expects only the files summary.json lists."""
    from CalibUncertaintyLib.mrml.case_folder import read_case_folder

    full = process_case("c1", members, GEOM, tmp_path / "all", _cal(), NAMES)
    some = process_case("c1", members, GEOM, tmp_path / "some", _cal(), NAMES,
                        CaseOptions(probability_classes=("Cord",)))
    none = process_case("c1", members, GEOM, tmp_path / "none", _cal(), NAMES,
                        CaseOptions(probability_classes=()))
    assert full["probability_classes"] == ["Left Parotid", "Cord"]
    assert some["probability_classes"] == ["Cord"] and none["probability_classes"] == []
    assert not (tmp_path / "some" / "c1" / "prob_Left_Parotid.nii.gz").exists()
    assert not list((tmp_path / "none" / "c1").glob("prob_*"))
    for name in ["seg.nii.gz", "prob_Cord.nii.gz"] + [f"map_{n}.nii.gz" for n in MAP_NAMES]:
        a = read_image(tmp_path / "all" / "c1" / name)[0]
        assert np.array_equal(a, read_image(tmp_path / "some" / "c1" / name)[0]), name
    by_label = process_case("c1", members, GEOM, tmp_path / "lab", _cal(), NAMES,
                            CaseOptions(probability_classes=("2",)))
    assert by_label["probability_classes"] == ["Cord"]
    data = read_case_folder(tmp_path / "some" / "c1", probabilities=False)
    assert list(data.probability_files) == ["Cord"]
    assert read_case_folder(tmp_path / "none" / "c1").probability_files == {}
    (tmp_path / "some" / "c1" / "prob_Cord.nii.gz").unlink()  # a listed file missing is still an error
    with pytest.raises(InputError, match="prob_Cord.nii.gz"):
        read_case_folder(tmp_path / "some" / "c1")
    with pytest.raises(InputError, match="no foreground class 'Liver'"):
        process_case("c1", members, GEOM, tmp_path / "bad", _cal(), NAMES,
                     CaseOptions(probability_classes=("Liver",)))
    assert not (tmp_path / "bad" / "c1").exists()
