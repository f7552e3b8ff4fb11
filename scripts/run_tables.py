"""The paper's Tables 1, 3 and 4 in one command: every row (backbone x method, ``scripts/paper_tables.yaml``) trained
with the same displacement budget on the same split and seed, evaluated by the paper's protocol, and written in the
paper's layout with the paper's numbers beside ours.

    python scripts/run_tables.py --dataset acdc --dataset-dir /work/prepared/acdc --out /work/tables/acdc
    python scripts/run_tables.py --dataset acdc --dataset-dir /work/prepared/acdc --out /work/tables/acdc \\
        --backbones vxm --seeds 1 2 --jobs 2 --report bundle/docs/reports/paper_tables_acdc.md

Budget: ``bundle/configs/schedule_<name>.yaml`` (``--schedule table``, the default: 500 displacement updates per row).
One-network rows (MSE, the data terms, AdaFrame, AdaReg) train that budget from scratch; two-network rows (AdaCS, its
L_smooth ablation, NLL, beta-NLL) branch off their backbone's MSE run at the end of its motion-only warm-up, as in
``run_experiment.py``. Every row is evaluated on the dataset's ``testing`` section with ``evaluate_paper.yaml``
(myocardium, DSC / symmetric max HD / one-way ASD in pixels at 128 x 128, folding %), using the weights at the end of
the budget (``checkpoint_final.pt``: no row is chosen on validation). Training time per step: the median training
epoch (for two-network rows, a joint epoch) over its micro-steps.

Per row, ``<out>/<backbone>/<method>/seed<N>/``: ``cmd.sh``, ``train.log``, ``timing.json``, ``models/``,
``test/`` (the evaluation's CSVs), ``row.json`` (the row's results), copied to ``--results`` (default ``<out>``) as
``<backbone>/<method>/seed<N>.json``: a row whose result is there is finished and kept, on any machine (keep
``--results`` in the repository, e.g. ``bundle/docs/reports/paper_tables/acdc``, and commit it as rows arrive; the
models stay in ``--out``; where a two-network row's MSE run has a result but no checkpoints there, its warm-up alone
is trained again, in ``<out>/branch_points``). An interrupted training continues from its last epoch checkpoint.
Undeformed and Elastix come from ``compare_methods.py`` (``<out>/reference``, its table copied to
``<results>/reference.csv``; ``--elastix-cache`` reuses an ``elastix_ddf.npz`` of the same pairs). After every row,
``<out>/tables.md`` / ``tables.csv`` (and ``--report``) are rewritten from every finished row in ``--results``, pooling
seeds. A failed row is reported with its log and the others go on (exit code 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from run_experiment import (REPO, Plan, RunFailed, branch_checkpoint, bundle_command, bundle_overrides, load_schedule,
                            run_logged, schedule_file, schedule_names, shell_script, train)

ROWS_FILE = Path(__file__).with_name("paper_tables.yaml")
METRICS = ("dice", "hd", "asd", "folding")
TRAINER_EPOCH = re.compile(r"AdaCSTrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


@dataclass(frozen=True)
class Row:
    """One trained row of the tables: a backbone, a method and a seed."""

    backbone: str
    method: str
    seed: int
    backbone_configs: tuple[str, ...]
    method_configs: tuple[str, ...]
    args: tuple[tuple[str, str], ...]
    branched: bool

    @property
    def configs(self) -> tuple[str, ...]:
        """The override configs after the dataset's: the backbone's, then the method's."""
        return self.backbone_configs + self.method_configs

    @property
    def key(self) -> str:
        return f"{self.backbone}/{self.method}"

    @property
    def mse(self) -> "Row":
        """The same backbone and seed's MSE row (the one two-network rows branch off)."""
        return Row(self.backbone, "mse", self.seed, self.backbone_configs, (), (), False)

    def folder(self, out: Path) -> Path:
        return out / self.backbone / self.method / f"seed{self.seed}"

    def result_file(self, results: Path) -> Path:
        return results / self.backbone / self.method / f"seed{self.seed}.json"


def load_rows_file(path: Path = ROWS_FILE) -> dict:
    """``paper_tables.yaml``: backbones, methods, tables and the paper's numbers."""
    return yaml.safe_load(path.read_text())


def make_rows(spec: dict, backbones: list[str], methods: list[str], seeds: list[int]) -> list[Row]:
    """The rows to run: every MSE row first (two-network rows branch off them and wait for them), then the other
    one-network rows, then the two-network rows, each backbone by backbone, so that no worker waits while a row is
    ready."""
    rows = []
    for backbone in backbones:
        for method in methods:
            entry = spec["methods"][method]
            for seed in seeds:
                rows.append(Row(backbone, method, seed, tuple(spec["backbones"][backbone]["configs"]),
                                tuple(entry.get("configs", [])),
                                tuple((k, str(v)) for k, v in (entry.get("args") or {}).items()),
                                entry["kind"] == "branched"))
    rank = lambda row: (row.method != "mse", row.branched, backbones.index(row.backbone))  # noqa: E731
    return sorted(rows, key=rank)


def training_command(plan: Plan, row: Row, out: Path) -> list[str]:
    """The row's training: the whole budget from scratch, or branched off the same backbone's MSE run."""
    row_plan = replace(plan, extra_configs=row.configs)
    extra = [item for key, value in row.args for item in (f"--{key}", value)]
    run_dir = row.folder(out)
    if not row.branched:
        epochs = plan.motion_warmup + plan.joint
        keep = ["--keep_checkpoints", "null"] if row.method == "mse" else []
        return bundle_command(row_plan, run_dir, row.seed, "--use_scoring", "false", "--epochs", str(epochs),
                               "--motion_warmup_epochs", str(epochs), "--scoring_warmup_epochs", "0", *keep, *extra)
    epochs = plan.motion_warmup + plan.scoring_warmup + plan.joint
    args = ["--resume_checkpoint", str(branch_source(plan, row, out).resolve()), "--epochs", str(epochs),
            "--motion_warmup_epochs", str(plan.motion_warmup), "--scoring_warmup_epochs", str(plan.scoring_warmup)]
    if plan.alpha is not None:
        args += ["--alpha", str(plan.alpha)]
    return bundle_command(row_plan, run_dir, row.seed, *args, *extra)


def evaluation_command(plan: Plan, row: Row, weights: Path, test_dir: Path) -> list[str]:
    """``evaluate.yaml`` + ``evaluate_paper.yaml`` on the testing section, with the row's configs (network_def)."""
    configs = ["configs/train.yaml", plan.dataset_config, *row.configs, "configs/evaluate.yaml", "configs/evaluate_paper.yaml"]
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", "[" + ",".join(f"'{c}'" for c in configs) + "]",
            "--dataset_dir", str(plan.dataset_dir), "--ckpt_path", str(weights.resolve()),
            "--output_dir", str(test_dir.resolve()), *(item for key, value in row.args for item in (f"--{key}", value)),
            *plan.extra]


def final_weights(run_dir: Path) -> Path:
    """The displacement network at the end of the budget, as a flat state dict (``final_model.pt``)."""
    import torch

    final = run_dir / "models" / "final_model.pt"
    if not final.is_file():
        checkpoint = run_dir / "models" / "checkpoint_final.pt"
        if not checkpoint.is_file():
            raise RunFailed(f"{checkpoint} is missing: the training did not finish")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["displacement_network"]
        torch.save(state, final.with_suffix(".tmp"))
        final.with_suffix(".tmp").replace(final)
    return final


def summary_metric(test_dir: Path, metric: str) -> dict:
    """Mean, std and count of one paper metric from MetricsSaver's ``paper_<metric>_summary.csv``."""
    with open(test_dir / f"paper_{metric}_summary.csv") as handle:
        for line in csv.DictReader(handle):
            if line["class"] == "mean":
                return {"mean": float(line["mean"]), "std": float(line["std"]), "n": int(float(line["notnans"]))}
    raise RunFailed(f"{test_dir}: no mean row in paper_{metric}_summary.csv")


def dice_per_case(test_dir: Path) -> dict[str, float]:
    """Per-slice Dice from MetricsSaver's ``paper_dice_raw.csv``, by file name (NaN: a dropped slice)."""
    with open(test_dir / "paper_dice_raw.csv") as handle:
        return {Path(line["filename"]).name: float(line["class0"]) for line in csv.DictReader(handle)}


def seconds_per_step(log: Path, first_epoch: int, micro_steps: int) -> float | None:
    """Median training-epoch time (epochs >= ``first_epoch``) over its micro-steps, from the trainer's log lines."""
    times = [int(h) * 3600 + int(m) * 60 + float(s) for epoch, h, m, s in TRAINER_EPOCH.findall(log.read_text())
             if int(epoch) >= first_epoch] if log.is_file() else []
    return statistics.median(times) / micro_steps if times else None


BRANCH_POINTS = "branch_points"  # MSE warm-ups trained again to branch from, when only the MSE row's result is here
_MSE_LOCKS: dict[tuple[str, int], threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def branch_source(plan: Plan, row: Row, out: Path) -> Path:
    """Where a two-network row's branch checkpoint is (or will be): its MSE run's own, else a warm-up trained again."""
    own = branch_checkpoint(row.mse.folder(out), plan)
    return own if own.is_file() else branch_checkpoint(row.mse.folder(out / BRANCH_POINTS), plan)


def branch_point(plan: Plan, row: Row, out: Path) -> Path:
    """The checkpoint a two-network row branches from: its backbone's MSE run at the end of the motion-only warm-up.
    Where that run's result came from another machine (``--results``) and its checkpoints are not in ``out``, the MSE
    run's warm-up alone is trained again here, once, in ``out/branch_points`` (its recorded result is kept)."""
    checkpoint = branch_source(plan, row, out)
    if checkpoint.is_file():
        return checkpoint
    mse, warmup_only = row.mse, replace(plan, joint=0)  # the same run, stopped at the branch point
    with _LOCKS_LOCK:
        lock = _MSE_LOCKS.setdefault((row.backbone, row.seed), threading.Lock())
    with lock:
        if not checkpoint.is_file():
            train(warmup_only, mse.folder(out / BRANCH_POINTS), training_command(warmup_only, mse, out / BRANCH_POINTS))
    if not checkpoint.is_file():
        raise RunFailed(f"{checkpoint} is missing: the MSE run did not save its warm-up checkpoint")
    return checkpoint


def run_row(plan: Plan, row: Row, out: Path, results: Path, micro_steps: int, dependency: Future | None) -> dict:
    """Train (or resume) and evaluate one row; write its ``row.json`` and its result file, and return it."""
    run_dir = row.folder(out)
    if row.result_file(results).is_file() and not plan.force:
        return json.loads(row.result_file(results).read_text())
    if dependency is not None:
        dependency.result()  # raises if the MSE run failed
    if row.branched:
        branch_point(plan, row, out)
    timing = train(plan, run_dir, training_command(plan, row, out))
    weights = final_weights(run_dir)
    test_dir = run_dir / "test"
    command = evaluation_command(plan, row, weights, test_dir)
    (run_dir / "evaluate.sh").write_text(shell_script(plan, command))
    run_logged(command, plan.bundle, run_dir / "evaluate.log", plan.threads)
    first = plan.motion_warmup + plan.scoring_warmup + 1 if row.branched else 1
    result = {"row": row.key, "backbone": row.backbone, "method": row.method, "seed": row.seed,
              **{metric: summary_metric(test_dir, metric) for metric in METRICS},
              "seconds_per_step": seconds_per_step(run_dir / "train.log", first, micro_steps),
              "training_seconds": timing["seconds"], "branched": row.branched,
              "budget": {"displacement_epochs": plan.motion_warmup + plan.joint, "lr": plan.lr}}
    (run_dir / "row.json").write_text(json.dumps(result, indent=1))
    row.result_file(results).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "row.json", row.result_file(results))
    return result


def record_finished(out: Path, results: Path) -> None:
    """Copy the results of rows finished in ``out`` (and its reference table) that ``results`` lacks."""
    for path in out.glob("*/*/seed*/row.json"):
        target = results / path.parts[-4] / path.parts[-3] / f"{path.parts[-2]}.json"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    if (out / "reference" / "results.csv").is_file() and not (results / "reference.csv").is_file():
        results.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "reference" / "results.csv", results / "reference.csv")


# ---- tables ---------------------------------------------------------------------------------------------------------

def finished_rows(results: Path, out: Path) -> dict[str, list[dict]]:
    """Every finished row in ``results``, by ``backbone/method``, one entry per seed; with its per-slice Dice where
    its evaluation is in ``out`` (kept there only: per-slice values of the datasets are not committed) and is the one
    recorded: a run trained again on another machine (not bit-reproducible) has other values, and a p-value from it
    would not belong to the row the table shows."""
    found: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*/*/seed*.json")):
        result = json.loads(path.read_text())
        test_dir = out / result["backbone"] / result["method"] / path.stem / "test"
        if (test_dir / "paper_dice_raw.csv").is_file():
            per_case = dice_per_case(test_dir)
            here, recorded = _nanmean(per_case.values()), result["dice"]["mean"]
            if abs(here - recorded) < 5e-3:
                result["dice_per_case"] = per_case
            else:
                print(f"{test_dir}: not the recorded run ({here:.2f}, recorded {recorded:.2f}); no per-slice p from it",
                      file=sys.stderr)
        found.setdefault(result["row"], []).append(result)
    return found


def _nanmean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def pooled(results: list[dict]) -> dict:
    """Seed-pooled row: the mean over seeds of each metric's mean, the slice std of the seeds averaged."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    row = {f"{metric}_{stat}": mean([r[metric][stat] for r in results]) for metric in METRICS for stat in ("mean", "std")}
    steps = [r["seconds_per_step"] for r in results if r["seconds_per_step"] is not None]
    cases = [r.get("dice_per_case") for r in results]
    per_case = ({case: mean([c[case] for c in cases]) for case in cases[0]}  # the seeds' mean, slice by slice
                if all(cases) and all(set(c) == set(cases[0]) for c in cases) else None)
    row.update(seeds=len(results), n=results[0]["dice"]["n"], seconds_per_step=mean(steps) if steps else math.nan,
               dice_per_case=per_case, seed_list=sorted(r["seed"] for r in results),
               dice_by_seed={r["seed"]: r["dice"]["mean"] for r in results},
               training_minutes=mean([r["training_seconds"] for r in results]) / 60)
    row["dice_seed_range"] = (min(row["dice_by_seed"].values()), max(row["dice_by_seed"].values()))
    return row


def _with_mse(rows: dict[str, dict], key: str) -> tuple[dict, dict] | None:
    """The row and its backbone's MSE row, or None for an MSE row or when either is missing."""
    mse, row = rows.get(key.split("/")[0] + "/mse"), rows.get(key)
    return None if key.endswith("/mse") or not mse or not row else (row, mse)


def p_against_mse(rows: dict[str, dict], key: str, results: Path) -> float | None:
    """Paired t-test p of the row's per-slice Dice (mean over its seeds) against its backbone's MSE row with the same
    seeds, over the slices valid in both. Computed where both evaluations are in ``out`` and kept in
    ``<results>/<backbone>/<method>/p_vs_mse.json`` (read back on a machine without them)."""
    import numpy as np
    from scipy import stats

    pair = _with_mse(rows, key)
    if not pair or pair[0]["seed_list"] != pair[1]["seed_list"]:
        return None
    row, mse = pair
    kept = results / key / "p_vs_mse.json"
    if mse["dice_per_case"] and row["dice_per_case"]:
        common = sorted(set(mse["dice_per_case"]) & set(row["dice_per_case"]))
        a = np.array([row["dice_per_case"][c] for c in common])
        b = np.array([mse["dice_per_case"][c] for c in common])
        valid = np.isfinite(a) & np.isfinite(b)
        if valid.sum() < 2:
            return None
        p = float(stats.ttest_rel(a[valid], b[valid]).pvalue)
        kept.write_text(json.dumps({"seeds": row["seed_list"], "p": p, "slices": int(valid.sum())}, indent=1))
        return p
    if kept.is_file():
        stored = json.loads(kept.read_text())
        return stored["p"] if stored["seeds"] == row["seed_list"] else None
    return None


def p_over_seeds(rows: dict[str, dict], key: str, least: int = 3) -> float | None:
    """Paired t-test p of the row's mean Dice per training seed against its backbone's MSE row's, over the seeds both
    have (at least ``least``): does the gap survive retraining? (The per-slice p does not ask that.)"""
    from scipy import stats

    pair = _with_mse(rows, key)
    if not pair:
        return None
    row, mse = pair
    seeds = sorted(set(mse["dice_by_seed"]) & set(row["dice_by_seed"]))
    if len(seeds) < least:
        return None
    ours, baseline = [row["dice_by_seed"][s] for s in seeds], [mse["dice_by_seed"][s] for s in seeds]
    return float(stats.ttest_rel(ours, baseline).pvalue)


def reference_rows(results: Path) -> dict[str, dict]:
    """Undeformed and Elastix from ``<results>/reference.csv`` (compare_methods.py's table), if it ran."""
    path = results / "reference.csv"
    if not path.is_file():
        return {}
    rows = {}
    with open(path) as handle:
        for line in csv.DictReader(handle):
            rows[line["method"].lower()] = {**{f"{m}_mean": float(line[f"{m}_mean"]) for m in METRICS},
                                            "dice_std": float(line["dice_std"]), "n": int(line["n_slices"])}
    return rows


def _p(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else (f"{value:.2g}" if value >= 1e-4 else "<1e-4")


def _cell(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def ordering_notes(spec: dict, dataset: str, rows: dict[str, dict], backbones: list[str], methods: list[str]) -> list[str]:
    """Per backbone, the methods by DSC, ours and the paper's, and whether the best one differs."""
    notes = []
    paper = spec["paper"][dataset]
    for backbone in backbones:
        present = [m for m in methods if f"{backbone}/{m}" in rows]
        if len(present) < 2:
            continue
        name = lambda m: spec["methods"][m]["name"]  # noqa: E731
        ours = sorted(present, key=lambda m: -rows[f"{backbone}/{m}"]["dice_mean"])
        theirs = sorted(present, key=lambda m: -paper[f"{backbone}/{m}"][0])
        verdict = "same order" if ours == theirs else (
            "same best" if ours[0] == theirs[0] else f"**different best: ours {name(ours[0])}, the paper's {name(theirs[0])}**")
        notes.append(f"- {spec['backbones'][backbone]['name']}: ours {' > '.join(map(name, ours))}; paper "
                     f"{' > '.join(map(name, theirs))} ({verdict}).")
    return notes


def write_tables(spec: dict, dataset: str, out: Path, results: Path, budget: str, report: Path | None) -> None:
    """``<out>/tables.md`` / ``tables.csv`` from every finished row in ``results`` (and the reference rows), in the
    paper's layout."""
    rows = {key: pooled(seeds) for key, seeds in finished_rows(results, out).items()}
    reference = reference_rows(results)
    paper, extra = spec["paper"][dataset], spec.get("paper_extra", {}).get(dataset, {})
    backbones = list(spec["backbones"])
    header = ("| Backbone | Method | DSC | p vs MSE | p seeds | HD px | ASD px | folding % | s/step | seeds | paper DSC "
              "| paper HD | paper ASD | paper folding % | paper s/step |")
    lines = [f"# The paper's tables on {dataset.upper()}: our rows beside the paper's", "",
             f"Filled by `python scripts/run_tables.py --dataset {dataset} --dataset-dir <prepared> --out <folder>` "
             "(in one sitting or several: `--backbones`, `--methods` and `--seeds` choose the rows; finished rows are "
             "kept; each row's exact commands are in its folder's `cmd.sh` and `evaluate.sh`).", "",
             f"Budget: {budget}. Ours: mean ± std over test slices (mean over seeds when several; `seeds` says how "
             "many), myocardium at ES, paper protocol; `–`: not run yet or not reported. p vs MSE: paired t-test of "
             "the per-slice Dice against the same backbone's MSE row (same seeds); it says how consistently a row "
             "differs across slices, not across training runs; `–` for a row run on a machine without the MSE row's "
             "evaluation (per-slice values are not committed, and MSE trained again is not the same run). p seeds: "
             "paired t-test of the mean Dice per training seed against MSE's (three seeds or more): whether the gap "
             "survives retraining. "
             "s/step: seconds per training micro-step of 4 pairs (the paper's T_train), measured while other rows "
             "trained beside it.", ""]
    csv_rows = []
    for table in spec["tables"].values():
        lines += [f"## {table['title']}", "", header, "|" + "---|" * 15]
        if table["methods"][0] == "mse" or "mse" not in table["methods"]:
            for name in ("undeformed", "elastix") if table is spec["tables"].get("table1") else ():
                ours = reference.get(name)
                lines.append(f"| – | {name.capitalize()} | " + (
                    f"{ours['dice_mean']:.2f} ± {ours['dice_std']:.2f} | – | – | {ours['hd_mean']:.2f} | {ours['asd_mean']:.2f} "
                    f"| {ours['folding_mean']:.3f} | – | – " if ours else "– | – | – | – | – | – | – | – ")
                    + f"| {paper[name][0]:.2f} | {paper[name][1]:.2f} | {paper[name][2]:.2f} | – | – |")
        for backbone in backbones:
            for method in table["methods"]:
                key = f"{backbone}/{method}"
                ours, theirs, more = rows.get(key), paper.get(key), extra.get(key)
                p_value = p_against_mse(rows, key, results)
                cells = (f"{ours['dice_mean']:.2f} ± {ours['dice_std']:.2f} | {_p(p_value)} | "
                         f"{_p(p_over_seeds(rows, key))} | {ours['hd_mean']:.2f} | {ours['asd_mean']:.2f} | {ours['folding_mean']:.3f} | {_cell(ours['seconds_per_step'])} | "
                         f"{ours['seeds']}" if ours else "– | – | – | – | – | – | – | 0")
                lines.append(f"| {spec['backbones'][backbone]['name']} | {spec['methods'][method]['name']} | {cells} | "
                             f"{_cell(theirs and theirs[0])} | {_cell(theirs and theirs[1])} | {_cell(theirs and theirs[2])} | "
                             f"{_cell(more and more[1])} | {_cell(more and more[2])} |")
        notes = ordering_notes(spec, dataset, rows, backbones, table["methods"])
        lines += ["", "Order by DSC, per backbone (rows run so far):", *notes] if notes else []
        lines.append("")
    for key, row in sorted(rows.items()):
        theirs = paper.get(key) or [math.nan] * 3
        kept = {k: v for k, v in row.items() if k not in ("dice_seed_range", "dice_per_case", "dice_by_seed")}
        csv_rows.append({"row": key, **kept,
                         "p_vs_mse": p_against_mse(rows, key, results), "p_over_seeds": p_over_seeds(rows, key),
                         "dice_seed_min": row["dice_seed_range"][0], "dice_seed_max": row["dice_seed_range"][1],
                         "paper_dice": theirs[0], "paper_hd": theirs[1], "paper_asd": theirs[2]})
    text = "\n".join(lines)
    (out / "tables.md").write_text(text)
    if csv_rows:
        with open(out / "tables.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
            writer.writeheader()
            writer.writerows(csv_rows)
    if report is not None:
        report.write_text(text)


# ---- command line ---------------------------------------------------------------------------------------------------

def make_plan(args: argparse.Namespace) -> Plan:
    schedule = load_schedule(schedule_file(args.bundle, args.schedule))
    extra = bundle_overrides(args.bundle_arg)
    pick = lambda name, key: getattr(args, name) if getattr(args, name) is not None else schedule[key]  # noqa: E731
    if not (args.dataset_dir / "datalist.json").is_file():
        raise SystemExit(f"error: {args.dataset_dir} has no datalist.json: prepare it with scripts/prepare_{args.dataset}.py")
    return Plan(bundle=args.bundle, dataset_config=f"configs/{args.dataset}.yaml", dataset_dir=args.dataset_dir,
                motion_warmup=pick("motion_warmup", "motion_warmup_epochs"),
                scoring_warmup=pick("scoring_warmup", "scoring_warmup_epochs"), joint=pick("joint", "joint_epochs"),
                lr=schedule["learning_rate"], scoring_lr=schedule["scoring_learning_rate"],
                alpha=schedule["alpha"].get(args.dataset), extra=extra, threads=args.threads, force=args.force)


def budget_text(plan: Plan, schedule: str, micro_steps: int, batch: int, accumulation: int) -> str:
    epochs = plan.motion_warmup + plan.joint
    return (f"schedule_{schedule}.yaml, {epochs} displacement epochs x {micro_steps} micro-steps of {batch} pairs, an "
            f"update every {accumulation} (effective batch {batch * accumulation}): "
            f"{epochs * micro_steps // accumulation} displacement updates per "
            f"row, displacement lr {plan.lr:g}; two-network rows branch off their backbone's MSE run at epoch "
            f"{plan.motion_warmup}, then {plan.scoring_warmup} + {plan.joint} epochs; alpha {plan.alpha:g} for every "
            "backbone; the weights at the end of the budget; 2-core CPU, two rows trained at a time")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    spec = load_rows_file()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=["acdc", "camus"])
    parser.add_argument("--dataset-dir", required=True, type=Path, help="prepared folder (scripts/prepare_*.py)")
    parser.add_argument("--out", required=True, type=Path, help="tables folder (created; resumable row by row)")
    parser.add_argument("--backbones", nargs="+", default=list(spec["backbones"]), choices=list(spec["backbones"]))
    parser.add_argument("--methods", nargs="+", default=list(spec["methods"]), choices=list(spec["methods"]))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--schedule", choices=schedule_names(), default="table")
    parser.add_argument("--motion-warmup", type=int, default=None, help="override the schedule's (a quick check)")
    parser.add_argument("--scoring-warmup", type=int, default=None, help="override the schedule's")
    parser.add_argument("--joint", type=int, default=None, help="override the schedule's")
    parser.add_argument("--bundle-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra bundle override for every training and evaluation (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="rows trained at the same time (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="threads per row (default: cores / jobs)")
    parser.add_argument("--elastix-cache", type=Path, default=None, help="an elastix_ddf.npz of the same pairs")
    parser.add_argument("--no-reference", action="store_true", help="skip the Undeformed / Elastix rows")
    parser.add_argument("--results", type=Path, default=None,
                        help="finished rows' results (default: --out); in the repository, commit them as rows arrive")
    parser.add_argument("--report", type=Path, default=None, help="also write tables.md here (e.g. bundle/docs/reports/...)")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from finished rows; train nothing")
    parser.add_argument("--force", action="store_true", help="retrain and re-evaluate finished rows")
    parser.add_argument("--dry-run", action="store_true", help="print each row's training command and run nothing")
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle")
    args = parser.parse_args(argv)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    args.dataset_dir, args.out, args.bundle = args.dataset_dir.resolve(), args.out.resolve(), args.bundle.resolve()
    args.results = (args.results or args.out).resolve()
    return args


def reference(args: argparse.Namespace) -> None:
    """Undeformed and Elastix on the same pairs (compare_methods.py without networks)."""
    folder = args.out / "reference"
    if (args.results / "reference.csv").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    if args.elastix_cache and args.elastix_cache.is_file():
        shutil.copy2(args.elastix_cache, folder / "elastix_ddf.npz")
    command = [sys.executable, str(REPO / "scripts" / "compare_methods.py"), "--dataset-dir", str(args.dataset_dir),
               "--out", str(folder), "--no-figures"]
    (folder / "cmd.sh").write_text(shlex.join(command) + "\n")
    run_logged(command, REPO, folder / "compare.log", args.threads)
    record_finished(args.out, args.results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = load_rows_file()
    plan = make_plan(args)
    dataset_config = yaml.safe_load((args.bundle / plan.dataset_config).read_text())
    overrides = dict(zip(plan.extra[::2], plan.extra[1::2]))
    micro_steps = int(overrides.get("--epoch_length", dataset_config["epoch_length"]))
    accumulation = int(overrides.get("--accumulation_steps", dataset_config.get("accumulation_steps", 1)))
    batch = int(overrides.get("--batch_size", dataset_config.get("batch_size", 1)))
    budget = budget_text(plan, args.schedule, micro_steps, batch, accumulation)
    rows = make_rows(spec, args.backbones, args.methods, args.seeds)
    missing = sorted({c for row in rows for c in row.configs if not (args.bundle / c).is_file()})
    if args.dry_run:
        for row in rows:
            print(f"# {row.key} seed {row.seed}\n" + shell_script(plan, training_command(plan, row, args.out)), end="")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    record_finished(args.out, args.results)
    lock, failed = threading.Lock(), []

    def one(row: Row, dependency: Future | None) -> dict | None:
        try:
            absent = [c for c in row.configs if c in missing]
            if absent:
                raise RunFailed(f"{', '.join(absent)} does not exist in {args.bundle}")
            result = run_row(plan, row, args.out, args.results, micro_steps, dependency)
        except RunFailed as error:
            with lock:
                failed.append(f"{row.key} seed {row.seed}: {error}")
                print(f"error: {row.key} seed {row.seed}: {error}", file=sys.stderr, flush=True)
            raise
        with lock:
            write_tables(spec, args.dataset, args.out, args.results, budget, args.report)
            print(f"{row.key} seed {row.seed}: DSC {result['dice']['mean']:.2f}", flush=True)
        return result

    if not args.tables_only:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            mse: dict[tuple[str, int], Future] = {}
            futures = []
            for row in rows:  # a branched row comes after its MSE run: it waits for a running or finished one, never a queued one
                future = pool.submit(one, row, mse.get((row.backbone, row.seed)) if row.branched else None)
                if row.method == "mse":
                    mse[(row.backbone, row.seed)] = future
                futures.append(future)
            for future in futures:
                future.exception()
        if not args.no_reference:
            try:
                reference(args)
            except RunFailed as error:
                failed.append(f"reference rows: {error}")
    write_tables(spec, args.dataset, args.out, args.results, budget, args.report)
    print((args.out / "tables.md").read_text())
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
