"""Bad input: every dataset problem is a DatasetError naming the file, and the CLI stops with that one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLE
from scripts.data import (
    DatasetError,
    DropSingletonDepthd,
    check_pairs,
    find_pairs,
    load_datalist_json,
    pair_datalist,
    registration_datalist,
    require_valid_dataset,
)


def write(path: Path, shape=(32, 32), value: float | None = None) -> Path:
    if value is None:
        array = np.random.default_rng(0).random(shape).astype(np.float32)
    else:
        array = np.full(shape, value, np.float32)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def good_case(folder: Path, case: str, shape=(32, 32), labels: bool = True) -> None:
    write(folder / f"{case}_ED.nii.gz", shape)
    write(folder / f"{case}_ES.nii.gz", shape)
    if labels:
        write(folder / f"{case}_ED_gt.nii.gz", shape, 1.0)
        write(folder / f"{case}_ES_gt.nii.gz", shape, 1.0)


def problems_of(folder: Path) -> str:
    with pytest.raises(DatasetError) as info:
        pair_datalist(folder, "testing")
    return str(info.value)


# ---- what a good folder gives ------------------------------------------------------------------------------
def test_a_good_folder_passes(tmp_path):
    for i in range(5):
        good_case(tmp_path, f"c{i}")
    write(tmp_path / "notes_unrelated.nii.gz")  # files outside the naming rule are ignored
    pairs = find_pairs(tmp_path)
    assert [p["case"] for p in pairs] == [f"c{i}" for i in range(5)]
    assert pairs[0]["moving"].endswith("c0_ED.nii.gz") and pairs[0]["fixed_label"].endswith("c0_ES_gt.nii.gz")
    assert check_pairs(pairs) == []
    # the split: every 5th case validates, the others train, testing takes all
    assert [p["case"] for p in pair_datalist(tmp_path, "validation")] == ["c4"]
    assert len(pair_datalist(tmp_path, "training")) == 4 and len(pair_datalist(tmp_path, "testing")) == 5


def test_lower_case_frame_names_are_found(tmp_path):
    """Users' files often come as ``case1_ed.nii.gz``: ED/ES/gt match in any case."""
    for name in ("case1_ed", "case1_es", "case1_ed_gt", "case1_Es_GT"):
        write(tmp_path / f"{name}.nii.gz", value=1.0 if "gt" in name.lower() else None)
    pairs = find_pairs(tmp_path)
    assert [p["case"] for p in pairs] == ["case1"]
    assert pairs[0]["moving"].endswith("case1_ed.nii.gz") and pairs[0]["fixed_label"].endswith("case1_Es_GT.nii.gz")


def test_lower_and_upper_case_of_one_frame_is_ambiguous(tmp_path):
    good_case(tmp_path, "x", labels=False)
    write(tmp_path / "x_ed.nii.gz")
    with pytest.raises(DatasetError, match="two files for the same frame") as info:
        find_pairs(tmp_path)
    assert "x_ED.nii.gz" in str(info.value) and "x_ed.nii.gz" in str(info.value)


def test_unmatched_files_are_named_in_one_warning(tmp_path, caplog):
    good_case(tmp_path, "c0")
    write(tmp_path / "scan3.nii.gz")
    (tmp_path / "readme.txt").write_text("notes")
    (tmp_path / ".DS_Store").write_text("")
    with caplog.at_level("WARNING"):
        find_pairs(tmp_path)
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "readme.txt" in lines[0] and "scan3.nii.gz" in lines[0] and "<case>_ED/_ES[_gt].nii[.gz]" in lines[0]
    assert ".DS_Store" not in lines[0]  # hidden files are skipped quietly


def test_a_one_slice_volume_counts_as_2d(tmp_path):
    good_case(tmp_path, "slice", shape=(32, 32, 1))
    assert check_pairs(find_pairs(tmp_path)) == []
    image = torch.zeros(1, 32, 32, 1)
    assert DropSingletonDepthd(keys="moving")({"moving": image})["moving"].shape == (1, 32, 32)


# ---- each problem, named -------------------------------------------------------------------------------------
def test_missing_dataset_folder(tmp_path):
    missing = tmp_path / "no_such_folder"
    for call in (lambda: find_pairs(missing), lambda: pair_datalist(missing, "training"),
                 lambda: registration_datalist(str(missing), "training")):
        with pytest.raises(DatasetError, match="does not exist") as info:
            call()
        assert str(missing) in str(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="no <case>_ED"):
        find_pairs(tmp_path)


def test_unequal_shapes(tmp_path):
    write(tmp_path / "a_ED.nii.gz", (32, 32))
    write(tmp_path / "a_ES.nii.gz", (32, 48))
    message = problems_of(tmp_path)
    assert "a_ED.nii.gz" in message and "a_ES.nii.gz" in message and "unequal shapes" in message
    assert "(32, 48)" in message


def test_label_of_another_shape(tmp_path):
    good_case(tmp_path, "a")
    write(tmp_path / "a_ES_gt.nii.gz", (16, 16), 1.0)
    message = problems_of(tmp_path)
    assert "a_ES_gt.nii.gz" in message and "unequal shapes" in message


def test_3d_image_where_2d_is_expected(tmp_path):
    good_case(tmp_path, "vol", shape=(32, 32, 8))
    message = problems_of(tmp_path)
    assert "vol_ED.nii.gz" in message and "3D" in message and "expected a 2D image" in message


def test_corrupt_nifti(tmp_path):
    good_case(tmp_path, "bad")
    (tmp_path / "bad_ES.nii.gz").write_bytes(b"this is not a NIfTI file at all")
    message = problems_of(tmp_path)
    assert "bad_ES.nii.gz" in message and "cannot be read as NIfTI" in message
    assert "bad_ED.nii.gz" not in message  # the good file of the pair is not blamed


def test_truncated_nifti(tmp_path):
    good_case(tmp_path, "cut")
    path = tmp_path / "cut_ED.nii.gz"
    path.write_bytes(path.read_bytes()[:40])
    message = problems_of(tmp_path)
    assert "cut_ED.nii.gz" in message and "cannot be read" in message


def test_case_with_ed_but_no_es(tmp_path):
    good_case(tmp_path, "fine")
    write(tmp_path / "lonely_ED.nii.gz")
    with pytest.raises(DatasetError) as info:
        find_pairs(tmp_path)
    message = str(info.value)
    assert "lonely_ED.nii.gz" in message and "case 'lonely' has no ES frame" in message
    assert "fine" not in message


def test_every_problem_is_reported_at_once(tmp_path):
    good_case(tmp_path, "a")
    write(tmp_path / "b_ED.nii.gz", (32, 32))
    write(tmp_path / "b_ES.nii.gz", (30, 32))
    good_case(tmp_path, "c", shape=(32, 32, 4))
    good_case(tmp_path, "d")
    (tmp_path / "d_ED.nii.gz").write_bytes(b"garbage")
    message = problems_of(tmp_path)
    lines = message.splitlines()
    assert lines[0] == "dataset problems:"
    assert any("b_ED.nii.gz" in line and "unequal" in line for line in lines)
    assert any("c_ED.nii.gz" in line and "3D" in line for line in lines)
    assert any("d_ED.nii.gz" in line and "cannot be read" in line for line in lines)
    assert not any(Path(line.split(":")[0].strip()).name.startswith("a_") for line in lines[1:])


def test_validation_uses_the_labelled_pairs(tmp_path):
    """Labels are optional: unlabelled cases train; every fifth *labelled* case validates (Dice needs labels)."""
    for i in range(5):
        good_case(tmp_path, f"c{i}", labels=i != 4)
    assert [p["case"] for p in pair_datalist(tmp_path, "validation")] == ["c3"]
    training = pair_datalist(tmp_path, "training")
    assert [p["case"] for p in training] == ["c0", "c1", "c2", "c4"]
    assert all(set(p) == {"case", "moving", "fixed"} for p in training)  # training does not load labels
    assert len(pair_datalist(tmp_path, "testing", require_labels=False)) == 5
    with pytest.raises(DatasetError, match="c4_ED.nii.gz: testing pair has no labels"):
        pair_datalist(tmp_path, "testing")


def test_validation_needs_one_labelled_pair(tmp_path):
    for i in range(5):
        good_case(tmp_path, f"c{i}", labels=False)
    with pytest.raises(DatasetError, match="c4_ED.nii.gz: validation pair has no labels") as info:
        pair_datalist(tmp_path, "validation")
    assert "at least one pair with both labels" in str(info.value)
    assert len(pair_datalist(tmp_path, "training")) == 4


# ---- datalist JSON -----------------------------------------------------------------------------------------
def test_datalist_problems(tmp_path):
    good_case(tmp_path, "a")
    missing = tmp_path / "none.json"
    with pytest.raises(DatasetError, match="none.json: datalist file does not exist"):
        load_datalist_json(missing, "training")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json: not a readable JSON datalist"):
        load_datalist_json(broken, "training")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"moving": "a_ED.nii.gz"}], "testing": []}))
    with pytest.raises(DatasetError, match="has no 'validation' section \\(found: training, testing\\)"):
        load_datalist_json(datalist, "validation")
    with pytest.raises(DatasetError, match="item 0 of 'training' has no fixed entry"):
        load_datalist_json(datalist, "training")
    datalist.write_text(json.dumps({"training": [{"moving": "a_ED.nii.gz", "fixed": "missing_ES.nii.gz"}]}))
    with pytest.raises(DatasetError, match="missing_ES.nii.gz: file does not exist"):
        pair_datalist(tmp_path, "training", str(datalist))
    datalist.write_text(json.dumps({"training": [{"moving": "a_ED.nii.gz", "fixed": "a_ES.nii.gz"}]}))
    items = pair_datalist(tmp_path, "training", str(datalist))
    assert items == [{"moving": str(tmp_path / "a_ED.nii.gz"), "fixed": str(tmp_path / "a_ES.nii.gz")}]


def test_datalist_paths_through_monai_loader(tmp_path):
    """load_decathlon_datalist resolves the files; a missing one still gets its full path (the check names where it
    was looked for), and entries that are not files stay as written even when they name an existing folder."""
    good_case(tmp_path, "a")
    (tmp_path / "a").mkdir()
    datalist = tmp_path / "lists" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"training": [
        {"moving": "../a_ED.nii.gz", "fixed": "./missing_ES.nii.gz", "case": "a", "weight": 2},
        {"moving": str(tmp_path / "a_ED.nii.gz"), "fixed": "../a_ES.nii.gz"},
    ]}))
    items = load_datalist_json(datalist, "training")
    assert items == [
        {"moving": str(tmp_path / "a_ED.nii.gz"), "fixed": str(datalist.parent / "missing_ES.nii.gz"), "case": "a",
         "weight": 2},
        {"moving": str(tmp_path / "a_ED.nii.gz"), "fixed": str(tmp_path / "a_ES.nii.gz")},
    ]
    assert load_datalist_json(datalist, "training", base_dir=tmp_path / "lists")[0]["case"] == "a"
    datalist.write_text(json.dumps({"training": [{"moving": "a_ED.nii.gz", "fixed": "missing_ES.nii.gz"}]}))
    with pytest.raises(DatasetError, match=f"\n  {tmp_path / 'missing_ES.nii.gz'}: file does not exist"):
        pair_datalist(tmp_path, "training", str(datalist))  # paths relative to the dataset folder


def test_require_valid_dataset_exits_with_the_message(tmp_path):
    write(tmp_path / "x_ED.nii.gz")
    with pytest.raises(SystemExit) as info:
        require_valid_dataset(str(tmp_path), None, ["training"])
    assert str(info.value).startswith("error: ") and "x_ED.nii.gz" in str(info.value)
    require_valid_dataset(None, None, ["training", "validation"])  # the phantom needs no check


# ---- the CLI --------------------------------------------------------------------------------------------------
def bad_dataset(kind: str, root: Path) -> tuple[Path, str]:
    """A folder with one problem and the text the error must contain."""
    folder = root / kind
    if kind == "missing":
        return folder, f"{folder}: dataset folder does not exist"
    folder.mkdir()
    for i in range(5):
        good_case(folder, f"ok{i}")
    if kind == "corrupt":
        (folder / "ok3_ES.nii.gz").write_bytes(b"corrupt")
        return folder, "ok3_ES.nii.gz: cannot be read as NIfTI"
    if kind == "unequal":
        write(folder / "ok1_ES.nii.gz", (40, 32))
        return folder, "unequal shapes"
    if kind == "no_es":
        write(folder / "lonely_ED.nii.gz")
        return folder, "lonely_ED.nii.gz: case 'lonely' has no ES frame"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, configs",
    [
        ("missing", "configs/train.yaml"),
        ("corrupt", "configs/train.yaml"),
        ("no_es", "['configs/train.yaml','configs/evaluate.yaml']"),
    ],
)
def test_cli_stops_with_one_clear_message(tmp_path, kind, configs):
    folder, expected = bad_dataset(kind, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--dataset_dir", str(folder),
         "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")],
        cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in result.stderr, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-3000:]
    assert not (tmp_path / "models").exists()  # stopped before training wrote anything
