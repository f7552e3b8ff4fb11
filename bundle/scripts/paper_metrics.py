"""The paper's evaluation protocol (method doc §9): per-slice Dice, symmetric maximum Hausdorff distance and
one-directional average surface distance in pixels, with medpy 0.4 semantics (no medpy dependency), plus folding.

* surface of a binary mask = the mask minus its erosion by the cross-shaped (connectivity 1) structuring element
  (``scipy.ndimage.binary_erosion``, border value 0), as medpy's ``__surface_distances``;
* ``hd`` = max of the two directed maximum surface distances (symmetric, **not** HD95);
* ``asd_from_reference`` = mean distance from each surface pixel of the ground truth to the nearest surface pixel of
  the prediction (medpy ``asd(gt, pred)``: the reference code passes the ground truth first);
* a slice where either mask is empty (medpy raises) is **dropped from every metric** (NaN here; MONAI's
  reductions and :class:`~monai.handlers.MetricsSaver` summaries skip NaN).

:class:`PaperMetric` plugs into ``IgniteMetricHandler`` with :func:`paper_inputs` as output transform
(``configs/evaluate_paper.yaml``); :func:`slice_metrics` is the plain per-slice function used by
``scripts/compare_methods.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from .metrics import _PerCaseMetric, folding_percentage

PAPER_METRICS = ("dice", "hd", "asd", "folding")


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask (mask XOR its connectivity-1 erosion), as medpy."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def directed_surface_distances(source: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distance of every surface pixel of ``source`` to the surface of ``target`` (pixels unless ``spacing``).

    Raises ``ValueError`` when either mask is empty (medpy raises ``RuntimeError``)."""
    source, target = np.asarray(source, dtype=bool), np.asarray(target, dtype=bool)
    if not source.any() or not target.any():
        raise ValueError("empty mask: surface distances are undefined")
    distance = ndimage.distance_transform_edt(~surface(target), sampling=spacing)
    return distance[surface(source)]


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); 0 when both are empty (medpy)."""
    prediction, reference = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    total = prediction.sum() + reference.sum()
    return float(2.0 * np.logical_and(prediction, reference).sum() / total) if total else 0.0


def hausdorff(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric maximum Hausdorff distance (medpy ``hd``)."""
    return float(max(directed_surface_distances(prediction, reference, spacing).max(),
                     directed_surface_distances(reference, prediction, spacing).max()))


def asd_from_reference(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Mean distance from the reference (ground truth) surface to the prediction surface (medpy ``asd(gt, pred)``)."""
    return float(directed_surface_distances(reference, prediction, spacing).mean())


def slice_metrics(prediction: np.ndarray, reference: np.ndarray, ddf: np.ndarray | torch.Tensor | None = None) -> dict[str, float]:
    """Dice (x100), HD, ASD (pixels) and folding % of one 2D slice; all NaN when either mask is empty."""
    prediction, reference = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    if not prediction.any() or not reference.any():
        return {name: math.nan for name in PAPER_METRICS}
    folding = math.nan
    if ddf is not None:
        folding = float(folding_percentage(torch.as_tensor(ddf, dtype=torch.float32)[None])[0, 0])
    return {
        "dice": 100.0 * dice(prediction, reference),
        "hd": hausdorff(prediction, reference),
        "asd": asd_from_reference(prediction, reference),
        "folding": folding,
    }


class PaperMetric(_PerCaseMetric):
    """One of the paper's per-slice metrics (``dice`` x100, ``hd``, ``asd``, ``folding``), NaN for dropped slices.

    Call as ``metric(y_pred, y)`` with ``y_pred`` = (B, 3, H, W): warped foreground mask, then the field (2
    channels), and ``y`` = (B, 1, H, W) the fixed foreground mask (see :func:`paper_inputs`).
    """

    def __init__(self, name: str, **kwargs) -> None:
        if name not in PAPER_METRICS:
            raise ValueError(f"metric must be one of {PAPER_METRICS}, got {name!r}.")
        super().__init__(**kwargs)
        self.name = name

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        values = []
        for pred, ref in zip(y_pred, y):
            masks = pred[0].detach().cpu().numpy() > 0.5, ref[0].detach().cpu().numpy() > 0.5
            values.append(slice_metrics(*masks, ddf=pred[1:3].detach().cpu())[self.name])
        return torch.tensor(values, dtype=torch.float32).unsqueeze(1)


def paper_inputs(output: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``output_transform`` for :class:`PaperMetric` from ``RegistrationEvaluator`` output run with
    ``labels_to_keep=[label]``: (warped foreground + field, fixed foreground) per case."""
    preds = [torch.cat([item["warped_label"][1:2], item["pred"]], dim=0) for item in output]
    labels = [item["label"][1:2] for item in output]
    return preds, labels


def read_raw_csv(path: str) -> dict[str, float]:
    """``filename -> value`` of a MetricsSaver ``<metric>_raw.csv`` (first metric column)."""
    import csv

    with open(path) as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0][0] != "filename":
        raise ValueError(f"{path}: not a MetricsSaver raw CSV (no 'filename' header).")
    return {row[0]: float(row[1]) for row in rows[1:] if row}


def paired_ttest(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """Paired t-test (``scipy.stats.ttest_rel``) over the cases valid in both (NaN = dropped slice)."""
    from scipy import stats

    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    valid = np.isfinite(a) & np.isfinite(b)
    if valid.sum() < 2:
        return {"n": int(valid.sum()), "t": math.nan, "p": math.nan, "mean_difference": math.nan}
    result = stats.ttest_rel(a[valid], b[valid])
    return {"n": int(valid.sum()), "t": float(result.statistic), "p": float(result.pvalue),
            "mean_difference": float((a[valid] - b[valid]).mean())}


def write_ttest(csv_path: str, baseline_csv: str, out_path: str) -> dict[str, float]:
    """Paired t-test of two runs' per-slice Dice CSVs matched by file name; written as JSON and returned."""
    import json

    ours, base = read_raw_csv(csv_path), read_raw_csv(baseline_csv)
    common = sorted(set(ours) & set(base))
    if not common:
        raise ValueError(f"{csv_path} and {baseline_csv} share no case.")
    result = {**paired_ttest([ours[k] for k in common], [base[k] for k in common]), "run": csv_path, "baseline": baseline_csv}
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)
    return result
