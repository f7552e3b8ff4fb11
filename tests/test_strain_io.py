"""Cases of the strain workflow (scripts/strain_io.py): discovery, cine layouts, bad input named by file."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from scripts.data import DatasetError
from scripts.strain_io import CaseError, collect_cases, load_case


def save(path, array, spacing=(1.5, 1.5)):
    affine = np.diag([*spacing, 8.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def labels_2d(shape=(24, 20)):
    out = np.zeros(shape, np.uint8)
    out[8:16, 6:14] = 2
    out[10:14, 8:12] = 3
    return out


def test_folder_cases_pair_cine_and_missing_labels(tmp_path):
    save(tmp_path / "a_ED.nii.gz", np.random.rand(24, 20).astype(np.float32))
    save(tmp_path / "a_ES.nii.gz", np.random.rand(24, 20).astype(np.float32))
    save(tmp_path / "a_ED_gt.nii.gz", labels_2d())
    save(tmp_path / "b_cine.nii.gz", np.random.rand(24, 20, 5).astype(np.float32))
    save(tmp_path / "b_ED_gt.nii.gz", labels_2d())
    save(tmp_path / "c_ED.nii.gz", np.random.rand(24, 20).astype(np.float32))
    save(tmp_path / "c_ES.nii.gz", np.random.rand(24, 20).astype(np.float32))
    items = {item["case"]: item for item in collect_cases(str(tmp_path))}
    assert set(items) == {"a", "b", "c"}
    assert not items["a"]["error"] and not items["b"]["error"]
    assert "c_ED.nii.gz" in items["c"]["error"] and "no ED labels" in items["c"]["error"]

    pair = load_case(items["a"])
    assert pair.frames.shape == (2, 1, 24, 20) and (pair.ed_index, pair.es_index) == (0, 1)
    assert pair.spacing == (1.5, 1.5) and not pair.is_cine
    cine = load_case(items["b"])
    assert cine.frames.shape == (5, 1, 24, 20) and cine.is_cine and cine.es_index is None
    with pytest.raises(CaseError, match="no ED labels"):
        load_case(items["c"])


def test_lower_case_names_and_ignored_files(tmp_path, caplog):
    save(tmp_path / "a_ed.nii.gz", np.random.rand(24, 20).astype(np.float32))
    save(tmp_path / "a_es.nii.gz", np.random.rand(24, 20).astype(np.float32))
    save(tmp_path / "a_ed_gt.nii.gz", labels_2d())
    save(tmp_path / "b_Cine.nii.gz", np.random.rand(24, 20, 5).astype(np.float32))
    save(tmp_path / "b_ED_GT.nii.gz", labels_2d())
    save(tmp_path / "b_cine_gt.nii.gz", labels_2d())  # no rule takes cine labels
    (tmp_path / "notes.txt").write_text("x")
    with caplog.at_level("WARNING"):
        items = {item["case"]: item for item in collect_cases(str(tmp_path))}
    assert set(items) == {"a", "b"}
    assert not items["a"]["error"] and not items["b"]["error"], items
    assert items["b"]["cine"].endswith("b_Cine.nii.gz")
    assert "ignored 2 files" in caplog.text and "b_cine_gt.nii.gz, notes.txt" in caplog.text
    assert load_case(items["a"]).num_frames == 2


def test_4d_cine_is_time_then_slices(tmp_path):
    x, y, z, t = 12, 10, 3, 4
    volume = np.zeros((x, y, z, t), np.float32)
    for k in range(z):
        for f in range(t):
            volume[:, :, k, f] = 10 * f + k
    labels = np.zeros((x, y, z), np.uint8)
    labels[3:8, 3:8] = 2
    save(tmp_path / "s_cine.nii.gz", volume)
    save(tmp_path / "s_ED_gt.nii.gz", labels)
    case = load_case(collect_cases(str(tmp_path))[0])
    assert case.frames.shape == (t, z, x, y)
    assert case.frames[3, 2, 0, 0] == 32 and case.frames[1, 0, 5, 5] == 10


def test_datalist_with_frame_list_indices_and_times(tmp_path):
    ramp = np.arange(16, dtype=np.float32)[:, None] * 0.01  # frames are not constant (a constant frame fails)
    frames = [save(tmp_path / f"f{i}.nii.gz", np.full((16, 16), float(i), np.float32) + ramp) for i in range(6)]
    save(tmp_path / "lab.nii.gz", labels_2d((16, 16)))
    datalist = {"testing": [{"cine": [f"f{i}.nii.gz" for i in range(6)], "moving_label": "lab.nii.gz", "case": "p1",
                             "ed_index": 4, "es_index": 1, "trigger_ms": [10, 60, 110, 160, 210, 260]}]}
    (tmp_path / "dl.json").write_text(json.dumps(datalist))
    case = load_case(collect_cases(None, str(tmp_path / "dl.json"))[0])
    assert case.case == "p1" and case.frames.shape == (6, 1, 16, 16)
    assert (case.ed_index, case.es_index) == (4, 1) and case.frames[4, 0, 0, 0] == 4.0
    np.testing.assert_allclose(case.times_ms, [10, 60, 110, 160, 210, 260])
    assert frames  # files were written where the datalist says


@pytest.mark.parametrize(
    "problem, message",
    [
        ("one_frame", "has 1 frame"),
        ("labels_off_grid", "not on the image grid"),
        ("nan", "NaN"),
        ("huge_label", "values up to"),
        ("truncated", "cannot be read"),
    ],
)
def test_bad_cases_are_named(tmp_path, problem, message):
    image = np.random.rand(24, 20, 4).astype(np.float32)
    labels = labels_2d()
    if problem == "one_frame":
        image = image[:, :, :1]
    elif problem == "labels_off_grid":
        labels = labels_2d((20, 20))
    elif problem == "nan":
        image[3, 3, 1] = np.nan
    elif problem == "huge_label":
        labels = labels.astype(np.float32)
        labels[0, 0] = 1e6
    save(tmp_path / "x_cine.nii.gz", image)
    save(tmp_path / "x_ED_gt.nii.gz", labels)
    if problem == "truncated":
        data = (tmp_path / "x_cine.nii.gz").read_bytes()
        (tmp_path / "x_cine.nii.gz").write_bytes(data[: len(data) // 2])
    item = collect_cases(str(tmp_path))[0]
    with pytest.raises(CaseError, match=message) as error:
        load_case(item)
    assert "x_" in str(error.value)  # the file is named


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        collect_cases(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="no <case>_ED_gt"):
        collect_cases(str(tmp_path))
    with pytest.raises(DatasetError, match="no input"):
        collect_cases(None)
