"""Streaming ensemble statistics equal a naive computation that holds every member (METHODS.md §1)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.uncertainty import measures
from CalibUncertaintyLib.uncertainty.maps import compute_maps
from CalibUncertaintyLib.uncertainty.streaming import EPS, EnsembleAccumulator

SHAPE = (5, 6, 7)
VOXEL_MEASURES = ["confidence", "entropy", "entropy_norm", "expected_entropy", "mutual_information",
                  "epkl", "fg_variance", "vote_disagreement"]


def dirichlet_members(k, m, shape=SHAPE, alpha=0.4, seed=0):
    """M random members (K, z, y, x) float32; small alpha gives near-zero probabilities."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(m):
        p = rng.dirichlet(np.full(k, alpha), size=shape).astype(np.float32)
        out.append(np.moveaxis(p, -1, 0).copy())
    return out


def naive_measures(members):
    """Every METHODS.md §1 measure from all members at once, float64, EPKL over all M² pairs."""
    p = np.stack(members).astype(np.float64)  # (M, K, z, y, x)
    m, k = p.shape[:2]
    logp = np.log(np.maximum(p, EPS))
    pbar = p.mean(axis=0)
    pe = -(pbar * np.log(np.maximum(pbar, EPS))).sum(axis=0)
    h_m = -(p * logp).sum(axis=1)
    ee = h_m.mean(axis=0)
    kl = np.zeros(pbar.shape[1:])
    for a in range(m):
        for b in range(m):
            kl += (p[a] * (logp[a] - logp[b])).sum(axis=0)
    p_fg = 1.0 - p[:, 0]
    q = (p.argmax(axis=1) > 0).mean(axis=0)
    return {"confidence": pbar.max(axis=0), "entropy": pe, "entropy_norm": pe / np.log(k),
            "expected_entropy": ee, "mutual_information": np.maximum(pe - ee, 0.0),
            "epkl": kl / m**2, "fg_variance": p_fg.var(axis=0), "vote_disagreement": 1 - np.abs(2 * q - 1)}


def assert_epkl_within_bound(got, want, m):
    """EPKL to float32 precision: within a relative 1e-5 of its excess over MI, plus 2e-6
    (float32 Jensen gaps; float16 ones missed this by far)."""
    excess = want["epkl"] - want["mutual_information"]
    err = np.abs(got.astype(np.float64) - want["epkl"])
    bound = 1e-5 * excess + 2e-6
    assert np.all(err <= bound), float(np.max(err - bound))


def accumulate(members, slab_voxels=None):
    k = members[0].shape[0]
    kw = {} if slab_voxels is None else {"slab_voxels": slab_voxels}
    acc = EnsembleAccumulator(k, members[0].shape[1:], **kw)
    for p in members:
        acc.add(p)
    return acc


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("m", [1, 3, 7])
def test_streaming_maps_equal_naive(k, m):
    members = dirichlet_members(k, m, seed=10 * k + m)
    # slab_voxels=50: one z slice per slab, so the slab bookkeeping is exercised
    acc = accumulate(members, slab_voxels=50)
    assert acc.n_members == m
    np.testing.assert_allclose(acc.mean_probs(), np.mean(members, axis=0), rtol=1e-6, atol=1e-7)
    got = compute_maps(acc, Geometry(SHAPE, (1.0, 1.0, 1.0)), names=VOXEL_MEASURES)
    want = naive_measures(members)
    assert set(got) == set(VOXEL_MEASURES)
    for name in VOXEL_MEASURES:
        assert got[name].dtype == np.float32 and got[name].shape == SHAPE
        if name == "epkl":  # the documented bound (uncertainty/streaming.py)
            assert_epkl_within_bound(got[name], want, m)
            continue
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2e-5, err_msg=name)
    # the whole-volume measure functions agree with compute_maps
    np.testing.assert_allclose(measures.expected_entropy(acc), got["expected_entropy"], atol=1e-6)
    np.testing.assert_allclose(measures.mutual_information(acc), got["mutual_information"], atol=1e-6)
    np.testing.assert_allclose(measures.epkl(acc), got["epkl"], atol=1e-6)
    np.testing.assert_allclose(measures.fg_variance(acc), got["fg_variance"], atol=1e-7)
    np.testing.assert_allclose(measures.vote_disagreement(acc), got["vote_disagreement"], atol=1e-7)
    np.testing.assert_allclose(measures.predictive_entropy(acc), got["entropy"], atol=1e-6)


def test_mi_never_exceeds_epkl_and_differs_from_it():
    acc = accumulate(dirichlet_members(3, 5, shape=(8, 9, 10), alpha=0.3, seed=3))
    mi, ep = measures.mutual_information(acc), measures.epkl(acc)
    assert (mi >= 0).all()
    assert (mi <= ep).all()
    assert (ep - mi).max() > 0.1  # EPKL is a different (larger) number, not a copy of MI


def test_single_member_mi_epkl_exactly_zero_logged_once(caplog):
    acc = accumulate(dirichlet_members(4, 1, seed=5))
    with caplog.at_level(logging.INFO, logger="CalibUncertaintyLib.uncertainty.streaming"):
        maps = compute_maps(acc, Geometry(SHAPE, (1.0, 1.0, 1.0)), names=VOXEL_MEASURES)
        mi_again = measures.mutual_information(acc)
        ep_again = measures.epkl(acc)
    assert not maps["mutual_information"].any() and not maps["epkl"].any()
    assert not mi_again.any() and not ep_again.any()
    notes = [r for r in caplog.records if "M = 1" in r.getMessage()]
    assert len(notes) == 1 and "exactly 0" in notes[0].getMessage()
    assert not maps["fg_variance"].any()          # one member has no variance
    assert set(np.unique(maps["vote_disagreement"])) == {0.0}
    assert maps["entropy"].max() > 0.3            # but entropy still shows uncertainty


def test_memory_does_not_grow_with_members():
    members = dirichlet_members(3, 6, seed=1)
    acc = EnsembleAccumulator(3, SHAPE)
    before = acc.nbytes
    for p in members:
        acc.add(p)
    assert acc.nbytes == before
    # K sums of p, K Jensen gaps L, entropy, variance (float32), votes (uint8): 8K + 9 bytes
    assert before == np.prod(SHAPE) * (8 * 3 + 9)
    acc.reduce_log_gap()  # every member is in: L becomes the one volume of EPKL's gap
    assert acc.nbytes == np.prod(SHAPE) * (4 * 3 + 13)
    with pytest.raises(InputError, match="reduce"):
        acc.add(members[0])


def test_other_float_dtypes_give_the_same_sums():
    members = dirichlet_members(2, 3, seed=2)
    a32 = accumulate(members)
    a64 = accumulate([p.astype(np.float64) for p in members])
    np.testing.assert_array_equal(a32.sum_probs, a64.sum_probs)
    a16 = accumulate([p.astype(np.float16) for p in members])  # within the 1e-3 sum tolerance
    np.testing.assert_allclose(a16.mean_probs(), a32.mean_probs(), atol=1e-3)


def test_rejected_member_leaves_the_accumulator_unchanged():
    good, bad = dirichlet_members(3, 2, seed=4)
    acc = EnsembleAccumulator(3, SHAPE, slab_voxels=42)
    acc.add(good)
    snapshot = [a.copy() for a in (acc.sum_probs, acc.sum_log_probs, acc.sum_entropy, acc.fg_sq_dev,
                                   acc.fg_votes)]
    bad = bad.copy()
    bad[:, -1, -1, -1] = [0.5, 0.5, 0.2]  # last voxel of the last slab: sums to 1.2
    with pytest.raises(InputError, match="off by 0.2"):
        acc.add(bad)
    assert acc.n_members == 1
    for before, after in zip(snapshot, (acc.sum_probs, acc.sum_log_probs, acc.sum_entropy,
                                        acc.fg_sq_dev, acc.fg_votes)):
        np.testing.assert_array_equal(before, after)


def test_bad_members_get_specific_errors():
    (p,) = dirichlet_members(3, 1, seed=6)
    acc = EnsembleAccumulator(3, SHAPE)
    with pytest.raises(InputError, match="no ensemble member"):
        acc.mean_probs()
    with pytest.raises(InputError, match="K = 3"):
        acc.add(np.concatenate([p, p[:1]]))
    with pytest.raises(InputError, match="not a label map"):
        acc.add(p.argmax(axis=0))
    with pytest.raises(InputError, match="classes must be the first axis"):
        acc.add(np.moveaxis(p, 0, -1))
    nan = p.copy()
    nan[1, 2, 3, 4] = np.nan
    with pytest.raises(InputError, match=r"member 1 \(the 1st added\).*class 1 at voxel \(z, y, x\) = \(2, 3, 4\)"):
        acc.add(nan)
    neg = p.copy()
    neg[0, 0, 0, 0] -= 0.5
    neg[1, 0, 0, 0] += 0.5
    with pytest.raises(InputError, match="negative probability.*not logits"):
        acc.add(neg)
    acc.add(p)
    with pytest.raises(InputError, match=r"member 'fold_3'.*\(1, 1, 1\).*sum to 2"):
        acc.add(p * np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) == 1 * 42 + 1 * 7 + 1, 2.0, 1.0),
                name="fold_3")
    with pytest.raises(InputError, match="n_classes"):
        EnsembleAccumulator(1, SHAPE)
    with pytest.raises(InputError, match="shape_zyx"):
        EnsembleAccumulator(2, (4, 4))


@pytest.mark.parametrize("m", [2, 5, 10])
def test_epkl_float32_gap_on_strong_disagreement(m):
    """Members that disagree strongly (Dirichlet α = 0.1: most classes near 0 in each member,
    log p down to the EPS clamp): EPKL still within the documented bound; where the members
    agree exactly the EPKL excess is exactly 0."""
    members = dirichlet_members(5, m, alpha=0.1, seed=100 + m)
    acc = accumulate(members)
    got = compute_maps(acc, Geometry(SHAPE, (1.0, 1.0, 1.0)), names=["epkl", "mutual_information"])
    want = naive_measures(members)
    assert_epkl_within_bound(got["epkl"], want, m)
    same = accumulate([members[0]] * m)
    agree = compute_maps(same, Geometry(SHAPE, (1.0, 1.0, 1.0)), names=["epkl", "mutual_information"])
    assert np.all(np.abs(agree["epkl"]) <= 1e-6) and np.all(np.abs(agree["mutual_information"]) <= 1e-5)
    assert acc.log_gap.dtype == np.float32 and acc.nbytes == (8 * 5 + 9) * np.prod(SHAPE)


def test_slab_members_valid_by_construction_are_read_once():
    """A member computed per slab is read twice (validate, then add) unless it says its values
    are a softmax of finite logits (``valid_probabilities``, MemberProbabilities); the sums are
    the same either way."""
    members = dirichlet_members(3, 2, seed=4)

    class Slabs:
        ndim, dtype = 4, np.dtype(np.float32)

        def __init__(self, a, valid):
            self.a, self.shape, self.reads = a, a.shape, 0
            if valid:
                self.valid_probabilities = True

        def slab(self, sl):
            self.reads += 1
            return self.a[:, sl]

    accs = []
    for valid in (False, True):
        acc = EnsembleAccumulator(3, SHAPE)
        wrapped = [Slabs(p, valid) for p in members]
        for w in wrapped:
            acc.add(w)
        n_slabs = len(list(acc.slabs()))
        assert [w.reads for w in wrapped] == [n_slabs * (1 if valid else 2)] * 2
        accs.append(acc)
    np.testing.assert_array_equal(accs[0].sum_probs, accs[1].sum_probs)
    np.testing.assert_array_equal(accs[0].log_gap, accs[1].log_gap)


def test_member_probabilities_of_nonfinite_logits_are_validated():
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from CalibUncertaintyLib.nnunet.member_probabilities import MemberProbabilities

    props = {"shape_after_cropping_and_before_resampling": (2, 3, 4), "shape_before_cropping": (2, 3, 4),
             "bbox_used_for_cropping": [[0, 2], [0, 3], [0, 4]], "spacing": (1.0, 1.0, 1.0)}
    pm = SimpleNamespace(transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2])
    lm = SimpleNamespace(inference_nonlin=lambda x: torch.softmax(x, 0), has_regions=False)
    cm = SimpleNamespace(spacing=[1.0, 1.0, 1.0])
    good = MemberProbabilities(torch.zeros((3, 2, 3, 4), dtype=torch.float16), pm, cm, lm, props, (2, 3, 4))
    bad_logits = torch.zeros((3, 2, 3, 4), dtype=torch.float16)
    bad_logits[1, 0, 0, 0] = float("nan")
    bad = MemberProbabilities(bad_logits, pm, cm, lm, props, (2, 3, 4))
    assert good.valid_probabilities and not bad.valid_probabilities
    acc = EnsembleAccumulator(3, (2, 3, 4))
    with pytest.raises(InputError, match="non-finite"):
        acc.add(bad)
    assert acc.n_members == 0


def test_votes_widen_past_255_members():
    """Votes are uint8 up to 255 members and become uint16 for the 256th, keeping the count."""
    p = np.zeros((2, 1, 1, 2), np.float32)
    p[1, 0, 0, 0] = 1.0  # voxel 0 votes foreground, voxel 1 background
    p[0, 0, 0, 1] = 1.0
    acc = EnsembleAccumulator(2, (1, 1, 2))
    for _ in range(255):
        acc.add(p)
    assert acc.fg_votes.dtype == np.uint8 and acc.fg_votes[0, 0, 0] == 255
    acc.add(p)
    assert acc.fg_votes.dtype == np.uint16 and acc.fg_votes[0, 0].tolist() == [256, 0]
    assert measures.vote_disagreement(acc)[0, 0].tolist() == [0.0, 0.0]
