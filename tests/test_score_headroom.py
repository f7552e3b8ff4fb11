"""Score headroom (ours, not the paper's): S = (1 + h) sigmoid(z) puts the pull term's target S = 1 at a finite
logit."""

from __future__ import annotations

import math

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE
from scripts.losses import Direction, ScoringLoss
from scripts.networks import ScoringNet, score_from_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_zero_headroom_is_the_papers_sigmoid():
    torch.manual_seed(0)
    net, image = ScoringNet(), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(image), torch.sigmoid(net.unet(image)))


def test_headroom_scales_the_sigmoid_and_lets_scores_pass_one():
    torch.manual_seed(0)
    paper, roomy = ScoringNet(), ScoringNet(headroom=0.05)
    roomy.load_state_dict(paper.state_dict())  # a setting, not a weight: the same files load into both
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(roomy(image), 1.05 * paper(image))
        # at logit 20 the paper's float32 sigmoid is exactly 1 (saturated); with headroom it is still above 1
        assert score_from_logits(torch.tensor(20.0), 0.0) == 1.0 < score_from_logits(torch.tensor(20.0), 0.05)


def test_negative_headroom_is_rejected():
    with pytest.raises(ValueError, match="headroom"):
        ScoringNet(headroom=-0.1)


def fit_free_logits(headroom: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel logits trained on the scoring loss alone (no smoothness), as a network's output layer would be.

    Half the pixels have zero residual (their optimum is S = 1), half have r^2 = alpha (optimum S* = 0.5).
    """
    alpha = 0.02
    residual2 = torch.zeros(1, 1, 8, 8)
    residual2[..., 4:] = alpha
    logits = torch.zeros_like(residual2, requires_grad=True)
    loss = ScoringLoss(similarity=lambda warped, target: warped, alpha=alpha)  # "warped" carries r^2 directly
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        score = score_from_logits(logits, headroom)
        loss([Direction(residual2, residual2, score)], None, smoothness_weight=0.0)["total"].backward()
        optimizer.step()
    return logits.detach(), score_from_logits(logits, headroom).detach()


def test_paper_logits_keep_climbing_where_the_residual_vanishes():
    short, _ = fit_free_logits(0.0, 300)
    long, score = fit_free_logits(0.0, 1500)
    assert long[..., :4].min() > short[..., :4].max() + 1.0  # no fixed point: S = 1 is at z = +inf
    assert score[..., :4].max() < 0.995  # and the pull has not got there either
    torch.testing.assert_close(score[..., 4:], torch.full_like(score[..., 4:], 0.5), atol=0.01, rtol=0)


def test_headroom_gives_the_logits_a_finite_fixed_point_and_keeps_the_optimum():
    headroom = 0.05
    short, _ = fit_free_logits(headroom, 1000)
    long, score = fit_free_logits(headroom, 1500)
    target = math.log(1 / headroom)  # (1 + h) sigmoid(z) = 1 at z = ln(1 / h)
    assert (long[..., :4] - target).abs().max() < 0.01 and (long - short).abs().max() < 0.01  # converged
    torch.testing.assert_close(score[..., :4], torch.ones_like(score[..., :4]), atol=1e-3, rtol=0)
    torch.testing.assert_close(score[..., 4:], torch.full_like(score[..., 4:], 0.5), atol=0.01, rtol=0)


@pytest.mark.parametrize("config", ["train.yaml", "inference.yaml"])
def test_configs_pass_score_headroom_to_the_scoring_network(config):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / config))
    assert parser.get_parsed_content("scoring_network_def").headroom == 0.0  # the paper by default
    parser["score_headroom"] = 0.05
    assert parser.get_parsed_content("scoring_network_def", lazy=False).headroom == 0.05
