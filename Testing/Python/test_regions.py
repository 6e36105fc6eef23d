"""Error regions: 26-connected components, mm³ volumes, touched class, RAS centroids (METHODS.md §5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CalibUncertaintyLib.errors import GeometryMismatchError, InputError
from CalibUncertaintyLib.io.atomic import write_json
from CalibUncertaintyLib.io.geometry import Geometry
from CalibUncertaintyLib.regions import Region, find_regions, regions_to_dict

SHAPE = (12, 20, 24)
NAMES = ["background", "Brainstem", "SpinalCord"]


def two_blobs():
    """Blob A: 3×4×5 box of u=0.8 inside class 1; blob B: 2×2×2 box of u=0.5 next to class 2."""
    u = np.zeros(SHAPE, np.float32)
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:6, 1:8, 1:9] = 1
    u[2:5, 2:6, 2:7] = 0.8
    lab[8:11, 10:14, 20:22] = 2
    u[8:10, 10:12, 18:20] = 0.5   # ends at x = 19; class 2 starts at x = 20 (adjacent, no overlap)
    return u, lab


def test_two_separated_blobs_two_ranked_regions_with_mm3_volumes():
    u, lab = two_blobs()
    g = Geometry(SHAPE, spacing=(0.8, 0.9, 2.5))   # voxel volume 1.8 mm³
    regions = find_regions(u, 0.3, np.ones(SHAPE, bool), lab, g, class_names=NAMES, min_volume_mm3=1.0)
    assert [r.rank for r in regions] == [1, 2]
    a, b = regions
    assert a.n_voxels == 60 and a.volume_mm3 == pytest.approx(60 * 1.8)
    assert b.n_voxels == 8 and b.volume_mm3 == pytest.approx(8 * 1.8)
    assert a.mean_u == pytest.approx(0.8) and a.max_u == pytest.approx(0.8)
    assert a.score == pytest.approx(60 * 1.8 * 0.8) and b.score == pytest.approx(8 * 1.8 * 0.5)
    assert (a.class_index, a.class_name) == (1, "Brainstem")
    assert (b.class_index, b.class_name) == (2, "SpinalCord")   # touches class 2 by one voxel
    assert a.centroid_zyx == pytest.approx((3.0, 3.5, 4.0))
    assert a.bbox_zyx_min == (2, 2, 2) and a.bbox_zyx_max == (4, 5, 6)
    # the dilation reaches class 2 only through the face at x = 19 -> 20: move it and it's gone
    lab2 = lab.copy()
    lab2[8:11, 10:14, 20] = 0
    b2 = find_regions(u, 0.3, None, lab2, g, class_names=NAMES, min_volume_mm3=1.0)[1]
    assert (b2.class_index, b2.class_name) == (0, "background")


def test_connectivity_roi_min_volume_and_max_regions():
    u = np.zeros(SHAPE, np.float32)
    lab = np.zeros(SHAPE, np.uint8)
    u[3, 3, 3] = u[4, 4, 4] = 1.0          # corner neighbours: one 26-connected region
    u[8:11, 12:15, 12:15] = 0.6            # 27 voxels
    u[0, 19, 23] = 0.9                     # a single voxel: never a region, whatever the minimum
    g = Geometry(SHAPE, spacing=(1.0, 1.0, 1.0))
    regions = find_regions(u, 0.5, None, lab, g, min_volume_mm3=0.0)
    assert sorted(r.n_voxels for r in regions) == [2, 27]
    assert find_regions(u, 0.5, None, lab, g, min_volume_mm3=2.0)[-1].n_voxels == 2
    assert [r.n_voxels for r in find_regions(u, 0.5, None, lab, g, min_volume_mm3=2.5)] == [27]
    assert [r.n_voxels for r in find_regions(u, 0.5, None, lab, g, min_volume_mm3=0, max_regions=1)] == [27]
    roi = np.zeros(SHAPE, bool)
    roi[:6] = True                          # excludes the 27-voxel blob
    assert sorted(r.n_voxels for r in find_regions(u, 0.5, roi, lab, g, min_volume_mm3=0)) == [2]
    assert find_regions(u, 2.0, None, lab, g) == []


def test_ras_centroid_on_oblique_geometry():
    # direction: x-index -> -y LPS, y-index -> +x LPS, z-index -> +z LPS (row-major 3x3)
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    g = Geometry(SHAPE, spacing=(0.5, 2.0, 3.0), origin=(10.0, -20.0, 30.0), direction=direction)
    u = np.zeros(SHAPE, np.float32)
    u[5, 7, 9] = 1.0                        # (z, y, x) = (5, 7, 9) -> ijk (9, 7, 5): the peak
    u[5, 7, 10] = 0.9                       # (z, y, x) = (5, 7, 10)
    (r,) = find_regions(u, 0.5, None, np.zeros(SHAPE, np.uint8), g, min_volume_mm3=0)
    # LPS = origin + D @ (spacing * ijk) = (10 + 2*7, -20 - 0.5*9.5, 30 + 3*5); RAS flips x and y
    assert r.centroid_ras == pytest.approx((-24.0, 24.75, 45.0))
    assert r.centroid_zyx == (5.0, 7.0, 9.5)
    assert r.volume_mm3 == pytest.approx(6.0)
    # the jump point is the peak voxel (z, y, x) = (5, 7, 9): LPS (24, -24.5, 45)
    assert r.jump_zyx == (5, 7, 9) and r.jump_ras == pytest.approx((-24.0, 24.5, 45.0))
    assert r.extent_mm == pytest.approx((3.0, 2.0, 1.0))


def test_regions_json_structure(tmp_path):
    u, lab = two_blobs()
    g = Geometry(SHAPE, spacing=(1.0, 1.0, 1.0))
    regions = find_regions(u, 0.3, None, lab, g, class_names=NAMES, min_volume_mm3=1.0)
    d = regions_to_dict(regions, case="case_007", map_name="ebcu", threshold=0.3,
                        threshold_source="calibration file", roi={"rule": "prediction", "radius_mm": 15.0},
                        class_names=NAMES)
    assert list(d) == ["case", "map", "threshold", "threshold_source", "roi", "class_names", "regions",
                       "max_extent_mm"]
    assert list(d["regions"][0]) == ["rank", "n_voxels", "volume_mm3", "mean_u", "max_u", "class_index",
                                     "class_name", "centroid_ras", "centroid_zyx", "bbox_zyx_min",
                                     "bbox_zyx_max", "score", "jump_ras", "jump_zyx", "extent_mm",
                                     "component", "n_parts", "component_volume_mm3"]
    path = write_json(tmp_path / "regions.json", d)
    back = json.loads(path.read_text())
    assert back["regions"][1]["class_name"] == "SpinalCord" and back["regions"][0]["rank"] == 1
    assert back["regions"][0]["centroid_ras"] == pytest.approx(list(regions[0].centroid_ras))
    assert isinstance(regions[0], Region) and regions[0].to_dict()["bbox_zyx_max"] == [4, 5, 6]


def test_bad_input():
    u, lab = two_blobs()
    g = Geometry(SHAPE, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(GeometryMismatchError, match="uncertainty map shape"):
        find_regions(u[:5], 0.3, None, lab, g)
    with pytest.raises(GeometryMismatchError, match="label volume shape"):
        find_regions(u, 0.3, None, lab[:, :5], g)
    with pytest.raises(GeometryMismatchError, match="ROI shape"):
        find_regions(u, 0.3, np.ones((2, 2, 2), bool), lab, g)
    with pytest.raises(InputError, match="threshold must be finite"):
        find_regions(u, float("nan"), None, lab, g)
    bad = u.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        find_regions(bad, 0.3, None, lab, g)
    with pytest.raises(InputError, match="min_volume_mm3"):
        find_regions(u, 0.3, None, lab, g, min_volume_mm3=-1)
    with pytest.raises(InputError, match="max_regions"):
        find_regions(u, 0.3, None, lab, g, max_regions=0)
    with pytest.raises(InputError, match="integer volume"):
        find_regions(u, 0.3, None, lab.astype(np.float32), g)
