"""The epoch checkpoint with the best validation metric of a training, within an epoch range.

    python scripts/best_checkpoint.py RUN_DIR [RUN_DIR ...] [--metric val_mean_dice] [--first 21] [--last 60] [--table]

A RUN_DIR is a training's folder: ``train.log`` (the bundle's console output) and ``models/checkpoint_epoch=E.pt``
(train with ``--keep_checkpoints null`` to keep every epoch). Several folders are one training continued in another
folder (``--resume_checkpoint`` from the first into the second): their logs are read together.

It prints the path of the checkpoint to evaluate, e.g. for ``compare_methods.py --vxm``. Uses:

* the best validation epoch within a budget (``--last``), to compare runs of different lengths at equal length;
* selection on another metric than the trainer's key metric (``--metric val_dice_myo``);
* ``model.pt`` of a branched run is the best of its own epochs: ``--first`` = the branch epoch + 1.

The metric is read from the log lines ``Epoch[E] Metrics -- ... name: value`` (4 decimals); ties go to the earlier
epoch. Run as a file: ``python scripts/best_checkpoint.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_METRICS_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)")


def validation_curve(run_dirs: list[Path], metric: str) -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` from the runs' ``train.log`` files (a later run overrides an epoch)."""
    curve: dict[int, float] = {}
    for run_dir in run_dirs:
        log = Path(run_dir) / "train.log"
        if not log.is_file():
            raise FileNotFoundError(f"{log}: not found (expected a training folder with its train.log)")
        for line in log.read_text(errors="replace").splitlines():
            found = _METRICS_LINE.search(line)
            if not found:
                continue
            values = dict(re.findall(r"(\w+): (\S+)", found.group(2)))
            if metric in values:
                curve[int(found.group(1))] = float(values[metric])
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
    parser.add_argument("run_dirs", nargs="+", type=Path, help="training folder(s): train.log and models/")
    parser.add_argument("--metric", default="val_mean_dice", help="validation metric (default: the key metric)")
    parser.add_argument("--first", type=int, default=None, help="first epoch considered (e.g. branch epoch + 1)")
    parser.add_argument("--last", type=int, default=None, help="last epoch considered (a budget)")
    parser.add_argument("--lower-is-better", action="store_true", help="for distances (val_hd95, val_asd)")
    parser.add_argument("--table", action="store_true", help="also print every epoch's value to stderr")
    args = parser.parse_args(argv)
    try:
        curve = validation_curve(args.run_dirs, args.metric)
        if not curve:
            raise ValueError(f"no '{args.metric}' in the logs of {[str(d) for d in args.run_dirs]}")
        epoch = best_epoch(curve, args.first, args.last, args.lower_is_better)
        path = checkpoint_path(args.run_dirs, epoch)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.table:
        for e in sorted(curve):
            print(f"epoch {e}: {args.metric} {curve[e]:.4f}{'  <- selected' if e == epoch else ''}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
