"""Myocardial geometry (bundle/scripts/myocardium.py): directions, AHA segments, mid-wall contour, contour strain."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from conftest import shared_data

from scripts.myocardium import (
    ACDC_LABELS,
    CAMUS_LABELS,
    PHANTOM_ORIENTATION,
    contour_strain,
    la_segments,
    midwall_contour,
    sax_segments,
    transmural_coordinate,
    wall_directions,
)


def polar_mm(shape, centre_mm, spacing):
    g0, g1 = np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1], indexing="ij")
    d0, d1 = g0 - centre_mm[0], g1 - centre_mm[1]
    return np.hypot(d0, d1), np.degrees(np.arctan2(d1, d0)), d0, d1


def ring(shape=(65, 65), centre=(32.0, 32.0), r_endo=12.0, r_epi=18.0, spacing=(1.0, 1.0), rv_angle=None,
         rv_half_width=60.0) -> np.ndarray:
    """ACDC labels: LV cavity disc, myocardium ring (radii in mm), optional RV crescent centred at ``rv_angle`` deg
    (atan2(axis 1, axis 0)) touching the ring over +-``rv_half_width`` deg."""
    r, theta, _, _ = polar_mm(shape, np.asarray(centre) * spacing, spacing)
    labels = np.zeros(shape, np.uint8)
    if rv_angle is not None:
        off = np.abs((theta - rv_angle + 180) % 360 - 180)
        labels[(r >= r_epi) & (r < r_epi + 8) & (off <= rv_half_width)] = 1
    labels[(r >= r_endo) & (r < r_epi)] = 2
    labels[r < r_endo] = 3
    return labels


def segment_at(segments: np.ndarray, angle: float, radius: float = 15.0, centre=(32, 32)) -> int:
    p = np.round(np.array(centre) + radius * np.array([np.cos(np.radians(angle)), np.sin(np.radians(angle))]))
    return int(segments[int(p[0]), int(p[1])])


def affine_with_anterior(anterior_axis1: float) -> np.ndarray:
    """A real (oblique) RAS affine: array axis 0 -> (0.6, 0, 0.8), axis 1 -> (0, anterior_axis1, 0)."""
    a = np.eye(4)
    a[:3, 0], a[:3, 1] = (0.6, 0.0, 0.8), (0.0, anterior_axis1, 0.0)
    a[:3, 2] = np.cross(a[:3, 0], a[:3, 1])
    return a


# ---------------------------------------------------------------- directions
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)])
@pytest.mark.parametrize("method", ["centroid", "wall_normal"])
def test_directions_on_an_annulus_are_radial_and_tangential(method, spacing):
    shape = (int(80 / spacing[0]), int(80 / spacing[1]))  # a circle in mm, an ellipse in pixels when anisotropic
    r, _, d0, d1 = polar_mm(shape, (40.0, 40.0), spacing)
    labels = np.where(r < 15, 3, np.where(r < 25, 2, 0)).astype(np.uint8)
    normal, tangent = wall_directions(labels, spacing, ACDC_LABELS, method)
    assert normal.shape == tangent.shape == (1, 2) + shape
    myo = labels == 2
    radial = np.stack([d0, d1]) / np.where(r > 0, r, 1)
    dot_n = (normal[0] * radial).sum(0)[myo]
    dot_t = (tangent[0] * np.stack([-radial[1], radial[0]])).sum(0)[myo]
    if method == "centroid":
        np.testing.assert_allclose(dot_n, 1.0, atol=1e-9)
        np.testing.assert_allclose(dot_t, 1.0, atol=1e-9)
    else:
        assert dot_n.mean() > 0.995 and np.percentile(dot_n, 5) > 0.98 and dot_n.min() > 0.95
        np.testing.assert_allclose(dot_t, dot_n, atol=1e-12)  # tangent = normal rotated +90 deg
    np.testing.assert_allclose(np.linalg.norm(normal[0], axis=0)[myo], 1.0, atol=1e-9)
    assert not normal[0][:, ~myo].any() and not tangent[0][:, ~myo].any()


def test_wall_normal_follows_the_wall_where_the_centroid_direction_does_not():
    """On the straight flank of an elongated (stadium) ring the wall normal is perpendicular to the wall."""
    labels = np.zeros((60, 120), np.uint8)
    labels[10:50, 10:110] = 2
    labels[18:42, 18:102] = 3
    point = (14, 90)  # on the flank at axis 0 = 10..18, far from the centre along axis 1
    n_wall, _ = wall_directions(labels, (1.0, 1.0), ACDC_LABELS, "wall_normal")
    n_cent, _ = wall_directions(labels, (1.0, 1.0), ACDC_LABELS, "centroid")
    assert n_wall[0, 0][point] < -0.99  # outward = decreasing axis 0
    assert n_cent[0, 0][point] > -0.6  # the centroid direction is oblique there


def test_directions_without_a_cavity_fall_back_to_the_myocardium_centroid():
    r, _, d0, d1 = polar_mm((41, 41), (20.0, 20.0), (1.0, 1.0))
    labels = np.stack([np.where(r < 8, 2, 0), ring((41, 41), (20, 20), 6, 12)]).astype(np.uint8)
    for method in ("centroid", "wall_normal"):
        normal, _ = wall_directions(labels, (1.0, 1.0), ACDC_LABELS, method)
        inside = (labels[0] == 2) & (r > 0)
        np.testing.assert_allclose((normal[0] * np.stack([d0, d1]) / np.where(r > 0, r, 1)).sum(0)[inside], 1.0)


def test_centroid_directions_start_at_the_cavity_centre_not_the_myocardium_centre():
    r, _, d0, d1 = polar_mm((61, 61), (34.0, 30.0), (1.0, 1.0))  # cavity centred at (34, 30), epicardium at (30, 30)
    r_epi, _, _, _ = polar_mm((61, 61), (30.0, 30.0), (1.0, 1.0))
    labels = np.where(r < 8, 3, np.where(r_epi < 20, 2, 0)).astype(np.uint8)
    normal, _ = wall_directions(labels, (1.0, 1.0), ACDC_LABELS, "centroid")
    myo = labels == 2
    np.testing.assert_allclose((normal[0] * np.stack([d0, d1]) / np.where(r > 0, r, 1)).sum(0)[myo], 1.0, atol=1e-9)


def test_transmural_coordinate_uses_physical_distances():
    labels = np.full((20, 20), 2, np.uint8)
    labels[:5] = 0  # outside: 3 pixels above (7, 7) along axis 0
    labels[5:, :5] = 3  # cavity: 3 pixels left of (7, 7) along axis 1
    assert transmural_coordinate(labels, (1.0, 1.0), ACDC_LABELS)[7, 7] == pytest.approx(0.5)
    assert transmural_coordinate(labels, (1.0, 2.0), ACDC_LABELS)[7, 7] == pytest.approx(6.0 / 9.0)


def test_unknown_direction_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        wall_directions(ring(), (1.0, 1.0), ACDC_LABELS, "radial")


# ---------------------------------------------------------------- short-axis AHA segments
# RV centred at 180 deg (decreasing axis 0, the ACDC septum), default anterior = decreasing axis 1 (-90 deg):
# anterior insertion at 240 deg, inferior at 120 deg; sectors go from 240 deg toward smaller angles.
EXPECTED_BASAL = {210: 2, 150: 3, 90: 4, 30: 5, -30: 6, -90: 1}


def test_ring_with_rv_gives_the_aha_numbers_at_known_angles():
    result = sax_segments(ring(rv_angle=180), (1.0, 1.0), ACDC_LABELS, single_slice_level="basal")
    assert result.levels == ["basal"] and result.notes == []
    for angle, number in EXPECTED_BASAL.items():
        assert segment_at(result.segments[0], angle) == number, angle
    assert {segment_at(result.segments[0], 180 + d) for d in (-8, 8)} == {2, 3}  # septum centre: the 2/3 boundary
    assert {segment_at(result.segments[0], d) for d in (-8, 8)} == {5, 6}  # opposite wall: the 5/6 boundary
    anterior, inferior = result.insertion_points[0]
    for point, angle in ((anterior, 240), (inferior, 120)):
        found = np.degrees(np.arctan2(point[1] - 32, point[0] - 32)) % 360
        assert abs(found - angle) < 6, (point, found)
    assert ((result.segments[0] > 0) == (ring(rv_angle=180) == 2)).all()


def test_mid_and_apical_numbering():
    mid = sax_segments(ring(rv_angle=180), (1.0, 1.0), ACDC_LABELS, single_slice_level="mid").segments[0]
    for angle, number in EXPECTED_BASAL.items():
        assert segment_at(mid, angle) == number + 6
    apical = sax_segments(ring(rv_angle=180), (1.0, 1.0), ACDC_LABELS, single_slice_level="apical").segments[0]
    for angle, number in {180: 14, 100: 15, 0: 16, -80: 13}.items():
        assert segment_at(apical, angle) == number, angle


def test_rotation_sense_follows_the_affine_anterior():
    labels = ring(rv_angle=180)
    same = sax_segments(labels, (1.0, 1.0), ACDC_LABELS, affine=affine_with_anterior(-1.0), single_slice_level="basal")
    flipped = sax_segments(labels, (1.0, 1.0), ACDC_LABELS, affine=affine_with_anterior(1.0),
                           single_slice_level="basal")
    default = sax_segments(labels, (1.0, 1.0), ACDC_LABELS, single_slice_level="basal")
    np.testing.assert_array_equal(same.segments, default.segments)
    for angle, number in EXPECTED_BASAL.items():
        assert segment_at(flipped.segments[0], -angle) == number, angle  # mirrored about the septal axis
    assert segment_at(flipped.segments[0], 150) == 2 and segment_at(flipped.segments[0], 90) == 1
    # a diagonal affine is not a real orientation: the image convention decides, here flipped by hand
    diagonal = sax_segments(labels, (1.0, 1.0), ACDC_LABELS, affine=np.diag([1.0, -1.0, 1.0, 1.0]),
                            anterior=(0.0, 1.0), single_slice_level="basal")
    np.testing.assert_array_equal(diagonal.segments, flipped.segments)


def test_mirrored_image_gives_mirrored_numbering():
    labels = ring(rv_angle=200)
    original = sax_segments(labels, (1.0, 1.0), ACDC_LABELS).segments[0]
    mirrored = sax_segments(labels[::-1], (1.0, 1.0), ACDC_LABELS).segments[0]  # RV now at -20 deg, same anterior
    myo = labels == 2
    assert (mirrored[::-1] == original)[myo].mean() > 0.99
    assert segment_at(mirrored, -20) in (8, 9) and segment_at(original, 200) in (8, 9)


def test_phantom_orientation_puts_the_rv_on_the_septum():
    from scripts.phantom import cardiac_phantom_pair

    labels = cardiac_phantom_pair(3, 0, 128, "cine")["moving_label"][0]
    result = sax_segments(labels, (1.0, 1.0), ACDC_LABELS, **PHANTOM_ORIENTATION)
    assert result.notes == []
    near_rv = (labels == 2) & (np.roll(labels == 1, 3, axis=1) | np.roll(labels == 1, -3, axis=1))
    assert np.isin(result.segments[0][near_rv], (8, 9)).mean() > 0.8
    top = result.segments[0][np.nonzero(labels == 2)[0].min()]
    assert set(np.unique(top[top > 0])) <= {7, 12, 8}  # anterior = decreasing axis 0 in the phantom


def test_slices_without_rv_borrow_the_nearest_origin_and_say_so():
    stack = np.stack([ring(rv_angle=180, r_endo=13, r_epi=19), ring(rv_angle=180), ring(r_endo=8, r_epi=14)])
    result = sax_segments(stack, (1.0, 1.0), ACDC_LABELS)
    assert result.notes == ["slice 2: no RV contact; AHA origin from slice 1"]
    assert result.insertion_points[2] is None and result.insertion_points[1] is not None
    assert segment_at(result.segments[2], 180, radius=11) == 14 and segment_at(result.segments[2], -90, 11) == 13


def test_no_rv_anywhere_uses_the_image_convention():
    result = sax_segments(np.stack([ring(), ring()]), (1.0, 1.0), ACDC_LABELS)
    assert any("no slice has RV contact" in note and "from the image-axis convention" in note for note in result.notes)
    with_affine = sax_segments(np.stack([ring(), ring()]), (1.0, 1.0), ACDC_LABELS, affine=affine_with_anterior(-1.0))
    assert any("no slice has RV contact" in note and "from the affine" in note for note in with_affine.notes)
    assert result.levels == ["basal", "apical"]
    assert segment_at(result.segments[0], 210) == 2 and segment_at(result.segments[0], 150) == 3
    assert segment_at(result.segments[1], 180) == 14


def test_three_slices_are_basal_mid_apical_with_the_base_at_the_larger_heart():
    stack = np.stack([np.zeros((65, 65), np.uint8), ring(rv_angle=180, r_endo=10, r_epi=16),
                      ring(rv_angle=180, r_endo=12, r_epi=18), ring(rv_angle=180, r_endo=14, r_epi=20)])
    result = sax_segments(stack, (1.0, 1.0), ACDC_LABELS)
    assert result.levels == [None, "apical", "mid", "basal"]
    assert not result.segments[0].any()
    assert set(np.unique(result.segments[3])) - {0} == set(range(1, 7))
    assert set(np.unique(result.segments[2])) - {0} == set(range(7, 13))
    assert set(np.unique(result.segments[1])) - {0} == set(range(13, 17))
    assert sax_segments(stack[::-1], (1.0, 1.0), ACDC_LABELS).levels == ["basal", "mid", "apical", None]
    assert sax_segments(stack, (1.0, 1.0), ACDC_LABELS, base="first").levels == [None, "basal", "mid", "apical"]
    six = sax_segments(np.concatenate([stack[1:], stack[1:]][::-1]), (1.0, 1.0), ACDC_LABELS).levels
    assert six.count("basal") == six.count("mid") == six.count("apical") == 2


# ---------------------------------------------------------------- long axis
def horseshoe(shape=(64, 80), spacing=(1.0, 1.0)) -> np.ndarray:
    """CAMUS-like LV: apex toward axis 1 = 0, open base at axis 1 = 60 (left atrium below it)."""
    g0, g1 = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    e = lambda a0, a1: ((g0 - 32) / a0) ** 2 + ((g1 - 60) / a1) ** 2 < 1  # noqa: E731
    labels = np.zeros(shape, np.uint8)
    labels[e(18, 45) & (g1 <= 60)] = 2
    labels[e(12, 39) & (g1 <= 60)] = 1
    labels[(np.abs(g0 - 32) < 12) & (g1 > 60) & (g1 < 75)] = 3
    return labels


def test_la_segments_of_a_horseshoe_are_thirds_of_each_wall():
    labels = horseshoe()
    result = la_segments(labels, (1.0, 1.0), CAMUS_LABELS, view="4CH")
    seg = result.segments[0]
    assert seg.shape == labels.shape and ((seg > 0) == (labels == 2)).all()
    assert set(np.unique(seg)) - {0} == {3, 9, 14, 6, 12, 16}
    rows, cols = np.nonzero(labels == 2)
    t = (60 - cols) / 45.0  # fraction of the way from the base (axis 1 = 60) to the epicardial apex (15)
    levels = np.select([np.isin(seg[rows, cols], (3, 6)), np.isin(seg[rows, cols], (9, 12))], [0, 1], 2)
    clear = np.abs(3 * t - np.round(3 * t)) > 0.15  # away from the third boundaries
    np.testing.assert_array_equal(levels[clear], np.clip(np.floor(3 * t[clear]), 0, 2))
    side = rows < 32
    assert np.isin(seg[rows[side & (t < 0.6)], cols[side & (t < 0.6)]], (3, 9)).all()  # septal = low axis 0
    assert np.isin(seg[rows[~side & (rows > 32) & (t < 0.6)], cols[~side & (rows > 32) & (t < 0.6)]], (6, 12)).all()
    (a0, a1), (b0, b1) = result.insertion_points[0]
    assert a0 < 32 < b0 and abs(a1 - 60) < 3 and abs(b1 - 60) < 3


def test_la_segments_views_and_sides():
    labels = horseshoe()
    s2 = la_segments(labels, (1.0, 1.0), CAMUS_LABELS, view="A2C").segments[0]
    s0 = la_segments(labels, (1.0, 1.0), CAMUS_LABELS).segments[0]
    swapped = la_segments(labels, (1.0, 1.0), CAMUS_LABELS, view="2CH", septal_side="axis0_high").segments[0]
    base_low, base_high = (20, 57), (44, 57)
    assert (s2[base_low], s2[base_high]) == (4, 1)
    assert (s0[base_low], s0[base_high], s0[32, 17]) in {(1, 4, 3), (1, 4, 6)}
    assert (swapped[base_low], swapped[base_high]) == (1, 4)
    mirrored = la_segments(labels[::-1], (1.0, 1.0), CAMUS_LABELS, view="2CH", septal_side="axis0_high").segments[0]
    np.testing.assert_array_equal(mirrored[::-1], s2)


# ---------------------------------------------------------------- mid-wall contour and contour strain
@pytest.mark.parametrize("flip", [None, 0, 1])
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 1.5)])
def test_midwall_contour_of_an_annulus_has_the_mean_radius(spacing, flip):
    shape = (81, 53) if spacing[1] == 1.5 else (81, 79)  # the centre (40, 39) mm is a pixel centre: symmetric
    r, _, _, _ = polar_mm(shape, (40.0, 39.0), spacing)
    labels = np.where(r < 15, 3, np.where(r < 25, 2, 0)).astype(np.uint8)
    labels = labels if flip is None else np.flip(labels, flip)  # same ring; contourpy's order is reversed
    contour = midwall_contour(labels, spacing, ACDC_LABELS)
    np.testing.assert_allclose(contour[0], contour[-1])  # closed loop
    radius = np.hypot(contour[:, 0] * spacing[0] - 40, contour[:, 1] * spacing[1] - 39)
    assert abs(radius.mean() - 20.0) < 0.3 and radius.std() < 0.3
    steps = np.linalg.norm(np.diff(contour, axis=0) * spacing, axis=1)
    assert np.all(steps > 0.97 * min(spacing)) and np.all(steps <= min(spacing) + 1e-9)  # even ~1-pixel steps
    angle = np.unwrap(np.arctan2(contour[:, 1] * spacing[1] - 39, contour[:, 0] * spacing[0] - 40))
    assert np.all(np.diff(angle) > 0)  # turning with increasing angle


@pytest.mark.parametrize("flip", [False, True])
def test_midwall_contour_of_a_horseshoe_is_open_through_the_apex(flip):
    """Flipping axis 1 (apex toward high axis 1) reverses contourpy's order; the start stays at low axis 0."""
    labels = horseshoe((65, 80))
    contour = midwall_contour(labels[:, ::-1] if flip else labels, (1.0, 1.0), CAMUS_LABELS)
    depth = 79 - contour[:, 1] if flip else contour[:, 1]  # back to the unflipped axis 1
    assert np.linalg.norm(contour[0] - contour[-1]) > 20
    assert contour[0][0] < 32 < contour[-1][0]  # from the low-axis-0 basal end to the other
    assert depth.min() < 20 and abs(contour[np.argmin(depth), 0] - 32) < 2
    assert depth.max() < 62  # nothing drawn across the mitral opening


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3)])
def test_contour_strain_of_a_uniform_scaling(spacing):
    labels = ring((65, 65), (32, 32), 12, 18)
    contour = midwall_contour(labels, spacing, ACDC_LABELS)
    g0, g1 = np.meshgrid(np.arange(65.0), np.arange(65.0), indexing="ij")
    scaling = np.stack([-0.2 * (g0 - 32), -0.2 * (g1 - 32)])  # x -> c + 0.8 (x - c)
    assert abs(contour_strain(contour, scaling, spacing) + 0.2) < 1e-3
    assert abs(contour_strain(contour, np.ones((2, 65, 65)) * 3.0, spacing)) < 1e-9  # translation


def test_contour_strain_measures_lengths_in_mm():
    """A circle in mm (an ellipse in pixels) stretched by 10 % along axis 1 becomes an ellipse 1.1 : 1 in mm."""
    spacing = (1.0, 2.0)
    r, _, _, _ = polar_mm((80, 40), (40.0, 40.0), spacing)
    contour = midwall_contour(np.where(r < 15, 3, np.where(r < 25, 2, 0)).astype(np.uint8), spacing, ACDC_LABELS)
    g1 = np.meshgrid(np.arange(80.0), np.arange(40.0), indexing="ij")[1]
    stretch = np.stack([np.zeros_like(g1), 0.1 * (g1 - 20)])
    a, b = 1.1, 1.0
    ramanujan = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b))) / (2 * np.pi) - 1  # 0.0488
    assert contour_strain(contour, stretch, spacing) == pytest.approx(ramanujan, abs=2e-3)


# ---------------------------------------------------------------- real data (skipped without ../shared/data)
def test_acdc_stacks_segment_with_the_septum_on_the_rv():
    h5py = pytest.importorskip("h5py")
    root = shared_data("acdc")
    for patient in ("001", "023", "047", "064", "085"):
        path = sorted(root.glob(f"patient{patient}_frame*.h5"))[0]  # ED
        with h5py.File(path) as handle:
            labels = np.transpose(handle["label"][:], (0, 2, 1))  # (z, y, x) -> stack of NIfTI (x, y) slices
        result = sax_segments(labels, (1.0, 1.0), ACDC_LABELS)
        assert ((result.segments > 0) == (labels == 2)).all()
        present = [level for level in result.levels if level]
        assert present[0] == "basal" and present[-1] == "apical"  # ACDC stacks run from base to apex
        in_plane = np.zeros((3, 3, 3), bool)
        in_plane[1] = True
        touching = (labels == 2) & ndimage.binary_dilation(labels == 1, in_plane, iterations=2)
        assert np.isin(result.segments[touching], (2, 3, 8, 9, 14)).mean() > 0.7, patient


def test_camus_views_segment():
    root = shared_data("camus")
    for path in sorted(root.glob("patient00*_?CH_ED_gt.npy")):
        labels = np.rint(np.load(path)).astype(np.uint8)
        view = path.name.split("_")[1]
        result = la_segments(labels, (1.0, 1.0), CAMUS_LABELS, view=view)
        seg = result.segments[0]
        assert ((seg > 0) == (labels == 2)).all() and len(np.unique(seg)) == 7
        wall_a = (3, 9, 14) if view == "4CH" else (4, 10, 15)
        rows_a, rows_b = np.nonzero(np.isin(seg, wall_a))[0], np.nonzero((seg > 0) & ~np.isin(seg, wall_a))[0]
        assert rows_a.mean() < rows_b.mean()  # wall A (septal / inferior) toward low axis 0
        contour = midwall_contour(labels, (1.0, 1.0), CAMUS_LABELS)
        assert np.linalg.norm(contour[0] - contour[-1]) > 15
        inner = contour[1:-1]  # the ends lie on the edge of the opening
        corners = [labels[np.floor(inner[:, 0] + a).astype(int), np.floor(inner[:, 1] + b).astype(int)]
                   for a, b in ((0, 0), (0, 1), (1, 0), (1, 1))]
        cavity_and_outside = np.any(np.equal(corners, 1), 0) & np.any(np.isin(corners, (0, 3)), 0)
        assert not cavity_and_outside.any(), path.name  # no line along the mitral opening
