"""Time of test-time refinement per 128 x 128 pair, against the bare network and Elastix in the same process.

    python scripts/benchmark_refinement.py [--pairs 16] [--steps 10 50 200] [--repeats 3] [--elastix-pairs 4]

Per step count: the seconds per pair of score-weighted and plain refinement (Adam on the velocity, batched over
``--pairs`` phantom pairs, one call), and of one pair alone; ratios over the bare network's forward pass and over
Elastix (B-spline, the default parameter map of itk-elastix, plus transformix for the dense field), both timed here.
Target of issue 29: 50 steps in under 0.5 s per pair on the 2-core CPU, a third of Elastix's time. Writes
``--out``/benchmark_refinement.json and .md when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _bundle import BUNDLE, import_bundle

import_bundle()
from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet  # noqa: E402
from scripts.phantom import cardiac_phantom_pair  # noqa: E402
from scripts.refinement import InstanceRefiner  # noqa: E402
from scripts.registration_io import minmax_resize  # noqa: E402


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def phantom_batch(count: int) -> tuple[torch.Tensor, list[dict]]:
    pairs = [cardiac_phantom_pair(100000 + i) for i in range(count)]

    def scaled(key: str) -> torch.Tensor:  # min-max per image, as the bundle's preprocessing
        images = torch.as_tensor(np.stack([p[key] for p in pairs])).float()
        return minmax_resize(images, images.shape[2:])

    return torch.cat([scaled("moving"), scaled("fixed")], 1), pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="pairs refined in one batched call")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--elastix-pairs", type=int, default=4, help="0 skips Elastix")
    parser.add_argument("--ckpt", default=str(BUNDLE / "models" / "model.pt"))
    parser.add_argument("--scoring-ckpt", default=str(BUNDLE / "models" / "scoring_model.pt"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    net, scoring = DiffeomorphicVoxelMorph(), ScoringNet()
    net.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True))
    scoring.load_state_dict(torch.load(args.scoring_ckpt, map_location="cpu", weights_only=True))
    net.eval(), scoring.eval()
    image, pairs = phantom_batch(args.pairs)
    with torch.no_grad():
        net(image)  # warm-up
        bare = statistics.median(_timed(lambda: net(image)) for _ in range(args.repeats)) / args.pairs
    result = {"torch_threads": torch.get_num_threads(), "pairs": args.pairs, "bare_network_s_per_pair": bare,
              "rows": []}
    if args.elastix_pairs:
        from benchmark_inference import elastix_timings  # a sibling tool (this folder is on the path, as for _bundle)

        elastix = statistics.median(elastix_timings(pairs[: args.elastix_pairs]))
        result["elastix_s_per_pair"] = elastix
    for steps in args.steps:
        for weighted in (True, False):
            refiner = InstanceRefiner(steps=steps, score_weighted=weighted, scoring_network=scoring)
            batched = statistics.median(_timed(lambda: refiner(net, image)) for _ in range(args.repeats)) / args.pairs
            single = statistics.median(_timed(lambda: refiner(net, image[:1])) for _ in range(args.repeats))
            row = {"steps": steps, "refinement": "score-weighted" if weighted else "plain",
                   "s_per_pair_batched": batched, "s_per_pair_alone": single, "over_bare_network": batched / bare}
            if "elastix_s_per_pair" in result:
                row["over_elastix"] = batched / result["elastix_s_per_pair"]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    lines = [f"Refinement time per 128x128 pair ({args.pairs} phantom pairs per batched call, "
             f"{result['torch_threads']} torch threads; bare network {bare * 1e3:.1f} ms per pair"
             + (f"; Elastix {result['elastix_s_per_pair']:.2f} s per pair)" if "elastix_s_per_pair" in result else ")"),
             "", "| steps | refinement | s / pair (batched) | s / pair (alone) | x bare network | x Elastix |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['steps']} | {row['refinement']} | {row['s_per_pair_batched']:.3f} | "
                     f"{row['s_per_pair_alone']:.3f} | {row['over_bare_network']:.0f} | "
                     f"{row.get('over_elastix', float('nan')):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark_refinement.json").write_text(json.dumps(result, indent=1))
        (args.out / "benchmark_refinement.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
