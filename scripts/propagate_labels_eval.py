"""Dice of ED labels propagated to ES by the bundle's inference path, on real pairs, against undeformed.

    python scripts/propagate_labels_eval.py [--data ../shared/data] [--datasets camus sunnybrook mnms2 acdc]
        [--ckpt bundle/models/model.pt] [--ckpt-echo bundle/models/model_echo.pt] [--max-pairs N] [--keep DIR]

Each dataset is converted to temporary NIfTI pairs by the bundle's naming rule (``<case>_ED/_ES[_gt].nii.gz``, in a
temporary folder that is deleted afterwards, never in the repository), registered by
``scripts.inference_engine.register_folder`` (``configs/inference.yaml``, run in-process) and summarised:

* CAMUS (``camus/``, echo, 2D 224 x 224 ``.npy``, nibabel (x, y) axes, spacing unknown -> 1 mm; labels
  ``np.rint``: 1 LV cavity, 2 myocardium, 3 left atrium); uses ``--ckpt-echo`` when that file exists;
* Sunnybrook (``sunnybrook/``, cine MRI, 2D DICOM slices read with ITK (spacing from the tags), expert i-contours
  rasterised (pixel centres inside the polygon) -> 1 LV cavity);
* M&Ms-2 (``mnms2/``, the NIfTI files as they are, with their true spacing: the short-axis 3D stack goes through
  the 3D (slice-by-slice) path, the long-axis slice through the one-slice path; 1 LV, 2 myocardium, 3 RV);
* ACDC (``acdc/``, optional, HDF5 (z, y, x) stacks without spacing -> identity affine; 1 RV, 2 myocardium, 3 LV).

Dice per structure is averaged over pairs (3D stacks count once, Dice over the whole stack).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from _bundle import BUNDLE, REPO, import_bundle

import_bundle()
from scripts.networks import DiffeomorphicVoxelMorph  # noqa: E402
from scripts.inference_engine import register_folder  # noqa: E402

STRUCTURES = {
    "camus": {1: "LV", 2: "MYO", 3: "LA"},
    "sunnybrook": {1: "LV"},
    "mnms2": {1: "LV", 2: "MYO", 3: "RV"},
    "acdc": {1: "RV", 2: "MYO", 3: "LV"},
}
ECHO = {"camus"}


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def convert_camus(root: Path, out: Path, max_pairs: int | None) -> int:
    rows = list(csv.DictReader(open(root / "pairs.csv")))[:max_pairs]
    for row in rows:
        case = f"{row['patient']}_{row['view']}"
        for phase, image_key, gt_key in (("ED", "ed_image", "ed_gt"), ("ES", "es_image", "es_gt")):
            _save(out / f"{case}_{phase}.nii.gz", np.load(root / row[image_key]).astype(np.float32), np.eye(4))
            _save(out / f"{case}_{phase}_gt.nii.gz", np.rint(np.load(root / row[gt_key])).astype(np.uint8), np.eye(4))
    return len(rows)


def polygon_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels (row, col) whose centre lies inside the polygon ``points`` (x = column, y = row), even-odd rule."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    x, y = cols.ravel().astype(np.float64), rows.ravel().astype(np.float64)
    inside = np.zeros(x.shape, bool)
    px, py = points[:, 0], points[:, 1]
    qx, qy = np.roll(px, 1), np.roll(py, 1)
    for x0, y0, x1, y1 in zip(px, py, qx, qy):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside.reshape(shape)


def convert_sunnybrook(root: Path, out: Path, max_pairs: int | None) -> int:
    import itk

    rows = list(csv.DictReader(open(root / "pairs.csv")))[:max_pairs]
    for row in rows:
        case = f"{row['patient_id']}_z{float(row['slice_location']):+08.2f}".replace("+", "p").replace("-", "m")
        for phase, dicom_key, contour_key in (("ED", "ed_dicom", "ed_icontour"), ("ES", "es_dicom", "es_icontour")):
            image = itk.imread(str(root / row[dicom_key]), itk.F)
            array = itk.array_from_image(image).astype(np.float32).reshape(image.shape[-2:])  # (row, col)
            spacing = [float(s) for s in row["pixel_spacing_mm"].split()]
            affine = np.diag([spacing[0], spacing[1], float(row["slice_thickness_mm"]), 1.0])
            points = np.loadtxt(root / row[contour_key], ndmin=2)
            _save(out / f"{case}_{phase}.nii.gz", array, affine)
            _save(out / f"{case}_{phase}_gt.nii.gz", polygon_mask(points, array.shape).astype(np.uint8), affine)
    return len(rows)


def convert_mnms2(root: Path, out: Path, max_pairs: int | None) -> int:
    rows = list(csv.DictReader(open(root / "pairs.csv")))[:max_pairs]
    for row in rows:
        for key in ("ed_image", "ed_gt", "es_image", "es_gt"):
            shutil.copy(root / row[key], out / Path(row[key]).name)  # true spacing and orientation kept
    return len(rows)


def convert_acdc(root: Path, out: Path, max_pairs: int | None) -> int:
    import h5py

    patients: dict[str, list[Path]] = {}
    for path in sorted(root.glob("patient*_frame*.h5")):
        patients.setdefault(path.name.split("_")[0], []).append(path)
    cases = sorted(patients.items())[:max_pairs]
    for patient, frames in cases:
        ed, es = sorted(frames, key=lambda p: int(p.stem.split("frame")[1]))[:2]  # lower frame number is ED
        for phase, path in (("ED", ed), ("ES", es)):
            with h5py.File(path) as handle:
                image = np.transpose(handle["image"][:], (2, 1, 0)).astype(np.float32)  # (z, y, x) -> (x, y, z)
                label = np.transpose(handle["label"][:], (2, 1, 0)).astype(np.uint8)
            _save(out / f"{patient}_{phase}.nii.gz", image, np.eye(4))  # spacing not stored in these files
            _save(out / f"{patient}_{phase}_gt.nii.gz", label, np.eye(4))
    return len(cases)


CONVERTERS = {"camus": convert_camus, "sunnybrook": convert_sunnybrook, "mnms2": convert_mnms2, "acdc": convert_acdc}


def _network(ckpt: Path) -> DiffeomorphicVoxelMorph:
    net = DiffeomorphicVoxelMorph()
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return net.eval()


def evaluate(dataset: str, data_root: Path, ckpt: Path, work: Path, max_pairs: int | None) -> list[dict]:
    """Convert, register with the bundle's inference engine, return the summary rows."""
    pairs = work / dataset / "pairs"
    pairs.mkdir(parents=True)
    CONVERTERS[dataset](data_root / dataset, pairs, max_pairs)
    return register_folder(pairs, work / dataset / "out", _network(ckpt), write_itk=False, exit_on_failure=False)


def _per_class(text: str) -> dict[int, float]:
    return {int(k): float(v) for k, v in (item.split(":") for item in text.split(";") if item)}


def table(dataset: str, rows: list[dict], weights: str) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok" and r.get("dice_per_class")]
    lines = []
    failed = [r["case"] for r in rows if r["status"] != "ok"]
    if failed:
        lines.append(f"{dataset}: FAILED cases {failed}")
    for value, name in STRUCTURES[dataset].items():
        after = [_per_class(r["dice_per_class"]).get(value) for r in ok]
        before = [_per_class(r["dice_undeformed_per_class"]).get(value) for r in ok]
        paired = [(b, a) for b, a in zip(before, after) if a is not None and b is not None]
        if not paired:
            continue
        b, a = zip(*paired)
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(f"| {dataset} | {len(paired)} | {name} | {statistics.mean(b):.3f} ± {sd(b):.3f} | "
                     f"{statistics.mean(a):.3f} ± {sd(a):.3f} | {statistics.mean(a) - statistics.mean(b):+.3f} | "
                     f"{statistics.mean(float(r['folding_pct']) for r in ok):.3f} | {weights} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=["camus", "sunnybrook", "mnms2"], choices=list(CONVERTERS))
    parser.add_argument("--ckpt", default=str(BUNDLE / "models" / "model.pt"), help="weights for cine MRI")
    parser.add_argument("--ckpt-echo", default=str(BUNDLE / "models" / "model_echo.pt"),
                        help="weights for echo (CAMUS); --ckpt when this file is absent")
    parser.add_argument("--max-pairs", type=int, default=None, help="first N pairs (cases) of each dataset")
    parser.add_argument("--keep", default=None, help="keep the converted pairs and outputs in this folder")
    args = parser.parse_args(argv)
    data_root = Path(args.data)
    if not data_root.is_dir():
        print(f"error: {data_root} does not exist (real data lives in ../shared/data next to the repository)")
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="adacs_propagate_"))
    lines = ["| dataset | pairs | structure | Dice undeformed | Dice registered | gain | folding % | weights |",
             "|---|---|---|---|---|---|---|---|"]
    all_rows = {}
    try:
        for dataset in args.datasets:
            if not (data_root / dataset).is_dir():
                print(f"skipping {dataset}: {data_root / dataset} is absent")
                continue
            ckpt = Path(args.ckpt_echo) if dataset in ECHO and Path(args.ckpt_echo).is_file() else Path(args.ckpt)
            if not ckpt.is_file():
                print(f"error: {ckpt}: weights not found (train first, or pass --ckpt)")
                return 2
            rows = evaluate(dataset, data_root, ckpt, work, args.max_pairs)
            all_rows[dataset] = rows
            lines += table(dataset, rows, ckpt.name if ckpt.parent == BUNDLE / "models" else str(ckpt))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    failed = any(r["status"] != "ok" for rows in all_rows.values() for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
