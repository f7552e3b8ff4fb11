"""The paper's uncertainty baselines NLL and beta-NLL (Table 1), as a mode of the AdaCS trainer (no second trainer);
its residual-weighting baselines AdaReg and AdaFrame, as displacement losses (no second network).

A variance network (the scoring network's UNet, no sigmoid: :class:`LogVarianceNet`) predicts s = log sigma^2 of the
target image; the loss of a pixel with residual dissimilarity d (r^2 for MSE) is

    NLL      = 1/2 d e^{-s} + 1/2 s
    beta-NLL = [e^{beta s}]_detached * NLL           (Seitzer et al., ICLR 2022: sigma^{2 beta}, detached)

(method doc §10.5, the reference's ``hetero_uncertainty`` losses). In the trainer's alternating steps:

* the displacement step minimises it over theta with s detached: the data term weighted by
  ``NLLWeight(beta)(s) = 1/2 e^{-s} [e^{beta s}]`` (``DisplacementLoss(score_to_weight=...)``);
* the variance step (the trainer's scoring step) minimises it over phi with the warped image detached
  (:class:`NLLVarianceLoss`).

Ours where the reference has its own loop: the alternation (the reference trains both terms of the same loss jointly;
the fixed point is the same) and the foreground mask M, as for AdaCS. beta = 0 is plain NLL; 0.5 is the beta-NLL
paper's recommended value (used here; the reference's value is not recorded in the method doc).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .losses import Direction, DisplacementLoss, PixelwiseDissimilarity
from .networks import ScoringNet


class LogVarianceNet(ScoringNet):
    """The scoring network's UNet with a linear output: s = log sigma^2 per pixel (clamped to +-``bound``)."""

    def __init__(self, bound: float = 10.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bound = float(bound)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.unet(image).clamp(-self.bound, self.bound)


class NLLWeight:
    """The displacement step's weight of a pixel: 1/2 e^{-s} e^{beta s} (s detached by the caller)."""

    def __init__(self, beta: float = 0.0) -> None:
        self.beta = float(beta)

    def __call__(self, log_variance: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.exp((self.beta - 1.0) * log_variance)


class NLLVarianceLoss(nn.Module):
    """The variance step: mean over directions of mean(M [e^{beta s}]_detached (1/2 d(floor(warped), target) e^{-s}
    + 1/2 s)). Returns the trainer's scoring-loss keys (``ucs`` = the NLL, ``reg`` and ``smooth`` = 0)."""

    def __init__(self, similarity: PixelwiseDissimilarity, beta: float = 0.0) -> None:
        super().__init__()
        self.similarity = similarity
        self.beta = float(beta)

    def forward(self, directions: Sequence[Direction], mask: torch.Tensor | None,
                smoothness_weight: float = 0.0) -> dict[str, torch.Tensor]:
        terms = []
        for d in directions:
            s = d.score
            nll = 0.5 * self.similarity(d.warped.detach(), d.target) * torch.exp(-s) + 0.5 * s
            if self.beta:
                nll = nll * torch.exp(self.beta * s).detach()
            if mask is not None:
                nll = nll * mask
            terms.append(nll.mean())
        total = torch.stack(terms).mean()
        zero = torch.zeros((), device=total.device)
        return {"total": total, "ucs": total, "reg": zero, "smooth": zero}


class AdaRegDisplacementLoss(nn.Module):
    """The AdaReg baseline (Table 1; method doc §10.5): plain data term, and the smoothness penalty on the field
    multiplied per pixel by w = exp(-c |r| mean|r|) before the gradient loss, r the forward residual (detached: a
    weight), mean over the image, c = 50 (the reference's ``--c 50``, with ``--int-downsize 1`` so that the field and
    the residual share a grid; a coarser field gets w resized to it)."""

    def __init__(self, similarity: PixelwiseDissimilarity, regularization: nn.Module, lam: float = 0.01,
                 c: float = 50.0) -> None:
        super().__init__()
        self.similarity, self.regularization, self.lam, self.c = similarity, regularization, float(lam), float(c)

    def weight(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        residual = (warped - target).detach().abs()
        return torch.exp(-self.c * residual * residual.flatten(1).mean(1).view(-1, 1, 1, 1))

    def forward(self, directions: Sequence[Direction], mask: torch.Tensor | None,
                regularized_field: torch.Tensor) -> dict[str, torch.Tensor]:
        data = torch.stack([
            (self.similarity(d.warped, d.target) * (mask if mask is not None else 1.0)).mean() for d in directions
        ]).mean()
        w = self.weight(directions[0].warped, directions[0].target)
        if w.shape[2:] != regularized_field.shape[2:]:
            w = torch.nn.functional.interpolate(w, size=regularized_field.shape[2:], mode="bilinear", align_corners=True)
        smoothness = self.regularization(w * regularized_field)
        return {"total": data + self.lam * smoothness, "data": data, "grad": smoothness}


class AdaFrameDisplacementLoss(DisplacementLoss):
    """The AdaFrame baseline (Table 1; method doc §10.5): the data term weighted per pixel by

        w = 1 - sigmoid(a rho - b),   rho = |r|,   a = a0 / mean|r|,   b = b0 (1 - cos(pi mean|r|))

    (a weighted MSE with the paper's similarity), r = warped - target of each direction (bidirectional: each direction
    weighted by its own residual), mean|r| per pair over the foreground mask M when the trainer passes one (all pixels
    otherwise; AdaReg's mean is over the whole image). a rho = a0 |r| / mean|r| is the standardised residual. w is
    computed without gradient (an IRLS weight, as AdaReg's; ours, the reference's choice is not recorded): the field
    is trained through the residual in the data term only. The weights then enter :class:`DisplacementLoss` as its
    (detached) score map; the smoothness term is the usual lambda L_grad.

    Ours: a0 and b0 (the method doc does not record the reference's constants), chosen from the unregistered training
    pairs, never from a test score. a0 = 1: unit slope in the standardised residual. b0 = 250: b = 3.1 at
    mean|r| = 0.05 (about the median over the ACDC training pairs, images min-max scaled), where w = 0.96 at r = 0,
    about 0.5 at 3 mean|r| and 0.05 at 6 mean|r|: about 1 well below the mean residual, towards 0 at several times
    it. b grows about as mean|r|^2 (the formula's): CAMUS's larger residuals (median 0.1) give b = 12, about plain MSE
    until the residual falls; a falling residual lowers b and makes the weighting more selective.
    """

    def __init__(self, similarity: PixelwiseDissimilarity, regularization: nn.Module, lam: float = 0.01,
                 a0: float = 1.0, b0: float = 250.0) -> None:
        super().__init__(similarity, regularization, lam)
        self.a0, self.b0 = float(a0), float(b0)

    @torch.no_grad()
    def weight(self, warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        residual = (warped - target).abs()
        inside = torch.ones_like(residual) if mask is None else mask.expand_as(residual).to(residual.dtype)
        mean = (residual * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp_min(1.0)
        mean = mean.view(-1, *([1] * (residual.ndim - 1)))
        a = self.a0 / mean.clamp_min(torch.finfo(residual.dtype).tiny)  # mean|r| = 0: r = 0 in M, w = sigmoid(0)
        b = self.b0 * (1.0 - torch.cos(math.pi * mean))
        return torch.sigmoid(b - a * residual)  # = 1 - sigmoid(a rho - b)

    def forward(self, directions: Sequence[Direction], mask: torch.Tensor | None,
                regularized_field: torch.Tensor) -> dict[str, torch.Tensor]:
        weighted = [Direction(d.warped, d.target, self.weight(d.warped, d.target, mask)) for d in directions]
        return super().forward(weighted, mask, regularized_field)
