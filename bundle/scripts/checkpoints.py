"""Resuming a training: which state a checkpoint restores, and the best-model selection that survives a resume.

``model.pt`` / ``scoring_model.pt`` are written by the validator's key-metric ``CheckpointSaver`` whenever the
validation metric beats the best so far. That "best so far" lives in the saver, not in the epoch checkpoints, so a
resumed run would start from nothing and overwrite ``model.pt`` with its first epoch however bad. ``BestModelTracking``
puts it in the epoch checkpoints (MONAI's ``CheckpointSaver.load_state_dict`` restores it; MONAI has no
``state_dict`` for it, so it is read from the saver's ignite ``Checkpoint``), and ``resumable_state`` decides what a
``--resume_checkpoint`` restores:

* a checkpoint in the run's own ``ckpt_dir`` continues that run: the selection goes on where it stopped;
* a checkpoint from another folder starts a branch (e.g. AdaCS from VoxelMorph-MSE's warm-up): its ``model.pt`` is
  chosen among the branch's own epochs, as before;
* checkpoints written before the tracking existed (bundle < 0.3.15) load as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

BEST_MODEL_KEY = "best_model"


class BestModelTracking:
    """The key-metric savers' state (best metric so far and its file) and the evaluator's best metric and epoch."""

    def __init__(self, savers: Sequence[Any], evaluator: Any = None) -> None:
        self.savers = list(savers)
        self.evaluator = evaluator

    @staticmethod
    def _tracker(saver: Any) -> Any:
        return None if saver is None else getattr(saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict:
        trackers = [self._tracker(saver) for saver in self.savers]  # ignite's {"_saved": [(priority, filename)]}
        state: dict = {"savers": [None if tracker is None else dict(tracker.state_dict()) for tracker in trackers]}
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        saved = state_dict.get("savers", [])
        if len(saved) != len(self.savers):
            raise ValueError(
                f"the checkpoint tracks {len(saved)} best-model files, this configuration {len(self.savers)}"
            )
        for saver, state in zip(self.savers, saved):
            if state is not None and self._tracker(saver) is not None:
                saver.load_state_dict(state)
        if self.evaluator is not None and "best_metric" in state_dict:
            self.evaluator.state.best_metric = state_dict["best_metric"]
            self.evaluator.state.best_metric_epoch = state_dict["best_metric_epoch"]


def continues_run(checkpoint: str | Path, ckpt_dir: str | Path) -> bool:
    """True when ``checkpoint`` lies in ``ckpt_dir``: resuming it continues that run rather than branching off."""
    return Path(checkpoint).resolve().parent == Path(ckpt_dir).resolve()


def resumable_state(checkpoint: str | Path, save_dict: Mapping[str, Any], ckpt_dir: str | Path) -> dict[str, Any]:
    """The part of ``save_dict`` that resuming ``checkpoint`` restores (the ``CheckpointLoader``'s ``load_dict``).

    Everything, except the best-model tracking when the checkpoint branches off another run or predates it.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"resume_checkpoint {path} does not exist")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    restore = dict(save_dict)
    if BEST_MODEL_KEY in restore and (BEST_MODEL_KEY not in stored or not continues_run(path, ckpt_dir)):
        del restore[BEST_MODEL_KEY]
    return restore
