"""The refinement and backbone benchmark scripts run as files and report their ratios (issues 29, 30)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_refinement_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_refinement.py"), "--pairs", "2",
                             "--steps", "2", "--repeats", "1", "--elastix-pairs", "0", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark_refinement.json").read_text())
    assert [(r["steps"], r["refinement"]) for r in report["rows"]] == [(2, "score-weighted"), (2, "plain")]
    assert all(r["s_per_pair_batched"] > 0 and r["over_bare_network"] > 0 for r in report["rows"])
    assert "| 2 | plain |" in (tmp_path / "benchmark_refinement.md").read_text()


def test_benchmark_backbones_reports_every_backbone(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_backbones.py"), "--size", "64",
                             "--batch", "2", "--repeats", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "benchmark_backbones.json").read_text())["rows"]
    assert [r["backbone"].split()[0] for r in rows] == ["VoxelMorph", "TransMorph-2D", "DiffuseMorph-2D"]
    assert rows[0]["train_over_voxelmorph"] == 1.0 and rows[1]["parameters"] == 6_302_564
    assert rows[2]["parameters"] == 1_145_091
