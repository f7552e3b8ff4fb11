"""Run the bundle's training with overrides and record every micro-step's loss terms (helper of test_multi_gpu.py).

    python tests/ddp_runner.py --out OUT.json [--override '{"batch_size": 4, ...}']
    torchrun --standalone --nnodes=1 --nproc_per_node=2 tests/ddp_runner.py --distributed --out OUT.json ...

Builds ``ConfigWorkflow`` from ``configs/train.yaml`` (plus ``configs/multi_gpu_train.yaml`` with
``--distributed``), attaches an ``ITERATION_COMPLETED`` handler to ``train#trainer`` that records the trainer's
loss terms averaged over the ranks (``dist.all_reduce``), runs the workflow's own ``initialize``/``run``/``finalize``
and, on rank 0 only, writes ``OUT.json`` (world size, phases, per-iteration terms) and ``OUT.pt`` (initial and final
state dicts of both networks, unwrapped from DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the network itself otherwise)."""
    return network.module if hasattr(network, "module") else network


def rank_mean(values: list[float]) -> list[float]:
    """Mean over the data-parallel ranks (identity in a single process); NaN stays NaN."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).tolist()


def snapshot(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(network).state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON output (rank 0); the weights go to OUT.pt")
    parser.add_argument("--distributed", action="store_true", help="add configs/multi_gpu_train.yaml (run with torchrun)")
    parser.add_argument("--override", default="{}", help="JSON dict of config overrides (id: value)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = json.loads(args.override)

    os.chdir(BUNDLE)  # bundle_root is '.'
    sys.path.insert(0, str(BUNDLE))
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from scripts.trainer import LOSS_TERMS, loss_terms

    configs = ["configs/train.yaml"] + (["configs/multi_gpu_train.yaml"] if args.distributed else [])
    workflow = ConfigWorkflow(config_file=configs, meta_file="configs/metadata.json", workflow_type="train", **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    network = workflow.parser.get_parsed_content("network")
    scoring_network = workflow.parser.get_parsed_content("scoring_network")
    initial = {"displacement": snapshot(network), "scoring": snapshot(scoring_network)}
    records: list[dict[str, Any]] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine) -> None:
        terms = loss_terms(engine.state.output)
        values = rank_mean([terms.get(k, math.nan) for k in LOSS_TERMS])
        records.append(
            {"iteration": engine.state.iteration, "epoch": engine.state.epoch, "phase": engine.state.phase.value,
             **dict(zip(LOSS_TERMS, values))}
        )

    workflow.run()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    if rank == 0:
        final = {"displacement": snapshot(network), "scoring": snapshot(scoring_network)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"initial": initial, "final": final}, args.out.with_suffix(".pt"))
        args.out.write_text(
            json.dumps(
                {
                    "world_size": world_size,
                    "ddp": type(network).__name__ == "DistributedDataParallel"
                    and type(scoring_network).__name__ == "DistributedDataParallel",
                    "records": records,
                },
                indent=1,
            )
        )
    workflow.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
