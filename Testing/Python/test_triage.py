"""Case triage (metrics.triage) and the out-of-distribution aggregates (metrics.atypicality):
priority order, risk–coverage against a hand computation, the atypicality aggregate on a synthetic
case, and what ``fit-temperature`` / ``evaluate`` / ``maps`` write for them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.metrics import atypicality as at
from CalibUncertaintyLib.metrics.triage import curve_rows, rank_cases, triage_summary


def test_priority_order_highest_first_undefined_first_ties_in_input_order():
    aggs = [{"mean_u_roi": 0.2}, {"mean_u_roi": 0.5}, {"mean_u_roi": None}, {"mean_u_roi": 0.2},
            {"mean_u_roi": 0.9}]
    r = rank_cases(["a", "b", "c", "d", "e"], aggs, "mean_u_roi")
    assert [x["case"] for x in r] == ["c", "e", "b", "a", "d"]
    assert [x["rank"] for x in r] == [1, 2, 3, 4, 5]
    assert r[0]["undefined"] and r[0]["priority"] is None and r[1]["priority"] == 0.9
    # another aggregate gives another order
    r2 = rank_cases(["a", "b"], [{"mean_u_roi": 0.1, "sum_u_fg": 9.0}, {"mean_u_roi": 0.2, "sum_u_fg": 1.0}],
                    "sum_u_fg")
    assert [x["case"] for x in r2] == ["a", "b"]
    with pytest.raises(InputError, match="unknown review priority"):
        rank_cases(["a"], [{}], "nope")


def test_risk_coverage_and_aurc_by_hand():
    # risks 0.1, 0.6, 0.3, 0.4 (Dice 0.9, 0.4, 0.7, 0.6); priority 0.1, 0.8, None(=+inf), 0.3
    ids = ["a", "b", "c", "d"]
    aggs = [{"mean_u_roi": 0.1}, {"mean_u_roi": 0.8}, {"mean_u_roi": None}, {"mean_u_roi": 0.3}]
    dice = [0.9, 0.4, 0.7, 0.6]
    t = triage_summary(ids, aggs, dice, "mean_u_roi")
    assert [x["case"] for x in t["ranking"]] == ["c", "b", "d", "a"]
    assert t["ranking"][0]["risk"] == pytest.approx(0.3)
    rc = t["aggregates"]["mean_u_roi"]["risk_coverage"]
    # accepted without review, lowest priority first: a (0.1), d (0.4), b (0.6), c (0.3, undefined = last)
    by_hand = [0.1, (0.1 + 0.4) / 2, (0.1 + 0.4 + 0.6) / 3, (0.1 + 0.4 + 0.6 + 0.3) / 4]
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert rc["risk"] == pytest.approx(by_hand)
    assert rc["aurc"] == pytest.approx(sum(by_hand) / 4)
    oracle = [0.1, 0.2, (0.1 + 0.3 + 0.4) / 3, 0.35]
    assert rc["aurc_optimal"] == pytest.approx(sum(oracle) / 4)
    assert t["oracle"]["risk"] == pytest.approx(oracle)
    assert t["aggregates"]["mean_u_roi"]["n_undefined"] == 1
    assert t["aggregates"]["mean_u_roi"]["n"] == 3  # correlations leave the undefined case out
    rows = curve_rows(t)
    assert [r["risk"] for r in rows if r["aggregate"] == "mean_u_roi"] == pytest.approx(by_hand)
    assert sum(r["aggregate"].startswith("oracle") for r in rows) == 4


def test_weighted_quantile_weights_cases_equally():
    a = np.zeros(1000, np.float32)  # a big case, all 0
    b = np.ones(10, np.float32)     # a small case, all 1
    # pooled plainly the 0.6 quantile would be 0; with equal case weights half the mass is at 1
    assert at.weighted_quantile([a, b], 0.6) == 1.0
    assert at.weighted_quantile([a, b], 0.4) == 0.0
    with pytest.raises(InputError):
        at.weighted_quantile([np.zeros(0)], 0.5)


def _synthetic_case(rng, doubt_everywhere: bool):
    """A 'body' (CT >= -500 HU) cube in air; entropy high on an organ's shell, or all over the body."""
    ct = np.full((20, 30, 30), -1000.0)
    ct[2:18, 3:27, 3:27] = 40.0
    body = ct >= -500
    u = np.where(body, rng.uniform(0.0, 0.05, ct.shape), 0.0)
    u[8:12, 12:18, 12:18] = 0.6  # the shell around an organ
    u[9:11, 13:17, 13:17] = 0.0
    if doubt_everywhere:
        u[body] += rng.uniform(0.4, 1.0, int(body.sum()))
    return ct, u


def test_atypicality_ranks_a_case_with_doubt_all_over_the_body_first():
    rng = np.random.default_rng(0)
    cal = [_synthetic_case(rng, False) for _ in range(5)]
    samples = []
    for i, (ct, u) in enumerate(cal):
        dom = at.case_domain(ct, u.shape)
        samples.append({"entropy": at.domain_sample(u, dom, seed=i)})
    ref = at.fit_reference(samples, "body", n_members=1)
    assert "mutual_information" not in ref["u_ref"] and "high_mi_body_fraction" not in ref["scores"]
    assert ref["domain"] == "body" and ref["body_hu"] == at.BODY_HU and ref["n_cases"] == 5
    # the calibration cases themselves: about 1 - q of their body above u_ref
    assert np.mean(ref["scores"]["high_entropy_body_fraction"]) == pytest.approx(0.01, abs=0.01)
    test_id = [_synthetic_case(rng, False) for _ in range(4)]
    ct_ood, u_ood = _synthetic_case(rng, True)
    vals = []
    for ct, u in [*test_id, (ct_ood, u_ood)]:
        a = at.case_atypicality({"entropy": u}, at.case_domain(ct, u.shape), ref)
        vals.append(a)
    f = [v["high_entropy_body_fraction"] for v in vals]
    assert f[-1] > 0.5 and max(f[:-1]) < 0.05
    # beyond every calibration case: the smallest p-value n calibration cases allow
    assert vals[-1]["high_entropy_body_fraction_p"] == pytest.approx(1 / 6)
    ranking = rank_cases(["t0", "t1", "t2", "t3", "ood"], vals, "high_entropy_body_fraction")
    assert ranking[0]["case"] == "ood"
    # the p-value by hand
    assert at.p_value(0.3, [0.1, 0.3, 0.5]) == pytest.approx(3 / 4)
    assert at.p_value(None, [0.1]) is None
    # no CT for a body reference: undefined, not a wrong number
    assert at.case_atypicality({"entropy": u_ood}, at.case_domain(None, u_ood.shape), ref) == {}
    assert at.case_domain(None, (2, 2, 2), "whole_image").all()
    with pytest.raises(InputError, match="shape"):
        at.case_domain(ct_ood, (1, 2, 3))


def test_organ_volume_atypicality_by_hand_and_leave_one_out_reference():
    import math

    # medians 2000 and 0 mm³; v0 = 1000 mm³
    assert at.volume_atypicality([2000.0, 0.0], [2000.0, 0.0]) == 0.0
    assert at.volume_atypicality([0.0, 9000.0], [2000.0, 0.0]) == pytest.approx(
        (abs(math.log(1000 / 3000)) + abs(math.log(10000 / 1000))) / 2)
    vols = [[1000.0, 10.0], [2000.0, 20.0], [4000.0, 40.0]]
    ref = at.fit_reference([{"entropy": np.zeros(5, np.float32)}] * 3, "body", 1, volumes_per_case=vols)
    assert ref["volume_median_mm3"] == [2000.0, 20.0]
    # case 0 against the median of cases 1 and 2 (3000, 30)
    assert ref["scores"]["organ_volume_atypicality"][0] == pytest.approx(
        (abs(math.log(2000 / 4000)) + abs(math.log(1010 / 1030))) / 2)
    a = at.case_atypicality({}, None, ref, volumes_mm3=[0.0, 0.0])  # no organ at all, no CT
    assert set(a) == {"organ_volume_atypicality", "organ_volume_atypicality_p"}
    assert a["organ_volume_atypicality_p"] == pytest.approx(1 / 4)  # beyond every calibration case
    with pytest.raises(InputError, match="one predicted volume per foreground class"):
        at.volume_atypicality([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A phantom CT dataset, synthetic 3-member ensembles, and an 'OOD' case whose members
    disagree all over the body (its own CT: a copy of a test case's image)."""
    from CalibUncertaintyLib.io.images import read_image, write_image
    from CalibUncertaintyLib.io.nnunet_outputs import write_member_probs
    from CalibUncertaintyLib.synthetic.members import make_member_folders
    from CalibUncertaintyLib.synthetic.phantom import PhantomSpec, write_phantom_dataset

    root = tmp_path_factory.mktemp("triage")
    spec = PhantomSpec(shape_zyx=(20, 40, 40))
    ds = write_phantom_dataset(root / "raw", n_train=5, n_test=4, seed=3, spec=spec)
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    for case in ds.train_cases + ds.test_cases:
        (images / f"{case}_0000.nii.gz").symlink_to(ds.image(case))
        (labels / f"{case}.nii.gz").symlink_to(ds.label(case))
    (labels.parent / "dataset.json").write_text((ds.folder / "dataset.json").read_text())
    ood = "ood_case"
    src = ds.test_cases[0]
    ct, g = read_image(ds.image(src))
    write_image(images / f"{ood}_0000.nii.gz", ct, g)
    lab, _ = read_image(ds.label(src))
    write_image(labels / f"{ood}.nii.gz", lab, g)
    cases = list(ds.train_cases + ds.test_cases) + [ood]
    dirs = make_member_folders(labels, root / "members", cases, n_members=3, seed=0)
    rng = np.random.default_rng(1)
    body = ct >= -500
    for d in dirs:  # each member: its own random class over the body, confident about it
        with np.load(d / f"{ood}.npz") as z:
            p = z["probabilities"].astype(np.float32)
        noise = rng.dirichlet(np.ones(p.shape[0]) * 0.3, size=int(body.sum())).T.astype(np.float32)
        p[:, body] = 0.5 * p[:, body] + 0.5 * noise
        write_member_probs(d, ood, p / p.sum(axis=0, keepdims=True), g)
    return {"root": root, "members": [str(d) for d in dirs], "images": str(images), "labels": str(labels),
            "cal": list(ds.train_cases), "test": list(ds.test_cases), "ood": ood}


def _fit(c, tmp_path):
    from CalibUncertaintyLib.cli.main import main

    cal = tmp_path / "cal.json"
    assert main(["fit-temperature", "--members", *c["members"], "--images", c["images"], "--labels", c["labels"],
                 "--cases", *c["cal"], "-o", str(cal)]) == 0
    return cal


def test_fit_writes_the_reference_and_evaluate_writes_the_triage(cohort, tmp_path, capsys):
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.cli.main import main

    c = cohort
    cal = _fit(c, tmp_path)
    assert "atypicality reference (5 cases, body (CT >= -500 HU)): entropy above" in capsys.readouterr().out
    ref = CalibrationFile.load(cal).case_reference
    assert ref["domain"] == "body" and ref["n_cases"] == len(c["cal"])
    assert set(ref["scores"]) == {"high_entropy_body_fraction", "high_mi_body_fraction", "organ_volume_atypicality"}
    assert len(ref["volume_median_mm3"]) == 2  # node, vessel
    assert all(len(v) == len(c["cal"]) for v in ref["scores"].values())
    out = tmp_path / "ev"
    assert main(["evaluate", "--members", *c["members"], "--images", c["images"], "--labels", c["labels"],
                 "--cases", *c["test"], c["ood"], "--calibration", str(cal), "--priority",
                 "high_mi_body_fraction", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"review priority high_mi_body_fraction: first {c['ood']}" in printed
    rows = list(csv.DictReader((out / "triage_cases.csv").open()))
    assert [r["review_rank"] for r in rows] == [str(i) for i in range(1, len(c["test"]) + 2)]
    assert rows[0]["case"] == c["ood"] and rows[0]["priority_aggregate"] == "high_mi_body_fraction"
    assert float(rows[0]["high_mi_body_fraction"]) > max(float(r["high_mi_body_fraction"]) for r in rows[1:])
    assert float(rows[0]["high_mi_body_fraction_p"]) == pytest.approx(1 / (len(c["cal"]) + 1), abs=1e-5)
    curve = list(csv.DictReader((out / "risk_coverage.csv").open()))
    prio = [r for r in curve if r["aggregate"] == "high_mi_body_fraction"]
    assert len(prio) == len(rows) and float(prio[-1]["coverage"]) == 1.0
    # the last point (everything accepted) is the mean risk of all cases
    mean_risk = np.mean([1 - float(r["mean_dice"]) for r in rows])
    assert float(prio[-1]["risk"]) == pytest.approx(mean_risk, abs=1e-5)
    t = json.loads((out / "triage.json").read_text())
    assert t["priority"] == "high_mi_body_fraction" and t["ranking"][0]["case"] == c["ood"]
    assert (out / "risk_coverage.png").stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "## Which cases to review first (case triage)" in report
    assert "high_mi_body_fraction (priority)" in report
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["options"]["priority"] == "high_mi_body_fraction"


def test_evaluate_refuses_an_atypicality_priority_without_a_reference(cohort, tmp_path, capsys):
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.cli.main import main

    c = cohort
    cal = _fit(c, tmp_path)
    old = CalibrationFile.load(cal)
    old.case_reference = None  # a file written before the reference existed
    old.save(tmp_path / "old.json")
    assert "case_reference" not in json.loads((tmp_path / "old.json").read_text())
    out = tmp_path / "ev"
    code = main(["evaluate", "--members", *c["members"], "--images", c["images"], "--labels", c["labels"],
                 "--cases", *c["test"], "--calibration", str(tmp_path / "old.json"), "--priority",
                 "high_entropy_body_fraction", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no atypicality reference" in err
    assert not (out / "triage_cases.csv").exists()


def test_maps_write_each_cases_aggregates_and_the_folder_review_order(cohort, tmp_path):
    from CalibUncertaintyLib.cli.main import main

    c = cohort
    cal = _fit(c, tmp_path)
    out = tmp_path / "maps"
    cases = [*c["test"], c["ood"]]
    assert main(["maps", "--members", *c["members"], "--images", c["images"], "--cases", *cases,
                 "--calibration", str(cal), "-o", str(out)]) == 0
    aggs = {case: json.loads((out / case / "summary.json").read_text())["case_aggregates"] for case in cases}
    for a in aggs.values():
        assert a["map"] == "dae" and a["default_priority"] == "fraction_fg_flagged"
        assert {"mean_u_roi", "sum_u_fg", "largest_region_mm3", "fraction_fg_flagged", "high_entropy_body_fraction",
                "high_mi_body_fraction", "high_mi_body_fraction_p", "organ_volume_atypicality",
                "organ_volume_atypicality_p"} <= set(a)
    assert max(aggs, key=lambda k: aggs[k]["high_mi_body_fraction"]) == c["ood"]
    index = json.loads((out / "summary.json").read_text())
    review = index["review"]
    assert review["priority"] == "fraction_fg_flagged"  # the default, chosen on the stock model (metrics/triage.py)
    assert review["order"] == sorted(cases, key=lambda k: -aggs[k]["fraction_fg_flagged"])
    assert {r["case"]: r["case_aggregates"] for r in index["cases"]} == aggs
    # the same aggregates as evaluate computes for the same case and calibration
    ev_out = tmp_path / "ev"
    assert main(["evaluate", "--members", *c["members"], "--images", c["images"], "--labels", c["labels"],
                 "--cases", c["ood"], "--calibration", str(cal), "-o", str(ev_out)]) == 0
    row = list(csv.DictReader((ev_out / "triage_cases.csv").open()))[0]
    for key in ("mean_u_roi", "fraction_fg_flagged", "high_entropy_body_fraction", "high_mi_body_fraction",
                "organ_volume_atypicality"):
        assert float(row[key]) == pytest.approx(aggs[c["ood"]][key], rel=1e-5, abs=1e-7)
    # without the CT the body is unknown: the atypicality aggregates are left out, and it says why
    out2 = tmp_path / "maps_no_ct"
    assert main(["maps", "--members", *c["members"], "--cases", c["ood"], "--calibration", str(cal),
                 "-o", str(out2)]) == 0
    a2 = json.loads((out2 / c["ood"] / "summary.json").read_text())["case_aggregates"]
    assert "high_entropy_body_fraction" not in a2 and "no CT" in a2["note"]
    # the organ volume atypicality needs no CT
    assert a2["organ_volume_atypicality"] == pytest.approx(aggs[c["ood"]]["organ_volume_atypicality"])
    assert a2["mean_u_roi"] == pytest.approx(aggs[c["ood"]]["mean_u_roi"])


def test_describe_atypical_names_cases_by_their_smallest_p_value():
    a = {"organ_volume_atypicality": 2.1, "organ_volume_atypicality_p": 0.04, "high_entropy_body_fraction": 0.3,
         "high_entropy_body_fraction_p": 0.09, "high_mi_body_fraction": 0.01, "high_mi_body_fraction_p": 0.5}
    assert at.describe_atypical(a) == "organ volumes p = 0.04, high-entropy body fraction p = 0.09"
    assert at.describe_atypical(a, level=0.05) == "organ volumes p = 0.04"
    assert at.describe_atypical({"organ_volume_atypicality_p": 0.2}) is None
    assert at.describe_atypical({"mean_u_roi": 0.3}) is None and at.describe_atypical(None) is None
    records = [{"case": "b", "case_aggregates": {"high_mi_body_fraction_p": 0.08}},
               {"case": "typical", "case_aggregates": {"organ_volume_atypicality_p": 0.6}},
               {"case": "a", "case_aggregates": a}, {"case": "region_model", "case_aggregates": None}]
    assert at.atypical_cases(records) == [("a", at.describe_atypical(a)), ("b", "high-MI body fraction p = 0.08")]
    line = at.atypical_summary_line(records)
    assert line.startswith("Atypical case(s)") and line.index("a (organ volumes") < line.index("b (high-MI")
    assert "typical (" not in line
    assert at.atypical_summary_line(records[1:2]) is None
    assert "unlike the calibration cases (organ volumes p = 0.04" in at.atypicality_warning(a)


def test_maps_and_evaluate_name_the_atypical_case(cohort, tmp_path, capsys):
    """The OOD case is named at the end of ``maps``, in the evaluation report and in the panel's
    warning, with its p-value; the others are not. The reference is the fitted one with its
    calibration cases' values counted twice (as from 10 calibration cases: p-values down to 1/11)."""
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.cli.main import main
    from CalibUncertaintyLib.mrml.atypical import warning_lines

    c = cohort
    cal = CalibrationFile.load(_fit(c, tmp_path))
    ref = cal.case_reference
    ref["scores"] = {k: v + v for k, v in ref["scores"].items()}
    ref["n_cases"] = 2 * ref["n_cases"]
    cal.save(tmp_path / "cal10.json")
    capsys.readouterr()
    out = tmp_path / "maps"
    cases = [*c["test"], c["ood"]]
    assert main(["maps", "--members", *c["members"], "--images", c["images"], "--cases", *cases,
                 "--calibration", str(tmp_path / "cal10.json"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    line = [x for x in printed if x.startswith("Atypical case(s)")]
    assert len(line) == 1
    assert f"{c['ood']} (high-entropy body fraction p = 0.091, high-MI body fraction p = 0.091)" in line[0]
    # exactly the cases with an atypicality p-value <= 0.1 in their summary.json are named (a test case
    # whose predicted organ volumes lie beyond every calibration case's is named too: that is the rule)
    summaries = {k: json.loads((out / k / "summary.json").read_text()) for k in cases}
    low = {k for k, s in summaries.items()
           if any((s["case_aggregates"].get(f"{a}_p") or 1.0) <= 0.1 for a in at.ATYPICALITY_AGGREGATES)}
    assert {k for k in cases if f"{k} (" in line[0]} == low and c["ood"] in low
    for k, s in summaries.items():
        assert bool(warning_lines(s)) == (k in low)
    assert "unlike the calibration cases (high-entropy body fraction p = 0.091" in warning_lines(summaries[c["ood"]])[0]
    ev = tmp_path / "ev"
    assert main(["evaluate", "--members", *c["members"], "--images", c["images"], "--labels", c["labels"],
                 "--cases", *cases, "--calibration", str(tmp_path / "cal10.json"), "-o", str(ev)]) == 0
    report = (ev / "report.md").read_text()
    section = report.split("## Atypical cases (unlike the calibration cases)")[1].split("\n## ")[0]
    assert {k for k in cases if f"- **{k}**:" in section} == low
    # no reference in the calibration file: nothing is named, no line, no section
    capsys.readouterr()
    cal.case_reference = None
    cal.save(tmp_path / "old.json")
    assert main(["maps", "--members", *c["members"], "--images", c["images"], "--cases", c["ood"],
                 "--calibration", str(tmp_path / "old.json"), "-o", str(tmp_path / "maps_old")]) == 0
    assert "Atypical case(s)" not in capsys.readouterr().out
