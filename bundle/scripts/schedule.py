"""AdaCS schedules: the warm-start phases and the momentum-guided smoothness weight.

Semantics follow the reference code (``train_vxm.py``), see ``docs/README.md`` ("Faithfulness"):

* phases: ``motion`` epochs (scoring off, S = 1), then ``scoring`` epochs (displacement frozen), then ``joint``;
* momentum: updated after every displacement micro-step (not per epoch) with
  ``b = beta * cos(pi_constant * momentum_scaling * mu)`` and ``m = gamma_e * m + (1 - gamma_e) * b``,
  where ``mu`` is the running mean, since the start of the current epoch, of half the direction-averaged
  score-weighted data term, and ``gamma_e = min(1 - 1/(e + 1), gamma_max)`` with ``e`` the 0-based epoch
  (warm-up epochs included). ``m`` (which already carries beta) is the weight of L_smooth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
from ignite.engine import Engine, Events


class Phase(str, Enum):
    """What one epoch trains."""

    MOTION = "motion"  # displacement network only, scores fixed to 1 (warm-up 1)
    SCORING = "scoring"  # scoring network only (warm-up 2)
    JOINT = "joint"  # both, alternating within every micro-step

    @property
    def trains_motion(self) -> bool:
        return self is not Phase.SCORING

    @property
    def trains_scoring(self) -> bool:
        return self is not Phase.MOTION


def phase_for_epoch(epoch_index: int, motion_warmup_epochs: int, scoring_warmup_epochs: int) -> Phase:
    """Phase of the 0-based ``epoch_index``."""
    if epoch_index < motion_warmup_epochs:
        return Phase.MOTION
    if epoch_index < motion_warmup_epochs + scoring_warmup_epochs:
        return Phase.SCORING
    return Phase.JOINT


def momentum_decay(epoch_index: int, gamma_max: float = 0.99) -> float:
    """gamma_e = min(1 - 1/(e + 1), gamma_max) for the 0-based epoch ``e`` (0 at the first epoch)."""
    return min(1.0 - 1.0 / (epoch_index + 1), gamma_max)


class MomentumSmoothnessWeight:
    """The momentum m_T that weights L_smooth of the scoring loss.

    Args:
        beta: scale of the weight (the paper's beta; 1.5 on ACDC and CAMUS).
        momentum_scaling: the reference code's hidden ``--momentum_scaling`` (50).
        pi_constant: the reference code uses 3.14, not pi.
        gamma_max: cap of the decay schedule (0.99).
        enabled: False gives the "nomut" ablation, a constant weight beta.
    """

    def __init__(
        self,
        beta: float = 1.5,
        momentum_scaling: float = 50.0,
        pi_constant: float = 3.14,
        gamma_max: float = 0.99,
        enabled: bool = True,
    ) -> None:
        self.beta = beta
        self.momentum_scaling = momentum_scaling
        self.pi_constant = pi_constant
        self.gamma_max = gamma_max
        self.enabled = enabled if isinstance(enabled, bool) else str(enabled).strip().lower() in ("true", "1", "yes")
        self.momentum = 0.0  # m, as in the reference code
        self.value = beta  # the L_smooth weight: beta until the first displacement step sets it to m
        self.residual_sum = 0.0
        self.residual_count = 0
        self.epoch_index = 0

    def start_epoch(self, epoch_index: int) -> None:
        """Reset the running mean of the residual (it covers the current epoch only)."""
        self.epoch_index = epoch_index
        self.residual_sum = 0.0
        self.residual_count = 0

    @property
    def running_residual(self) -> float:
        return self.residual_sum / max(self.residual_count, 1)

    def update(self, direction_mean_residual: float) -> float:
        """Fold in one displacement micro-step's direction-averaged data term R; return the new weight."""
        if not self.enabled:
            return self.value
        self.residual_sum += 0.5 * direction_mean_residual  # mu_code = 1/2 * R, as the reference logs it
        self.residual_count += 1
        target = self.beta * math.cos(self.pi_constant * self.momentum_scaling * self.running_residual)
        gamma = momentum_decay(self.epoch_index, self.gamma_max)
        self.momentum = gamma * self.momentum + (1.0 - gamma) * target
        self.value = self.momentum
        return self.value

    def state_dict(self) -> dict[str, float | int]:
        return {
            "momentum": self.momentum,
            "value": self.value,
            "residual_sum": self.residual_sum,
            "residual_count": self.residual_count,
            "epoch_index": self.epoch_index,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.momentum = float(state["momentum"])
        self.value = float(state["value"])
        self.residual_sum = float(state["residual_sum"])
        self.residual_count = int(state["residual_count"])
        self.epoch_index = int(state["epoch_index"])


class ConfiguredLearningRates:
    """Puts the configured learning rates back after a resumed checkpoint has loaded its optimizer states.

    ``Optimizer.load_state_dict`` restores each parameter group's ``lr`` from the checkpoint, so without this a
    resumed run ignores ``--learning_rate`` / ``--scoring_learning_rate`` (there is no learning-rate schedule to
    restore: with unchanged rates this is a no-op). Attach it after the ``CheckpointLoader``: both run on
    ``Events.STARTED``, in the order they were attached.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], learning_rates: Sequence[float]) -> None:
        if len(optimizers) != len(learning_rates):
            raise ValueError(f"{len(optimizers)} optimizers but {len(learning_rates)} learning rates")
        for rate in learning_rates:
            if not float(rate) > 0:
                raise ValueError(f"learning rates must be positive numbers, got {rate!r}")
        self.rates = [(optimizer, float(rate)) for optimizer, rate in zip(optimizers, learning_rates)]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        for optimizer, rate in self.rates:
            for group in optimizer.param_groups:
                group["lr"] = rate
