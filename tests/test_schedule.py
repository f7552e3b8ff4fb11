"""Warm-start phases and the momentum-guided smoothness weight (method doc sections 4 and 5)."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from scripts.schedule import ConfiguredLearningRates, MomentumSmoothnessWeight, Phase, momentum_decay, phase_for_epoch


def b(residual: float, beta: float = 1.5) -> float:
    """Reference code: b = beta * cos(3.14 * 50 * mu), mu = R / 2 (hand formula, doc section 4)."""
    return beta * math.cos(3.14 * 50 * 0.5 * residual)


# ---- phases ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "epoch, phase",
    [
        (0, Phase.MOTION), (19, Phase.MOTION), (20, Phase.SCORING),
        (39, Phase.SCORING), (40, Phase.JOINT), (339, Phase.JOINT),
    ],
)
def test_paper_schedule_20_motion_20_scoring_then_joint(epoch, phase):
    assert phase_for_epoch(epoch, 20, 20) is phase


def test_schedule_without_warm_up_is_joint_from_the_start():
    assert phase_for_epoch(0, 0, 0) is Phase.JOINT
    assert phase_for_epoch(0, 0, 1) is Phase.SCORING
    assert phase_for_epoch(1, 0, 1) is Phase.JOINT
    assert phase_for_epoch(0, 1, 0) is Phase.MOTION
    assert phase_for_epoch(1, 1, 0) is Phase.JOINT


def test_phase_flags():
    assert Phase.MOTION.trains_motion and not Phase.MOTION.trains_scoring
    assert not Phase.SCORING.trains_motion and Phase.SCORING.trains_scoring
    assert Phase.JOINT.trains_motion and Phase.JOINT.trains_scoring


# ---- momentum decay ----------------------------------------------------------------------------------------
def test_momentum_decay_values():
    assert momentum_decay(0) == 0.0
    assert momentum_decay(19) == pytest.approx(0.95)
    assert momentum_decay(40) == pytest.approx(1 - 1 / 41)  # 0.976, the first joint epoch of the paper
    assert momentum_decay(98) == pytest.approx(1 - 1 / 99)
    assert momentum_decay(98) < 0.99
    assert momentum_decay(99) == pytest.approx(0.99)
    assert momentum_decay(339) == pytest.approx(0.99)
    assert momentum_decay(500, gamma_max=0.9) == pytest.approx(0.9)


# ---- momentum smoothness weight ----------------------------------------------------------------------------
def test_weight_is_beta_before_any_update_and_momentum_starts_at_zero():
    weight = MomentumSmoothnessWeight(beta=1.5)
    assert weight.value == 1.5
    assert weight.momentum == 0.0


def test_first_update_at_epoch_zero_gives_b():
    weight = MomentumSmoothnessWeight(beta=1.5)
    weight.start_epoch(0)
    residual = 0.0088
    assert weight.update(residual) == pytest.approx(b(residual))  # gamma_0 = 0: m = b
    assert weight.value == pytest.approx(b(residual))
    # the example of the doc: b / beta = cos(0.69) ~ 0.77 at R = 0.0088
    assert weight.value / 1.5 == pytest.approx(math.cos(0.6908), abs=1e-3)


def test_running_mean_within_an_epoch_and_reset_at_start_epoch():
    weight = MomentumSmoothnessWeight(beta=2.0)
    weight.start_epoch(0)
    weight.update(0.004)
    value = weight.update(0.008)
    # gamma_0 = 0, so m is b of the running mean of the epoch: mean(0.004, 0.008) = 0.006
    assert value == pytest.approx(b(0.006, beta=2.0))
    m_epoch0 = value

    weight.start_epoch(1)  # gamma_1 = 0.5; the running mean restarts with this epoch
    value = weight.update(0.002)
    assert value == pytest.approx(0.5 * m_epoch0 + 0.5 * b(0.002, beta=2.0))
    value2 = weight.update(0.010)
    assert value2 == pytest.approx(0.5 * value + 0.5 * b(0.006, beta=2.0))


def test_first_update_at_epoch_40_starts_from_zero_momentum():
    """The reference's m starts at 0, not beta: after 40 epochs without update, m = (1 - gamma_40) * b."""
    weight = MomentumSmoothnessWeight(beta=1.5)
    weight.start_epoch(40)
    residual = 0.004
    assert weight.update(residual) == pytest.approx((1 - (1 - 1 / 41)) * b(residual))
    assert weight.value == pytest.approx(b(residual) / 41)


def test_disabled_weight_is_constant_beta():
    weight = MomentumSmoothnessWeight(beta=1.5, enabled=False)
    for epoch in range(3):
        weight.start_epoch(epoch)
        assert weight.update(0.01) == 1.5
    assert weight.value == 1.5


def test_constants_are_used():
    weight = MomentumSmoothnessWeight(beta=1.0, momentum_scaling=10.0, pi_constant=math.pi)
    weight.start_epoch(0)
    assert weight.update(0.02) == pytest.approx(math.cos(math.pi * 10.0 * 0.01))


def test_state_dict_round_trip_continues_identically():
    original = MomentumSmoothnessWeight(beta=1.5)
    for epoch, residuals in enumerate([[0.009, 0.008], [0.006, 0.005, 0.007]]):
        original.start_epoch(epoch)
        for r in residuals:
            original.update(r)
    state = original.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())  # safe for torch.load(weights_only=True)

    restored = MomentumSmoothnessWeight(beta=1.5)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    # mid-epoch continuation: the running mean must carry over
    assert restored.update(0.003) == pytest.approx(original.update(0.003))
    restored.start_epoch(2)
    original.start_epoch(2)
    assert restored.update(0.004) == pytest.approx(original.update(0.004))


# ---- learning rates on resume --------------------------------------------------------------------------------
def test_configured_learning_rates_replace_the_ones_a_checkpoint_loaded():
    weight = torch.nn.Parameter(torch.zeros(2))
    checkpointed = torch.optim.Adam([weight], lr=1e-3)
    displacement, scoring = torch.optim.Adam([weight], lr=1e-4), torch.optim.Adam([weight], lr=2e-4)
    engine = Engine(lambda engine, batch: None)

    def load_checkpoint(_):  # as the CheckpointLoader: first on STARTED, restores lr 1e-3 into both optimizers
        for optimizer in (displacement, scoring):
            optimizer.load_state_dict(checkpointed.state_dict())

    engine.add_event_handler(Events.STARTED, load_checkpoint)
    ConfiguredLearningRates([displacement, scoring], [1e-4, 2e-4]).attach(engine)
    engine.run([0], max_epochs=1)
    assert [g["lr"] for g in displacement.param_groups] == [1e-4]
    assert [g["lr"] for g in scoring.param_groups] == [2e-4]


@pytest.mark.parametrize("rates, message", [([1e-4], "2 optimizers but 1 learning rates"), ([1e-4, 0.0], "positive")])
def test_configured_learning_rates_reject_bad_values(rates, message):
    optimizers = [torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]) for _ in range(2)]
    with pytest.raises(ValueError, match=message):
        ConfiguredLearningRates(optimizers, rates)
