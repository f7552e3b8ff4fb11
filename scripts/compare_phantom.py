"""Undeformed vs VoxelMorph-MSE vs AdaCS on the built-in phantom, same training budget, one table.

    python scripts/compare_phantom.py --out runs/phantom_compare [--epochs 10] [--epoch-length 100] [--skip-training]

Trains both methods with the bundle's train.yaml (VoxelMorph-MSE = ``--use_scoring false``), then evaluates the
final displacement networks (``checkpoint_final.pt``; not the best-by-validation ``model.pt``, so the test pairs
select nothing) on held-out phantom pairs (indices 200000..) with the bundle's evaluator and MONAI metrics.
Writes ``table.md``, ``table.csv`` and ``per_case.csv`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from scipy import stats

from _bundle import BUNDLE, import_bundle

import_bundle()

METRICS = ("val_mean_dice", "val_dice_myo", "val_dice_lv", "val_dice_rv", "val_hd95", "val_hd", "val_asd",
           "val_folding_pct", "val_epe")


def train(method: str, out: Path, args: argparse.Namespace) -> float:
    """Train one method with the bundle CLI; returns wall time in seconds."""
    run_dir = out / method
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.yaml",
        "--ckpt_dir", str(run_dir / "models"), "--output_dir", str(run_dir / "eval"),
        "--epochs", str(args.epochs), "--epoch_length", str(args.epoch_length),
        "--motion_warmup_epochs", str(args.motion_warmup), "--scoring_warmup_epochs", str(args.scoring_warmup),
        "--learning_rate", str(args.lr), "--use_scoring", str(method == "adacs"),
        "--phantom_mode", args.mode, "--log_every", "1000",
    ]
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(command, cwd=BUNDLE, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def evaluate(network_weights: Path | None, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Per-case metrics of a displacement network (None: the undeformed baseline) on held-out phantom pairs."""
    overrides = {
        "num_test_pairs": args.test_pairs, "phantom_mode": args.mode, "output_dir": "/tmp/adacs_compare_eval",
        "validate#handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
    }
    if network_weights is None:
        overrides["network_def"] = {"_target_": "scripts.networks.ZeroDisplacement"}
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs/train.yaml"), str(BUNDLE / "configs/evaluate.yaml")],
        workflow_type="train", bundle_root=str(BUNDLE), **overrides,
    )
    workflow.initialize()
    if network_weights is not None:
        state = torch.load(network_weights, map_location="cpu", weights_only=True)
        state = state.get("displacement_network", state)
        workflow.parser.get_parsed_content("network").load_state_dict(state)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    details = {}
    for name in METRICS:
        values = evaluator.state.metric_details[name]
        details[name] = torch.as_tensor(values).float().reshape(len(values), -1).nanmean(1).numpy()
    return details


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/phantom_compare")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epoch-length", type=int, default=100)
    parser.add_argument("--motion-warmup", type=int, default=6)
    parser.add_argument("--scoring-warmup", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mode", default="mixed")
    parser.add_argument("--test-pairs", type=int, default=64)
    parser.add_argument("--skip-training", action="store_true", help="reuse the runs already in --out")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    times = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}
    if not args.skip_training:
        for method in ("voxelmorph", "adacs"):
            (out / method).mkdir(exist_ok=True)
            times[method] = train(method, out, args)
        (out / "times.json").write_text(json.dumps(times))

    results = {"undeformed": evaluate(None, args)}
    for method in ("voxelmorph", "adacs"):
        results[method] = evaluate(out / method / "models" / "checkpoint_final.pt", args)

    header = ["method", "Dice mean", "Dice MYO", "Dice LV", "Dice RV", "HD95 px", "HD px", "ASSD px",
              "folding %", "EPE px", "train time s"]
    rows = []
    for method, details in results.items():
        cells = [method]
        for name in METRICS:
            values = details[name]
            scale = 100.0 if "dice" in name else 1.0
            cells.append(f"{scale * np.nanmean(values):.2f} ± {scale * np.nanstd(values):.2f}")
        cells.append(f"{times.get(method, 0.0):.0f}" if method in times else "-")
        rows.append(cells)
    p_mean = stats.ttest_rel(results["adacs"]["val_mean_dice"], results["voxelmorph"]["val_mean_dice"]).pvalue
    p_myo = stats.ttest_rel(results["adacs"]["val_dice_myo"], results["voxelmorph"]["val_dice_myo"]).pvalue
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append(f"{args.test_pairs} held-out phantom pairs ({args.mode}); paired t-test AdaCS vs VoxelMorph-MSE: "
                 f"mean Dice p = {p_mean:.3g}, myocardium Dice p = {p_myo:.3g}. Training: {args.epochs} epochs x "
                 f"{args.epoch_length} micro-steps of 4 pairs, lr {args.lr} (AdaCS: {args.motion_warmup} motion + "
                 f"{args.scoring_warmup} scoring warm-up epochs).")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    with open(out / "per_case.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "case"] + list(METRICS))
        for method, details in results.items():
            for i in range(len(details[METRICS[0]])):
                writer.writerow([method, i] + [f"{details[m][i]:.5f}" for m in METRICS])
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
