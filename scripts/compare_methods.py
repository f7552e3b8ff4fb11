"""Compare registration methods on prepared real data under the paper's protocol (method doc §9-10), one command.

Methods, all on the same pairs (the ``testing`` section of a prepared dataset by default):

* **Undeformed**: the identity field;
* **Elastix**: B-spline registration with itk-elastix's default ``bspline`` parameter map (the paper's classical
  baseline), fixed = ES, moving = ED, field from transformix (cached in ``elastix_ddf.npz``);
* **VoxelMorph-MSE**: the bundle's displacement network trained with ``use_scoring false``;
* **AdaCS**: the bundle's displacement network trained with scoring;
* any further displacement network given as ``--model NAME=model.pt`` (an ablation or a control), one row each;
* with ``--refine-steps N [N ...]``: test-time refinement of one of these networks (``--refine-model``, AdaCS by
  default) per pair (``bundle/scripts/refinement.py``), plain and score-weighted (the scoring network
  ``--refine-scoring``, default ``--adacs-scoring``), one row per step count and mode, and ``refinement.md``: paired
  t-tests of per-slice Dice between the network alone, plain and score-weighted refinement.

Protocol (``bundle/scripts/paper_metrics.py``): myocardium only (``--label``, 2 for ACDC and CAMUS), the ED label
warped bilinearly as a binary mask, foreground where > 0; per-slice Dice x100, symmetric max HD, ASD from the
ground-truth surface, in pixels at 128 x 128; folding %; a slice whose computation fails (empty mask) is dropped
for that method; mean +- std over slices; paired t-test (``scipy.stats.ttest_rel``) of per-slice Dice of
AdaCS (and of every ``--model``) vs VoxelMorph-MSE over the slices valid for both.

Outputs in ``--out``: ``results.md`` and ``results.csv`` (the table), ``per_slice.csv``, ``dice_distribution.png``
(per-case Dice per method) and ``examples.png`` (fixed, moving, warped, deformation grid and score map for a few
cases) when matplotlib is installed; with ``--adacs-scoring``, ``scores.md`` / ``scores.csv``: the scoring network's
mean score S = g(fixed) per fixed-image label (0 = outside the labels), i.e. where it down-weights the data term.

Example:
    python scripts/compare_methods.py --dataset-dir /work/prepared/acdc --out /work/runs/compare_acdc \\
        --vxm /work/runs/acdc_vxm/models/model.pt --adacs /work/runs/acdc_adacs/models/model.pt \\
        --adacs-scoring /work/runs/acdc_adacs/models/scoring_model.pt \\
        --vxm-train-time "20 min CPU" --adacs-train-time "20 min CPU"
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from _bundle import BUNDLE, import_bundle

import_bundle()

from scripts.data import DatasetError, pair_datalist  # noqa: E402
from scripts.evaluator import warp_labels  # noqa: E402
from scripts.paper_metrics import PAPER_METRICS, paired_ttest, slice_metrics  # noqa: E402
from scripts.refinement import InstanceRefiner  # noqa: E402

METHODS = ("Undeformed", "Elastix", "VoxelMorph-MSE", "AdaCS")


def load_pairs(dataset_dir: str, datalist: str | None, section: str, image_size: int, max_cases: int | None) -> list[dict]:
    """The bundle's NIfTI preprocessing (train.yaml ``nifti_transforms``: min-max, resize) applied to a section."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser["image_size"] = [image_size, image_size]
    transform = parser.get_parsed_content("nifti_transforms", instantiate=True)
    from monai.transforms import Compose

    items = pair_datalist(dataset_dir, section, datalist)
    if max_cases:
        items = items[:max_cases]
    compose = Compose(transform)
    pairs = []
    for item in items:
        data = compose(dict(item))
        pairs.append({
            "case": item.get("case", Path(item["moving"]).name.replace("_ED.nii.gz", "")),
            "patient": item.get("patient", ""),
            "moving": torch.as_tensor(data["moving"]).float(), "fixed": torch.as_tensor(data["fixed"]).float(),
            "moving_label": torch.as_tensor(data["moving_label"]).round().long(),
            "fixed_label": torch.as_tensor(data["fixed_label"]).round().long(),
        })
    return pairs


def load_network(path: str | Path, scoring: bool = False, score_headroom: float = 0.0) -> torch.nn.Module:
    """The bundle's displacement (or scoring) network from ``path``: a flat state dict (``model.pt``) or a training
    checkpoint (``checkpoint_final.pt``, ``checkpoint_epoch=N.pt``: its ``displacement_network`` or
    ``scoring_network`` entry), e.g. to evaluate final weights as the paper does. ``score_headroom``: the value the
    scoring network was trained with."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser["score_headroom"] = score_headroom
    network = parser.get_parsed_content("scoring_network_def" if scoring else "network_def", instantiate=True)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    entry = "scoring_network" if scoring else "displacement_network"
    if entry in state and isinstance(state[entry], dict):
        state = state[entry]
    network.load_state_dict(state)
    return network.eval()


def network_method(network: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    """pair -> ddf (2, H, W) with a displacement network."""

    def run(pair: dict) -> torch.Tensor:
        with torch.no_grad():
            return network(torch.cat([pair["moving"], pair["fixed"]])[None])[0]

    return run


def elastix_ddf(moving: np.ndarray, fixed: np.ndarray, threads: int = 1) -> np.ndarray:
    """Elastix default B-spline registration; the field in the bundle's convention: (2, H, W), pixels, pull
    (warped(x) = moving(x + ddf(x))), channel i along array axis i."""
    import itk

    fixed_image = itk.image_from_array(np.ascontiguousarray(fixed, dtype=np.float32))
    moving_image = itk.image_from_array(np.ascontiguousarray(moving, dtype=np.float32))
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    _, transform = itk.elastix_registration_method(
        fixed_image, moving_image, parameter_object=parameters, number_of_threads=threads, log_to_console=False
    )
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:  # transformix writes deformationField.nii into the cwd
        os.chdir(scratch)
        try:
            field = itk.array_from_image(itk.transformix_deformation_field(moving_image, transform))  # (H, W, 2): x, y
        finally:
            os.chdir(cwd)
    return np.stack([field[..., 1], field[..., 0]]).astype(np.float32)


def elastix_method(cache_path: Path, threads: int) -> Callable[[dict], torch.Tensor]:
    """pair -> (Elastix ddf, seconds), cached per case in an ``.npz`` (Elastix is the slow method); the seconds are
    those of the original registration (NaN for cache entries written without them)."""
    cache = dict(np.load(cache_path)) if cache_path.is_file() else {}

    def run(pair: dict) -> tuple[torch.Tensor, float]:
        if pair["case"] not in cache:
            start = time.perf_counter()
            cache[pair["case"]] = elastix_ddf(pair["moving"][0].numpy(), pair["fixed"][0].numpy(), threads)
            cache["seconds__" + pair["case"]] = np.float64(time.perf_counter() - start)
            np.savez_compressed(cache_path, **cache)
        seconds = float(cache.get("seconds__" + pair["case"], math.nan))  # the registration's own time, not the cache read
        return torch.as_tensor(cache[pair["case"]]), seconds

    return run


def refined_method(network: torch.nn.Module, refiner: InstanceRefiner) -> Callable[[dict], torch.Tensor]:
    """pair -> ddf (2, H, W): the network's field refined for the pair (one pair per call, as timed)."""

    def run(pair: dict) -> torch.Tensor:
        return refiner(network, torch.cat([pair["moving"], pair["fixed"]])[None]).ddf[0]

    return run


def all_labels_dice(pair: dict, ddf: torch.Tensor, labels: Sequence[int] = (1, 2, 3)) -> float:
    """Mean Dice x100 over ``labels`` present in both frames, each ED label warped as the protocol warps the
    myocardium (binary, bilinear, > 0): the all-labels companion of the paper's myocardium Dice."""
    scores = []
    for value in labels:
        fixed = (pair["fixed_label"][0] == value).numpy()
        moving = (pair["moving_label"] == value).long()[None]
        if not fixed.any() or not moving.any():
            continue
        warped = warp_labels(moving, ddf[None], 2, "binary_bilinear")[0, 1].numpy() > 0
        scores.append(200.0 * np.logical_and(warped, fixed).sum() / (warped.sum() + fixed.sum()))
    return float(np.mean(scores)) if scores else math.nan


def evaluate(pairs: list[dict], methods: dict[str, Callable], label: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Per-slice rows (method, case, patient, metrics, seconds) and the fields of every method."""
    rows, fields = [], {}
    for name, method in methods.items():
        for pair in pairs:
            start = time.perf_counter()
            result = method(pair)
            seconds = time.perf_counter() - start
            if isinstance(result, tuple):  # (ddf, seconds) from a cached method
                result, seconds = result
            ddf = result.float()
            fields[name, pair["case"]] = ddf
            moving_fg = (pair["moving_label"] == label).long()[None]
            warped = warp_labels(moving_fg, ddf[None], 2, "binary_bilinear")[0, 1].numpy() > 0
            metrics = slice_metrics(warped, (pair["fixed_label"][0] == label).numpy(), ddf)
            rows.append({"method": name, "case": pair["case"], "patient": pair["patient"], **metrics,
                         "dice_all_labels": all_labels_dice(pair, ddf), "seconds": seconds})
        print(f"{name}: {len(pairs)} pairs done", flush=True)
    return rows, fields


def write_refinement_tests(rows: list[dict], network: str, refined: Sequence[tuple[int, bool, str]], out: Path,
                           title: str) -> None:
    """refinement.md: per step count, paired t-tests of per-slice Dice (myocardium, and all labels) between the
    network alone, plain and score-weighted refinement, over the slices valid for both."""
    by_method: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r["case"]] = r
    lines = [f"### Test-time refinement of {network}: paired t-tests, {title}", "",
             "| steps | comparison | metric | mean difference (points) | t | p | n |", "|---|---|---|---|---|---|---|"]
    for steps in sorted({s for s, _, _ in refined}):
        plain = next(n for s, w, n in refined if s == steps and not w)
        weighted = next(n for s, w, n in refined if s == steps and w)
        for a, b in ((weighted, plain), (weighted, network), (plain, network)):
            for metric in ("dice", "dice_all_labels"):
                common = [c for c in sorted(set(by_method[a]) & set(by_method[b]))
                          if math.isfinite(by_method[a][c][metric]) and math.isfinite(by_method[b][c][metric])]
                x = [by_method[a][c][metric] for c in common]
                y = [by_method[b][c][metric] for c in common]
                test = paired_ttest(x, y)
                diff = float(np.mean(np.asarray(x) - np.asarray(y))) if common else math.nan
                short = {weighted: "score-weighted", plain: "plain", network: "network alone"}
                lines.append(f"| {steps} | {short[a]} vs {short[b]} | {metric} | {diff:+.2f} | {test['t']:.2f} | "
                             f"{test['p']:.2g} | {test['n']} |")
    (out / "refinement.md").write_text("\n".join(lines) + "\n")


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    array = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if not array.size:
        return math.nan, math.nan, 0
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0, int(array.size)


def summarise(rows: list[dict], train_times: dict[str, str], reference: str = "VoxelMorph-MSE",
              candidate: str | Sequence[str] = "AdaCS") -> list[dict]:
    """One row per method: mean +- std of every metric over valid slices, times, and the paired t-test of each
    candidate against the reference."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_method = {m: {r["case"]: r for r in rows if r["method"] == m} for m in methods}
    table = []
    for method in methods:
        cases = by_method[method]
        entry = {"method": method}
        for metric in (*PAPER_METRICS, "dice_all_labels"):
            mean, std, n = _mean_std([r.get(metric, math.nan) for r in cases.values()])
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean, std
            if metric == "dice":
                entry["n_slices"] = n
        entry["dropped_slices"] = len(cases) - entry["n_slices"]
        entry["seconds_per_pair"] = _mean_std([r["seconds"] for r in cases.values()])[0]
        entry["training_time"] = train_times.get(method, "none")
        entry["p_vs_" + reference] = math.nan
        table.append(entry)
    candidates = [candidate] if isinstance(candidate, str) else list(candidate)
    for name in candidates:
        if name not in by_method or reference not in by_method or name == reference:
            continue
        common = sorted(set(by_method[name]) & set(by_method[reference]))
        test = paired_ttest([by_method[name][c]["dice"] for c in common], [by_method[reference][c]["dice"] for c in common])
        for entry in table:
            if entry["method"] == name:
                entry["p_vs_" + reference] = test["p"]
                entry["t_vs_" + reference] = test["t"]
                entry["n_paired"] = test["n"]
    return table


def parse_models(items: Sequence[str]) -> dict[str, Path]:
    """``--model NAME=PATH`` items as ``{NAME: PATH}``; a clear error for a bad item, a clash or a missing file."""
    models: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ValueError(f"--model {item!r}: expected NAME=PATH/TO/model.pt")
        if name in METHODS or name in models:
            raise ValueError(f"--model {item!r}: the name {name!r} is already a row of the table")
        if not Path(path).is_file():
            raise ValueError(f"--model {item!r}: {path} is not a file")
        models[name] = Path(path)
    return models


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def write_tables(table: list[dict], rows: list[dict], out: Path, title: str, reference: str = "VoxelMorph-MSE") -> None:
    """results.csv, results.md and per_slice.csv."""
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for entry in table for k in entry))
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, keys)
        writer.writeheader()
        writer.writerows(table)
    with (out / "per_slice.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"### {title}", "",
        "| Method | Dice (%) | HD (px) | ASD (px) | Folding (%) | slices (dropped) | training time | s / pair (inference) | p vs " + reference + " | Dice all labels (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        p = e.get("p_vs_" + reference, math.nan)
        lines.append(
            f"| {e['method']} | {_fmt(e['dice_mean'])} ± {_fmt(e['dice_std'])} | {_fmt(e['hd_mean'])} ± {_fmt(e['hd_std'])} | "
            f"{_fmt(e['asd_mean'])} ± {_fmt(e['asd_std'])} | {_fmt(e['folding_mean'], 3)} | {e['n_slices']} ({e['dropped_slices']}) | "
            f"{e['training_time']} | {_fmt(e['seconds_per_pair'], 3)} | {'' if not math.isfinite(p) else f'{p:.2g}'} | "
            f"{_fmt(e.get('dice_all_labels_mean', math.nan))} ± {_fmt(e.get('dice_all_labels_std', math.nan))} |"
        )
    lines += ["", "Myocardium only, per 2D slice at 128x128, paper protocol (bundle/scripts/paper_metrics.py); "
              "± is the standard deviation over slices; p: paired t-test of per-slice Dice (scipy.stats.ttest_rel). "
              "Dice all labels: mean over the labels 1-3 present in both frames, each warped as the myocardium."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def score_by_label(pairs: list[dict], scoring: torch.nn.Module) -> list[dict]:
    """Mean score S = g(fixed) inside each label of the fixed image (0 = outside the labels): per label, the mean and
    std over pairs of the per-pair region mean, the pairs containing the label, and the mean over all its pixels."""
    per_label: dict[int, list[tuple[float, int]]] = {}
    with torch.no_grad():
        for pair in pairs:
            score = scoring(pair["fixed"][None])[0, 0]
            label = pair["fixed_label"][0]
            for value in torch.unique(label).tolist():
                region = score[label == value]
                per_label.setdefault(int(value), []).append((float(region.mean()), region.numel()))
    table = []
    for value in sorted(per_label):
        means = np.array([m for m, _ in per_label[value]])
        counts = np.array([n for _, n in per_label[value]])
        table.append({"label": value, "pairs": len(means), "score_mean": float(means.mean()),
                      "score_std": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
                      "score_pixel_mean": float((means * counts).sum() / counts.sum())})
    return table


def write_score_table(table: list[dict], out: Path, title: str) -> None:
    """scores.csv and scores.md."""
    with (out / "scores.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = [f"# {title}: mean score S = g(fixed) per fixed-image label", "",
             "| label | pairs | S, mean ± std over pairs | S, mean over pixels |", "|---|---|---|---|"]
    lines += [f"| {r['label']}{' (outside the labels)' if r['label'] == 0 else ''} | {r['pairs']} | "
              f"{r['score_mean']:.3f} ± {r['score_std']:.3f} | {r['score_pixel_mean']:.3f} |" for r in table]
    (out / "scores.md").write_text("\n".join(lines) + "\n")


def make_figures(pairs: list[dict], rows: list[dict], fields: dict, out: Path, label: int, scoring: torch.nn.Module | None,
                 num_examples: int = 3) -> list[Path]:
    """Per-case Dice distributions and example panels; returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures", file=sys.stderr)
        return []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    written = []
    fig, ax = plt.subplots(figsize=(1.8 * len(methods) + 2, 4))
    data = [[r["dice"] for r in rows if r["method"] == m and math.isfinite(r["dice"])] for m in methods]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(methods) + 1), methods)
    ax.set_ylabel("myocardium Dice (%) per slice")
    fig.tight_layout()
    fig.savefig(out / "dice_distribution.png", dpi=100)
    plt.close(fig)
    written.append(out / "dice_distribution.png")

    method = "AdaCS" if any(k[0] == "AdaCS" for k in fields) else methods[-1]
    chosen = [p for p in pairs if (p["fixed_label"] == label).sum() > 50][:num_examples] or pairs[:num_examples]
    columns = ["fixed (ES)", "moving (ED)", f"warped ({method})", "deformation grid", "score map"]
    fig, axes = plt.subplots(len(chosen), len(columns), figsize=(3 * len(columns), 3 * len(chosen)), squeeze=False)
    for row, pair in zip(axes, chosen):
        ddf = fields[method, pair["case"]]
        from monai.networks.blocks import Warp

        warped = Warp(mode="bilinear", padding_mode="zeros")(pair["moving"][None], ddf[None])[0, 0]
        images = [pair["fixed"][0], pair["moving"][0], warped]
        for axis, image in zip(row[:3], images):
            axis.imshow(image.T.numpy(), cmap="gray", origin="lower")
            axis.contour((pair["fixed_label"][0] == label).T.numpy().astype(float), levels=[0.5], colors="r", linewidths=0.7)
        h, w = ddf.shape[1:]
        grid0, grid1 = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        pos0, pos1 = grid0 + ddf[0].numpy(), grid1 + ddf[1].numpy()
        for i in range(0, h, 4):
            row[3].plot(pos0[i, :], pos1[i, :], "k-", linewidth=0.4)
        for j in range(0, w, 4):
            row[3].plot(pos0[:, j], pos1[:, j], "k-", linewidth=0.4)
        row[3].set_aspect("equal")
        if scoring is not None:
            with torch.no_grad():
                score = scoring(pair["fixed"][None])[0, 0]
            shown = row[4].imshow(score.T.numpy(), cmap="viridis", vmin=0, vmax=1, origin="lower")
            fig.colorbar(shown, ax=row[4], fraction=0.046)
        else:
            row[4].text(0.5, 0.5, "no scoring net", ha="center")
        row[0].set_ylabel(pair["case"])
    for axis, name in zip(axes[0], columns):
        axis.set_title(name)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=80)
    plt.close(fig)
    written.append(out / "examples.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", required=True, help="prepared dataset folder (scripts/prepare_*.py)")
    parser.add_argument("--datalist", default=None, help="datalist JSON (default: <dataset-dir>/datalist.json)")
    parser.add_argument("--section", default="testing")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vxm", default=None, help="VoxelMorph-MSE model.pt (flat state dict) or training checkpoint")
    parser.add_argument("--adacs", default=None, help="AdaCS model.pt (flat state dict) or training checkpoint")
    parser.add_argument("--adacs-scoring", default=None,
                        help="AdaCS scoring_model.pt or training checkpoint: score maps and the per-label score table")
    parser.add_argument("--score-headroom", type=float, default=0.0,
                        help="the score_headroom the --adacs-scoring network was trained with (default 0: the paper)")
    parser.add_argument("--vxm-train-time", default="n/a")
    parser.add_argument("--adacs-train-time", default="n/a")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=MODEL.pt",
                        help="one more displacement network (model.pt or checkpoint) as a row NAME, with its p vs "
                             "VoxelMorph-MSE: an ablation or a control; repeatable")
    parser.add_argument("--no-elastix", action="store_true", help="leave Elastix out (e.g. itk-elastix not installed)")
    parser.add_argument("--elastix-threads", type=int, default=1)
    parser.add_argument("--label", type=int, default=2, help="label evaluated (2 = myocardium in ACDC and CAMUS)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-cases", type=int, default=None, help="first N pairs only (quick checks)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--refine-steps", type=int, nargs="*", default=[],
                        help="test-time refinement rows: Adam steps per pair (e.g. 10 50 200), plain and score-weighted")
    parser.add_argument("--refine-model", default="AdaCS", help="the network row refined (AdaCS, VoxelMorph-MSE or a --model NAME)")
    parser.add_argument("--refine-scoring", default=None, help="scoring network of the weighted refinement (default --adacs-scoring)")
    parser.add_argument("--refine-similarity", default="mse", choices=("mse", "lncc"))
    parser.add_argument("--refine-learning-rate", type=float, default=0.1)
    parser.add_argument("--refine-max-folding", type=float, default=0.5, help="per-pair folding limit, %%")
    args = parser.parse_args(argv)

    try:
        extra_models = parse_models(args.model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    datalist = args.datalist or str(Path(args.dataset_dir) / "datalist.json")
    if not Path(datalist).is_file():
        datalist = None
    try:
        pairs = load_pairs(args.dataset_dir, datalist, args.section, args.image_size, args.max_cases)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    methods: dict[str, Callable] = {"Undeformed": lambda pair: torch.zeros(2, *pair["moving"].shape[1:])}
    if not args.no_elastix:
        methods["Elastix"] = elastix_method(args.out / "elastix_ddf.npz", args.elastix_threads)
    train_times = {"Undeformed": "none", "Elastix": "none (per-pair optimisation)"}
    networks = [("VoxelMorph-MSE", args.vxm, args.vxm_train_time), ("AdaCS", args.adacs, args.adacs_train_time),
                *((name, path, "n/a") for name, path in extra_models.items())]
    loaded = {}
    for name, path, train_time in networks:
        if path:
            loaded[name] = load_network(path)
            methods[name] = network_method(loaded[name])
            train_times[name] = train_time
    refined_rows = []
    if args.refine_steps:
        if args.refine_model not in loaded:
            print(f"error: --refine-model {args.refine_model}: no such network row", file=sys.stderr)
            return 2
        scoring_path = args.refine_scoring or args.adacs_scoring
        if not scoring_path:
            print("error: score-weighted refinement needs --refine-scoring (or --adacs-scoring)", file=sys.stderr)
            return 2
        refine_scoring = load_network(scoring_path, scoring=True, score_headroom=args.score_headroom)
        for steps in args.refine_steps:
            for weighted in (False, True):
                name = f"{args.refine_model} + {'score-weighted' if weighted else 'plain'} refinement ({steps})"
                refiner = InstanceRefiner(steps, args.refine_learning_rate, similarity=args.refine_similarity,
                                          score_weighted=weighted, scoring_network=refine_scoring,
                                          max_folding_pct=args.refine_max_folding)
                methods[name] = refined_method(loaded[args.refine_model], refiner)
                train_times[name] = train_times[args.refine_model]
                refined_rows.append((steps, weighted, name))
    rows, fields = evaluate(pairs, methods, args.label)
    table = summarise(rows, train_times, candidate=["AdaCS", *extra_models, *(n for _, _, n in refined_rows)])
    title = args.title or f"{Path(args.dataset_dir).name}, section '{args.section}', {len(pairs)} pairs"
    write_tables(table, rows, args.out, title)
    if refined_rows:
        write_refinement_tests(rows, args.refine_model, refined_rows, args.out, title)
    scoring = None
    if args.adacs_scoring:
        scoring = load_network(args.adacs_scoring, scoring=True, score_headroom=args.score_headroom)
    if scoring is not None:
        write_score_table(score_by_label(pairs, scoring), args.out, title)
    if not args.no_figures:
        make_figures(pairs, rows, fields, args.out, args.label, scoring)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
