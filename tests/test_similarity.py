"""The paper's Table 4 data terms (issue 30 item 1): each against a hand computation, each config trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import GlobalMutualInformationLoss

from conftest import tiny_training
from scripts.similarity import LocalNCC, MutualInformation, TukeyBiweight

pytestmark = pytest.mark.usefixtures("one_thread")


def test_local_ncc_at_a_full_window_is_one_minus_the_squared_correlation():
    """MONAI's local NCC is the squared correlation cov^2 / (var_x var_y) in the window."""
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 5.0, 1.0], [0.0, 2.0, 4.0]])
    y = torch.tensor([[2.0, 1.0, 0.0], [4.0, 4.0, 2.0], [1.0, 0.0, 3.0]])
    out = LocalNCC(kernel_size=3)(x[None, None], y[None, None])
    a, b = x.flatten().numpy(), y.flatten().numpy()
    cov = ((a - a.mean()) * (b - b.mean())).sum()
    expected = 1.0 - cov ** 2 / (((a - a.mean()) ** 2).sum() * ((b - b.mean()) ** 2).sum())
    assert out.shape == (1, 1, 3, 3)
    assert out[0, 0, 1, 1].item() == pytest.approx(expected, abs=1e-4)  # the centre pixel sees the whole image
    same = torch.rand(1, 1, 16, 16)
    assert LocalNCC()(same, same)[..., 4:-4, 4:-4].abs().max() < 1e-3  # identical images: 0


def test_mutual_information_is_monais_value_spread_over_the_pixels():
    warped, target = torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12)
    out = MutualInformation()(warped, target)
    per_image = GlobalMutualInformationLoss(num_bins=23, reduction="none")(warped, target)
    assert out.shape == warped.shape
    assert torch.allclose(out.flatten(1).mean(1), per_image + math.log(23)) and torch.all(out == out[:, :, :1, :1])
    assert (out >= 0).all()
    self_mi = MutualInformation()(target, target).mean()
    assert self_mi < out.mean()  # an image shares more information with itself than with noise


def test_tukey_biweight_by_hand():
    residual = np.array([0.0, 0.1, -0.2, 0.3, 5.0], dtype=np.float64)  # one outlier
    target = torch.zeros(1, 1, 1, 5, dtype=torch.float64)
    out = TukeyBiweight()(torch.as_tensor(residual).view(1, 1, 1, 5), target).flatten().numpy()
    mad = np.median(np.abs(residual - np.median(residual)))  # median 0.1 -> |r - 0.1| = 0.1 0 0.3 0.2 4.9 -> 0.2
    u = residual / (1.4826 * mad)
    c = 4.6851
    expected = np.where(np.abs(u) <= c, c ** 2 / 6 * (1 - (1 - (u / c) ** 2) ** 3), c ** 2 / 6)
    assert mad == pytest.approx(0.2)
    assert np.allclose(out, expected, rtol=1e-6)
    assert out[-1] == pytest.approx(c ** 2 / 6)  # the outlier costs a constant: no gradient pulls towards it
    grad = torch.as_tensor(residual).view(1, 1, 1, 5).requires_grad_(True)
    TukeyBiweight()(grad, target).sum().backward()
    assert grad.grad.flatten()[-1] == 0 and grad.grad.flatten()[1] > 0


@pytest.mark.parametrize("name", ["ncc", "mi", "mae", "tukey"])
def test_each_data_term_config_trains_a_few_steps(name, tmp_path):
    workflow = tiny_training([f"similarity_{name}.yaml"], tmp_path)
    assert workflow.parser.get_parsed_content("use_scoring") is False
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.run()
    from scripts.trainer import loss_terms

    terms = loss_terms(trainer.state.output)
    assert trainer.state.iteration == 2 and all(math.isfinite(terms[k]) for k in ("loss", "loss_data", "loss_grad"))
    assert terms["loss_data"] > 0


def test_the_no_smoothness_ablation_trains_adacs_with_a_zero_smoothness_weight(tmp_path):
    """Table 3's "L_smooth off" row (issue 30 item 4): the joint phase runs with L_smooth's weight exactly 0."""
    from scripts.trainer import loss_terms

    workflow = tiny_training(["ablation_no_smooth.yaml"], tmp_path, motion_warmup_epochs=0)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.run()
    terms = loss_terms(trainer.state.output)
    assert terms["smoothness_weight"] == 0.0 and math.isfinite(terms["loss_ucs"]) and math.isfinite(terms["loss_reg"])
