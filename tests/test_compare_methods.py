"""scripts/compare_methods.py on a tiny synthetic prepared dataset: the table, per-slice rows, t-test, figures and
the Elastix field convention."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_repo_script, ring_label, write_ring_pairs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOLS = str(REPO / "scripts")
if TOOLS not in sys.path:  # as running a tool does: its helpers (_bundle.py, _prep_common.py) import from there
    sys.path.append(TOOLS)


_load = load_repo_script


compare = _load("compare_methods")


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Six pairs, the ES ring shifted by a few pixels; one pair without myocardium in ES (dropped)."""
    return write_ring_pairs(tmp_path / "prepared", ["testing"] * 6, empty_es=(5,))


def _networks(tmp_path: Path) -> tuple[str, str, str]:
    from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet, _head

    torch.manual_seed(0)
    paths = []
    for name, net in (("vxm", DiffeomorphicVoxelMorph(int_steps=7, int_downsize=2, bidirectional=True)),
                      ("adacs", DiffeomorphicVoxelMorph(int_steps=7, int_downsize=2, bidirectional=True)),
                      ("score", ScoringNet())):
        if name == "adacs":  # a visibly different field, so the two networks differ
            torch.nn.init.normal_(_head(net.unet).weight, std=1e-2)
        path = tmp_path / f"{name}.pt"
        torch.save(net.state_dict(), path)
        paths.append(str(path))
    return tuple(paths)


def test_table_rows_ttest_and_figures(dataset: Path, tmp_path: Path):
    vxm, adacs, score = _networks(tmp_path)
    out = tmp_path / "cmp"
    code = compare.main(["--dataset-dir", str(dataset), "--out", str(out), "--no-elastix", "--image-size", "32",
                         "--vxm", vxm, "--adacs", adacs, "--adacs-scoring", score,
                         "--vxm-train-time", "1 min", "--adacs-train-time", "2 min"])
    assert code == 0
    with (out / "results.csv").open() as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(table) == ["Undeformed", "VoxelMorph-MSE", "AdaCS"]
    with (out / "per_slice.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    undeformed = [r for r in rows if r["method"] == "Undeformed"]
    assert len(undeformed) == 6
    # undeformed Dice of pair 0 by hand: ED and ES myocardium compared directly
    ed, es = ring_label(32, (16, 16), 6) == 2, ring_label(32, (16, 15), 5) == 2
    expected = 100 * 2 * (ed & es).sum() / (ed.sum() + es.sum())
    assert float(undeformed[0]["dice"]) == pytest.approx(expected, rel=1e-5)
    assert math.isnan(float(undeformed[5]["dice"]))  # empty ES myocardium: dropped
    assert table["Undeformed"]["n_slices"] == "5" and table["Undeformed"]["dropped_slices"] == "1"
    dices = [float(r["dice"]) for r in undeformed[:5]]
    assert float(table["Undeformed"]["dice_mean"]) == pytest.approx(np.mean(dices), rel=1e-6)
    assert float(table["Undeformed"]["dice_std"]) == pytest.approx(np.std(dices, ddof=1), rel=1e-6)
    assert table["AdaCS"]["training_time"] == "2 min"
    assert "p_vs_VoxelMorph-MSE" in table["AdaCS"]
    markdown = (out / "results.md").read_text()
    assert "| AdaCS |" in markdown and "Elastix" not in markdown
    if importlib.util.find_spec("matplotlib"):
        assert (out / "dice_distribution.png").stat().st_size > 0
        assert (out / "examples.png").stat().st_size > 0


def test_extra_models_get_rows_and_p_values(dataset: Path, tmp_path: Path, capsys):
    vxm, adacs, _ = _networks(tmp_path)
    out = tmp_path / "cmp"
    code = compare.main(["--dataset-dir", str(dataset), "--out", str(out), "--no-elastix", "--image-size", "32",
                         "--no-figures", "--vxm", vxm, "--model", f"control={adacs}", "--model", f"same={vxm}"])
    assert code == 0
    with (out / "results.csv").open() as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(table) == ["Undeformed", "VoxelMorph-MSE", "control", "same"]
    assert 0.0 <= float(table["control"]["p_vs_VoxelMorph-MSE"]) < 1.0
    assert table["same"]["dice_mean"] == table["VoxelMorph-MSE"]["dice_mean"]  # the same network, the same row
    assert table["control"]["dice_mean"] != table["VoxelMorph-MSE"]["dice_mean"]
    for bad, message in ((f"AdaCS={adacs}", "already a row"), ("control", "NAME=PATH"),
                         (f"x={tmp_path / 'missing.pt'}", "is not a file")):
        assert compare.main(["--dataset-dir", str(dataset), "--out", str(out), "--model", bad]) == 2
        assert message in capsys.readouterr().err


def test_summarise_ttest_uses_common_valid_slices():
    from scipy import stats

    rows = []
    for method, values in (("VoxelMorph-MSE", [70, 72, 75, math.nan, 71]), ("AdaCS", [72, 73, 78, 80, math.nan])):
        for i, v in enumerate(values):
            rows.append({"method": method, "case": f"c{i}", "patient": "p", "dice": v, "hd": 1.0, "asd": 1.0, "folding": 0.0, "seconds": 0.1})
    table = {e["method"]: e for e in compare.summarise(rows, {})}
    assert table["AdaCS"]["p_vs_VoxelMorph-MSE"] == pytest.approx(stats.ttest_rel([72, 73, 78], [70, 72, 75]).pvalue)
    assert table["AdaCS"]["n_paired"] == 3
    assert table["VoxelMorph-MSE"]["n_slices"] == 4


def test_elastix_field_is_in_the_bundle_convention():
    itk = pytest.importorskip("itk")
    if not hasattr(itk, "elastix_registration_method"):
        pytest.skip("itk-elastix is not installed")
    from scripts.evaluator import warp_labels

    moving = ring_label(48, (24, 24), 8).astype(np.float32)
    fixed = ring_label(48, (27, 22), 8).astype(np.float32)  # shifted +3 rows, -2 columns
    ddf = compare.elastix_ddf(moving / 3, fixed / 3)
    assert ddf.shape == (2, 48, 48)
    inside = fixed == 3
    # pull convention: the fixed cavity samples the moving image 3 rows up and 2 columns right
    assert np.median(ddf[0][inside]) == pytest.approx(-3, abs=0.7)
    assert np.median(ddf[1][inside]) == pytest.approx(2, abs=0.7)
    warped = warp_labels(torch.as_tensor(moving == 2).long()[None, None], torch.as_tensor(ddf)[None], 2, "binary_bilinear")
    before = 2 * ((moving == 2) & (fixed == 2)).sum() / ((moving == 2).sum() + (fixed == 2).sum())
    after = 2 * (warped[0, 1].numpy().astype(bool) & (fixed == 2)).sum() / (warped[0, 1].sum().item() + (fixed == 2).sum())
    assert after > before + 0.2


def test_load_network_reads_a_training_checkpoint_as_the_flat_state_dict(tmp_path: Path):
    """``checkpoint_final.pt`` (the paper evaluates final weights) loads the same network as its flat state dict."""
    vxm, _, score = _networks(tmp_path)
    flat_d, flat_s = torch.load(vxm, weights_only=True), torch.load(score, weights_only=True)
    checkpoint = tmp_path / "checkpoint_final.pt"
    torch.save({"displacement_network": flat_d, "scoring_network": flat_s, "trainer": {"epoch": 3}}, checkpoint)
    for scoring, flat_path in ((False, vxm), (True, score)):
        from_checkpoint = compare.load_network(checkpoint, scoring=scoring).state_dict()
        from_flat = compare.load_network(flat_path, scoring=scoring).state_dict()
        assert from_checkpoint.keys() == from_flat.keys()
        assert all(torch.equal(from_checkpoint[k], from_flat[k]) for k in from_flat)
    torch.save({"trainer": {"epoch": 3}}, checkpoint)
    with pytest.raises(RuntimeError):  # a checkpoint without the entry is not silently half-loaded
        compare.load_network(checkpoint)


def test_score_by_label_averages_the_score_inside_each_fixed_label():
    """With the identity as 'scoring network', S is the fixed image: the table is its mean per label, by hand."""
    fixed = torch.zeros(1, 8, 8)
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    fixed[0, :4] = 0.2
    fixed[0, 4:] = 0.6
    label[0, 4:, :4] = 2  # 16 pixels at 0.6, the other 48 (16 at 0.6, 32 at 0.2) outside
    other = {"fixed": torch.full((1, 8, 8), 0.5), "fixed_label": torch.zeros(1, 8, 8, dtype=torch.long)}
    table = compare.score_by_label([{"fixed": fixed, "fixed_label": label}, other], torch.nn.Identity())
    rows = {r["label"]: r for r in table}
    assert set(rows) == {0, 2}
    assert rows[2]["pairs"] == 1 and rows[2]["score_mean"] == pytest.approx(0.6)
    outside = (16 * 0.6 + 32 * 0.2) / 48
    assert rows[0]["pairs"] == 2
    assert rows[0]["score_mean"] == pytest.approx((outside + 0.5) / 2)
    assert rows[0]["score_std"] == pytest.approx(np.std([outside, 0.5], ddof=1))
    assert rows[0]["score_pixel_mean"] == pytest.approx((48 * outside + 64 * 0.5) / 112)


def test_scoring_network_writes_the_score_table(dataset: Path, tmp_path: Path):
    vxm, _, score = _networks(tmp_path)
    out = tmp_path / "cmp"
    assert compare.main(["--dataset-dir", str(dataset), "--out", str(out), "--no-elastix", "--image-size", "32",
                         "--vxm", vxm, "--adacs-scoring", score, "--no-figures"]) == 0
    with (out / "scores.csv").open() as handle:
        rows = {int(r["label"]): r for r in csv.DictReader(handle)}
    assert 0 in rows and 2 in rows and rows[0]["pairs"] == "6"
    assert all(0.0 < float(r["score_mean"]) < 1.0 for r in rows.values())  # a sigmoid output
    assert "| 2 | " in (out / "scores.md").read_text()
    assert not (out / "examples.png").exists()


def test_score_headroom_reaches_the_score_table(dataset: Path, tmp_path: Path):
    """--score-headroom builds the scoring network with the headroom it was trained with: S scales by 1 + h."""
    vxm, _, score = _networks(tmp_path)
    means = {}
    for headroom in (0.0, 0.5):
        out = tmp_path / f"cmp_{headroom}"
        assert compare.main(["--dataset-dir", str(dataset), "--out", str(out), "--no-elastix", "--image-size", "32",
                             "--vxm", vxm, "--adacs-scoring", score, "--score-headroom", str(headroom),
                             "--no-figures"]) == 0
        with (out / "scores.csv").open() as handle:
            means[headroom] = {int(r["label"]): float(r["score_mean"]) for r in csv.DictReader(handle)}
    for label, mean in means[0.0].items():
        assert means[0.5][label] == pytest.approx(1.5 * mean, rel=1e-4)


def test_refinement_rows_and_their_paired_tests(dataset: Path, tmp_path: Path, capsys):
    """Issue 29: --refine-steps adds plain and score-weighted rows of the refined network, and refinement.md."""
    _, adacs, score = _networks(tmp_path)
    out = tmp_path / "cmp"
    code = compare.main(["--dataset-dir", str(dataset), "--out", str(out), "--no-elastix", "--image-size", "32",
                         "--no-figures", "--adacs", adacs, "--adacs-scoring", score, "--refine-steps", "0", "3"])
    assert code == 0
    with (out / "results.csv").open() as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(table) == ["Undeformed", "AdaCS", "AdaCS + plain refinement (0)", "AdaCS + score-weighted refinement (0)",
                           "AdaCS + plain refinement (3)", "AdaCS + score-weighted refinement (3)"]
    for mode in ("plain", "score-weighted"):  # 0 steps: the network's field, the same row
        assert table[f"AdaCS + {mode} refinement (0)"]["dice_mean"] == table["AdaCS"]["dice_mean"]
    assert table["AdaCS + plain refinement (3)"]["dice_mean"] != table["AdaCS"]["dice_mean"]
    assert float(table["AdaCS"]["dice_all_labels_mean"]) > 0
    tests = (out / "refinement.md").read_text()
    assert "| 3 | score-weighted vs plain | dice |" in tests and "| 3 | plain vs network alone | dice_all_labels |" in tests
    assert compare.main(["--dataset-dir", str(dataset), "--out", str(out), "--adacs", adacs,
                         "--refine-steps", "3"]) == 2
    assert "needs --refine-scoring" in capsys.readouterr().err
