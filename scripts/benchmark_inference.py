"""Time the bundle's per-pair inference path against the bare network + warp and against Elastix B-spline.

    python scripts/benchmark_inference.py [--pairs 8] [--repeats 20] [--elastix-pairs 4] [--ckpt bundle/models/model.pt]

Same process, same 128 x 128 phantom pairs (indices 200000.., never trained on), CPU, batch 1, median of repeats:

* ``bare``: ``net(cat(moving, fixed))`` and MONAI ``Warp`` of the moving image (inputs already scaled, on the grid);
* ``bundle_core``: ``PairRegistration`` (the inference engine): min-max scaling, inferer, field mapping to the
  native grid (identity at 128 x 128), warp;
* ``bare_labels``: ``bare`` plus the MONAI ``Warp`` of the one-hot moving label and its argmax (the same
  computation as the registration inside ``bundle_full``, without the bundle's code);
* ``bundle_full``: the whole per-pair path of ``inference.yaml`` minus disk I/O: ``bundle_core`` plus the label
  warp (one-hot, argmax), the channel-last voxel field, the ITK displacement field (mm), folding % and Dice;
* ``elastix``: itk-elastix with the default ``bspline`` parameter map, plus ``transformix`` for the dense field.

Bare and bundle timings are interleaved (one of each per repeat), so the shared machine's load affects both
alike. Timing does not depend on the weights; the checkpoint is used when it exists.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.networks.blocks import Warp

from _bundle import BUNDLE, import_bundle

import_bundle()
from scripts.evaluator import one_hot  # noqa: E402
from scripts.metrics import dice_scores, folding_percentage  # noqa: E402
from scripts.networks import DiffeomorphicVoxelMorph  # noqa: E402
from scripts.phantom import cardiac_phantom_pair  # noqa: E402
from scripts.registration_io import (  # noqa: E402
    PairRegistration, itk_displacement_field, voxel_ddf_array,
)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def network_timings(net: torch.nn.Module, pairs: list[dict], repeats: int) -> dict[str, list[float]]:
    registration = PairRegistration(net, (128, 128))
    warp = Warp(mode="bilinear", padding_mode="zeros")
    spacing, origin, direction = np.array([1.5, 1.5]), np.zeros(2), np.eye(2)
    times: dict[str, list[float]] = {"bare": [], "bundle_core": [], "bare_labels": [], "bundle_full": []}

    @torch.no_grad()
    def bare(pair: dict) -> None:
        moving = torch.as_tensor(pair["moving"])[None]
        image = torch.cat([moving, torch.as_tensor(pair["fixed"])[None]], 1)
        warp(moving, net(image))

    @torch.no_grad()
    def bare_labels(pair: dict) -> None:  # the same work as bundle_full's registration: image + one-hot labels
        moving = torch.as_tensor(pair["moving"])[None]
        image = torch.cat([moving, torch.as_tensor(pair["fixed"])[None]], 1)
        ddf = net(image)
        warp(moving, ddf)
        warp(one_hot(torch.as_tensor(pair["moving_label"]).long()[None], 4), ddf).argmax(1)

    def core(pair: dict) -> None:
        registration(pair["moving"], pair["fixed"])

    def full(pair: dict) -> None:
        label = pair["moving_label"].astype(np.int64)
        result = registration(pair["moving"], pair["fixed"], label, 4)
        vox = voxel_ddf_array(result.ddf, False, (128, 128))
        itk_displacement_field(vox, origin, spacing, direction)
        float(folding_percentage(result.ddf).mean())
        dice_scores(result.warped_label[0, 0].numpy(), pair["fixed_label"][0].astype(np.int64))

    net.eval()
    for pair in pairs[:2]:  # warm-up (allocator, lazy imports)
        bare(pair), core(pair), bare_labels(pair), full(pair)
    for _ in range(repeats):
        for pair in pairs:
            times["bare"].append(_timed(lambda: bare(pair)))
            times["bundle_core"].append(_timed(lambda: core(pair)))
            times["bare_labels"].append(_timed(lambda: bare_labels(pair)))
            times["bundle_full"].append(_timed(lambda: full(pair)))
    return times


def elastix_timings(pairs: list[dict]) -> list[float]:
    import itk

    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    times = []
    for pair in pairs:
        fixed = itk.image_from_array(np.ascontiguousarray(pair["fixed"][0]))
        moving = itk.image_from_array(np.ascontiguousarray(pair["moving"][0]))

        def run() -> None:
            _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                           log_to_console=False)
            itk.transformix_deformation_field(moving, transform)

        with tempfile.TemporaryDirectory() as scratch:  # transformix writes deformationField.nii into the cwd
            cwd = os.getcwd()
            os.chdir(scratch)
            try:
                times.append(_timed(run))
            finally:
                os.chdir(cwd)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--elastix-pairs", type=int, default=4, help="0 skips Elastix")
    parser.add_argument("--ckpt", default=str(BUNDLE / "models" / "model.pt"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to a shared CPU; 0: torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net = DiffeomorphicVoxelMorph()
    if Path(args.ckpt).is_file():
        net.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True))
        print(f"weights: {args.ckpt}")
    else:
        print(f"weights: random init ({args.ckpt} absent; timing does not depend on the weights)")
    pairs = [cardiac_phantom_pair(200000 + i, 0, 128, "mixed") for i in range(args.pairs)]
    times = network_timings(net, pairs, args.repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    # per-call ratios to the bare call timed just before (same pair, same moment): robust to a shared CPU's drift
    paired = {k: statistics.median(a / b for a, b in zip(v, times["bare"])) for k, v in times.items()}
    print(f"torch threads: {torch.get_num_threads()}, pairs: {args.pairs}, repeats: {args.repeats}")
    print(f"{'path':<14}{'median ms/pair':>16}{'min ms':>10}{'x bare':>10}{'paired x bare':>15}")
    for key, value in median.items():
        print(f"{key:<14}{value * 1e3:>16.2f}{min(times[key]) * 1e3:>10.2f}{value / median['bare']:>10.3f}"
              f"{paired[key]:>15.3f}")
    if args.elastix_pairs:
        elastix = statistics.median(elastix_timings(pairs[: args.elastix_pairs]))
        print(f"{'elastix':<14}{elastix * 1e3:>16.1f}{'':>10}{elastix / median['bare']:>10.1f}")
        print(f"Elastix B-spline (+ transformix field) / bundle_full: {elastix / median['bundle_full']:.1f}x "
              f"(target >= 100x); / bundle_core: {elastix / median['bundle_core']:.1f}x")
    print(f"bundle_core / bare: {median['bundle_core'] / median['bare']:.3f} (paired {paired['bundle_core']:.3f}; "
          f"target <= 1.1); "
          f"bundle_full / bare_labels: {median['bundle_full'] / median['bare_labels']:.3f}; "
          f"bundle_full / bare: {median['bundle_full'] / median['bare']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
