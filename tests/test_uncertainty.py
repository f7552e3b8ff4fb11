"""The NLL and beta-NLL baselines (issue 30 item 2) as a mode of the AdaCS trainer: losses by hand, what is
detached, and a few training steps through their configs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_training
from scripts.losses import Direction, DisplacementLoss, GradientL2Loss
from scripts.uncertainty import LogVarianceNet, NLLVarianceLoss, NLLWeight

pytestmark = pytest.mark.usefixtures("one_thread")
MSE = torch.nn.MSELoss(reduction="none")


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_variance_loss_by_hand_and_its_gradient(beta):
    warped = torch.tensor([[[[0.2, 0.9]]]], requires_grad=True)
    target = torch.tensor([[[[0.0, 0.5]]]])
    s = torch.tensor([[[[0.3, -1.0]]]], requires_grad=True)
    loss = NLLVarianceLoss(MSE, beta)([Direction(warped, target, s)], None)["total"]
    r2 = torch.tensor([0.04, 0.16])
    sv = torch.tensor([0.3, -1.0])
    expected = ((0.5 * r2 * torch.exp(-sv) + 0.5 * sv) * torch.exp(beta * sv)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert warped.grad is None  # the warped image is detached in the variance step
    # d/ds: the detached sigma^{2 beta} factor is a constant: 1/2 (1 - r^2 e^{-s}) e^{beta s} / 2 pixels
    expected_grad = 0.5 * (1 - r2 * torch.exp(-sv)) * torch.exp(beta * sv) / 2
    assert torch.allclose(s.grad.flatten(), expected_grad, rtol=1e-5)


def test_displacement_step_weights_the_data_term_by_the_detached_precision():
    warped = torch.tensor([[[[0.2, 0.9]]]], requires_grad=True)
    target = torch.tensor([[[[0.0, 0.5]]]])
    s = torch.tensor([[[[0.3, -1.0]]]], requires_grad=True)
    loss = DisplacementLoss(MSE, GradientL2Loss(), lam=0.0, score_to_weight=NLLWeight(0.5))
    out = loss([Direction(warped, target, s)], None, torch.zeros(1, 2, 2, 2))
    weights = 0.5 * torch.exp(-0.5 * torch.tensor([0.3, -1.0]))
    assert out["data"].item() == pytest.approx((weights * torch.tensor([0.04, 0.16])).mean().item(), rel=1e-6)
    out["total"].backward()
    assert s.grad is None and warped.grad is not None  # s is detached in the displacement step


def test_log_variance_net_is_linear_and_bounded():
    from scripts.networks import _head

    net = LogVarianceNet(bound=2.0)
    out = net(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32) and out.abs().max() <= 2.0
    with torch.no_grad():
        _head(net.unet).weight.zero_()
        _head(net.unet).bias.fill_(-1.5)  # a log-variance below 0: no sigmoid in the way
    assert torch.allclose(net(torch.rand(1, 1, 32, 32)), torch.full((1, 1, 32, 32), -1.5))


@pytest.mark.parametrize("name", ["nll", "beta_nll"])
def test_each_baseline_config_trains_both_networks(name, tmp_path):
    from scripts.trainer import loss_terms

    workflow = tiny_training([f"baseline_{name}.yaml"], tmp_path, motion_warmup_epochs=0)
    variance = workflow.parser.get_parsed_content("scoring_network")
    before = [p.detach().clone() for p in variance.parameters()]
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.run()
    terms = loss_terms(trainer.state.output)
    assert isinstance(variance, LogVarianceNet)
    assert math.isfinite(terms["loss_displacement"]) and math.isfinite(terms["loss_ucs"])
    assert any(not torch.equal(a, b) for a, b in zip(before, variance.parameters()))  # the variance net trained


def test_adareg_weight_by_hand_and_it_only_scales_the_smoothness():
    from scripts.uncertainty import AdaRegDisplacementLoss

    warped = torch.tensor([[[[0.2, 0.0], [0.5, 0.1]]]], requires_grad=True)
    target = torch.zeros(1, 1, 2, 2)
    field = torch.zeros(1, 2, 2, 2)
    field[0, 0, 0, 1] = 1.0
    loss = AdaRegDisplacementLoss(MSE, GradientL2Loss(), lam=0.1, c=50.0)
    r = torch.tensor([[0.2, 0.0], [0.5, 0.1]])
    w = torch.exp(-50.0 * r * r.mean())
    assert torch.allclose(loss.weight(warped, target)[0, 0], w)
    out = loss([Direction(warped, target, None)], None, field)
    assert out["data"].item() == pytest.approx((r ** 2).mean().item(), rel=1e-6)
    assert out["grad"].item() == pytest.approx(GradientL2Loss()(w * field).item(), rel=1e-6)
    out["total"].backward()
    assert torch.allclose(warped.grad, 2 * r[None, None] / 4)  # the weight is detached: only the data term's gradient


def test_adareg_config_trains(tmp_path):
    from scripts.trainer import loss_terms

    workflow = tiny_training(["baseline_adareg.yaml"], tmp_path)
    assert workflow.parser.get_parsed_content("network").int_downsize == 1
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.run()
    terms = loss_terms(trainer.state.output)
    assert math.isfinite(terms["loss_displacement"]) and terms["loss_data"] > 0
