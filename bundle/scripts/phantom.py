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

Conventions: images (1, H, W) in [0, 1] (min-max per image, background exactly 0); ``true_ddf`` (2, H, W) in
pixels, pull convention as MONAI ``Warp``: ``fixed(x) ~ moving(x + true_ddf(x))``, channel i along axis i.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

MODES = ("cine", "echo", "mixed")
LABEL_NAMES = {1: "RV", 2: "MYO", 3: "LV"}


def _irregular_radius(rng: np.random.Generator, theta: np.ndarray, base: float, wobble: float) -> np.ndarray:
    """Radius as a function of angle: a circle with a few smooth random harmonics."""
    radius = np.full_like(theta, base)
    for k in (2, 3, 4):
        radius += base * wobble / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radius


def _polar(yy: np.ndarray, xx: np.ndarray, centre: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = yy - centre[0], xx - centre[1]
    return np.hypot(dy, dx), np.arctan2(dy, dx)


def _ed_anatomy(rng: np.random.Generator, size: int) -> dict:
    """Random ED geometry (pixels) and its label map."""
    s = size / 128.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    lv_centre = (size / 2 + rng.uniform(-6, 6) * s, size / 2 + rng.uniform(-4, 8) * s)
    r, theta = _polar(yy, xx, lv_centre)
    endo = _irregular_radius(rng, theta, rng.uniform(13, 19) * s, 0.06)
    epi = endo + _irregular_radius(rng, theta, rng.uniform(5.5, 8.5) * s, 0.10)
    body = ((yy - size / 2) / (0.44 * size)) ** 2 + ((xx - size / 2) / (0.47 * size)) ** 2 <= 1.0
    # RV: a crescent hugging the septum on the left of the LV
    rv_centre = (lv_centre[0] + rng.uniform(-4, 4) * s, lv_centre[1] - rng.uniform(19, 24) * s)
    rv_r, rv_theta = _polar(yy, xx, rv_centre)
    rv = (rv_r <= _irregular_radius(rng, rv_theta, rng.uniform(15, 20) * s, 0.08)) & (r > epi + 1.5 * s)
    labels = np.zeros((size, size), np.uint8)
    labels[rv] = 1
    labels[(r > endo) & (r <= epi)] = 2
    labels[r <= endo] = 3
    labels[~body] = 0
    return {
        "labels": labels,
        "body": body,
        "lv_centre": lv_centre,
        "rv_centre": rv_centre,
        "endo_mean": float(endo.mean()),
        "epi_mean": float(epi.mean()),
        "grid": (yy, xx),
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
