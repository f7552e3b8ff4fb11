"""Cost of AdaCS relative to VoxelMorph-MSE: training micro-steps, the compute floor, and inference.

    python scripts/benchmark_training.py [--size 128] [--batch 4] [--repeats 12] [--threads 1] [--json OUT]

Everything is measured in one process, in interleaved rounds (every round times every item once, in a
rotating order), and medians are reported: the machine is shared and noisy, and interleaving puts every item
under the same load.

(a) Training: one micro-step of the real ``AdaCSTrainer._iteration`` in the joint phase (AdaCS) and of the same
    trainer with ``use_scoring=False`` (VoxelMorph-MSE), same displacement network and micro-batch, with
    ``accumulation_steps=2``: micro-steps that step the optimizers and micro-steps that do not (the trainer then
    reuses the warps of its first forward instead of a second forward) are reported separately and averaged.
(b) Compute floor: what the paper's step must do on top of a VoxelMorph step, timed as bare components:
    displacement forward+backward (+ Adam step when stepping), one displacement forward without gradients (the
    warps of theta_{t+1}), and the scoring network's forward+backward on both directions' targets (batch 2B)
    (+ Adam step). ``floor_ratio = (t_disp_fwd_bwd + t_disp_fwd_nograd + t_score_fwd_bwd_2B) / t_vxm_step``;
    the same ratio counted in FLOPs (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix
    products; the warps, losses and Adam are elementwise and not counted).
(c) Inference per pair: what ``configs/inference.yaml`` runs on the network grid (its ``network_def`` with the
    weights loaded from a ``model.pt`` file, its ``inferer``, eval mode, no gradients, plus the warp of the moving
    image) over the bare forward of the same network on the same input, at batch 1 and 32, for an AdaCS-trained
    and a VoxelMorph-trained network (the same architecture, hence the same cost). File reading, resampling to
    the native grid and writing NIfTI are not included.

Weights: by default the two networks trained by the warm-up rounds of this script (inference cost does not
depend on the values); ``--adacs-weights`` / ``--vxm-weights`` take real ``models/model.pt`` files.

Threads: ``--threads 1`` (default) is the robust choice on a shared machine. With PyTorch's default OpenMP
threads (one per core) and other processes competing for the cores, OpenMP's busy-waiting barriers made a
VoxelMorph step up to ~6x slower on the 2-core development VM (``OMP_WAIT_POLICY=PASSIVE`` removes that penalty).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp
from torch.utils.flop_counter import FlopCounterMode

from _bundle import BUNDLE, import_bundle

import_bundle()
from scripts.losses import Direction, foreground_mask  # noqa: E402
from scripts.networks import registration_fields  # noqa: E402
from scripts.phantom import cardiac_phantom_pair  # noqa: E402
from scripts.schedule import Phase  # noqa: E402
from scripts.trainer import AdaCSTrainer  # noqa: E402

ACCUMULATION_STEPS = 2
KINDS = ("nostep", "step")  # micro-steps that do not / do step the optimizers
INFERENCE_BATCHES = (1, 32)


# ---- data and components from the bundle's configs ---------------------------------------------------------
def phantom_batch(size: int, batch: int, first_index: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` phantom pairs (mixed mode) as ``{"moving", "fixed"}`` tensors (B, 1, size, size)."""
    pairs = [cardiac_phantom_pair(first_index + i, 0, size, "mixed") for i in range(batch)]
    return {k: torch.as_tensor(np.stack([p[k] for p in pairs])).float() for k in ("moving", "fixed")}


def tile_batch(data: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """Repeat the pairs of ``data`` to ``batch`` pairs (inference at batch 32 without generating 32 phantoms)."""
    reps = -(-batch // data["moving"].shape[0])
    return {k: v.repeat(reps, 1, 1, 1)[:batch].contiguous() for k, v in data.items()}


def train_parser(size: int) -> ConfigParser:
    """``configs/train.yaml`` (networks, losses, momentum, learning rate) at ``size`` x ``size`` on the CPU."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')", "image_size": [size, size]})
    return parser


def build_trainer(parser: ConfigParser, use_scoring: bool, displacement_state: dict | None) -> AdaCSTrainer:
    """A real ``AdaCSTrainer`` from the bundle's components (fresh instances), ready for ``_iteration`` calls."""
    network = parser.get_parsed_content("network_def", lazy=False)
    if displacement_state is not None:
        network.load_state_dict(displacement_state)
    lr = parser.get_parsed_content("learning_rate")
    scoring = parser.get_parsed_content("scoring_network_def", lazy=False) if use_scoring else None
    trainer = AdaCSTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[None],
        displacement_network=network,
        displacement_optimizer=torch.optim.Adam(network.parameters(), lr=lr),
        displacement_loss=parser.get_parsed_content("displacement_loss", lazy=False),
        scoring_network=scoring,
        scoring_optimizer=torch.optim.Adam(scoring.parameters(), lr=lr) if use_scoring else None,
        scoring_loss=parser.get_parsed_content("scoring_loss", lazy=False) if use_scoring else None,
        smoothness_weight=parser.get_parsed_content("smoothness_weight", lazy=False),
        use_scoring=use_scoring,
        motion_warmup_epochs=0,
        scoring_warmup_epochs=0,
        accumulation_steps=ACCUMULATION_STEPS,
        use_mask=parser.get_parsed_content("use_mask"),
    )
    trainer.state.epoch_length = 1000
    trainer.state.phase = Phase.JOINT if use_scoring else Phase.MOTION
    return trainer


def trainer_micro_step(trainer: AdaCSTrainer, batch: dict[str, torch.Tensor], step: bool) -> None:
    """One ``_iteration`` as the engine runs it: iteration 1 zeroes and accumulates, iteration 2 steps."""
    trainer.state.iteration = 2 if step else 1
    trainer._iteration(trainer, batch)


class Components:
    """The bare pieces of the paper's step, on their own networks and optimizers (same init as the trainers).

    Every method runs one component and mirrors what ``AdaCSTrainer`` does in it.
    """

    def __init__(self, parser: ConfigParser, adacs: AdaCSTrainer, batch: dict[str, torch.Tensor]) -> None:
        self.net = copy.deepcopy(adacs.displacement_network)
        self.score_net = copy.deepcopy(adacs.scoring_network)
        lr = parser.get_parsed_content("learning_rate")
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.score_opt = torch.optim.Adam(self.score_net.parameters(), lr=lr)
        self.displacement_loss = adacs.displacement_loss
        self.scoring_loss = adacs.scoring_loss
        self.weight = adacs.smoothness_weight.value
        self.warp = adacs.warp
        self.moving, self.fixed = batch["moving"], batch["fixed"]
        self.image = torch.cat([self.moving, self.fixed], dim=1)
        self.mask = foreground_mask(self.moving, self.fixed)
        with torch.no_grad():  # fixed inputs of the components that take another component's output
            self.scores = list(self.score_net(torch.cat([self.fixed, self.moving])).split(self.fixed.shape[0]))
            self.warped = self._directions(registration_fields(self.net, self.image), [None, None])

    def _directions(self, fields, scores) -> list[Direction]:
        return [
            Direction(self.warp(self.moving, fields.forward_ddf), self.fixed, scores[0]),
            Direction(self.warp(self.fixed, fields.backward_ddf), self.moving, scores[1]),
        ]

    def _displacement(self, step: bool, scores: list) -> None:
        if not step:
            self.opt.zero_grad()
        self.net.train()
        fields = registration_fields(self.net, self.image)
        self.displacement_loss(self._directions(fields, scores), self.mask, fields.regularized_field)["total"].backward()
        if step:
            self.opt.step()

    def disp_fwd_bwd(self, step: bool) -> None:
        """L_de with the (detached) score maps: forward, backward, Adam step when stepping."""
        self._displacement(step, self.scores)

    def vxm_step(self, step: bool) -> None:
        """The VoxelMorph-MSE step: the same with S = 1."""
        self._displacement(step, [None, None])

    def disp_fwd_nograd(self, step: bool = True) -> None:
        """The warps of theta_{t+1}: one displacement forward without gradients, both directions."""
        with torch.no_grad():
            self._directions(registration_fields(self.net, self.image), [None, None])

    def score_fwd_bwd_2b(self, step: bool) -> None:
        """g on both directions' targets (one batch of 2B), L_se, backward, Adam step when stepping."""
        if not step:
            self.score_opt.zero_grad()
        self.score_net.train()
        scores = self.score_net(torch.cat([self.fixed, self.moving])).split(self.fixed.shape[0])
        directions = [Direction(d.warped, d.target, s) for d, s in zip(self.warped, scores)]
        self.scoring_loss(directions, self.mask, self.weight)["total"].backward()
        if step:
            self.score_opt.step()


COMPONENTS = ("disp_fwd_bwd", "disp_fwd_nograd", "score_fwd_bwd_2b", "vxm_step")


# ---- inference through the bundle's inference.yaml -----------------------------------------------------------
def load_weights(network: torch.nn.Module, path: Path) -> None:
    """A flat state dict (``models/model.pt``) or a ``{"model": state_dict}`` checkpoint into ``network``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network.load_state_dict(state)


class BundleInference:
    """What ``configs/inference.yaml`` runs per batch: its ``network_def`` with the weights loaded, its ``inferer``,
    in eval mode without gradients, then the warp of the moving image (bilinear, zero padding)."""

    def __init__(self, weights: Path) -> None:
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
        parser.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')"})
        self.network: torch.nn.Module = parser.get_parsed_content("network_def", lazy=False)
        load_weights(self.network, weights)
        self.inferer = parser.get_parsed_content("inferer", lazy=False)
        self.warp = Warp(mode="bilinear", padding_mode="zeros")

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.network.eval()
        with torch.no_grad():
            ddf = self.inferer(torch.cat([moving, fixed], dim=1), self.network)
            return ddf, self.warp(moving, ddf)

    def bare(self, image: torch.Tensor) -> torch.Tensor:
        """The displacement network's forward alone (eval mode, no gradients)."""
        self.network.eval()
        with torch.no_grad():
            return self.network(image)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (convolutions and matrix products, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def inference_calls(batch: int) -> int:
    """Back-to-back calls per timing of an inference item (batch 1 is short: average 8 calls)."""
    return max(1, 8 // batch)


def calls_of(item: str) -> int:
    """Calls per timing of a timed item (``infer/<net>/<kind>/b<batch>`` or a single call)."""
    return inference_calls(int(item.rsplit("/b", 1)[1])) if item.startswith("infer/") else 1


# ---- measurement ---------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], calls: int = 1) -> float:
    """Seconds per call of ``fn`` (mean over ``calls`` back-to-back calls)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    parser = train_parser(args.size)
    batch = phantom_batch(args.size, args.batch)
    adacs = build_trainer(parser, True, None)
    vxm = build_trainer(parser, False, adacs.displacement_network.state_dict())
    parts = Components(parser, adacs, batch)
    infer_data = {b: tile_batch(batch, b) for b in INFERENCE_BATCHES}

    # the timed items: name -> callable (a round times each once, in a rotating order)
    items: dict[str, Callable[[], Any]] = {}
    for kind in KINDS:
        step = kind == "step"
        items[f"train/adacs/{kind}"] = lambda s=step: trainer_micro_step(adacs, batch, s)
        items[f"train/vxm/{kind}"] = lambda s=step: trainer_micro_step(vxm, batch, s)
        for name in COMPONENTS:
            if name != "disp_fwd_nograd":
                items[f"floor/{name}/{kind}"] = lambda n=name, s=step: getattr(parts, n)(s)
    items["floor/disp_fwd_nograd"] = parts.disp_fwd_nograd

    def pair_round(order: list[str], times: dict[str, list[float]] | None) -> None:
        for name in order:
            t = timed(items[name])
            if times is not None:
                times[name].append(t)

    # micro-steps come in (nostep, step) pairs so that gradient accumulation stays as in training
    groups = [["train/adacs/nostep", "train/adacs/step"], ["train/vxm/nostep", "train/vxm/step"]]
    groups += [[f"floor/{n}/nostep", f"floor/{n}/step"] for n in COMPONENTS if n != "disp_fwd_nograd"]
    groups += [["floor/disp_fwd_nograd"]]
    for _ in range(args.warmup):
        for group in groups:
            pair_round(group, None)

    with tempfile.TemporaryDirectory() as tmp:  # weights go through a model.pt file, as the bundle loads them
        inference = {}
        for name, trainer, given in (("adacs", adacs, args.adacs_weights), ("vxm", vxm, args.vxm_weights)):
            path = Path(given) if given else Path(tmp) / f"{name}_model.pt"
            if not given:
                torch.save(trainer.displacement_network.state_dict(), path)
            inference[name] = BundleInference(path)
    infer_groups: list[list[str]] = []
    for name, runner in inference.items():
        for b in INFERENCE_BATCHES:
            data = infer_data[b]
            moving, fixed = data["moving"], data["fixed"]
            image = torch.cat([moving, fixed], dim=1)
            calls = inference_calls(b)
            items[f"infer/{name}/bundle/b{b}"] = lambda r=runner, m=moving, f=fixed, c=calls: [r(m, f) for _ in range(c)]
            items[f"infer/{name}/bare/b{b}"] = lambda r=runner, x=image, c=calls: [r.bare(x) for _ in range(c)]
            infer_groups += [[f"infer/{name}/bundle/b{b}"], [f"infer/{name}/bare/b{b}"]]
    for _ in range(min(args.warmup, 1)):
        for group in infer_groups:
            pair_round(group, None)
    groups += infer_groups

    times: dict[str, list[float]] = {name: [] for name in items}
    for r in range(args.repeats):
        shift = r % len(groups)
        order = groups[shift:] + groups[:shift]
        if r % 2:
            order = order[::-1]
        for group in order:
            pair_round(group, times)
        if args.verbose:
            print(f"round {r + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)

    flops = {
        "disp_fwd_bwd": count_flops(lambda: parts.disp_fwd_bwd(False)),
        "disp_fwd_nograd": count_flops(parts.disp_fwd_nograd),
        "score_fwd_bwd_2b": count_flops(lambda: parts.score_fwd_bwd_2b(False)),
        "vxm_step": count_flops(lambda: parts.vxm_step(False)),
    }
    for kind in KINDS:  # cross-check: the trainers' own micro-steps
        flops[f"trainer_adacs_{kind}"] = count_flops(lambda s=kind == "step": trainer_micro_step(adacs, batch, s))
        flops[f"trainer_vxm_{kind}"] = count_flops(lambda s=kind == "step": trainer_micro_step(vxm, batch, s))
    return summarise(args, times, flops, load_before)


def summarise(args: argparse.Namespace, times: dict[str, list[float]], flops: dict[str, int], load_before) -> dict[str, Any]:
    """Medians, ratios, floors and the JSON document."""
    med = {name: median(values) for name, values in times.items()}
    per_call = {name: med[name] / calls_of(name) for name in med}
    training: dict[str, Any] = {}
    for kind in KINDS:
        a, v = per_call[f"train/adacs/{kind}"], per_call[f"train/vxm/{kind}"]
        paired = [x / y for x, y in zip(times[f"train/adacs/{kind}"], times[f"train/vxm/{kind}"])]
        training[kind] = {"adacs_s": a, "vxm_s": v, "ratio": a / v, "ratio_paired_median": median(paired)}
    a_avg = statistics.mean(training[k]["adacs_s"] for k in KINDS)
    v_avg = statistics.mean(training[k]["vxm_s"] for k in KINDS)
    training["average"] = {"adacs_s": a_avg, "vxm_s": v_avg, "ratio": a_avg / v_avg}

    nograd = per_call["floor/disp_fwd_nograd"]
    floor: dict[str, Any] = {}
    for kind in KINDS:
        c = {n: per_call[f"floor/{n}/{kind}"] for n in COMPONENTS if n != "disp_fwd_nograd"}
        c["disp_fwd_nograd"] = nograd
        paper = (c["disp_fwd_bwd"] + nograd + c["score_fwd_bwd_2b"]) / c["vxm_step"]
        floor[kind] = {
            "components_s": c,
            "floor_ratio": paper,
            # the trainer skips the second forward when theta did not change (non-stepping micro-steps)
            "trainer_floor_ratio": paper if kind == "step" else (c["disp_fwd_bwd"] + c["score_fwd_bwd_2b"]) / c["vxm_step"],
            "measured_over_floor": training[kind]["ratio"] / paper,
        }
    sums = {n: statistics.mean(floor[k]["components_s"][n] for k in KINDS) for n in COMPONENTS}
    avg_floor = (sums["disp_fwd_bwd"] + sums["disp_fwd_nograd"] + sums["score_fwd_bwd_2b"]) / sums["vxm_step"]
    avg_trainer_floor = statistics.mean(floor[k]["trainer_floor_ratio"] * floor[k]["components_s"]["vxm_step"] for k in KINDS) / sums["vxm_step"]
    floor["average"] = {
        "floor_ratio": avg_floor,
        "trainer_floor_ratio": avg_trainer_floor,
        "measured_over_floor": training["average"]["ratio"] / avg_floor,
    }
    flop_floor = {
        "flops": flops,
        "ratio_with_second_forward": (flops["disp_fwd_bwd"] + flops["disp_fwd_nograd"] + flops["score_fwd_bwd_2b"]) / flops["vxm_step"],
        "ratio_without_second_forward": (flops["disp_fwd_bwd"] + flops["score_fwd_bwd_2b"]) / flops["vxm_step"],
    }
    flop_floor["ratio_trainer_average"] = (flop_floor["ratio_with_second_forward"] + flop_floor["ratio_without_second_forward"]) / 2
    flop_floor["trainer_counted"] = {
        kind: flops[f"trainer_adacs_{kind}"] / flops[f"trainer_vxm_{kind}"] for kind in KINDS
    }

    inference: dict[str, Any] = {}
    for b in INFERENCE_BATCHES:
        row = {}
        for name in ("adacs", "vxm"):
            bundle, bare = per_call[f"infer/{name}/bundle/b{b}"], per_call[f"infer/{name}/bare/b{b}"]
            row[name] = {"bundle_per_pair_s": bundle / b, "bare_per_pair_s": bare / b, "bundle_over_bare": bundle / bare}
        row["adacs_over_vxm_bundle"] = row["adacs"]["bundle_per_pair_s"] / row["vxm"]["bundle_per_pair_s"]
        inference[f"batch_{b}"] = row
    return {
        "config": {
            "size": args.size,
            "batch": args.batch,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "accumulation_steps": ACCUMULATION_STEPS,
            "inference_batches": list(INFERENCE_BATCHES),
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
        },
        "training": training,
        "floor": floor,
        "flop_floor": flop_floor,
        "inference": inference,
        "raw_seconds": times,
    }


def print_table(result: dict[str, Any]) -> None:
    cfg, tr, fl, ff = result["config"], result["training"], result["floor"], result["flop_floor"]
    ms = lambda s: f"{1e3 * s:8.1f}"  # noqa: E731
    print(f"\nsize {cfg['size']}x{cfg['size']}, micro-batch {cfg['batch']}, accumulation {cfg['accumulation_steps']}, "
          f"{cfg['repeats']} interleaved rounds, {cfg['threads']} thread(s), load {result['environment']['loadavg_before'][0]:.1f}"
          f" -> {result['environment']['loadavg_after'][0]:.1f}")
    print("\n(a) training micro-step, median ms")
    print(f"{'micro-step':<10}{'AdaCS':>9}{'VXM':>9}{'ratio':>8}{'paired':>8}{'floor':>8}{'meas/floor':>11}{'trainer floor':>14}")
    for kind in (*KINDS, "average"):
        t, f = tr[kind], fl[kind]
        paired = f"{t['ratio_paired_median']:8.2f}" if "ratio_paired_median" in t else " " * 8
        print(f"{kind:<10}{ms(t['adacs_s']):>9}{ms(t['vxm_s']):>9}{t['ratio']:8.2f}{paired}{f['floor_ratio']:8.2f}"
              f"{f['measured_over_floor']:11.2f}{f['trainer_floor_ratio']:14.2f}")
    print("\n(b) floor components, median ms (bare, outside the trainer)")
    print(f"{'component':<18}{'nostep':>9}{'step':>9}{'GFLOP':>9}")
    for name in COMPONENTS:
        values = [fl[k]["components_s"][name] for k in KINDS]
        print(f"{name:<18}{ms(values[0]):>9}{ms(values[1]):>9}{ff['flops'][name] / 1e9:9.2f}")
    print(f"FLOP ratio AdaCS/VXM: {ff['ratio_with_second_forward']:.2f} with the second forward (stepping), "
          f"{ff['ratio_without_second_forward']:.2f} without (non-stepping), trainer average {ff['ratio_trainer_average']:.2f}")
    print(f"FLOPs counted on the trainers' own micro-steps, AdaCS/VXM: nostep {ff['trainer_counted']['nostep']:.2f}, "
          f"step {ff['trainer_counted']['step']:.2f}")
    print("\n(c) inference per pair, ms (bundle = inference.yaml network_def + inferer, eval, no_grad, + warp)")
    print(f"{'batch':<7}{'net':<7}{'bundle':>9}{'bare':>9}{'bundle/bare':>12}")
    for key, row in result["inference"].items():
        for name in ("adacs", "vxm"):
            r = row[name]
            print(f"{key.split('_')[1]:<7}{name:<7}{ms(r['bundle_per_pair_s']):>9}{ms(r['bare_per_pair_s']):>9}{r['bundle_over_bare']:12.2f}")
        print(f"{'':<7}AdaCS-trained / VXM-trained (bundle): {row['adacs_over_vxm_bundle']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image size (square); default 128 as the paper")
    parser.add_argument("--batch", type=int, default=4, help="training micro-batch (default 4, as the paper)")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved timed rounds (medians over them)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (the first calls are slow)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = PyTorch's default)")
    parser.add_argument("--json", type=Path, default=None, help="write the results (and raw times) here")
    parser.add_argument("--adacs-weights", default=None, help="an AdaCS-trained models/model.pt for (c)")
    parser.add_argument("--vxm-weights", default=None, help="a VoxelMorph-trained models/model.pt for (c)")
    parser.add_argument("--verbose", action="store_true", help="print progress after every round")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16 (four poolings), got {args.size}")
    if args.repeats < 1 or args.batch < 1 or args.warmup < 0:
        parser.error("--repeats and --batch must be positive, --warmup not negative")
    result = run(args)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
