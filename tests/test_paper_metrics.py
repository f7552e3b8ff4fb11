"""bundle/scripts/paper_metrics.py: the paper's per-slice Dice / HD / ASD against hand computations (and medpy when
installed), the dropped-slice rule, the MONAI metric wrapper and the paired t-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.paper_metrics import (
    PaperMetric, asd_from_reference, dice, hausdorff, paired_ttest, paper_inputs, read_raw_csv, slice_metrics, write_ttest,
)


def _square(size: int, half: int, centre=(10, 10)) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[centre[0] - half : centre[0] + half + 1, centre[1] - half : centre[1] + half + 1] = True
    return mask


def test_two_points_directional_asd_by_hand():
    reference = np.zeros((5, 7), bool)
    reference[0, 0] = True
    prediction = reference.copy()
    prediction[0, 4] = True
    assert dice(prediction, reference) == pytest.approx(2 * 1 / (2 + 1))
    assert hausdorff(prediction, reference) == pytest.approx(4.0)  # (0,4) is 4 px from the reference
    assert asd_from_reference(prediction, reference) == pytest.approx(0.0)  # the reference point lies on the prediction
    assert asd_from_reference(reference, prediction) == pytest.approx(2.0)  # the other direction: (0 + 4) / 2


def test_nested_squares_by_hand():
    reference, prediction = _square(21, 2), _square(21, 1)  # 5x5 and 3x3 squares, same centre
    # reference surface: 16 pixels of the Chebyshev ring 2; 4 corners are sqrt(2) from the ring-1 surface, 12 are 1
    assert asd_from_reference(prediction, reference) == pytest.approx((4 * math.sqrt(2) + 12) / 16)
    assert hausdorff(prediction, reference) == pytest.approx(math.sqrt(2))
    assert dice(prediction, reference) == pytest.approx(2 * 9 / (25 + 9))
    metrics = slice_metrics(prediction, reference)
    assert metrics["dice"] == pytest.approx(100 * 18 / 34)
    assert math.isnan(metrics["folding"])  # no field given


def test_empty_mask_drops_every_metric():
    empty = np.zeros((8, 8), bool)
    for metrics in (slice_metrics(empty, _square(21, 2)), slice_metrics(_square(21, 2), empty)):
        assert all(math.isnan(v) for v in metrics.values())


def test_agrees_with_medpy_when_installed():
    binary = pytest.importorskip("medpy.metric.binary")
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for _ in range(10):
        a = ndimage.binary_dilation(rng.random((40, 40)) > 0.97, iterations=2)
        b = ndimage.binary_dilation(rng.random((40, 40)) > 0.97, iterations=2)
        assert dice(a, b) == pytest.approx(binary.dc(a, b))
        assert hausdorff(a, b) == pytest.approx(binary.hd(a, b))
        assert asd_from_reference(a, b) == pytest.approx(binary.asd(b, a))  # medpy called with the ground truth first


def test_folding_counts_flipped_pixels():
    ddf = torch.zeros(2, 16, 16)
    ddf[0, 8:, :] = -3.0  # rows from 8 on pulled back 3 px: the mapping x -> x + u folds at the step
    metrics = slice_metrics(_square(16, 2, (8, 8)), _square(16, 2, (8, 8)), ddf)
    assert metrics["folding"] > 0
    assert slice_metrics(_square(16, 2, (8, 8)), _square(16, 2, (8, 8)), torch.zeros(2, 16, 16))["folding"] == 0


def test_paper_metric_wrapper_reduces_over_valid_cases_only():
    reference, prediction = _square(21, 2), _square(21, 1)
    outputs = []
    for pred in (prediction, np.zeros_like(prediction)):  # the second case is dropped (empty prediction)
        warped = torch.stack([torch.as_tensor(~pred), torch.as_tensor(pred)]).float()
        label = torch.stack([torch.as_tensor(~reference), torch.as_tensor(reference)]).float()
        outputs.append({"warped_label": warped, "label": label, "pred": torch.zeros(2, 21, 21)})
    metric = PaperMetric("dice")
    metric(*paper_inputs(outputs))
    buffer = metric.get_buffer()
    assert buffer.shape == (2, 1) and math.isnan(float(buffer[1, 0]))
    assert float(metric.aggregate()) == pytest.approx(100 * 18 / 34)
    with pytest.raises(ValueError):
        PaperMetric("hd95")


def test_paired_ttest_matches_scipy_and_skips_nan(tmp_path):
    from scipy import stats

    a = [80.0, 82.0, 79.0, 85.0, math.nan, 81.0]
    b = [78.0, 81.5, 79.5, 80.0, 70.0, 80.0]
    result = paired_ttest(a, b)
    expected = stats.ttest_rel([80, 82, 79, 85, 81], [78, 81.5, 79.5, 80, 80])
    assert result["n"] == 5 and result["p"] == pytest.approx(expected.pvalue)
    for name, values in (("run", a), ("base", b)):
        lines = ["filename,class0,mean"] + [f"case{i},{v},{v}" for i, v in enumerate(values)]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    assert read_raw_csv(str(tmp_path / "run.csv"))["case1"] == 82.0
    written = write_ttest(str(tmp_path / "run.csv"), str(tmp_path / "base.csv"), str(tmp_path / "t.json"))
    assert written["p"] == pytest.approx(expected.pvalue)
    assert (tmp_path / "t.json").is_file()
