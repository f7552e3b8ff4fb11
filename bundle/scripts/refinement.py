"""Test-time refinement: instance optimisation of each pair's field, starting from the network's prediction.

A trained network predicts a field in one pass; :class:`InstanceRefiner` then optimises it for the pair at hand with
Adam for ``steps`` steps on the network grid:

* the **variable** is the stationary velocity for :class:`~scripts.networks.DiffeomorphicVoxelMorph` (integrated by
  the network's own scaling and squaring, so the result stays diffeomorphic and ``-v`` still gives its inverse),
  or the displacement itself for a one-way network;
* the **loss** per pair is the data term plus ``lam`` times the network's smoothness term (the training's
  ``regularization`` on the same field, with the same ``lam``); pairs are independent (the loss is a sum of
  per-pair means), so batching slices and pairs changes nothing;
* the data term is MSE (as trained) or MONAI's local NCC (``similarity: lncc``; images whose intensities change
  between frames), over the foreground mask M of the training loss, and **score-weighted** (ours, AdaCS's L_de):
  weighted by the scoring network's map of the fixed image, so that pixels without correspondence do not pull the
  field; ``score_weighted: false`` is the plain refinement baseline;
* **safety**: after every step each pair's folding percentage (det J <= 0 on the network grid) is checked; a pair
  that would exceed ``max_folding_pct`` (and its starting value) stops at its last step within the limit.

Ours: MONAI has no instance optimisation of a registration network's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from monai.utils import str2bool

from .losses import GradientL2Loss, foreground_mask
from .metrics import folding_percentage
from .networks import DiffeomorphicVoxelMorph, resize_field

SIMILARITIES = ("mse", "lncc")


@dataclass
class Refined:
    """The refined fields of a batch, with what happened to each pair."""

    ddf: torch.Tensor  # (B, 2, h, w), network grid, pixels
    folding_pct: list[float]  # per pair, after refinement
    folding_pct_network: list[float]  # per pair, the network's own field
    steps: list[int]  # steps kept per pair (fewer than asked when the folding limit stopped it)
    notes: list[str] = field(default_factory=list)  # per pair, "" when nothing to say
    backward_ddf: torch.Tensor | None = None  # the inverse field (integrated -v), diffeomorphic networks only


class InstanceRefiner:
    """Refine a displacement network's fields pair by pair (see the module docstring).

    Args:
        steps: Adam steps per pair; 0 returns the network's field unchanged (bit-identical).
        learning_rate: Adam step size on the velocity (or displacement), in pixels of the network grid.
        lam: smoothness weight (the training's ``lam``).
        regularization: the training's smoothness term on the velocity / displacement (default
            ``GradientL2Loss(loss_mult=int_downsize)``, as ``train.yaml``).
        similarity: ``mse`` (as trained) or ``lncc`` (MONAI local NCC, window ``lncc_kernel``).
        score_weighted: weight the data term by ``scoring_network``'s map of the fixed image (AdaCS); needs it.
        scoring_network: the scoring network ``(B, 1, h, w) -> (B, 1, h, w)``.
        max_folding_pct: a pair stops at its last step whose folding stays within this (or its starting value).
    """

    def __init__(
        self,
        steps: int = 0,
        learning_rate: float = 0.1,
        lam: float = 0.01,
        regularization: torch.nn.Module | None = None,
        similarity: str = "mse",
        score_weighted: bool = True,
        scoring_network: torch.nn.Module | None = None,
        max_folding_pct: float = 0.5,
        lncc_kernel: int = 9,
    ) -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"refinement similarity must be one of {SIMILARITIES}, got {similarity!r}.")
        self.steps, self.learning_rate, self.lam = int(steps), float(learning_rate), float(lam)
        self.regularization = regularization
        self.similarity = similarity
        self.score_weighted = str2bool(score_weighted)
        self.scoring_network = scoring_network
        self.max_folding_pct = float(max_folding_pct)
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=lncc_kernel, reduction="none")
        self.warp = Warp(mode="bilinear", padding_mode="zeros")
        if self.steps > 0 and self.score_weighted and scoring_network is None:
            raise ValueError("score-weighted refinement needs the scoring network (or refine_score_weighted: false).")

    @property
    def active(self) -> bool:
        return self.steps > 0

    def _dissimilarity(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if self.similarity == "mse":
            return (warped - fixed) ** 2
        return 1.0 + self.lncc(warped, fixed)  # MONAI returns -NCC per pixel: 1 - NCC >= 0, 0 where they agree

    def pair_losses(
        self, ddf: torch.Tensor, field: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
        score: torch.Tensor | None, regularization: torch.nn.Module,
    ) -> torch.Tensor:
        """Per pair: mean_x[M S d(moving o ddf, fixed)] + lam * regularization(field), shape ``(B,)``; M the
        foreground mask of the training loss, S the score map (1 when ``None``), d MSE or 1 - local NCC."""
        residual = self._dissimilarity(self.warp(moving, ddf), fixed) * foreground_mask(moving, fixed)
        if score is not None:
            residual = residual * score
        smooth = torch.stack([regularization(field[b:b + 1]) for b in range(field.shape[0])])
        return residual.flatten(1).mean(1) + self.lam * smooth

    def __call__(self, network: torch.nn.Module, image: torch.Tensor) -> Refined:
        """``image``: ``(B, 2, h, w)`` network-grid pairs (moving, fixed). Returns the refined forward fields."""
        core = network.module if hasattr(network, "module") else network
        diffeomorphic = isinstance(core, DiffeomorphicVoxelMorph) and core.integrate is not None
        with torch.no_grad():  # the network's own fields, computed as its forward does, from one UNet pass
            if diffeomorphic:
                start = resize_field(core.unet(image), 1.0 / core.int_downsize)
                network_ddf, network_backward = core._velocity_to_ddf(start), core._velocity_to_ddf(-start)
            else:
                start = network_ddf = network(image)
                network_backward = None
            start_folding = folding_percentage(network_ddf).flatten().tolist()
        batch = image.shape[0]
        if not self.active:
            return Refined(network_ddf, start_folding, start_folding, [0] * batch, [""] * batch, network_backward)
        moving, fixed = image[:, :1], image[:, 1:2]
        score = None
        if self.score_weighted:
            with torch.no_grad():
                self.scoring_network.eval()
                score = self.scoring_network(fixed)
        to_ddf = core._velocity_to_ddf if diffeomorphic else (lambda v: v)
        regularization = self.regularization or GradientL2Loss(loss_mult=core.int_downsize if diffeomorphic else 1)
        variable = start.clone().requires_grad_(True)
        kept, limit = start.clone(), [max(self.max_folding_pct, f) for f in start_folding]
        steps, stopped = [0] * batch, [False] * batch
        optimizer = torch.optim.Adam([variable], lr=self.learning_rate)
        with torch.enable_grad():
            for step in range(1, self.steps + 1):
                optimizer.zero_grad(set_to_none=True)
                losses = self.pair_losses(to_ddf(variable), variable, moving, fixed, score, regularization)
                losses.sum().backward()  # a sum of per-pair losses: pairs independent
                optimizer.step()
                with torch.no_grad():
                    folding = folding_percentage(to_ddf(variable)).flatten().tolist()
                    for b in range(batch):
                        if stopped[b]:
                            variable[b] = kept[b]
                        elif folding[b] > limit[b]:
                            stopped[b] = True
                            variable[b] = kept[b]
                        else:
                            kept[b], steps[b] = variable[b].detach().clone(), step
        with torch.no_grad():
            refined = to_ddf(kept)
            backward = to_ddf(-kept) if diffeomorphic else None
            final_folding = folding_percentage(refined).flatten().tolist()
        notes = [f"refinement stopped after {steps[b]} of {self.steps} steps: folding would exceed "
                 f"{limit[b]:.2f} %" if stopped[b] else "" for b in range(batch)]
        return Refined(refined, final_folding, start_folding, steps, notes, backward)


def refiner_from_settings(
    steps: int, learning_rate: float = 0.1, lam: float = 0.01, similarity: str = "mse", score_weighted: bool = True,
    scoring_network: torch.nn.Module | None = None, scoring_ckpt_path: str | None = None,
    max_folding_pct: float = 0.5, regularization: torch.nn.Module | None = None, device: str | torch.device = "cpu",
) -> InstanceRefiner:
    """The configs' ``refine_*`` settings as a refiner. The scoring network (and its weights, checked and logged by
    ``io_safety.load_weights``) is built only when refinement is on and score-weighted."""
    from .io_safety import load_weights

    steps, weighted = int(steps), str2bool(score_weighted)
    scoring = None
    if steps > 0 and weighted:
        if scoring_network is None:
            raise ValueError("score-weighted refinement needs the scoring network (scoring_network_def).")
        scoring = scoring_network.to(device)
        if scoring_ckpt_path:
            load_weights(scoring, scoring_ckpt_path, "scoring network (refinement)", torch.device(device))
    return InstanceRefiner(steps, learning_rate, lam, regularization, similarity, weighted, scoring, max_folding_pct)
