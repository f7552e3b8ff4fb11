"""The NLL, beta-NLL, AdaReg and AdaFrame baselines (issue 30 item 2) on the AdaCS trainer: losses by hand, what is
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


# AdaFrame: w = 1 - sigmoid(a0 |r| / mean|r| - b0 (1 - cos(pi mean|r|))), mean|r| per pair over the mask.
ADAFRAME_R = [[0.02, 0.0, 0.06, 0.5], [0.01, 0.03, 0.05, 0.11]]  # |r| of two pairs (2 x 2 images, row-major)
ADAFRAME_MASK = [[1, 1, 1, 0], [1, 1, 1, 1]]  # pair 0's last pixel is background: mean|r| = 0.08 / 3, pair 1's 0.05
# a0 = 1, b0 = 250, by numpy: b = 0.8768 (pair 0), 3.0779 (pair 1)
ADAFRAME_W = [[0.531653907, 0.706155590, 0.202100942, 1.72886637e-08], [0.94674383, 0.92257899, 0.88873802, 0.70638994]]


def _adaframe_pairs(requires_grad=False):
    warped = torch.tensor(ADAFRAME_R).view(2, 1, 2, 2).requires_grad_(requires_grad)
    return warped, torch.zeros(2, 1, 2, 2), torch.tensor(ADAFRAME_MASK, dtype=torch.float32).view(2, 1, 2, 2)


def _adaframe_weight_by_hand(residuals, mask, a0, b0):
    mean = sum(r for r, m in zip(residuals, mask) if m) / sum(mask)
    b = b0 * (1 - math.cos(math.pi * mean))
    return [1 - 1 / (1 + math.exp(-(a0 * r / mean - b))) for r in residuals]


def test_adaframe_weight_by_hand():
    from scripts.uncertainty import AdaFrameDisplacementLoss

    warped, target, mask = _adaframe_pairs()
    w = AdaFrameDisplacementLoss(MSE, GradientL2Loss(), a0=1.0, b0=250.0).weight(warped, target, mask)
    assert torch.allclose(w.flatten(1), torch.tensor(ADAFRAME_W), rtol=1e-5, atol=1e-9)
    for a0, b0 in [(1.0, 250.0), (2.0, 40.0)]:  # the formula in scalars, per pair
        w = AdaFrameDisplacementLoss(MSE, GradientL2Loss(), a0=a0, b0=b0).weight(warped, target, mask).flatten(1)
        for i in range(2):
            assert w[i].tolist() == pytest.approx(_adaframe_weight_by_hand(ADAFRAME_R[i], ADAFRAME_MASK[i], a0, b0),
                                                  rel=1e-5, abs=1e-9)
    # b0 = 0: w = 1 - sigmoid(|r| / mean|r|): 1/2 at r = 0, 1/(1 + e) at r = mean|r| (no mask: pair 1's mean is 0.05)
    w = AdaFrameDisplacementLoss(MSE, GradientL2Loss(), a0=1.0, b0=0.0).weight(
        torch.tensor([[[[0.0, 0.05], [0.1, 0.05]]]]), torch.zeros(1, 1, 2, 2))
    assert w.flatten().tolist() == pytest.approx([0.5, 1 / (1 + math.e), 1 / (1 + math.e ** 2), 1 / (1 + math.e)])


def test_adaframe_weights_the_data_term_detached_each_direction_its_own():
    from scripts.uncertainty import AdaFrameDisplacementLoss

    warped, target, mask = _adaframe_pairs(requires_grad=True)
    w, r, m = torch.tensor(ADAFRAME_W), torch.tensor(ADAFRAME_R), torch.tensor(ADAFRAME_MASK, dtype=torch.float32)
    loss = AdaFrameDisplacementLoss(MSE, GradientL2Loss(), lam=0.0)
    out = loss([Direction(warped, target, None)], mask, torch.zeros(2, 2, 2, 2))
    assert out["data"].item() == pytest.approx((m * w * r ** 2).sum().item() / 8, rel=1e-5)  # mean over all 8 pixels
    assert not loss.weight(warped, target, mask).requires_grad
    out["total"].backward()
    # the weight is a constant: d/d warped = 2 M w r / 8 (a live weight would add M r^2 dw/dr, nonzero here)
    assert torch.allclose(warped.grad.flatten(1), 2 * m * w * r / 8, rtol=1e-5, atol=1e-10)

    # bidirectional: the second direction (residual x 0.5: mean|r| halves, b changes) gets its own weights
    other = (0.5 * torch.tensor(ADAFRAME_R)).view(2, 1, 2, 2).requires_grad_(True)
    w2 = torch.tensor([_adaframe_weight_by_hand([0.5 * x for x in ADAFRAME_R[i]], ADAFRAME_MASK[i], 1.0, 250.0)
                       for i in range(2)])
    both = loss([Direction(warped, target, None), Direction(other, target, None)], mask, torch.zeros(2, 2, 2, 2))
    expected = ((m * w * r ** 2).sum() / 8 + (m * w2 * (0.5 * r) ** 2).sum() / 8) / 2
    assert both["data"].item() == pytest.approx(expected.item(), rel=1e-5)
    field = torch.zeros(2, 2, 2, 2)
    field[0, 0, 0, 1] = 1.0
    smooth = AdaFrameDisplacementLoss(MSE, GradientL2Loss(), lam=0.1)([Direction(warped, target, None)], mask, field)
    assert smooth["grad"].item() == pytest.approx(GradientL2Loss()(field).item())  # the field's penalty is unweighted
    assert smooth["total"].item() == pytest.approx(out["data"].item() + 0.1 * smooth["grad"].item(), rel=1e-6)


def test_adaframe_config_trains(tmp_path):
    from scripts.trainer import loss_terms
    from scripts.uncertainty import AdaFrameDisplacementLoss

    workflow = tiny_training(["baseline_adaframe.yaml"], tmp_path, epoch_length=4)
    loss = workflow.parser.get_parsed_content("displacement_loss")
    assert isinstance(loss, AdaFrameDisplacementLoss) and (loss.a0, loss.b0) == (1.0, 250.0)
    assert workflow.parser.get_parsed_content("use_scoring") is False
    network = workflow.parser.get_parsed_content("network")
    before = [p.detach().clone() for p in network.parameters()]
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.run()
    terms = loss_terms(trainer.state.output)
    assert math.isfinite(terms["loss_displacement"]) and terms["loss_data"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters()))  # the displacement net trained
