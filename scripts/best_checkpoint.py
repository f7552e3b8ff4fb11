"""The epoch checkpoint with the best validation metric of a training, within an epoch range.

    python scripts/best_checkpoint.py RUN_DIR [RUN_DIR ...] [--metric val_mean_dice] [--first 21] [--last 60] [--table]

A RUN_DIR is a training's folder as ``run_experiment.py`` leaves it: ``eval/`` (the bundle's ``--output_dir``, where
the validation writes every metric of every epoch as TensorBoard events: ``validate#handler#tensorboard`` in
``bundle/configs/train.yaml``) and ``models/checkpoint_epoch=E.pt`` (train with ``--keep_checkpoints null`` to keep
every epoch). A folder without events in ``eval/`` (a run trained with another ``--output_dir``) is read from its
``train.log`` instead (the console lines ``Epoch[E] Metrics -- ... name: value``, 4 decimals). Several folders are one
training continued in another folder (``--resume_checkpoint`` from the first into the second): their metrics are read
together, a later folder's epoch replacing an earlier one's.

It prints the path of the checkpoint to evaluate, e.g. for ``compare_methods.py --vxm``. Uses:

* the best validation epoch within a budget (``--last``), to compare runs of different lengths at equal length;
* selection on another metric than the trainer's key metric (``--metric val_dice_myo``);
* ``model.pt`` of a branched run is the best of its own epochs: ``--first`` = the branch epoch + 1.

Ties go to the earlier epoch. Run as a file: ``python scripts/best_checkpoint.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_METRICS_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)")


def events_curve(events_dir: Path, metric: str) -> dict[int, float] | None:
    """``{epoch: value}`` of ``metric`` in the TensorBoard event files of ``events_dir`` (None: no event files).

    An epoch written twice (an interrupted attempt and the one that resumed it) keeps its latest value.
    """
    files = sorted(Path(events_dir).glob("events.out.tfevents.*"))
    if not files:
        return None
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util
    except ImportError:  # a runtime requirement of the bundle; without it, the console log
        return None
    found = []
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == metric:
                    number = (value.simple_value if value.HasField("simple_value")
                              else tensor_util.make_ndarray(value.tensor).item())
                    found.append((event.wall_time, event.step, float(number)))
    return {step: number for _, step, number in sorted(found)}


def log_curve(log: Path, metric: str) -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` in a training's console log (the bundle's StatsHandler lines)."""
    curve: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        found = _METRICS_LINE.search(line)
        if not found:
            continue
        values = dict(re.findall(r"(\w+): (\S+)", found.group(2)))
        if metric in values:
            curve[int(found.group(1))] = float(values[metric])
    return curve


def run_curve(run_dir: Path, metric: str) -> tuple[dict[int, float], Path]:
    """One run's ``{epoch: value}`` and the file(s) it came from: ``eval/``'s events, else ``train.log``."""
    events_dir, log = Path(run_dir) / "eval", Path(run_dir) / "train.log"
    curve = events_curve(events_dir, metric)
    if curve:
        return curve, events_dir
    if log.is_file():
        return log_curve(log, metric), log
    if curve is not None:  # events without this metric, and no log
        return curve, events_dir
    raise FileNotFoundError(f"{run_dir}: neither TensorBoard events in eval/ nor a train.log (expected a training "
                            "folder: eval/ from --output_dir, models/ from --ckpt_dir)")


def validation_curve(run_dirs: list[Path], metric: str, sources: list[Path] | None = None) -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` over the runs (a later run overrides an epoch); ``sources`` gets the files read."""
    curve: dict[int, float] = {}
    for run_dir in run_dirs:
        values, source = run_curve(run_dir, metric)
        curve.update(values)
        if sources is not None:
            sources.append(source)
    return curve


def best_epoch(curve: dict[int, float], first: int | None = None, last: int | None = None,
               lower_is_better: bool = False) -> int:
    """The epoch in ``[first, last]`` with the best value; ties go to the earlier epoch."""
    epochs = [e for e in sorted(curve) if (first is None or e >= first) and (last is None or e <= last)]
    if not epochs:
        raise ValueError(f"no validated epoch between {first} and {last} (validated: {min(curve, default=None)}-"
                         f"{max(curve, default=None)})")
    sign = -1.0 if lower_is_better else 1.0
    return max(epochs, key=lambda e: (sign * curve[e], -e))


def checkpoint_path(run_dirs: list[Path], epoch: int) -> Path:
    """``checkpoint_epoch=<epoch>.pt`` in the last of the runs that has it."""
    for run_dir in reversed(run_dirs):
        path = Path(run_dir) / "models" / f"checkpoint_epoch={epoch}.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"checkpoint_epoch={epoch}.pt is in none of {[str(d) for d in run_dirs]} "
                            "(train with --keep_checkpoints null to keep every epoch)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="training folder(s): eval/ (or train.log) and models/")
    parser.add_argument("--metric", default="val_mean_dice", help="validation metric (default: the key metric)")
    parser.add_argument("--first", type=int, default=None, help="first epoch considered (e.g. branch epoch + 1)")
    parser.add_argument("--last", type=int, default=None, help="last epoch considered (a budget)")
    parser.add_argument("--lower-is-better", action="store_true", help="for distances (val_hd95, val_asd)")
    parser.add_argument("--table", action="store_true", help="also print every epoch's value to stderr")
    args = parser.parse_args(argv)
    sources: list[Path] = []
    try:
        curve = validation_curve(args.run_dirs, args.metric, sources)
        if not curve:
            raise ValueError(f"no '{args.metric}' among the validation metrics of {[str(d) for d in args.run_dirs]}")
        epoch = best_epoch(curve, args.first, args.last, args.lower_is_better)
        path = checkpoint_path(args.run_dirs, epoch)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.table:
        for source in sources:
            print(f"read {source}", file=sys.stderr)
        for e in sorted(curve):
            print(f"epoch {e}: {args.metric} {curve[e]:.4f}{'  <- selected' if e == epoch else ''}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
