"""Time the strain workflow end to end on one ACDC-sized cine (10 slices x 30 frames) against the bare network.

    python scripts/benchmark_strain.py [--out ../strain_runs/benchmark] [--repeats 3] [--threads 0]
        [--shape 216 256] [--slices 10] [--frames 30] [--phantom-size 128] [--cli-repeats 1] [--ckpt FILE]

The cine is synthetic but shaped as ACDC: each slice a phantom cine (``phantom.cardiac_phantom_cine``, seed 0,
indices 300000.., ``--phantom-size`` px, cine mode) transposed into ACDC's array layout (RV toward decreasing axis 0,
anterior decreasing axis 1: the bundle's default AHA orientation), zoomed from 1.2x (basal slice) to 0.8x (apical)
and centred on a ``--shape`` canvas, so every slice has LV, myocardium and RV; 1.5 x 1.5 x 10 mm voxels. It is written
as ``bench_cine.nii.gz`` (X x Y x Z x T) + ``bench_ED_gt.nii.gz`` into a temporary folder (deleted afterwards).

Measured in one process (``--repeats`` rounds, configurations interleaved within a round; best and median reported):

* ``end_to_end``: ``StrainWorkflow.run()`` with ``configs/strain.yaml``'s settings (weights loaded from ``--ckpt``,
  case read, tracked, analysed, NIfTI / CSV / summary written, figures on or off), tracking ``direct`` and
  ``drift_corrected``, each into a fresh output folder;
* ``bare``: the network alone (``network(pair, return_fields=True)``, the call the workflow's inverse Lagrangian
  needs, batches of ``--batch-size``) on network-grid tensors already in memory, over the pairs each tracking mode
  registers (direct (T-1) S, drift-corrected 2 (T-1) S) and over the T S frames of the cine against ED (the
  "300 pairs" of the issue): the floor. Ratios are end-to-end best / bare best;
* ``stages``: the workflow's pieces called one by one (``load_case``, ``_load_weights``, ``registration.track``,
  ``analyse_case``, ``_write_case`` without figures, ``_write_figures``, ``_write_summary``), best of the rounds;
* ``cli`` (``--cli-repeats``, 0 skips): ``python -m monai.bundle run --config_file configs/strain.yaml`` in a new
  process (interpreter start, imports, config parsing included), wall time.

The torch thread count and the machine load (``os.getloadavg``) around every measurement are recorded: other
processes may share the CPU. ``--out`` (default ``../strain_runs/benchmark``) gets ``benchmark_strain.json`` and
``benchmark_strain.md`` (printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from _bundle import BUNDLE, REPO, import_bundle

import_bundle()
from scripts.networks import DiffeomorphicVoxelMorph  # noqa: E402
from scripts.phantom import cardiac_phantom_cine  # noqa: E402
from scripts.registration_io import minmax_resize  # noqa: E402
from scripts.strain_analysis import analyse_case  # noqa: E402
from scripts.strain_io import collect_cases, load_case  # noqa: E402
from scripts.strain_workflow import StrainWorkflow  # noqa: E402

CASE = "bench"
TRACKING = ("direct", "drift_corrected")
DEFAULT_OUT = REPO.parent / "strain_runs" / "benchmark"
TARGET_S = 10.0
STAGES = ("read", "load_weights", "track", "analyse", "write", "figures", "summary")


# =============================================================================================== the case
def build_cine(folder: Path, shape: tuple[int, int] = (216, 256), slices: int = 10, frames: int = 30,
               phantom_size: int = 128, seed: int = 0, first_index: int = 300000,
               spacing: tuple[float, float, float] = (1.5, 1.5, 10.0)) -> dict[str, Any]:
    """Write ``bench_cine.nii.gz`` (X, Y, Z, T) and ``bench_ED_gt.nii.gz`` (X, Y, Z) into ``folder``."""
    images = np.zeros(tuple(shape) + (slices, frames), np.float32)
    labels = np.zeros(tuple(shape) + (slices,), np.uint8)
    zooms = np.linspace(1.2, 0.8, slices) if slices > 1 else np.ones(1)
    es = []
    for k in range(slices):
        cine = cardiac_phantom_cine(first_index + k, seed, phantom_size, frames, "cine")
        es.append(int(cine["es_index"]))
        stack = np.transpose(cine["images"], (0, 2, 1))  # ACDC layout (see the module doc)
        label = cine["labels"][0].T
        stack = np.clip(ndimage.zoom(stack, (1, zooms[k], zooms[k]), order=1), 0.0, 1.0)
        label = ndimage.zoom(label, zooms[k], order=0)
        src, dst = [], []
        for size, canvas in zip(label.shape, shape):
            offset = (canvas - size) // 2
            src.append(slice(max(-offset, 0), max(-offset, 0) + min(size, canvas)))
            dst.append(slice(max(offset, 0), max(offset, 0) + min(size, canvas)))
        images[dst[0], dst[1], k] = np.moveaxis(stack[:, src[0], src[1]], 0, -1)
        labels[dst[0], dst[1], k] = label[src[0], src[1]]
    affine = np.diag(list(spacing) + [1.0])
    cine_image = nib.Nifti1Image(images, affine)
    cine_image.header.set_zooms(tuple(spacing) + (30.0,))
    nib.save(cine_image, str(folder / f"{CASE}_cine.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(folder / f"{CASE}_ED_gt.nii.gz"))
    present = [int(k) for k in range(slices) if (labels[..., k] == 2).any() and (labels[..., k] == 1).any()]
    return {"shape_xyzt": list(images.shape), "spacing_mm": list(spacing), "slices_with_myo_and_rv": len(present),
            "phantom_es_index": sorted(set(es)), "zoom": [round(float(z), 3) for z in zooms],
            "cine_bytes": (folder / f"{CASE}_cine.nii.gz").stat().st_size}


# ================================================================================================ timing
def _load() -> float:
    return os.getloadavg()[0]


class Recorder:
    """Wall seconds of every measurement by name, the process CPU seconds (all threads) alongside, and the 1-min
    load average before each."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.loads: list[float] = []

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        self.loads.append(_load())
        cpu, start = time.process_time(), time.perf_counter()
        value = fn()
        self.times.setdefault(name, []).append(time.perf_counter() - start)
        self.cpu.setdefault(name, []).append(time.process_time() - cpu)
        return value

    def summary(self, name: str) -> dict[str, Any]:
        values = self.times[name]
        best = int(np.argmin(values))
        return {"best_s": values[best], "median_s": statistics.median(values), "times_s": values,
                "cpu_s_of_best": self.cpu[name][best]}


def pair_lists(frames: int, slices: int) -> dict[str, list[tuple[int, int, int]]]:
    """(reference frame, target frame, slice) of what each tracking mode registers (ED = frame 0), and all frames."""
    forward = [(k, k + 1) for k in range(frames - 1)]
    backward = [((k + 1) % frames, k) for k in range(frames - 1, 0, -1)]
    by_frames = {"direct": [(0, t) for t in range(1, frames)], "drift_corrected": forward + backward,
                 "all_frames": [(0, t) for t in range(frames)]}
    return {k: [(a, b, s) for a, b in v for s in range(slices)] for k, v in by_frames.items()}


@torch.no_grad()
def bare_network(net: torch.nn.Module, grid: torch.Tensor, pairs: list[tuple[int, int, int]], batch: int) -> None:
    """The network over ``pairs`` of the network-grid frames ``grid`` (T, S, h, w), ``batch`` pairs per call."""
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        reference = torch.stack([grid[a, s] for a, _, s in chunk])
        target = torch.stack([grid[b, s] for _, b, s in chunk])
        net(torch.stack([reference, target], 1), return_fields=True)


def make_workflow(net: torch.nn.Module, data: Path, out: Path, ckpt: str | None, tracking: str, figures: bool,
                  batch: int) -> StrainWorkflow:
    return StrainWorkflow(str(data), net, out, ckpt_path=ckpt, tracking=tracking, figures=figures, progress=False,
                          device="cpu", batch_size=batch)


def stage_timings(rec: Recorder, net: torch.nn.Module, data: Path, out: Path, ckpt: str | None, tracking: str,
                  batch: int) -> None:
    """The workflow's pieces, one call each, timed under ``stage_<tracking>_<stage>``."""
    wf = make_workflow(net, data, out, ckpt, tracking, False, batch)
    out.mkdir(parents=True, exist_ok=True)
    item = collect_cases(str(data))[0]
    name = f"stage_{tracking}_"
    case = rec.time(name + "read", lambda: load_case(item))
    rec.time(name + "load_weights", wf._load_weights)
    field = rec.time(name + "track", lambda: wf.registration.track(case, wf.labels["myo"]))
    result = rec.time(name + "analyse", lambda: analyse_case(case, field, wf.labels, wf.view, wf.directions,
                                                             wf.segment_options))
    row = rec.time(name + "write", lambda: wf._write_case(case, result))
    figures = out / "figures"
    figures.mkdir()
    rec.time(name + "figures", lambda: wf._write_figures(figures, case, result))
    wf.rows = [{"case": case.case, **row, "status": "ok", "error": ""}]
    rec.time(name + "summary", wf._write_summary)


def run_cli(data: Path, out: Path, ckpt: str) -> float:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/strain.yaml", "--dataset_dir",
           str(data), "--output_dir", str(out), "--ckpt_path", ckpt, "--progress", "false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"CLI run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return elapsed


# ================================================================================================ report
def derive(rec: Recorder, pairs: dict[str, list], figures: bool) -> dict[str, Any]:
    """Best / median of every measurement and the ratios (quotients of the reported best times)."""
    bare = {k: rec.summary(f"bare_{k}") for k in pairs}
    end_to_end, ratios, stages = {}, {}, {}
    for tracking in TRACKING:
        for fig in ((True, False) if figures else (False,)):
            key = f"{tracking}_{'figures' if fig else 'no_figures'}"
            end_to_end[key] = rec.summary(f"e2e_{key}")
            best = end_to_end[key]["best_s"]
            ratios[f"{key}_over_bare_same_pairs"] = best / bare[tracking]["best_s"]
            ratios[f"{key}_over_bare_all_frames"] = best / bare["all_frames"]["best_s"]
        parts = {s: rec.summary(f"stage_{tracking}_{s}")["best_s"] for s in STAGES}
        parts["sum_without_figures_s"] = sum(v for s, v in parts.items() if s in STAGES and s != "figures")
        parts["sum_with_figures_s"] = parts["sum_without_figures_s"] + parts["figures"]
        parts["track_over_bare_same_pairs"] = parts["track"] / bare[tracking]["best_s"]
        stages[tracking] = {f"{k}_s" if k in STAGES else k: v for k, v in parts.items()}
    return {"end_to_end": end_to_end, "bare": bare, "ratios": ratios, "stages": stages}


def markdown(result: dict[str, Any]) -> str:
    env, case, cfg = result["environment"], result["case"], result["config"]
    x, y, z, t = case["shape_xyzt"]
    lines = [
        "# Strain workflow benchmark: one ACDC-sized cine, CPU", "",
        f"Synthetic cine {x} x {y} x {z} slices x {t} frames ({case['spacing_mm'][0]} x {case['spacing_mm'][1]} x "
        f"{case['spacing_mm'][2]} mm; {case['slices_with_myo_and_rv']} of {z} slices with myocardium and RV), "
        f"`configs/strain.yaml` settings (crop {cfg['roi']} px, network grid 128 x 128, batch {cfg['batch_size']}). "
        f"torch {env['torch']} with {env['torch_threads']} threads on {env['cpu_count']} CPUs; "
        f"load average (1 min) {env['load_start'][0]:.2f} at the start, {env['load_end'][0]:.2f} at the end, "
        f"mean {env['load_mean']:.2f} / max {env['load_max']:.2f} before the measurements (the benchmark's own "
        f"{env['torch_threads']} threads count in it). "
        f"Best (median) of {cfg['repeats']} rounds.", "",
        "| measurement | pairs | best s | median s | CPU s (best run) | x bare (same pairs) "
        "| x bare (all T x S frames) |",
        "|---|---|---|---|---|---|---|"]
    pairs = result["pairs"]
    for key, value in result["end_to_end"].items():
        tracking = key.rsplit("_figures", 1)[0].removesuffix("_no")
        lines.append(f"| end to end, {key.replace('_', ' ')} | {pairs[tracking]} | {value['best_s']:.2f} | "
                     f"{value['median_s']:.2f} | {value['cpu_s_of_best']:.2f} | "
                     f"{result['ratios'][key + '_over_bare_same_pairs']:.2f} | "
                     f"{result['ratios'][key + '_over_bare_all_frames']:.2f} |")
    for key, value in result["bare"].items():
        lines.append(f"| bare network, {key.replace('_', ' ')} pairs | {pairs[key]} | {value['best_s']:.2f} | "
                     f"{value['median_s']:.2f} | {value['cpu_s_of_best']:.2f} | 1 | |")
    if result.get("cli"):
        cli = result["cli"]
        lines.append(f"| CLI `monai.bundle run` (new process, direct, figures) | {pairs['direct']} | "
                     f"{min(cli['times_s']):.2f} | {statistics.median(cli['times_s']):.2f} | | | |")
    lines += ["", f"Target: under {TARGET_S:.0f} s end to end. Stages (best of the rounds, s):", "",
              "| tracking | " + " | ".join(STAGES) + " | sum (no figures) | track / bare |",
              "|---|" + "---|" * (len(STAGES) + 2)]
    for tracking, parts in result["stages"].items():
        lines.append(f"| {tracking} | " + " | ".join(f"{parts[s + '_s']:.2f}" for s in STAGES) +
                     f" | {parts['sum_without_figures_s']:.2f} | {parts['track_over_bare_same_pairs']:.2f} |")
    return "\n".join(lines) + "\n"


# ================================================================================================== main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default, all cores)")
    parser.add_argument("--shape", type=int, nargs=2, default=(216, 256))
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--phantom-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cli-repeats", type=int, default=1, help="runs of the bundle CLI in a new process (0: skip)")
    parser.add_argument("--no-figures", action="store_true", help="time the end-to-end runs without figures only")
    parser.add_argument("--ckpt", default=str(BUNDLE / "models" / "model.pt"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = DiffeomorphicVoxelMorph(int_steps=7, int_downsize=2, bidirectional=True)
    ckpt = args.ckpt if Path(args.ckpt).is_file() else None
    figures = not args.no_figures
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="strain_bench_") as scratch:
        root = Path(scratch)
        data = root / "data"
        data.mkdir()
        case_info = build_cine(data, tuple(args.shape), args.slices, args.frames, args.phantom_size)
        pairs = pair_lists(args.frames, args.slices)
        case = load_case(collect_cases(str(data))[0])
        frames = torch.as_tensor(case.frames)
        grid = minmax_resize(frames.reshape(-1, 1, *frames.shape[2:]), (128, 128))[:, 0]
        grid = grid.reshape(*frames.shape[:2], 128, 128)
        if ckpt:
            net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        net.eval()
        counter = iter(range(10**6))

        def e2e(tracking: str, fig: bool) -> None:
            wf = make_workflow(net, data, root / f"run{next(counter)}", ckpt, tracking, fig, args.batch_size)
            rows = wf.run()
            assert rows and rows[0]["status"] == "ok", rows

        e2e("direct", figures)  # warm-up: lazy imports (matplotlib), allocator
        bare_network(net, grid, pairs["direct"][: args.batch_size], args.batch_size)
        for _ in range(args.repeats):
            for tracking in TRACKING:
                for fig in ((True, False) if figures else (False,)):
                    rec.time(f"e2e_{tracking}_{'figures' if fig else 'no_figures'}", lambda: e2e(tracking, fig))
            for key, plist in pairs.items():
                rec.time(f"bare_{key}", lambda: bare_network(net, grid, plist, args.batch_size))
            for tracking in TRACKING:
                stage_timings(rec, net, data, root / f"stages{next(counter)}", ckpt, tracking, args.batch_size)
            for folder in root.iterdir():
                if folder.name != "data":
                    shutil.rmtree(folder, ignore_errors=True)
        cli = None
        if args.cli_repeats and ckpt:
            cli = {"times_s": [], "threads": "torch default in a new process"}
            for i in range(args.cli_repeats):
                rec.loads.append(_load())
                cli["times_s"].append(run_cli(data, root / f"cli{i}", ckpt))
    result: dict[str, Any] = {
        "config": {"repeats": args.repeats, "shape": list(args.shape), "slices": args.slices, "frames": args.frames,
                   "phantom_size": args.phantom_size, "batch_size": args.batch_size, "roi": 128,
                   "figures": figures, "weights": ckpt or "random init"},
        "environment": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "machine": platform.machine(), "load_start": list(load_start),
                        "load_end": list(os.getloadavg()), "load_mean": float(np.mean(rec.loads)),
                        "load_max": float(np.max(rec.loads)), "loads": rec.loads},
        "case": case_info,
        "pairs": {k: len(v) for k, v in pairs.items()},
        "target_s": TARGET_S,
        **derive(rec, pairs, figures),
        "cli": cli,
        "raw_seconds": rec.times,
        "raw_cpu_seconds": rec.cpu,
    }
    (out / "benchmark_strain.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "benchmark_strain.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
