"""Per-organ quality intervals, contour-level errors and guarantees, the exchangeability check
(docs/METHODS.md "Per-organ quality", "Contour-level guarantees", "When a guarantee does not apply"):
the parts against independent computations and on synthetic exchangeable data, the calibration
file round trip, and the journey fit-temperature -> maps -> summary.json -> Slicer table."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from CalibUncertaintyLib.calibration import organ_quality as oq
from CalibUncertaintyLib.calibration.contour_conformal import contour_margin_losses, contour_margin_thresholds
from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.metrics import contour, exchangeability as ex

SPACING = (2.5, 0.8, 1.3)  # anisotropic, z y x (mm)


# --- geometry in mm against brute force -----------------------------------------------------

def _brute_distance(target, spacing):
    """d(x, target) by the definition: min over target voxels of sqrt(Σ max(|Δ|h − h/2, 0)²)."""
    idx = np.argwhere(target).astype(float)
    h = np.asarray(spacing, float)
    out = np.full(target.shape, np.inf)
    for x in itertools.product(*[range(n) for n in target.shape]):
        if idx.size:
            gap = np.maximum(np.abs(idx - np.asarray(x, float)) * h - h / 2, 0.0)
            out[x] = 0.0 if target[x] else np.sqrt((gap ** 2).sum(axis=1)).min()
    return out


def _blob(rng, shape, centre, radii):
    z, y, x = np.indices(shape)
    r = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    return r + 0.3 * rng.random(shape) < 1.0


def test_contour_errors_and_surface_dice_match_brute_force_in_mm():
    rng = np.random.default_rng(4)
    shape = (7, 13, 11)
    for trial in range(3):
        pred = _blob(rng, shape, (3, 6, 5), (2.2, 4.5, 3.5))
        ref = _blob(rng, shape, (3 + rng.integers(-1, 2), 6 + rng.integers(-3, 4), 5 + rng.integers(-2, 3)),
                    (2.0, 5.0, 3.0))
        d_ref, d_pred = _brute_distance(ref, SPACING), _brute_distance(pred, SPACING)
        assert np.allclose(contour.distance_to_mm(ref, SPACING), d_ref, atol=1e-4)
        for t in (0.0, 1.25, 3.0, 4.0):  # 1.25 = half a z voxel: an exact tie counts as within
            fn, fp = contour.class_contour_errors(pred, ref, SPACING, t)
            assert np.array_equal(fn, ref & ~pred & (d_pred > t + 1e-6)), (trial, t)
            assert np.array_equal(fp, pred & ~ref & (d_ref > t + 1e-6)), (trial, t)
            assert not (fn & pred).any() and not (fp & ref).any()
            # surface Dice by the definition, borders by face neighbours
            bp, bg = contour.border(pred), contour.border(ref)
            dbp, dbg = _brute_distance(bp, SPACING), _brute_distance(bg, SPACING)
            want = ((dbg[bp] <= t + 1e-6).sum() + (dbp[bg] <= t + 1e-6).sum()) / (bp.sum() + bg.sum())
            assert contour.surface_dice(pred, ref, SPACING, t) == pytest.approx(want, abs=1e-12)
    # a shift by one voxel is within 3 mm on a 3.9 mm grid (half a voxel from the contour); by two it is not
    a = np.zeros((3, 12, 12), bool)
    a[1, 3:8, 3:8] = True
    for shift, expect in ((1, 0), (2, 5)):
        b = np.roll(a, shift, axis=2)
        fn, fp = contour.class_contour_errors(a, b, (2.5, 3.9, 3.9), 3.0)
        assert fn.sum() == expect and fp.sum() == expect
    assert contour.surface_dice(a, np.zeros_like(a), (1, 1, 1), 3.0) == 0.0
    assert contour.surface_dice(np.zeros_like(a), np.zeros_like(a), (1, 1, 1), 3.0) == 1.0
    with pytest.raises(InputError, match="tolerance"):
        contour.class_contour_errors(a, a, (1, 1, 1), -1.0)


def test_expected_dice_of_the_model_itself():
    shape = (9, 21, 21)
    z, y, x = np.indices(shape)
    r = np.sqrt(((z - 4) * 2.0) ** 2 + (y - 10) ** 2 + (x - 10) ** 2)
    pred = r < 6
    sharp = oq.organ_features(oq.level_index(pred.astype(np.float32)), pred, (2.0, 1.0, 1.0), 2.0)
    assert sharp == {"expected_dice": 1.0, "expected_surface_dice": 1.0}  # a certain model expects itself
    soft = oq.organ_features(oq.level_index(1 / (1 + np.exp(r - 6))), pred, (2.0, 1.0, 1.0), 2.0)
    softer = oq.organ_features(oq.level_index(1 / (1 + np.exp((r - 6) / 3))), pred, (2.0, 1.0, 1.0), 2.0)
    assert 1.0 > soft["expected_dice"] > softer["expected_dice"] > 0.3
    assert soft["expected_surface_dice"] > softer["expected_surface_dice"]
    # the all-levels-at-once computation equals surface Dice level by level (metrics.contour), anisotropic grid
    rng = np.random.default_rng(6)
    for sp, tol in (((2.5, 0.8, 1.3), 3.0), ((1.0, 1.0, 1.0), 1.5), ((3.0, 3.9, 3.9), 3.0)):
        noisy = np.clip(1 / (1 + np.exp((r - 6) / 2)) + 0.15 * rng.standard_normal(shape), 0, 1).astype(np.float32)
        pred_n = noisy > 0.5
        lv = oq.level_index(noisy)
        want_sd = np.mean([contour.surface_dice_from_border(contour.border(pred_n), lv > j, sp, tol) if (lv > j).any()
                           else 0.0 for j in range(len(oq.LEVELS))])
        want_d = np.mean([2 * (pred_n & (lv > j)).sum() / (pred_n.sum() + (lv > j).sum()) for j in range(len(oq.LEVELS))])
        got = oq.organ_features(lv, pred_n, sp, tol)
        assert got["expected_surface_dice"] == pytest.approx(want_sd, abs=1e-12)
        assert got["expected_dice"] == pytest.approx(want_d, abs=1e-12)
    with pytest.raises(InputError, match="empty prediction"):
        oq.organ_features(oq.level_index(np.zeros(shape)), np.zeros(shape, bool), (1, 1, 1), 2.0)


# --- the conformal interval -------------------------------------------------------------------

def _draw(rng, n):
    """Exchangeable (feature, Dice) pairs: a biased, heteroscedastic, heavy-tailed model."""
    x = rng.uniform(0.3, 0.97, n)
    y = np.clip(0.1 + 0.75 * x + 0.25 * (1 - x) * rng.standard_t(3, n), 0, 1)
    return x, y


def test_interval_coverage_on_exchangeable_cases_is_at_least_one_minus_alpha():
    rng = np.random.default_rng(0)
    for n, alpha in ((12, 0.1), (20, 0.2)):
        covered, widths = [], []
        for _ in range(1000):
            x, y = _draw(rng, n + 1)
            iv = oq.conformal_interval(x[:n], y[:n], x[n], alpha)
            assert not iv["trivial"] and iv["lower"] <= iv["predicted"] <= iv["upper"]
            covered.append(iv["lower"] <= y[n] <= iv["upper"])
            widths.append(iv["upper"] - iv["lower"])
        cov = float(np.mean(covered))
        se = math.sqrt(alpha * (1 - alpha) / len(covered))
        assert cov >= 1 - alpha - 3 * se, (n, alpha, cov)
        assert cov <= 1 - alpha + 1 / (n + 1) + 3 * se  # not trivially wide either
        assert np.mean(widths) < 0.8


def test_interval_is_the_exact_conformal_set_hull():
    """The exact candidate-point search equals a brute-force scan of p(y) on a fine grid."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, y = _draw(rng, 11)
        iv = oq.conformal_interval(x[:10], y[:10], x[10], 0.2)
        grid = np.linspace(0, 1, 20001)
        xa = np.append(x[:10], x[10])
        X = np.stack([np.ones(11), xa], 1)
        ya = np.concatenate([np.repeat(y[:10, None], grid.size, 1), grid[None, :]])  # (11, G): one column per y
        theta = np.linalg.solve(X.T @ X + np.eye(2), X.T @ ya + np.array([[0.0], [1.0]]))  # ridge toward (0, 1)
        s = np.abs(ya - X @ theta) / oq.sigma(xa)[:, None]
        kept = grid[np.mean(s >= s[-1] - 1e-12, axis=0) > 0.2]
        assert iv["lower"] == pytest.approx(min(kept), abs=1e-4) and iv["upper"] == pytest.approx(max(kept), abs=1e-4)


def test_too_few_cases_give_the_trivial_interval_and_say_how_many_are_needed():
    x, y = _draw(np.random.default_rng(1), 6)
    iv = oq.conformal_interval(x[:5], y[:5], x[5], 0.1)
    assert iv["trivial"] and (iv["lower"], iv["upper"]) == (0.0, 1.0)
    entry = {"predicted": True, "dice": iv, "surface_dice": iv}
    line = oq.organ_line("Mandible", entry, 0.1, 3.0)
    assert line.startswith("Mandible: Dice ") and "[0.00, 1.00]" in line and "90 % needs ≥ 9" in line
    assert oq.conformal_interval(*_draw(np.random.default_rng(1), 9)[:2], 0.5, 0.1)["trivial"] is False


# --- contour-level margins ---------------------------------------------------------------------

def test_contour_margins_meet_alpha_on_exchangeable_cases():
    """Held-out mean far-miss of the outer contour and far-extra inside the inner one ≤ α."""
    rng = np.random.default_rng(5)

    def case():
        n_fn, n_fp = rng.integers(0, 60), rng.integers(0, 60)
        p = np.concatenate([rng.beta(1, 4, n_fn), 0.5 + 0.5 * rng.beta(2, 2, n_fp)]).astype(np.float32)
        fn = np.arange(p.size) < n_fn
        return p, fn, ~fn

    alpha, n = 0.2, 10
    outer, inner = [], []
    for _ in range(300):
        cases = [case() for _ in range(n + 1)]
        th = contour_margin_thresholds([contour_margin_losses(*c) for c in cases[:n]], alpha)
        assert not th["trivial"] and th["inner"] >= 0.5
        p, fn, fp = cases[n]
        outer.append(np.mean(p[fn] < np.float32(th["outer"])) if fn.any() else 0.0)
        inner.append(np.mean(p[fp] > np.float32(th["inner"])) if fp.any() else 0.0)
    assert np.mean(outer) <= alpha + 0.03 and np.mean(inner) <= alpha + 0.03
    assert np.mean(outer) > 0.05 and np.mean(inner) > 0.05  # informative, not the trivial margins


# --- exchangeability ----------------------------------------------------------------------------

def test_exchangeability_p_value_is_valid_and_names_the_atypical_case():
    rng = np.random.default_rng(2)
    n, delta = 14, 0.1
    rejects = 0
    for _ in range(2000):
        v = rng.multivariate_normal([0, 0, 0], [[1, .6, .3], [.6, 1, .2], [.3, .2, 1]], n + 1)
        ref = {f"a{j}": v[:n, j].tolist() for j in range(3)}
        rejects += ex.combined_p_value({f"a{j}": v[n, j] for j in range(3)}, ref)["p_value"] <= delta
    assert rejects / 2000 <= delta + 3 * math.sqrt(delta * (1 - delta) / 2000)
    # one aggregate: the atypicality p-value itself; beyond every calibration case: 1/(n + 1)
    ref = {"a": list(range(n))}
    assert ex.combined_p_value({"a": 5.5}, ref)["p_value"] == pytest.approx((1 + 8) / (n + 1))
    block = ex.case_exchangeability({"a": 99.0, "b": None}, {"scores": {"a": ref["a"], "b": ref["a"]}}, delta)
    assert block["p_value"] == pytest.approx(1 / (n + 1)) and block["exchangeable"] is False
    assert block["left_out"] == ["b"] and "NOT exchangeable" in block["text"]
    assert "void" in ex.void_reason(block) or "not exchangeable" in ex.void_reason(block)
    small = ex.case_exchangeability({"a": 99.0}, {"scores": {"a": [1.0, 2.0, 3.0]}}, delta)
    assert small["testable"] is False and small["exchangeable"] is True and "needs ≥ 9" in small["text"]


# --- the calibration file ------------------------------------------------------------------------

def test_calibration_file_keeps_the_records_and_refuses_bad_ones():
    from CalibUncertaintyLib.calibration import conformal
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile
    from CalibUncertaintyLib.calibration.contour_conformal import build_contour_record

    rng = np.random.default_rng(0)
    rows = [[{"expected_dice": float(a), "expected_surface_dice": float(a), "dice": float(b), "surface_dice": 1.0},
             None] for a, b in zip(*_draw(rng, 10))]
    rec_q = oq.build_record(rows, ["Mandible", "Cord"], 0.1, conformal.ALPHA_GRID, 3.0)
    assert rec_q["classes"]["Cord"]["n_predicted"] == 0 and rec_q["classes"]["Mandible"]["n_predicted"] == 10
    curves = [contour_margin_losses(rng.random(20).astype(np.float32), rng.random(20) < .3, rng.random(20) < .3)
              for _ in range(10)]
    conf = conformal.build_record(0.1, {"entropy": [rng.random(5) for _ in range(10)]}, {})
    conf["contour"] = build_contour_record(0.1, 3.0, {"entropy": [rng.random(5) for _ in range(10)]},
                                           {"Mandible": curves})
    conf["error"] = "contour"
    cal = CalibrationFile(method="temperature", temperature=1.2, class_names=["background", "Mandible", "Cord"],
                          fingerprint={"n_classes": 3}, conformal=conf, organ_quality=rec_q).validate()
    back = CalibrationFile.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.organ_quality == rec_q and back.conformal["contour"]["tolerance_mm"] == 3.0
    assert back.conformal["error"] == "contour"
    old = dict(cal.to_dict(), organ_quality=None)
    old.pop("organ_quality")
    assert CalibrationFile.from_dict(old).organ_quality is None  # older files still load
    bad = json.loads(json.dumps(cal.to_dict()))
    bad["organ_quality"]["classes"]["Mandible"]["y_dice"][0] = 1.5
    with pytest.raises(InputError, match="outside"):
        CalibrationFile.from_dict(bad)
    bad = json.loads(json.dumps(cal.to_dict()))
    del bad["conformal"]["contour"]
    with pytest.raises(InputError, match="no contour thresholds"):
        CalibrationFile.from_dict(bad)


# --- the journey: fit-temperature -> maps -> summary.json -> MRML -------------------------------------

@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """Phantom CT, synthetic 3-member ensembles: 9 calibration cases, 2 test cases and an 'OOD'
    case whose members disagree over the body; fit-temperature (α = 0.2, contour margins) then maps."""
    from CalibUncertaintyLib.cli.main import main
    from CalibUncertaintyLib.io.images import read_image, write_image
    from CalibUncertaintyLib.io.nnunet_outputs import write_member_probs
    from CalibUncertaintyLib.synthetic.members import make_member_folders
    from CalibUncertaintyLib.synthetic.phantom import PhantomSpec, write_phantom_dataset

    root = tmp_path_factory.mktemp("organ_quality")
    ds = write_phantom_dataset(root / "raw", n_train=9, n_test=2, seed=5, spec=PhantomSpec(shape_zyx=(16, 32, 32)))
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    for case in ds.train_cases + ds.test_cases:
        (images / f"{case}_0000.nii.gz").symlink_to(ds.image(case))
        (labels / f"{case}.nii.gz").symlink_to(ds.label(case))
    (labels.parent / "dataset.json").write_text((ds.folder / "dataset.json").read_text())
    ood = "ood_case"
    ct, g = read_image(ds.image(ds.test_cases[0]))
    write_image(images / f"{ood}_0000.nii.gz", ct, g)
    write_image(labels / f"{ood}.nii.gz", read_image(ds.label(ds.test_cases[0]))[0], g)
    cases = [*ds.train_cases, *ds.test_cases, ood]
    dirs = make_member_folders(labels, root / "members", cases, n_members=3, seed=0)
    rng = np.random.default_rng(1)
    body = ct >= -500
    for d in dirs:  # each member confidently its own random class over the body
        with np.load(d / f"{ood}.npz") as z:
            p = z["probabilities"].astype(np.float32)
        noise = rng.dirichlet(np.ones(p.shape[0]) * 0.3, size=int(body.sum())).T.astype(np.float32)
        p[:, body] = 0.5 * p[:, body] + 0.5 * noise
        write_member_probs(d, ood, p / p.sum(axis=0, keepdims=True), g)
    cal = root / "cal.json"
    members = [str(d) for d in dirs]
    assert main(["fit-temperature", "--members", *members, "--images", str(images), "--labels", str(labels),
                 "--cases", *ds.train_cases, "--method", "temperature", "--conformal-alpha", "0.2",
                 "--tolerance-mm", "2.5", "--conformal-error", "contour", "-o", str(cal)]) == 0
    out = root / "maps"
    assert main(["maps", "--members", *members, "--images", str(images), "--cases", *ds.test_cases, ood,
                 "--calibration", str(cal), "--probabilities", "none", "-o", str(out)]) == 0
    return {"cal": cal, "out": out, "test": list(ds.test_cases), "ood": ood, "n_cal": len(ds.train_cases)}


def test_fit_then_maps_show_the_intervals_the_contour_margins_and_void_for_the_atypical_case(journey):
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile

    cal = CalibrationFile.load(journey["cal"])
    q = cal.organ_quality
    assert q["n_cases"] == journey["n_cal"] and q["tolerance_mm"] == 2.5 and q["alpha"] == 0.2
    # calibration pairs of the cases that predict the organ: enough for α = 0.2 (≥ 4), at most one per case
    assert set(q["classes"]) == {"node", "vessel"} and all(4 <= c["n_predicted"] <= 9 for c in q["classes"].values())
    assert cal.conformal["error"] == "contour" and cal.conformal["contour"]["tolerance_mm"] == 2.5
    for case in journey["test"]:
        s = json.loads((journey["out"] / case / "summary.json").read_text())
        block = s["organ_quality"]
        assert block["alpha"] == 0.2 and block["tolerance_mm"] == 2.5 and not block["trivial"]
        assert any(e["predicted"] for e in block["organs"].values())
        for name, e in block["organs"].items():
            if not e["predicted"]:
                assert e["text"] == f"{name}: not predicted in this case (no interval)"
                continue
            d = e["dice"]
            assert e["predicted"] and 0 <= d["lower"] <= d["predicted"] <= d["upper"] <= 1 and not d["trivial"]
            assert d["upper"] - d["lower"] < 1.0
            assert e["text"].startswith(f"{name}: Dice {d['predicted']:.2f} [{d['lower']:.2f}, {d['upper']:.2f}]")
            assert e["text"].endswith(", 80 %") or "VOID" in e["text"]
            assert set(e["by_alpha"]) == {"0.05", "0.1", "0.2", "0.3"}
        # the margins written cover contour deviations; burden per α, map and organ
        assert s["margins"]["error"] == "contour" and "by more than 2.5 mm" in s["margins"]["guarantee"]["outer"]
        assert s["conformal"]["contour"]["tolerance_mm"] == 2.5
        flags = s["conformal"]["burden"]["flags"]
        assert set(flags) == {"voxel", "contour"} and {"entropy", "dae", "confidence"} <= set(flags["contour"])
        b = flags["voxel"]["dae"]["0.2"]
        assert b["total_mm3"] == pytest.approx(sum(b["per_organ_mm3"].values()), rel=1e-6) and b["total_mm3"] > 0
        assert flags["voxel"]["dae"]["0.1"]["total_mm3"] >= flags["voxel"]["dae"]["0.3"]["total_mm3"]
        assert s["conformal"]["cases_needed"] == {"0.05": 19, "0.1": 9, "0.2": 4, "0.3": 3}
        assert s["exchangeability"]["n_cases"] == journey["n_cal"]
    s = json.loads((journey["out"] / journey["ood"] / "summary.json").read_text())
    assert s["exchangeability"]["exchangeable"] is False
    assert s["exchangeability"]["p_value"] == pytest.approx(1 / (journey["n_cal"] + 1))
    assert s["conformal"]["void"] and s["margins"]["void"] and s["organ_quality"]["void"]
    assert all("VOID" in e["text"] for e in s["organ_quality"]["organs"].values() if e.get("predicted"))


def test_the_slicer_organ_table_and_panel_lines(journey):
    slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
    from CalibUncertaintyLib.mrml import nodes
    from CalibUncertaintyLib.mrml.case_record import restore_case_nodes
    from CalibUncertaintyLib.mrml.margins import guarantee_lines

    case_dir = journey["out"] / journey["test"][0]
    summary = json.loads((case_dir / "summary.json").read_text())
    scene = slicer.vtkMRMLScene()
    case = nodes.load_case_outputs(scene, case_dir)
    table = case.organ_table.GetTable()
    header = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    assert header[:4] == ["organ", "Dice", "Dice lower", "Dice upper"] and header[-1] == "line"
    rows = {table.GetValue(r, 0).ToString(): r for r in range(table.GetNumberOfRows())}
    assert set(rows) == {"node", "vessel"}
    for name, r in rows.items():
        d = summary["organ_quality"]["organs"][name]["dice"]
        assert table.GetValue(r, 2).ToDouble() == pytest.approx(d["lower"])
        assert table.GetValue(r, 3).ToDouble() == pytest.approx(d["upper"])
        assert table.GetValue(r, 9).ToString() == summary["organ_quality"]["organs"][name]["text"]
        assert table.GetValue(r, 7).ToDouble() == pytest.approx(80.0)
    assert case.organ_table in case.output_nodes()
    lines = guarantee_lines(case.summary)
    assert any(line.startswith("Exchangeability: ") for line in lines)
    assert any("Contour flags" in line and "beyond 2.5 mm" in line for line in lines)
    assert any(line.strip().startswith("node: Dice") for line in lines)
    assert any(line.startswith("Review burden of the 80 % guarantee (contour deviations)") for line in lines)
    assert restore_case_nodes(scene).organ_table is case.organ_table  # a saved review finds its table again
    ood = nodes.load_case_outputs(scene, journey["out"] / journey["ood"], name_prefix="ood")
    assert all("VOID" in line for line in guarantee_lines(ood.summary)[:2])
    assert ood.organ_table.GetTable().GetValue(0, 8).ToString() == "VOID"


def test_flag_thresholds_at_every_alpha_equal_one_alpha_at_a_time():
    from CalibUncertaintyLib.calibration import conformal

    rng = np.random.default_rng(8)
    scores = [rng.gamma(2.0, size=rng.integers(0, 300)).astype(np.float32) for _ in range(12)]
    many = conformal.flag_thresholds(scores, (0.05, 0.1, 0.2, 0.3))
    for a, th in many.items():
        assert th == conformal.flag_threshold(scores, a)
    assert many[0.05]["trivial"] and not many[0.1]["trivial"]


def test_fit_quality_parts_by_z_slab_equal_the_whole_volume():
    """fit-temperature's pass 3 reads the calibrated probability one z slab at a time
    (``fit.case_quality_parts``): the organ rows and contour margin curves it keeps from the slabs
    (level indices on each organ's box; the probability at the far contour errors) equal those of
    the whole volume, wherever the slab borders fall."""
    from CalibUncertaintyLib.metrics.contour import class_contour_errors
    from CalibUncertaintyLib.pipeline.fit import FitOptions, case_quality_parts

    rng = np.random.default_rng(3)
    shape, spacing = (14, 30, 28), (2.5, 1.0, 1.2)
    labels = np.zeros(shape, np.uint8)
    labels[_blob(rng, shape, (6, 14, 12), (4, 7, 6))] = 1
    labels[_blob(rng, shape, (8, 12, 20), (3, 5, 4))] = 2
    logits = rng.normal(0, 1.0, (3,) + shape) + 3.0 * np.eye(3)[labels].transpose(3, 0, 1, 2)
    logits[:, :, :, 3:9] += rng.normal(0, 2.0, (3, shape[0], shape[1], 6))  # errors beyond 3 mm on one side
    probs = np.exp(logits - logits.max(axis=0))
    probs = (probs / probs.sum(axis=0)).astype(np.float32)
    seg = np.argmax(probs, axis=0).astype(np.uint8)
    roi = np.ones(shape, bool)
    box = (slice(1, 13), slice(2, 28), slice(0, 28))
    opts = FitOptions(tolerance_mm=3.0, roi_radius_mm=5.0)
    whole_rows = oq.case_organ_rows(probs, seg, labels, spacing, 3.0, 5.0)
    curves = []
    for c in (1, 2):
        fn, fp = class_contour_errors(seg == c, labels == c, spacing, 3.0)
        curves.append(contour_margin_losses(probs[c], fn, fp))
    assert sum(c["n_fn"] + c["n_fp"] for c in curves) > 0  # the case has far contour errors to keep
    for slabs in (None, [slice(0, 3), slice(3, 4), slice(4, 11), slice(11, 14)]):
        parts = case_quality_parts(probs, labels, seg, roi, box, spacing, opts, slabs)
        assert parts["organ_rows"] == whole_rows
        for got, want in zip(parts["contour_curves"], curves):
            assert got["n_fn"] == want["n_fn"] and got["n_fp"] == want["n_fp"]
            assert np.array_equal(got["outer_miss"], want["outer_miss"])
            assert np.array_equal(got["inner_cover"], want["inner_cover"])
