"""Jacobian determinant, folding and end-point error against analytic values."""

from __future__ import annotations

import math

import pytest
import torch

import numpy as np

from scripts.evaluator import one_hot
from scripts.metrics import (
    EndPointErrorMetric,
    FoldingMetric,
    dice_scores,
    end_point_error,
    field_and_truth,
    folding_percentage,
    jacobian_determinant,
    select_label,
)


def affine_field(a: list[list[float]], shift: tuple[float, float], size: int = 16) -> torch.Tensor:
    """u(y, x) = A (y, x) + shift, channel i along axis i, shape (1, 2, size, size)."""
    axis = torch.arange(size, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    u0 = a[0][0] * yy + a[0][1] * xx + shift[0]
    u1 = a[1][0] * yy + a[1][1] * xx + shift[1]
    return torch.stack([u0, u1])[None]


def test_jacobian_of_identity_is_one():
    det = jacobian_determinant(torch.zeros(2, 2, 12, 10))
    assert det.shape == (2, 1, 12, 10)
    assert torch.equal(det, torch.ones_like(det))


def test_jacobian_of_a_translation_is_one():
    det = jacobian_determinant(affine_field([[0, 0], [0, 0]], (2.5, -1.0)))
    assert torch.allclose(det, torch.ones_like(det))


@pytest.mark.parametrize("a", [[[0.1, 0.3], [-0.2, 0.4]], [[-0.5, 0.0], [0.0, 0.2]], [[0.0, 1.5], [0.5, 0.0]]])
def test_jacobian_of_an_affine_field_is_the_analytic_determinant(a):
    det = jacobian_determinant(affine_field(a, (0.7, -0.3)))
    expected = (1 + a[0][0]) * (1 + a[1][1]) - a[0][1] * a[1][0]  # det(I + A)
    assert torch.allclose(det, torch.full_like(det, expected), atol=1e-10)  # exact for a linear field, borders too


def test_jacobian_rejects_a_3d_field():
    with pytest.raises(ValueError, match="shape"):
        jacobian_determinant(torch.zeros(1, 3, 4, 4, 4))


def test_folding_percentage_of_smooth_and_folded_fields():
    assert folding_percentage(affine_field([[0.2, 0.1], [0.0, -0.3]], (0, 0))).item() == 0.0
    assert folding_percentage(affine_field([[-2.0, 0.0], [0.0, 0.0]], (0, 0))).item() == pytest.approx(100.0)

    # a local fold: u0 has slope -3 along axis 0 on rows 10..20 and is flat elsewhere (32 x 32)
    size = 32
    rows = torch.arange(size, dtype=torch.float64).clamp(10, 20) - 10
    ddf = torch.zeros(1, 2, size, size, dtype=torch.float64)
    ddf[0, 0] = (-3.0 * rows)[:, None]
    # central differences: rows 11..19 have du0/dy = -3, rows 10 and 20 have -1.5; all give det <= 0
    assert folding_percentage(ddf).item() == pytest.approx(100.0 * 11 / size)


def test_end_point_error_against_hand_computation():
    ddf = torch.zeros(1, 2, 2, 2)
    truth = torch.zeros(1, 2, 2, 2)
    ddf[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # error 5
    truth[0, :, 1, 1] = torch.tensor([1.0, -1.0])  # error sqrt(2)
    assert end_point_error(ddf, truth).item() == pytest.approx((5.0 + math.sqrt(2)) / 4)
    region = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert end_point_error(ddf, truth, region).item() == pytest.approx(5.0)
    region = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert end_point_error(ddf, truth, region).item() == pytest.approx(math.sqrt(2) / 3)


def test_metrics_aggregate_like_monai_cumulative_metrics():
    folding = FoldingMetric()
    fields = [affine_field([[-2.0, 0.0], [0.0, 0.0]], (0, 0)), affine_field([[0.1, 0.0], [0.0, 0.1]], (0, 0))]
    per_case = folding(torch.cat(fields), None)  # one batch of two cases
    assert per_case.shape == (2, 1)
    folding([fields[0][0]], [fields[0][0]])  # a decollated list, as handlers pass it (y is ignored)
    assert folding.aggregate().item() == pytest.approx((100.0 + 0.0 + 100.0) / 3)
    assert folding.aggregate(reduction="none").flatten().tolist() == pytest.approx([100.0, 0.0, 100.0])
    folding.reset()
    folding(fields[1], None)
    assert folding.aggregate().item() == 0.0

    epe = EndPointErrorMetric(get_not_nans=True)
    ones = torch.ones(1, 2, 4, 4)
    epe(ones, torch.zeros_like(ones))  # sqrt(2)
    epe(ones, ones * 3)  # |(-2, -2)| = 2 sqrt(2)
    epe(ones, torch.full_like(ones, float("nan")))  # unknown truth: NaN, ignored by the mean
    value, not_nans = epe.aggregate()
    assert value.item() == pytest.approx(1.5 * math.sqrt(2))
    assert not_nans.item() == 2


def test_output_transforms():
    pred = torch.rand(2, 4, 4)
    output = [{"pred": pred, "true_ddf": pred + 1}, {"pred": pred}]
    preds, truths = field_and_truth(output)
    assert torch.equal(truths[0], pred + 1) and torch.isnan(truths[1]).all()
    labels_map = torch.tensor([[0, 1, 2], [3, 2, 1], [0, 0, 3]])
    onehot = torch.nn.functional.one_hot(labels_map, 4).permute(2, 0, 1).float()  # (4, 3, 3)
    preds, labels = select_label(2)([{"warped_label": onehot, "label": onehot * 2}])
    assert preds[0].shape == (1, 3, 3)
    assert torch.equal(preds[0], onehot[2:3]) and torch.equal(labels[0], 2 * onehot[2:3])


def test_end_point_error_without_a_true_field_is_nan_not_zero():
    """File pairs have no true field: the aggregate EPE is NaN (console, metrics.csv), never 0 (issue 31)."""
    from ignite.engine import Engine
    from monai.handlers import IgniteMetricHandler

    ones = torch.ones(1, 2, 4, 4)
    epe = EndPointErrorMetric(get_not_nans=True)
    epe(ones, torch.full_like(ones, float("nan")))
    epe(ones, torch.full_like(ones, float("nan")))
    value, not_nans = epe.aggregate()
    assert math.isnan(value.item()) and not_nans.item() == 0

    def run(outputs: list[list[dict]]) -> float:
        engine = Engine(lambda e, batch: batch)
        IgniteMetricHandler(metric_fn=EndPointErrorMetric(), output_transform=field_and_truth).attach(engine, "val_epe")
        engine.run(outputs, max_epochs=1)
        return engine.state.metrics["val_epe"]

    pred = torch.ones(2, 4, 4)
    assert math.isnan(run([[{"pred": pred}, {"pred": pred}], [{"pred": pred}]]))  # no case has a true field
    # some cases have one: the mean over those (the phantom, every case known, is unchanged)
    mixed = run([[{"pred": pred, "true_ddf": torch.zeros_like(pred)}, {"pred": pred}]])
    assert mixed == pytest.approx(math.sqrt(2))


# ---- per-label Dice and one-hot through MONAI: the numbers of the hand-written versions they replaced ----------
def handwritten_dice_scores(pred: np.ndarray, target: np.ndarray) -> dict[int, float]:
    """The hand-written ``dice_scores`` (registration_io, before compute_dice), kept verbatim as the reference."""
    scores = {}
    for value in sorted((set(np.unique(pred).tolist()) | set(np.unique(target).tolist())) - {0}):
        a, b = pred == value, target == value
        denom = a.sum() + b.sum()
        scores[int(value)] = float(2.0 * np.logical_and(a, b).sum() / denom) if denom else 1.0
    return scores


def handwritten_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The hand-written ``evaluator.one_hot`` (torch.nn.functional.one_hot), kept verbatim as the reference."""
    return torch.nn.functional.one_hot(labels[:, 0].long().clamp_min(0), num_classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("seed", range(20))
def test_dice_scores_are_the_handwritten_numbers_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    shape = [(16, 16), (3, 12, 10), (1, 7, 9)][seed % 3]
    values = rng.choice([0, 1, 2, 3, 5, 200, -1], size=rng.integers(1, 6), replace=False)  # gaps, large, negative
    pred, target = rng.choice(values, size=shape), rng.choice(values, size=shape)
    if seed % 4 == 0:  # a label in one map only (scores 0), one in neither (left out)
        target[target == values[0]] = 0
    expected = handwritten_dice_scores(pred, target)
    got = dice_scores(pred, target)
    assert got == expected  # same labels, bit-identical floats
    assert all(isinstance(k, int) and isinstance(v, float) for k, v in got.items())


def test_dice_scores_of_absent_and_one_sided_labels():
    background = np.zeros((4, 4), dtype=np.int64)
    assert dice_scores(background, background) == handwritten_dice_scores(background, background) == {}
    one = background.copy()
    one[0, :2] = 3
    assert dice_scores(one, background) == dice_scores(background, one) == {3: 0.0}  # absent from one map: 0, not NaN
    assert dice_scores(one, one) == {3: 1.0}
    other = background.copy()
    other[0, 1:3] = 3
    assert dice_scores(one, other) == {3: 0.5}


@pytest.mark.parametrize("shape, num_classes", [((2, 1, 5, 6), 4), ((3, 1, 4, 4), 2)])
def test_one_hot_is_the_handwritten_one(shape, num_classes):
    labels = torch.randint(-1, num_classes, shape)  # negative values count as background
    assert torch.equal(one_hot(labels, num_classes), handwritten_one_hot(labels, num_classes))
    assert one_hot(labels, num_classes).dtype == torch.float32

