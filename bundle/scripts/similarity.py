"""Data terms of the paper's Table 4 as per-pixel dissimilarities: ``(warped, target) -> (B, 1, H, W)``, >= 0.

The trainer's ``similarity`` (``train.yaml``) is any such callable; MSE (``torch.nn.MSELoss(reduction='none')``) is
the paper's. The alternatives, each selected by one config (``configs/similarity_<name>.yaml``):

* :class:`LocalNCC`: 1 - local normalised cross-correlation, MONAI's ``LocalNormalizedCrossCorrelationLoss``
  (window 9, VoxelMorph's default), per pixel;
* :class:`MutualInformation`: MONAI's ``GlobalMutualInformationLoss`` (Parzen windows, 23 bins; the loss is -MI,
  shifted by ln(bins) >= MI so that it is >= 0, as the score-weighted terms need), a global term: its value per image is spread evenly over the pixels, so the mean over pixels is the loss (a
  score or mask weighting then scales it by the weighted fraction of pixels; MI has no per-pixel form);
* MAE: ``torch.nn.L1Loss(reduction='none')`` (no class needed);
* :class:`TukeyBiweight` (ours: MONAI has none): Tukey's biweight rho of the residual scaled per image by its median
  absolute deviation (Belagiannis et al., ICCV 2015), c = 4.6851; the scale is detached.
"""

from __future__ import annotations

import math

import torch
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from torch import nn

TUKEY_C = 4.6851  # 95 % efficiency under Gaussian noise
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation under Gaussian noise


class LocalNCC(nn.Module):
    """``1 - NCC`` in a ``kernel_size`` window, per pixel (MONAI's loss is ``-NCC`` per pixel with reduction none)."""

    def __init__(self, kernel_size: int = 9) -> None:
        super().__init__()
        self.ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=kernel_size, reduction="none")

    def forward(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 + self.ncc(warped, target)


class MutualInformation(nn.Module):
    """MONAI's global mutual information loss (``-MI``, plus ``offset``, default ln(num_bins), the largest MI of
    ``num_bins`` bins, so that it is >= 0; a constant, so the gradients are MONAI's), per image, spread evenly over
    its pixels."""

    def __init__(self, num_bins: int = 23, offset: float | None = None) -> None:
        super().__init__()
        self.mi = GlobalMutualInformationLoss(num_bins=num_bins, reduction="none")
        self.offset = math.log(num_bins) if offset is None else float(offset)

    def forward(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_image = self.mi(warped, target) + self.offset  # (B,)
        return per_image.view(-1, 1, 1, 1).expand_as(warped)


class TukeyBiweight(nn.Module):
    """rho(u) = c^2/6 (1 - (1 - (u/c)^2)^3) for |u| <= c, c^2/6 beyond, u = r / (1.4826 MAD(r)) per image."""

    def __init__(self, c: float = TUKEY_C, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.c, self.min_scale = float(c), float(min_scale)

    def forward(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        residual = warped - target
        flat = residual.detach().flatten(1)
        mad = (flat - flat.median(1, keepdim=True).values).abs().median(1).values
        scale = (MAD_TO_SIGMA * mad).clamp_min(self.min_scale).view(-1, *([1] * (residual.ndim - 1)))
        u = residual / scale
        inside = (1.0 - (1.0 - (u / self.c) ** 2) ** 3) * self.c ** 2 / 6.0
        return torch.where(u.abs() <= self.c, inside, torch.full_like(u, self.c ** 2 / 6.0))
