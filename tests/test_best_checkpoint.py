"""scripts/best_checkpoint.py: the best validation epoch of a training within an epoch range, from the TensorBoard
events its validation writes (eval/), or from train.log for a folder without them; and a real tiny training whose
events give the epochs its console log shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLE, REPO, load_repo_script

best_checkpoint = load_repo_script("best_checkpoint")

VALUES = {1: (0.70, 0.80, 5.0), 2: (0.76, 0.79, 4.0), 3: (0.75, 0.82, 4.2), 4: (0.76, 0.81, 4.1), 5: (0.74, 0.80, 4.5)}


def metrics_line(epoch: int, mean_dice: float, myo: float, hd95: float) -> str:
    """A validation line as the bundle's StatsHandler prints it."""
    return (f"2026-12-02 14:56:52,715 - INFO - Epoch[{epoch}] Metrics -- val_asd: inf val_dice_lv: 0.8066 "
            f"val_dice_myo: {myo:.4f} val_dice_rv: 0.5997 val_epe: nan val_folding_pct: 0.0000 val_hd: inf "
            f"val_hd95: {hd95:.4f} val_mean_dice: {mean_dice:.4f} \n")


def write_events(eval_dir: Path, values: dict[int, tuple[float, float, float]], walltime: float = 1.0e9) -> None:
    """The validation metrics as the bundle's TensorBoardStatsHandler writes them (one scalar per metric and epoch),
    beside training-loss scalars at iteration steps, as in a real run."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(eval_dir))
    for epoch, (mean_dice, myo, hd95) in values.items():
        writer.add_scalar("loss", 0.5, epoch * 100, walltime=walltime + epoch)
        for tag, value in (("val_mean_dice", mean_dice), ("val_dice_myo", myo), ("val_hd95", hd95),
                           ("val_asd", float("inf"))):
            writer.add_scalar(tag, value, epoch, walltime=walltime + epoch)
    writer.close()


def make_run(root: Path, values: dict[int, tuple[float, float, float]], source: str = "events") -> Path:
    """A training folder: its metrics as events in eval/ ("events") or only in a train.log ("log"), and every
    epoch's checkpoint."""
    (root / "models").mkdir(parents=True)
    for epoch in values:
        (root / "models" / f"checkpoint_epoch={epoch}.pt").touch()
    if source == "events":
        write_events(root / "eval", values)
    else:
        lines = ["Epoch [1/9]: [1/100]   1%|  [00:00<?]\n"]
        for epoch, (mean_dice, myo, hd95) in values.items():
            lines.append(f"2026-12-02 - INFO - Got new best metric of val_mean_dice: {mean_dice}\n")
            lines.append(metrics_line(epoch, mean_dice, myo, hd95))
        (root / "train.log").write_text("".join(lines))
    return root


@pytest.fixture(params=["events", "log"])
def source(request) -> str:
    return request.param


@pytest.fixture()
def run(tmp_path: Path, source: str) -> Path:
    return make_run(tmp_path / "vxm", VALUES, source)


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


def test_a_run_continued_in_another_folder(run: Path, tmp_path: Path, source: str, capsys):
    continued = make_run(tmp_path / "long", {6: (0.77, 0.80, 4.0), 7: (0.78, 0.80, 4.0)}, source)
    assert run_main(capsys, run, continued) == (0, str(continued / "models" / "checkpoint_epoch=7.pt"), "")
    assert run_main(capsys, run, continued, "--last", "6")[1] == str(continued / "models" / "checkpoint_epoch=6.pt")
    assert run_main(capsys, run, continued, "--last", "5")[1] == str(run / "models" / "checkpoint_epoch=2.pt")


def test_the_table_marks_the_selected_epoch_and_names_what_it_read(run: Path, source: str, capsys):
    code, _, err = run_main(capsys, run, "--table")
    assert code == 0 and "epoch 2: val_mean_dice 0.7600  <- selected" in err and "epoch 5: val_mean_dice 0.7400" in err
    assert f"read {run / ('eval' if source == 'events' else 'train.log')}" in err


def test_problems_are_named(run: Path, tmp_path: Path, capsys):
    (run / "models" / "checkpoint_epoch=2.pt").unlink()
    code, out, err = run_main(capsys, run)
    assert code == 1 and out == "" and "checkpoint_epoch=2.pt is in none of" in err and "--keep_checkpoints null" in err
    assert "no validated epoch between 9 and None" in run_main(capsys, run, "--first", "9")[2]
    assert "no 'val_nothing' among the validation metrics" in run_main(capsys, run, "--metric", "val_nothing")[2]
    assert f"{tmp_path / 'nowhere'}: neither TensorBoard events in eval/ nor a train.log" in run_main(
        capsys, tmp_path / "nowhere")[2]


def test_the_events_are_read_before_the_log_and_a_later_attempt_wins(tmp_path: Path, capsys):
    """The log only stands in for missing events; an epoch validated again by a resumed attempt (its own event file,
    written later) takes the new value."""
    run = make_run(tmp_path / "vxm", VALUES, "events")
    (run / "train.log").write_text(metrics_line(5, 0.99, 0.99, 1.0))  # would make epoch 5 the best
    assert run_main(capsys, run)[1].endswith("checkpoint_epoch=2.pt")
    write_events(run / "eval", {4: (0.80, 0.81, 4.1)}, walltime=2.0e9)  # epoch 4 again, after a resume
    assert run_main(capsys, run)[1].endswith("checkpoint_epoch=4.pt")
    assert best_checkpoint.validation_curve([run], "val_mean_dice")[4] == pytest.approx(0.80)


def test_script_runs_as_a_file(tmp_path: Path):
    run = make_run(tmp_path / "vxm", VALUES)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "best_checkpoint.py"), str(run), "--first", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("checkpoint_epoch=4.pt")


def test_a_real_training_writes_what_it_reads(tmp_path: Path):
    """A tiny bundle training in run_experiment.py's layout: the epochs and values read from its events are those
    its console log shows (to the log's 4 decimals), and the selected checkpoint exists."""
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.yaml",
               "--ckpt_dir", str(run / "models"), "--output_dir", str(run / "eval"), "--keep_checkpoints", "null",
               "--epochs", "2", "--motion_warmup_epochs", "1", "--scoring_warmup_epochs", "0", "--epoch_length", "2",
               "--batch_size", "2", "--num_train_pairs", "4", "--num_val_pairs", "2", "--image_size", "[32,32]",
               "--log_every", "100"]
    with open(run / "train.log", "w") as log:
        done = subprocess.run(command, cwd=BUNDLE, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, (run / "train.log").read_text()[-3000:]
    for metric in ("val_mean_dice", "val_dice_myo", "val_folding_pct"):
        from_events = best_checkpoint.events_curve(run / "eval", metric)
        from_log = best_checkpoint.log_curve(run / "train.log", metric)
        assert sorted(from_events) == sorted(from_log) == [1, 2], metric
        assert all(abs(from_events[e] - from_log[e]) <= 5e-5 for e in from_log), (metric, from_events, from_log)
    assert best_checkpoint.main([str(run)]) == 0
