"""Training under faults and bad input (issue 27): nothing lost, nothing silent.

End to end, the real CLI (``python -m monai.bundle run`` from the bundle root, tiny settings): a SIGKILL in the
middle of a checkpoint save, a full disk, a NaN loss, bad images and labels, a bad checkpoint to resume from, NaN
weights to evaluate, labelled and unlabelled pairs mixed, the shipped weights' folder. Each case checks the exit
status, that the message names the file and the problem without a traceback, that the inputs are byte-identical
afterwards and that no temporary file is left behind. The units behind them (atomic writes, the checks) are
tested in-process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from conftest import BUNDLE, ring_label
from scripts import checkpoints
from scripts.checkpoints import (
    PAUSE_ENV,
    AtomicDiskSaver,
    TrainingStopped,
    checkpoint_problem,
    require_not_shipped_folder,
    require_resumable,
    require_weights,
    write_atomically,
)
from scripts.data import DatasetError, content_problems, find_pairs, load_datalist_json, pair_datalist
from scripts.networks import DiffeomorphicVoxelMorph
from test_configs import CLI_TRAIN, cli_env, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ("--config_file", "configs/train.yaml")
THREE_EPOCHS = (*CLI_TRAIN[2:], "--epochs", "3")  # motion, joint, joint; 4 micro-steps each, 64 x 64 phantom
# the same tiny schedule for the 32 x 32 NIfTI folders below
NIFTI_TRAIN = tuple("[32,32]" if previous == "--image_size" else value
                    for previous, value in zip(("",) + CLI_TRAIN[:-1], CLI_TRAIN))


# ---- helpers ---------------------------------------------------------------------------------------------------
def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256: the inputs must be byte-identical after a run."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.name.endswith(".tmp")]


def tensors(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) checkpoint, by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def assert_clean_failure(result: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit status 1, one ``error:`` line (from SystemExit) carrying every expected text, no traceback."""
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("error: "):]
    for text in expected:
        assert text in message, (text, message[-3000:])


def save_nifti(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def write_case(folder: Path, case: str, shift: int = 0, labels: bool = True) -> None:
    """A 32 x 32 pair: a ring (myocardium 2) around a disc (cavity 3) contracting from ED to ES, a little noise."""
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    ed, es = ring_label(32, (16, 16), 6), ring_label(32, (16 + shift % 3, 15), 5)
    for phase, label in (("ED", ed), ("ES", es)):
        image = (label / 3.0 + 0.1 + 0.05 * rng.random((32, 32))).astype(np.float32)
        save_nifti(image, folder / f"{case}_{phase}.nii.gz")
        if labels:
            save_nifti(label, folder / f"{case}_{phase}_gt.nii.gz")


def folder_of_cases(folder: Path, labelled: set[int] | None = None, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        write_case(folder, f"c{i}", i, labels=labelled is None or i in labelled)
    return folder


def cli(*args: str, cwd: Path = BUNDLE, timeout: int = 300) -> subprocess.CompletedProcess:
    if cwd == BUNDLE:
        return run_cli(*args, timeout=timeout)
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


# ---- 1. a kill during a checkpoint save ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the same 3-epoch run, never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    result = cli(*TRAIN, *THREE_EPOCHS, "--ckpt_dir", str(root / "models"), "--output_dir", str(root / "eval"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return root / "models"


def test_a_kill_during_a_checkpoint_save_loses_nothing_and_resumes_exactly(tmp_path, uninterrupted):
    """SIGKILL while checkpoint_epoch=2.pt is being saved (keep_checkpoints 1, the default: epoch 1's checkpoint is
    due to go). Before: only a 0-byte checkpoint_epoch=2.pt was left and the resume died with EOFError."""
    ckpt = tmp_path / "models"
    env = dict(cli_env(), **{PAUSE_ENV: "checkpoint_epoch=2.pt:600"})
    process = subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", *TRAIN, *THREE_EPOCHS, "--ckpt_dir", str(ckpt),
         "--output_dir", str(tmp_path / "eval")],
        cwd=BUNDLE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        paused = any(PAUSE_ENV in line for line in process.stderr)  # reads until the pause (or the end)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        process.stderr.close()
    assert paused, "the save never reached the pause"
    assert process.returncode == -signal.SIGKILL

    # the dangerous moment: the new checkpoint written (temporary file, fsynced), not yet renamed, the old not removed
    names = sorted(p.name for p in ckpt.iterdir())
    assert "checkpoint_epoch=1.pt" in names and "checkpoint_epoch=2.pt" not in names, names
    assert checkpoint_problem(ckpt / "checkpoint_epoch=1.pt", checkpoints.TRAINING_STATE_KEYS) is None
    assert checkpoint_problem(ckpt / "model.pt", flat=True) is None
    assert [p.name for p in temporaries(ckpt)] == [f".checkpoint_epoch=2.pt.{process.pid}.tmp"]

    # resume from the checkpoint that survived: the same weights as the uninterrupted run, bit for bit
    resumed = cli(*TRAIN, *THREE_EPOCHS, "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "eval"),
                  "--resume_checkpoint", str(ckpt / "checkpoint_epoch=1.pt"))
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    for name in ("checkpoint_final.pt", "checkpoint_epoch=3.pt", "model.pt", "scoring_model.pt"):
        expected = tensors(torch.load(uninterrupted / name, weights_only=True))
        got = tensors(torch.load(ckpt / name, weights_only=True))
        assert got.keys() == expected.keys(), name
        assert all(torch.equal(got[key], expected[key]) for key in expected), name
    assert temporaries(ckpt) == []  # the killed save's temporary file was cleaned up by the next save


def test_resume_from_a_bad_checkpoint_names_it_and_the_one_to_use(tmp_path, uninterrupted):
    ckpt = tmp_path / "models"
    shutil.copytree(uninterrupted, ckpt)
    (ckpt / "checkpoint_epoch=4.pt").write_bytes(b"")  # what a kill or a full disk left before the fix
    before = digest(ckpt)
    result = cli(*TRAIN, *THREE_EPOCHS, "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "eval"),
                 "--resume_checkpoint", str(ckpt / "checkpoint_epoch=4.pt"))
    assert_clean_failure(
        result, f"resume_checkpoint {ckpt / 'checkpoint_epoch=4.pt'} is empty (0 bytes)",
        "trained to epoch 3: resume from it with --resume_checkpoint",
    )
    assert digest(ckpt) == before and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "corrupt", "nan", "not_a_checkpoint"])
def test_each_bad_checkpoint_is_named_with_its_problem(tmp_path, damage):
    good = {"displacement_network": DiffeomorphicVoxelMorph().state_dict(), "trainer": {"epoch": 1}}
    torch.save(good, tmp_path / "checkpoint_epoch=1.pt")
    bad = tmp_path / "checkpoint_epoch=2.pt"
    data = (tmp_path / "checkpoint_epoch=1.pt").read_bytes()
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        bad.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "nan":
        state = {"displacement_network": {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                                          for k, v in good["displacement_network"].items()}, "trainer": {"epoch": 2}}
        torch.save(state, bad)
    else:
        torch.save([1, 2, 3], bad)
    expected = {"empty": "is empty (0 bytes)", "truncated": "is truncated or corrupt", "corrupt": "is truncated or corrupt",
                "nan": "holds NaN or Inf values (displacement_network.", "not_a_checkpoint": "is not a checkpoint"}[damage]
    with pytest.raises(TrainingStopped) as info:
        require_resumable(bad, required=["displacement_network", "trainer"])
    message = str(info.value)
    assert message.startswith(f"error: resume_checkpoint {bad} {expected}"), message
    assert f"{tmp_path / 'checkpoint_epoch=1.pt'} loads, trained to epoch 1" in message
    require_resumable(tmp_path / "checkpoint_epoch=1.pt", required=["displacement_network", "trainer"])  # no error


# ---- writing: atomic, the old file removed last, full disk, non-finite states ------------------------------------
def engine_saving(saver: AtomicDiskSaver, network: torch.nn.Module, epochs: int) -> Engine:
    engine = Engine(lambda engine, batch: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint({"network": network, "other": torch.nn.Linear(1, 1)},
                                                               saver, score_name="epoch",
                                                               score_function=lambda e: e.state.epoch, n_saved=1))
    engine.run([0], max_epochs=epochs)
    return engine


def test_the_old_checkpoint_goes_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(source, target):  # the folder at the moment the new file takes its name
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real_replace(source, target)

    monkeypatch.setattr(checkpoints.os, "replace", replace)
    engine_saving(AtomicDiskSaver(tmp_path), torch.nn.Linear(2, 2), epochs=2)
    pid = os.getpid()
    assert seen == [[f".checkpoint_epoch=1.pt.{pid}.tmp"],
                    [f".checkpoint_epoch=2.pt.{pid}.tmp", "checkpoint_epoch=1.pt"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    """ENOSPC while epoch 2's checkpoint is written (keep 1): epoch 1's stays, whole, and the message says why."""
    real_write = os.write
    epoch = {"now": 0}

    def write(fd, data):
        if epoch["now"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data[:1000])  # short writes too: the loop must finish the file

    monkeypatch.setattr(checkpoints.os, "write", write)
    engine = Engine(lambda engine, batch: None)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: epoch.update(now=e.state.epoch))
    network = torch.nn.Linear(20, 20)
    engine.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint({"network": network, "other": torch.nn.Linear(1, 1)},
                                                               AtomicDiskSaver(tmp_path), score_name="epoch",
                                                               score_function=lambda e: e.state.epoch, n_saved=1))
    with pytest.raises(TrainingStopped) as info:
        engine.run([0], max_epochs=2)
    message = str(info.value)
    assert message.startswith(f"error: {tmp_path / 'checkpoint_epoch=2.pt'}: cannot be written: no space left on "
                              "device ("), message
    assert message.endswith(f"; the previous file is kept: {tmp_path / 'checkpoint_epoch=1.pt'}"), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]
    stored = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    assert torch.equal(stored["network"]["weight"], network.weight.detach())


def test_a_fixed_name_is_replaced_whole_and_a_non_finite_state_is_refused(tmp_path):
    saver = AtomicDiskSaver(tmp_path, filename="model.pt")
    saver.remove("model.pt")  # what ignite does before every save of a better model
    saver({"weight": torch.ones(2)}, "model_key_metric=0.5.pt")
    assert torch.equal(torch.load(tmp_path / "model.pt")["weight"], torch.ones(2))
    saver.remove("model.pt")
    with pytest.raises(TrainingStopped, match=r"model\.pt: not written: the state to save holds NaN or Inf values "
                                              r"\(weight\); the previous file is kept"):
        saver({"weight": torch.tensor([1.0, math.inf])}, "model_key_metric=0.6.pt")
    assert torch.equal(torch.load(tmp_path / "model.pt")["weight"], torch.ones(2))
    assert temporaries(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint_epoch=2.pt.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"half")
    write_atomically({"x": torch.zeros(1)}, tmp_path / "unrelated.pt")
    assert stale.exists()  # write_atomically itself touches nothing else
    assert checkpoints.remove_stale_temporaries(tmp_path) == [stale] and not stale.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs: room for epoch 1's checkpoint (1.8 MB) and the two 0.45 MB models, not for epoch 2's (2.7 MB)
    beside epoch 1's. Needs the right to mount (root in a container); skipped otherwise."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode(errors='replace').strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_the_training_with_the_last_good_checkpoint(tmp_path, small_disk):
    ckpt = small_disk / "models"
    result = cli(*TRAIN, *CLI_TRAIN, "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "eval"))
    assert_clean_failure(result, f"{ckpt / 'checkpoint_epoch=2.pt'}: cannot be written: no space left on device",
                         f"the previous file is kept: {ckpt / 'checkpoint_epoch=1.pt'}")
    assert checkpoint_problem(ckpt / "checkpoint_epoch=1.pt", checkpoints.TRAINING_STATE_KEYS) is None
    assert checkpoint_problem(ckpt / "model.pt", flat=True) is None
    assert not (ckpt / "checkpoint_epoch=2.pt").exists() and not (ckpt / "checkpoint_final.pt").exists()
    assert temporaries(ckpt) == []


# ---- 2. non-finite values: in the data, in the loss, in the weights to evaluate ---------------------------------
def test_a_non_finite_loss_stops_the_training_and_keeps_the_last_good_checkpoint(tmp_path):
    """alpha = NaN makes the scoring loss NaN from the first joint micro-step (epoch 2, iteration 5). Before: the run
    trained on to exit 0 with every tensor of model.pt NaN."""
    ckpt = tmp_path / "models"
    result = cli(*TRAIN, *CLI_TRAIN, "--alpha", "$float('nan')", "--ckpt_dir", str(ckpt),
                 "--output_dir", str(tmp_path / "eval"))
    assert_clean_failure(result, "training stopped at epoch 2, iteration 5: not finite (NaN or Inf): loss_scoring = nan",
                         f"the last good checkpoint is {ckpt / 'checkpoint_epoch=1.pt'} (epoch 1)")
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt", "scoring_model.pt"]
    assert checkpoint_problem(ckpt / "checkpoint_epoch=1.pt", checkpoints.TRAINING_STATE_KEYS) is None
    assert checkpoint_problem(ckpt / "model.pt", flat=True) is None


def test_bad_images_and_labels_stop_before_training_naming_every_file(tmp_path):
    """NaN images, truncated data, a constant image and a label value of 1e6, all at once. Before: the NaN pair trained
    to a NaN model (exit 0), the truncated file stopped the run with a traceback, the constant image was accepted,
    the label stopped the first validation with a traceback ('Class values must be smaller than num_classes')."""
    data = folder_of_cases(tmp_path / "data")
    save_nifti(np.full((32, 32), np.nan, np.float32), data / "c0_ED.nii.gz")
    truncated = (data / "c1_ES.nii.gz").read_bytes()
    (data / "c1_ES.nii.gz").write_bytes(truncated[: len(truncated) // 2])  # header intact, data cut
    save_nifti(np.full((32, 32), 5.0, np.float32), data / "c2_ED.nii.gz")
    label = ring_label(32, (16, 16), 6).astype(np.float32)
    label[0, 0] = 1e6
    save_nifti(label, data / "c4_ED_gt.nii.gz")  # c4 validates (every fifth labelled case)
    before = digest(data)
    result = cli(*TRAIN, *NIFTI_TRAIN, "--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "models"),
                 "--output_dir", str(tmp_path / "eval"))
    assert_clean_failure(
        result,
        f"{data / 'c0_ED.nii.gz'}: contains 1024 NaN and 0 infinite values",
        f"{data / 'c1_ES.nii.gz'}: the data cannot be read: truncated or corrupt file",
        f"{data / 'c2_ED.nii.gz'}: the image is constant",
        f"{data / 'c4_ED_gt.nii.gz'}: label values outside 0..3 (num_classes 4): found 1e+06",
    )
    assert digest(data) == before
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


def test_a_datalist_that_is_a_list_is_a_clear_error(tmp_path):
    data = folder_of_cases(tmp_path / "data", count=2)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps([{"moving": "c0_ED.nii.gz", "fixed": "c0_ES.nii.gz"}]))
    before = digest(tmp_path)
    result = cli(*TRAIN, *NIFTI_TRAIN, "--dataset_dir", str(data), "--datalist", str(datalist),
                 "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"))
    assert_clean_failure(result, f"{datalist}: the datalist must be a JSON object with 'training', 'validation' and "
                                 "'testing' sections, not a list")
    assert digest(tmp_path) == before


def test_evaluation_refuses_non_finite_weights(tmp_path):
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    state = DiffeomorphicVoxelMorph().state_dict()
    first = next(key for key, value in state.items() if value.is_floating_point())
    state[first].view(-1)[0] = math.nan
    torch.save(state, ckpt / "model.pt")
    before = digest(ckpt)
    result = cli("--config_file", "['configs/train.yaml','configs/evaluate.yaml']", "--image_size", "[64,64]",
                 "--num_test_pairs", "2", "--ckpt_path", str(ckpt / "model.pt"), "--output_dir", str(tmp_path / "eval"))
    assert_clean_failure(result, f"{ckpt / 'model.pt'} holds NaN or Inf values ({first})")
    assert digest(ckpt) == before and not (tmp_path / "eval").exists()


def test_weights_to_evaluate_missing_or_empty_are_named(tmp_path):
    with pytest.raises(TrainingStopped, match=r"model\.pt does not exist \(the shipped weights are models/model\.pt"):
        require_weights(tmp_path / "model.pt", "the shipped weights are models/model.pt; yours: --ckpt_path ...")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(TrainingStopped, match=r"model\.pt is empty \(0 bytes\)"):
        require_weights(tmp_path / "model.pt")
    torch.save({"displacement_network": {}, "trainer": {}}, tmp_path / "model.pt")
    with pytest.raises(TrainingStopped, match="is not a flat state dict of tensors"):
        require_weights(tmp_path / "model.pt")


# ---- 4. labelled and unlabelled pairs; the shipped weights' folder -------------------------------------------------
def bundle_copy(tmp_path: Path) -> Path:
    """The bundle (configs, scripts, shipped weights) in a temporary folder, to run it with its default paths."""
    copy = tmp_path / "bundle"
    for part in ("configs", "scripts", "models"):
        shutil.copytree(BUNDLE / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "own", "phantom"))
    return copy


def test_mixed_labels_train_into_models_own_and_leave_the_shipped_weights(tmp_path):
    """c1 and c5 have no labels. Before: KeyError 'moving_label' (labelled and unlabelled pairs in one training
    batch), and with --dataset_dir the run wrote into models/, replacing the shipped model.pt."""
    bundle = bundle_copy(tmp_path)
    data = folder_of_cases(tmp_path / "data", labelled={0, 2, 3, 4})
    shipped, inputs = digest(bundle / "models"), digest(data)
    result = cli(*TRAIN, *NIFTI_TRAIN, "--dataset_dir", str(data), "--output_dir", str(tmp_path / "eval"),
                 cwd=bundle)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    own = bundle / "models" / "own"
    assert {"model.pt", "scoring_model.pt", "checkpoint_final.pt"} <= {p.name for p in own.iterdir()}
    assert checkpoint_problem(own / "model.pt", flat=True) is None
    assert {k: v for k, v in digest(bundle / "models").items() if not k.startswith("own/")} == shipped
    assert digest(data) == inputs and temporaries(bundle) == []
    assert "Epoch[2] Metrics" in result.stdout + result.stderr  # validated (on c4, the fifth labelled case)


def test_training_into_the_shipped_weights_folder_is_refused(tmp_path):
    with pytest.raises(TrainingStopped, match="is the folder of the bundle's shipped weights .*model.pt"):
        require_not_shipped_folder(BUNDLE / "models", BUNDLE)
    with pytest.raises(TrainingStopped):
        require_not_shipped_folder(BUNDLE / "models" / ".." / "models", BUNDLE)
    require_not_shipped_folder(BUNDLE / "models" / "own", BUNDLE)


def test_validation_dice_is_over_the_labelled_pairs_and_says_so(tmp_path, caplog):
    data = folder_of_cases(tmp_path / "data", labelled={0, 1})
    datalist = tmp_path / "datalist.json"
    pairs = [{"moving": f"c{i}_ED.nii.gz", "fixed": f"c{i}_ES.nii.gz"} for i in range(4)]
    for i in (0, 1):
        pairs[i].update(moving_label=f"c{i}_ED_gt.nii.gz", fixed_label=f"c{i}_ES_gt.nii.gz")
    datalist.write_text(json.dumps({"training": pairs[::2], "validation": pairs[1:]}))
    with caplog.at_level(logging.WARNING, logger="scripts.data"):
        validation = pair_datalist(data, "validation", str(datalist))
        training = pair_datalist(data, "training", str(datalist))
    assert [Path(item["moving"]).name for item in validation] == ["c1_ED.nii.gz"]
    assert all("moving_label" not in item for item in training)
    assert "validation: 2 pair(s) without both labels left out (validation Dice is over the 1 labelled pair(s)): " \
           "c2_ED.nii.gz, c3_ED.nii.gz" in caplog.text


# ---- the data checks, one by one -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, is_label, expected",
    [
        ("nan", False, "contains 3 NaN and 0 infinite values (of 1024)"),
        ("inf", False, "contains 0 NaN and 1 infinite values (of 1024)"),
        ("constant", False, "the image is constant (every pixel 0)"),
        ("fractional", True, "label values must be integers (found 0.5)"),
        ("negative", True, "label values outside 0..3 (num_classes 4): found -1"),
        ("huge", True, "label values outside 0..3 (num_classes 4): found 1e+06"),
        ("truncated", False, "the data cannot be read: truncated or corrupt file"),
    ],
)
def test_content_problems(tmp_path, kind, is_label, expected):
    array = ring_label(32, (16, 16), 6).astype(np.float32) + (0 if is_label else 0.5)
    if kind == "nan":
        array.flat[:3] = np.nan
    elif kind == "inf":
        array[0, 0] = -np.inf
    elif kind == "constant":
        array[:] = 0
    elif kind == "fractional":
        array[0, 0] = 0.5
    elif kind == "negative":
        array[0, 0] = -1
    elif kind == "huge":
        array[0, 0] = 1e6
    path = save_nifti(array, tmp_path / "x.nii.gz")
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-200])
    problems = content_problems(str(path), is_label, num_classes=4)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: {expected}"), problems
    assert content_problems(str(save_nifti(ring_label(32, (16, 16), 6), tmp_path / "ok.nii.gz")), True, 4) == []


def test_two_files_for_one_frame_are_an_error_naming_both(tmp_path):
    folder_of_cases(tmp_path / "data", count=2)
    save_nifti(np.ones((32, 32), np.float32), tmp_path / "data" / "c0_ED.nii")
    with pytest.raises(DatasetError) as info:
        find_pairs(tmp_path / "data")
    folder = tmp_path / "data"
    assert f"{folder / 'c0_ED.nii'} and {folder / 'c0_ED.nii.gz'}: two files for the same frame of case 'c0'" \
           in str(info.value)


@pytest.mark.parametrize(
    "content, expected",
    [
        ([{"moving": "a", "fixed": "b"}], "must be a JSON object with 'training', 'validation' and 'testing' sections, "
                                          "not a list"),
        ({"training": {"moving": "a"}}, "section 'training' must be a list of pairs, not an object"),
        ({"training": ["a_ED.nii.gz"]}, "item 0 of 'training' must be an object with 'moving' and 'fixed' paths"),
        ({"training": [{"moving": 5, "fixed": "b"}]}, "item 0 of 'training': 'moving' must be a file path (a non-empty "
                                                      "string), not 5"),
        ({"training": [{"moving": "a", "fixed": None}]}, "'fixed' must be a file path (a non-empty string), not null"),
    ],
)
def test_datalist_structure_errors(tmp_path, content, expected):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError) as info:
        load_datalist_json(path, "training")
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value), str(info.value)
