"""The inference reference: fixed phantom inputs and a compact snapshot of what ``configs/inference.yaml`` writes.

The reference is the engine ``inference.yaml`` ran before issue 28 item 1 (``registration_io.PairRegistrationRunner``,
its own loop), taken from the repository's history (:data:`ENGINE_BEFORE`, extracted with ``git archive``) and run on
the inputs of :func:`make_inputs` with the shipped weights (``models/model.pt``, ``scoring_model.pt``,
``--score_map true``); nothing is stored. :func:`snapshot` gives every output file's name, array and geometry (NIfTI
affine, zooms and intent; ITK origin, spacing and direction) and ``summary.csv`` (without times), for both engines.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
ENGINE_BEFORE = "2e79116cc10a6c657940148ca27c331085825f88"  # the last commit whose inference.yaml ran the old loop
TIMING_COLUMNS = ("time_s",)


def _oblique(spacing: tuple[float, float, float]) -> np.ndarray:
    """A double-oblique affine (rotation about x 10, y 20, z 30 degrees) with ``spacing`` and an offset origin."""
    def rot(axis: int, degrees: float) -> np.ndarray:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    affine = np.eye(4)
    affine[:3, :3] = rot(2, 30) @ rot(1, 20) @ rot(0, 10) @ np.diag(spacing)
    affine[:3, 3] = [12.5, -30.25, 7.0]
    return affine


def make_inputs(folder: Path) -> Path:
    """The reference inputs in ``folder/pairs`` from ``scripts/make_phantom_nifti.py`` folders (phantom only):

    * ``flat2d``: a 2D 80 x 80 pair with both labels, as make_phantom_nifti writes it (1.5 mm);
    * ``oneslice``: a one-slice 64 x 52 x 1 pair (cropped phantom), double oblique, moving label only;
    * ``stack``: a 3D 56 x 48 x 3 stack of three phantom pairs' slices, 1.25 x 1.25 x 8 mm, double oblique, labels;
    * ``lonely``: an ED frame without its ES partner (fails by name).
    """
    raw80, raw64, pairs = folder / "raw80", folder / "raw64", folder / "pairs"
    tool = str(REPO / "scripts" / "make_phantom_nifti.py")
    for out, size, count, first in ((raw80, 80, 2, 300000), (raw64, 64, 3, 300010)):
        subprocess.run([sys.executable, tool, "--out", str(out), "--num-pairs", str(count), "--size", str(size),
                        "--first-index", str(first), "--mode", "cine"], check=True, capture_output=True)
    pairs.mkdir(parents=True, exist_ok=True)
    for frame in ("ED", "ES", "ED_gt", "ES_gt"):
        shutil.copyfile(raw80 / f"phantom300000_{frame}.nii.gz", pairs / f"flat2d_{frame}.nii.gz")

    def load(path: Path) -> np.ndarray:
        return np.asarray(nib.load(str(path)).dataobj)

    one = _oblique((1.4, 1.1, 6.0))
    for frame in ("ED", "ES", "ED_gt"):
        array = load(raw80 / f"phantom300001_{frame}.nii.gz")[8:72, 14:66, None]
        nib.save(nib.Nifti1Image(array, one), str(pairs / f"oneslice_{frame}.nii.gz"))
    stack = _oblique((1.25, 1.25, 8.0))
    for frame in ("ED", "ES", "ED_gt", "ES_gt"):
        slices = [load(raw64 / f"phantom{300010 + k:06d}_{frame}.nii.gz")[4:60, 8:56] for k in range(3)]
        nib.save(nib.Nifti1Image(np.stack(slices, -1), stack), str(pairs / f"stack_{frame}.nii.gz"))
    shutil.copyfile(raw80 / "phantom300001_ED.nii.gz", pairs / "lonely_ED.nii.gz")
    return pairs


def bundle_before(folder: Path) -> Path | None:
    """The bundle folder of :data:`ENGINE_BEFORE`, extracted into ``folder``; ``None`` without git or that commit
    (a copy of the repository without its history)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ENGINE_BEFORE, "bundle"], capture_output=True)
    if archive.returncode != 0:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder / "bundle"


def run_cli(pairs: Path, out: Path, *extra: str, bundle: Path = BUNDLE) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/inference.yaml`` from ``bundle`` on ``pairs``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
               "--dataset_dir", str(pairs), "--output_dir", str(out), "--score_map", "true", "--progress", "false",
               *extra]
    return subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)


def snapshot(out: Path, inputs: Path) -> dict[str, np.ndarray]:
    """Every output file of ``out`` as arrays: ``<name>|array`` and its geometry; ``summary`` as JSON (paths of
    ``inputs`` written as ``<in>``, times dropped)."""
    import itk

    data: dict[str, np.ndarray] = {}
    names = sorted(p.name for p in out.iterdir())
    data["files"] = np.array(names)
    for name in names:
        path = out / name
        if name == "summary.csv":
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                rows = [{k: v.replace(str(inputs), "<in>") for k, v in row.items() if k not in TIMING_COLUMNS}
                        for row in reader]
                data["summary_columns"] = np.array(reader.fieldnames)
            data["summary"] = np.array(json.dumps(rows))
            continue
        if "_ddf_itk" in name:
            image = itk.imread(str(path))
            data[f"{name}|array"] = np.asarray(itk.array_from_image(image), np.float32)
            data[f"{name}|origin"] = np.asarray(image.GetOrigin(), np.float64)
            data[f"{name}|spacing"] = np.asarray(image.GetSpacing(), np.float64)
            data[f"{name}|direction"] = np.asarray(itk.array_from_matrix(image.GetDirection()), np.float64)
            if name.endswith(".nrrd"):
                continue
        image = nib.load(str(path))
        if "_ddf_itk" not in name:
            data[f"{name}|array"] = np.asarray(image.dataobj)
        data[f"{name}|affine"] = np.asarray(image.affine, np.float64)
        data[f"{name}|zooms"] = np.asarray(image.header.get_zooms(), np.float64)
        data[f"{name}|intent"] = np.array(image.header.get_intent()[0])
        data[f"{name}|dtype"] = np.array(str(image.get_data_dtype()))
    return data
