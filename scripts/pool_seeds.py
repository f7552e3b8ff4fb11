"""Pool several seeds of ``scripts/compare_methods.py``: per-seed and seed-mean table, and a seed-averaged t-test.

    python scripts/pool_seeds.py RUN_DIR [RUN_DIR ...] [--reference VoxelMorph-MSE] [--candidate AdaCS] [--out F.md]

Each RUN_DIR is one ``compare_methods.py`` output folder (same dataset and split, one training seed); only its
``per_slice.csv`` is read. For every method: the per-seed mean of each metric over valid slices and the mean of
those over seeds. For the candidate against the reference: the per-seed Dice difference and paired t-test (as in
each ``results.md``); one paired t-test of the per-slice Dice averaged over the seeds (each slice counts once,
so the test is not inflated by counting the same slices once per seed: it asks whether the gain holds across test
slices); and, with three or more seeds, a paired t-test of the per-seed mean Dice with the number of seeds the
candidate wins (it asks whether the gain holds across training seeds, on this fixed test set).

With ``--folds`` the runs are cross-validation folds (``prepare_acdc.py --fold k``): each tested other patients,
so instead of averaging a slice over runs, every method's slices of all folds are put together (each slice once;
a case in two folds is an error), the table gains the mean ± std over all slices, and the per-slice paired t-test runs
over all of them; the per-run test then asks whether the gain holds across folds (training and test sets).
Rows of the per-run tests are named by the shortest distinguishing end of each folder's path ("fold0/table").
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

METRICS = ("dice", "hd", "asd", "folding")


def read_per_slice(run_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {case: {metric: value}}}`` from ``run_dir/per_slice.csv`` (NaN = dropped slice)."""
    path = Path(run_dir) / "per_slice.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a scripts/compare_methods.py output folder)")
    runs: dict[str, dict[str, dict[str, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"method", "case", *METRICS} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        for row in reader:
            runs.setdefault(row["method"], {})[row["case"]] = {m: float(row[m]) for m in METRICS}
    return runs


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def paired(candidate: dict[str, float], reference: dict[str, float]) -> tuple[float, float, int]:
    """Mean Dice difference, paired t-test p and n over the cases finite in both."""
    cases = sorted(c for c in set(candidate) & set(reference) if math.isfinite(candidate[c]) and math.isfinite(reference[c]))
    if len(cases) < 2:
        return math.nan, math.nan, len(cases)
    a, b = np.array([candidate[c] for c in cases]), np.array([reference[c] for c in cases])
    return float((a - b).mean()), float(stats.ttest_rel(a, b).pvalue), len(cases)


def seed_averaged_dice(runs: list[dict], method: str) -> dict[str, float]:
    """Per-slice Dice averaged over the seeds that have the method (a slice dropped in any seed stays NaN)."""
    per_seed = [run[method] for run in runs if method in run]
    cases = set.intersection(*(set(p) for p in per_seed))
    return {c: float(np.mean([p[c]["dice"] for p in per_seed])) for c in cases}


def concatenated_dice(runs: list[dict], method: str) -> dict[str, float]:
    """Per-slice Dice of all folds that have the method, put together; the folds must test disjoint cases."""
    joined: dict[str, float] = {}
    for fold, run in enumerate(runs):
        for case, values in run.get(method, {}).items():
            if case in joined:
                raise ValueError(f"case {case} is in more than one fold (run {fold + 1}): "
                                 "folds must test disjoint cases")
            joined[case] = values["dice"]
    return joined


def across_seeds(differences: list[float]) -> tuple[float, float, int, int]:
    """Mean of the per-seed Dice differences, one-sample t-test p against 0 (= paired t-test of the per-seed means;
    NaN below three seeds), number of seeds and number the candidate wins."""
    finite = np.array([d for d in differences if math.isfinite(d)])
    p = float(stats.ttest_1samp(finite, 0.0).pvalue) if len(finite) >= 3 else math.nan
    mean = float(finite.mean()) if len(finite) else math.nan
    return mean, p, len(finite), int((finite > 0).sum())


def pool(runs: list[dict], reference: str, candidate: str, folds: bool = False) -> dict:
    """Per-seed and seed-mean metrics per method, and the candidate-vs-reference tests (``folds``: see the module)."""
    methods = list(dict.fromkeys(m for run in runs for m in run))
    table = []
    for method in methods:
        seeds = [run[method] for run in runs if method in run]
        per_seed = {m: [_finite_mean([case[m] for case in s.values()]) for s in seeds] for m in METRICS}
        table.append({"method": method, "seeds": len(seeds), "per_seed_dice": per_seed["dice"],
                      **{f"{m}_mean": float(np.mean(v)) for m, v in per_seed.items()},
                      "dice_seed_std": float(np.std(per_seed["dice"], ddof=1)) if len(seeds) > 1 else 0.0})
        if folds:
            all_slices = [d for d in concatenated_dice(runs, method).values() if math.isfinite(d)]
            table[-1]["dice_all_slices"] = _finite_mean(all_slices)
            table[-1]["dice_all_slices_std"] = float(np.std(all_slices, ddof=1)) if len(all_slices) > 1 else math.nan
    tests = {}
    if reference in methods and candidate in methods:
        tested = [i for i, run in enumerate(runs) if reference in run and candidate in run]
        both = [runs[i] for i in tested]
        tests["runs"] = tested
        tests["per_seed"] = [paired(*({c: v["dice"] for c, v in run[m].items()} for m in (candidate, reference))) for run in both]
        per_slice = concatenated_dice if folds else seed_averaged_dice
        tests["seed_averaged"] = paired(per_slice(both, candidate), per_slice(both, reference))
        tests["across_seeds"] = across_seeds([diff for diff, _, _ in tests["per_seed"]])
    return {"table": table, "tests": tests, "reference": reference, "candidate": candidate, "folds": folds}


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_p(p: float) -> str:
    """A p-value to three decimals; below 0.001 as "< 0.001" rather than a misleading 0.000."""
    return "< 0.001" if math.isfinite(p) and p < 0.001 else _fmt(p, 3)


def _p_clause(p: float) -> str:
    """"p = 0.123" or "p < 0.001", for a sentence."""
    return "p < 0.001" if math.isfinite(p) and p < 0.001 else f"p = {_fmt(p, 3)}"


def short_names(run_dirs: list[str]) -> list[str]:
    """The fewest trailing path parts that tell the folders apart ("fold0/table_best", ...), to label their rows."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(run_dirs)


def to_markdown(pooled: dict, run_dirs: list[str]) -> str:
    folds = pooled["folds"]
    unit = "fold" if folds else "seed"
    lines = [f"{unit.capitalize()}s pooled: {len(run_dirs)} ({', '.join(run_dirs)})", "",
             f"| Method | Dice per {unit} (%) | Dice, mean of {unit}s (%) | std over {unit}s | "
             + ("Dice, all slices (%, ± std over slices) | " if folds else "") + "HD (px) | ASD (px) | Folding (%) |",
             "|---|---|---|---|" + ("---|" if folds else "") + "---|---|---|"]
    for e in pooled["table"]:
        lines.append(f"| {e['method']} | {' / '.join(_fmt(d) for d in e['per_seed_dice'])} | {_fmt(e['dice_mean'])} | "
                     f"{_fmt(e['dice_seed_std'])} | " + (f"{_fmt(e['dice_all_slices'])} ± {_fmt(e['dice_all_slices_std'])} | " if folds else "")
                     + f"{_fmt(e['hd_mean'])} | {_fmt(e['asd_mean'])} | {_fmt(e['folding_mean'], 3)} |")
    tests = pooled["tests"]
    if tests:
        name = f"{pooled['candidate']} - {pooled['reference']}"
        lines += ["", f"| {name} (Dice) | mean difference | paired t-test p | slices |", "|---|---|---|---|"]
        names = short_names(run_dirs)
        for index, (diff, p, n) in zip(tests["runs"], tests["per_seed"]):
            lines.append(f"| {names[index]} | {diff:+.2f} | {_fmt_p(p)} | {n} |")
        diff, p, n = tests["seed_averaged"]
        label = "all slices of all folds" if folds else "per-slice Dice averaged over the runs"
        lines.append(f"| {label} | {diff:+.2f} | {_fmt_p(p)} | {n} |")
        diff, p, n, wins = tests["across_seeds"]
        if n >= 3:
            lines += ["", f"Across the {n} {unit}s: {pooled['candidate']} ahead in {wins}, mean difference {diff:+.2f}, "
                      f"paired t-test of the per-{unit} means {_p_clause(p)} "
                      + ("(across folds: other training and test patients)." if folds
                         else "(training-seed spread on this test set).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="compare_methods.py output folders, one per seed")
    parser.add_argument("--reference", default="VoxelMorph-MSE")
    parser.add_argument("--candidate", default="AdaCS")
    parser.add_argument("--folds", action="store_true",
                        help="the runs are cross-validation folds (disjoint test cases): test over all their slices")
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)
    try:
        runs = [read_per_slice(Path(d)) for d in args.run_dirs]
        text = to_markdown(pool(runs, args.reference, args.candidate, args.folds), args.run_dirs)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
