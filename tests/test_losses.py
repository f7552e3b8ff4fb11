"""AdaCS losses against hand computation on tiny tensors (method doc sections 3.1, 3.2 and 7).

Expected values are written out pixel by pixel with plain Python arithmetic, not with the code under test.
"""

from __future__ import annotations

import pytest
import torch

from scripts.losses import (
    Direction,
    DisplacementLoss,
    GradientL2Loss,
    ScoringLoss,
    foreground_mask,
    score_weighted_dissimilarity,
)

MSE = torch.nn.MSELoss(reduction="none")

# 1x1x3x3 images, written as flat row-major lists of 9 values
WARPED_F = [0.0, 0.2, 0.5, 0.9, 0.0, 0.3, 1.0, 0.4, 0.0]
TARGET_F = [0.0, 0.1, 0.7, 0.5, 0.0, 0.3, 0.6, 0.0, 0.2]
SCORE_F = [0.5, 0.9, 0.1, 0.8, 0.3, 0.6, 0.2, 0.7, 0.4]
WARPED_B = [0.1, 0.0, 0.3, 0.2, 0.6, 0.0, 0.5, 0.5, 0.9]
TARGET_B = [0.3, 0.0, 0.0, 0.6, 0.1, 0.2, 0.5, 0.1, 0.4]
SCORE_B = [0.9, 0.2, 0.4, 0.4, 0.8, 0.1, 0.3, 0.6, 0.5]
MASK = [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def image(values: list[float], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 3, 3).requires_grad_(requires_grad)


def hand_weighted_mse(warped, target, score, mask) -> float:
    """(1/9) sum_x M S r^2, every one of the 9 pixels in the denominator."""
    return sum(m * s * (w - t) ** 2 for w, t, s, m in zip(warped, target, score, mask)) / 9.0


def hand_forward_diff_l2(grid: list[list[float]]) -> float:
    """0.5 * [mean of squared vertical forward differences + mean of squared horizontal ones]."""
    rows, cols = len(grid), len(grid[0])
    vertical = [(grid[i + 1][j] - grid[i][j]) ** 2 for i in range(rows - 1) for j in range(cols)]
    horizontal = [(grid[i][j + 1] - grid[i][j]) ** 2 for i in range(rows) for j in range(cols - 1)]
    return 0.5 * (sum(vertical) / len(vertical) + sum(horizontal) / len(horizontal))


def rows3(values: list[float]) -> list[list[float]]:
    return [values[0:3], values[3:6], values[6:9]]


# ---- foreground mask ---------------------------------------------------------------------------------------
def test_foreground_mask_excludes_only_pixels_zero_in_both_images():
    moving = image([0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.3, 0.0, 0.0])
    fixed = image([0.0, 0.0, 0.2, 0.0, 0.0, 0.4, 0.0, 0.0, 0.7])
    expected = [0, 1, 1, 0, 0, 1, 1, 0, 1]  # 1 where either image is non-zero
    assert foreground_mask(moving, fixed).flatten().tolist() == expected


def test_masked_pixels_still_count_in_the_denominator():
    dissimilarity = image([4.0, 1.0, 1.0, 1.0, 9.0, 1.0, 1.0, 1.0, 1.0])
    result = score_weighted_dissimilarity(dissimilarity, None, image(MASK))
    # the two masked pixels (values 4 and 9) drop out of the sum, but the mean still divides by 9, not by 7
    assert result.item() == pytest.approx(7.0 / 9.0)
    assert result.item() != pytest.approx(1.0)


# ---- gradient (smoothness) loss ----------------------------------------------------------------------------
def test_gradient_l2_loss_is_forward_difference_mean_per_axis_times_loss_mult():
    channel0 = [[0.0, 1.0, 3.0], [2.0, 2.0, 0.0], [1.0, 4.0, 1.0]]
    channel1 = [[1.0, 0.0, 0.0], [0.0, -1.0, 2.0], [3.0, 0.0, 1.0]]
    field = torch.tensor([[channel0, channel1]], dtype=torch.float64)  # (1, 2, 3, 3)
    # both channels are pooled in one mean per axis: 12 vertical and 12 horizontal differences
    vertical = [
        (c[i + 1][j] - c[i][j]) ** 2 for c in (channel0, channel1) for i in range(2) for j in range(3)
    ]
    horizontal = [
        (c[i][j + 1] - c[i][j]) ** 2 for c in (channel0, channel1) for i in range(3) for j in range(2)
    ]
    expected = 0.5 * (sum(vertical) / 12 + sum(horizontal) / 12)
    assert GradientL2Loss(loss_mult=1.0)(field).item() == pytest.approx(expected)
    assert GradientL2Loss(loss_mult=2.0)(field).item() == pytest.approx(2.0 * expected)


def test_gradient_l2_loss_sees_a_one_pixel_checkerboard():
    # central differences (MONAI DiffusionLoss) give 0 here; forward differences are all +-2, squared 4
    checker = torch.tensor([[(-1.0) ** (i + j) for j in range(6)] for i in range(6)]).reshape(1, 1, 6, 6)
    assert GradientL2Loss(loss_mult=1.0)(checker).item() == pytest.approx(4.0)
    assert GradientL2Loss(loss_mult=1.0)(torch.ones(1, 2, 6, 6)).item() == 0.0


# ---- displacement loss L_de --------------------------------------------------------------------------------
def test_displacement_loss_matches_hand_computation():
    lam = 0.1
    field = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [0.0, 3.0]]]], dtype=torch.float64)
    directions = [
        Direction(image(WARPED_F), image(TARGET_F), image(SCORE_F)),
        Direction(image(WARPED_B), image(TARGET_B), image(SCORE_B)),
    ]
    out = DisplacementLoss(MSE, GradientL2Loss(loss_mult=2.0), lam=lam)(directions, image(MASK), field)

    data_f = hand_weighted_mse(WARPED_F, TARGET_F, SCORE_F, MASK)
    data_b = hand_weighted_mse(WARPED_B, TARGET_B, SCORE_B, MASK)
    data = 0.5 * (data_f + data_b)  # directions averaged
    # field: channel 0 [[0,1],[2,0]], channel 1 [[1,1],[0,3]]
    vertical = [(2 - 0) ** 2, (0 - 1) ** 2, (0 - 1) ** 2, (3 - 1) ** 2]
    horizontal = [(1 - 0) ** 2, (0 - 2) ** 2, (1 - 1) ** 2, (3 - 0) ** 2]
    grad = 2.0 * 0.5 * (sum(vertical) / 4 + sum(horizontal) / 4)

    assert out["data"].item() == pytest.approx(data)
    assert out["grad"].item() == pytest.approx(grad)
    assert out["total"].item() == pytest.approx(data + lam * grad)


def test_displacement_loss_without_score_is_plain_masked_mse():
    directions = [Direction(image(WARPED_F), image(TARGET_F), None)]
    out = DisplacementLoss(MSE, GradientL2Loss(), lam=0.0)(directions, image(MASK), torch.zeros(1, 2, 3, 3))
    assert out["data"].item() == pytest.approx(hand_weighted_mse(WARPED_F, TARGET_F, [1.0] * 9, MASK))
    out_nomask = DisplacementLoss(MSE, GradientL2Loss(), lam=0.0)(directions, None, torch.zeros(1, 2, 3, 3))
    assert out_nomask["data"].item() == pytest.approx(hand_weighted_mse(WARPED_F, TARGET_F, [1.0] * 9, [1.0] * 9))


def test_displacement_loss_detaches_the_score_and_differentiates_the_warp():
    warped = image(WARPED_F, requires_grad=True)
    score = image(SCORE_F, requires_grad=True)
    field = torch.zeros(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    loss = DisplacementLoss(MSE, GradientL2Loss(), lam=0.01)
    out = loss([Direction(warped, image(TARGET_F), score)], image(MASK), field)
    out["total"].backward()
    assert score.grad is None, "the score is a stop-gradient in L_de: no gradient may reach g_phi"
    # d/dw (1/9) sum M S (w - t)^2 = 2 M S (w - t) / 9
    expected = [2 * m * s * (w - t) / 9 for w, t, s, m in zip(WARPED_F, TARGET_F, SCORE_F, MASK)]
    assert warped.grad.flatten().tolist() == pytest.approx(expected)
    assert field.grad is not None


# ---- scoring loss L_se -------------------------------------------------------------------------------------
def test_scoring_loss_terms_match_hand_computation():
    alpha, weight = 0.02, 1.3
    directions = [
        Direction(image(WARPED_F), image(TARGET_F), image(SCORE_F)),
        Direction(image(WARPED_B), image(TARGET_B), image(SCORE_B)),
    ]
    out = ScoringLoss(MSE, alpha=alpha)(directions, image(MASK), weight)

    ucs = 0.5 * (
        hand_weighted_mse(WARPED_F, TARGET_F, SCORE_F, MASK) + hand_weighted_mse(WARPED_B, TARGET_B, SCORE_B, MASK)
    )
    reg = 0.5 * sum(sum(m * (s - 1.0) ** 2 for s, m in zip(score, MASK)) / 9.0 for score in (SCORE_F, SCORE_B))
    smooth = 0.5 * (hand_forward_diff_l2(rows3(SCORE_F)) + hand_forward_diff_l2(rows3(SCORE_B)))  # unmasked

    assert out["ucs"].item() == pytest.approx(ucs)
    assert out["reg"].item() == pytest.approx(reg)
    assert out["smooth"].item() == pytest.approx(smooth)
    assert out["total"].item() == pytest.approx(ucs + alpha * reg + weight * smooth)


def test_scoring_smoothness_is_not_masked():
    # a score map that only varies on masked-out pixels: L_smooth must still see it, L_reg must not
    score = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # centre pixel (masked out) is 0
    out = ScoringLoss(MSE, alpha=1.0)([Direction(image(TARGET_F), image(TARGET_F), image(score))], image(MASK), 1.0)
    assert out["reg"].item() == 0.0
    assert out["smooth"].item() == pytest.approx(hand_forward_diff_l2(rows3(score)))
    assert out["smooth"].item() > 0


def test_scoring_loss_detaches_the_warped_image():
    warped = image(WARPED_F, requires_grad=True)
    score = image(SCORE_F, requires_grad=True)
    alpha = 0.04
    out = ScoringLoss(MSE, alpha=alpha)([Direction(warped, image(TARGET_F), score)], image(MASK), 0.0)
    out["total"].backward()
    assert warped.grad is None, "the warped image is a stop-gradient in L_ucs: no gradient may reach f_theta"
    # d/dS [(1/9) sum M S r^2 + alpha (1/9) sum M (S - 1)^2] = M (r^2 + 2 alpha (S - 1)) / 9
    expected = [m * ((w - t) ** 2 + 2 * alpha * (s - 1.0)) / 9 for w, t, s, m in zip(WARPED_F, TARGET_F, SCORE_F, MASK)]
    assert score.grad.flatten().tolist() == pytest.approx(expected)


def test_optimal_score_without_smoothness_is_one_minus_r2_over_2alpha():
    """Method doc 3.2: ignoring L_smooth, the minimiser is S* = clip(1 - r^2 / (2 alpha), 0, 1)."""
    alpha = 0.02
    residuals = [0.05, 0.1, 0.15, 0.3]
    warped = torch.tensor(residuals, dtype=torch.float64).reshape(1, 1, 1, 4)
    optimum = [min(max(1 - r * r / (2 * alpha), 0.0), 1.0) for r in residuals]
    score = torch.tensor(optimum, dtype=torch.float64).reshape(1, 1, 1, 4).requires_grad_(True)
    ScoringLoss(MSE, alpha=alpha)([Direction(warped, torch.zeros_like(warped), score)], None, 0.0)["total"].backward()
    grads = score.grad.flatten().tolist()
    assert grads[:3] == pytest.approx([0.0] * 3, abs=1e-12)  # interior optimum: zero gradient
    assert optimum[3] == 0.0 and grads[3] > 0  # |r| >= sqrt(2 alpha) = 0.2: clipped at 0, the loss still pushes down
