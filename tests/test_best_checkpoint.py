"""scripts/best_checkpoint.py: the best validation epoch of a training within an epoch range, from its logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, load_repo_script

best_checkpoint = load_repo_script("best_checkpoint")


def metrics_line(epoch: int, mean_dice: float, myo: float, hd95: float) -> str:
    """A validation line as the bundle's StatsHandler prints it."""
    return (f"2026-12-02 14:56:52,715 - INFO - Epoch[{epoch}] Metrics -- val_asd: inf val_dice_lv: 0.8066 "
            f"val_dice_myo: {myo:.4f} val_dice_rv: 0.5997 val_epe: nan val_folding_pct: 0.0000 val_hd: inf "
            f"val_hd95: {hd95:.4f} val_mean_dice: {mean_dice:.4f} \n")


def make_run(root: Path, values: dict[int, tuple[float, float, float]]) -> Path:
    """A training folder: a train.log with progress noise and metric lines, and every epoch's checkpoint."""
    (root / "models").mkdir(parents=True)
    lines = ["Epoch [1/9]: [1/100]   1%|  [00:00<?]\n"]
    for epoch, (mean_dice, myo, hd95) in values.items():
        lines.append(f"2026-12-02 - INFO - Got new best metric of val_mean_dice: {mean_dice}\n")
        lines.append(metrics_line(epoch, mean_dice, myo, hd95))
        (root / "models" / f"checkpoint_epoch={epoch}.pt").touch()
    (root / "train.log").write_text("".join(lines))
    return root


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "vxm", {1: (0.70, 0.80, 5.0), 2: (0.76, 0.79, 4.0), 3: (0.75, 0.82, 4.2),
                                       4: (0.76, 0.81, 4.1), 5: (0.74, 0.80, 4.5)})


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = best_checkpoint.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err


def test_the_best_epoch_ties_to_the_earlier_one(run: Path, capsys):
    assert run_main(capsys, run) == (0, str(run / "models" / "checkpoint_epoch=2.pt"), "")


def test_a_range_and_another_metric(run: Path, capsys):
    assert run_main(capsys, run, "--first", "3")[1].endswith("checkpoint_epoch=4.pt")
    assert run_main(capsys, run, "--last", "1")[1].endswith("checkpoint_epoch=1.pt")
    assert run_main(capsys, run, "--metric", "val_dice_myo")[1].endswith("checkpoint_epoch=3.pt")
    assert run_main(capsys, run, "--metric", "val_hd95", "--lower-is-better")[1].endswith("checkpoint_epoch=2.pt")


def test_a_run_continued_in_another_folder(run: Path, tmp_path: Path, capsys):
    continued = make_run(tmp_path / "long", {6: (0.77, 0.80, 4.0), 7: (0.78, 0.80, 4.0)})
    assert run_main(capsys, run, continued) == (0, str(continued / "models" / "checkpoint_epoch=7.pt"), "")
    assert run_main(capsys, run, continued, "--last", "6")[1] == str(continued / "models" / "checkpoint_epoch=6.pt")
    assert run_main(capsys, run, continued, "--last", "5")[1] == str(run / "models" / "checkpoint_epoch=2.pt")


def test_the_table_marks_the_selected_epoch(run: Path, capsys):
    code, _, err = run_main(capsys, run, "--table")
    assert code == 0 and "epoch 2: val_mean_dice 0.7600  <- selected" in err and "epoch 5: val_mean_dice 0.7400" in err


def test_problems_are_named(run: Path, tmp_path: Path, capsys):
    (run / "models" / "checkpoint_epoch=2.pt").unlink()
    code, out, err = run_main(capsys, run)
    assert code == 1 and out == "" and "checkpoint_epoch=2.pt is in none of" in err and "--keep_checkpoints null" in err
    assert "no validated epoch between 9 and None" in run_main(capsys, run, "--first", "9")[2]
    assert "no 'val_nothing' in the logs" in run_main(capsys, run, "--metric", "val_nothing")[2]
    assert f"{tmp_path / 'nowhere' / 'train.log'}: not found" in run_main(capsys, tmp_path / "nowhere")[2]


def test_script_runs_as_a_file(run: Path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "best_checkpoint.py"), str(run), "--first", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("checkpoint_epoch=4.pt")
