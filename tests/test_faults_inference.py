"""Issue 27, inference side: registration inference (configs/inference.yaml, scripts/inference_engine.py) and the
strain workflow (configs/strain.yaml, scripts/strain_workflow.py, strain_io.py) under faults and hostile input.

The corpus, each case asserting the exit status, a message naming the file and the problem, that the good cases'
outputs are complete and valid, that inputs are byte-identical and that nothing is left behind:

* case names: ``../escaped``, an absolute path, a leading '.', duplicates (also ignoring case), the summary's name;
* a symbolic link loop among the inputs (that case fails, the others finish);
* the output folder: a file, not writable;
* weights: missing, empty, corrupt, not a state dict, not fitting the network, NaN; and a network giving NaN fields;
* datalists: a top-level list, an empty / non-list section, an item that is not an object, a non-string path,
  a missing ``fixed``;
* inputs: label values 1e6 (no one-hot of a million classes), above ``max_label``, negative, non-integer; constant
  images; ``x_ED.nii`` next to ``x_ED.nii.gz``; label values other than the strain workflow's codes (said);
* leftovers: ``.tmp-*`` / ``.old-*`` of a killed run removed at the next start (only ours, only in output_dir);
  a rerun removes the old outputs of a case that now fails;
* the real CLI (``python -m monai.bundle run``) for three of them, in the background while the in-process tests
  run: a mixed batch (exit 1), corrupt weights (exit 1, no output folder), and a run killed with SIGKILL while it
  writes (``ADACS_PAUSE_AFTER_TEMP`` pauses after a temporary file is complete), then rerun.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLE

from scripts.inference_engine import OUTPUT_SUFFIXES, register_folder
from scripts.io_safety import TMP_PATTERN, assign_case_names
from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet, ZeroDisplacement
from scripts.phantom import cardiac_phantom_pair
from scripts.registration_io import PairRegistration, collect_pairs
from scripts.strain_workflow import StrainWorkflow

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
AFFINE = np.diag([1.5, 1.5, 8.0, 1.0])


# ------------------------------------------------------------------------------------------------------ helpers
def phantom(index: int) -> dict:
    return cardiac_phantom_pair(300000 + index, 0, SIZE, "cine")


def save(path: Path, array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), AFFINE), str(path))
    return path


def write_pair(folder: Path, case: str, index: int = 0, labels: bool = True, ext: str = ".nii.gz", **replace) -> None:
    pair = phantom(index)
    arrays = {"ED": pair["moving"][0], "ES": pair["fixed"][0]}
    if labels:
        arrays.update(ED_gt=pair["moving_label"][0].astype(np.uint8), ES_gt=pair["fixed_label"][0].astype(np.uint8))
    arrays.update(replace)
    for name, array in arrays.items():
        save(folder / f"{case}_{name}{ext}", array)


def digests(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's hash, a symbolic link's target (loops included)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if TMP_PATTERN.match(p.name)] if folder.is_dir() else []


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def check_good_outputs(out: Path, row: dict[str, str], moving: Path) -> None:
    """An ok row: every listed output exists, is readable, finite, on the moving grid; nothing else of the case."""
    assert row["status"] == "ok", row
    names = row["outputs"].split(";")
    assert f"{row['case']}_ddf.nii.gz" in names and f"{row['case']}_warped.nii.gz" in names
    source = nib.load(str(moving))
    for name in names:
        if name.endswith(".nrrd"):
            assert (out / name).stat().st_size > 0
            continue
        image = nib.load(str(out / name))
        data = np.asarray(image.dataobj)
        assert np.isfinite(data).all(), name
        assert image.shape[:2] == source.shape[:2], name
        if "_ddf_itk" not in name:  # ITK's own header (tested in test_inference.py)
            np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
    case_files = {f"{row['case']}{suffix}" for suffix in OUTPUT_SUFFIXES if (out / f"{row['case']}{suffix}").exists()}
    assert case_files == set(names), (case_files, names)


def run_inference(data: Path | None, out: Path, datalist: Path | None = None, network=None, ckpt=None, **kwargs):
    """In-process inference (configs/inference.yaml); returns (exit code or None, message, rows of summary.csv or {})."""
    network = network if network is not None else ZeroDisplacement()
    run = lambda: register_folder(data, out, network, ckpt, datalist, **kwargs)  # noqa: E731
    return _outcome(run, out / "summary.csv")


def run_strain(data: Path | None, out: Path, network, datalist: Path | None = None, ckpt=None, **kwargs):
    workflow = StrainWorkflow(str(data) if data else None, network, out, ckpt_path=ckpt,
                              datalist=str(datalist) if datalist else None, figures=False, progress=False, **kwargs)
    return _outcome(workflow.run, out / "strain_summary.csv")


def _outcome(run, summary: Path):
    """Run an engine: (exit code or None, message, rows of its summary CSV or {})."""
    try:
        run()
        code, message = None, ""
    except SystemExit as stop:
        code, message = (1, str(stop.code)) if isinstance(stop.code, str) else (stop.code, "")
    return code, message, read_csv(summary) if summary.is_file() else {}


def nan_network() -> DiffeomorphicVoxelMorph:
    net = DiffeomorphicVoxelMorph()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.fill_(float("nan"))
    return net


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Good weights (the configured network, small random head) and the bad files."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    good = DiffeomorphicVoxelMorph(head_init_std=1e-2).state_dict()
    torch.save(good, root / "good.pt")
    (root / "empty.pt").write_bytes(b"")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a checkpoint" * 20)
    torch.save(ScoringNet().state_dict(), root / "mismatch.pt")
    torch.save([torch.zeros(3)], root / "notdict.pt")
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in good.items()},
               root / "nan.pt")
    return {p.stem: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def strain_network(weights) -> DiffeomorphicVoxelMorph:
    net = DiffeomorphicVoxelMorph()
    net.load_state_dict(torch.load(weights["good"], weights_only=True))
    return net.eval()


def _cli(data: Path, out: Path, ckpt: Path, log: Path, **env_extra) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
    env.pop("PYTHONPATH", None)  # the bundle runs from its root
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
               "--dataset_dir", str(data), "--output_dir", str(out), "--ckpt_path", str(ckpt), "--progress", "false"]
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=BUNDLE, env=env, stdout=handle, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory, weights):
    """Three real CLI runs started in the background at module start (the in-process tests run meanwhile)."""
    root = tmp_path_factory.mktemp("cli")
    # 1. a mixed batch: two good pairs and one of each per-case fault
    batch = root / "batch"
    write_pair(batch, "good1", 0)
    write_pair(batch, "good2", 1, labels=False)
    write_pair(batch, "corrupt", 2)
    (batch / "corrupt_ES.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI")
    write_pair(batch, "loop", 3, labels=False)
    (batch / "loop_ED.nii.gz").unlink()
    os.symlink("loop_ED.nii.gz", batch / "loop_ED.nii.gz")  # a link to itself
    write_pair(batch, "const", 4, labels=False, ES=np.full((SIZE, SIZE), 5.0, np.float32))
    huge = phantom(5)["moving_label"][0].astype(np.float32)
    huge[0, 0] = 1e6
    write_pair(batch, "huge", 5, ED_gt=huge)
    write_pair(batch, "twice", 6, labels=False)
    save(batch / "twice_ED.nii", phantom(6)["moving"][0])
    # 2. corrupt weights; 3. a run paused after its first temporary file (to be killed)
    pairs = root / "pairs"
    write_pair(pairs, "a", 0)
    write_pair(pairs, "b", 1)
    state = {"root": root, "batch": batch, "pairs": pairs, "before_batch": digests(batch), "before_pairs": digests(pairs)}
    state["batch_run"] = _cli(batch, root / "batch_out", weights["good"], root / "batch.log")
    state["weights_run"] = _cli(pairs, root / "weights_out" / "nested", weights["corrupt"], root / "weights.log")
    state["kill_run"] = _cli(pairs, root / "kill_out", weights["good"], root / "kill.log", ADACS_PAUSE_AFTER_TEMP="300")
    yield state
    for key in ("batch_run", "weights_run", "kill_run"):
        if state[key].poll() is None:
            state[key].kill()
            state[key].wait()


# ------------------------------------------------------------------------------------ inference: case names
def test_case_names_stay_in_output_dir_and_are_unique(tmp_path):
    data = tmp_path / "data"
    for i, case in enumerate("abcdef"):
        write_pair(data, case, i % 2, labels=False)
    item = lambda case, name: {"moving": f"{case}_ED.nii.gz", "fixed": f"{case}_ES.nii.gz", "case": name}  # noqa: E731
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [
        item("a", "../escaped"), item("b", str(tmp_path / "abs" / "x")), item("c", ".hidden"),
        item("d", "p"), item("e", "P"), item("f", "p_2")]}))
    (tmp_path / "abs").mkdir()
    before, out = digests(data), tmp_path / "out"
    code, message, rows = run_inference(data, out, datalist)
    assert code == 1
    assert set(rows) == {"../escaped", str(tmp_path / "abs" / "x"), ".hidden", "p", "P_3", "p_2"}
    for name, file, problem in (("../escaped", "a_ED.nii.gz", "path separator"),
                                (str(tmp_path / "abs" / "x"), "b_ED.nii.gz", "path separator"),
                                (".hidden", "c_ED.nii.gz", "starts with '.'")):
        assert rows[name]["status"] == "failed" and file in rows[name]["error"] and problem in rows[name]["error"]
    # the second 'p' (ignoring case) takes the first free suffix, not p_2 (another case's name): said in notes
    assert "'P' is already used by d_ED.nii.gz" in rows["P_3"]["notes"] and "'P_3'" in rows["P_3"]["notes"]
    for name, case in (("p", "d"), ("P_3", "e"), ("p_2", "f")):
        check_good_outputs(out, rows[name], data / f"{case}_ED.nii.gz")
    assert not list(tmp_path.glob("escaped*")) and list((tmp_path / "abs").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abs", "data", "list.json", "out"]
    assert digests(data) == before and not leftovers(out)


def test_assign_case_names_never_reuses_a_name():
    items = [{"case": n} for n in ("a", "a", "a_2", "A", "strain_summary.csv", "", "x\ny")]
    assign_case_names(items, reserved=("strain_summary.csv",))
    names = [i["case"] for i in items]
    assert names[:4] == ["a", "a_3", "a_2", "A_4"]
    assert [bool(i.get("error")) for i in items] == [False, False, False, False, True, True, True]
    assert "reserved" in items[4]["error"] and "empty" in items[5]["error"] and "control" in items[6]["error"]


# ---------------------------------------------------------------------------------- inference: output folder
def test_output_dir_that_is_a_file(tmp_path):
    write_pair(tmp_path / "data", "a", labels=False)
    target = tmp_path / "out.txt"
    target.write_text("user data")
    code, message, _ = run_inference(tmp_path / "data", target)
    assert code == 1 and str(target) in message and "a file, not a folder" in message
    code, message, _ = run_inference(tmp_path / "data", target / "sub")
    assert code == 1 and "out.txt is not a folder" in message
    assert target.read_text() == "user data"


def test_output_dir_not_writable(tmp_path):
    write_pair(tmp_path / "data", "a", labels=False)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        code, message, _ = run_inference(tmp_path / "data", locked)
        locked.chmod(0o755)
        assert code == 1 and str(locked) in message and "not writable" in message
        assert list(locked.iterdir()) == []
    # as root permissions do not stop a write; /proc refuses new entries whoever asks
    code, message, _ = run_inference(tmp_path / "data", Path("/proc/adacs_faults_out"))
    assert code == 1 and "/proc/adacs_faults_out" in message and "cannot be created" in message
    assert not os.path.lexists("/proc/adacs_faults_out")
    code, message, _ = run_inference(tmp_path / "data", Path("/proc/self"))  # exists, takes no new file
    assert code == 1 and "/proc/self" in message and "not writable" in message


# ---------------------------------------------------------------------------------------- inference: weights
@pytest.mark.parametrize("kind, problem", [
    ("missing", "weights not found"),
    ("empty", "file is empty"),
    ("corrupt", "cannot be read as displacement network weights"),
    ("notdict", "not a state dict"),
    ("mismatch", "do not fit the configured network"),
    ("nan", "NaN or infinite values"),
])
def test_bad_weights_stop_the_run_naming_the_file(tmp_path, weights, kind, problem):
    write_pair(tmp_path / "data", "a", labels=False)
    path = weights.get(kind, tmp_path / "missing.pt")
    out = tmp_path / "new" / "out"
    code, message, _ = run_inference(tmp_path / "data", out, network=DiffeomorphicVoxelMorph(), ckpt=str(path))
    assert code == 1 and str(path) in message and problem in message, message
    assert not (tmp_path / "new").exists()  # no empty output folder


def test_bad_scoring_weights_are_named(tmp_path, weights):
    write_pair(tmp_path / "data", "a", labels=False)
    code, message, _ = run_inference(tmp_path / "data", tmp_path / "out", score_map=True, scoring_network=ScoringNet(),
                                     scoring_ckpt_path=str(weights["good"]))
    assert code == 1 and str(weights["good"]) in message and "scoring network weights do not fit" in message
    assert not (tmp_path / "out").exists()


def test_network_giving_nan_fails_every_case_and_writes_nothing(tmp_path):
    write_pair(tmp_path / "data", "a", labels=False)
    code, _, rows = run_inference(tmp_path / "data", tmp_path / "out", network=nan_network(), write_itk=False)
    assert code == 1 and rows["a"]["status"] == "failed"
    assert "a_ED.nii.gz" in rows["a"]["error"] and "NaN or infinite" in rows["a"]["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv"]


# --------------------------------------------------------------------------------------- inference: datalists
@pytest.mark.parametrize("content, problem", [
    ([{"moving": "a_ED.nii.gz", "fixed": "a_ES.nii.gz"}], "the top level is a JSON list"),
    ({"testing": []}, "the 'testing' section is empty"),
    ({"testing": {"moving": "a_ED.nii.gz"}}, "the 'testing' section is a JSON object"),
    ({"training": []}, "has no 'testing' section (found: training)"),
    ("{not json", "not a readable JSON datalist"),
])
def test_unusable_datalist_stops_the_run_with_a_message(tmp_path, content, problem):
    write_pair(tmp_path / "data", "a", labels=False)
    datalist = tmp_path / "list.json"
    datalist.write_text(content if isinstance(content, str) else json.dumps(content))
    code, message, _ = run_inference(tmp_path / "data", tmp_path / "out", datalist)
    assert code == 1 and str(datalist) in message and problem in message, message
    assert not (tmp_path / "out").exists()


def test_bad_datalist_items_fail_alone(tmp_path):
    data = tmp_path / "data"
    write_pair(data, "a", labels=False)
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [
        {"moving": "a_ED.nii.gz", "fixed": "a_ES.nii.gz"},
        {"moving": 5, "fixed": "a_ES.nii.gz", "case": "number"},
        "a_ED.nii.gz",
        {"moving": "a_ED.nii.gz", "case": "nofixed"},
        {"moving": "a_ED.nii.gz", "fixed": "a_ES.nii.gz", "case": ["x"]},
    ]}))
    code, _, rows = run_inference(data, tmp_path / "out", datalist)
    assert code == 1
    check_good_outputs(tmp_path / "out", rows["a_ED"], data / "a_ED.nii.gz")
    expected = {"number": "item 1 of 'testing': 'moving' is 5, expected a file path",
                "item2": "item 2 of 'testing' is a JSON string, not an object",
                "nofixed": "item 3 of 'testing' has no 'fixed' entry",
                "item4": "'case' is [\"x\"], expected a name"}
    for case, problem in expected.items():
        assert rows[case]["status"] == "failed" and str(datalist) in rows[case]["error"], rows[case]
        assert problem in rows[case]["error"], rows[case]["error"]


# ----------------------------------------------------------------------------------- inference: bad pixels
def test_bad_images_and_labels_fail_by_name_and_huge_labels_cost_nothing(tmp_path):
    import resource

    data = tmp_path / "data"
    write_pair(data, "good", 0)
    label = phantom(1)["moving_label"][0].astype(np.float32)
    for case, value in (("huge", 1e6), ("above", 300.0), ("negative", -2.0), ("fraction", 1.4)):
        bad = label.copy()
        bad[3, 3] = value
        write_pair(data, case, 1, ES_gt=bad)
    write_pair(data, "flat", 2, labels=False, ED=np.zeros((SIZE, SIZE), np.float32))
    before, memory = digests(data), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, rows = run_inference(data, tmp_path / "out", write_itk=False)
    assert code == 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory < 1_000_000  # kB: no 131 GB one-hot
    expected = {"huge": ("huge_ES_gt.nii.gz", "values up to 1000000"), "above": ("above_ES_gt.nii.gz", "at most 255"),
                "negative": ("negative_ES_gt.nii.gz", "negative values"),
                "fraction": ("fraction_ES_gt.nii.gz", "non-integer values (e.g. 1.4)"),
                "flat": ("flat_ED.nii.gz", "image is constant (every voxel 0)")}
    for case, (file, problem) in expected.items():
        assert rows[case]["status"] == "failed" and file in rows[case]["error"] and problem in rows[case]["error"]
    check_good_outputs(tmp_path / "out", rows["good"], data / "good_ED.nii.gz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("good_")) == ["summary.csv"]
    assert digests(data) == before


def test_sparse_label_values_are_warped_as_given():
    """One channel per value present: a map of values {0, 7, 200} comes back unchanged under the identity, as with
    a full one-hot, and the background outside the image stays 0."""
    labels = np.zeros((1, 40, 40), np.int64)
    labels[0, 5:20, 5:30], labels[0, 22:35, 10:25] = 7, 200
    image = np.random.default_rng(0).random((1, 40, 40)).astype(np.float32)
    result = PairRegistration(ZeroDisplacement(), (32, 32))(image, image, labels)
    np.testing.assert_array_equal(result.warped_label[:, 0].numpy(), labels)
    shifted = PairRegistration(ShiftNetwork(), (32, 32))(image, image, np.full((1, 40, 40), 4, np.int64))
    assert set(np.unique(shifted.warped_label.numpy())) == {0, 4}


class ShiftNetwork(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.full_like(image[:, :2], 8.0)


# ----------------------------------------------------------------------------- inference: reruns, leftovers
def test_rerun_is_refused_then_replaces_the_earlier_run_with_overwrite(tmp_path):
    """Issue 31 item 8: a second run into the same folder used to leave the first run's files of other cases beside
    the new ones while summary.csv listed only the new cases. Now it is refused (nothing touched) unless
    ``overwrite``, which removes the earlier run's outputs first: the folder and its summary agree."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_pair(data, "a", 0)
    write_pair(data, "b", 1)
    code, _, rows = run_inference(data, out, write_itk=False)
    assert code is None and rows["a"]["status"] == rows["b"]["status"] == "ok"
    assert (out / "b_warped.nii.gz").is_file() and (out / "a_warped_gt.nii.gz").is_file()
    (data / "b_ES.nii.gz").write_bytes(b"truncated")  # b now fails
    for name in ("a_ED_gt.nii.gz", "a_ES_gt.nii.gz"):  # a no longer has labels: its old warped_gt is stale
        (data / name).unlink()
    (out / ".tmp-0123abcd-a_ddf.nii.gz").write_bytes(b"half")  # a killed run's leftovers
    (out / ".old-0123abcd-x").mkdir()
    (out / ".tmp-user-notes").write_text("not ours")
    before, earlier = digests(data), digests(out)
    code, message, _ = run_inference(data, out, write_itk=False)
    assert code == 1 and message.startswith(f"error: {out}: holds 7 outputs of an earlier run (a_ddf.nii.gz, ")
    assert message.endswith("pass --overwrite true to replace them, or choose another --output_dir.")
    assert digests(out) == earlier  # refused before anything was written or removed
    code, _, rows = run_inference(data, out, write_itk=False, overwrite="true")
    assert code == 1 and rows["b"]["status"] == "failed" and "b_ES.nii.gz: cannot be read" in rows["b"]["error"]
    assert list(rows) == ["a", "b"]
    check_good_outputs(out, rows["a"], data / "a_ED.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == [".tmp-user-notes", "a_ddf.nii.gz", "a_warped.nii.gz",
                                                     "summary.csv"]
    assert digests(data) == before


def test_default_output_folders_are_beside_the_inputs_not_in_the_bundle(tmp_path, strain_network):
    """Issue 31 item 8: without --output_dir, inference and strain wrote into bundle/eval (the source tree); now
    <dataset_dir>_registered / <dataset_dir>_strain, and the configs say so. A second strain run is refused too."""
    from monai.bundle import ConfigParser

    for config in ("inference.yaml", "strain.yaml"):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / config))
        assert parser.get_parsed_content("output_dir") is None, config
    data = tmp_path / "data"
    write_pair(data, "a", 0)
    register_folder(data, None, ZeroDisplacement(), write_itk="false")
    assert (tmp_path / "data_registered" / "summary.csv").is_file()
    assert (tmp_path / "data_registered" / "a_warped.nii.gz").is_file()
    workflow = StrainWorkflow(str(data), strain_network, None, figures=False, progress=False)
    workflow.run()
    assert (tmp_path / "data_strain" / "strain_summary.csv").is_file() and (tmp_path / "data_strain" / "a").is_dir()
    with pytest.raises(SystemExit, match=r"data_strain: holds 2 outputs of an earlier run \(a, strain_summary.csv\)"):
        StrainWorkflow(str(data), strain_network, None, figures=False, progress=False).run()
    datalist = tmp_path / "list.json"  # absolute paths, no dataset_dir: nowhere to put the default folder
    datalist.write_text(json.dumps({"testing": [{"moving": str(data / "a_ED.nii.gz"), "fixed": str(data / "a_ES.nii.gz")}]}))
    with pytest.raises(SystemExit, match="no output folder: set --output_dir"):
        register_folder(None, None, ZeroDisplacement(), datalist=datalist)


def test_ambiguous_files_and_collect_pairs_errors(tmp_path):
    write_pair(tmp_path, "x", 0, labels=False)
    save(tmp_path / "x_ED.nii", phantom(0)["moving"][0])
    items = collect_pairs(str(tmp_path))
    assert "x_ED.nii and x_ED.nii.gz: two files for one frame of case 'x'" in items[0]["error"]


# ----------------------------------------------------------------------------------- strain: the same rules
def strain_pair(folder: Path, case: str, index: int = 0, **replace) -> None:
    write_pair(folder, case, index, **replace)


def test_strain_names_symlink_loop_bad_pixels_stale_and_leftovers(tmp_path, strain_network):
    data, out = tmp_path / "data", tmp_path / "out"
    strain_pair(data, "good", 0)
    extra = phantom(1)["moving_label"][0].astype(np.uint8)
    extra[0, 0] = 9  # a value that is none of the configured codes: said, not used
    strain_pair(data, "p q", 1, ED_gt=extra)
    strain_pair(data, "loop", 2)
    (data / "loop_ED_gt.nii.gz").unlink()
    os.symlink("loop_ED_gt.nii.gz", data / "loop_ED_gt.nii.gz")
    strain_pair(data, "flat", 3, ES=np.ones((SIZE, SIZE), np.float32))
    strain_pair(data, "twice", 4)
    save(data / "twice_ES.nii", phantom(4)["fixed"][0])
    fraction = phantom(5)["moving_label"][0].astype(np.float32)
    fraction[1, 1] = 0.5
    strain_pair(data, "fraction", 5, ED_gt=fraction)
    out.mkdir()
    (out / "flat").mkdir()  # an earlier run's outputs of a case that now fails (removed: overwrite)
    (out / "flat" / "strain.csv").write_text("stale")
    (out / ".tmp-0123abcd-good").mkdir()  # a killed run's temporary folder and trash
    (out / ".tmp-0123abcd-good" / "strain.csv").write_text("half")
    (out / ".old-0123abcd-good").mkdir()
    (out / "user.tmp-0123abcd-x").write_text("not ours")
    before = digests(data)
    code, _, rows = run_strain(data, out, strain_network, overwrite=True)
    assert code == 1
    expected = {"loop": ("loop_ED_gt.nii.gz", "symbolic link loop"), "flat": ("flat_ES.nii.gz", "constant"),
                "twice": ("twice_ES.nii and twice_ES.nii.gz", "two files for one frame"),
                "fraction": ("fraction_ED_gt.nii.gz", "non-integer values")}
    for case, (file, problem) in expected.items():
        assert rows[case]["status"] == "failed" and file in rows[case]["error"] and problem in rows[case]["error"]
    assert not (out / "flat").exists()
    for case in ("good", "p q"):  # the name is the folder, as given (no silent rewriting)
        assert rows[case]["status"] == "ok", rows[case]
        maps = nib.load(str(out / case / "strain_radial_green.nii.gz")).get_fdata()
        assert np.isfinite(maps).all() and maps.shape == (SIZE, SIZE)
        assert (out / case / "strain.csv").is_file() and (out / case / "displacement.nii.gz").is_file()
    assert "p q_ED_gt.nii.gz: label values 9 are not among the configured labels (rv=1, myo=2, lv=3)" in rows["p q"]["notes"]
    assert sorted(p.name for p in out.iterdir()) == ["good", "p q", "strain_summary.csv", "user.tmp-0123abcd-x"]
    assert digests(data) == before


def test_strain_case_names_from_a_datalist(tmp_path, strain_network):
    data, out = tmp_path / "data", tmp_path / "out"
    strain_pair(data, "a", 0)
    item = {"moving": "a_ED.nii.gz", "fixed": "a_ES.nii.gz", "moving_label": "a_ED_gt.nii.gz"}
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [
        {**item, "case": "../escaped"}, {**item, "case": "strain_summary.csv"}, {**item, "case": "p_q"},
        {**item, "case": "p_q"}, {**item, "cine": 3, "case": "badpath"}]}))
    code, _, rows = run_strain(data, out, strain_network, datalist)
    assert code == 1
    assert "case name '../escaped' contains a path separator" in rows["../escaped"]["error"]
    assert "a_ED_gt.nii.gz" in rows["../escaped"]["error"]
    assert "is reserved" in rows["strain_summary.csv"]["error"]
    assert "'cine' is 3, expected a file path (string) or a list of them" in rows["badpath"]["error"]
    assert rows["p_q"]["status"] == rows["p_q_2"]["status"] == "ok"
    assert "case name 'p_q' is already used by a_ED_gt.nii.gz" in rows["p_q_2"]["notes"]
    assert sorted(p.name for p in out.iterdir()) == ["p_q", "p_q_2", "strain_summary.csv"]
    assert not (tmp_path / "escaped").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data", "list.json", "out"]


@pytest.mark.parametrize("kind, problem", [
    ("corrupt", "cannot be read as displacement network weights"), ("nan", "NaN or infinite values"),
    ("mismatch", "do not fit the configured network"), ("empty", "file is empty"),
])
def test_strain_bad_weights_stop_before_anything_is_written(tmp_path, weights, kind, problem):
    strain_pair(tmp_path / "data", "a", 0)
    code, message, _ = run_strain(tmp_path / "data", tmp_path / "out", DiffeomorphicVoxelMorph(), ckpt=str(weights[kind]))
    assert code == 1 and str(weights[kind]) in message and problem in message, message
    assert not (tmp_path / "out").exists()


def test_strain_run_level_problems(tmp_path, strain_network):
    strain_pair(tmp_path / "data", "a", 0)
    for content, problem in (({"testing": []}, "is empty"), ([{"moving": "a_ED.nii.gz"}], "top level is a JSON list")):
        (tmp_path / "list.json").write_text(json.dumps(content))
        code, message, _ = run_strain(tmp_path / "data", tmp_path / "out", strain_network, tmp_path / "list.json")
        assert code == 1 and problem in message and "list.json" in message
    (tmp_path / "file").write_text("user data")
    code, message, _ = run_strain(tmp_path / "data", tmp_path / "file", strain_network)
    assert code == 1 and "a file, not a folder" in message and (tmp_path / "file").read_text() == "user data"
    code, message, _ = run_strain(tmp_path / "data", Path("/proc/self"), strain_network)  # root may write anywhere else
    assert code == 1 and "/proc/self is not writable" in message
    assert not (tmp_path / "out").exists()


def test_strain_network_giving_nan_fails_the_case(tmp_path):
    strain_pair(tmp_path / "data", "a", 0)
    code, _, rows = run_strain(tmp_path / "data", tmp_path / "out", nan_network())
    assert code == 1 and "a_ED_gt.nii.gz" in rows["a"]["error"] and "NaN or infinite" in rows["a"]["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["strain_summary.csv"]


def test_messages_carry_no_traceback_text(tmp_path):
    """Per-case errors are one line naming the file (the summary is read by people, not debuggers)."""
    write_pair(tmp_path / "data", "a", 0)
    (tmp_path / "data" / "a_ES.nii.gz").write_bytes(b"")
    _, _, rows = run_inference(tmp_path / "data", tmp_path / "out")
    assert re.fullmatch(r"\S*a_ES\.nii\.gz: cannot be read as NIfTI \(.*\)", rows["a"]["error"])
    assert "Traceback" not in rows["a"]["error"] and "\n" not in rows["a"]["error"]


# ------------------------------------------------------------------------------------- inference: the real CLI
# (last in the module: the in-process tests run while the three processes start)
def test_cli_mixed_batch_fails_each_bad_case_by_name_and_finishes_the_good(cli_runs):
    code = cli_runs["batch_run"].wait(timeout=300)
    log = (cli_runs["root"] / "batch.log").read_text()
    out, batch = cli_runs["root"] / "batch_out", cli_runs["batch"]
    assert code == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "2 of 7 pairs registered" in log and "FAILED: const, corrupt, huge, loop, twice" in log
    assert "registering:" not in log  # `--progress false` is honoured (the CLI passes the string 'false')
    rows = read_csv(out / "summary.csv")
    expected = {
        "corrupt": ("corrupt_ES.nii.gz", "cannot be read as NIfTI"),
        "loop": ("loop_ED.nii.gz", "symbolic link loop"),
        "const": ("const_ES.nii.gz", "constant"),
        "huge": ("huge_ED_gt.nii.gz", "values up to 1000000"),
        "twice": ("twice_ED.nii and twice_ED.nii.gz", "two files for one frame"),
    }
    for case, (file, problem) in expected.items():
        assert rows[case]["status"] == "failed" and file in rows[case]["error"] and problem in rows[case]["error"], rows[case]
        assert file.split(" ")[0] in log and problem in log, case  # said in the log as well
        assert not [p for p in out.iterdir() if p.name.startswith(case + "_")], case
    for case in ("good1", "good2"):
        check_good_outputs(out, rows[case], batch / f"{case}_ED.nii.gz")
    assert rows["good1"]["dice"] and (out / "good1_warped_gt.nii.gz").is_file()
    assert (out / "good1_ddf_itk.nii.gz").is_file()  # the CLI default writes the ITK field
    assert digests(batch) == cli_runs["before_batch"] and not leftovers(out)


def test_cli_corrupt_weights_message_and_nothing_written(cli_runs, weights):
    code = cli_runs["weights_run"].wait(timeout=300)
    log = (cli_runs["root"] / "weights.log").read_text()
    assert code == 1 and "Traceback" not in log, log[-3000:]
    assert f"{weights['corrupt']}: cannot be read as displacement network weights" in log
    assert not (cli_runs["root"] / "weights_out").exists()  # not even the parent folder
    assert digests(cli_runs["pairs"]) == cli_runs["before_pairs"]


def test_cli_killed_while_writing_then_rerun_cleans_up(cli_runs, weights):
    process, out, log = cli_runs["kill_run"], cli_runs["root"] / "kill_out", cli_runs["root"] / "kill.log"
    deadline = time.time() + 240
    while "ADACS_PAUSE_AFTER_TEMP" not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the paused run never reached its first temporary file"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    left = leftovers(out)
    assert len(left) == 1 and Path(left[0]).name.endswith("a_ddf.nii.gz"), sorted(p.name for p in out.iterdir())
    # entries that only look like ours are kept: another name pattern, or inside a subfolder
    keep = [out / ".tmp-notours", out / "my.tmp-1234abcd-x.nii.gz", out / "sub" / ".tmp-1234abcd-y.nii.gz"]
    for path in keep:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"user file")
    net = DiffeomorphicVoxelMorph()
    code, _, rows = run_inference(cli_runs["pairs"], out, network=net, ckpt=str(weights["good"]), write_itk=False)
    assert code is None
    assert leftovers(out) == [str(out / "sub" / ".tmp-1234abcd-y.nii.gz")]  # only directly in output_dir is ours
    assert all(p.read_bytes() == b"user file" for p in keep)
    for case in ("a", "b"):
        check_good_outputs(out, rows[case], cli_runs["pairs"] / f"{case}_ED.nii.gz")
    assert digests(cli_runs["pairs"]) == cli_runs["before_pairs"]
