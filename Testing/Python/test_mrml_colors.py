"""Colour tables: shipped files reproducible, perceptually ordered, one node set per scene."""

from __future__ import annotations

import numpy as np
import pytest

from CalibUncertaintyLib.errors import InputError
from CalibUncertaintyLib.mrml import colors

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
pytestmark = pytest.mark.slicer


def _lightness(rgba: np.ndarray) -> np.ndarray:
    """CIE L* of sRGB colours (D65), from the standard sRGB -> XYZ -> L* formulas."""
    c = rgba[:, :3].astype(float) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.2126, 0.7152, 0.0722])
    f = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29)
    return 116 * f - 16


def test_shipped_tables_are_what_the_generator_makes(tmp_path):
    written = colors.generate_colour_table_files(tmp_path)
    for key, (_name, fname, _cmap, _rng) in colors.TABLES.items():
        fresh = colors.read_colour_table_file(tmp_path / fname)
        shipped = colors.table_rgba(key)
        assert shipped.shape == (256, 4)
        np.testing.assert_array_equal(shipped, fresh)
    assert len(written) == 2


@pytest.mark.parametrize("key", [colors.PROBABILITY, colors.UNCERTAINTY])
def test_tables_are_perceptually_ordered(key):
    lum = _lightness(colors.table_rgba(key))
    steps = np.diff(lum)
    # monotonic up to 8-bit rounding, and steadily so (perceptually uniform: even steps)
    assert steps.min() > -0.2, "lightness must increase along the table"
    assert lum[-1] - lum[0] > 60
    window = np.convolve(steps, np.ones(16), "valid")     # L* gained over 16 entries
    assert window.min() > 0.5 * np.median(window) and window.max() < 1.5 * np.median(window)
    assert lum[0] > 10, "the darkest entry must stay visible over a dark CT"


def test_colour_tables_created_once_per_scene():
    scene = slicer.vtkMRMLScene()
    first = colors.ensure_colour_tables(scene)
    n = scene.GetNumberOfNodes()
    second = colors.ensure_colour_tables(scene)
    assert scene.GetNumberOfNodes() == n == 2
    assert {k: v.GetID() for k, v in first.items()} == {k: v.GetID() for k, v in second.items()}
    node = first[colors.UNCERTAINTY]
    assert node.GetName() == "CalibU Uncertainty" and node.GetNumberOfColors() == 256
    rgba = colors.table_rgba(colors.UNCERTAINTY)
    c = [0.0] * 4
    node.GetColor(200, c)
    np.testing.assert_allclose(np.array(c) * 255, rgba[200], atol=0.51)


def test_default_colour_nodes_added_to_bare_scene_only_once():
    scene = slicer.vtkMRMLScene()
    colors.ensure_default_colour_nodes(scene)
    n = scene.GetNumberOfNodes()
    assert scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is not None
    colors.ensure_default_colour_nodes(scene)
    assert scene.GetNumberOfNodes() == n


def test_malformed_table_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("0 a 1 2 3 255\n2 b 1 2 3 255\n")
    with pytest.raises(InputError, match="without gaps"):
        colors.read_colour_table_file(bad)
    bad.write_text("0 a 1 2 300 255\n")
    with pytest.raises(InputError, match="0-255"):
        colors.read_colour_table_file(bad)
    with pytest.raises(InputError, match="not found"):
        colors.read_colour_table_file(tmp_path / "none.txt")


def test_legend_entries():
    prob = colors.legend_for("prob_Brainstem", (0, 1))
    assert prob.colour_table == "CalibU Probability" and "Brainstem" in prob.text()
    ent = colors.legend_for("entropy", (0.2, 0.69), (0.2, 1.3))
    assert ent.colour_table == "CalibU Uncertainty" and ent.units == "nats" and "0.69" in ent.text()
    assert "drawn where 0.2 ≤ value ≤ 1.3 (≥ 0.69: brightest colour)" in ent.text()


def test_segment_palette_is_what_the_generator_makes_and_stays_apart(tmp_path):
    from CalibUncertaintyLib.mrml import segment_colours as sc

    fresh = colors.read_colour_table_file(sc.write_palette_file(tmp_path))
    np.testing.assert_array_equal(fresh, colors.read_colour_table_file(colors.RESOURCES / sc.PALETTE_FILE))
    pal = sc.palette()
    assert pal.shape == (sc.N_SEGMENT_COLOURS, 3) and sc.N_SEGMENT_COLOURS >= 40
    lab = sc.srgb_to_lab(pal)
    d = sc.delta_e(lab, lab)
    np.fill_diagonal(d, np.inf)
    assert d.min() > 19                                   # 48 colours, pairwise clearly different
    assert sc.delta_e(lab, sc.overlay_lab()).min() >= sc.OVERLAY_MIN_DE   # never an overlay colour
    assert lab[:, 0].min() >= sc.MIN_LIGHTNESS           # visible over a dark CT
    assert [sc.palette_colour(k) for k in (1, 49)] == [sc.palette_colour(1)] * 2


@pytest.mark.parametrize("name, key", [("LeftParotid", "parotid"), ("parotid_gland_R", "parotid"),
                                       ("Parotid gland (right)", "parotid"), ("SpinalCord", "spinalcord"),
                                       ("spinal cord", "spinalcord"), ("Brainstem", "brainstem")])
def test_structure_names_normalised_for_anatomical_colours(name, key):
    from CalibUncertaintyLib.mrml.segment_colours import normalise_name

    assert normalise_name(name) == key


def test_anatomical_colour_too_close_to_the_overlays_is_not_used():
    from CalibUncertaintyLib.mrml import segment_colours as sc

    scene = slicer.vtkMRMLScene()
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(sc.ANATOMY_TABLE)
    table.SetTypeToUser()
    table.SetNumberOfColors(2)
    inferno_mid = colors.table_rgba(colors.UNCERTAINTY)[128, :3] / 255.0
    table.SetColor(0, "mandible", *inferno_mid, 1.0)     # an overlay colour: would be confused
    table.SetColor(1, "brain stem", 0.2, 0.9, 1.0, 1.0)
    scene.AddNode(table)
    assert sc.segment_colour(5, "Mandible", scene) == sc.palette_colour(5)
    assert sc.segment_colour(1, "Brainstem", scene) == pytest.approx((0.2, 0.9, 1.0), abs=0.003)
    assert sc.segment_colour(1, "Brainstem", None) == sc.palette_colour(1)
