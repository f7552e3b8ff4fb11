"""Shared helpers of ``prepare_acdc.py`` and ``prepare_camus.py`` (imported from the same folder; not a package).

Output of a preparation (one flat folder, outside the repository):

* ``<case>_ED.nii.gz`` / ``<case>_ES.nii.gz`` (float32 images) and ``<case>_ED_gt.nii.gz`` / ``<case>_ES_gt.nii.gz``
  (uint8 labels), 2D, 128 x 128, the bundle's naming rule (``bundle/scripts/data.py``);
* ``datalist.json`` with ``training`` / ``validation`` / ``testing`` sections (patient-level split; paths relative
  to the folder) and a ``metadata`` section (source, layout, spacing per patient or "unknown", what was skipped).
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

SECTIONS = ("training", "validation", "testing")


@dataclass
class PairSlices:
    """One 2D ED->ES pair ready to write: arrays in NIfTI (x, y) axis order."""

    case: str
    patient: str
    ed: np.ndarray
    es: np.ndarray
    ed_gt: np.ndarray
    es_gt: np.ndarray
    spacing: tuple[float, float] | None  # mm per pixel of the written grid, None when unknown


@dataclass
class Report:
    """What a preparation wrote and skipped (each skip names the file or folder and the reason)."""

    skipped: list[str] = field(default_factory=list)
    written: int = 0

    def skip(self, what: str | Path, reason: str) -> None:
        message = f"{what}: {reason}"
        self.skipped.append(message)
        print(f"skipped: {message}", file=sys.stderr)


def crop_or_pad(array: np.ndarray, centre: Sequence[int], size: int = 128) -> np.ndarray:
    """``size`` x ``size`` window of a 2D array centred on ``centre`` (row, col), zero padded outside the image.

    ``centre`` is used as Python ints (no uint8 wrap-around, unlike the reference preprocessing).
    """
    out = np.zeros((size, size), dtype=array.dtype)
    c0, c1 = int(centre[0]), int(centre[1])
    start0, start1 = c0 - size // 2, c1 - size // 2
    src0 = slice(max(start0, 0), min(start0 + size, array.shape[0]))
    src1 = slice(max(start1, 0), min(start1 + size, array.shape[1]))
    if src0.start >= src0.stop or src1.start >= src1.stop:
        return out
    out[src0.start - start0 : src0.stop - start0, src1.start - start1 : src1.stop - start1] = array[src0, src1]
    return out


def resize_image(array: np.ndarray, size: int = 128) -> np.ndarray:
    """Bilinear resize with anti-aliasing (as ``skimage.transform.resize`` in the reference), float32."""
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def resize_label(array: np.ndarray, size: int = 128) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map, uint8."""
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    return out[0, 0].numpy().round().astype(np.uint8)


def save_nifti(array: np.ndarray, path: Path, spacing: tuple[float, float] | None) -> None:
    """2D NIfTI with the in-plane spacing in the affine (identity and a 'spacing unknown' note when None)."""
    affine = np.diag([*(spacing or (1.0, 1.0)), 1.0, 1.0])
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"spacing mm" if spacing else b"spacing unknown (identity affine)"
    nib.save(image, str(path))


def write_pair(pair: PairSlices, out_dir: Path) -> dict[str, str]:
    """Write the four files of a pair; returns its datalist item (paths relative to ``out_dir``)."""
    names = {
        "moving": f"{pair.case}_ED.nii.gz",
        "fixed": f"{pair.case}_ES.nii.gz",
        "moving_label": f"{pair.case}_ED_gt.nii.gz",
        "fixed_label": f"{pair.case}_ES_gt.nii.gz",
    }
    save_nifti(pair.ed.astype(np.float32), out_dir / names["moving"], pair.spacing)
    save_nifti(pair.es.astype(np.float32), out_dir / names["fixed"], pair.spacing)
    save_nifti(pair.ed_gt.astype(np.uint8), out_dir / names["moving_label"], pair.spacing)
    save_nifti(pair.es_gt.astype(np.uint8), out_dir / names["fixed_label"], pair.spacing)
    return {**names, "case": pair.case, "patient": pair.patient}


def split_patients(
    patients: Sequence[str], groups: dict[str, str] | None, num_val: int, num_test: int, seed: int = 0, fold: int = 0
) -> dict[str, str]:
    """Patient -> section. Shuffled (seeded) within each group and dealt round-robin over the groups, so the
    validation and test parts are stratified by group when groups are known. ``fold`` k takes the test part from
    the k-th block of ``num_test`` patients of that order (the validation part follows it, wrapping round), so
    folds 0, 1, ... of one seed test disjoint patients: a cross-validation. Fold 0 is the plain split."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(patients):
        by_group[(groups or {}).get(patient, "all")].append(patient)
    rng = random.Random(seed)
    order: list[str] = []
    queues = []
    for name in sorted(by_group):
        members = by_group[name][:]
        rng.shuffle(members)
        queues.append(members)
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    if num_val + num_test >= len(order):
        raise SystemExit(
            f"error: {len(order)} patients cannot give {num_val} validation + {num_test} test patients and keep some for training."
        )
    if fold:
        folds = -(-len(order) // num_test) if num_test > 0 else 1  # blocks of num_test patients, the last one partial
        if not 0 <= fold < folds:
            raise SystemExit(f"error: fold {fold} does not exist: {len(order)} patients in blocks of {num_test} test "
                             f"patients give folds 0-{folds - 1}.")
        start = fold * num_test
        order = order[start:] + order[:start]
    sections = {}
    for i, patient in enumerate(order):
        sections[patient] = "testing" if i < num_test else "validation" if i < num_test + num_val else "training"
    return sections


def write_datalist(
    out_dir: Path, items: Iterable[dict], sections: dict[str, str], metadata: dict
) -> Path:
    """``datalist.json`` with the three sections (empty ones kept) and ``metadata``."""
    content: dict = {name: [] for name in SECTIONS}
    for item in items:
        content[sections[item["patient"]]].append(item)
    content["metadata"] = metadata
    path = out_dir / "datalist.json"
    path.write_text(json.dumps(content, indent=1))
    return path


def finish(report: Report, out_dir: Path, datalist: Path | None) -> int:
    """Print the summary; exit status 1 when nothing usable was written."""
    print(f"wrote {report.written} pairs to {out_dir}" + (f"; datalist {datalist}" if datalist else ""))
    if report.skipped:
        print(f"skipped {len(report.skipped)} item(s):")
        for line in report.skipped:
            print(f"  {line}")
    if report.written == 0:
        print("error: nothing usable was found; no dataset written.", file=sys.stderr)
        return 1
    return 0
