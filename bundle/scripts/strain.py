"""Myocardial strain from a Lagrangian displacement field: the deformation gradient and its projections.

Nothing in MONAI computes strain; these are pure tensor functions (torch), written here. Conventions
(``docs/README.md`` "Strain"):

* ``displacement``: ``(S, 2, H, W)``, **pixels** of the native grid, component i along array axis i, Lagrangian on
  the ED (reference) grid: the tissue at pixel X at ED is at X + U(X) at the deformed frame;
* ``spacing``: mm per pixel along the two array axes (anisotropic pixels are handled);
* directions: unit vectors ``(S, 2, H, W)`` in physical space (components along the array axes).

Definitions (``../shared/docs/strain.md``): F = I + dU/dX with X in mm, Green-Lagrange E = 1/2 (F^T F - I), normal
Green strain along e: e^T E e; engineering (length-change) strain along e: |F e| - 1; the two are related by
E_ee = eps + eps^2 / 2. Derivatives are central differences inside the image and one-sided at its border
(``torch.gradient``, as ``np.gradient`` in DeepStrain).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

DEFINITIONS = ("green", "engineering")


def deformation_gradient(displacement: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0)) -> torch.Tensor:
    """F = I + grad U in mm / mm, ``(S, 2, 2, H, W)`` with ``F[:, i, j] = delta_ij + dU_i / dX_j``.

    ``displacement`` is in pixels: U_i (mm) = U_i (px) * s_i and X_j (mm) = x_j (px) * s_j, so
    dU_i/dX_j = s_i / s_j * dU_i/dx_j.
    """
    if displacement.ndim != 4 or displacement.shape[1] != 2:
        raise ValueError(f"expected a displacement field (S, 2, H, W), got shape {tuple(displacement.shape)}.")
    if min(displacement.shape[2:]) < 2:
        raise ValueError(f"the field needs at least 2 pixels along each axis to differentiate, got {tuple(displacement.shape)}.")
    s = [float(v) for v in spacing]
    rows = []
    for i in range(2):
        grads = torch.gradient(displacement[:, i], dim=(1, 2))
        rows.append(torch.stack([grads[j] * (s[i] / s[j]) for j in range(2)], dim=1))
    grad_u = torch.stack(rows, dim=1)  # (S, 2, 2, H, W)
    eye = torch.eye(2, dtype=displacement.dtype, device=displacement.device).view(1, 2, 2, 1, 1)
    return grad_u + eye


def green_lagrange(deformation: torch.Tensor) -> torch.Tensor:
    """E = 1/2 (F^T F - I), ``(S, 2, 2, H, W)``."""
    ftf = torch.einsum("skiyx,skjyx->sijyx", deformation, deformation)
    eye = torch.eye(2, dtype=deformation.dtype, device=deformation.device).view(1, 2, 2, 1, 1)
    return 0.5 * (ftf - eye)


def normal_strain(green: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Green strain along unit directions, e^T E e, ``(S, H, W)``."""
    return torch.einsum("siyx,sijyx,sjyx->syx", direction, green, direction)


def engineering_strain(deformation: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Length change along unit directions, |F e| - 1, ``(S, H, W)``."""
    stretched = torch.einsum("sijyx,sjyx->siyx", deformation, direction)
    return torch.linalg.vector_norm(stretched, dim=1) - 1.0


def strain_components(
    displacement: torch.Tensor, spacing: Sequence[float], directions: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Green and engineering strain along each named direction field: keys ``<name>_green`` and
    ``<name>_engineering`` (e.g. ``radial_green``), each ``(S, H, W)``, fractions (0.2 = 20 %)."""
    deformation = deformation_gradient(displacement, spacing)
    green = green_lagrange(deformation)
    out = {}
    for name, direction in directions.items():
        direction = direction.to(displacement)
        out[f"{name}_green"] = normal_strain(green, direction)
        out[f"{name}_engineering"] = engineering_strain(deformation, direction)
    return out


def green_from_engineering(eps: float | torch.Tensor) -> float | torch.Tensor:
    """Green strain of the same stretch as an engineering strain: eps + eps^2 / 2."""
    return eps + eps * eps / 2.0
