"""Strain tensor math (scripts/strain.py) on fields whose strain is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.strain import (
    deformation_gradient,
    engineering_strain,
    green_from_engineering,
    green_lagrange,
    normal_strain,
    strain_components,
)


def grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(height, dtype=torch.float64).view(height, 1).expand(height, width)
    y = torch.arange(width, dtype=torch.float64).view(1, width).expand(height, width)
    return x, y


def constant_direction(angle: float, shape: tuple[int, int]) -> torch.Tensor:
    d = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64).view(1, 2, 1, 1)
    return d.expand(1, 2, *shape).clone()


def test_uniform_stretch_with_anisotropic_spacing():
    """U = (0.2 x, -0.1 y) pixels: stretch 1.2 / 0.9 along the axes whatever the spacing (ratios of like units)."""
    x, y = grid(12, 17)
    u = torch.stack([0.2 * x, -0.1 * y])[None]
    f = deformation_gradient(u, spacing=(2.0, 0.5))
    torch.testing.assert_close(f[0, :, :, 6, 8], torch.tensor([[1.2, 0.0], [0.0, 0.9]], dtype=torch.float64))
    e = green_lagrange(f)
    along0 = normal_strain(e, constant_direction(0.0, (12, 17)))
    along1 = normal_strain(e, constant_direction(math.pi / 2, (12, 17)))
    assert along0[0, 6, 8].item() == pytest.approx(0.5 * (1.2**2 - 1))
    assert along1[0, 6, 8].item() == pytest.approx(0.5 * (0.9**2 - 1))
    assert engineering_strain(f, constant_direction(0.0, (12, 17)))[0, 6, 8].item() == pytest.approx(0.2)


def test_spacing_scales_shear_between_axes():
    """U_0 = 0.1 y pixels on 2 mm x 0.5 mm pixels: dU_0/dX_1 = 0.1 * 2 / 0.5 = 0.4 (mm per mm)."""
    x, y = grid(10, 10)
    u = torch.stack([0.1 * y, torch.zeros_like(y)])[None]
    f = deformation_gradient(u, spacing=(2.0, 0.5))
    torch.testing.assert_close(f[0, :, :, 5, 5], torch.tensor([[1.0, 0.4], [0.0, 1.0]], dtype=torch.float64))
    iso = deformation_gradient(u, spacing=(1.0, 1.0))
    assert iso[0, 0, 1, 5, 5].item() == pytest.approx(0.1)


def test_rigid_rotation_has_no_strain():
    x, y = grid(20, 20)
    theta = math.radians(25)
    cx, cy = x - 9.5, y - 9.5
    u = torch.stack([math.cos(theta) * cx - math.sin(theta) * cy - cx, math.sin(theta) * cx + math.cos(theta) * cy - cy])
    strains = strain_components(u[None], (1.3, 1.3), {"a": constant_direction(0.3, (20, 20))})
    assert strains["a_green"].abs().max().item() < 1e-12
    assert strains["a_engineering"].abs().max().item() < 1e-12


def test_stretch_along_oblique_direction_and_both_definitions():
    """Stretch by 1.3 along a 30-degree direction: engineering 0.3, Green 0.3 + 0.3^2 / 2, none across it."""
    x, y = grid(16, 16)
    a = math.radians(30)
    n = torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)
    along = n[0] * x + n[1] * y
    u = torch.stack([0.3 * along * n[0], 0.3 * along * n[1]])[None]
    out = strain_components(u, (1.0, 1.0), {"n": constant_direction(a, (16, 16)),
                                            "t": constant_direction(a + math.pi / 2, (16, 16))})
    assert out["n_engineering"][0, 8, 8].item() == pytest.approx(0.3)
    assert out["n_green"][0, 8, 8].item() == pytest.approx(green_from_engineering(0.3))
    assert out["t_green"][0, 8, 8].item() == pytest.approx(0.0, abs=1e-12)
    assert green_from_engineering(-0.2) == pytest.approx(-0.18)


def test_radial_expansion_of_a_ring_matches_closed_form():
    """U = k (X - c): in-plane dilation 1 + k; radial and circumferential Green strain both (1 + k)^2 / 2 - 1/2."""
    x, y = grid(64, 64)
    k = -0.15
    u = torch.stack([k * (x - 31.5), k * (y - 31.5)])[None]
    r = torch.stack([x - 31.5, y - 31.5])
    radial = (r / r.norm(dim=0, keepdim=True).clamp_min(1e-9))[None]
    circ = torch.stack([-radial[:, 1], radial[:, 0]], 1)
    out = strain_components(u, (1.0, 1.0), {"radial": radial, "circumferential": circ})
    expected = 0.5 * ((1 + k) ** 2 - 1)
    for key in ("radial_green", "circumferential_green"):
        assert out[key][0, 10:50, 10:50].sub(expected).abs().max().item() < 1e-9
    assert out["circumferential_engineering"][0, 20, 40].item() == pytest.approx(k)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\(S, 2, H, W\)"):
        deformation_gradient(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="at least 2 pixels"):
        deformation_gradient(torch.zeros(1, 2, 1, 8))
