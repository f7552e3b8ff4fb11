"""Smoke test of scripts/benchmark_training.py: tiny settings, the JSON it writes, FLOP bookkeeping (no timings)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark_training.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--size", "32", "--batch", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{SCRIPT.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "(a) training micro-step" in proc.stdout and "(c) inference per pair" in proc.stdout
    return json.loads(out.read_text())


def test_json_keys_and_config(result: dict) -> None:
    assert {"config", "environment", "training", "floor", "flop_floor", "inference", "raw_seconds"} <= set(result)
    assert result["config"]["size"] == 32 and result["config"]["batch"] == 2 and result["config"]["repeats"] == 1
    for kind in ("nostep", "step", "average"):
        assert {"adacs_s", "vxm_s", "ratio"} <= set(result["training"][kind])
        assert {"floor_ratio", "trainer_floor_ratio", "measured_over_floor"} <= set(result["floor"][kind])
    for kind in ("nostep", "step"):
        assert set(result["floor"][kind]["components_s"]) == {"disp_fwd_bwd", "disp_fwd_nograd", "score_fwd_bwd_2b", "vxm_step"}
    for batch in result["config"]["inference_batches"]:
        row = result["inference"][f"batch_{batch}"]
        for net in ("adacs", "vxm"):
            assert {"bundle_per_pair_s", "bare_per_pair_s", "bundle_over_bare"} <= set(row[net])
        assert "adacs_over_vxm_bundle" in row


def test_every_item_timed_once_per_round(result: dict) -> None:
    raw = result["raw_seconds"]
    assert raw and all(len(v) == result["config"]["repeats"] for v in raw.values())
    assert all(t > 0 and math.isfinite(t) for v in raw.values() for t in v)


def test_ratios_are_the_quotients_of_the_reported_times(result: dict) -> None:
    for kind in ("nostep", "step"):
        t = result["training"][kind]
        assert t["ratio"] == pytest.approx(t["adacs_s"] / t["vxm_s"])
        c = result["floor"][kind]["components_s"]
        floor = (c["disp_fwd_bwd"] + c["disp_fwd_nograd"] + c["score_fwd_bwd_2b"]) / c["vxm_step"]
        assert result["floor"][kind]["floor_ratio"] == pytest.approx(floor)
        assert result["floor"][kind]["measured_over_floor"] == pytest.approx(t["ratio"] / floor)


def test_flop_floor_components_add_up_to_the_trainer(result: dict) -> None:
    """The components model the trainer: its AdaCS micro-step counts exactly their FLOPs (with the second forward
    only when it steps), and the displacement step of AdaCS costs the same FLOPs as VoxelMorph's."""
    ff = result["flop_floor"]
    f = ff["flops"]
    assert f["disp_fwd_bwd"] == f["vxm_step"] == f["trainer_vxm_step"] == f["trainer_vxm_nostep"] > 0
    assert f["trainer_adacs_step"] == f["disp_fwd_bwd"] + f["disp_fwd_nograd"] + f["score_fwd_bwd_2b"]
    assert f["trainer_adacs_nostep"] == f["disp_fwd_bwd"] + f["score_fwd_bwd_2b"]
    assert ff["trainer_counted"]["step"] == pytest.approx(ff["ratio_with_second_forward"])
    assert ff["trainer_counted"]["nostep"] == pytest.approx(ff["ratio_without_second_forward"])
    assert ff["ratio_with_second_forward"] > ff["ratio_without_second_forward"] > 1.0
