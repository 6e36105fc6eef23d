"""Per-class and local temperature scaling (calibration/local_temperature.py, METHODS.md §8)."""

import numpy as np
import pytest

from CalibUncertaintyLib.calibration.local_temperature import (
    ClassTemperatureScaler, LocalTemperatureScaler, _TableTemperature, apply_temperature_map, contour_distance_mm,
    contour_mask, cross_validated_nll, distance_bins)
from CalibUncertaintyLib.calibration.temperature import TemperatureScaler, softmax
from CalibUncertaintyLib.errors import InputError

EDGES = (0.0, 2.0, 4.0, 6.0, 9.0, 12.0, 15.0)


def _true_t(pred, dist):
    """Generating temperatures: over-confident at the contour, sharper far from it, class-dependent."""
    b = distance_bins(dist, EDGES)
    t_bin = np.array([2.5, 1.8, 1.3, 1.0, 0.8, 0.7, 0.6])
    return t_bin[b] * np.where(pred == 2, 1.4, 1.0)


def _rows(n, seed):
    """Rows whose miscalibration depends on the distance to the contour: labels drawn from
    softmax(x / T_true(class, distance)), x the model's log-probabilities (argmax = pred)."""
    rng = np.random.default_rng(seed)
    k = 3
    pred = rng.integers(0, k, n)
    dist = rng.uniform(0, 20, n)
    margin = rng.uniform(1.0, 8.0, n)
    z = rng.normal(0, 0.3, (n, k))
    z[np.arange(n), pred] += margin
    x = np.log(softmax(z, axis=1))
    p_true = softmax(x / _true_t(pred, dist)[:, None], axis=1)
    u = rng.random(n)[:, None]
    y = np.minimum((u > np.cumsum(p_true, axis=1)).sum(axis=1), k - 1)
    return x, y, np.argmax(x, axis=1), dist


def test_contour_distance_anisotropic():
    seg = np.zeros((9, 9, 9), np.uint8)
    seg[3:6, 3:6, 3:6] = 1
    d = contour_distance_mm(seg, (2.5, 0.8, 0.8))
    c = contour_mask(seg)
    assert c[3, 4, 4] and c[2, 4, 4] and not c[4, 4, 4] and not c[0, 0, 0]
    assert d[3, 4, 4] == 0 and d[2, 4, 4] == 0
    assert d[0, 4, 4] == pytest.approx(2 * 2.5)  # two slices above the contour voxel (2, 4, 4)
    assert d[4, 4, 4] == pytest.approx(0.8)  # centre of the cube: one in-plane voxel to the contour
    assert np.all(np.isinf(contour_distance_mm(np.zeros((3, 3, 3)), (1, 1, 1))))


def test_argmax_unchanged_bit_for_bit():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([0.3, 0.3, 0.3, 0.3], size=(12, 14, 10)).transpose(3, 0, 1, 2).astype(np.float32)
    seg = np.argmax(probs, axis=0)
    dist = contour_distance_mm(seg, (2.5, 0.8, 0.8))
    x = np.log(np.maximum(probs.reshape(4, -1).T, 1e-12))
    labels = rng.integers(0, 4, x.shape[0])
    for cls in (ClassTemperatureScaler, LocalTemperatureScaler):
        m = cls(edges_mm=EDGES).fit(x, labels, seg.ravel(), dist.ravel())
        m.table_[:] = rng.uniform(0.05, 20, m.table_.shape)  # any positive temperatures
        out = m.transform_volume(probs, (2.5, 0.8, 0.8))
        assert out.dtype == np.float32
        assert np.array_equal(np.argmax(out, axis=0), seg)
        assert np.allclose(out.sum(axis=0), 1, atol=1e-5)


def test_local_recovers_generating_temperatures_and_lowers_nll():
    x, y, pred, dist = _rows(80_000, seed=0)
    m = LocalTemperatureScaler(edges_mm=EDGES, pool_voxels=200).fit(x, y, pred, dist)
    want = np.array([[_true_t(np.array([c]), np.array([EDGES[b] + 0.5]))[0] for b in range(len(EDGES))]
                     for c in range(3)])
    assert np.allclose(m.table_, want, rtol=0.15), (m.table_, want)
    # held-out rows: local T beats one global T and the per-class T
    xt, yt, pt, dt = _rows(60_000, seed=1)
    g = TemperatureScaler().fit(x, y)
    nll_global = float(np.mean(-np.log(g.transform(xt)[np.arange(yt.size), yt])))
    nll_class = ClassTemperatureScaler().fit(x, y, pred).nll(xt, yt, pt)
    nll_local = m.nll(xt, yt, pt, dt)
    nll_raw = float(np.mean(-xt[np.arange(yt.size), yt]))
    assert nll_local < nll_class < nll_raw
    assert nll_local < nll_global - 0.01
    assert m.global_temperature_ == pytest.approx(g.temperature_, rel=1e-3)


def test_class_temperature_recovers_per_class():
    rng = np.random.default_rng(3)
    n, k = 60_000, 3
    pred = rng.integers(0, k, n)
    z = rng.normal(0, 1, (n, k))
    z[np.arange(n), pred] += 3
    x = np.log(softmax(z, axis=1))
    t_true = np.array([0.7, 1.5, 3.0])[pred]
    p = softmax(x / t_true[:, None], axis=1)
    y = np.minimum((rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1), k - 1)
    m = ClassTemperatureScaler(pool_voxels=100).fit(x, y)
    assert np.allclose(m.table_[:, 0], [0.7, 1.5, 3.0], rtol=0.1)


def test_pooling_pulls_empty_and_small_cells_to_parent():
    x, y, pred, dist = _rows(8_000, seed=4)
    keep = ~((pred == 1) & (dist >= 15))  # empty cell (class 1, last bin)
    m = LocalTemperatureScaler(edges_mm=EDGES, pool_voxels=1e9, parent_rows=10**6, open_bin="nearest")
    m.fit(x[keep], y[keep], pred[keep], dist[keep])
    # infinite pooling (parent term on all rows): every cell equals the global temperature
    assert np.allclose(m.table_, m.global_temperature_, rtol=1e-3)
    # an empty cell takes the nearest populated distance bin of its class ("nearest" rule)
    m0 = LocalTemperatureScaler(edges_mm=EDGES, open_bin="nearest").fit(x[keep], y[keep], pred[keep], dist[keep])
    assert m0.counts_[1, -1] == 0 and m0.counts_[1, -2] > 0 and m0.table_[1, -1] == m0.table_[1, -2]
    # a class without voxels takes its class temperature, which pooling pulls to the global one
    none1 = pred[keep] != 1
    m1 = LocalTemperatureScaler(edges_mm=EDGES).fit(x[keep][none1], y[keep][none1], pred[keep][none1],
                                                    dist[keep][none1])
    assert np.all(m1.counts_[1] == 0) and np.allclose(m1.table_[1, :-1], m1.global_temperature_, rtol=1e-6)
    assert m1.table_[1, -1] == 1.0  # ... except the open bin beyond the fitted ROI (default rule)


def test_open_bin_beyond_the_roi():
    """Default rule: an open last bin without calibration voxels (beyond the fitting ROI) gets T = 1,
    so the far background keeps the model's own probabilities; with voxels there it is fitted."""
    x, y, pred, dist = _rows(20_000, seed=8)
    roi = dist < EDGES[-1]  # rows as sampled from a 15 mm ROI: none in the open bin
    m = LocalTemperatureScaler(edges_mm=EDGES).fit(x[roi], y[roi], pred[roi], dist[roi])
    assert m.open_bin == "identity" and np.all(m.counts_[:, -1] == 0)
    assert np.all(m.table_[:, -1] == 1.0) and np.all(np.abs(m.table_[:, -2] - 1.0) > 0.1)
    near = LocalTemperatureScaler(edges_mm=EDGES, open_bin="nearest").fit(x[roi], y[roi], pred[roi], dist[roi])
    assert np.array_equal(near.table_[:, -1], near.table_[:, -2])
    assert np.array_equal(near.table_[:, :-1], m.table_[:, :-1])  # the rule only touches the open bin
    # a volume: organ cube in a large background; far voxels unchanged, near ones calibrated
    seg = np.zeros((6, 40, 40), np.int64)
    seg[2:4, 18:22, 18:22] = 1
    probs = np.full((3, *seg.shape), 0.01, np.float32)
    probs[0][seg == 0] = 0.98
    probs[1][seg == 1] = 0.98
    out = m.transform_volume(probs, (3.0, 1.0, 1.0))
    far = contour_distance_mm(seg, (3.0, 1.0, 1.0)) >= EDGES[-1]
    assert far.any() and np.allclose(out[:, far], probs[:, far], rtol=1e-5, atol=1e-7)
    assert not np.allclose(out[:, ~far], probs[:, ~far], atol=1e-3)
    assert np.array_equal(np.argmax(out, axis=0), seg)
    # rows beyond the ROI are fitted like any other cell: the generating T of the open bin (0.6)
    full = LocalTemperatureScaler(edges_mm=EDGES, pool_voxels=200).fit(x, y, pred, dist)
    assert np.all(full.counts_[:, -1] > 0) and full.table_[0, -1] == pytest.approx(0.6, rel=0.2)
    # the rule travels with the record; a record written before it means "nearest"
    assert _TableTemperature.from_record(m.to_record()).open_bin == "identity"
    old = {k: v for k, v in m.to_record().items() if k != "open_bin"}
    assert _TableTemperature.from_record(old).open_bin == "nearest"
    with pytest.raises(InputError, match="open_bin"):
        LocalTemperatureScaler(open_bin="zero")


def test_record_round_trip_and_bad_records():
    x, y, pred, dist = _rows(5000, seed=5)
    m = LocalTemperatureScaler(edges_mm=EDGES).fit(x, y, pred, dist)
    r = _TableTemperature.from_record(m.to_record())
    assert isinstance(r, LocalTemperatureScaler)
    assert np.array_equal(r.temperatures(pred, dist), m.temperatures(pred, dist))
    bad = m.to_record() | {"temperatures": [[1.0] * 3] * 3}
    with pytest.raises(InputError, match="bins"):
        _TableTemperature.from_record(bad)
    with pytest.raises(InputError, match="within"):
        _TableTemperature.from_record(m.to_record() | {"temperatures": (-np.abs(m.table_)).tolist()})
    with pytest.raises(InputError, match="kind"):
        _TableTemperature.from_record({"kind": "bogus"})
    with pytest.raises(InputError, match="dist_mm"):
        m.transform(x, pred)
    with pytest.raises(InputError):
        apply_temperature_map(np.full((2, 3), 0.5), np.array([1.0, 0.0, 1.0]))


def test_cross_validated_nll():
    x, y, pred, dist = _rows(12_000, seed=6)
    cases = np.arange(y.size) % 3
    cv_local = cross_validated_nll("local_temperature", x, y, pred, dist, cases, edges_mm=EDGES)
    cv_global = cross_validated_nll("global", x, y, pred, dist, cases)
    assert cv_local["n_cases"] == 3 and len(cv_local["per_case"]) == 3
    assert cv_local["nll"] < cv_global["nll"]
    with pytest.raises(InputError, match="two"):
        cross_validated_nll("global", x, y, pred, dist, np.zeros(y.size))


def test_calibration_file_stores_and_applies_the_local_record(tmp_path):
    from CalibUncertaintyLib.calibration.calibration_file import CalibrationFile

    x, y, pred, dist = _rows(4000, seed=7)
    m = LocalTemperatureScaler(edges_mm=EDGES).fit(x, y, pred, dist)
    g = TemperatureScaler().fit(x, y)
    cal = CalibrationFile.from_scaler(g, case_ids=["a"], class_names=["bg", "o1", "o2"])
    plain = tmp_path / "global.json"
    cal.save(plain)
    assert "local" not in plain.read_text()  # files without a local record look as before
    assert CalibrationFile.load(plain).local is None
    cal.method, cal.local = "local_temperature", m.to_record()
    path = tmp_path / "local.json"
    cal.save(path)
    back = CalibrationFile.load(path)
    assert back.method == "local_temperature" and back.temperature == pytest.approx(g.temperature_)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([0.5] * 3, size=(6, 7, 8)).transpose(3, 0, 1, 2).astype(np.float32)
    out = back.transform_probs(probs, spacing_zyx=(2.0, 1.0, 1.0))
    assert np.array_equal(out, m.transform_volume(probs, (2.0, 1.0, 1.0)))
    assert np.array_equal(np.argmax(out, axis=0), np.argmax(probs, axis=0))
    with pytest.raises(InputError, match="spacing"):
        back.transform_probs(probs)
    assert back.as_global().method == "temperature" and back.as_global().local is None
    assert "local temperature" in back.describe()
    bad = back.to_dict() | {"local": {"kind": "class_temperature", "temperatures": [[1.0]] * 3}}
    with pytest.raises(InputError, match="local"):
        CalibrationFile.from_dict(bad)
    with pytest.raises(InputError, match="pool_then_calibrate"):
        CalibrationFile.from_dict(back.to_dict() | {"ensemble_mode": "per_member"})
