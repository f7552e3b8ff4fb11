"""Built-in data: a synthetic 2D short-axis cardiac phantom with ED -> ES pairs, labels and the true field.

Every pair is generated from its index and a base seed (deterministic, nothing to download):

* anatomy: body, LV blood pool (label 3), LV myocardium (2), RV blood pool (1) as in ACDC's label codes;
  irregular, randomly sized and placed contours;
* motion: ED -> ES contraction that conserves myocardial area (so the wall thickens), an RV contraction,
  a twist, a breathing shift and a smooth random field; the true displacement ``true_ddf`` is known;
* what AdaCS exists for, places with no correspondence (``outlier_mask``): independent noise per frame,
  a blood-pool intensity change between frames (flow), papillary muscles that appear at ES and a vessel that
  vanishes (through-plane motion), and in ``echo`` mode a fan-shaped sector with multiplicative speckle and a
  signal dropout that affects one frame only.

Cine mode (``cardiac_phantom_cine``): the same ED anatomy moved through a whole cycle ED -> ES -> ED by an analytic
Lagrangian motion (``CineMotion``: area-preserving LV contraction, twist, RV contraction, breathing, a small smooth
random field, all following a phase curve), rendered by inverting the motion per frame; ``true_lagrangian`` and its
analytic gradient give the exact strains (``true_strain``).

Conventions: images (1, H, W) in [0, 1] (min-max per image, background exactly 0); ``true_ddf`` (2, H, W) in
pixels, pull convention as MONAI ``Warp``: ``fixed(x) ~ moving(x + true_ddf(x))``, channel i along axis i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

MODES = ("cine", "echo", "mixed")
LABEL_NAMES = {1: "RV", 2: "MYO", 3: "LV"}


def _irregular_shape(rng: np.random.Generator, base: float, wobble: float) -> tuple[float, float, list[float]]:
    """Draw the phases of a circle with a few smooth random harmonics (see ``_shape_radius``)."""
    return base, wobble, [rng.uniform(0, 2 * np.pi) for _ in (2, 3, 4)]


def _shape_radius(shape: tuple[float, float, list[float]], theta: np.ndarray) -> np.ndarray:
    """Radius as a function of angle: a circle with a few smooth random harmonics."""
    base, wobble, phases = shape
    radius = np.full_like(theta, base)
    for k, phase in zip((2, 3, 4), phases):
        radius += base * wobble / k * np.cos(k * theta + phase)
    return radius


def _polar(yy: np.ndarray, xx: np.ndarray, centre: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = yy - centre[0], xx - centre[1]
    return np.hypot(dy, dx), np.arctan2(dy, dx)


def _ed_geometry(rng: np.random.Generator, size: int) -> dict:
    """Draw the random ED geometry (pixels): centres and the endo-, epicardial and RV contours."""
    s = size / 128.0
    lv_centre = (size / 2 + rng.uniform(-6, 6) * s, size / 2 + rng.uniform(-4, 8) * s)
    endo = _irregular_shape(rng, rng.uniform(13, 19) * s, 0.06)
    thickness = _irregular_shape(rng, rng.uniform(5.5, 8.5) * s, 0.10)
    rv_centre = (lv_centre[0] + rng.uniform(-4, 4) * s, lv_centre[1] - rng.uniform(19, 24) * s)
    rv = _irregular_shape(rng, rng.uniform(15, 20) * s, 0.08)
    return {
        "size": size, "lv_centre": lv_centre, "endo": endo, "thickness": thickness, "rv_centre": rv_centre, "rv": rv
    }


def _geometry_labels(
    geometry: dict, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate the ED geometry at arbitrary points: labels (uint8), body mask, endo and epi radius at each angle."""
    size = geometry["size"]
    s = size / 128.0
    r, theta = _polar(yy, xx, geometry["lv_centre"])
    endo = _shape_radius(geometry["endo"], theta)
    epi = endo + _shape_radius(geometry["thickness"], theta)
    body = ((yy - size / 2) / (0.44 * size)) ** 2 + ((xx - size / 2) / (0.47 * size)) ** 2 <= 1.0
    # RV: a crescent hugging the septum on the left of the LV
    rv_r, rv_theta = _polar(yy, xx, geometry["rv_centre"])
    rv = (rv_r <= _shape_radius(geometry["rv"], rv_theta)) & (r > epi + 1.5 * s)
    labels = np.zeros(np.shape(yy), np.uint8)
    labels[rv] = 1
    labels[(r > endo) & (r <= epi)] = 2
    labels[r <= endo] = 3
    labels[~body] = 0
    return labels, body, endo, epi


def _ed_anatomy(rng: np.random.Generator, size: int) -> dict:
    """Random ED geometry (pixels) and its label map."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    geometry = _ed_geometry(rng, size)
    labels, body, endo, epi = _geometry_labels(geometry, yy, xx)
    return {
        "labels": labels,
        "body": body,
        "lv_centre": geometry["lv_centre"],
        "rv_centre": geometry["rv_centre"],
        "endo_mean": float(endo.mean()),
        "epi_mean": float(epi.mean()),
        "grid": (yy, xx),
        "geometry": geometry,
    }


def _contraction_field(rng: np.random.Generator, anatomy: dict, size: int) -> np.ndarray:
    """True pull field u on the ES grid: ES(x) = ED(x + u(x)). Area-preserving LV contraction, RV, twist, noise."""
    s = size / 128.0
    yy, xx = anatomy["grid"]
    c = anatomy["lv_centre"]
    r, theta = _polar(yy, xx, c)
    r = np.maximum(r, 1e-6)
    endo, epi = anatomy["endo_mean"], anatomy["epi_mean"]
    endo_es = endo * rng.uniform(0.62, 0.78)  # ejection
    shift2 = endo**2 - endo_es**2  # myocardial area conservation: R^2 - endo^2 = r^2 - endo_es^2
    epi_es = np.sqrt(max(epi**2 - shift2, (endo_es + 1.0) ** 2))
    outside = np.sqrt(r**2 + shift2) - r
    falloff = np.exp(-(np.maximum(r - epi_es, 0.0) / (14.0 * s)) ** 2)
    source_r = np.where(r < endo_es, r * endo / endo_es, r + outside * falloff)
    twist = np.deg2rad(rng.uniform(-5, 5)) * np.exp(-((r / (epi + 6 * s)) ** 2))
    source_theta = theta + twist
    sy = c[0] + source_r * np.sin(source_theta)
    sx = c[1] + source_r * np.cos(source_theta)
    u = np.stack([sy - yy, sx - xx])
    # RV contraction: pull from a slightly larger RV
    rc = anatomy["rv_centre"]
    rv_r, _ = _polar(yy, xx, rc)
    rv_scale = rng.uniform(0.10, 0.22) * np.exp(-((rv_r / (16.0 * s)) ** 2))
    u += np.stack([(yy - rc[0]) * rv_scale, (xx - rc[1]) * rv_scale])
    # breathing shift and a smooth random field
    u += np.asarray(rng.uniform(-1.5, 1.5, size=2) * s)[:, None, None]
    for axis in range(2):
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=10 * s)
        u[axis] += noise / (np.abs(noise).max() + 1e-8) * rng.uniform(0.3, 1.0) * s
    return u.astype(np.float32)


def _warp(array: np.ndarray, field: np.ndarray, order: int) -> np.ndarray:
    yy, xx = np.mgrid[0 : array.shape[0], 0 : array.shape[1]].astype(np.float64)
    return ndimage.map_coordinates(array, [yy + field[0], xx + field[1]], order=order, mode="constant", cval=0.0)


def _disk(grid: tuple[np.ndarray, np.ndarray], centre: Sequence[float], radius: float) -> np.ndarray:
    return np.hypot(grid[0] - centre[0], grid[1] - centre[1]) <= radius


def _render(rng: np.random.Generator, labels: np.ndarray, body: np.ndarray, echo: bool, size: int) -> np.ndarray:
    """Tissue intensities for a label map (cine: bright blood; echo: dark blood, bright myocardium)."""
    s = size / 128.0
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=3 * s)
    texture /= np.abs(texture).max() + 1e-8
    if echo:
        levels = {0: 0.35, 1: 0.08, 2: 0.75, 3: 0.08}
    else:
        levels = {0: 0.50, 1: 0.78, 2: 0.22, 3: 0.88}  # tissue around the heart brighter than myocardium
    image = np.zeros((size, size))
    for label, level in levels.items():
        image[labels == label] = level
    image = np.where(labels == 0, image + 0.12 * texture, image + 0.03 * texture)
    image = ndimage.gaussian_filter(image, sigma=0.8 * s)
    return np.where(body, image, 0.0)


def _sector(size: int, rng: np.random.Generator) -> np.ndarray:
    """Echo-like fan: apex at the top centre, +-(38..45) degrees."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    apex = (-0.05 * size, size / 2)
    r, theta = _polar(yy, xx, apex)
    half_angle = np.deg2rad(rng.uniform(38, 45))
    return (np.abs(theta - np.pi / 2) <= half_angle) & (r <= 1.08 * size)


def _finish(image: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Clip, zero outside the support, min-max normalise to [0, 1]."""
    image = np.where(support, np.clip(image, 0.0, None), 0.0)
    lo, hi = image.min(), image.max()
    return ((image - lo) / (hi - lo + 1e-8)).astype(np.float32)


def cardiac_phantom_pair(index: int, seed: int = 0, size: int = 128, mode: str = "cine") -> dict[str, np.ndarray]:
    """Generate one ED (moving) -> ES (fixed) pair. Same (index, seed, size, mode) -> same arrays."""
    if mode not in MODES:
        raise ValueError(f"phantom mode must be one of {MODES}, got {mode!r}.")
    if size % 16:
        raise ValueError(f"phantom size must be a multiple of 16 (the UNet pools 3x and integrates at 1/2), got {size}.")
    rng = np.random.default_rng([seed, index])
    echo = mode == "echo" or (mode == "mixed" and index % 2 == 1)
    s = size / 128.0
    anatomy = _ed_anatomy(rng, size)
    grid, body = anatomy["grid"], anatomy["body"]
    u = _contraction_field(rng, anatomy, size)
    ed_labels = anatomy["labels"]
    es_labels = _warp(ed_labels.astype(np.float64), u, order=0).astype(np.uint8)
    es_body = _warp(body.astype(np.float64), u, order=0) > 0.5

    ed_image = _render(rng, ed_labels, body, echo, size)
    es_image = _warp(ed_image, u, order=1)
    outlier = np.zeros((size, size), bool)

    # flow-related blood-pool intensity change at ES
    pool = es_labels == 3
    es_image[pool] *= rng.uniform(0.8, 1.1)
    # through-plane motion: papillary muscles appear at ES, a vessel vanishes after ED
    c, endo_es = anatomy["lv_centre"], anatomy["endo_mean"] * 0.7
    dark = 0.75 if echo else 0.25
    for _ in range(2):
        angle = rng.uniform(0, 2 * np.pi)
        centre = (c[0] + 0.55 * endo_es * np.sin(angle), c[1] + 0.55 * endo_es * np.cos(angle))
        blob = _disk(grid, centre, rng.uniform(1.8, 3.0) * s) & pool
        es_image[blob] = dark
        outlier |= blob
    vessel_centre = (c[0] + rng.uniform(-1, 1) * 28 * s, c[1] + rng.uniform(24, 34) * s)
    vessel = _disk(grid, vessel_centre, rng.uniform(3.0, 4.5) * s) & body & (ed_labels == 0)
    ed_image[vessel] = 0.1 if echo else 0.95
    outlier |= _warp(vessel.astype(np.float64), -u, order=0) > 0.5  # roughly where it would be at ES

    ed_support, es_support = body, es_body
    if echo:
        fan = _sector(size, rng)
        ed_support, es_support = body & fan, es_body & fan
        for image in (ed_image, es_image):
            speckle = ndimage.gaussian_filter(rng.rayleigh(1.0, (size, size)), sigma=0.7 * s)
            image *= speckle / speckle.mean()
        dropout_centre = (c[0] + rng.uniform(-10, 10) * s, c[1] + rng.choice([-1, 1]) * rng.uniform(14, 22) * s)
        dropout = np.exp(-((grid[0] - dropout_centre[0]) ** 2 + (grid[1] - dropout_centre[1]) ** 2) / (2 * (6 * s) ** 2))
        es_image *= 1.0 - 0.85 * dropout
        outlier |= dropout > 0.3
    noise_sigma = rng.uniform(0.015, 0.04)
    ed_image = ed_image + noise_sigma * rng.standard_normal((size, size))
    es_image = es_image + noise_sigma * rng.standard_normal((size, size))
    ed_image, es_image = _finish(ed_image, ed_support), _finish(es_image, es_support)
    es_labels = np.where(es_support, es_labels, 0).astype(np.uint8)
    ed_labels = np.where(ed_support, ed_labels, 0).astype(np.uint8)
    return {
        "moving": ed_image[None],
        "fixed": es_image[None],
        "moving_label": ed_labels[None],
        "fixed_label": es_labels[None],
        "true_ddf": u,
        "outlier_mask": (outlier & es_support)[None].astype(np.uint8),
    }


class CardiacPhantomd(MapTransform):
    """MONAI transform: ``{"phantom_index": i}`` -> a full pair dict of MetaTensors (see module docstring).

    Args:
        seed: base seed of the phantom family; train and validation use disjoint index ranges.
        size: image side in pixels (multiple of 16).
        mode: ``"cine"``, ``"echo"`` or ``"mixed"`` (odd indices echo).
    """

    def __init__(self, seed: int = 0, size: int = 128, mode: str = "mixed", index_key: str = "phantom_index") -> None:
        super().__init__(keys=[index_key])
        if mode not in MODES:
            raise ValueError(f"phantom mode must be one of {MODES}, got {mode!r}.")
        self.seed, self.size, self.mode, self.index_key = seed, size, mode, index_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        index = int(data[self.index_key])
        pair = cardiac_phantom_pair(index, self.seed, self.size, self.mode)
        name = f"phantom_{self.mode}_s{self.seed}_{index:05d}"
        out = dict(data)
        for key, array in pair.items():
            meta = {"filename_or_obj": f"{name}_{key}", "affine": torch.eye(4), "pair_id": name}
            out[key] = MetaTensor(torch.as_tensor(array), meta=meta)
        return out


def phantom_datalist(num_pairs: int, first_index: int = 0) -> list[dict[str, int]]:
    """Datalist of phantom indices ``first_index .. first_index + num_pairs - 1``."""
    return [{"phantom_index": first_index + i} for i in range(num_pairs)]


# ---------------------------------------------------------------------------------------------------------------------
# Cine mode: a whole cardiac cycle with the true Lagrangian field of every frame
# ---------------------------------------------------------------------------------------------------------------------


def cycle_phase(num_frames: int, es_index: int) -> np.ndarray:
    """Contraction phase p(t) of frames 0..T-1: a raised cosine from 0 (ED) to 1 (ES, frame ``es_index``), then a
    slower raised-cosine return that reaches 0 at frame T (the next ED); smooth (zero slope) at ED and ES."""
    t = np.arange(num_frames, dtype=np.float64)
    systole = 0.5 * (1.0 - np.cos(np.pi * t / es_index))
    diastole = 0.5 * (1.0 + np.cos(np.pi * (t - es_index) / (num_frames - es_index)))
    return np.where(t <= es_index, systole, diastole)


def _smoothstep(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x^2 - 2x^3 clipped to [0, 1] and its derivative."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x), 6.0 * x * (1.0 - x)


@dataclass(frozen=True)
class CineMotion:
    """The cine phantom's motion, analytic and Lagrangian (ED reference), in pixels.

    Frame t moves the tissue at X (ED) to X + U_t(X), U_t the sum of, scaled by the phase p(t) (``phase``):

    * LV contraction about ``lv_centre``: X at radius R goes to radius r(R) = R - d(R) phi(R) with
      d = R - sqrt(R^2 - s q(R)), s = p * ``shift``. On the myocardium (``inner_radius`` <= R <= ``outer_radius``,
      q = phi = 1) r^2 = R^2 - s: every annulus keeps its area, so the wall thickens. Inside, q = 1 - (1 - R^2 /
      inner_radius^2)^k shrinks the cavity smoothly (C1, monotone for k s < inner_radius^2); outside,
      phi = exp(-((R - outer_radius) / ``outer_decay``)^2) lets the pull fade;
    * a twist: rotation about ``lv_centre`` by p * ``twist`` * exp(-(R / ``twist_radius``)^2) (area-preserving);
    * an RV contraction towards ``rv_centre``: -p * ``rv_strength`` * exp(-|X - rc|^2 / ``rv_radius``^2) (X - rc),
      switched off on and near the LV (smoothstep of R from ``outer_radius`` to ``outer_radius + rv_ramp``);
    * a breathing translation ``breath[t] * breathing`` (breath = sin^2(pi t / T): 0 at ED, largest mid-cycle);
    * a small smooth random field: p * sum_m A_im sin(k_m . X + phase_im).

    ``displacement`` evaluates U_t and its Jacobian dU_i/dX_j at arbitrary points; ``eulerian`` inverts the motion
    on the frame-t grid (Newton).
    """

    lv_centre: tuple[float, float]
    rv_centre: tuple[float, float]
    inner_radius: float
    outer_radius: float
    shift: float
    ramp_power: float
    outer_decay: float
    twist: float
    twist_radius: float
    rv_strength: float
    rv_radius: float
    rv_ramp: float
    breathing: tuple[float, float]
    wave_vectors: np.ndarray  # (M, 2) rad / px
    wave_amplitudes: np.ndarray  # (2, M) px at ES
    wave_phases: np.ndarray  # (2, M)
    phase: np.ndarray  # (T,)
    breath: np.ndarray  # (T,)

    @property
    def num_frames(self) -> int:
        return len(self.phase)

    def _radial_profile(self, radius: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
        """h(R) = d(R) phi(R) (inward radial displacement) and h'(R)."""
        x2 = np.minimum((radius / self.inner_radius) ** 2, 1.0)
        k = self.ramp_power
        q = 1.0 - (1.0 - x2) ** k
        dq = 2.0 * k * (1.0 - x2) ** (k - 1.0) * radius / self.inner_radius**2  # 0 for R >= inner_radius
        w = np.sqrt(radius**2 - s * q)
        d = s * q / (radius + w)  # = R - w, exactly 0 for s = 0
        dd = 1.0 - (radius - 0.5 * s * dq) / w
        excess = np.maximum(radius - self.outer_radius, 0.0)
        phi = np.exp(-((excess / self.outer_decay) ** 2))
        dphi = -2.0 * excess / self.outer_decay**2 * phi
        return d * phi, dd * phi + d * dphi

    def displacement(self, frame: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """U_t at ``points`` (2, ...) (pixels, ED coordinates) -> U (2, ...) and J = dU_i/dX_j (2, 2, ...)."""
        p, b = float(self.phase[frame]), float(self.breath[frame])
        points = np.asarray(points, np.float64)
        eye = np.eye(2).reshape((2, 2) + (1,) * (points.ndim - 1))
        # LV contraction and twist: P = c + g(R) Rot(alpha(R)) v, g = 1 - h / R
        v = points - np.reshape(self.lv_centre, (2,) + (1,) * (points.ndim - 1))
        radius = np.maximum(np.hypot(v[0], v[1]), 1e-9)
        h, dh = self._radial_profile(radius, p * self.shift)
        g = 1.0 - h / radius
        dg = (h - dh * radius) / radius**2
        gauss = np.exp(-((radius / self.twist_radius) ** 2))
        alpha = p * self.twist * gauss
        dalpha = -2.0 * radius / self.twist_radius**2 * alpha
        cos, sin = np.cos(alpha), np.sin(alpha)
        rot_v = np.stack([cos * v[0] + sin * v[1], cos * v[1] - sin * v[0]])
        rot_perp_v = np.stack([cos * v[1] - sin * v[0], -cos * v[0] - sin * v[1]])  # d(Rot v) / d alpha
        u = (cos - 1.0) * v + sin * np.stack([v[1], -v[0]]) - (h / radius) * rot_v  # Rot v - v - (h / R) Rot v
        rot = np.stack([np.stack([cos, sin]), np.stack([-sin, cos])])
        jac = g * rot - eye
        jac = jac + (dg / radius) * rot_v[:, None] * v[None] + (g * dalpha / radius) * rot_perp_v[:, None] * v[None]
        # RV contraction towards its centre, off on the LV
        w = points - np.reshape(self.rv_centre, (2,) + (1,) * (points.ndim - 1))
        bump = np.exp(-(w[0] ** 2 + w[1] ** 2) / self.rv_radius**2)
        ramp, dramp = _smoothstep((radius - self.outer_radius) / self.rv_ramp)
        f = p * self.rv_strength * bump * ramp
        grad_bump = -2.0 * w / self.rv_radius**2 * bump
        grad_f = p * self.rv_strength * (grad_bump * ramp + bump * dramp / self.rv_ramp * v / radius)
        u = u - f * w
        jac = jac - f * eye - w[:, None] * grad_f[None]
        # breathing and the smooth random field
        u = u + b * np.reshape(self.breathing, (2,) + (1,) * (points.ndim - 1))
        for m, k in enumerate(self.wave_vectors):
            arg = k[0] * points[0] + k[1] * points[1]
            sin_arg, cos_arg = np.sin(arg), np.cos(arg)
            for i in range(2):
                amplitude, shift = p * self.wave_amplitudes[i, m], self.wave_phases[i, m]
                u[i] = u[i] + amplitude * (sin_arg * np.cos(shift) + cos_arg * np.sin(shift))
                wave_cos = amplitude * (cos_arg * np.cos(shift) - sin_arg * np.sin(shift))
                jac[i, 0] = jac[i, 0] + wave_cos * k[0]
                jac[i, 1] = jac[i, 1] + wave_cos * k[1]
        return u, jac

    def lagrangian(self, frame: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """U_t and dU/dX on the ED pixel grid: (2, size, size), (2, 2, size, size)."""
        return self.displacement(frame, np.mgrid[0:size, 0:size].astype(np.float64))

    def eulerian(
        self,
        frame: int,
        size: int,
        on_grid: tuple[np.ndarray, np.ndarray] | None = None,
        tol: float = 1e-8,
        max_iter: int = 60,
    ) -> tuple[np.ndarray, float]:
        """The pull field on the frame-t grid, ``frame_t(x) = ED(x + e(x))``: Newton on X + U_t(X) = x from X = x.

        ``on_grid``: ``lagrangian(frame, size)`` if already computed (the first Newton step needs it). Returns e
        (2, size, size) and the largest residual |X + U_t(X) - x| in pixels (every point ends below ``tol``)."""
        x = np.mgrid[0:size, 0:size].reshape(2, -1).astype(np.float64)
        X = x.copy()
        u, jac = on_grid if on_grid is not None else self.lagrangian(frame, size)
        u, jac = u.reshape(2, -1), jac.reshape(2, 2, -1)
        active = np.arange(x.shape[1])  # points not converged yet
        worst = 0.0
        for _ in range(max_iter):
            res = X[:, active] + u - x[:, active]
            error = np.hypot(res[0], res[1])
            keep = error >= tol
            worst = max(worst, float(error[~keep].max(initial=0.0)))
            active, res, jac = active[keep], res[:, keep], jac[:, :, keep]
            if not active.size:
                break
            a, b, c, d = 1.0 + jac[0, 0], jac[0, 1], jac[1, 0], 1.0 + jac[1, 1]
            step = -np.stack([d * res[0] - b * res[1], a * res[1] - c * res[0]]) / (a * d - b * c)
            norm = np.hypot(step[0], step[1])
            X[:, active] += step * np.minimum(1.0, 2.0 / np.maximum(norm, 1e-12))  # at most 2 px per step
            u, jac = self.displacement(frame, X[:, active])
        else:
            res = X[:, active] + u - x[:, active]
            worst = max(worst, float(np.hypot(res[0], res[1]).max()))
        return (X - x).reshape(2, size, size), worst


def _cine_motion_from(rng: np.random.Generator, anatomy: dict, size: int, num_frames: int, es_index: int) -> CineMotion:
    """Draw the cine motion's parameters for an ED anatomy (strains in the healthy range of docs/strain.md)."""
    s = size / 128.0
    c = anatomy["lv_centre"]
    theta = np.linspace(-np.pi, np.pi, 3601)
    endo = _shape_radius(anatomy["geometry"]["endo"], theta)
    epi = endo + _shape_radius(anatomy["geometry"]["thickness"], theta)
    inner, outer = float(endo.min()) - 0.5, float(epi.max()) + 0.5  # the whole myocardium lies in between
    ejection = rng.uniform(0.64, 0.76)  # ES cavity radius at `inner` = sqrt(1 - ejection) of its ED radius
    shift = ejection * inner**2
    ramp_power = 0.5 * (1.0 + 1.0 / ejection)  # in (1, 1 / ejection): C1 and monotone
    twist = np.deg2rad(rng.uniform(-6.0, 6.0))
    rv_strength = rng.uniform(0.25, 0.40)
    breathing = tuple(rng.uniform(-1.5, 1.5, size=2) * s)
    num_waves = 2
    angles = rng.uniform(0, 2 * np.pi, num_waves)
    wave_numbers = 2 * np.pi / (rng.uniform(50.0, 80.0, num_waves) * s)
    wave_vectors = np.stack([np.sin(angles), np.cos(angles)], axis=1) * wave_numbers[:, None]
    wave_amplitudes = rng.uniform(0.1, 0.25, (2, num_waves)) * s
    wave_phases = rng.uniform(0, 2 * np.pi, (2, num_waves))
    t = np.arange(num_frames, dtype=np.float64)
    return CineMotion(
        lv_centre=tuple(float(v) for v in c),
        rv_centre=tuple(float(v) for v in anatomy["rv_centre"]),
        inner_radius=inner,
        outer_radius=outer,
        shift=float(shift),
        ramp_power=float(ramp_power),
        outer_decay=14.0 * s,
        twist=float(twist),
        twist_radius=anatomy["epi_mean"] + 6.0 * s,
        rv_strength=float(rv_strength),
        rv_radius=24.0 * s,
        rv_ramp=10.0 * s,
        breathing=tuple(float(v) for v in breathing),
        wave_vectors=wave_vectors,
        wave_amplitudes=wave_amplitudes,
        wave_phases=wave_phases,
        phase=cycle_phase(num_frames, es_index),
        breath=np.sin(np.pi * t / num_frames) ** 2,
    )


def _check_cine_arguments(size: int, num_frames: int, mode: str, es_fraction: float) -> int:
    """Validate, return es_index = round(es_fraction * T) kept inside 1..T-2."""
    if mode not in MODES:
        raise ValueError(f"phantom mode must be one of {MODES}, got {mode!r}.")
    if size % 16:
        raise ValueError(f"phantom size must be a multiple of 16 (the UNet pools 3x and integrates at 1/2), got {size}.")
    if num_frames < 3:
        raise ValueError(f"a cine needs at least 3 frames (ED, ES, one more), got {num_frames}.")
    if not 0.0 < es_fraction < 1.0:
        raise ValueError(f"es_fraction must lie in (0, 1), got {es_fraction}.")
    return int(min(max(round(es_fraction * num_frames), 1), num_frames - 2))


def _cine_setup(index: int, seed: int, size: int, num_frames: int, es_index: int):
    """The random stream, ED anatomy (the same as ``cardiac_phantom_pair``'s for this index/seed) and motion."""
    rng = np.random.default_rng([seed, index])
    anatomy = _ed_anatomy(rng, size)
    return rng, anatomy, _cine_motion_from(rng, anatomy, size, num_frames, es_index)


def cine_motion(
    index: int, seed: int = 0, size: int = 128, num_frames: int = 20, es_fraction: float = 0.35
) -> CineMotion:
    """The analytic motion of ``cardiac_phantom_cine(index, seed, size, num_frames, ..., es_fraction)`` (any mode)."""
    es_index = _check_cine_arguments(size, num_frames, "cine", es_fraction)
    return _cine_setup(index, seed, size, num_frames, es_index)[2]


def cardiac_phantom_cine(
    index: int,
    seed: int = 0,
    size: int = 128,
    num_frames: int = 20,
    mode: str = "cine",
    es_fraction: float = 0.35,
    *,
    noise: bool = True,
) -> dict[str, np.ndarray]:
    """A synthetic cardiac cycle ED -> ES -> back towards ED, with the true Lagrangian field of every frame.

    The ED anatomy (and ED labels) are those of ``cardiac_phantom_pair(index, seed, size, mode)``; the motion is
    :class:`CineMotion` (``cine_motion`` rebuilds it). Frame t is the ED tissue image pulled through the Eulerian
    inverse of the motion, with per-frame noise and what has no correspondence: a blood-pool intensity change
    following the phase, two papillary muscles fading in during systole, a vessel fading out (through-plane);
    ``echo``: a fixed fan, speckle (70 % carried by the tissue, 30 % new each frame) and a dropout in one frame.
    ``noise=False`` leaves out the additive per-frame noise only (everything else, speckle included, is the same).

    Returns (T frames, H = W = size):
      images (T, H, W) float32 in [0, 1] (frame 0 = ED); labels (T, H, W) uint8 (1 RV, 2 MYO, 3 LV; the ED labels
      carried by the motion); true_lagrangian (T, 2, H, W) float32 px on the ED grid (U_0 = 0); true_gradient
      (T, 2, 2, H, W) float32 dU_i/dX_j (px/px, analytic); eulerian (T, 2, H, W) float32 pull fields on each
      frame's grid (frame_t(x) ~ ED(x + eulerian_t(x))); inversion_residual (T,) px; outlier_mask (T, H, W) uint8;
      phase (T,) in [0, 1]; ed_index = 0 and es_index (int); lv_centre (2,) px; endo_radius, epi_radius (mean ED
      radii, px); inner_radius, outer_radius (the myocardial band where r^2 = R^2 - p shift holds); shift (px^2).
    """
    es_index = _check_cine_arguments(size, num_frames, mode, es_fraction)
    rng, anatomy, motion = _cine_setup(index, seed, size, num_frames, es_index)
    echo = mode == "echo" or (mode == "mixed" and index % 2 == 1)
    s = size / 128.0
    grid, body, ed_labels = anatomy["grid"], anatomy["body"], anatomy["labels"]
    c = anatomy["lv_centre"]
    base = _render(rng, ed_labels, body, echo, size)
    cavity = ed_labels == 3

    pool_factor = rng.uniform(0.8, 1.1)
    dark = 0.75 if echo else 0.25
    papillary = []  # (ED centre, radius on the frame grid)
    for _ in range(2):
        angle = rng.uniform(0, 2 * np.pi)
        centre = np.array(c) + 0.5 * motion.inner_radius * np.array([np.sin(angle), np.cos(angle)])
        papillary.append((centre, rng.uniform(1.8, 3.0) * s))
    vessel_centre = (c[0] + rng.uniform(-1, 1) * 28 * s, c[1] + rng.uniform(24, 34) * s)
    vessel = _disk(grid, vessel_centre, rng.uniform(3.0, 4.5) * s) & body & (ed_labels == 0)
    vessel_level = 0.1 if echo else 0.95
    noise_sigma = rng.uniform(0.015, 0.04)
    fan = _sector(size, rng) if echo else np.ones((size, size), bool)
    if echo:
        tissue_speckle = ndimage.gaussian_filter(rng.rayleigh(1.0, (size, size)), sigma=0.7 * s)
        dropout_frame = int(rng.integers(1, num_frames))
        dropout_centre = (c[0] + rng.uniform(-10, 10) * s, c[1] + rng.choice([-1, 1]) * rng.uniform(14, 22) * s)
        dropout = np.exp(-((grid[0] - dropout_centre[0]) ** 2 + (grid[1] - dropout_centre[1]) ** 2) / (2 * (6 * s) ** 2))

    shape = (num_frames, size, size)
    out = {
        "images": np.zeros(shape, np.float32),
        "labels": np.zeros(shape, np.uint8),
        "true_lagrangian": np.zeros((num_frames, 2, size, size), np.float32),
        "true_gradient": np.zeros((num_frames, 2, 2, size, size), np.float32),
        "eulerian": np.zeros((num_frames, 2, size, size), np.float32),
        "inversion_residual": np.zeros(num_frames),
        "outlier_mask": np.zeros(shape, np.uint8),
    }
    for t in range(num_frames):
        p = motion.phase[t]
        u, jac = motion.lagrangian(t, size)
        pull, residual = motion.eulerian(t, size, on_grid=(u, jac))
        # what the frame shows, on the ED grid: flow changes the pool, the vessel leaves the plane
        source = base.copy()
        source[cavity] *= 1.0 + p * (pool_factor - 1.0)
        source[vessel] += (1.0 - p) * (vessel_level - source[vessel])
        image = _warp(source, pull, order=1)
        labels, frame_body = _geometry_labels(anatomy["geometry"], grid[0] + pull[0], grid[1] + pull[1])[:2]
        support = frame_body & fan
        outlier = _warp(vessel.astype(np.float64), pull, order=0) > 0.5 if p > 0.1 else np.zeros((size, size), bool)
        # papillary muscles appear in systole, where the tissue has carried them
        visible = float(np.clip((p - 0.3) / 0.4, 0.0, 1.0))
        for centre, radius in papillary:
            moved = centre + motion.displacement(t, centre)[0]
            blob = _disk(grid, moved, radius) & (labels == 3)
            image[blob] += visible * (dark - image[blob])
            outlier |= blob & (visible > 0)
        if echo:
            carried = _warp(tissue_speckle, pull, order=1)
            fresh = ndimage.gaussian_filter(rng.rayleigh(1.0, (size, size)), sigma=0.7 * s)
            image *= 0.7 * carried / tissue_speckle.mean() + 0.3 * fresh / fresh.mean()
            if t == dropout_frame:
                image *= 1.0 - 0.85 * dropout
                outlier |= dropout > 0.3
        image = image + (noise_sigma if noise else 0.0) * rng.standard_normal((size, size))
        out["images"][t] = _finish(image, support)
        out["labels"][t] = np.where(support, labels, 0)
        out["true_lagrangian"][t] = u
        out["true_gradient"][t] = jac
        out["eulerian"][t] = pull
        out["inversion_residual"][t] = residual
        out["outlier_mask"][t] = outlier & support
    out.update(
        phase=motion.phase.copy(),
        ed_index=0,
        es_index=es_index,
        lv_centre=np.asarray(c, np.float64),
        endo_radius=np.float64(anatomy["endo_mean"]),
        epi_radius=np.float64(anatomy["epi_mean"]),
        inner_radius=np.float64(motion.inner_radius),
        outer_radius=np.float64(motion.outer_radius),
        shift=np.float64(motion.shift),
    )
    return out


def true_strain(
    cine: Mapping[str, np.ndarray], frame: int, spacing: Sequence[float] = (1.0, 1.0)
) -> dict[str, np.ndarray]:
    """The phantom's exact strains at ``frame`` on the ED myocardium, from the analytic gradient of U.

    ``spacing`` (mm/px along axes 0, 1) reads the pixel grid as physical: F_ij = delta_ij + (s_i / s_j) dU_i/dX_j,
    radial = the physical unit vector from ``lv_centre`` to X, circumferential = radial turned 90 degrees.
    Returns maps (H, W) (0 off the ED myocardium) ``radial_green``, ``circumferential_green``,
    ``radial_engineering``, ``circumferential_engineering`` and their means over the myocardium (``global_*``, floats).
    """
    spacing = np.asarray(spacing, np.float64)
    grad = np.asarray(cine["true_gradient"][frame], np.float64)
    myo = np.asarray(cine["labels"][0]) == 2
    size0, size1 = myo.shape
    grid = np.mgrid[0:size0, 0:size1].astype(np.float64)
    F = np.eye(2)[:, :, None, None] + grad * (spacing[:, None] / spacing[None, :])[:, :, None, None]
    offset = (grid - np.asarray(cine["lv_centre"], np.float64)[:, None, None]) * spacing[:, None, None]
    radial = offset / np.maximum(np.hypot(offset[0], offset[1]), 1e-12)
    directions = {"radial": radial, "circumferential": np.stack([-radial[1], radial[0]])}
    out: dict[str, np.ndarray] = {}
    for name, e in directions.items():
        stretched = np.einsum("ijhw,jhw->ihw", F, e)
        length2 = stretched[0] ** 2 + stretched[1] ** 2
        for kind, value in (("green", 0.5 * (length2 - 1.0)), ("engineering", np.sqrt(length2) - 1.0)):
            out[f"{name}_{kind}"] = np.where(myo, value, 0.0)
            out[f"global_{name}_{kind}"] = float(value[myo].mean())
    return out
