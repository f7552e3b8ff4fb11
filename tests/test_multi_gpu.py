"""configs/multi_gpu_train.yaml on CPU (gloo): 2 processes x batch 2 train exactly as 1 process x batch 4.

* ``test_ddp_losses_match_single_process``: ``tests/ddp_runner.py`` records every micro-step's loss terms (averaged
  over ranks) through the motion, scoring and joint phases, with gradient accumulation; the terms and the final
  weights of both networks must equal those of the single-process run.
* ``test_torchrun_bundle_command``: the documented command line itself
  (``torchrun ... -m monai.bundle run --config_file "['configs/train.yaml','configs/multi_gpu_train.yaml']"``)
  with tiny overrides: it succeeds, rank 0 alone logs and writes, its checkpoints load without DDP prefixes, and its
  final displacement weights equal the single-process run's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
RUNNER = REPO / "tests" / "ddp_runner.py"
TIMEOUT = 240  # seconds per launch (a broken collective would otherwise wait for gloo's 30 min timeout)
GLOBAL_BATCH = 4
NPROC = 2
TINY = {  # motion, scoring and joint phases, accumulation over 2 micro-steps, 32 x 32 phantom
    "epochs": 3,
    "motion_warmup_epochs": 1,
    "scoring_warmup_epochs": 1,
    "epoch_length": 4,
    "accumulation_steps": 2,
    "image_size": [32, 32],
    "num_train_pairs": 8,
    "num_val_pairs": 4,
    "log_every": 1,
}
RTOL, ATOL_LOSS, ATOL_WEIGHT = 1e-4, 1e-10, 1e-6


def torchrun_command() -> list[str]:
    """The torchrun launcher (``python -m torch.distributed.run`` is the same program), or skip."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is unavailable: cannot run DDP on CPU")
    exe = Path(sys.executable).parent / "torchrun"
    if exe.is_file():
        return [str(exe)]
    if shutil.which("torchrun"):
        return [shutil.which("torchrun")]
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is unavailable")
    return [sys.executable, "-m", "torch.distributed.run"]


# gloo's worker threads sometimes abort a rank at interpreter exit, after all its work is done and
# destroy_process_group has run (pytorch/pytorch#179291 describes the teardown race). Only that signature, with the
# trainer's "Engine run finished" already logged, is retried, up to twice (two aborts in a row were seen once in
# 12 runs of this file); the outputs are still checked by each test.
TEARDOWN_ABORT = "terminate called without an active exception"


def _teardown_abort_only(text: str) -> bool:
    return TEARDOWN_ABORT in text and "Engine run finished" in text.split(TEARDOWN_ABORT)[0]


def launch(cmd: list[str], cwd: Path, log: Path, attempts: int = 3) -> None:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun and its workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for attempt in range(1, attempts + 1):
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"{' '.join(cmd[:6])} ... timed out after {TIMEOUT} s; log: {log}\n{log.read_text()[-3000:]}")
        if code == 0 or attempt == attempts or not _teardown_abort_only(_all_logs(log)):
            break
        for name in ("logs", "models", "eval"):  # a clean slate: the tests count log lines and event files
            shutil.rmtree(log.parent / name, ignore_errors=True)
    assert code == 0, f"{' '.join(cmd)} failed with exit code {code}:\n{log.read_text()[-6000:]}"


def _all_logs(log: Path) -> str:
    """The launcher's log plus the per-rank logs torchrun writes under a ``logs`` folder beside it, if any."""
    texts = [log.read_text(errors="replace")]
    texts += [p.read_text(errors="replace") for p in sorted(log.parent.glob("logs/**/*.log"))]
    return "\n".join(texts)


def overrides(tmp: Path, batch_size: int) -> dict:
    return {**TINY, "batch_size": batch_size, "ckpt_dir": str(tmp / "models"), "output_dir": str(tmp / "eval")}


def run_runner(tmp: Path, distributed: bool, extra: dict | None = None) -> tuple[dict, dict]:
    """``ddp_runner.py`` in ``tmp``: one process with the global batch, or NPROC under torchrun with its share."""
    out = tmp / "out.json"
    batch = GLOBAL_BATCH // NPROC if distributed else GLOBAL_BATCH
    args = [str(RUNNER), "--out", str(out), "--override", json.dumps({**overrides(tmp, batch), **(extra or {})})]
    if distributed:
        cmd = [*torchrun_command(), "--standalone", "--nnodes=1", f"--nproc_per_node={NPROC}", *args, "--distributed"]
    else:
        cmd = [sys.executable, *args]
    launch(cmd, REPO, tmp / "log.txt")
    return json.loads(out.read_text()), torch.load(out.with_suffix(".pt"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The reference: one process, train.yaml only, batch 4."""
    return run_runner(tmp_path_factory.mktemp("single"), distributed=False)


def assert_same_weights(reference: dict, other: dict, what: str) -> None:
    assert reference.keys() == other.keys(), f"{what}: parameter names differ"
    for name, value in reference.items():
        torch.testing.assert_close(other[name], value, rtol=RTOL, atol=ATOL_WEIGHT, msg=f"{what}: {name} differs")


def test_ddp_losses_match_single_process(single: tuple[dict, dict], tmp_path: Path) -> None:
    ddp, ddp_weights = run_runner(tmp_path, distributed=True)
    reference, reference_weights = single

    assert reference["world_size"] == 1 and not reference["ddp"]
    assert ddp["world_size"] == NPROC and ddp["ddp"], "both networks must be DistributedDataParallel"
    steps = TINY["epochs"] * TINY["epoch_length"]
    assert len(reference["records"]) == len(ddp["records"]) == steps
    phases = [r["phase"] for r in reference["records"]]
    assert phases == [r["phase"] for r in ddp["records"]]
    assert set(phases) == {"motion", "scoring", "joint"}
    for ref, got in zip(reference["records"], ddp["records"]):
        measured = {k for k, v in ref.items() if isinstance(v, float) and not math.isnan(v)}
        if ref["phase"] != "scoring":
            assert "loss_displacement" in measured
        if ref["phase"] != "motion":
            assert {"loss_scoring", "mean_score"} <= measured
        for key, value in ref.items():
            if key in ("iteration", "epoch", "phase"):
                assert got[key] == value
                continue
            assert math.isnan(got[key]) == math.isnan(value), f"iteration {ref['iteration']}: {key} NaN mismatch"
            if not math.isnan(value):
                assert got[key] == pytest.approx(value, rel=RTOL, abs=ATOL_LOSS), (
                    f"iteration {ref['iteration']} ({ref['phase']}): {key} {got[key]} (DDP) vs {value} (single)"
                )
    for net in ("displacement", "scoring"):
        assert_same_weights(reference_weights["initial"][net], ddp_weights["initial"][net], f"initial {net}")
        assert_same_weights(reference_weights["final"][net], ddp_weights["final"][net], f"final {net}")
        moved = max(float((reference_weights["final"][net][k] - v).abs().max())
                    for k, v in reference_weights["initial"][net].items())
        assert moved > 100 * ATOL_WEIGHT, f"{net} network did not train, the comparison would be empty"


def test_torchrun_bundle_command(single: tuple[dict, dict], tmp_path: Path) -> None:
    launcher = torchrun_command()
    args = []
    for key, value in overrides(tmp_path, GLOBAL_BATCH // NPROC).items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    logs = tmp_path / "logs"
    cmd = [*launcher, "--standalone", "--nnodes=1", f"--nproc_per_node={NPROC}", "--log-dir", str(logs),
           "--redirects", "3", "-m", "monai.bundle", "run",
           "--config_file", "['configs/train.yaml','configs/multi_gpu_train.yaml']", *args]
    launch(cmd, BUNDLE, tmp_path / "log.txt")

    models = tmp_path / "models"
    for name in ("checkpoint_final.pt", "model.pt", "scoring_model.pt"):
        assert (models / name).is_file(), f"rank 0 did not save {name}: {sorted(p.name for p in models.iterdir())}"
    from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet

    DiffeomorphicVoxelMorph().load_state_dict(torch.load(models / "model.pt"))  # strict: no "module." prefix
    ScoringNet().load_state_dict(torch.load(models / "scoring_model.pt"))
    final = torch.load(models / "checkpoint_final.pt", weights_only=False)
    _, reference_weights = single
    assert_same_weights(reference_weights["final"]["displacement"], final["displacement_network"], "CLI displacement")
    assert_same_weights(reference_weights["final"]["scoring"], final["scoring_network"], "CLI scoring")

    # rank 0 alone logs the loss terms and writes TensorBoard events
    event_pids = {p.name.split(".")[-2] for p in (tmp_path / "eval").glob("events.out.tfevents.*")}
    assert len(event_pids) == 1, f"TensorBoard events written by several processes: {event_pids}"
    rank_logs = {r: "".join(p.read_text() for p in logs.rglob(f"attempt_*/{r}/std*.log")) for r in range(NPROC)}
    steps = TINY["epochs"] * TINY["epoch_length"]
    assert rank_logs[0].count("Iter:") == steps, "rank 0 should log every micro-step (log_every 1)"
    assert "Metrics --" in rank_logs[0]
    for rank in range(1, NPROC):
        assert rank_logs[rank], f"no log captured for rank {rank} (torchrun --log-dir layout changed?)"
        for marker in ("Iter:", "Metrics --", "Epoch[", "Saved checkpoint"):
            assert marker not in rank_logs[rank], f"rank {rank} logged {marker!r}"


def test_ddp_with_the_reference_gradient_leak_matches_single_process(single: tuple[dict, dict], tmp_path: Path) -> None:
    """The leak's extra backward through the DDP-wrapped displacement network averages over ranks like the rest."""
    leak = {"reference_gradient_leak": True}
    runs = {}
    for name, distributed in (("single", False), ("ddp", True)):
        (tmp_path / name).mkdir()
        runs[name] = run_runner(tmp_path / name, distributed, leak)[1]
    for net in ("displacement", "scoring"):
        assert_same_weights(runs["single"]["final"][net], runs["ddp"]["final"][net], f"final {net} with the leak")
    without_leak = single[1]["final"]["displacement"]
    changed = max(float((runs["single"]["final"]["displacement"][k] - v).abs().max()) for k, v in without_leak.items())
    assert changed > 100 * ATOL_WEIGHT, "the leak did not change the displacement network: the option had no effect"


# ---- which handlers run on a rank > 0 (no process group: the config alone, rank given) ----------------------------
# Every rank validates its share and stops together on a non-finite loss; everything else (console, progress bar,
# TensorBoard, checkpoints) is rank 0's. A handler added to train.yaml fails this test until multi_gpu_train.yaml
# switches it off by name on ranks > 0 (train#handler#<name>#_disabled_) or it is added here because every rank
# must run it.
EVERY_RANK_TRAIN_HANDLERS = ["ValidationHandler", "NonFiniteGuard"]
EVERY_RANK_VALIDATE_HANDLERS: list[str] = []


def handler_classes(tmp: Path, files: list[str], rank0: bool | None) -> tuple[list[str], list[str]]:
    """Class names of the handlers the trainer and the evaluator attach, as built from ``files``; with the
    multi-GPU override ``rank0`` says which rank (the networks are left unwrapped: DDP needs a process group)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in files])
    parser.update({"bundle_root": str(BUNDLE), "ckpt_dir": str(tmp / "models"), "output_dir": str(tmp / "eval"),
                   "image_size": [32, 32], "num_train_pairs": 2, "num_val_pairs": 2, "device": "$torch.device('cpu')"})
    if rank0 is not None:
        parser.update({"is_rank0": rank0, "network": "$@network_def.to(@device)",
                       "scoring_network": "$@scoring_network_def.to(@device)", "validate#dataloader#sampler": None})
    parser.parse()
    train = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    validate = [type(h).__name__ for h in parser.get_parsed_content("validate#handlers")]
    return train, validate


def test_rank_0_alone_runs_the_logging_and_saving_handlers(tmp_path: Path) -> None:
    single = handler_classes(tmp_path / "single", ["train.yaml"], None)
    rank0 = handler_classes(tmp_path / "rank0", ["train.yaml", "multi_gpu_train.yaml"], True)
    rank1 = handler_classes(tmp_path / "rank1", ["train.yaml", "multi_gpu_train.yaml"], False)
    assert rank0 == single, "the multi-GPU override must keep every handler of train.yaml on rank 0"
    assert rank1 == (EVERY_RANK_TRAIN_HANDLERS, EVERY_RANK_VALIDATE_HANDLERS), (
        f"handlers active on rank 1: train {rank1[0]}, validate {rank1[1]}; expected {EVERY_RANK_TRAIN_HANDLERS}, "
        f"{EVERY_RANK_VALIDATE_HANDLERS}: switch a new handler off by name in multi_gpu_train.yaml"
    )
    assert not list((tmp_path / "rank1").glob("eval/events.out.tfevents.*")), "rank 1 built a TensorBoard handler"


def test_every_named_handler_is_attached_once() -> None:
    """train.yaml names its handlers (train#handler, validate#handler) and lists them (train#handlers,
    validate#handlers): a handler named but not listed would silently not run, one listed twice would run twice."""
    import re

    import yaml

    config = yaml.safe_load((BUNDLE / "configs" / "train.yaml").read_text())
    for section in ("train", "validate"):
        listed = re.findall(rf"[%@]{section}#handler#(\w+)", str(config[section]["handlers"]))
        assert sorted(listed) == sorted(config[section]["handler"]), (section, listed)
        assert len(set(listed)) == len(listed), (section, listed)
