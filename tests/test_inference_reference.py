"""Issue 28 item 1: folder inference runs through a MONAI ``Evaluator`` (``scripts/inference_engine.py``) and writes
what the engine before it wrote (that engine's bundle taken from the repository's history and run beside it, see
``tests/inference_reference.py``).

The fixed phantom inputs (a 2D 80 x 80 pair with labels, a double-oblique one-slice 64 x 52 x 1 file, a
double-oblique 56 x 48 x 3 stack at 1.25 x 1.25 x 8 mm, a case without its ES frame) are regenerated and registered
by ``python -m monai.bundle run --config_file configs/inference.yaml`` with the shipped weights and the score map;
then: the same file names, the same geometry (NIfTI affines, zooms, intents and dtypes; ITK origin, spacing and
direction), fields equal to 1e-5, warped images close, labels equal, and ``summary.csv`` with the same columns,
status, errors, outputs, Dice and folding percentage.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference_reference import ENGINE_BEFORE, bundle_before, make_inputs, run_cli, snapshot

pytest.importorskip("itk")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(today's run, its snapshot, the engine-before's snapshot) on the same inputs."""
    root = tmp_path_factory.mktemp("reference")
    before = bundle_before(root / "before")
    if before is None:
        pytest.skip(f"commit {ENGINE_BEFORE[:7]} (the engine before) is not in this copy's git history")
    pairs = make_inputs(root)
    old = run_cli(pairs, root / "out_before", bundle=before)
    assert old.returncode == 1 and "3 of 4 pairs registered" in old.stdout, old.stderr[-3000:]
    done = run_cli(pairs, root / "out")
    return done, snapshot(root / "out", pairs), snapshot(root / "out_before", pairs)


@pytest.fixture(scope="module")
def outputs(runs):
    return runs[0], runs[1]


@pytest.fixture(scope="module")
def reference(runs):
    return runs[2]


def test_the_reference_covers_every_kind_of_case(reference):
    assert {name.split("_")[0] for name in reference["files"]} == {"flat2d", "oneslice", "stack", "summary.csv"}


def test_same_files_geometry_fields_images_labels(outputs, reference):
    done, got = outputs
    assert done.returncode == 1, done.stderr[-3000:]  # the case without its ES frame fails, the others finish
    assert "Traceback" not in done.stdout + done.stderr
    assert "3 of 4 pairs registered" in done.stdout and "FAILED: lonely" in done.stdout
    assert list(got["files"]) == list(reference["files"])
    assert sorted(got) == sorted(list(reference))
    for key in list(reference):
        if key.startswith("summary") or key == "files":
            continue
        expected, actual = reference[key], got[key]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
        if key.endswith(("|affine", "|zooms", "|origin", "|spacing", "|direction")):
            np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0, err_msg=key)
        elif key.endswith(("|intent", "|dtype")) or "_warped_gt" in key:
            np.testing.assert_array_equal(actual, expected, err_msg=key)
        elif "_ddf" in key:
            np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0, err_msg=key)
        else:  # warped image (intensities up to ~1) and score map in (0, 1)
            np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0, err_msg=key)


def test_same_summary(outputs, reference):
    _, got = outputs
    assert list(got["summary_columns"]) == list(reference["summary_columns"])
    expected, actual = json.loads(str(reference["summary"])), json.loads(str(got["summary"]))
    assert [r["case"] for r in actual] == [r["case"] for r in expected]
    for want, have in zip(expected, actual):
        for column, value in want.items():
            if column in ("dice", "dice_undeformed", "folding_pct") and value:
                assert float(have[column]) == pytest.approx(float(value), abs=1e-4), (want["case"], column)
            elif column.endswith("per_class") and value:
                pairs = [item.split(":") for item in value.split(";")]
                have_pairs = [item.split(":") for item in have[column].split(";")]
                assert [k for k, _ in have_pairs] == [k for k, _ in pairs]
                np.testing.assert_allclose([float(v) for _, v in have_pairs], [float(v) for _, v in pairs], atol=1e-4)
            else:
                assert have[column] == value, (want["case"], column)
