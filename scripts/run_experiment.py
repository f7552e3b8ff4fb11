"""The paper's experiment in one command: VoxelMorph-MSE and AdaCS trained with the same displacement budget, for one
or more seeds, then compared with undeformed and Elastix under the paper's protocol, and the seeds pooled.

    python scripts/run_experiment.py --dataset acdc --dataset-dir /work/prepared/acdc --out /work/exp_acdc
    python scripts/run_experiment.py --dataset camus --dataset-dir /work/prepared/camus --out /work/exp_camus \
        --seeds 0 1 2 --jobs 2

For each seed N, under --out:

* ``seedN/vxm``: VoxelMorph-MSE (same trainer, scoring off), motion warm-up + joint epochs, every epoch's
  checkpoint kept;
* ``seedN/adacs``: AdaCS. Its motion-only warm-up is exactly the baseline's training, so it resumes the baseline's
  checkpoint at the end of the warm-up and runs the scoring warm-up and the joint epochs: both methods get the same
  number of displacement-network updates;
* ``seedN/table``: ``compare_methods.py`` (results.md / .csv, per_slice.csv, figures). Elastix is computed once and
  its cache copied to the other seeds;
* ``pooled.md`` (two or more seeds): ``pool_seeds.py``.

Each run folder keeps ``cmd.sh`` (the exact command), ``train.log`` and ``timing.json``; a run with ``models/model.pt``
and ``timing.json`` is not trained again (``--force`` retrains), and an interrupted run continues from its last epoch
checkpoint (``progress.json`` records the attempts), so an interrupted experiment resumes where it stopped. A failed
seed is reported with its log and the others go on; the exit code is non-zero if any failed. ``--dry-run`` prints the
trainings' commands (as their ``cmd.sh`` would hold them) and runs nothing.

The schedules are config files of the bundle, ``bundle/configs/schedule_<name>.yaml``: ``--schedule cpu`` (default)
is the 2-core CPU recipe of the shipped weights (20 motion + 1 scoring warm-up + 10 joint epochs, displacement lr
1e-3, scoring lr 1e-4, alpha 0.01 on ACDC / 0.04 on CAMUS), ``--schedule paper`` the paper's (20 + 20 + 300 epochs,
lr 1e-4, the dataset config's alpha; a GPU budget). ``--motion-warmup``, ``--scoring-warmup``, ``--joint``, ``--lr``,
``--scoring-lr`` and ``--alpha`` override a schedule's values.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

SCHEDULE_EPOCHS = ("motion_warmup_epochs", "scoring_warmup_epochs", "joint_epochs")
SCHEDULE_RATES = ("learning_rate", "scoring_learning_rate")


def schedule_file(bundle: Path, name: str) -> Path:
    """``<bundle>/configs/schedule_<name>.yaml``."""
    return bundle / "configs" / f"schedule_{name}.yaml"


def schedule_names(bundle: Path = REPO / "bundle") -> list[str]:
    """The schedules a bundle defines (``cpu``, ``paper``)."""
    return sorted(path.stem[len("schedule_"):] for path in (bundle / "configs").glob("schedule_*.yaml"))


def load_schedule(path: Path) -> dict:
    """A schedule file's values, checked: epochs (whole numbers >= 0), learning rates (> 0), ``alpha`` per dataset."""
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (schedules: {', '.join(schedule_names(path.parent.parent))})")
    content = yaml.safe_load(path.read_text()) or {}
    problems = [f"unknown key {key!r}" for key in content if key not in (*SCHEDULE_EPOCHS, *SCHEDULE_RATES, "alpha")]
    number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)  # noqa: E731
    for key in SCHEDULE_EPOCHS:
        value = content.get(key)
        if not (number(value) and value == int(value) and value >= 0):
            problems.append(f"{key} is {value!r}, not a whole number of epochs")
    for key in SCHEDULE_RATES:
        value = content.get(key)
        if not (number(value) and value > 0):
            problems.append(f"{key} is {value!r}, not a positive number (YAML reads 1e-4 as text: write 0.0001)")
    alpha = content.get("alpha") or {}
    if not isinstance(alpha, dict) or not all(number(value) for value in alpha.values()):
        problems.append(f"alpha is {alpha!r}, not a mapping dataset: number")
    if problems:
        raise SystemExit(f"error: {path}: " + "; ".join(problems))
    return {**{key: int(content[key]) for key in SCHEDULE_EPOCHS},
            **{key: float(content[key]) for key in SCHEDULE_RATES}, "alpha": {k: float(v) for k, v in alpha.items()}}


@dataclass
class Plan:
    """What to train: the bundle, the dataset override config, the schedule and extra bundle arguments."""

    bundle: Path
    dataset_config: str
    dataset_dir: Path
    motion_warmup: int
    scoring_warmup: int
    joint: int
    lr: float
    scoring_lr: float
    alpha: float | None
    extra: list[str]
    threads: int
    force: bool = False
    score_headroom: float | None = None
    extra_configs: tuple[str, ...] = ()   # override configs after the dataset's (a backbone, a baseline), bundle-relative


class RunFailed(RuntimeError):
    """A training or evaluation command exited with an error."""


def bundle_command(plan: Plan, run_dir: Path, seed: int, *args: str) -> list[str]:
    """A training of ``train.yaml`` + the dataset's and the plan's override configs, outputs in ``run_dir``."""
    configs = "[" + ",".join(f"'{name}'" for name in ("configs/train.yaml", plan.dataset_config, *plan.extra_configs)) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs,
            "--dataset_dir", str(plan.dataset_dir), "--ckpt_dir", str((run_dir / "models").resolve()),
            "--output_dir", str((run_dir / "eval").resolve()), "--learning_rate", str(plan.lr),
            "--scoring_learning_rate", str(plan.scoring_lr), "--seed", str(seed), *args, *plan.extra]


def baseline_command(plan: Plan, run_dir: Path, seed: int) -> list[str]:
    """VoxelMorph-MSE: scoring off, as many displacement epochs as AdaCS, every epoch's checkpoint kept."""
    epochs = plan.motion_warmup + plan.joint
    return bundle_command(plan, run_dir, seed, "--use_scoring", "false", "--epochs", str(epochs),
                           "--motion_warmup_epochs", str(epochs), "--scoring_warmup_epochs", "0",
                           "--keep_checkpoints", "null")


def branch_checkpoint(baseline_dir: Path, plan: Plan) -> Path:
    """The baseline's checkpoint at the end of the motion-only warm-up, where AdaCS branches off."""
    return baseline_dir / "models" / f"checkpoint_epoch={plan.motion_warmup}.pt"


def adacs_command(plan: Plan, run_dir: Path, seed: int, baseline_dir: Path) -> list[str]:
    """AdaCS: resume the baseline's warm-up checkpoint, then scoring warm-up and joint epochs."""
    epochs = plan.motion_warmup + plan.scoring_warmup + plan.joint
    args = ["--resume_checkpoint", str(branch_checkpoint(baseline_dir, plan).resolve()), "--epochs", str(epochs),
            "--motion_warmup_epochs", str(plan.motion_warmup), "--scoring_warmup_epochs", str(plan.scoring_warmup)]
    if plan.alpha is not None:
        args += ["--alpha", str(plan.alpha)]
    if plan.score_headroom is not None:
        args += ["--score_headroom", str(plan.score_headroom)]
    return bundle_command(plan, run_dir, seed, *args)


def shell_script(plan: Plan, command: list[str]) -> str:
    """A training's ``cmd.sh``: from the bundle root, with the run's thread count."""
    return f"cd {shlex.quote(str(plan.bundle.resolve()))}\nOMP_NUM_THREADS={plan.threads} " + shlex.join(command) + "\n"


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(command: list[str], cwd: Path, log: Path, threads: int, append: bool = False) -> None:
    """Run a command with its output in ``log``; raise RunFailed naming the log if it fails."""
    with open(log, "a" if append else "w") as handle:
        result = subprocess.run(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=_env(threads))
    if result.returncode != 0:
        raise RunFailed(f"exit code {result.returncode}: see {log}")


def _trained(run_dir: Path) -> bool:
    return (run_dir / "models" / "model.pt").is_file() and (run_dir / "timing.json").is_file()


def latest_epoch_checkpoint(models: Path) -> tuple[int, Path] | None:
    """The run's last epoch checkpoint (epoch, path), or None before its first epoch ended."""
    found = []
    for path in models.glob("checkpoint_epoch=*.pt"):
        epoch = path.stem.split("=", 1)[1]
        if epoch.isdigit():
            found.append((int(epoch), path))
    return max(found) if found else None


def resume_from(command: list[str], checkpoint: Path) -> list[str]:
    """The same training continued from ``checkpoint`` (replacing the branch point of a branched run)."""
    if "--resume_checkpoint" in command:
        at = command.index("--resume_checkpoint")
        return [*command[: at + 1], str(checkpoint.resolve()), *command[at + 2 :]]
    return [*command, "--resume_checkpoint", str(checkpoint.resolve())]


def _work_seconds_at(attempts: list[dict], moment: float) -> float | None:
    """Training seconds spent when the wall clock read ``moment``, summed over the attempts (None: before them)."""
    for attempt in reversed(attempts):
        if attempt["started"] <= moment:
            return attempt["seconds_before"] + moment - attempt["started"]
    return None


def train(plan: Plan, run_dir: Path, command: list[str], branch_epoch_file: Path | None = None) -> dict:
    """Train one run (unless already trained) and return its timing.json content.

    An interrupted run continues from its last epoch checkpoint (the bundle keeps its best-model selection, see
    ``scripts/checkpoints.py``); its time is the sum of the attempts, each counted up to its last checkpoint.
    """
    if _trained(run_dir) and not plan.force:
        return json.loads((run_dir / "timing.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = run_dir / "progress.json"
    attempts = json.loads(progress.read_text())["attempts"] if progress.is_file() else []
    latest = None if plan.force else latest_epoch_checkpoint(run_dir / "models")
    if latest is None:
        attempts, done = [], 0.0
    else:
        command = resume_from(command, latest[1])
        done = _work_seconds_at(attempts, latest[1].stat().st_mtime) or 0.0
        print(f"{run_dir}: resuming an interrupted training from {latest[1].name}", file=sys.stderr)
    started = time.time()
    attempts.append({"started": started, "seconds_before": round(done, 1),
                     "resumed_from_epoch": None if latest is None else latest[0]})
    progress.write_text(json.dumps({"attempts": attempts}, indent=1))
    (run_dir / "cmd.sh").write_text(shell_script(plan, command))
    run_logged(command, plan.bundle, run_dir / "train.log", plan.threads, append=latest is not None)
    timing = {"seconds": round(done + time.time() - started, 1)}
    if len(attempts) > 1:
        timing["attempts"] = len(attempts)
    if branch_epoch_file is not None and branch_epoch_file.is_file():
        to_branch = _work_seconds_at(attempts, branch_epoch_file.stat().st_mtime)
        if to_branch is not None:
            timing["seconds_to_branch_checkpoint"] = round(to_branch, 1)
    (run_dir / "timing.json").write_text(json.dumps(timing, indent=1))
    return timing


def train_seed(plan: Plan, out: Path, seed: int) -> tuple[str, str]:
    """Both trainings of one seed; returns the two training-time descriptions for the table."""
    vxm_dir, adacs_dir = out / f"seed{seed}" / "vxm", out / f"seed{seed}" / "adacs"
    vxm = train(plan, vxm_dir, baseline_command(plan, vxm_dir, seed), branch_checkpoint(vxm_dir, plan))
    if not branch_checkpoint(vxm_dir, plan).is_file():
        raise RunFailed(f"{branch_checkpoint(vxm_dir, plan)} is missing: the baseline did not save its warm-up checkpoint")
    adacs = train(plan, adacs_dir, adacs_command(plan, adacs_dir, seed, vxm_dir))
    device = "GPU" if _cuda() else "CPU"
    epochs = plan.motion_warmup + plan.joint
    vxm_time = f"{vxm['seconds'] / 60:.0f} min {device} ({epochs} epochs)"
    shared = vxm.get("seconds_to_branch_checkpoint")
    if shared is None:
        adacs_time = f"{adacs['seconds'] / 60:.0f} min {device} after the shared warm-up"
    else:
        adacs_time = (f"{(shared + adacs['seconds']) / 60:.0f} min {device} ({epochs} motion + "
                      f"{plan.scoring_warmup + plan.joint} scoring epochs)")
    return vxm_time, adacs_time


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def compare_seed(args: argparse.Namespace, out: Path, seed: int, times: tuple[str, str], elastix_cache: Path | None) -> Path:
    """compare_methods.py for one seed; reuses an Elastix cache of an earlier seed (same pairs)."""
    seed_dir = out / f"seed{seed}"
    table = seed_dir / "table"
    table.mkdir(parents=True, exist_ok=True)
    if elastix_cache is not None and elastix_cache.is_file() and not (table / "elastix_ddf.npz").is_file():
        shutil.copy2(elastix_cache, table / "elastix_ddf.npz")
    command = [sys.executable, str(REPO / "scripts" / "compare_methods.py"), "--dataset-dir", str(args.dataset_dir),
               "--out", str(table), "--vxm", str(seed_dir / "vxm" / "models" / "model.pt"),
               "--adacs", str(seed_dir / "adacs" / "models" / "model.pt"),
               "--adacs-scoring", str(seed_dir / "adacs" / "models" / "scoring_model.pt"),
               "--vxm-train-time", times[0], "--adacs-train-time", times[1],
               "--image-size", str(args.image_size), "--label", str(args.label)]
    if args.score_headroom is not None:
        command += ["--score-headroom", str(args.score_headroom)]
    if args.no_elastix:
        command.append("--no-elastix")
    if args.no_figures:
        command.append("--no-figures")
    (table / "cmd.sh").write_text(shlex.join(command) + "\n")
    run_logged(command, REPO, table / "compare.log", args.threads)
    return table


def bundle_overrides(items: list[str]) -> list[str]:
    """``--bundle-arg KEY=VALUE`` items as bundle command-line overrides (``--KEY VALUE``)."""
    extra: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --bundle-arg {item!r} is not KEY=VALUE")
        extra += [f"--{key}", value]
    return extra


def make_plan(args: argparse.Namespace) -> Plan:
    schedule = load_schedule(schedule_file(args.bundle, args.schedule))
    alpha = args.alpha if args.alpha is not None else schedule["alpha"].get(args.dataset)
    extra = bundle_overrides(args.bundle_arg)
    dataset_config = args.dataset_config or f"configs/{args.dataset}.yaml"
    if not (args.bundle / dataset_config).is_file():
        raise SystemExit(f"error: {args.bundle / dataset_config} does not exist")
    if not (args.dataset_dir / "datalist.json").is_file():
        raise SystemExit(f"error: {args.dataset_dir} has no datalist.json: prepare it with scripts/prepare_{args.dataset}.py")
    pick = lambda name, key: getattr(args, name) if getattr(args, name) is not None else schedule[key]  # noqa: E731
    return Plan(bundle=args.bundle, dataset_config=dataset_config, dataset_dir=args.dataset_dir,
                motion_warmup=pick("motion_warmup", "motion_warmup_epochs"),
                scoring_warmup=pick("scoring_warmup", "scoring_warmup_epochs"), joint=pick("joint", "joint_epochs"),
                lr=pick("lr", "learning_rate"), scoring_lr=pick("scoring_lr", "scoring_learning_rate"), alpha=alpha,
                extra=extra, threads=args.threads, force=args.force, score_headroom=args.score_headroom)


def dry_run(plan: Plan, out: Path, seeds: list[int]) -> str:
    """Each seed's two training commands, as their ``cmd.sh`` would hold them (a run interrupted earlier would resume instead)."""
    lines = []
    for seed in seeds:
        vxm_dir, adacs_dir = out / f"seed{seed}" / "vxm", out / f"seed{seed}" / "adacs"
        lines += [f"# seed {seed}: VoxelMorph-MSE, {vxm_dir / 'cmd.sh'}",
                  shell_script(plan, baseline_command(plan, vxm_dir, seed)).rstrip("\n"),
                  f"# seed {seed}: AdaCS, branched from the baseline's epoch {plan.motion_warmup}, {adacs_dir / 'cmd.sh'}",
                  shell_script(plan, adacs_command(plan, adacs_dir, seed, vxm_dir)).rstrip("\n")]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments, paths made absolute (the trainings run from the bundle root)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=["acdc", "camus"], help="selects configs/<dataset>.yaml")
    parser.add_argument("--dataset-dir", required=True, type=Path, help="prepared folder (scripts/prepare_*.py)")
    parser.add_argument("--out", required=True, type=Path, help="experiment folder (created; resumable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at the same time (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / jobs)")
    parser.add_argument("--schedule", choices=schedule_names(), default="cpu",
                        help="bundle/configs/schedule_<name>.yaml (default: cpu)")
    parser.add_argument("--motion-warmup", type=int, default=None, help="motion-only warm-up epochs (schedule's)")
    parser.add_argument("--scoring-warmup", type=int, default=None, help="scoring-only warm-up epochs")
    parser.add_argument("--joint", type=int, default=None, help="joint epochs")
    parser.add_argument("--lr", type=float, default=None, help="displacement-network learning rate")
    parser.add_argument("--scoring-lr", type=float, default=None, help="scoring-network learning rate")
    parser.add_argument("--alpha", type=float, default=None, help="AdaCS alpha (default: the schedule's)")
    parser.add_argument("--score-headroom", type=float, default=None,
                        help="AdaCS score_headroom (default: the config's 0, the paper's sigmoid)")
    parser.add_argument("--bundle-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra bundle override for both trainings, e.g. epoch_length=100 (repeatable)")
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle", help="bundle root (default: the repository's)")
    parser.add_argument("--dataset-config", default=None, help="override config, relative to the bundle root")
    parser.add_argument("--image-size", type=int, default=128, help="evaluation grid (paper: 128)")
    parser.add_argument("--label", type=int, default=2, help="label evaluated (2 = myocardium)")
    parser.add_argument("--no-elastix", action="store_true", help="leave Elastix out of the tables")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--force", action="store_true", help="retrain runs that are already trained")
    parser.add_argument("--dry-run", action="store_true", help="print the trainings' commands and run nothing")
    args = parser.parse_args(argv)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    args.dataset_dir, args.out, args.bundle = args.dataset_dir.resolve(), args.out.resolve(), args.bundle.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    if args.dry_run:
        print(dry_run(plan, args.out, args.seeds), end="")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)

    def one_seed(seed: int) -> tuple[int, tuple[str, str] | None, str]:
        try:
            return seed, train_seed(plan, args.out, seed), ""
        except RunFailed as error:
            return seed, None, str(error)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        trained = list(pool.map(one_seed, args.seeds))
    failed = [(seed, why) for seed, times, why in trained if times is None]
    tables: list[Path] = []
    elastix_cache: Path | None = None
    for seed, times, _ in trained:
        if times is None:
            continue
        try:
            table = compare_seed(args, args.out, seed, times, elastix_cache)
        except RunFailed as error:
            failed.append((seed, f"comparison: {error}"))
            continue
        tables.append(table)
        elastix_cache = elastix_cache or (table / "elastix_ddf.npz")
        print(f"seed {seed}: {table / 'results.md'}")
        print((table / "results.md").read_text())
    if len(tables) >= 2:
        command = [sys.executable, str(REPO / "scripts" / "pool_seeds.py"), *map(str, tables), "--out",
                   str(args.out / "pooled.md")]
        try:
            run_logged(command, REPO, args.out / "pool.log", args.threads)
            print((args.out / "pooled.md").read_text())
        except RunFailed as error:
            failed.append((-1, f"pooling: {error}"))
    for seed, why in failed:
        print(f"error: seed {seed} failed: {why}" if seed >= 0 else f"error: {why}", file=sys.stderr)
    return 1 if failed or not tables else 0


if __name__ == "__main__":
    sys.exit(main())
