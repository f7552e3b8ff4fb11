"""Strain figures: AHA bull's-eye, echo long-axis segments, strain map over the image, strain curves.

Every function renders one PNG with a private matplotlib ``Figure`` (Agg canvas, no pyplot state and no global
backend switch, safe headless and in threads), writes it atomically (temporary name in the same folder, then
``os.replace``) and returns the path. Values given to ``bullseye``, ``long_axis_segments`` and the curve plots are
already in ``unit``; ``strain_overlay`` takes fractions and multiplies them by 100 when ``unit == "%"``.

Display convention of ``strain_overlay`` (the same as the repo's other figures): arrays are shown as
``imshow(a.T, origin="lower")`` in millimetres, so array axis 0 (NIfTI x) runs left -> right and array axis 1
(NIfTI y) runs bottom -> top; pixel (i, j) is drawn at (i * s0, j * s1) mm, displacement component 0 is horizontal
and component 1 vertical, and the pixel aspect follows ``spacing``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

BASAL = {1: "anterior", 2: "anteroseptal", 3: "inferoseptal", 4: "inferior", 5: "inferolateral", 6: "anterolateral"}
APICAL = {13: "anterior", 14: "septal", 15: "inferior", 16: "lateral"}
SEGMENT_NAMES = {**BASAL, **{k + 6: v for k, v in BASAL.items()}, **APICAL, 17: "apex"}
# echo long-axis views: (wall names left/right, segment numbers left and right from base to apex)
LONG_AXIS_VIEWS = {"4CH": (("septal", "lateral"), (3, 9, 14), (6, 12, 16)),
                   "2CH": (("inferior", "anterior"), (4, 10, 15), (1, 7, 13))}
_VIEW_ALIASES = {"4CH": "4CH", "A4C": "4CH", "4C": "4CH", "2CH": "2CH", "A2C": "2CH", "2C": "2CH"}
_UNKNOWN_VIEW = (("wall A", "wall B"), (1, 2, 3), (4, 5, 6))
DPI = 150


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI)


def _save(fig, path) -> Path:
    """Write fig to path atomically: a hidden temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _norm(data, cmap, vmin, vmax):
    """Colour map and Normalize; by default a diverging map with limits symmetric about 0."""
    import matplotlib
    from matplotlib.colors import Normalize

    finite = np.asarray([v for v in np.ravel(data) if v is not None and np.isfinite(v)], dtype=float)
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    lim = lim if lim > 0 else 1.0
    vmin = -lim if vmin is None else vmin
    vmax = lim if vmax is None else vmax
    return matplotlib.colormaps[cmap or "RdBu_r"], Normalize(vmin=vmin, vmax=vmax)


def _text_colour(rgba) -> str:
    return "white" if 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5 else "black"


def _draw_segments(ax, shapes: dict, values: dict, cmap, norm, label_segments: bool, blank=()) -> None:
    """Fill each shape (patch, label position) with its value's colour; missing ones hatched grey with 'n/a'."""
    for seg, (patch, (x, y)) in shapes.items():
        value = values.get(seg)
        patch.set_edgecolor("0.15")
        patch.set_linewidth(1.2)
        if value is not None and np.isfinite(value):
            rgba = cmap(norm(value))
            patch.set_facecolor(rgba)
            text, colour = f"{seg}\n{value:.1f}", _text_colour(rgba)
        elif seg in blank:
            patch.set_facecolor("white")
            text, colour = None, "black"
        else:
            patch.set_facecolor("0.85")
            patch.set_hatch("///")
            if hasattr(patch, "set_hatchcolor"):  # matplotlib >= 3.10
                patch.set_hatchcolor("0.55")
            text, colour = f"{seg}\nn/a", "0.2"
        ax.add_patch(patch)
        if label_segments and text:
            box = dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85) if value is None or not \
                np.isfinite(value) else None
            ax.text(x, y, text, ha="center", va="center", fontsize=9, color=colour, linespacing=1.1, bbox=box)


def _colourbar(fig, ax, cmap, norm, label: str) -> None:
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.8, pad=0.04, label=label)


def _check_keys(values: dict, allowed) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown segment numbers {unknown}; expected some of {sorted(allowed)}")


def bullseye(values: dict[int, float], path, title: str = "", unit: str = "%", cmap: str | None = None,
             vmin=None, vmax=None, label_segments: bool = True, cbar_label: str = "strain") -> Path:
    """AHA 2002 bull's-eye: basal ring 1-6 outside, mid 7-12, apical 13-16, cap 17 (blank unless given).

    Segment 1 (anterior) at the top, then counter-clockwise 2 anteroseptal (upper left), 3 inferoseptal, 4 inferior
    (bottom), 5 inferolateral, 6 anterolateral; apical 13 anterior (top), 14 septal (left), 15 inferior, 16 lateral.
    """
    from matplotlib.patches import Circle, Wedge

    _check_keys(values, range(1, 18))
    cmap, norm = _norm(list(values.values()), cmap, vmin, vmax)
    fig = _figure((6.2, 5.2))
    ax = fig.add_subplot()
    shapes = {}
    for first, (r_in, r_out), n in ((1, (3, 4), 6), (7, (2, 3), 6), (13, (1, 2), 4)):
        width = 360 / n
        for k in range(n):
            centre = 90 + k * width  # counter-clockwise from the top
            angle, radius = np.deg2rad(centre), (r_in + r_out) / 2
            shapes[first + k] = (Wedge((0, 0), r_out, centre - width / 2, centre + width / 2, width=r_out - r_in),
                                 (radius * np.cos(angle), radius * np.sin(angle)))
    shapes[17] = (Circle((0, 0), 1), (0, 0))
    _draw_segments(ax, shapes, values, cmap, norm, label_segments, blank=(17,))
    for x, y, text, rotation in ((0, 4.3, "anterior", 0), (0, -4.3, "inferior", 0),
                                 (-4.35, 0, "septal", 90), (4.35, 0, "lateral", 270)):
        ax.text(x, y, text, ha="center", va="center", fontsize=9, color="0.35", rotation=rotation)
    ax.set(xlim=(-4.6, 4.6), ylim=(-4.6, 4.6), aspect="equal")
    ax.axis("off")
    ax.set_title(title)
    _colourbar(fig, ax, cmap, norm, f"{cbar_label} ({unit})")
    return _save(fig, path)


def long_axis_segments(values: dict[int, float], path, view: str, title: str = "", unit: str = "%",
                       cmap: str | None = None, vmin=None, vmax=None, label_segments: bool = True,
                       cbar_label: str = "strain") -> Path:
    """Echo long-axis view as a horseshoe (apex up): basal, mid, apical segment of the left and right wall.

    4CH: septal 3/9/14 left, lateral 6/12/16 right; 2CH: inferior 4/10/15 left, anterior 1/7/13 right;
    other views: 1, 2, 3 (left wall, base to apex) and 4, 5, 6 (right wall).
    """
    from matplotlib.patches import Rectangle, Wedge

    names, left, right = LONG_AXIS_VIEWS.get(_VIEW_ALIASES.get(str(view).strip().upper(), ""), _UNKNOWN_VIEW)
    _check_keys(values, left + right)
    cmap, norm = _norm(list(values.values()), cmap, vmin, vmax)
    r_out, r_in, length = 1.0, 0.5, 1.18  # apical quarter-annulus and straight segments have equal areas
    shapes = {}
    for sign, (basal, mid, apical) in ((-1, left), (1, right)):
        x0 = -r_out if sign < 0 else r_in
        x_text = sign * (r_out + r_in) / 2
        shapes[basal] = (Rectangle((x0, -2 * length), r_out - r_in, length), (x_text, -1.5 * length))
        shapes[mid] = (Rectangle((x0, -length), r_out - r_in, length), (x_text, -0.5 * length))
        angle = np.deg2rad(135 if sign < 0 else 45)
        shapes[apical] = (Wedge((0, 0), r_out, 90 if sign < 0 else 0, 180 if sign < 0 else 90, width=r_out - r_in),
                          (0.75 * np.cos(angle), 0.75 * np.sin(angle)))
    fig = _figure((4.6, 5.6))
    ax = fig.add_subplot()
    _draw_segments(ax, shapes, values, cmap, norm, label_segments)
    ax.text(0, r_out + 0.15, "apex", ha="center", va="bottom", fontsize=9, color="0.35")
    for sign, name in zip((-1, 1), names):
        ax.text(sign * (r_out + r_in) / 2, -2 * length - 0.12, name, ha="center", va="top", fontsize=9, color="0.35")
    ax.set(xlim=(-1.2, 1.2), ylim=(-2 * length - 0.35, r_out + 0.35), aspect="equal")
    ax.axis("off")
    ax.set_title(title)
    _colourbar(fig, ax, cmap, norm, f"{cbar_label} ({unit})")
    return _save(fig, path)


def deformed_grid_lines(displacement: np.ndarray, spacing, box, step: int) -> list[np.ndarray]:
    """Lines of the ED grid (every ``step`` pixels inside box = (i0, i1, j0, j1), inclusive) moved by U (2, H, W) px.

    Each line is an (n, 2) array of display points (x, y) in mm: x = (i + U0) * s0, y = (j + U1) * s1.
    """
    (s0, s1), (i0, i1, j0, j1) = spacing, box
    gi, gj = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="ij")
    x = (gi + displacement[0, i0:i1 + 1, j0:j1 + 1]) * s0
    y = (gj + displacement[1, i0:i1 + 1, j0:j1 + 1]) * s1
    lines = [np.column_stack([x[k], y[k]]) for k in range(0, x.shape[0], step)]
    return lines + [np.column_stack([x[:, k], y[:, k]]) for k in range(0, x.shape[1], step)]


def strain_overlay(image: np.ndarray, strain: np.ndarray, mask: np.ndarray, displacement: np.ndarray | None, path,
                   spacing=(1.0, 1.0), title: str = "", unit: str = "%", grid_step: int = 6, arrows: bool = False,
                   vmin=None, vmax=None, cmap: str | None = None, cbar_label: str = "strain") -> Path:
    """ED image in grey, strain (fraction) coloured on the myocardium mask, displacement as a deformed grid or arrows.

    Shown as ``imshow(a.T, origin="lower")`` in mm: array axis 0 left -> right, axis 1 bottom -> top (module docstring).
    The deformed grid is the ED grid every ``grid_step`` pixels moved by U (drawn over the zoomed box); arrows
    (true length) start at grid points inside the mask. The view is zoomed to the mask's bounding box plus a margin.
    """
    image, strain, mask = np.asarray(image, float), np.asarray(strain, float), np.asarray(mask, bool)
    if image.ndim != 2 or strain.shape != image.shape or mask.shape != image.shape:
        raise ValueError(f"image, strain and mask must be the same 2D shape, got {image.shape}, {strain.shape}, "
                         f"{mask.shape}")
    if displacement is not None:
        displacement = np.asarray(displacement, float)
        if displacement.shape != (2, *image.shape):
            raise ValueError(f"displacement must be (2, H, W) = {(2, *image.shape)}, got {displacement.shape}")
    s0, s1 = (float(s) for s in spacing)
    h, w = image.shape
    values = strain * (100.0 if unit == "%" else 1.0)
    inside = values[mask & np.isfinite(values)]
    lim = float(np.percentile(np.abs(inside), 99)) if inside.size else 0.0
    lim = lim if lim > 0 else 1.0  # robust default limits, symmetric about 0
    if mask.any():
        i_idx, j_idx = np.nonzero(mask)
        margin = max(8, int(0.3 * max(np.ptp(i_idx), np.ptp(j_idx))))
        i0, i1 = max(i_idx.min() - margin, 0), min(i_idx.max() + margin, h - 1)
        j0, j1 = max(j_idx.min() - margin, 0), min(j_idx.max() + margin, w - 1)
    else:
        i0, i1, j0, j1 = 0, h - 1, 0, w - 1
    cmap, norm = _norm([-lim, lim], cmap, vmin, vmax)
    extent = (-0.5 * s0, (h - 0.5) * s0, -0.5 * s1, (w - 0.5) * s1)
    fig = _figure((6.0, 5.2))
    ax = fig.add_subplot()
    lo, hi = np.nanpercentile(image, [1, 99.5])
    ax.imshow(image.T, cmap="gray", origin="lower", extent=extent, vmin=lo, vmax=max(hi, lo + 1e-6),
              interpolation="nearest")
    im = ax.imshow(np.ma.masked_where(~mask, values).T, cmap=cmap, norm=norm, origin="lower", extent=extent,
                   interpolation="nearest", alpha=0.9)
    if mask.any():
        ax.contour(np.arange(h) * s0, np.arange(w) * s1, mask.T.astype(float), levels=[0.5], colors="0.1",
                   linewidths=0.8)
    if displacement is not None and arrows:
        gi, gj = np.meshgrid(np.arange(i0, i1 + 1, grid_step), np.arange(j0, j1 + 1, grid_step), indexing="ij")
        keep = mask[gi, gj] if mask.any() else np.ones_like(gi, bool)
        gi, gj = gi[keep], gj[keep]
        ax.quiver(gi * s0, gj * s1, displacement[0, gi, gj] * s0, displacement[1, gi, gj] * s1, angles="xy",
                  scale_units="xy", scale=1, color="black", width=0.004, headwidth=4, zorder=3)
    elif displacement is not None:
        from matplotlib import patheffects
        from matplotlib.collections import LineCollection

        lines = deformed_grid_lines(displacement, (s0, s1), (i0, i1, j0, j1), grid_step)
        halo = [patheffects.withStroke(linewidth=1.5, foreground="white", alpha=0.6)]
        ax.add_collection(LineCollection(lines, colors="black", linewidths=0.6, zorder=3, path_effects=halo))
    ax.set(xlim=((i0 - 0.5) * s0, (i1 + 0.5) * s0), ylim=((j0 - 0.5) * s1, (j1 + 0.5) * s1), aspect="equal",
           xlabel="array axis 0 (x), mm", ylabel="array axis 1 (y), mm", title=title)
    low, high = bool(inside.size and inside.min() < norm.vmin), bool(inside.size and inside.max() > norm.vmax)
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get((low, high), "neither")
    fig.colorbar(im, ax=ax, shrink=0.85, pad=0.03, label=f"{cbar_label} ({unit})", extend=extend)
    return _save(fig, path)


def _curve_axes(ax, times, xlabel: str, ylabel: str, markers: dict[str, float] | None) -> None:
    ax.axhline(0, color="0.6", linewidth=0.8, zorder=0)
    for name, t in (markers or {}).items():
        ax.axvline(t, color="0.3", linestyle="--", linewidth=0.9)
        ax.annotate(name, (t, 1), xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                    ha="left", va="top", fontsize=8, color="0.3")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if np.max(times) > np.min(times):
        ax.set_xlim(float(np.min(times)), float(np.max(times)))
    ax.grid(alpha=0.3)


def _check_curves(times, curves: dict) -> np.ndarray:
    times = np.asarray(times, float)
    for name, curve in curves.items():
        if np.shape(curve) != times.shape:
            raise ValueError(f"curve {name!r} has shape {np.shape(curve)}, times {times.shape}")
    if times.size == 0:
        raise ValueError("times is empty")
    return times


def strain_curves(times: np.ndarray, curves: dict[str, np.ndarray], path, title: str = "", xlabel: str = "frame",
                  unit: str = "%", markers: dict[str, float] | None = None, ylabel: str = "strain") -> Path:
    """One line per curve (values already in unit) over the cycle; markers are labelled vertical lines, e.g. ES."""
    times = _check_curves(times, curves)
    fig = _figure((6.4, 4.0))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot(times, curve, marker="o", markersize=3, linewidth=1.6, label=name)
    _curve_axes(ax, times, xlabel, f"{ylabel} ({unit})", markers)
    if curves:
        ax.legend(frameon=False, fontsize=9)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def segment_curves(times, segment_curves: dict[int, np.ndarray], path, component: str, title: str = "",
                   xlabel: str = "frame", unit: str = "%", markers: dict[str, float] | None = None) -> Path:
    """Per-AHA-segment curves of one component: basal, mid and apical rows (shared axes), one colour per wall."""
    _check_keys(segment_curves, range(1, 18))
    times = _check_curves(times, segment_curves)
    rings = (("basal", range(1, 7)), ("mid", range(7, 13)), ("apical", range(13, 17)))
    fig = _figure((7.0, 7.2))
    axes = fig.subplots(3, 1, sharex=True, sharey=True)
    for ax, (ring, segments) in zip(axes, rings):
        present = [seg for seg in segments if seg in segment_curves]
        for k, seg in enumerate(segments):
            if seg in segment_curves:
                ax.plot(times, segment_curves[seg], linewidth=1.5, color=f"C{k}",
                        label=f"{seg} {SEGMENT_NAMES[seg]}")
        _curve_axes(ax, times, xlabel if ax is axes[-1] else "", f"{ring}\n{component} ({unit})", markers)
        if present:
            ax.legend(frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
