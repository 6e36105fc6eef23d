"""Regions are places to look (METHODS.md §5, issue 16 item 8): an organ's whole uncertain shell is
cut into parts that each fit one view, each with a jump point inside it at its most uncertain part."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.regions import (DEFAULT_MAX_EXTENT_MM, component_volumes, find_regions,
                                         find_regions_and_labels)
from CalibUncertaintyLib.regions.jump_point import PEAK_SIGMA_MM
from CalibUncertaintyLib.regions.split import split_component

NAMES = ["background", "Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Mandible"]
SPACING_XYZ = (1.2, 1.2, 2.5)            # mm, a head-and-neck CT's grid (x, y, z)
SHAPE = (24, 100, 110)                   # (z, y, x)
CENTRE_X = 55                            # the chin's x index: the two halves lie either side


def mandible_case():
    """A horseshoe 'mandible' (class 5, 80 mm wide, 60 mm deep) on a 1.2 × 1.2 × 2.5 mm grid, and
    an uncertainty map shaped like an ensemble's: a shell about its contour, U = exp(−(d/2 mm)²)
    of the signed distance d to the contour, modulated along the bone (hot spots) so that the
    peaks are well defined. Returns (u, labels, geometry)."""
    z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    zm, ym, xm = z * SPACING_XYZ[2], y * SPACING_XYZ[1], x * SPACING_XYZ[0]
    cy, cx = 25 * SPACING_XYZ[1], CENTRE_X * SPACING_XYZ[0]
    radius = np.hypot((ym - cy) / 60.0, (xm - cx) / 40.0)          # elliptic, 40 mm half-width
    bone = (np.abs(radius - 1.0) < 0.1) & (ym >= cy) & (np.abs(zm - 30.0) < 15.0)
    lab = np.zeros(SHAPE, np.uint8)
    lab[bone] = 5
    sampling = (SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0])
    d = np.where(bone, -ndimage.distance_transform_edt(bone, sampling=sampling),
                 ndimage.distance_transform_edt(~bone, sampling=sampling))
    angle = np.arctan2(ym - cy, xm - cx)
    u = (np.exp(-(d / 2.0) ** 2) * (1.0 + 0.4 * np.cos(5.0 * angle))).astype(np.float32)
    return u, lab, Geometry(SHAPE, spacing=SPACING_XYZ, origin=(-60.0, -80.0, 12.5))


@pytest.fixture(scope="module")
def mandible():
    u, lab, geo = mandible_case()
    tau = 0.3
    regions, ranks = find_regions_and_labels(u, tau, None, lab, geo, class_names=NAMES)
    return u, lab, geo, tau, regions, ranks


def test_whole_component_spans_both_halves_without_splitting(mandible):
    """The failure the issue reports: one region for the whole shell, its box across both halves,
    its centroid outside the region (at the bone's 'centre')."""
    u, lab, geo, tau, _, _ = mandible
    whole, ranks = find_regions_and_labels(u, tau, None, lab, geo, max_extent_mm=None)
    assert len(whole) == 1
    r = whole[0]
    assert r.bbox_zyx_min[2] < CENTRE_X - 20 and r.bbox_zyx_max[2] > CENTRE_X + 20
    assert max(r.extent_mm) > 1.5 * DEFAULT_MAX_EXTENT_MM
    c = tuple(int(round(v)) for v in r.centroid_zyx)
    assert ranks[c] == 0                              # the centroid is not in the region


def test_each_region_fits_one_view_and_none_spans_both_halves(mandible):
    u, lab, geo, tau, regions, ranks = mandible
    assert len(regions) >= 4
    for r in regions:
        assert max(r.extent_mm) <= DEFAULT_MAX_EXTENT_MM
        # the halves: the bone more than 25 mm left and right of the midline (the chin between)
        half = int(25.0 / SPACING_XYZ[0])
        assert not (r.bbox_zyx_min[2] < CENTRE_X - half and r.bbox_zyx_max[2] > CENTRE_X + half), r
        # the region table is the region's voxels: box, volume, mean and max, centroid
        vox = np.argwhere(ranks == r.rank)
        assert tuple(vox.min(axis=0)) == r.bbox_zyx_min and tuple(vox.max(axis=0)) == r.bbox_zyx_max
        assert r.n_voxels == len(vox) and r.volume_mm3 == pytest.approx(len(vox) * geo.voxel_volume_mm3)
        vals = u[ranks == r.rank].astype(np.float64)
        assert r.mean_u == pytest.approx(vals.mean()) and r.max_u == float(vals.max())
        np.testing.assert_allclose(r.centroid_zyx, vox.mean(axis=0))
        np.testing.assert_allclose(r.extent_mm, (vox.max(axis=0) - vox.min(axis=0) + 1) * geo.spacing_zyx)
        assert r.class_name == "Mandible" and r.component == 1 and r.n_parts == len(regions)
        # each part is one 26-connected piece
        assert ndimage.label(ranks == r.rank, structure=np.ones((3, 3, 3), bool))[1] == 1
    assert [r.rank for r in regions] == list(range(1, len(regions) + 1))
    assert all(a.score >= b.score for a, b in zip(regions, regions[1:]))
    # the parts cover the flagged shell: nothing dropped here (every part is above the minimum)
    flagged = u > tau
    assert np.array_equal(ranks > 0, flagged)
    assert sum(r.volume_mm3 for r in regions) == pytest.approx(flagged.sum() * geo.voxel_volume_mm3)
    assert component_volumes(regions) == [pytest.approx(flagged.sum() * geo.voxel_volume_mm3)]


def test_jump_point_inside_its_region_at_its_most_uncertain_part(mandible):
    u, lab, geo, tau, regions, ranks = mandible
    sigma = [PEAK_SIGMA_MM / h for h in geo.spacing_zyx]
    smooth = ndimage.gaussian_filter(u, sigma, truncate=3.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) * h for n, h in zip(SHAPE, geo.spacing_zyx)], indexing="ij"), -1)
    for r in regions:
        inside = ranks == r.rank
        assert inside[r.jump_zyx]
        np.testing.assert_allclose(r.jump_ras, geo.zyx_to_ras(np.array(r.jump_zyx, float)))
        # its most uncertain part: the smoothed map's maximum over the region ...
        assert smooth[r.jump_zyx] == pytest.approx(smooth[inside].max(), rel=1e-5)
        # ... whose surroundings (the region's voxels within 6 mm) are more uncertain than the region
        near = inside & (np.linalg.norm(grid - grid[r.jump_zyx], axis=-1) <= 6.0)
        assert u[near].mean() > u[inside].mean()


def test_splitting_is_deterministic_and_follows_the_extent(mandible):
    u, lab, geo, tau, regions, ranks = mandible
    again, ranks2 = find_regions_and_labels(u, tau, None, lab, geo, class_names=NAMES)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in regions]
    assert np.array_equal(ranks, ranks2)
    small = find_regions(u, tau, None, lab, geo, max_extent_mm=25.0)
    assert len(small) > len(regions) and all(max(r.extent_mm) <= 25.0 for r in small)
    with pytest.raises(InputError, match="max extent"):
        find_regions(u, tau, None, lab, geo, max_extent_mm=4.0)       # below two 2.5 mm voxels


def test_fragments_merge_and_what_is_dropped_is_below_the_minimum():
    """A long bar with a thin side spur: the spur's cut-off bits join a neighbouring part when the
    union fits; the volumes of the regions plus the dropped parts (below the minimum) are the
    flagged volume."""
    shape = (6, 12, 200)
    u = np.zeros(shape, np.float32)
    u[1:5, 2:8, 5:190] = np.linspace(0.5, 1.0, 185, dtype=np.float32)     # a 185 mm bar
    u[2, 8:11, 60] = 0.9                                                  # a spur
    u[0, 0, 0] = u[5, 11, 199] = 0.95                                      # single voxels
    geo = Geometry(shape, spacing=(1.0, 1.0, 1.0))
    regions, ranks = find_regions_and_labels(u, 0.3, None, np.zeros(shape, np.uint8), geo, min_volume_mm3=5.0)
    assert all(max(r.extent_mm) <= 50.0 for r in regions) and len(regions) >= 4
    flagged = int(np.count_nonzero(u > 0.3))
    kept = sum(r.n_voxels for r in regions)
    assert kept == flagged - 2                                            # only the two single voxels
    assert ranks[0, 0, 0] == 0 and ranks[5, 11, 199] == 0
    for r in regions:
        assert ranks[r.jump_zyx] == r.rank


def test_split_component_parts_are_connected_and_cover_the_component():
    rng = np.random.default_rng(3)
    blob = ndimage.gaussian_filter(rng.random((20, 60, 60)), 2.0) > 0.5
    comp, n = ndimage.label(blob, structure=np.ones((3, 3, 3), bool))
    big = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
    s = ndimage.gaussian_filter(rng.random(big.shape), 1.0).astype(np.float32)
    parts, n_parts = split_component(big, s, (2.0, 1.0, 1.0), 20.0)
    assert n_parts > 1 and np.array_equal(parts > 0, big)
    for p in range(1, n_parts + 1):
        vox = np.argwhere(parts == p)
        assert np.all((vox.max(axis=0) - vox.min(axis=0) + 1) * (2.0, 1.0, 1.0) <= 20.0)
        assert ndimage.label(parts == p, structure=np.ones((3, 3, 3), bool))[1] == 1


def test_process_case_and_the_cli_option_cut_regions_to_the_extent(tmp_path):
    """--region-max-extent-mm reaches regions.json through the pipeline (0: whole components)."""
    import json

    from CalibUncertaintyLib.cli.common import region_max_extent
    from CalibUncertaintyLib.cli.main import build_parser
    from CalibUncertaintyLib.pipeline.case import CaseOptions, process_case
    from CalibUncertaintyLib.synthetic.members import member_probabilities

    args = build_parser().parse_args(["maps", "--members", str(tmp_path), "-o", str(tmp_path / "o"),
                                      "--region-max-extent-mm", "0"])
    assert region_max_extent(args.region_max_extent_mm) is None
    args = build_parser().parse_args(["predict", "-i", str(tmp_path), "-m", str(tmp_path), "-o", str(tmp_path / "o")])
    assert region_max_extent(args.region_max_extent_mm) == DEFAULT_MAX_EXTENT_MM

    geo = Geometry((16, 40, 40), spacing=(1.5, 1.5, 2.5))
    lab = np.zeros(geo.shape_zyx, np.uint8)
    z, y, x = np.indices(geo.shape_zyx)
    lab[(np.abs(np.hypot(y - 20, x - 20) - 12) < 3) & (np.abs(z - 8) < 5)] = 1   # a 'ring' organ
    members = list(member_probabilities(lab, geo, 2, 3, "ring", seed=2))
    names = ["background", "Ring"]
    sizes = {}
    for extent in (20.0, None):
        out = tmp_path / str(extent)
        process_case("ring", iter(members), geo, out, None, names,
                     CaseOptions(n_members=3, max_region_extent_mm=extent, regions_map="entropy",
                                 map_names=("entropy",), probability_classes=()))
        doc = json.loads((out / "ring" / "regions.json").read_text())
        assert doc["max_extent_mm"] == extent
        sizes[extent] = [max(r["extent_mm"]) for r in doc["regions"]]
        summary = json.loads((out / "ring" / "summary.json").read_text())
        largest = summary["case_aggregates"]["largest_region_mm3"]
        assert largest == pytest.approx(max(r["component_volume_mm3"] for r in doc["regions"]))
    assert max(sizes[None]) > 20.0 >= max(sizes[20.0]) and len(sizes[20.0]) > len(sizes[None])
