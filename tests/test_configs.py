"""The bundle's configs: parsing, workflow properties, metadata, network contract, and the real CLI.

The CLI tests run ``python -m monai.bundle run`` from the bundle root as a user would (tiny settings), train,
resume, and evaluate; every output goes to a temporary folder.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out

from conftest import BUNDLE, REPO, SCHEMA
from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet

CONFIGS = BUNDLE / "configs"
META = CONFIGS / "metadata.json"
TRAIN = str(CONFIGS / "train.yaml")
EVALUATE = str(CONFIGS / "evaluate.yaml")
INFERENCE = str(CONFIGS / "inference.yaml")
MULTI_GPU = str(CONFIGS / "multi_gpu_train.yaml")
INFERENCE_ECHO = str(CONFIGS / "inference_echo.yaml")
STRAIN = str(CONFIGS / "strain.yaml")
STRAIN_ECHO = str(CONFIGS / "strain_echo.yaml")
# small enough to build in seconds (32 x 32 phantom, a handful of pairs)
TINY = {"image_size": [32, 32], "num_train_pairs": 4, "num_val_pairs": 2, "epoch_length": 2, "batch_size": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def cli_env() -> dict[str, str]:
    """The environment of a user's shell, one OpenMP thread (the machine is shared; tiny convolutions)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the bundle must work from its root without it
    return env


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=BUNDLE, env=cli_env(), capture_output=True, text=True, timeout=timeout,
    )


# ---- parsing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "files",
    [[TRAIN], [TRAIN, EVALUATE], [TRAIN, MULTI_GPU], [INFERENCE], [INFERENCE, INFERENCE_ECHO], [STRAIN],
     [STRAIN, STRAIN_ECHO]],
    ids=["train", "evaluate", "multi_gpu", "inference", "inference_echo", "strain", "strain_echo"],
)
def test_every_config_parses(files):
    parser = ConfigParser()
    parser.read_config(files if len(files) > 1 else files[0])
    parser.read_meta(str(META))
    parser.parse()
    for key in ("bundle_root", "device", "network_def", "run", "initialize"):
        assert key in parser, key
    assert parser["network_def"]["_target_"] == "scripts.networks.DiffeomorphicVoxelMorph"


def test_echo_inference_override_names_the_shipped_echo_weights():
    """One switch per shipped model: the echo override points both weight files at the CAMUS-trained ones."""
    parser = ConfigParser()
    parser.read_config([INFERENCE, INFERENCE_ECHO])
    parser["bundle_root"] = str(BUNDLE)
    for key, name in (("ckpt_path", "model_echo.pt"), ("scoring_ckpt_path", "scoring_model_echo.pt")):
        path = Path(parser.get_parsed_content(key))
        assert path.name == name and path.is_file(), path


def test_the_weights_file_used_is_logged(tmp_path, caplog):
    import logging

    from scripts.io_safety import load_weights

    net = DiffeomorphicVoxelMorph()
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="scripts.io_safety"):
        load_weights(DiffeomorphicVoxelMorph(), path, "displacement network")
    assert f"displacement network weights: {path.resolve()}" in caplog.text


def test_multi_gpu_override_wraps_both_networks_in_ddp():
    parser = ConfigParser()
    parser.read_config([TRAIN, MULTI_GPU])
    parser.parse()
    assert parser["network"]["_target_"].endswith("DistributedDataParallel")
    assert parser["scoring_network"]["_target_"].endswith("DistributedDataParallel")
    assert any("init_process_group" in str(expr) for expr in parser["initialize"])


def test_logging_conf_is_accepted():
    """MONAI 1.6.1 only accepts logging/logging.handlers classes and literal args in logging.conf."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {n: l.disabled for n, l in logging.Logger.manager.loggerDict.items()
                                               if isinstance(l, logging.Logger)})
    try:
        ConfigWorkflow(workflow_type="train", config_file=TRAIN, logging_file=str(CONFIGS / "logging.conf"))
        assert any(isinstance(h, logging.StreamHandler) for h in root.handlers)
    finally:  # fileConfig reconfigures the root logger and disables existing loggers: undo it for later tests
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name, disabled in saved[2].items():
            logging.getLogger(name).disabled = disabled


# ---- workflow properties ------------------------------------------------------------------------------------
@pytest.mark.parametrize("files", [TRAIN, [TRAIN, EVALUATE]], ids=["train", "train+evaluate"])
def test_train_workflow_properties(tmp_path, files):
    workflow = ConfigWorkflow(
        workflow_type="train", config_file=files, meta_file=str(META), logging_file=False,
        ckpt_dir=str(tmp_path), output_dir=str(tmp_path), num_test_pairs=2, **TINY,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.bundle_root == "."
    assert workflow.max_epochs == workflow.parser.get_parsed_content("epochs")


@pytest.mark.parametrize("overrides, expected", [({}, (1e-3, 1e-3)), ({"scoring_learning_rate": 1e-4}, (1e-3, 1e-4))])
def test_each_network_has_its_own_learning_rate(overrides, expected):
    """scoring_learning_rate follows learning_rate unless set (1e-3 saturates the scoring sigmoid on real data)."""
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(overrides)
    parser.parse()
    lrs = tuple(parser.get_parsed_content(name).param_groups[0]["lr"] for name in ("optimizer", "scoring_optimizer"))
    assert lrs == expected


def initial_weights_and_pair_order(seed: int) -> tuple[torch.Tensor, list[int]]:
    """The displacement network's first weights and the first epoch's pair indices, built as the workflow does."""
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({**TINY, "num_train_pairs": 16, "epoch_length": 8, "seed": seed})
    parser.parse()
    step = next(i for i, item in enumerate(parser["initialize"]) if "set_determinism" in str(item))
    parser.get_parsed_content(f"initialize#{step}")  # set_determinism, the workflow's first real step
    weights = next(parser.get_parsed_content("network").parameters()).detach().clone()
    return weights, list(parser.get_parsed_content("train#sampler"))


def test_seed_sets_the_initial_weights_and_the_pair_order():
    """Same seed: the same run; another seed: other weights and another pair order (for seed spreads)."""
    weights_0, pairs_0 = initial_weights_and_pair_order(0)
    weights_0_again, pairs_0_again = initial_weights_and_pair_order(0)
    weights_1, pairs_1 = initial_weights_and_pair_order(1)
    assert torch.equal(weights_0, weights_0_again) and pairs_0 == pairs_0_again
    assert not torch.equal(weights_0, weights_1)
    assert pairs_0 != pairs_1


@pytest.fixture(scope="module")
def phantom_nifti(tmp_path_factory) -> Path:
    """Phantom pairs written as NIfTI files by the repository's tool (its main, in this process)."""
    out = tmp_path_factory.mktemp("phantom_nifti")
    if str(REPO / "scripts") not in sys.path:  # as running the tool does: it imports its helper _bundle.py from there
        sys.path.append(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("make_phantom_nifti", REPO / "scripts" / "make_phantom_nifti.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--out", str(out), "--num-pairs", "2", "--size", "64"]) == 0
    assert len(list(out.glob("*_ED.nii.gz"))) == 2 and len(list(out.glob("*_ES_gt.nii.gz"))) == 2
    return out


def test_inference_workflow_properties(tmp_path, phantom_nifti):
    workflow = ConfigWorkflow(
        workflow_type="infer", config_file=INFERENCE, meta_file=str(META), logging_file=False,
        dataset_dir=str(phantom_nifti), output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


# ---- metadata and the network contract ----------------------------------------------------------------------
def test_metadata_verifies_against_the_offline_schema():
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))


@pytest.mark.parametrize("key", ["required_packages_version", "network_data_format", "version"])
def test_metadata_missing_a_required_key_fails(tmp_path, key):
    metadata = json.loads(META.read_text())
    del metadata[key]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=key):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))


def test_metadata_schema_key_and_versions_are_consistent():
    metadata = json.loads(META.read_text())
    assert metadata["version"] in metadata["changelog"]
    inputs = metadata["network_data_format"]["inputs"]["image"]
    outputs = metadata["network_data_format"]["outputs"]["pred"]
    assert inputs["num_channels"] == 2 and outputs["num_channels"] == 2


def test_verify_net_in_out():
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=INFERENCE, bundle_root=str(BUNDLE))


def test_network_def_loads_a_flat_state_dict(tmp_path):
    torch.manual_seed(0)
    trained = DiffeomorphicVoxelMorph()
    torch.nn.init.normal_(trained.unet.net[1].final_conv_out.conv.weight, std=0.01)  # a non-trivial field
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)

    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.parse()
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(path, weights_only=True))
    image = torch.rand(2, 2, 64, 48)
    with torch.no_grad():
        ddf = network.eval()(image)
        assert ddf.shape == (2, 2, 64, 48)
        assert torch.equal(ddf, trained.eval()(image))
        assert ddf.abs().max() > 1e-3


# ---- the real CLI: train, resume, evaluate --------------------------------------------------------------------
CLI_TRAIN = (
    "--epochs", "2", "--epoch_length", "4", "--num_train_pairs", "8", "--num_val_pairs", "4",
    "--motion_warmup_epochs", "1", "--scoring_warmup_epochs", "0", "--image_size", "[64,64]", "--log_every", "1",
)


@pytest.fixture(scope="module")
def cli_training(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt, out = root / "models", root / "eval"
    result = run_cli(
        "training", "--config_file", "configs/train.yaml", *CLI_TRAIN, "--ckpt_dir", str(ckpt), "--output_dir", str(out),
        "--keep_checkpoints", "null",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, result


def test_cli_training_writes_the_bundle_outputs(cli_training):
    root, result = cli_training
    ckpt, out = root / "models", root / "eval"
    # models/model.pt: a flat state dict of the displacement network, loadable into inference's network_def
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.parse()
    parser.get_parsed_content("network_def").load_state_dict(state)
    ScoringNet().load_state_dict(torch.load(ckpt / "scoring_model.pt", weights_only=True))
    # the resumable checkpoint: both networks, both optimizers, the trainer (epoch, momentum), the best-model
    # selection behind model.pt; no pickled objects
    checkpoint = torch.load(ckpt / "checkpoint_final.pt", weights_only=True)
    assert set(checkpoint) == {
        "displacement_network", "scoring_network", "displacement_optimizer", "scoring_optimizer", "trainer", "best_model"
    }
    assert checkpoint["trainer"]["iteration"] == 8 and checkpoint["trainer"]["epoch_length"] == 4
    assert "momentum" in checkpoint["trainer"]["smoothness_weight_state"]
    # --keep_checkpoints null keeps every epoch's checkpoint (the default keeps the last one)
    assert sorted(p.name for p in ckpt.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    # TensorBoard: the per-iteration loss terms and the validation metrics
    events = list(out.glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for tag in ("loss", "loss_data", "loss_ucs", "smoothness_weight", "val_mean_dice", "val_epe", "val_folding_pct"):
        assert tag in tags, (tag, sorted(tags))
    assert "Epoch[2] Complete" in result.stdout + result.stderr


def test_cli_resume_continues_from_the_checkpoint(cli_training):
    root, _ = cli_training
    resumed_ckpt = root / "resumed_models"
    result = run_cli(
        "--config_file", "configs/train.yaml", *CLI_TRAIN[2:], "--epochs", "3",
        "--resume_checkpoint", str(root / "models" / "checkpoint_final.pt"),
        "--ckpt_dir", str(resumed_ckpt), "--output_dir", str(root / "resumed_eval"),
        "--learning_rate", "0.0005", "--scoring_learning_rate", "0.0002",
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Restored all variables from" in log
    assert "Epoch[3] Complete" in log
    assert "Epoch[1] Complete" not in log and "Epoch[2] Complete" not in log  # only the one missing epoch ran
    original = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)
    checkpoint = torch.load(resumed_ckpt / "checkpoint_final.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 12
    assert checkpoint["trainer"]["smoothness_weight_state"]["epoch_index"] == 2
    # the rates given on the resumed command line are the ones trained with, not the checkpoint's (1e-3)
    assert [g["lr"] for g in original["displacement_optimizer"]["param_groups"]] == [0.001]
    assert [g["lr"] for g in checkpoint["displacement_optimizer"]["param_groups"]] == [0.0005]
    assert [g["lr"] for g in checkpoint["scoring_optimizer"]["param_groups"]] == [0.0002]
    # a checkpoint from another folder branches off: model.pt is chosen among the new run's own epochs
    assert (resumed_ckpt / "model.pt").is_file() and (resumed_ckpt / "scoring_model.pt").is_file()
    assert checkpoint["best_model"]["best_metric_epoch"] == 3


def epoch_metric(log: str, epoch: int, name: str = "val_mean_dice") -> float:
    line = next(line for line in log.splitlines() if f"Epoch[{epoch}] Metrics" in line)
    return float(line.split(f"{name}: ")[1].split()[0])


def test_cli_resume_in_its_own_folder_keeps_the_best_model(cli_training):
    """Continuing a run in its ckpt_dir keeps model.pt the best of all its epochs, not the first resumed one."""
    root, _ = cli_training
    ckpt = root / "continued"
    shutil.copytree(root / "models", ckpt)
    before = torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=True)["best_model"]
    best_model = torch.load(ckpt / "model.pt", weights_only=True)
    assert before["best_metric_epoch"] in (1, 2) and 0 < before["best_metric"] <= 1
    # a learning rate that wrecks the network makes the resumed epoch worse than the best so far (0.1: still
    # finite; 1 and more overflow to Inf, which stops the run, tests/test_faults_training.py)
    result = run_cli(
        "--config_file", "configs/train.yaml", *CLI_TRAIN[2:], "--epochs", "3", "--learning_rate", "0.1",
        "--resume_checkpoint", str(ckpt / "checkpoint_epoch=2.pt"), "--ckpt_dir", str(ckpt),
        "--output_dir", str(root / "continued_eval"),
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert epoch_metric(log, 3) < before["best_metric"] - 1e-3, "the test needs a worse resumed epoch"
    kept = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.equal(kept[key], best_model[key]) for key in best_model)
    after = torch.load(ckpt / "checkpoint_final.pt", weights_only=True)["best_model"]
    assert (after["best_metric"], after["best_metric_epoch"]) == (before["best_metric"], before["best_metric_epoch"])
    assert f"best value: {before['best_metric']}" in log  # the evaluator's best is restored too


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return [row for row in csv.reader(handle) if row]


def test_cli_evaluate_writes_metric_csvs(cli_training):
    root, _ = cli_training
    out = root / "evaluation"
    result = run_cli(
        "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", "--image_size", "[64,64]",
        "--num_test_pairs", "4", "--ckpt_path", str(root / "models" / "model.pt"), "--output_dir", str(out),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    metrics = {row[0]: float(row[1]) for row in read_csv(out / "metrics.csv")}
    for name in ("val_mean_dice", "val_dice_myo", "val_hd95", "val_asd", "val_folding_pct", "val_epe"):
        assert name in metrics, (name, metrics)
    assert 0 < metrics["val_mean_dice"] <= 1 and metrics["val_epe"] > 0 and 0 <= metrics["val_folding_pct"] <= 100
    for name in ("val_mean_dice", "val_epe", "val_folding_pct"):
        raw = read_csv(out / f"{name}_raw.csv")
        assert len(raw) == 1 + 4, name  # header + one row per test pair
        assert any("phantom" in cell for cell in raw[1])  # rows are named after the pair
        assert raw[0][0] == "filename" and raw[0][-1] == "mean"
        summary = {row[0]: row[1:] for row in read_csv(out / f"{name}_summary.csv")}
        assert "mean" in summary and summary["mean"][-1] == "4.0000", (name, summary)  # notnans: all 4 cases
    # the summary's mean is the mean over the per-case values
    raw = read_csv(out / "val_epe_raw.csv")
    per_case = [float(row[-1]) for row in raw[1:]]
    assert metrics["val_epe"] == pytest.approx(sum(per_case) / len(per_case), rel=1e-4)


def test_the_documented_zoo_checks_run_from_the_bundle_root():
    """The model card's offline model-zoo checks, run verbatim as a user would (issue 31 item 7)."""
    card = (BUNDLE / "docs" / "README.md").read_text()
    commands = [line for line in card.splitlines() if line.startswith("python -m monai.bundle verify_")]
    assert len(commands) == 2, commands
    for command in commands:
        result = subprocess.run([sys.executable, *command.split()[1:]], cwd=BUNDLE, env=cli_env(), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "verified with no error" in result.stdout + result.stderr
