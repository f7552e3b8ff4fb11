"""The cine phantom: a whole cycle with the true Lagrangian field and exact strains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp
from scipy import ndimage

from scripts.phantom import cardiac_phantom_cine, cardiac_phantom_pair, cine_motion, cycle_phase, true_strain

T = 20
INDEX = 3


@pytest.fixture(scope="module")
def cine():
    return cardiac_phantom_cine(INDEX, size=128, num_frames=T)


@pytest.fixture(scope="module")
def clean():
    return cardiac_phantom_cine(INDEX, size=128, num_frames=T, noise=False)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def grid(size: int) -> np.ndarray:
    return np.mgrid[0:size, 0:size].astype(np.float64)


def warp(image: np.ndarray, field: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """MONAI Warp (pull): image(x + field(x))."""
    image_t, field_t = torch.as_tensor(image)[None, None].double(), torch.as_tensor(field)[None].double()
    moved = Warp(mode=mode, padding_mode="zeros")(image_t, field_t)
    return moved[0, 0].numpy()


@pytest.mark.parametrize("mode", ["cine", "echo"])
def test_same_arguments_give_identical_arrays(mode):
    a = cardiac_phantom_cine(5, seed=2, size=64, num_frames=8, mode=mode)
    b = cardiac_phantom_cine(5, seed=2, size=64, num_frames=8, mode=mode)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other = cardiac_phantom_cine(6, seed=2, size=64, num_frames=8, mode=mode)
    for key in ("images", "true_lagrangian"):
        assert not np.array_equal(a[key], other[key]), key


def test_shapes_ranges_and_the_ed_frame(cine):
    size = 128
    assert cine["images"].shape == (T, size, size) and cine["images"].dtype == np.float32
    assert cine["labels"].shape == (T, size, size) and cine["labels"].dtype == np.uint8
    assert cine["true_lagrangian"].shape == (T, 2, size, size) and cine["true_lagrangian"].dtype == np.float32
    assert cine["true_gradient"].shape == (T, 2, 2, size, size)
    assert cine["eulerian"].shape == (T, 2, size, size) and cine["outlier_mask"].shape == (T, size, size)
    for t in range(T):
        assert cine["images"][t].min() == 0.0 and cine["images"][t].max() == pytest.approx(1.0, abs=1e-6)
        assert set(np.unique(cine["labels"][t])) == {0, 1, 2, 3}
    assert cine["ed_index"] == 0 and cine["es_index"] == round(0.35 * T)
    assert cine["phase"][0] == 0.0 and cine["phase"][cine["es_index"]] == 1.0
    assert cine["phase"].min() >= 0.0 and cine["phase"].max() <= 1.0 and cine["phase"][-1] < 0.05
    # U_0 = 0 exactly, and the ED frame is the pair phantom's ED anatomy
    assert not cine["true_lagrangian"][0].any() and not cine["eulerian"][0].any() and not cine["true_gradient"][0].any()
    assert not cine["outlier_mask"][0].any()
    pair = cardiac_phantom_pair(INDEX, size=size, mode="cine")
    np.testing.assert_array_equal(cine["labels"][0], pair["moving_label"][0])
    assert np.corrcoef(cine["images"][0].ravel(), pair["moving"][0].ravel())[0, 1] > 0.95  # other texture and noise
    assert np.abs(cine["true_lagrangian"][cine["es_index"]]).max() > 4.0  # it does move


def test_phase_curve():
    phase = cycle_phase(20, 7)
    assert phase.argmax() == 7 and phase[0] == 0.0
    assert (np.diff(phase[:8]) > 0).all() and (np.diff(phase[7:]) < 0).all()
    assert all(phase[7 + k] > phase[7 - k] for k in range(1, 8))  # a slower diastolic return than systolic rise
    assert np.abs(phase[7] - phase[6]) < np.abs(phase[4] - phase[3])  # smooth (flat) at ES


def test_eulerian_inverts_the_motion(cine):
    """The pull field on frame t's grid takes every pixel back to its ED position: X + U_t(X) = x."""
    assert cine["inversion_residual"].max() < 1e-3
    motion = cine_motion(INDEX, size=128, num_frames=T)
    x = grid(128)
    for t in (3, cine["es_index"], 15):
        X = x + cine["eulerian"][t]
        residual = np.hypot(*(X + motion.displacement(t, X)[0] - x))
        assert residual.max() < 1e-3, t
        wrong = X - cine["eulerian"][t] * 0.9
        assert np.hypot(*(wrong + motion.displacement(t, wrong)[0] - x)).max() > 0.1  # the check can fail


def test_analytic_gradient_matches_central_differences(cine):
    motion = cine_motion(INDEX, size=128, num_frames=T)
    points = np.random.default_rng(0).uniform(0, 127, (2, 2000))
    h = 1e-3
    for t in (2, cine["es_index"], 13):
        u, jac = motion.displacement(t, points)
        for j in range(2):
            step = np.zeros((2, 1))
            step[j] = h
            numeric = (motion.displacement(t, points + step)[0] - motion.displacement(t, points - step)[0]) / (2 * h)
            np.testing.assert_allclose(jac[:, j], numeric, atol=1e-5)  # O(h) only at the C1 seams of the profile
    np.testing.assert_allclose(cine["true_lagrangian"][5], motion.lagrangian(5, 128)[0], atol=1e-5)


def test_motion_is_invertible_everywhere(cine):
    jac = cine["true_gradient"].astype(np.float64)
    det = (1 + jac[:, 0, 0]) * (1 + jac[:, 1, 1]) - jac[:, 0, 1] * jac[:, 1, 0]
    assert det.min() > 0.05


def test_frames_are_the_ed_image_pulled_through_the_eulerian_field(clean, cine):
    """Noise aside, frame t is the ED image at x + eulerian_t(x) (up to the per-frame min-max scaling), away from
    the blood pool (its intensity follows the flow) and the outliers; 95 % of the field is visibly worse."""
    np.testing.assert_array_equal(clean["labels"], cine["labels"])
    for t in (4, clean["es_index"], 12):
        frame = clean["images"][t]
        keep = (frame > 0) & ndimage.binary_erosion(clean["labels"][t] != 3, iterations=2)
        keep &= ~ndimage.binary_dilation(clean["outlier_mask"][t] > 0, iterations=2)
        errors = []
        for scale in (1.0, 0.95):
            warped = warp(clean["images"][0], scale * clean["eulerian"][t])
            design = np.stack([warped[keep], np.ones(keep.sum())], axis=1)
            coefficients = np.linalg.lstsq(design, frame[keep], rcond=None)[0]
            errors.append(np.abs(frame[keep] - design @ coefficients).max())
        assert errors[0] < 1e-4 < 5e-3 < errors[1], (t, errors)
    # with noise the residual is the noise: small, and far below that of the undeformed ED image
    t = cine["es_index"]
    heart = ndimage.binary_dilation(cine["labels"][t] > 0, iterations=3) & (cine["labels"][t] != 3)
    keep = heart & (cine["images"][t] > 0) & (cine["outlier_mask"][t] == 0)
    moved = np.abs(cine["images"][t] - warp(cine["images"][0], cine["eulerian"][t]))[keep].mean()
    still = np.abs(cine["images"][t] - cine["images"][0])[keep].mean()
    assert moved < 0.08 and moved < 0.5 * still, (moved, still)


def test_labels_are_the_ed_labels_carried_by_the_motion(cine):
    for t in (4, cine["es_index"], 14):
        carried = warp(cine["labels"][0].astype(np.float64), cine["eulerian"][t], mode="nearest").round()
        for label in (1, 2, 3):
            assert dice(carried == label, cine["labels"][t] == label) > 0.93, (t, label)


@pytest.mark.parametrize("index", [0, 3, 9])
def test_label_areas_are_physiological(index):
    cine = cardiac_phantom_cine(index, size=128, num_frames=T)
    es = cine["es_index"]
    areas = np.array([[(cine["labels"][t] == label).sum() for label in (1, 2, 3)] for t in range(T)], dtype=float)
    rv, myo, lv = areas.T
    assert lv.argmin() == es and 0.3 < lv[es] / lv[0] < 0.6  # the cavity empties, smallest at ES
    assert (np.diff(lv[: es + 1]) <= 0).all() and (np.diff(lv[es:]) >= 0).all()
    assert np.abs(myo / myo[0] - 1).max() < 0.03  # the myocardium keeps its area (the wall thickens)
    assert 0.55 < rv[es] / rv[0] < 0.9  # a smaller RV contraction
    assert np.abs(lv[-1] / lv[0] - 1) < 0.03  # back near ED at the end of the cycle


def test_true_strain_at_es_is_physiological(cine):
    es = cine["es_index"]
    strain = true_strain(cine, es)
    assert 0.25 < strain["global_radial_green"] < 0.6  # thickening
    assert -0.25 < strain["global_circumferential_green"] < -0.15  # shortening
    assert 0.2 < strain["global_radial_engineering"] < strain["global_radial_green"]
    assert strain["global_circumferential_engineering"] < strain["global_circumferential_green"]
    myo = cine["labels"][0] == 2
    for direction in ("radial", "circumferential"):
        engineering, green = strain[f"{direction}_engineering"], strain[f"{direction}_green"]
        np.testing.assert_allclose(green, engineering + engineering**2 / 2, atol=1e-6)  # E = e + e^2 / 2
        assert not green[~myo].any()
    # the contraction's closed form: circumferential stretch r / R, r^2 = R^2 - shift on the myocardium
    radius2 = ((grid(128) - cine["lv_centre"][:, None, None]) ** 2).sum(0)[myo]
    expected = -cine["shift"] / (2 * radius2)
    assert np.abs(strain["circumferential_green"][myo] - expected).mean() < 0.02  # twist, RV and waves aside
    assert np.abs(strain["radial_green"][myo] - expected).mean() > 0.2  # a swap of the directions would fail
    for frame in (0, T - 1):
        late = true_strain(cine, frame)
        assert abs(late["global_radial_green"]) < 0.01 and abs(late["global_circumferential_green"]) < 0.01
    assert abs(true_strain(cine, 0)["global_radial_green"]) < 1e-12


def test_true_strain_follows_material_segments_with_anisotropic_spacing(cine):
    """Engineering strain = length change of a short material segment, measured in mm with spacing (1.2, 0.8)."""
    es, spacing = cine["es_index"], np.array([1.2, 0.8])
    motion = cine_motion(INDEX, size=128, num_frames=T)
    strain = true_strain(cine, es, spacing=spacing)
    isotropic = true_strain(cine, es, spacing=(2.0, 2.0))
    np.testing.assert_allclose(isotropic["radial_green"], true_strain(cine, es)["radial_green"], atol=1e-12)
    assert np.abs(strain["radial_green"] - isotropic["radial_green"]).max() > 0.01
    myo = np.argwhere(cine["labels"][0] == 2)[::25].T.astype(np.float64)  # some ED myocardium pixels
    offset = (myo - cine["lv_centre"][:, None]) * spacing[:, None]
    radial = offset / np.linalg.norm(offset, axis=0)
    h = 1e-3  # mm
    for name, direction in (("radial", radial), ("circumferential", np.stack([-radial[1], radial[0]]))):
        step = h * direction / spacing[:, None]  # pixels
        ends = [points + motion.displacement(es, points)[0] for points in (myo - step / 2, myo + step / 2)]
        stretch = np.linalg.norm((ends[1] - ends[0]) * spacing[:, None], axis=0) / h - 1
        at = tuple(myo.astype(int))
        np.testing.assert_allclose(strain[f"{name}_engineering"][at], stretch, atol=1e-5)


def test_echo_cine_keeps_the_fan_and_the_outliers():
    cine = cardiac_phantom_cine(1, size=64, num_frames=10, mode="echo")
    zero = np.stack([cine["images"][t] == 0 for t in range(10)])
    fan_off = zero.all(axis=0)  # the fan and the body margin: never imaged
    assert fan_off[0, 0] and fan_off[-1, 0] and fan_off[-1, -1] and not fan_off[32, 32]
    es = cine["es_index"]
    assert cine["outlier_mask"][es].sum() > 5
    residual = np.abs(cine["images"][es] - warp(cine["images"][0], cine["eulerian"][es]))
    inside, outside = cine["outlier_mask"][es] > 0, (cine["images"][es] > 0) & (cine["outlier_mask"][es] == 0)
    assert residual[inside].mean() > 1.5 * residual[outside].mean()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="multiple of 16"):
        cardiac_phantom_cine(0, size=60)
    with pytest.raises(ValueError, match="mode"):
        cardiac_phantom_cine(0, mode="ct")
    with pytest.raises(ValueError, match="frames"):
        cardiac_phantom_cine(0, num_frames=2)
    with pytest.raises(ValueError, match="es_fraction"):
        cardiac_phantom_cine(0, es_fraction=1.0)
