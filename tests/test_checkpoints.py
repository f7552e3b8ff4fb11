"""What a --resume_checkpoint restores (scripts.checkpoints): a run continued in its own folder keeps its best-model
selection; a branch from another folder, or a checkpoint older than the tracking, does not carry it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from scripts.checkpoints import (
    BEST_MODEL_KEY, AtomicCheckpointSaver, BestModelTracking, checkpoint_problem, continues_run, resumable_state,
)


def save_dict() -> dict:
    return {"displacement_network": torch.nn.Linear(2, 2), BEST_MODEL_KEY: BestModelTracking([])}


def write_checkpoint(path: Path, with_tracking: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    objects = save_dict()
    if not with_tracking:
        objects.pop(BEST_MODEL_KEY)
    torch.save({key: value.state_dict() for key, value in objects.items()}, path)
    return path


def test_a_checkpoint_in_its_own_folder_continues_the_run(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "models" / "checkpoint_epoch=3.pt")
    assert continues_run(checkpoint, tmp_path / "models")
    assert set(resumable_state(checkpoint, save_dict(), tmp_path / "models")) == {"displacement_network", BEST_MODEL_KEY}


def test_a_checkpoint_from_another_folder_branches_without_the_selection(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "vxm" / "models" / "checkpoint_epoch=20.pt")
    assert not continues_run(checkpoint, tmp_path / "adacs" / "models")
    assert set(resumable_state(checkpoint, save_dict(), tmp_path / "adacs" / "models")) == {"displacement_network"}


def test_a_checkpoint_older_than_the_tracking_still_resumes(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "models" / "checkpoint_epoch=3.pt", with_tracking=False)
    assert set(resumable_state(checkpoint, save_dict(), tmp_path / "models")) == {"displacement_network"}


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_epoch=9.pt"):
        resumable_state(tmp_path / "checkpoint_epoch=9.pt", save_dict(), tmp_path)


def evaluator_with_saver(ckpt_dir: Path, metrics: list[float], network: torch.nn.Module,
                         saver_class: type = AtomicCheckpointSaver, **saver_args) -> tuple[Engine, CheckpointSaver]:
    """An engine whose epochs report the given key metric, with the bundle's model.pt saver attached."""
    engine = Engine(lambda engine, batch: None)
    engine.state.best_metric, engine.state.best_metric_epoch = -1.0, -1
    engine.state.metrics = {}
    engine.state.key_metric_name = "val_mean_dice"

    @engine.on(Events.EPOCH_COMPLETED)
    def report(engine: Engine) -> None:
        value = metrics[engine.state.epoch - 1]
        network.weight.data.fill_(value)  # the saved network tells which epoch it comes from
        engine.state.metrics["val_mean_dice"] = value
        if value > engine.state.best_metric:
            engine.state.best_metric, engine.state.best_metric_epoch = value, engine.state.epoch

    saver = saver_class(str(ckpt_dir), {"model": network}, save_key_metric=True, key_metric_filename="model.pt",
                        **saver_args)
    saver.attach(engine)
    return engine, saver


def test_the_tracking_round_trips_through_a_weights_only_checkpoint(tmp_path):
    network = torch.nn.Linear(1, 1)
    engine, saver = evaluator_with_saver(tmp_path, [0.5, 0.9, 0.7], network)
    engine.run([0], max_epochs=3)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == pytest.approx(0.9)
    torch.save({BEST_MODEL_KEY: BestModelTracking([saver], engine).state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)[BEST_MODEL_KEY]
    assert (state["best_metric"], state["best_metric_epoch"]) == (pytest.approx(0.9), 2)

    # a new process: the same saver configuration, the tracking restored, then a worse and a better epoch
    network = torch.nn.Linear(1, 1)
    engine, saver = evaluator_with_saver(tmp_path, [0.8, 0.95], network)
    BestModelTracking([saver], engine).load_state_dict(state)
    assert engine.state.best_metric == pytest.approx(0.9)
    engine.run([0], max_epochs=1)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == pytest.approx(0.9)  # kept
    engine.run([0], max_epochs=2)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == pytest.approx(0.95)  # beaten


def test_a_checkpoint_tracking_other_files_is_refused():
    with pytest.raises(ValueError, match="tracks 2 best-model files, this configuration 1"):
        BestModelTracking([None]).load_state_dict({"savers": [None, None]})


def test_the_tracking_is_what_monai_restores(tmp_path):
    """AtomicCheckpointSaver.state_dict is the state MONAI's CheckpointSaver.load_state_dict takes back."""
    engine, saver = evaluator_with_saver(tmp_path, [0.5, 0.9, 0.7], torch.nn.Linear(1, 1))
    engine.run([0], max_epochs=3)
    state = saver.state_dict()
    assert state == {"_saved": [(pytest.approx(0.9), "model_key_metric=0.9000.pt")]}
    fresh = CheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True,
                            key_metric_filename="model.pt")
    fresh.load_state_dict(state)
    assert AtomicCheckpointSaver.state_dict(fresh) == state
    no_key_metric = AtomicCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_interval=1)
    assert no_key_metric.state_dict() is None


def test_a_saver_that_cannot_write_its_tracking_is_refused(tmp_path):
    saver = CheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True)
    with pytest.raises(TypeError, match="AtomicCheckpointSaver"):
        BestModelTracking([saver])


def test_monai_key_metric_save_state_would_break_the_flat_model_file(tmp_path):
    """Why the tracking is kept in the epoch checkpoints and not by MONAI's key_metric_save_state: that option
    stores it inside model.pt, which then is no longer the flat state dict the bundle ships and loads."""
    engine, _ = evaluator_with_saver(tmp_path, [0.5, 0.9], torch.nn.Linear(1, 1), saver_class=CheckpointSaver,
                                     key_metric_save_state=True)
    engine.run([0], max_epochs=2)
    assert "checkpointer" in torch.load(tmp_path / "model.pt", weights_only=True)
    assert "not a flat state dict" in checkpoint_problem(tmp_path / "model.pt", flat=True)
