"""AdaCS losses (paper Eq. for L_de and L_se; constants and reductions as in the reference code).

All means run over the whole tensor (batch x H x W): the background mask zeroes terms but the
denominator still counts every pixel, as in the reference code.

The similarity term is pluggable: any callable ``(warped, target) -> per-pixel dissimilarity`` works,
e.g. ``torch.nn.MSELoss(reduction="none")`` (the paper: squared residual) or
``torch.nn.L1Loss(reduction="none")``. It must be non-negative and small where images agree.

Ours: L_de and L_se are the method's (score-weighted terms, the pull of S to 1, the momentum-weighted smoothness of S);
MONAI's registration losses (``BendingEnergyLoss``, ``DiffusionLoss``, ``LocalNormalizedCrossCorrelationLoss``) have
no per-pixel weight map, and its smoothness terms differ from the reference's (``GradientL2Loss``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

PixelwiseDissimilarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def foreground_mask(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """M = (I_s != 0) OR (I_t != 0): drops pixels that are zero in both images (ultrasound sector, padding)."""
    return ((moving != 0) | (fixed != 0)).to(moving.dtype)


def score_weighted_dissimilarity(
    dissimilarity: torch.Tensor, score: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """mean_x[ M(x) * S(x) * d(x) ] over batch and pixels (S = 1 where ``score`` is None)."""
    weighted = dissimilarity
    if score is not None:
        weighted = weighted * score
    if mask is not None:
        weighted = weighted * mask
    return weighted.mean()


class GradientL2Loss(nn.Module):
    """VoxelMorph's ``Grad('l2', loss_mult)``: mean squared forward differences along each axis, averaged.

    MONAI's ``DiffusionLoss`` uses central differences (blind to a one-pixel checkerboard), so the
    reference's forward differences are kept here. ``loss_mult`` is the reference's ``int_downsize``.
    """

    def __init__(self, loss_mult: float = 1.0) -> None:
        super().__init__()
        self.loss_mult = loss_mult

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        spatial_dims = field.ndim - 2
        terms = [torch.diff(field, dim=2 + axis).pow(2).mean() for axis in range(spatial_dims)]
        return self.loss_mult * torch.stack(terms).mean()


def score_smoothness(score: torch.Tensor) -> torch.Tensor:
    """L_smooth: mean squared forward differences of the score map, unmasked, averaged over axes."""
    return GradientL2Loss(loss_mult=1.0)(score)


class Direction(NamedTuple):
    """One registration direction of a step: the warped source, its target and the target's score map."""

    warped: torch.Tensor
    target: torch.Tensor
    score: torch.Tensor | None


class DisplacementLoss(nn.Module):
    """L_de = (1/D) sum_d mean(M * floor(S_d) * d(I_s o phi_d, I_t,d)) + lambda * L_grad(field).

    D directions are averaged (0.5 each in the paper's bidirectional setting). The score is detached
    here, whatever the caller passes (paper: stop-gradient on S); ``score=None`` means S = 1 (warm-up).
    """

    def __init__(self, similarity: PixelwiseDissimilarity, regularization: nn.Module, lam: float = 0.01,
                 score_to_weight: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.similarity = similarity
        self.regularization = regularization
        self.lam = lam
        # how the second network's map weights the data term: S itself (AdaCS), or e.g. 1/(2 sigma^2) (NLL)
        self.score_to_weight = score_to_weight

    def forward(
        self, directions: Sequence[Direction], mask: torch.Tensor | None, regularized_field: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        data_terms = [
            score_weighted_dissimilarity(
                self.similarity(d.warped, d.target), None if d.score is None else self._weight(d.score.detach()), mask
            )
            for d in directions
        ]
        data = torch.stack(data_terms).mean()
        smoothness = self.regularization(regularized_field)
        return {"total": data + self.lam * smoothness, "data": data, "grad": smoothness}

    def _weight(self, score: torch.Tensor) -> torch.Tensor:
        return score if self.score_to_weight is None else self.score_to_weight(score)


class ScoringLoss(nn.Module):
    """L_se = L_ucs + alpha * L_reg + w * L_smooth, each term averaged over the directions.

    * L_ucs = mean(M * S * d(floor(I_s o phi), I_t)): the warped image is detached (the paper's stop-gradient;
      the reference code leaks this gradient into f_theta, see docs/README.md);
    * L_reg = mean(M * (S - 1)^2): pulls scores towards 1;
    * L_smooth = mean squared forward differences of S (unmasked), weighted by w = the momentum m_T (carries beta).
    """

    def __init__(self, similarity: PixelwiseDissimilarity, alpha: float = 0.02) -> None:
        super().__init__()
        self.similarity = similarity
        self.alpha = alpha

    def forward(
        self, directions: Sequence[Direction], mask: torch.Tensor | None, smoothness_weight: float
    ) -> dict[str, torch.Tensor]:
        ucs = torch.stack(
            [score_weighted_dissimilarity(self.similarity(d.warped.detach(), d.target), d.score, mask) for d in directions]
        ).mean()
        reg = torch.stack([score_weighted_dissimilarity((d.score - 1.0).pow(2), None, mask) for d in directions]).mean()
        smooth = torch.stack([score_smoothness(d.score) for d in directions]).mean()
        total = ucs + self.alpha * reg + smoothness_weight * smooth
        return {"total": total, "ucs": ucs, "reg": reg, "smooth": smooth}
