"""Prepare CAMUS echocardiography for the AdaCS bundle: 2D ED->ES pairs (2CH and 4CH) resized to 128 x 128 (§8).

Inputs (either layout, detected automatically):

* the official NIfTI release: ``<root>/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}.nii.gz`` and ``..._gt.nii.gz``
  (also accepted flat in ``<root>``). The spacing comes from the header; the written spacing is the native
  spacing scaled by the resize factor of each axis (the resize does not keep the aspect ratio, as the paper);
* the NumPy layout of ``../shared/data/camus`` (float images in [0, 1], labels resized linearly and therefore
  rounded with ``np.rint``) and ``../shared/data/camus_train`` (uint8 images, divided by 255; uint8 labels):
  ``patientNNNN_{2CH,4CH}_{ED,ES}[_gt].npy``. These carry **no spacing** (written as unknown).

Each patient gives up to two pairs ``patientNNNN_2CH`` / ``patientNNNN_4CH``. Images are resized bilinearly with
anti-aliasing (as ``skimage.transform.resize``), labels (0 background, 1 LV cavity, 2 myocardium, 3 left atrium)
by nearest neighbour.

Example (train on camus_train with 15 validation patients; every patient of camus is a test patient):
    python scripts/prepare_camus.py --source ../shared/data/camus_train --test-source ../shared/data/camus \\
        --out /work/prepared/camus --val-patients 15

Bad input (a folder in neither layout, a view missing a frame or label, an unreadable file) is named and
skipped; the exit status is 1 only when nothing usable was found.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from _prep_common import PairSlices, Report, finish, resize_image, resize_label, split_patients, write_datalist, write_pair

_NAME = re.compile(r"^(?P<patient>patient\d+)_(?P<view>2CH|4CH)_(?P<phase>ED|ES)(?P<gt>_gt)?\.(?P<ext>npy|nii\.gz|nii)$")
KEYS = {("ED", False): "ed", ("ES", False): "es", ("ED", True): "ed_gt", ("ES", True): "es_gt"}


def find_views(root: Path) -> tuple[str, dict[tuple[str, str], dict[str, Path]]]:
    """Layout ('nifti' or 'numpy') and {(patient, view): {ed, es, ed_gt, es_gt: path}} of a CAMUS folder."""
    if not root.is_dir():
        raise SystemExit(f"error: {root}: folder does not exist.")
    candidates = list(root.iterdir())
    for sub in [p for p in candidates if p.is_dir()]:
        candidates.extend(sub.iterdir())
    views: dict[tuple[str, str], dict[str, Path]] = {}
    layouts = set()
    for path in sorted(candidates):
        match = _NAME.match(path.name)
        if match:
            layouts.add("numpy" if match["ext"] == "npy" else "nifti")
            views.setdefault((match["patient"], match["view"]), {})[KEYS[match["phase"], bool(match["gt"])]] = path
    if not views:
        raise SystemExit(
            f"error: {root}: not a CAMUS folder: expected patientNNNN_{{2CH,4CH}}_{{ED,ES}}[_gt].nii.gz "
            "(official release, flat or in patientNNNN/ folders) or the same names as .npy (NumPy layout)."
        )
    if len(layouts) > 1:
        raise SystemExit(f"error: {root}: mixes .npy and NIfTI files; give one layout per folder.")
    return layouts.pop(), views


def _read(path: Path, is_label: bool) -> tuple[np.ndarray, tuple[float, float] | None]:
    """2D array (x, y) in [0, 1] (images) or integer labels, and the spacing (None for .npy)."""
    if path.suffix == ".npy":
        array = np.load(path)
        spacing = None
    else:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj)
        zooms = image.header.get_zooms()
        spacing = (float(zooms[0]), float(zooms[1]))
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"{path} is not a 2D image (shape {array.shape})")
    if is_label:
        return np.rint(array).astype(np.uint8), spacing
    if array.dtype == np.uint8 and path.suffix == ".npy":  # camus_train stores images as uint8 (x 255)
        return array.astype(np.float32) / 255.0, spacing
    return array.astype(np.float32), spacing


def iter_pairs(root: Path, size: int, report: Report) -> Iterator[tuple[PairSlices, dict]]:
    """Resized pairs of a CAMUS folder with their metadata; incomplete or unreadable views are skipped."""
    layout, views = find_views(root)
    for (patient, view), files in sorted(views.items()):
        missing = [k for k in ("ed", "es", "ed_gt", "es_gt") if k not in files]
        if missing:
            names = {"ed": "ED", "es": "ES", "ed_gt": "ED_gt", "es_gt": "ES_gt"}
            report.skip(root / f"{patient}_{view}", "missing " + ", ".join(names[k] for k in missing))
            continue
        try:
            arrays = {k: _read(p, k.endswith("_gt")) for k, p in files.items()}
        except Exception as error:  # numpy / nibabel raise several types for corrupt files
            report.skip(root / f"{patient}_{view}", f"unreadable file ({type(error).__name__}: {error})")
            continue
        shapes = {k: a.shape for k, (a, _) in arrays.items()}
        if len(set(shapes.values())) != 1:
            report.skip(root / f"{patient}_{view}", f"ED/ES images and labels differ in shape: {shapes}")
            continue
        native = arrays["ed"][0].shape
        spacing = arrays["ed"][1]
        new_spacing = (spacing[0] * native[0] / size, spacing[1] * native[1] / size) if spacing else None
        pair = PairSlices(
            case=f"{patient}_{view}", patient=patient,
            ed=resize_image(arrays["ed"][0], size), es=resize_image(arrays["es"][0], size),
            ed_gt=resize_label(arrays["ed_gt"][0], size), es_gt=resize_label(arrays["es_gt"][0], size),
            spacing=new_spacing,
        )
        yield pair, {"layout": layout, "source": str(root), "native_shape_xy": list(native),
                     "native_spacing_mm": list(spacing) if spacing else None,
                     "spacing_mm": list(new_spacing) if new_spacing else None}


def prepare(sources: list[tuple[Path, bool]], out_dir: Path, size: int, num_val: int, num_test: int, seed: int) -> int:
    """Prepare every source (path, all_testing) into ``out_dir``; returns the exit status."""
    report = Report()
    out_dir.mkdir(parents=True, exist_ok=True)
    items, cases_meta, patient_source, forced_test = [], {}, {}, set()
    for root, all_testing in sources:
        for pair, meta in iter_pairs(root, size, report):
            if patient_source.get(pair.patient, root) != root:
                report.skip(root / pair.case, "patient already prepared from another source")
                continue
            patient_source[pair.patient] = root
            items.append(write_pair(pair, out_dir))
            cases_meta[pair.case] = meta
            report.written += 1
            if all_testing:
                forced_test.add(pair.patient)
    datalist = None
    if items:
        free = sorted({p for p in patient_source if p not in forced_test})
        sections = split_patients(free, None, num_val, 0 if forced_test else num_test, seed) if free else {}
        sections.update({p: "testing" for p in forced_test})
        spacing_known = all(m["spacing_mm"] for m in cases_meta.values())
        metadata = {
            "dataset": "CAMUS", "image_size": [size, size], "frames": "ED (moving) -> ES (fixed), views 2CH and 4CH",
            "labels": {"0": "background", "1": "LV cavity", "2": "myocardium", "3": "left atrium"},
            "resize": "images bilinear with anti-aliasing, labels nearest; aspect ratio not kept (as the paper)",
            "spacing": "native spacing x resize factor per axis (mm)" if spacing_known else
            "unknown for cases with spacing_mm null (NumPy layout carries no geometry and was resized anisotropically): distances are in pixels",
            "split": {s: sorted(p for p, v in sections.items() if v == s) for s in ("training", "validation", "testing")},
            "seed": seed, "cases": cases_meta, "skipped": report.skipped,
        }
        datalist = write_datalist(out_dir, items, sections, metadata)
    return finish(report, out_dir, datalist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="CAMUS folder (official NIfTI or NumPy layout)")
    parser.add_argument("--test-source", type=Path, default=None, help="optional CAMUS folder whose patients all go to 'testing'")
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside the repository)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--val-patients", type=int, default=15)
    parser.add_argument("--test-patients", type=int, default=0, help="held-out patients of --source (ignored with --test-source)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sources = [(args.source, False)] + ([(args.test_source, True)] if args.test_source else [])
    return prepare(sources, args.out, args.size, args.val_patients, args.test_patients, args.seed)


if __name__ == "__main__":
    sys.exit(main())
