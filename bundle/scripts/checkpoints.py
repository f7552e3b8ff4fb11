"""Resuming a training: which state a checkpoint restores, and the best-model selection that survives a resume.

``model.pt`` / ``scoring_model.pt`` are written by the validator's key-metric ``CheckpointSaver`` whenever the
validation metric beats the best so far. That "best so far" lives in the saver, not in the epoch checkpoints, so a
resumed run would start from nothing and overwrite ``model.pt`` with its first epoch however bad. ``BestModelTracking``
puts it in the epoch checkpoints (``AtomicCheckpointSaver.state_dict`` writes it, MONAI's
``CheckpointSaver.load_state_dict`` restores it), and ``resumable_state`` decides what a ``--resume_checkpoint``
restores:

* a checkpoint in the run's own ``ckpt_dir`` continues that run: the selection goes on where it stopped;
* a checkpoint from another folder starts a branch (e.g. AdaCS from VoxelMorph-MSE's warm-up): its ``model.pt`` is
  chosen among the branch's own epochs, as before;
* checkpoints written before the tracking existed (bundle < 0.3.15) load as before.

Why not MONAI's own ``CheckpointSaver(key_metric_save_state=True)``: it stores the tracking (ignite's
``include_self``) inside the key-metric file itself, so ``model.pt`` would hold a ``checkpointer`` entry beside the
weights and stop being the flat state dict the bundle ships and loads (``require_weights``, the inference configs),
and it would not carry the evaluator's best metric and epoch. The state is the same (ignite's
``{"_saved": [(priority, filename)]}``); only where it is kept differs.

Writing them safely (``AtomicCheckpointSaver``): every file (epoch checkpoints, ``checkpoint_final.pt``,
``model.pt``, ``scoring_model.pt``) is serialised in memory, written to a temporary file in the same folder, flushed
to disk (fsync) and renamed over its name, so a file on disk is always whole; the previous checkpoint is removed only
after its successor is complete. ignite's ``Checkpoint`` removes the old file *before* writing the new one, and
MONAI's ``CheckpointSaver`` writes in place: a kill or a full disk at that moment used to leave only a truncated file.
A state holding NaN or Inf is never written (the previous file stays). Reading them (``require_resumable``,
``require_weights``): a truncated, empty or corrupt file is named with its problem, and an earlier checkpoint that
loads is proposed.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

BEST_MODEL_KEY = "best_model"
TEMP_SUFFIX = ".tmp"
# test hook: "<file name>:<seconds>" pauses the save of that file after its temporary file is complete (fsynced)
# and before the rename, so a test can kill the process at the most dangerous moment
PAUSE_ENV = "ADACS_CHECKPOINT_PAUSE"
_TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")

logger = logging.getLogger(__name__)


class TrainingStopped(SystemExit):
    """A fault that stops the run with one clear message and no traceback (exit status 1).

    A ``SystemExit``, so it passes through MONAI's config evaluation untouched; the trainer and the evaluator
    re-raise it without logging a traceback (``quiet_exception_handler``).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith("error: ") else f"error: {message}")


def quiet_exception_handler(engine: Any, error: BaseException) -> None:
    """First EXCEPTION_RAISED handler of the trainer and the evaluator: a :class:`TrainingStopped` goes up as it
    is (its message says everything); any other error is logged with its traceback, as MONAI's StatsHandler does."""
    if not isinstance(error, TrainingStopped):
        engine.logger.exception(f"Exception: {error}")
    elif not getattr(error, "line_ended", False):
        error.line_ended = True
        print(file=sys.stderr, flush=True)  # end a progress bar's line: the message starts on its own line
    raise error


class BestModelTracking:
    """The key-metric savers' state (best metric so far and its file) and the evaluator's best metric and epoch.

    Args:
        savers: the validator's key-metric :class:`AtomicCheckpointSaver` s (``model.pt``, ``scoring_model.pt``);
            ``None`` entries, or savers without a key metric, track nothing.
        evaluator: the validator, whose ``best_metric`` / ``best_metric_epoch`` are kept too.
    """

    def __init__(self, savers: Sequence[Any], evaluator: Any = None) -> None:
        for saver in savers:
            if saver is not None and not callable(getattr(saver, "state_dict", None)):
                raise TypeError(
                    f"{type(saver).__name__} has no state_dict(): give the key-metric savers as "
                    "scripts.checkpoints.AtomicCheckpointSaver (MONAI's CheckpointSaver can restore its tracking, "
                    "not write it)"
                )
        self.savers = list(savers)
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        state: dict = {"savers": [None if saver is None else saver.state_dict() for saver in self.savers]}
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
            if state is not None and saver is not None and saver.state_dict() is not None:
                saver.load_state_dict(state)  # MONAI's CheckpointSaver.load_state_dict
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


# ---- writing: atomic, the old file removed only after the new one is complete --------------------------------
def non_finite_entries(state: Any, prefix: str = "", limit: int = 5) -> list[str]:
    """Names of the floating-point tensors in a (nested) state that hold NaN or Inf (at most ``limit``)."""
    found: list[str] = []

    def visit(value: Any, name: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(value, torch.Tensor):
            if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                found.append(name or "tensor")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{name}[{index}]")

    visit(state, prefix)
    return found


def describe_write_error(path: Path, error: OSError, size: int | None = None) -> str:
    """A full disk, a quota, a read-only or forbidden folder said in words, with the file's name."""
    folder = path.parent
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
        except OSError:
            free = "free space unknown"
        need = f", {size / 1e6:.1f} MB needed" if size else ""
        what = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{path}: cannot be written: {what} ({free} in {folder}{need})"
    return f"{path}: cannot be written: {error.strerror or error}"


def _pause_if_asked(temp: Path, path: Path) -> None:
    """Test hook (``ADACS_CHECKPOINT_PAUSE="<file name>:<seconds>"``): stop between the complete temporary file and
    the rename, and say so on stderr, so that a test can kill the process at that moment."""
    request = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = request.rpartition(":")
    if name and name == path.name:
        print(f"{PAUSE_ENV}: {temp} complete, pausing {seconds} s before renaming it to {path.name}", file=sys.stderr,
              flush=True)
        time.sleep(float(seconds))


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders; the rename itself is still atomic
    finally:
        os.close(fd)


def write_atomically(state: Any, path: str | Path, kept: Sequence[Path] = ()) -> None:
    """``torch.save`` of ``state`` to ``path`` that leaves either the complete new file or the old one, never a
    truncated file: serialised in memory, written to ``.<name>.<pid>.tmp`` in the same folder, fsynced, renamed.

    A failure (full disk, read-only folder) removes the temporary file and stops the run with a
    :class:`TrainingStopped` naming the file, the problem and the checkpoints ``kept``.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        _pause_if_asked(temp, path)
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise TrainingStopped(describe_write_error(path, error, len(data)) + "; " + kept_message(kept)) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        data.release()
    _fsync_folder(path.parent)


def kept_message(kept: Sequence[Path]) -> str:
    existing = [str(p) for p in kept if Path(p).is_file()]
    if existing:
        return f"the previous file is kept: {', '.join(existing)}"
    return "nothing was replaced"


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files of saves whose process is gone (killed mid-save); returns them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP_PATTERN.match(path.name)
        if not match or not path.is_file():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_alive(pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
        logger.info(f"removed {path}: the unfinished save of {match['name']} by a process that is gone")
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicDiskSaver(BaseSaveHandler):
    """ignite ``save_handler`` for :class:`AtomicCheckpointSaver`: atomic writes, deferred removals.

    ignite's ``Checkpoint`` calls ``remove(old)`` *before* saving the new file. Here ``remove`` only records the
    name; the file goes once its successor is on disk (and never when it has the successor's name: a fixed name
    such as ``model.pt`` is replaced by the rename). A state with NaN or Inf is refused: nothing is written, the
    old file stays, and the run stops with a message.

    Args:
        dirname: the checkpoint folder (created at the first save).
        filename: a fixed file name (``model.pt``, ``checkpoint_final.pt``) or None for ignite's names.
        save_on_rank: the process that writes under torch.distributed.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None, save_on_rank: int = 0) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self.save_on_rank = save_on_rank
        self._pending_removals: list[str] = []
        self._cleaned = False

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        import ignite.distributed as idist

        name = self.filename or filename
        pending, self._pending_removals = self._pending_removals, []
        if idist.get_rank() != self.save_on_rank:
            return
        self.dirname.mkdir(parents=True, exist_ok=True)
        if not self._cleaned:
            remove_stale_temporaries(self.dirname)
            self._cleaned = True
        path = self.dirname / name
        kept = [self.dirname / old for old in dict.fromkeys(pending + [name])]
        bad = non_finite_entries(checkpoint)
        if bad:
            raise TrainingStopped(
                f"{path}: not written: the state to save holds NaN or Inf values ({', '.join(bad)}); "
                + kept_message(kept)
            )
        write_atomically(checkpoint, path, kept)
        for old in pending:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self._pending_removals.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments, same files) writing through :class:`AtomicDiskSaver`.

    A run stopped by a :class:`TrainingStopped` (non-finite loss, failed write) does not save its state as the
    final checkpoint on the way out: the last good checkpoint stays the last one on disk.

    :meth:`state_dict` is the counterpart of MONAI's ``load_state_dict``: the key-metric tracking, for
    :class:`BestModelTracking` to keep in the epoch checkpoints.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, getattr(checkpoint.save_handler, "filename", None))

    def state_dict(self) -> dict | None:
        """The key-metric tracking (ignite's ``{"_saved": [(priority, filename)]}``, what MONAI's
        ``load_state_dict`` restores); ``None`` for a saver without a key metric."""
        checkpoint = self._key_metric_checkpoint
        return None if checkpoint is None else dict(checkpoint.state_dict())

    def exception_raised(self, engine: Any, e: BaseException) -> None:
        if isinstance(e, TrainingStopped):
            raise e
        super().exception_raised(engine, e)


# ---- reading: name a bad file and propose one that loads -------------------------------------------------------
TRAINING_STATE_KEYS = ("displacement_network", "scoring_network", "displacement_optimizer", "scoring_optimizer", "trainer")


def checkpoint_problem(path: str | Path, required: Sequence[str] = (), flat: bool = False) -> str | None:
    """What is wrong with a checkpoint file, in words (None: it loads, has the ``required`` entries, and every
    tensor is finite). ``flat``: a bare state dict of tensors (``model.pt``)."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): its save was interrupted (process killed, or the disk was full)"
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return f"is truncated or corrupt ({size} bytes; torch.load fails: {type(error).__name__}: {reason})"
    if not isinstance(stored, Mapping):
        return f"is not a checkpoint (it holds a {type(stored).__name__}, not a dictionary of states)"
    if flat and not all(isinstance(value, torch.Tensor) for value in stored.values()):
        return "is not a flat state dict of tensors (a full training checkpoint? use its network's model.pt)"
    missing = [key for key in required if key not in stored]
    if missing:
        return f"is not a training checkpoint of this configuration (no {', '.join(missing)} entry)"
    bad = non_finite_entries(stored)
    if bad:
        return f"holds NaN or Inf values ({', '.join(bad)}): the training had diverged when it was saved"
    return None


def _stored_epoch(path: Path) -> int | None:
    """The epoch a training checkpoint was saved at (ignite stores the iteration and the epoch length)."""
    try:
        trainer = torch.load(path, map_location="cpu", weights_only=True)["trainer"]
        if "epoch" in trainer:
            return int(trainer["epoch"])
        return int(trainer["iteration"]) // int(trainer["epoch_length"])
    except Exception:
        return None


def loadable_checkpoint(folder: str | Path, exclude: Sequence[str | Path] = (),
                        required: Sequence[str] = TRAINING_STATE_KEYS) -> tuple[Path, int | None] | None:
    """The most recent ``checkpoint_*.pt`` in ``folder`` (by the epoch it stores, then its time) that loads."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    excluded = {Path(p).resolve() for p in exclude}
    candidates = []
    for path in folder.glob("checkpoint_*.pt"):
        if path.resolve() in excluded or checkpoint_problem(path, required) is not None:
            continue
        candidates.append((_stored_epoch(path) or -1, path.stat().st_mtime, path))
    if not candidates:
        return None
    epoch, _, path = max(candidates)
    return path, (epoch if epoch >= 0 else None)


def require_resumable(checkpoint: str | Path, required: Sequence[str] = TRAINING_STATE_KEYS) -> None:
    """Stop with one clear message (no traceback) when ``--resume_checkpoint`` cannot be resumed from: the file and
    its problem, and the latest checkpoint of its folder that does load (used in ``initialize``)."""
    path = Path(checkpoint)
    problem = checkpoint_problem(path, required)
    if problem is None:
        return
    found = loadable_checkpoint(path.parent, exclude=[path], required=required)
    if found:
        other, epoch = found
        trained = f", trained to epoch {epoch}" if epoch is not None else ""
        advice = f'{other} loads{trained}: resume from it with --resume_checkpoint "{other}"'
    else:
        advice = f"no other checkpoint in {path.parent} loads: train without --resume_checkpoint"
    raise TrainingStopped(f"resume_checkpoint {path} {problem}. {advice}.")


def require_weights(path: str | Path, hint: str = "") -> None:
    """Stop with one clear message when weights to evaluate are missing, unreadable or not finite (``initialize``)."""
    problem = checkpoint_problem(path, flat=True)
    if problem is not None:
        raise TrainingStopped(f"{path} {problem}" + (f" ({hint})" if hint and problem == "does not exist" else "") + ".")


def require_not_shipped_folder(ckpt_dir: str | Path, bundle_root: str | Path) -> None:
    """Refuse to train into ``<bundle_root>/models``, the folder of the shipped weights (``model.pt``,
    ``model_echo.pt``, ``scoring_model*.pt``): a training there would replace them (used in ``initialize``)."""
    shipped = Path(bundle_root) / "models"
    if Path(ckpt_dir).resolve() != shipped.resolve():
        return
    present = sorted(p.name for p in shipped.glob("*.pt")) if shipped.is_dir() else []
    holds = f" ({', '.join(present)})" if present else ""
    raise TrainingStopped(
        f"ckpt_dir {ckpt_dir} is the folder of the bundle's shipped weights{holds}: a training would overwrite them. "
        "Give another --ckpt_dir (default: models/own with --dataset_dir, models/phantom for the phantom) and copy "
        "the trained model.pt where you want it."
    )
