"""The built-in cardiac phantom: determinism, conventions, the true field, the echo sector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.blocks import Warp

from scripts.metrics import folding_percentage
from scripts.phantom import CardiacPhantomd, cardiac_phantom_pair, phantom_datalist

KEYS = ("moving", "fixed", "moving_label", "fixed_label", "true_ddf", "outlier_mask")
INDICES = (0, 1, 7, 100000, 200003)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def ellipse(size: int, scale: float = 1.0) -> np.ndarray:
    """The phantom's body ellipse (centre, semi-axes 0.44 and 0.47 of the side), optionally scaled."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return ((yy - size / 2) / (0.44 * size * scale)) ** 2 + ((xx - size / 2) / (0.47 * size * scale)) ** 2 <= 1.0


@pytest.mark.parametrize("mode", ["cine", "echo", "mixed"])
def test_same_index_and_seed_give_identical_arrays(mode):
    a = cardiac_phantom_pair(5, seed=3, size=64, mode=mode)
    b = cardiac_phantom_pair(5, seed=3, size=64, mode=mode)
    assert set(a) == set(KEYS)
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])


def test_different_index_or_seed_give_different_pairs():
    a = cardiac_phantom_pair(5, seed=0, size=64, mode="cine")
    for index, seed in ((6, 0), (5, 1)):
        other = cardiac_phantom_pair(index, seed=seed, size=64, mode="cine")
        for key in ("moving", "fixed", "true_ddf"):
            assert not np.array_equal(a[key], other[key]), key


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("mode", ["cine", "echo"])
def test_shapes_dtypes_and_ranges(size, mode):
    pair = cardiac_phantom_pair(2, size=size, mode=mode)
    for key in ("moving", "fixed"):
        assert pair[key].shape == (1, size, size) and pair[key].dtype == np.float32
        assert pair[key].min() == 0.0 and pair[key].max() == pytest.approx(1.0, abs=1e-6)  # min-max to [0, 1]
    for key in ("moving_label", "fixed_label"):
        assert pair[key].shape == (1, size, size) and pair[key].dtype == np.uint8
        assert set(np.unique(pair[key])) == {0, 1, 2, 3}  # background, RV, MYO, LV all present
    assert pair["true_ddf"].shape == (2, size, size) and pair["true_ddf"].dtype == np.float32
    assert np.isfinite(pair["true_ddf"]).all() and np.abs(pair["true_ddf"]).max() > 0.5
    assert pair["outlier_mask"].shape == (1, size, size) and pair["outlier_mask"].dtype == np.uint8
    assert set(np.unique(pair["outlier_mask"])) == {0, 1}


def test_invalid_arguments():
    with pytest.raises(ValueError, match="multiple of 16"):
        cardiac_phantom_pair(0, size=60)
    with pytest.raises(ValueError, match="mode"):
        cardiac_phantom_pair(0, mode="ct")
    with pytest.raises(ValueError, match="mode"):
        CardiacPhantomd(mode="ct")


@pytest.mark.parametrize("index", INDICES)
def test_background_is_exactly_zero_outside_the_body(index):
    size = 128
    pair = cardiac_phantom_pair(index, size=size, mode="cine")
    body = ellipse(size)
    # the ED image lives on the body ellipse: exactly 0 outside, non-zero inside (what the mask M relies on)
    assert (pair["moving"][0][~body] == 0).all()
    assert (pair["moving"][0][ellipse(size, 0.97)] > 0).mean() > 0.999
    assert (pair["moving_label"][0][~body] == 0).all()
    # the ES body is the warped ellipse: outside a slightly larger ellipse everything is 0
    assert (pair["fixed"][0][~ellipse(size, 1.08)] == 0).all()
    assert (pair["fixed_label"][0][~ellipse(size, 1.08)] == 0).all()
    assert (pair["fixed"][0][ellipse(size, 0.9)] > 0).mean() > 0.999


@pytest.mark.parametrize("mode", ["cine", "echo"])
@pytest.mark.parametrize("index", INDICES)
def test_true_field_has_no_folding_and_maps_the_labels(mode, index):
    pair = cardiac_phantom_pair(index, size=128, mode=mode)
    ddf = torch.as_tensor(pair["true_ddf"])[None].double()
    assert folding_percentage(ddf).item() == 0.0
    # pull convention of MONAI Warp: fixed(x) ~ moving(x + true_ddf(x))
    warped = Warp(mode="nearest", padding_mode="zeros")(torch.as_tensor(pair["moving_label"])[None].double(), ddf)
    warped = warped[0, 0].round().numpy().astype(np.uint8)
    for label in (1, 2, 3):
        assert dice(warped == label, pair["fixed_label"][0] == label) > 0.95, label


@pytest.mark.parametrize("index", INDICES)
def test_undeformed_myocardium_overlap_is_well_below_one(index):
    pair = cardiac_phantom_pair(index, size=128, mode="cine")
    assert dice(pair["moving_label"][0] == 2, pair["fixed_label"][0] == 2) < 0.8


def test_undeformed_myocardium_overlap_on_average():
    values = [dice(p["moving_label"][0] == 2, p["fixed_label"][0] == 2) for p in map(cardiac_phantom_pair, range(12))]
    assert np.mean(values) < 0.65  # the paper's ACDC undeformed Dice is 0.48: the phantom moves comparably


def test_warping_with_a_wrong_convention_would_not_match():
    """Guards the test above: swapping the field's channels or its sign breaks the label correspondence."""
    pair = cardiac_phantom_pair(0, size=128, mode="cine")
    moving = torch.as_tensor(pair["moving_label"])[None].double()
    ddf = torch.as_tensor(pair["true_ddf"])[None].double()
    for wrong in (-ddf, ddf.flip(1)):
        warped = Warp(mode="nearest", padding_mode="zeros")(moving, wrong)[0, 0].round().numpy()
        assert dice(warped == 2, pair["fixed_label"][0] == 2) < 0.9


@pytest.mark.parametrize("index", INDICES)
def test_echo_mode_has_a_sector(index):
    size = 128
    echo = cardiac_phantom_pair(index, size=size, mode="echo")
    cine = cardiac_phantom_pair(index, size=size, mode="cine")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # angle from the apex (-0.05 size, size / 2), 0 = straight down; the fan's half-angle is at most 45 degrees
    off_axis = np.degrees(np.abs(np.arctan2(xx - size / 2, yy + 0.05 * size)))
    outside_fan = (off_axis > 46) & ellipse(size, 0.95)
    inside_fan = (off_axis < 37) & ellipse(size, 0.9) & (yy + 0.05 * size < 1.0 * size)
    assert outside_fan.sum() > 200  # two corners of the body on either side of the fan
    for key in ("moving", "fixed"):
        assert (echo[key][0][outside_fan] == 0).all(), key  # the fan cuts the body
        assert (cine[key][0][outside_fan] > 0).mean() > 0.99, key  # while cine images the whole body there
        assert (echo[key][0][inside_fan] > 0).mean() > 0.99, key


def test_outlier_mask_marks_places_without_correspondence():
    """Inside the outlier mask the fixed image disagrees with the truly warped moving image more than elsewhere."""
    pair = cardiac_phantom_pair(3, size=128, mode="cine")
    ddf = torch.as_tensor(pair["true_ddf"])[None].double()
    moving = torch.as_tensor(pair["moving"])[None].double()
    warped = Warp(mode="bilinear", padding_mode="zeros")(moving, ddf)[0, 0].numpy()
    residual = np.abs(pair["fixed"][0] - warped)
    outlier = pair["outlier_mask"][0].astype(bool)
    foreground = (pair["fixed"][0] > 0) & ~outlier
    assert outlier.sum() > 20
    assert residual[outlier].mean() > 3 * residual[foreground].mean()


def test_phantom_transform_and_datalist():
    datalist = phantom_datalist(3, 100000)
    assert datalist == [{"phantom_index": 100000}, {"phantom_index": 100001}, {"phantom_index": 100002}]
    item = CardiacPhantomd(seed=0, size=64, mode="mixed")(datalist[1])
    reference = cardiac_phantom_pair(100001, seed=0, size=64, mode="mixed")  # odd index: echo in mixed mode
    echo = cardiac_phantom_pair(100001, seed=0, size=64, mode="echo")
    np.testing.assert_array_equal(reference["moving"], echo["moving"])
    for key in KEYS:
        assert isinstance(item[key], MetaTensor)
        np.testing.assert_array_equal(item[key].numpy(), reference[key])
        assert item[key].meta["pair_id"] == "phantom_mixed_s0_100001"
