"""scripts/pool_seeds.py: pooling compare_methods.py outputs of several training seeds."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from conftest import load_repo_script

pool_seeds = load_repo_script("pool_seeds")

CASES = [f"slice{i}" for i in range(6)]


def write_run(folder, dice_by_method: dict[str, list[float]], cases: list[str] = CASES) -> str:
    """A compare_methods.py-like folder whose per_slice.csv has the given Dice per case (HD = 2 x Dice / 100)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "per_slice.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "case", "dice", "hd", "asd", "folding"])
        for method, dice in dice_by_method.items():
            for case, value in zip(cases, dice):
                writer.writerow([method, case, value, 2 * value / 100, 1.0, 0.0])
    return str(folder)


@pytest.fixture
def two_seeds(tmp_path):
    rng = np.random.default_rng(0)
    seed_runs = []
    for seed in range(2):
        vxm = rng.uniform(70, 90, len(CASES))
        adacs = vxm + rng.normal(0.5, 0.3, len(CASES))
        seed_runs.append({"VoxelMorph-MSE": vxm, "AdaCS": adacs})
    dirs = [write_run(tmp_path / f"seed{s}", {m: list(v) for m, v in r.items()}) for s, r in enumerate(seed_runs)]
    return dirs, seed_runs


def test_per_seed_and_pooled_means_and_tests_match_a_direct_computation(two_seeds):
    dirs, seed_runs = two_seeds
    pooled = pool_seeds.pool([pool_seeds.read_per_slice(d) for d in dirs], "VoxelMorph-MSE", "AdaCS")
    rows = {row["method"]: row for row in pooled["table"]}
    for method in ("VoxelMorph-MSE", "AdaCS"):
        per_seed = [float(np.mean(r[method])) for r in seed_runs]
        assert rows[method]["per_seed_dice"] == pytest.approx(per_seed)
        assert rows[method]["dice_mean"] == pytest.approx(np.mean(per_seed))
        assert rows[method]["dice_seed_std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert rows[method]["hd_mean"] == pytest.approx(2 * np.mean(per_seed) / 100)

    for (diff, p, n), run in zip(pooled["tests"]["per_seed"], seed_runs):
        assert n == len(CASES)
        assert diff == pytest.approx(np.mean(run["AdaCS"] - run["VoxelMorph-MSE"]))
        assert p == pytest.approx(stats.ttest_rel(run["AdaCS"], run["VoxelMorph-MSE"]).pvalue)

    averaged = {m: np.mean([r[m] for r in seed_runs], axis=0) for m in ("AdaCS", "VoxelMorph-MSE")}
    diff, p, n = pooled["tests"]["seed_averaged"]
    assert n == len(CASES)  # each slice counted once, not once per seed
    assert diff == pytest.approx(np.mean(averaged["AdaCS"] - averaged["VoxelMorph-MSE"]))
    assert p == pytest.approx(stats.ttest_rel(averaged["AdaCS"], averaged["VoxelMorph-MSE"]).pvalue)


def test_a_slice_dropped_in_any_seed_is_left_out_of_the_seed_averaged_test(tmp_path):
    base = [80.0, 82.0, 75.0, 90.0, 70.0, 85.0]
    better = [v + d for v, d in zip(base, [1.0, 0.5, 2.0, 0.2, 1.5, 0.7])]
    dropped = [math.nan] + better[1:]
    dirs = [write_run(tmp_path / "a", {"VoxelMorph-MSE": base, "AdaCS": better}),
            write_run(tmp_path / "b", {"VoxelMorph-MSE": base, "AdaCS": dropped})]
    pooled = pool_seeds.pool([pool_seeds.read_per_slice(d) for d in dirs], "VoxelMorph-MSE", "AdaCS")
    assert pooled["tests"]["per_seed"][0][2] == 6
    assert pooled["tests"]["per_seed"][1][2] == 5
    assert pooled["tests"]["seed_averaged"][2] == 5
    adacs = {row["method"]: row for row in pooled["table"]}["AdaCS"]
    assert adacs["per_seed_dice"][1] == pytest.approx(np.mean(better[1:]))  # NaN = dropped, not zero


def test_the_command_prints_and_writes_the_markdown_table(two_seeds, tmp_path, capsys):
    dirs, _ = two_seeds
    out = tmp_path / "pooled.md"
    assert pool_seeds.main([*dirs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert "| AdaCS |" in printed and "| VoxelMorph-MSE |" in printed
    assert "per-slice Dice averaged over the runs" in printed


def test_a_folder_without_per_slice_csv_is_named_in_the_error(tmp_path, capsys):
    missing = tmp_path / "not_a_run"
    missing.mkdir()
    assert pool_seeds.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing / "per_slice.csv") in err and "not found" in err


def test_a_csv_missing_a_metric_column_is_named_in_the_error(tmp_path, capsys):
    folder = tmp_path / "old_run"
    folder.mkdir()
    (folder / "per_slice.csv").write_text("method,case,dice\nAdaCS,s0,80\n")
    assert pool_seeds.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert "per_slice.csv" in err and "'asd'" in err and "'hd'" in err


def test_three_seeds_add_a_test_of_the_per_seed_means_with_the_wins(tmp_path):
    base = [80.0, 82.0, 75.0, 90.0, 70.0, 85.0]
    gains = [0.4, 0.1, -0.2]  # the candidate wins two seeds of three
    jitter = [0.1, -0.1, 0.05, -0.05, 0.2, -0.2]  # mean 0: each seed's mean gain is exactly g
    dirs = [write_run(tmp_path / f"s{i}", {"VoxelMorph-MSE": base, "AdaCS": [v + g + j for v, j in zip(base, jitter)]})
            for i, g in enumerate(gains)]
    pooled = pool_seeds.pool([pool_seeds.read_per_slice(d) for d in dirs], "VoxelMorph-MSE", "AdaCS")
    diff, p, n, wins = pooled["tests"]["across_seeds"]
    assert (n, wins) == (3, 2)
    assert diff == pytest.approx(np.mean(gains))
    assert p == pytest.approx(stats.ttest_rel([np.mean(base) + g for g in gains], [np.mean(base)] * 3).pvalue)
    assert "ahead in 2, mean difference +0.10" in pool_seeds.to_markdown(pooled, dirs)


def test_two_seeds_report_no_test_across_seeds(two_seeds):
    dirs, _ = two_seeds
    pooled = pool_seeds.pool([pool_seeds.read_per_slice(d) for d in dirs], "VoxelMorph-MSE", "AdaCS")
    assert math.isnan(pooled["tests"]["across_seeds"][1])
    assert "Across the" not in pool_seeds.to_markdown(pooled, dirs)


def test_folds_put_the_slices_of_all_folds_together(tmp_path, capsys):
    rng = np.random.default_rng(1)
    dirs, vxm_all, adacs_all, fold_diffs = [], [], [], []
    for fold in range(3):
        cases = [f"patient{fold}_slice{i}" for i in range(4 + fold)]  # folds of unequal size
        vxm = rng.uniform(70, 90, len(cases))
        adacs = vxm + rng.normal(0.3, 0.5, len(cases))
        dirs.append(write_run(tmp_path / f"fold{fold}", {"VoxelMorph-MSE": list(vxm), "AdaCS": list(adacs)}, cases))
        vxm_all += list(vxm)
        adacs_all += list(adacs)
        fold_diffs.append(float((adacs - vxm).mean()))
    pooled = pool_seeds.pool([pool_seeds.read_per_slice(d) for d in dirs], "VoxelMorph-MSE", "AdaCS", folds=True)
    diff, p, n = pooled["tests"]["seed_averaged"]
    assert n == 4 + 5 + 6
    assert diff == pytest.approx(np.mean(adacs_all) - np.mean(vxm_all))
    assert p == pytest.approx(stats.ttest_rel(adacs_all, vxm_all).pvalue)
    adacs_row = next(e for e in pooled["table"] if e["method"] == "AdaCS")
    assert adacs_row["dice_all_slices"] == pytest.approx(np.mean(adacs_all))  # slice-weighted, not the mean of folds
    assert adacs_row["dice_all_slices"] != pytest.approx(adacs_row["dice_mean"], abs=1e-9)
    assert adacs_row["dice_all_slices_std"] == pytest.approx(np.std(adacs_all, ddof=1))  # over slices, as compare_methods.py
    mean, p_folds, n_folds, wins = pooled["tests"]["across_seeds"]
    assert n_folds == 3 and mean == pytest.approx(np.mean(fold_diffs))
    assert p_folds == pytest.approx(stats.ttest_1samp(fold_diffs, 0.0).pvalue)
    assert pool_seeds.main([*dirs, "--folds"]) == 0
    out = capsys.readouterr().out
    assert "Folds pooled: 3" in out and "all slices of all folds" in out and "across folds" in out


def test_folds_that_share_a_case_are_refused(two_seeds, capsys):
    dirs, _ = two_seeds  # two seeds on the same test slices are not folds
    assert pool_seeds.main([*dirs, "--folds"]) == 2
    assert "in more than one fold" in capsys.readouterr().err


def test_tiny_p_values_print_as_below_0_001_and_fold_rows_are_named_by_folder(tmp_path):
    rng = np.random.default_rng(2)
    dirs = []
    for fold in range(3):
        cases = [f"patient{fold}_slice{i}" for i in range(30)]
        vxm = rng.uniform(70, 90, len(cases))
        dirs.append(write_run(tmp_path / f"fold{fold}", {"VoxelMorph-MSE": list(vxm), "AdaCS": list(vxm + 3.0 + rng.normal(0, 0.1, 30))}, cases))
    pooled = pool_seeds.pool([pool_seeds.read_per_slice(d) for d in dirs], "VoxelMorph-MSE", "AdaCS", folds=True)
    assert pooled["tests"]["seed_averaged"][1] < 1e-3
    text = pool_seeds.to_markdown(pooled, dirs)
    assert "| all slices of all folds | +3.0" in text and "| < 0.001 | 90 |" in text
    assert "| fold0 |" in text and "| fold2 |" in text and "| run 1 |" not in text  # rows named by folder
    assert "0.000 |" not in text.split("| AdaCS - VoxelMorph-MSE")[1]  # no p-value printed as 0.000
    assert "Across the 3 folds" in text and "per-fold means p < 0.001" in text


def test_rows_are_named_by_the_folder_and_skip_a_run_without_the_candidate(tmp_path):
    base = [80.0, 82.0, 75.0, 90.0, 70.0, 85.0]
    jitter = [0.1, -0.1, 0.05, -0.05, 0.2, -0.2]  # mean 0: the mean differences are exactly +1 and -1
    dirs = [write_run(tmp_path / "a" / "table", {"VoxelMorph-MSE": base, "AdaCS": [v + 1 + j for v, j in zip(base, jitter)]}),
            write_run(tmp_path / "b" / "table", {"VoxelMorph-MSE": base}),
            write_run(tmp_path / "c" / "table", {"VoxelMorph-MSE": base, "AdaCS": [v - 1 + j for v, j in zip(base, jitter)]})]
    assert pool_seeds.short_names(dirs) == ["a/table", "b/table", "c/table"]
    text = pool_seeds.to_markdown(pool_seeds.pool([pool_seeds.read_per_slice(d) for d in dirs], "VoxelMorph-MSE", "AdaCS"), dirs)
    assert "| a/table | +1.00 |" in text and "| c/table | -1.00 |" in text and "| b/table |" not in text
