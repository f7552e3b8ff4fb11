"""Cost of each displacement backbone against VoxelMorph, measured in one process (issue 30: per backbone).

    python scripts/benchmark_backbones.py [--size 128] [--batch 4] [--repeats 10] [--out DIR]

Per backbone (the configs' ``network_def``): parameters; the MSE training micro-step (forward of both directions,
the displacement loss with the training's smoothness term plus the network's own term if it has one, DiffuseMorph's
diffusion loss; backward, Adam step; micro-batch ``--batch``) and the inference time per pair (batch 1, no gradients);
each as a median over ``--repeats`` interleaved rounds and as a ratio over VoxelMorph's in the same round. Writes
``benchmark_backbones.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _bundle import import_bundle

import_bundle()
from scripts.diffusemorph import DiffuseMorph2D  # noqa: E402
from scripts.losses import DisplacementLoss, Direction, GradientL2Loss  # noqa: E402
from scripts.networks import DiffeomorphicVoxelMorph, registration_fields  # noqa: E402
from scripts.transmorph import TransMorph2D  # noqa: E402
from monai.networks.blocks import Warp  # noqa: E402

BACKBONES = {"VoxelMorph (vxm-1)": DiffeomorphicVoxelMorph, "TransMorph-2D (Swin, feature 24)": TransMorph2D,
             "DiffuseMorph-2D (diffusion 16-32-64-64 + vxm-1, direct field)": DiffuseMorph2D}


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def training_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, image: torch.Tensor) -> None:
    warp, loss = Warp(), DisplacementLoss(torch.nn.MSELoss(reduction="none"), GradientL2Loss(loss_mult=2), 0.01)
    moving, fixed = image[:, :1], image[:, 1:]
    optimizer.zero_grad()
    fields = registration_fields(net, image)
    directions = [Direction(warp(moving, fields.forward_ddf), fixed, None)]
    if fields.backward_ddf is not None:
        directions.append(Direction(warp(fixed, fields.backward_ddf), moving, None))
    total = loss(directions, None, fields.regularized_field)["total"]
    auxiliary = net.auxiliary_loss() if hasattr(net, "auxiliary_loss") else None
    (total if auxiliary is None else total + auxiliary).backward()
    optimizer.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    nets = {name: make() for name, make in BACKBONES.items()}
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-4) for name, net in nets.items()}
    batch = torch.rand(args.batch, 2, args.size, args.size)
    pair = torch.rand(1, 2, args.size, args.size)
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "infer": []} for name in nets}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name, net in nets.items():
            net.train()
            train = _timed(lambda: training_step(net, optimizers[name], batch))
            net.eval()
            with torch.no_grad():
                infer = _timed(lambda: net(pair))
            if round_index:
                times[name]["train"].append(train)
                times[name]["infer"].append(infer)
    reference = next(iter(nets))
    rows = []
    for name, net in nets.items():
        train, infer = statistics.median(times[name]["train"]), statistics.median(times[name]["infer"])
        rows.append({"backbone": name, "parameters": sum(p.numel() for p in net.parameters()),
                     "train_step_s": train, "infer_s_per_pair": infer,
                     "train_over_voxelmorph": train / statistics.median(times[reference]["train"]),
                     "infer_over_voxelmorph": infer / statistics.median(times[reference]["infer"])})
    lines = [f"Backbones at {args.size} x {args.size}, micro-batch {args.batch}, {torch.get_num_threads()} torch threads, "
             f"medians of {args.repeats} interleaved rounds", "",
             "| backbone | parameters | MSE training micro-step (s) | x VoxelMorph | inference per pair (s) | x VoxelMorph |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['parameters']:,} | {r['train_step_s']:.3f} | {r['train_over_voxelmorph']:.2f} "
                     f"| {r['infer_s_per_pair']:.4f} | {r['infer_over_voxelmorph']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark_backbones.json").write_text(json.dumps({"rows": rows, "times": times}, indent=1))
        (args.out / "benchmark_backbones.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
