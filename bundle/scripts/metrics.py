"""Registration metrics MONAI does not have: folding (Jacobian determinant <= 0) and end-point error.

Both are ``CumulativeIterationMetric`` subclasses, so ``monai.handlers.IgniteMetricHandler`` turns them into
Ignite metrics (with per-case details for ``MetricsSaver``) exactly like MONAI's own metrics.
Dice, Hausdorff and surface distances come from MONAI (``DiceMetric``, ``HausdorffDistanceMetric``,
``SurfaceDistanceMetric``; :func:`dice_scores`, the per-label Dice of two label maps, is ``compute_dice``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric, compute_dice
from monai.metrics.utils import do_metric_reduction
from monai.networks import one_hot
from monai.utils import CommonKeys as Keys
from monai.utils import MetricReduction

from .evaluator import RegistrationKeys


def dice_scores(pred: np.ndarray, target: np.ndarray) -> dict[int, float]:
    """Dice per foreground label value present in either integer label map (``monai.metrics.compute_dice``).

    A label present in one map only scores 0; labels absent from both are left out (never NaN, never 1). The
    values are renumbered onto channels 1..n first (memory bounded by the labels present, not the largest value),
    and the one-hot maps are float64, so each score is exactly ``2 |A & B| / (|A| + |B|)`` in double precision.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    values = np.union1d(np.unique(pred), np.unique(target))
    foreground = values[values != 0]
    if foreground.size == 0:
        return {}
    channels = np.concatenate([[0], foreground])  # channel 0: background (0), channel i: foreground[i - 1]
    order = np.argsort(channels, kind="stable")

    def channel_map(labels: np.ndarray) -> torch.Tensor:
        index = order[np.searchsorted(channels, labels, sorter=order)]
        return one_hot(torch.as_tensor(index)[None, None], len(channels), dtype=torch.float64)

    scores = compute_dice(channel_map(pred), channel_map(target), include_background=False, ignore_empty=False)
    return {int(value): float(score) for value, score in zip(foreground, scores[0])}


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of displacement fields ``(B, 2, H, W)`` (pixels), central differences, ``(B, 1, H, W)``.

    Same finite differences as VoxelMorph's ``jacobian_determinant`` (``np.gradient``: central inside,
    one-sided at the border).
    """
    if ddf.ndim != 4 or ddf.shape[1] != 2:
        raise ValueError(f"expected a 2D displacement field of shape (B, 2, H, W), got {tuple(ddf.shape)}.")
    d0 = torch.gradient(ddf[:, 0], dim=(1, 2))  # d u0 / d axis0, d u0 / d axis1
    d1 = torch.gradient(ddf[:, 1], dim=(1, 2))
    det = (1.0 + d0[0]) * (1.0 + d1[1]) - d0[1] * d1[0]
    return det.unsqueeze(1)


def folding_percentage(ddf: torch.Tensor) -> torch.Tensor:
    """Per-case percentage of pixels with det(J) <= 0, shape ``(B, 1)``."""
    det = jacobian_determinant(ddf)
    return (det <= 0).float().flatten(1).mean(1, keepdim=True) * 100.0


def end_point_error(ddf: torch.Tensor, true_ddf: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Per-case mean Euclidean error ``|ddf - true_ddf|`` (pixels), over ``region`` if given, ``(B, 1)``."""
    error = torch.linalg.vector_norm(ddf - true_ddf, dim=1, keepdim=True)
    if region is None:
        return error.flatten(1).mean(1, keepdim=True)
    region = region.to(error.dtype)
    return (error * region).flatten(1).sum(1, keepdim=True) / region.flatten(1).sum(1, keepdim=True).clamp_min(1.0)


class _PerCaseMetric(CumulativeIterationMetric):
    """Buffers one value per case and reduces like MONAI's metrics, except that "no value" is NaN, not 0."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        if isinstance(not_nans, torch.Tensor) and isinstance(f, torch.Tensor):
            # MONAI reduces "no case has a value" (e.g. no true field: file pairs) to 0; a metric that cannot be
            # computed is NaN, never 0 (the mean is over the cases that have a value)
            f = torch.where(not_nans > 0, f, torch.full_like(f, float("nan")))
        return (f, not_nans) if self.get_not_nans else f


class FoldingMetric(_PerCaseMetric):
    """% of pixels whose Jacobian determinant is <= 0. Call as ``metric(ddf, anything)``; ``y`` is ignored.

    Ours: MONAI has no Jacobian-determinant metric of a displacement field (its ``BendingEnergyLoss`` /
    ``DiffusionLoss`` are smoothness losses, not folding counts).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: Any = None) -> torch.Tensor:  # type: ignore[override]
        return folding_percentage(y_pred)


class EndPointErrorMetric(_PerCaseMetric):
    """Mean end-point error (pixels) over the whole image against the true field: ``metric(ddf, true_ddf)``.

    Ours: MONAI has no end-point error (``RMSEMetric`` is the root of the mean squared component error, not the mean
    vector norm).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return end_point_error(y_pred, y)


def field_and_truth(output: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``output_transform`` for :class:`EndPointErrorMetric`: (predicted fields, true fields; NaN if unknown)."""
    preds = [item[Keys.PRED] for item in output]
    truths = [item.get(RegistrationKeys.TRUE_DDF, torch.full_like(item[Keys.PRED], float("nan"))) for item in output]
    return preds, truths


def select_label(index: int, pred_key: str = RegistrationKeys.WARPED_LABEL, label_key: str = Keys.LABEL) -> Callable:
    """``output_transform`` giving one label channel of one-hot predictions and labels (per-label Dice)."""

    def _transform(output: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        preds = [item[pred_key][index : index + 1] for item in output]
        labels = [item[label_key][index : index + 1] for item in output]
        return preds, labels

    return _transform
