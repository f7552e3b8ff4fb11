"""Quick runs of scripts/strain_phantom_eval.py (--quick) and scripts/benchmark_strain.py (a tiny cine): output
structure and internal consistency (no timed assertions)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_repo_script

TOOLS = str(Path(__file__).resolve().parents[1] / "scripts")
if TOOLS not in sys.path:  # as running a tool does: its helpers (_bundle.py, _prep_common.py) import from there
    sys.path.append(TOOLS)

phantom_eval = load_repo_script("strain_phantom_eval")
bench = load_repo_script("benchmark_strain")

TRACKING = ("direct", "sequential", "drift_corrected")


def _rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# =================================================================================================== phantom
@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("phantom_eval")
    previous = torch.get_num_threads()
    try:
        assert phantom_eval.main(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def test_phantom_outputs(phantom_run: Path) -> None:
    for name in ("phantom_strain.md", "global.csv", "segments.csv", "epe.csv", "cines.csv", "summary.json"):
        assert (phantom_run / name).is_file(), name
    assert len(list((phantom_run / "cache").glob("*.json"))) == 2
    text = (phantom_run / "phantom_strain.md").read_text()
    for heading in ("Global Green strain (%)", "Global Green strain error", "Per AHA segment",
                    "End-point error per frame", "Drift, labels at ES"):
        assert heading in text
    cases = {r["case"] for r in _rows(phantom_run / "global.csv")}
    assert cases == {"phantom_cine_s0_200000", "phantom_cine_s0_200001"}
    assert len(_rows(phantom_run / "epe.csv")) == 2 * 8
    segments = {int(r["segment"]) for r in _rows(phantom_run / "segments.csv")}
    assert segments == set(range(7, 13))  # one slice: the mid level


def test_analysis_of_the_true_field_is_accurate_and_network_errors_finite(phantom_run: Path) -> None:
    summary = json.loads((phantom_run / "summary.json").read_text())["cine"]
    rows = {r["comparison"]: r for r in summary["global_errors"]}
    analysed = [r for r in summary["global_errors"] if r["reference"] == "analytic" and r["method"] in
                phantom_eval.ANALYSIS_METHODS]
    assert len(analysed) == len(phantom_eval.ANALYSIS_METHODS)
    for row in analysed:  # the exact field through the bundle's analysis: within a fraction of a percentage point
        for key in phantom_eval.SHOWN:
            assert row[f"{key}_es"]["mae"] < 1.5 and row[f"{key}_peak"]["mae"] < 1.5, (row["comparison"], key)
    analysis = summary["segment_errors"]["analysis: true U (wall_normal) - analytic"]
    assert all(v < 2.0 for key in phantom_eval.SHOWN for v in analysis[key].values())
    for mode in TRACKING:
        for key in phantom_eval.COMPONENTS:
            for point in ("es", "peak"):
                s = rows[f"registration: network {mode} - true U"][f"{key}_{point}"]
                assert s["n"] == 2 and all(math.isfinite(s[k]) for k in ("mean", "sd", "mae"))
        epe = summary["epe_mean_per_frame"][mode]
        assert len(epe) == 8 and epe[0] == 0.0 and all(math.isfinite(e) and e >= 0 for e in epe)


def test_analytic_rows_are_the_phantoms_true_strain(phantom_run: Path) -> None:
    from scripts.phantom import cardiac_phantom_cine, true_strain

    cine = cardiac_phantom_cine(200000, 0, 64, 8, "cine")
    es = int(cine["es_index"])
    row = next(r for r in _rows(phantom_run / "global.csv")
               if r["case"] == "phantom_cine_s0_200000" and r["method"] == "analytic")
    truth = true_strain(cine, es)
    for key in phantom_eval.COMPONENTS:
        assert float(row[f"{key}_es"]) == pytest.approx(truth[f"global_{key}"], abs=1e-6)


def test_reported_errors_are_the_differences_of_the_reported_values(phantom_run: Path) -> None:
    rows = _rows(phantom_run / "global.csv")
    summary = json.loads((phantom_run / "summary.json").read_text())["cine"]
    errors = {r["comparison"]: r for r in summary["global_errors"]}
    for label, method, reference in phantom_eval.comparisons(TRACKING):
        for key in phantom_eval.SHOWN:
            diffs = []
            for case in sorted({r["case"] for r in rows}):
                value = {r["method"]: float(r[f"{key}_es"]) for r in rows if r["case"] == case}
                diffs.append(100 * (value[method] - value[reference]))
            assert errors[label][f"{key}_es"]["mean"] == pytest.approx(np.mean(diffs), abs=1e-3)
            assert errors[label][f"{key}_es"]["mae"] == pytest.approx(np.mean(np.abs(diffs)), abs=1e-3)


def test_rerun_reads_the_cache(phantom_run: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    before = (phantom_run / "summary.json").read_text()
    previous = torch.get_num_threads()
    try:
        assert phantom_eval.main(["--quick", "--out", str(phantom_run)]) == 0
    finally:
        torch.set_num_threads(previous)
    assert "0 cines computed, 2 from the cache" in capsys.readouterr().out
    assert (phantom_run / "summary.json").read_text() == before


# ================================================================================================= benchmark
def test_built_cine_is_acdc_shaped_with_rv_and_myocardium_on_every_slice(tmp_path: Path) -> None:
    from scripts.myocardium import sax_segments
    from scripts.strain_io import collect_cases, load_case

    info = bench.build_cine(tmp_path, (48, 56), slices=3, frames=3, phantom_size=32)
    assert info["shape_xyzt"] == [48, 56, 3, 3] and info["slices_with_myo_and_rv"] == 3
    case = load_case(collect_cases(str(tmp_path))[0])
    assert case.frames.shape == (3, 3, 48, 56) and case.spacing == (1.5, 1.5)
    result = sax_segments(case.ed_labels, case.spacing, {"rv": 1, "myo": 2, "lv": 3})
    assert result.levels == ["basal", "mid", "apical"]
    assert not [n for n in result.notes if "RV contact" in n or "ambiguous" in n], result.notes


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    out = tmp_path_factory.mktemp("bench")
    previous = torch.get_num_threads()
    try:
        assert bench.main(["--out", str(out), "--slices", "2", "--frames", "4", "--shape", "64", "80",
                           "--phantom-size", "32", "--repeats", "1", "--cli-repeats", "0", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(previous)
    assert "end to end, direct figures" in (out / "benchmark_strain.md").read_text()
    return json.loads((out / "benchmark_strain.json").read_text())


def test_benchmark_json_structure(bench_result: dict) -> None:
    r = bench_result
    assert {"config", "environment", "case", "pairs", "end_to_end", "bare", "ratios", "stages", "raw_seconds"} <= set(r)
    assert r["pairs"] == {"direct": 3 * 2, "drift_corrected": 2 * 3 * 2, "all_frames": 4 * 2}
    assert r["case"]["shape_xyzt"] == [64, 80, 2, 4] and r["case"]["slices_with_myo_and_rv"] == 2
    assert r["environment"]["torch_threads"] == 1 and len(r["environment"]["load_start"]) == 3
    assert set(r["end_to_end"]) == {f"{t}_{f}" for t in bench.TRACKING for f in ("figures", "no_figures")}
    assert set(r["stages"]) == set(bench.TRACKING)
    assert all(len(v) == 1 and v[0] > 0 for v in r["raw_seconds"].values())


def test_benchmark_ratios_are_quotients_of_the_reported_times(bench_result: dict) -> None:
    r = bench_result
    for name, value in list(r["end_to_end"].items()) + list(r["bare"].items()):
        assert value["best_s"] == min(value["times_s"]) and value["median_s"] > 0 and value["cpu_s_of_best"] > 0
    for key, value in r["end_to_end"].items():
        tracking = key.rsplit("_figures", 1)[0].removesuffix("_no")
        same, frames = r["bare"][tracking]["best_s"], r["bare"]["all_frames"]["best_s"]
        assert r["ratios"][f"{key}_over_bare_same_pairs"] == pytest.approx(value["best_s"] / same)
        assert r["ratios"][f"{key}_over_bare_all_frames"] == pytest.approx(value["best_s"] / frames)
    for tracking, parts in r["stages"].items():
        total = sum(parts[f"{s}_s"] for s in bench.STAGES if s != "figures")
        assert parts["sum_without_figures_s"] == pytest.approx(total)
        assert parts["sum_with_figures_s"] == pytest.approx(total + parts["figures_s"])
        assert parts["track_over_bare_same_pairs"] == pytest.approx(parts["track_s"] / r["bare"][tracking]["best_s"])


def test_pair_lists_match_the_tracking_modes() -> None:
    """The bare floor registers exactly the pairs tracking.track_cycle asks the network for."""
    import torch

    from scripts.tracking import track_cycle

    frames, slices = 5, 2
    seen: dict[str, list] = {}
    for mode in bench.TRACKING:
        calls: list[tuple[int, int]] = []
        grid = torch.arange(frames * slices, dtype=torch.float32).view(frames, slices, 1, 1).expand(-1, -1, 4, 4)

        def lagrangian(reference, target):
            calls.extend(zip(reference[:, 0, 0].long().tolist(), target[:, 0, 0].long().tolist()))
            return torch.zeros(len(reference), 2, 4, 4)

        track_cycle(grid.contiguous(), lagrangian, mode, 0, 3)
        seen[mode] = sorted((a // slices, b // slices, a % slices) for a, b in calls)
    pairs = bench.pair_lists(frames, slices)
    for mode in bench.TRACKING:
        assert sorted(pairs[mode]) == seen[mode]
