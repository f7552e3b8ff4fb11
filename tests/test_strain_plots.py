"""Strain figures: valid, non-blank PNGs written atomically, and layouts checked from the rendered pixels."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib import colormaps  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402
from scipy import ndimage  # noqa: E402

from scripts import strain_plots as sp  # noqa: E402


def _read(path) -> np.ndarray:
    image = imread(path)[..., :3]
    assert image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert image.std() > 0.05, "blank figure"
    return image


def _reddish(img):
    return (img[..., 0] > img[..., 1] + 0.2) & (img[..., 0] > img[..., 2] + 0.2)


def _bluish(img):
    return (img[..., 2] > img[..., 0] + 0.2) & (img[..., 2] > img[..., 1] + 0.1)


def _near(img, rgba, tol=0.04):
    return np.all(np.abs(img - np.asarray(rgba)[:3]) < tol, axis=-1)


def _largest_blob(selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (row, col) and (height, width) of the largest connected region of selected pixels."""
    labels, n = ndimage.label(selected)
    assert n > 0, "colour not found in the figure"
    biggest = 1 + int(np.argmax(ndimage.sum(selected, labels, range(1, n + 1))))
    rows, cols = np.nonzero(labels == biggest)
    return np.array([rows.mean(), cols.mean()]), np.array([np.ptp(rows) + 1, np.ptp(cols) + 1])


def _ring(h=80, w=70, centre=(40, 35), radii=(12, 22)):
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r = np.hypot(ii - centre[0], jj - centre[1])
    return ii, jj, (r > radii[0]) & (r < radii[1])


def _all_figures(tmp_path):
    ii, jj, mask = _ring()
    image = 0.3 + 0.5 * mask + 0.1 * np.sin(ii / 5.0)
    disp = np.stack([-(ii - 40) * 0.1, -(jj - 35) * 0.1])
    times = np.arange(20.0)
    curve = -18 * np.sin(np.pi * times / 19)
    return {
        "bullseye": lambda p: sp.bullseye({s: -15.0 - s for s in range(1, 16)}, p, title="t"),
        "long_axis": lambda p: sp.long_axis_segments({3: -17.0, 9: -19.0, 14: -21.0, 6: -15.0}, p, "4CH"),
        "overlay_grid": lambda p: sp.strain_overlay(image, 0.3 * mask, mask, disp, p, spacing=(1.2, 1.5)),
        "overlay_arrows": lambda p: sp.strain_overlay(image, -0.2 * mask, mask, disp, p, arrows=True, grid_step=4),
        "overlay_no_field": lambda p: sp.strain_overlay(image, 0.1 * mask, mask, None, p),
        "curves": lambda p: sp.strain_curves(times, {"radial": -curve, "circ": curve}, p, markers={"ES": 9.0}),
        "segment_curves": lambda p: sp.segment_curves(times, {s: curve + s for s in range(1, 17) if s != 15}, p,
                                                      "circumferential", markers={"ES": 9.0}),
    }


@pytest.mark.parametrize("name", ["bullseye", "long_axis", "overlay_grid", "overlay_arrows", "overlay_no_field",
                                  "curves", "segment_curves"])
def test_writes_one_valid_png_atomically(tmp_path, name):
    out = tmp_path / "figs" / f"{name}.png"
    returned = _all_figures(tmp_path)[name](out)
    assert returned == out
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    _read(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "temporary files left behind"


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "bullseye.png"
    out.write_bytes(b"old figure")

    def broken_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        sp.bullseye({1: 10.0}, out)
    assert out.read_bytes() == b"old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["bullseye.png"]


def test_invalid_inputs_raise_and_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown segment"):
        sp.bullseye({18: 1.0}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="unknown segment"):
        sp.long_axis_segments({1: 1.0}, tmp_path / "b.png", "4CH")  # 1 is not in a 4CH view
    with pytest.raises(ValueError, match="same 2D shape"):
        sp.strain_overlay(np.zeros((10, 10)), np.zeros((10, 9)), np.ones((10, 10), bool), None, tmp_path / "c.png")
    with pytest.raises(ValueError, match="displacement"):
        sp.strain_overlay(np.zeros((10, 10)), np.zeros((10, 10)), np.ones((10, 10), bool), np.zeros((10, 10, 2)),
                          tmp_path / "d.png")
    with pytest.raises(ValueError, match="shape"):
        sp.strain_curves(np.arange(5), {"x": np.zeros(4)}, tmp_path / "e.png")
    assert list(tmp_path.iterdir()) == []


POS, NEG = 20.0, -20.0
POS_RGBA, NEG_RGBA = colormaps["RdBu_r"](5 / 6), colormaps["RdBu_r"](1 / 6)  # +-20 on the scale -30..30


def _red_blue_centroids(path):
    img = _read(path)
    red_colour, blue_colour = _near(img, POS_RGBA), _near(img, NEG_RGBA)
    assert _reddish(img[red_colour]).all() and _bluish(img[blue_colour]).all()
    (red, red_size), (blue, blue_size) = _largest_blob(red_colour), _largest_blob(blue_colour)
    return red, blue, max(red_size.max(), blue_size.max())


def _check_direction(red, blue, size, direction):
    """direction (d_row, d_col) of red relative to blue on screen: -1 up/left, +1 down/right, 0 level, None any."""
    for axis, sign in enumerate(direction):
        delta = red[axis] - blue[axis]
        if sign == 0:
            assert abs(delta) < 0.1 * size, (axis, red, blue)
        elif sign is not None:
            assert delta * sign > 0.15 * size, (axis, red, blue)


@pytest.mark.parametrize("pos, neg, direction", [
    (1, 4, (-1, 0)),     # anterior top, inferior bottom
    (2, 5, (-1, -1)),    # anteroseptal upper left, inferolateral lower right
    (6, 3, (-1, 1)),     # anterolateral upper right, inferoseptal lower left
    (14, 16, (0, -1)),   # apical septal left, lateral right
    (13, 15, (-1, 0)),   # apical anterior top, inferior bottom
    (1, 7, (-1, 0)),     # basal ring outside the mid ring
    (7, 13, (-1, 0)),    # mid ring outside the apical ring
])
def test_bullseye_layout_from_pixels(tmp_path, pos, neg, direction):
    values = {s: 0.0 for s in range(1, 17)} | {pos: POS, neg: NEG}
    path = sp.bullseye(values, tmp_path / "b.png", cmap="RdBu_r", vmin=-30, vmax=30, label_segments=False)
    _check_direction(*_red_blue_centroids(path), direction)


def test_bullseye_default_colours_are_diverging_red_positive(tmp_path):
    img = _read(sp.bullseye({1: 25.0, 4: -25.0} | {s: 0.0 for s in (2, 3, 5, 6)}, tmp_path / "b.png",
                            label_segments=False))
    (red, _), (blue, size) = _largest_blob(_reddish(img)), _largest_blob(_bluish(img))
    _check_direction(red, blue, size.max(), (-1, 0))


@pytest.mark.parametrize("view, pos, neg, direction", [
    ("4CH", 3, 16, (1, -1)),     # septal basal lower left, lateral apical upper right
    ("a4c", 9, 12, (0, -1)),     # septal mid left of lateral mid
    ("2CH", 4, 1, (0, -1)),      # inferior basal left, anterior basal right
    ("2CH", 13, 7, (-1, None)),  # anterior apical above anterior mid (the arch's centroid is further in)
    ("PLAX", 1, 6, (1, -1)),     # unknown view: wall A base lower left, wall B apex upper right
])
def test_long_axis_layout_from_pixels(tmp_path, view, pos, neg, direction):
    path = sp.long_axis_segments({pos: POS, neg: NEG}, tmp_path / "la.png", view, cmap="RdBu_r", vmin=-30, vmax=30,
                                 label_segments=False)
    _check_direction(*_red_blue_centroids(path), direction)


def test_overlay_axis0_is_horizontal_and_axis1_points_up(tmp_path):
    ii, jj, mask = _ring()
    image = np.full(mask.shape, 0.5)
    left_right = np.where(ii < 40, 0.5, -0.5)  # +50 % at small axis-0 indices
    img = _read(sp.strain_overlay(image, left_right * mask, mask, None, tmp_path / "lr.png"))
    (red, _), (blue, size) = _largest_blob(_reddish(img)), _largest_blob(_bluish(img))
    _check_direction(red, blue, size.max(), (0, -1))  # red on the left
    top_bottom = np.where(jj >= 35, 0.5, -0.5)  # +50 % at large axis-1 indices
    img = _read(sp.strain_overlay(image, top_bottom * mask, mask, None, tmp_path / "tb.png"))
    (red, _), (blue, size) = _largest_blob(_reddish(img)), _largest_blob(_bluish(img))
    _check_direction(red, blue, size.max(), (-1, 0))  # red at the top


def test_overlay_pixel_aspect_follows_spacing(tmp_path):
    mask = np.zeros((60, 60), bool)
    mask[20:40, 20:40] = True  # 20 x 20 pixels, 2 mm x 1 mm each -> twice as wide as tall on screen
    img = _read(sp.strain_overlay(np.full(mask.shape, 0.5), 0.4 * mask, mask, None, tmp_path / "a.png",
                                  spacing=(2.0, 1.0)))
    _, (height, width) = _largest_blob(_reddish(img))
    assert width / height == pytest.approx(2.0, rel=0.1)


def test_deformed_grid_moves_lines_by_the_displacement_in_mm():
    disp = np.zeros((2, 10, 8))
    disp[0], disp[1] = 2.0, -1.0  # pixels along axis 0 and axis 1
    lines = sp.deformed_grid_lines(disp, (1.5, 0.5), (0, 9, 0, 7), 3)
    assert len(lines) == 4 + 3  # i = 0, 3, 6, 9 and j = 0, 3, 6
    np.testing.assert_allclose(lines[1][:, 0], (3 + 2.0) * 1.5)  # constant i = 3 -> x = (3 + U0) * s0
    np.testing.assert_allclose(lines[1][:, 1], (np.arange(8) - 1.0) * 0.5)
    np.testing.assert_allclose(lines[5][:, 1], (3 - 1.0) * 0.5)  # constant j = 3 -> y = (3 + U1) * s1
