"""scripts/run_tables.py: every row of the paper's Tables 1, 3 and 4 is a configuration of this bundle trained at one
budget; two-network rows branch off their backbone's MSE run; the paper's numbers are those of the method doc; the
tables are rebuilt from finished rows (pooling seeds) and a tiny table runs end to end and resumes row by row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import BUNDLE, REPO, load_repo_script, write_ring_pairs

load_repo_script("run_experiment")
tables = load_repo_script("run_tables")
SPEC = tables.load_rows_file()
METHOD_DOC = REPO.parent / "shared" / "docs" / "adacs-method.md"


def _options(command: list[str]) -> dict[str, str]:
    return {command[i][2:]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}


def test_every_row_is_a_config_of_the_bundle():
    for backbone in SPEC["backbones"].values():
        for config in backbone["configs"]:
            assert (BUNDLE / config).is_file(), config
    for name, method in SPEC["methods"].items():
        assert method["kind"] in ("single", "branched"), name
        for config in method.get("configs", []):
            assert (BUNDLE / config).is_file(), config
    rows = {f"{b}/{m}" for b in SPEC["backbones"] for t in SPEC["tables"].values() for m in t["methods"]}
    assert len(rows) == 33  # 3 backbones x (6 of Table 1 + the ablation + 4 data terms)
    for dataset in ("acdc", "camus"):
        assert rows | {"undeformed", "elastix"} == set(SPEC["paper"][dataset])


@pytest.mark.skipif(not METHOD_DOC.is_file(), reason="../shared/docs/adacs-method.md is absent (a fresh clone)")
def test_paper_numbers_are_those_of_the_method_doc():
    text = METHOD_DOC.read_text()
    section = lambda start, end: text[text.index(start):text.index(end)]  # noqa: E731
    numbers = lambda line: [float(x) for x in re.findall(r"\d+\.\d+", line)]  # noqa: E731
    main = [numbers(line) for line in section("### 10.1", "### 10.2").splitlines() if line.startswith("|")]
    main = [row for row in main if len(row) == 6]
    order = [("undeformed",), ("elastix",)] + [(f"{b}/{m}",) for b in ("vxm", "tsm", "dfm")
                                               for m in ("mse", "nll", "beta_nll", "adaframe", "adareg", "adacs")]
    assert len(main) == len(order)
    for (key,), row in zip(order, main):
        assert SPEC["paper"]["acdc"][key] == row[:3] and SPEC["paper"]["camus"][key] == row[3:], key
    ablation = [numbers(line) for line in section("### 10.3", "### 10.4").splitlines() if "| off |" in line]
    for backbone, row in zip(("vxm", "tsm", "dfm"), ablation):
        assert SPEC["paper"]["acdc"][f"{backbone}/adacs_no_smooth"] == row[:3]
        assert SPEC["paper"]["camus"][f"{backbone}/adacs_no_smooth"] == row[3:]
    terms = [line for line in section("### 10.4", "### 10.5").splitlines() if re.match(r"\| (vxm|tsm|dfm) ", line)]
    assert len(terms) == 6
    for line in terms:
        backbone, dataset = line.split("|")[1].split()
        values = numbers(line)
        for i, method in enumerate(("ncc", "mi", "tukey", "mae", "mse", "adacs")):
            assert SPEC["paper"][dataset.lower()][f"{backbone}/{method}"] == values[3 * i:3 * i + 3], (line, method)
    extra = [numbers(line) for line in section("### 10.2", "### 10.3").splitlines() if line.startswith("| ")][1:]
    for key, row in zip([f"{b}/{m}" for b in ("vxm", "tsm", "dfm") for m in ("mse", "adacs")], extra):
        assert SPEC["paper_extra"]["acdc"][key] == row[1:4] and SPEC["paper_extra"]["camus"][key] == row[5:8], key


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    return write_ring_pairs(tmp_path / "prepared", ["training"] * 4 + ["validation"] * 2 + ["testing"] * 3)


def test_every_row_gets_the_same_displacement_budget(prepared: Path, tmp_path: Path):
    args = tables.parse_args(["--dataset", "acdc", "--dataset-dir", str(prepared), "--out", str(tmp_path / "t")])
    plan = tables.make_plan(args)
    rows = tables.make_rows(SPEC, list(SPEC["backbones"]), list(SPEC["methods"]), [0])
    assert len(rows) == 33
    seen = set()
    for row in rows:
        options = _options(tables.training_command(plan, row, args.out))
        assert options["learning_rate"] == "0.001" and options["seed"] == "0"
        configs = options["config_file"]
        assert all(f"'{c}'" in configs for c in row.configs)
        if row.branched:  # resumes its backbone's MSE run at the end of the motion-only warm-up, which runs first
            assert f"{row.backbone}/mse" in seen
            assert options["resume_checkpoint"].endswith(f"{row.backbone}/mse/seed0/models/checkpoint_epoch=6.pt")
            displacement_epochs = int(options["epochs"]) - int(options["scoring_warmup_epochs"])
            assert options["alpha"] == "0.01"
        else:
            assert options["use_scoring"] == "false" and options["motion_warmup_epochs"] == options["epochs"]
            displacement_epochs = int(options["epochs"])
        assert displacement_epochs == 10, row
        seen.add(row.key)


def test_step_time_is_the_median_training_epoch(tmp_path: Path):
    log = tmp_path / "train.log"
    lines = [f"x - ignite.engine.engine.AdaCSTrainer - INFO - Epoch[{e}] Complete. Time taken: 00:0{m}:{s}"
             for e, m, s in ((1, 1, "40.0"), (2, 0, "50.0"), (3, 1, "00.0"), (4, 2, "00.0"))]
    log.write_text("\n".join(lines + ["x - RegistrationEvaluator - INFO - Epoch[9] Complete. Time taken: 00:09:00.0"]))
    assert tables.seconds_per_step(log, 1, 100) == pytest.approx(0.8)  # median of 100, 50, 60, 120 s
    assert tables.seconds_per_step(log, 3, 100) == pytest.approx(0.9)  # the joint epochs only


def _finished(results: Path, key: str, seed: int, dice: float, step: float = 0.5, cases: dict | None = None) -> dict:
    """A finished row's result file as run_row records it; ``cases``: its evaluation's per-slice Dice CSV in the
    run folder (``results`` is also the ``out`` folder here)."""
    backbone, method = key.split("/")
    path = results / backbone / method / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    metric = lambda mean: {"mean": mean, "std": 1.0, "n": 9}  # noqa: E731
    path.write_text(json.dumps({
        "row": key, "backbone": backbone, "method": method, "seed": seed, "dice": metric(dice), "hd": metric(5.0),
        "asd": metric(1.2), "folding": metric(0.0), "seconds_per_step": step, "training_seconds": 600}))
    if cases:
        test = results / backbone / method / f"seed{seed}" / "test"
        test.mkdir(parents=True)
        (test / "paper_dice_raw.csv").write_text("filename,class0,mean\n" + "".join(
            f"/data/{case}.nii.gz,{value},{value}\n" for case, value in cases.items()))
    return json.loads(path.read_text())


def test_tables_pool_seeds_keep_the_paper_layout_and_say_where_the_order_differs(tmp_path: Path):
    out = tmp_path / "t"
    # per-slice Dice whose mean is the recorded one, as in a real evaluation
    cases = lambda mean: {f"s{i}": mean - 3.5 + i for i in range(8)} | {"s8": float("nan")}  # noqa: E731
    _finished(out, "vxm/mse", 0, 80.0, cases=cases(80.0))
    _finished(out, "vxm/mse", 1, 82.0, step=0.7, cases=cases(82.0))
    _finished(out, "vxm/adacs", 0, 79.0, cases=cases(79.0))  # seed 0 only: no test against the two-seed MSE
    noisy = {f"s{i}": 77.5 + i + (0.5 if i % 2 else -0.5) for i in range(8)} | {"s8": 81.0}  # mean 81
    _finished(out, "vxm/adareg", 0, 81.0, cases=noisy)
    _finished(out, "vxm/adareg", 1, 83.0, cases={k: v + 2.0 for k, v in noisy.items()})
    report = tmp_path / "report.md"
    tables.write_tables(SPEC, "acdc", out, out, "a stated budget", report)
    text = (out / "tables.md").read_text()
    assert report.read_text() == text and "a stated budget" in text
    assert "| VoxelMorph | MSE | 81.00 ± 1.00 | – | – | 5.00 | 1.20 | 0.000 | 0.60 | 2 | 79.48 | 4.79 | 1.27 | 0.29 | 0.26 |" in text
    assert "| VoxelMorph | AdaCS | 79.00 ± 1.00 | – | – |" in text
    # AdaReg - MSE per slice (seed means, the NaN slice left out): 0.5, 1.5, 0.5, ... : t = 5.29 with 7 df
    assert "| VoxelMorph | AdaReg | 82.00 ± 1.00 | 0.0011 | – |" in text  # two seeds: no test over seeds
    assert json.loads((out / "vxm" / "adareg" / "p_vs_mse.json").read_text())["slices"] == 8
    assert "| TransMorph | NLL | – | – | – | – | – | – | – | 0 | 73.12 | 7.22 | 1.27 | – | – |" in text
    assert "**different best: ours AdaReg, the paper's AdaCS**" in text
    assert text.count("## Table") == 3
    csv_text = (out / "tables.csv").read_text()
    assert csv_text.splitlines()[0].startswith("row,") and "vxm/mse" in csv_text and "80.0,82.0" in csv_text
    # another machine: the results without the evaluations (per-slice values are not committed); the kept p is used
    import shutil

    for test in out.glob("*/*/seed*/test"):
        shutil.rmtree(test)
    tables.write_tables(SPEC, "acdc", out, out, "a stated budget", None)
    assert (out / "tables.md").read_text() == text


def test_no_per_slice_p_from_an_evaluation_that_is_not_the_recorded_run(tmp_path: Path):
    """MSE trained again on another machine (not bit-reproducible): its evaluation in ``out`` is not the recorded row's,
    so no p is computed from it."""
    out = tmp_path / "t"
    cases = lambda mean, noise: {f"s{i}": mean - 3.5 + i + (noise if i % 2 else -noise) for i in range(8)}  # noqa: E731
    _finished(out, "vxm/mse", 0, 80.0, cases=cases(80.6, 0.5))  # recorded 80.0, the evaluation here 80.6
    _finished(out, "vxm/adacs", 0, 81.0, cases=cases(81.0, -0.5))
    rows = {key: tables.pooled(seeds) for key, seeds in tables.finished_rows(out, out).items()}
    assert rows["vxm/mse"]["dice_per_case"] is None and rows["vxm/adacs"]["dice_per_case"] is not None
    assert tables.p_against_mse(rows, "vxm/adacs", out) is None
    (out / "vxm" / "mse" / "seed0.json").write_text(  # the recorded run's own evaluation: p is computed
        (out / "vxm" / "mse" / "seed0.json").read_text().replace('"mean": 80.0', '"mean": 80.6'))
    rows = {key: tables.pooled(seeds) for key, seeds in tables.finished_rows(out, out).items()}
    # AdaCS - MSE per slice: 1.4, -0.6, 1.4, ...: mean 0.4, sd (8/7)^0.5, t = 1.058 with 7 df
    assert tables.p_against_mse(rows, "vxm/adacs", out) == pytest.approx(0.325, abs=1e-3)


def test_the_gap_to_mse_is_tested_over_training_seeds_once_there_are_three(tmp_path: Path):
    out = tmp_path / "t"
    for seed, mse, adacs in ((0, 80.0, 79.0), (1, 82.0, 81.5), (2, 81.0, 80.0)):
        _finished(out, "vxm/mse", seed, mse)
        _finished(out, "vxm/adacs", seed, adacs)
    _finished(out, "vxm/nll", 0, 70.0)
    _finished(out, "vxm/nll", 1, 71.0)
    rows = {key: tables.pooled(seeds) for key, seeds in tables.finished_rows(out, out).items()}
    # differences -1, -0.5, -1: mean -0.833, sd 0.289, t = -5.0 with 2 df
    assert tables.p_over_seeds(rows, "vxm/adacs") == pytest.approx(0.0377, abs=1e-4)
    assert tables.p_over_seeds(rows, "vxm/nll") is None and tables.p_over_seeds(rows, "vxm/mse") is None
    tables.write_tables(SPEC, "acdc", out, out, "a stated budget", None)
    assert "| VoxelMorph | AdaCS | 80.17 ± 1.00 | – | 0.038 |" in (out / "tables.md").read_text()


def test_a_missing_config_fails_its_rows_and_the_others_finish(prepared: Path, tmp_path: Path, monkeypatch, capsys):
    ran = []
    monkeypatch.setitem(SPEC["backbones"], "tsm", {"name": "TransMorph", "configs": ["configs/backbone_absent.yaml"]})
    monkeypatch.setattr(tables, "load_rows_file", lambda path=None: SPEC)
    monkeypatch.setattr(tables, "run_row", lambda plan, row, out, results, steps, dependency: ran.append(row.key)
                        or _finished(results, row.key, row.seed, 80.0))
    code = tables.main(["--dataset", "acdc", "--dataset-dir", str(prepared), "--out", str(tmp_path / "t"),
                        "--backbones", "vxm", "tsm", "--methods", "mse", "--no-reference"])
    assert code == 1 and ran == ["vxm/mse"]
    assert "tsm/mse seed 0: configs/backbone_absent.yaml does not exist" in capsys.readouterr().err


def test_a_recorded_mse_run_is_trained_again_once_to_branch_from(prepared: Path, tmp_path: Path, monkeypatch):
    """A new machine: the MSE row's result is in --results but its checkpoints are not in --out; the two-network rows
    that branch off it train its warm-up again (6 epochs, not the whole run), once, even when they start together,
    and then resume from it."""
    import threading
    import time

    trained = []

    def fake_train(plan, run_dir, command, branch_epoch_file=None):
        trained.append(run_dir)
        options = _options(command)
        assert options["epochs"] == options["motion_warmup_epochs"] == "6" and options["use_scoring"] == "false"
        time.sleep(0.2)
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        (run_dir / "models" / "checkpoint_epoch=6.pt").write_text("")
        return {"seconds": 1.0}

    monkeypatch.setattr(tables, "train", fake_train)
    args = tables.parse_args(["--dataset", "acdc", "--dataset-dir", str(prepared), "--out", str(tmp_path / "t")])
    plan = tables.make_plan(args)
    rows = [r for r in tables.make_rows(SPEC, ["vxm"], ["adacs", "nll"], [0])]
    threads = [threading.Thread(target=tables.branch_point, args=(plan, row, args.out)) for row in rows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    branch_from = args.out / "branch_points" / "vxm" / "mse" / "seed0"
    assert trained == [branch_from]
    for row in rows:
        assert _options(tables.training_command(plan, row, args.out))["resume_checkpoint"] == str(
            (branch_from / "models" / "checkpoint_epoch=6.pt").resolve())
    (args.out / "vxm" / "mse" / "seed0" / "models").mkdir(parents=True)  # the MSE run's own checkpoint comes first
    (args.out / "vxm" / "mse" / "seed0" / "models" / "checkpoint_epoch=6.pt").write_text("")
    own = args.out / "vxm" / "mse" / "seed0" / "models" / "checkpoint_epoch=6.pt"
    assert tables.branch_point(plan, rows[0], args.out) == own
    assert len(trained) == 1


def test_tiny_table_end_to_end_and_resume(prepared: Path, tmp_path: Path):
    out, results = tmp_path / "t", tmp_path / "repo_results"
    argv = ["--dataset", "acdc", "--dataset-dir", str(prepared), "--out", str(out), "--results", str(results),
            "--backbones", "vxm",
            "--methods", "mse", "adacs", "--motion-warmup", "1", "--scoring-warmup", "1", "--joint", "1",
            "--no-reference", "--bundle-arg", "epoch_length=2", "--bundle-arg", "batch_size=2",
            "--bundle-arg", "image_size=[32,32]", "--bundle-arg", "train#handler#progress_bar#_disabled_=true"]
    assert tables.main(argv) == 0, [p.read_text()[-3000:] for p in out.glob("*/*/seed0/*.log")]
    for method in ("mse", "adacs"):
        result = json.loads((out / "vxm" / method / "seed0" / "row.json").read_text())
        assert result["dice"]["n"] == 3 and 0 <= result["dice"]["mean"] <= 100
        assert result["seconds_per_step"] > 0 and "dice_per_case" not in result
    assert "checkpoint_epoch=1.pt" in (out / "vxm" / "adacs" / "seed0" / "cmd.sh").read_text()
    text = (out / "tables.md").read_text()
    assert "2 displacement epochs x 2 micro-steps of 2 pairs, an update every 2 (effective batch 4): 2 displacement updates" in text
    assert "| VoxelMorph | AdaCS | " in text and "| VoxelMorph | AdaCS, L_smooth off | – |" in text
    logs = {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed0/train.log")}
    assert len(logs) == 2 and tables.main(argv) == 0
    assert logs == {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed0/train.log")}  # finished rows are kept
    assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json")) == [
        "vxm/adacs/p_vs_mse.json", "vxm/adacs/seed0.json", "vxm/mse/seed0.json"]
    # another machine: only --results survives; nothing is trained again and the tables are the same
    import shutil

    shutil.rmtree(out)
    assert tables.main(argv) == 0 and not list(out.glob("*/*/seed0/train.log"))
    assert (out / "tables.md").read_text() == text
    # a new two-network row there: the MSE warm-up alone (1 epoch here) is trained again to branch from
    argv[argv.index("adacs") + 1:argv.index("adacs") + 1] = ["adacs_no_smooth"]
    assert tables.main(argv) == 0, [p.read_text()[-3000:] for p in out.rglob("train.log")]
    warmup = out / "branch_points" / "vxm" / "mse" / "seed0" / "models"
    assert (warmup / "checkpoint_epoch=1.pt").is_file() and not (warmup / "checkpoint_epoch=2.pt").exists()
    assert str(warmup / "checkpoint_epoch=1.pt") in (out / "vxm" / "adacs_no_smooth" / "seed0" / "cmd.sh").read_text()
    assert (results / "vxm" / "adacs_no_smooth" / "seed0.json").is_file()
