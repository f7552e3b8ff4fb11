"""scripts/run_experiment.py: the commands follow the schedule files (bundle/configs/schedule_*.yaml) and are the recipe
of the shipped weights, a tiny two-seed experiment runs end to end (train, branch, compare, pool) and resumes without
retraining, a failed seed is reported while the others finish."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import BUNDLE, REPO, load_repo_script, write_ring_pairs

experiment = load_repo_script("run_experiment")


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    """A prepared folder in the layout of scripts/prepare_*.py: 4 training, 2 validation, 3 test pairs of 32 x 32."""
    return write_ring_pairs(tmp_path / "prepared", ["training"] * 4 + ["validation"] * 2 + ["testing"] * 3)


def _args(prepared: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "acdc", "--dataset-dir", str(prepared), "--out", str(out), *extra]


def _options(command: list[str]) -> dict[str, str]:
    """``--key value`` pairs of a command line."""
    return {command[i][2:]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}


# The CPU recipe of the shipped weights (docs/reports/shipped_weights.md), as the commands pass it: the schedule file must
# keep giving these (a deliberate change of schedule changes this test too).
CPU_BASELINE = {"use_scoring": "false", "epochs": "30", "motion_warmup_epochs": "30", "scoring_warmup_epochs": "0",
                "learning_rate": "0.001", "scoring_learning_rate": "0.0001", "keep_checkpoints": "null", "seed": "3"}
CPU_ADACS = {"epochs": "31", "motion_warmup_epochs": "20", "scoring_warmup_epochs": "1", "learning_rate": "0.001",
             "scoring_learning_rate": "0.0001", "seed": "3"}


@pytest.mark.parametrize("dataset, alpha", [("acdc", "0.01"), ("camus", "0.04")])
def test_cpu_schedule_is_the_recipe_of_the_shipped_weights(prepared: Path, tmp_path: Path, dataset: str, alpha: str):
    parser_args = _args(prepared, tmp_path / "exp")
    parser_args[1] = dataset
    args = experiment.parse_args(parser_args)
    plan = experiment.make_plan(args)
    vxm_dir, adacs_dir = tmp_path / "vxm", tmp_path / "adacs"
    vxm = experiment.baseline_command(plan, vxm_dir, 3)
    adacs = experiment.adacs_command(plan, adacs_dir, 3, vxm_dir)
    assert vxm[vxm.index("--config_file") + 1] == f"['configs/train.yaml','configs/{dataset}.yaml']"
    generated = [_options(vxm), _options(adacs)]
    for expected, gen in zip((CPU_BASELINE, {**CPU_ADACS, "alpha": alpha}), generated):
        assert {key: gen.get(key) for key in expected} == expected
    assert "resume_checkpoint" not in generated[0] and "alpha" not in generated[0]
    assert generated[1]["resume_checkpoint"].endswith("vxm/models/checkpoint_epoch=20.pt")
    assert generated[0]["output_dir"] == str((vxm_dir / "eval").resolve())


def write_schedule(bundle: Path, name: str, text: str) -> Path:
    """A bundle folder with the repository's dataset configs and one schedule file."""
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    for dataset in ("acdc", "camus"):
        (bundle / "configs" / f"{dataset}.yaml").write_text((BUNDLE / "configs" / f"{dataset}.yaml").read_text())
    (bundle / "configs" / f"schedule_{name}.yaml").write_text(text)
    return bundle


def test_the_schedule_file_is_what_the_commands_train_with(prepared: Path, tmp_path: Path):
    bundle = write_schedule(tmp_path / "bundle", "cpu", "motion_warmup_epochs: 3\nscoring_warmup_epochs: 2\n"
                            "joint_epochs: 5\nlearning_rate: 0.002\nscoring_learning_rate: 0.0003\nalpha: {camus: 0.5}\n")
    for dataset, alpha in (("acdc", None), ("camus", "0.5")):
        argv = ["--dataset", dataset, "--dataset-dir", str(prepared), "--out", str(tmp_path / "exp"), "--bundle", str(bundle)]
        plan = experiment.make_plan(experiment.parse_args(argv))
        vxm = _options(experiment.baseline_command(plan, tmp_path / "v", 0))
        adacs = _options(experiment.adacs_command(plan, tmp_path / "a", 0, tmp_path / "v"))
        assert (vxm["epochs"], vxm["motion_warmup_epochs"], vxm["learning_rate"], vxm["scoring_learning_rate"]) == (
            "8", "8", "0.002", "0.0003")
        assert (adacs["epochs"], adacs["motion_warmup_epochs"], adacs["scoring_warmup_epochs"]) == ("10", "3", "2")
        assert adacs["resume_checkpoint"].endswith("checkpoint_epoch=3.pt") and adacs.get("alpha") == alpha
    # the command line still overrides the file
    argv += ["--joint", "1", "--lr", "0.01", "--alpha", "0.2"]
    adacs = _options(experiment.adacs_command(experiment.make_plan(experiment.parse_args(argv)), tmp_path / "a", 0,
                                              tmp_path / "v"))
    assert (adacs["epochs"], adacs["learning_rate"], adacs["alpha"]) == ("6", "0.01", "0.2")


@pytest.mark.parametrize("text, message", [
    ("motion_warmup_epochs: 20\nscoring_warmup_epochs: 1\njoint_epochs: 10\nlearning_rate: 1e-3\n"
     "scoring_learning_rate: 0.0001\n", r"learning_rate is '1e-3', not a positive number"),
    ("motion_warmup_epochs: 2.5\nscoring_warmup_epochs: 1\njoint_epochs: 10\nlearning_rate: 0.001\n"
     "scoring_learning_rate: 0.0001\nepoch_length: 5\n", r"unknown key 'epoch_length'; motion_warmup_epochs is 2\.5"),
    ("scoring_warmup_epochs: 1\njoint_epochs: 10\nlearning_rate: 0.001\nscoring_learning_rate: 0.0001\nalpha: 0.02\n",
     r"motion_warmup_epochs is None.*alpha is 0\.02, not a mapping"),
])
def test_a_broken_schedule_file_is_named(prepared: Path, tmp_path: Path, text: str, message: str):
    bundle = write_schedule(tmp_path / "bundle", "cpu", text)
    argv = _args(prepared, tmp_path / "exp", "--bundle", str(bundle))
    with pytest.raises(SystemExit, match=rf"schedule_cpu\.yaml: .*{message}"):
        experiment.make_plan(experiment.parse_args(argv))


@pytest.mark.parametrize("dataset", ["acdc", "camus"])
def test_the_dataset_configs_hold_the_paper_schedule(dataset: str):
    """configs/<dataset>.yaml trains the paper's schedule by itself: its values are schedule_paper.yaml's."""
    paper = experiment.load_schedule(BUNDLE / "configs" / "schedule_paper.yaml")
    config = yaml.safe_load((BUNDLE / "configs" / f"{dataset}.yaml").read_text())
    assert config["epochs"] == sum(paper[key] for key in experiment.SCHEDULE_EPOCHS)
    for key in ("motion_warmup_epochs", "scoring_warmup_epochs", "learning_rate", "scoring_learning_rate"):
        assert config[key] == paper[key], key
    assert paper["alpha"] == {}  # the paper's alpha is the dataset config's


def test_dry_run_prints_the_commands_and_runs_nothing(prepared: Path, tmp_path: Path, capsys):
    out = tmp_path / "exp"
    assert experiment.main(_args(prepared, out, "--seeds", "0", "2", "--threads", "1", "--dry-run")) == 0
    printed = capsys.readouterr().out
    plan = experiment.make_plan(experiment.parse_args(_args(prepared, out, "--threads", "1")))
    for seed in (0, 2):
        vxm = out / f"seed{seed}" / "vxm"
        for command in (experiment.baseline_command(plan, vxm, seed),
                        experiment.adacs_command(plan, out / f"seed{seed}" / "adacs", seed, vxm)):
            assert experiment.shell_script(plan, command) in printed  # what cmd.sh would hold
    assert printed.count("OMP_NUM_THREADS=1 ") == 4 and not out.exists()


def test_paper_schedule_gives_equal_displacement_epochs(prepared: Path, tmp_path: Path):
    plan = experiment.make_plan(experiment.parse_args(_args(prepared, tmp_path / "exp", "--schedule", "paper")))
    vxm = _options(experiment.baseline_command(plan, tmp_path / "v", 0))
    adacs = _options(experiment.adacs_command(plan, tmp_path / "a", 0, tmp_path / "v"))
    assert vxm["epochs"] == vxm["motion_warmup_epochs"] == "320"  # 20 warm-up + 300 joint displacement epochs
    assert (adacs["epochs"], adacs["motion_warmup_epochs"], adacs["scoring_warmup_epochs"]) == ("340", "20", "20")
    assert float(vxm["learning_rate"]) == float(adacs["learning_rate"]) == 1e-4
    assert "alpha" not in adacs  # the dataset config's (paper) value
    assert "score_headroom" not in adacs  # the paper's sigmoid unless asked


def test_score_headroom_reaches_the_adacs_training_and_its_score_table(prepared: Path, tmp_path: Path, monkeypatch):
    args = experiment.parse_args(_args(prepared, tmp_path / "exp", "--score-headroom", "0.05"))
    plan = experiment.make_plan(args)
    assert "score_headroom" not in _options(experiment.baseline_command(plan, tmp_path / "v", 0))
    assert _options(experiment.adacs_command(plan, tmp_path / "a", 0, tmp_path / "v"))["score_headroom"] == "0.05"
    commands = []
    monkeypatch.setattr(experiment, "run_logged", lambda command, *rest: commands.append(command))
    experiment.compare_seed(args, tmp_path / "exp", 0, ("1 min", "2 min"), None)
    assert _options(commands[0])["score-headroom"] == "0.05"


def test_unprepared_folder_is_named(tmp_path: Path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(SystemExit, match=r"raw has no datalist\.json: prepare it with scripts/prepare_acdc\.py"):
        experiment.main(_args(tmp_path / "raw", tmp_path / "exp"))


def test_a_failed_seed_is_reported_and_the_others_finish(prepared: Path, tmp_path: Path, monkeypatch, capsys):
    def fake_train_seed(plan, out, seed):
        if seed == 1:
            raise experiment.RunFailed(f"exit code 1: see {out}/seed1/vxm/train.log")
        return "1 min CPU", "2 min CPU"

    compared = []

    def fake_compare(args, out, seed, times, cache):
        compared.append(seed)
        table = out / f"seed{seed}" / "table"
        table.mkdir(parents=True)
        (table / "results.md").write_text("table\n")
        return table

    monkeypatch.setattr(experiment, "train_seed", fake_train_seed)
    monkeypatch.setattr(experiment, "compare_seed", fake_compare)
    code = experiment.main(_args(prepared, tmp_path / "exp", "--seeds", "0", "1", "2"))
    assert code == 1 and compared == [0, 2]
    assert "seed 1 failed: exit code 1: see" in capsys.readouterr().err


def test_tiny_two_seed_experiment_end_to_end_and_resume(prepared: Path, tmp_path: Path):
    pytest.importorskip("scipy")
    out = tmp_path / "exp"
    argv = _args(prepared, out, "--seeds", "0", "1", "--jobs", "2", "--motion-warmup", "1", "--scoring-warmup", "1",
                 "--joint", "1", "--image-size", "32", "--no-figures", "--no-elastix",
                 "--bundle-arg", "epoch_length=2", "--bundle-arg", "batch_size=2", "--bundle-arg", "image_size=[32,32]")
    assert experiment.main(argv) == 0, [p.read_text()[-3000:] for p in out.glob("seed*/*/train.log")]
    for seed in (0, 1):
        vxm, adacs, table = (out / f"seed{seed}" / name for name in ("vxm", "adacs", "table"))
        assert (vxm / "models" / "checkpoint_epoch=1.pt").is_file()  # the branch point
        assert "seconds_to_branch_checkpoint" in json.loads((vxm / "timing.json").read_text())
        assert (adacs / "models" / "model.pt").is_file() and (adacs / "models" / "scoring_model.pt").is_file()
        assert "checkpoint_epoch=1.pt" in (adacs / "cmd.sh").read_text()
        results = (table / "results.md").read_text()
        for method in ("Undeformed", "VoxelMorph-MSE", "AdaCS"):
            assert f"| {method} |" in results
        assert "(2 epochs)" in results and "(2 motion + 2 scoring epochs)" in results
    assert "seed" in (out / "pooled.md").read_text()
    # resume: nothing is retrained, the tables are rebuilt from the same models
    logs = {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/train.log")}
    assert len(logs) == 4
    assert experiment.main(argv) == 0
    assert logs == {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/train.log")}


def test_resume_from_replaces_the_branch_point_or_adds_one(tmp_path: Path):
    last = tmp_path / "models" / "checkpoint_epoch=7.pt"
    branched = ["python", "--resume_checkpoint", "/vxm/checkpoint_epoch=20.pt", "--epochs", "50"]
    assert experiment.resume_from(branched, last) == ["python", "--resume_checkpoint", str(last.resolve()), "--epochs", "50"]
    assert experiment.resume_from(["python", "--epochs", "5"], last)[-2:] == ["--resume_checkpoint", str(last.resolve())]


def test_latest_epoch_checkpoint_is_the_highest_epoch(tmp_path: Path):
    assert experiment.latest_epoch_checkpoint(tmp_path) is None
    for name in ("checkpoint_epoch=9.pt", "checkpoint_epoch=10.pt", "checkpoint_final.pt", "checkpoint_epoch=x.pt"):
        (tmp_path / name).touch()
    assert experiment.latest_epoch_checkpoint(tmp_path) == (10, tmp_path / "checkpoint_epoch=10.pt")


def test_an_interrupted_training_continues_from_its_last_epoch(prepared: Path, tmp_path: Path):
    out = tmp_path / "exp"
    argv = _args(prepared, out, "--motion-warmup", "1", "--scoring-warmup", "1", "--joint", "1", "--image-size", "32",
                 "--no-figures", "--no-elastix", "--bundle-arg", "epoch_length=2", "--bundle-arg", "batch_size=2",
                 "--bundle-arg", "image_size=[32,32]")
    plan = experiment.make_plan(experiment.parse_args(argv))
    vxm = out / "seed0" / "vxm"
    # the baseline killed after its first epoch: one epoch checkpoint, no timing.json
    plan.joint = 0
    experiment.train(plan, vxm, experiment.baseline_command(plan, vxm, 0))
    (vxm / "timing.json").unlink()
    (vxm / "models" / "checkpoint_final.pt").unlink()
    first_log = (vxm / "train.log").read_text()
    assert "Epoch[1] Complete" in first_log and "Epoch[2] Complete" not in first_log

    assert experiment.main(argv) == 0, (vxm / "train.log").read_text()[-3000:]
    log = (vxm / "train.log").read_text()
    assert log.startswith(first_log)  # the log goes on
    resumed = log[len(first_log):]
    assert "checkpoint_epoch=1.pt" in resumed and "Epoch[2] Complete" in resumed and "Epoch[1] Complete" not in resumed
    attempts = json.loads((vxm / "progress.json").read_text())["attempts"]
    assert [a["resumed_from_epoch"] for a in attempts] == [None, 1]
    timing = json.loads((vxm / "timing.json").read_text())
    assert timing["attempts"] == 2 and timing["seconds"] > attempts[1]["seconds_before"] > 0
    assert 0 < timing["seconds_to_branch_checkpoint"] <= attempts[1]["seconds_before"]
    # AdaCS branched from the baseline's warm-up as usual (the continued run's model.pt selection: test_configs.py)
    assert "vxm/models/checkpoint_epoch=1.pt" in (out / "seed0" / "adacs" / "cmd.sh").read_text()
    assert (out / "seed0" / "table" / "results.md").is_file()


def test_script_runs_as_a_file():
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "run_experiment.py"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--schedule" in result.stdout
