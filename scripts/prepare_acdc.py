"""Prepare ACDC cine-MRI for the AdaCS bundle: 2D ED->ES short-axis slice pairs, 128 x 128 (method doc §8).

Inputs (either layout, detected automatically):

* the official release: ``<root>/patientNNN/Info.cfg`` (``ED: n``, ``ES: n``, ``Group: ...``) with
  ``patientNNN_frameFF.nii.gz`` and ``patientNNN_frameFF_gt.nii.gz`` (spacing read from the NIfTI header);
* the HDF5 layout of ``../shared/data/acdc``: ``patientNNN_frameFF.h5`` with ``image`` / ``label`` (axes z, y, x)
  and an optional ``pairs.csv`` naming the ED/ES files (without it the lower frame number is ED). These files
  carry **no spacing**: it is written as unknown (identity affine, ``"spacing_mm": null``).

Every slice of the ED/ES volumes becomes one pair ``patientNNN_sliceZZ``; slices without myocardium are kept
(the paper's evaluation drops them). The crop is 128 x 128 at native resolution, centred on the centroid of
the ED myocardium (label 2) of the middle slice, the same centre for every slice and both frames, zero padded.
Labels keep ACDC's values (1 RV, 2 myocardium, 3 LV cavity). Images are written as stored (the bundle scales
each image min-max at load time, as the paper).

Example:
    python scripts/prepare_acdc.py --source ../shared/data/acdc --out /work/prepared/acdc --val-patients 5 --test-patients 10

Bad input (a folder in neither layout, a patient missing a frame or label, an unreadable file) is named in a
message and skipped; the exit status is 1 only when nothing usable was found.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from _prep_common import PairSlices, Report, crop_or_pad, finish, split_patients, write_datalist, write_pair

MYOCARDIUM = 2
_H5_NAME = re.compile(r"^(?P<patient>patient\d+)_frame(?P<frame>\d+)\.h5$")


class Volume:
    """ED/ES volumes of one patient in NIfTI axis order (x, y, z)."""

    def __init__(self, patient: str, group: str | None, ed, es, ed_gt, es_gt, spacing, source: str) -> None:
        self.patient, self.group, self.source = patient, group, source
        self.ed, self.es, self.ed_gt, self.es_gt = ed, es, ed_gt, es_gt
        self.spacing = spacing


def read_info_cfg(path: Path) -> dict[str, str]:
    """``key: value`` lines of an ACDC Info.cfg."""
    info = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def detect_layout(root: Path) -> str:
    """'official' (patient folders with Info.cfg), 'hdf5' (patientNNN_frameFF.h5 files) or SystemExit."""
    if not root.is_dir():
        raise SystemExit(f"error: {root}: folder does not exist.")
    if any(_H5_NAME.match(p.name) for p in root.iterdir()):
        return "hdf5"
    if any(p.is_dir() and p.name.startswith("patient") for p in root.iterdir()):
        return "official"
    raise SystemExit(
        f"error: {root}: not an ACDC folder: expected patientNNN/Info.cfg folders (official release) "
        "or patientNNN_frameFF.h5 files (HDF5 layout)."
    )


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    image = nib.load(str(path))
    zooms = image.header.get_zooms()
    return np.asarray(image.dataobj), (float(zooms[0]), float(zooms[1]))


def iter_official(root: Path, report: Report) -> Iterator[Volume]:
    """Patients of the official layout; problems are reported and the patient skipped."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        info_path = folder / "Info.cfg"
        if not info_path.is_file():
            report.skip(folder, "no Info.cfg (not an ACDC patient folder)")
            continue
        try:
            info = read_info_cfg(info_path)
            ed_frame, es_frame = int(info["ED"]), int(info["ES"])
        except (OSError, KeyError, ValueError) as error:
            report.skip(info_path, f"cannot read ED/ES frame numbers ({type(error).__name__}: {error})")
            continue
        files = {}
        for key, frame, suffix in (("ed", ed_frame, ""), ("es", es_frame, ""), ("ed_gt", ed_frame, "_gt"), ("es_gt", es_frame, "_gt")):
            candidates = [folder / f"{folder.name}_frame{frame:02d}{suffix}.nii{ext}" for ext in (".gz", "")]
            files[key] = next((c for c in candidates if c.is_file()), candidates[0])
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            report.skip(folder, "missing " + ", ".join(missing))
            continue
        try:
            arrays = {key: _load_nifti(path) for key, path in files.items()}
        except Exception as error:  # nibabel raises several types for corrupt files
            report.skip(folder, f"unreadable NIfTI ({type(error).__name__}: {error})")
            continue
        yield Volume(
            folder.name, info.get("Group"), arrays["ed"][0], arrays["es"][0], arrays["ed_gt"][0], arrays["es_gt"][0],
            arrays["ed"][1], str(folder),
        )


def _h5_pairs(root: Path, report: Report) -> list[tuple[str, str | None, Path, Path]]:
    """(patient, group, ED file, ES file) from pairs.csv, else lower frame number = ED."""
    csv_path = root / "pairs.csv"
    if csv_path.is_file():
        with csv_path.open() as handle:
            return [(r["patient"], r.get("group"), root / r["ed_file"], root / r["es_file"]) for r in csv.DictReader(handle)]
    frames: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(root.iterdir()):
        match = _H5_NAME.match(path.name)
        if match:
            frames.setdefault(match["patient"], []).append((int(match["frame"]), path))
    pairs = []
    for patient, found in sorted(frames.items()):
        if len(found) != 2:
            report.skip(root / patient, f"expected 2 frame files (ED and ES), found {len(found)}: {[p.name for _, p in found]}")
            continue
        found.sort()
        pairs.append((patient, None, found[0][1], found[1][1]))
    return pairs


def iter_hdf5(root: Path, report: Report) -> Iterator[Volume]:
    """Patients of the HDF5 layout (no spacing in the files)."""
    import h5py

    for patient, group, ed_file, es_file in _h5_pairs(root, report):
        arrays = {}
        try:
            for frame, path in (("ed", ed_file), ("es", es_file)):
                if not path.is_file():
                    raise FileNotFoundError(f"{path} does not exist")
                with h5py.File(path, "r") as handle:
                    if "image" not in handle or "label" not in handle:
                        raise KeyError(f"{path} has no 'image' and 'label' datasets (found {list(handle)})")
                    # (z, y, x) -> (x, y, z), the official NIfTI's axis order
                    arrays[frame] = np.asarray(handle["image"][:]).transpose(2, 1, 0)
                    arrays[frame + "_gt"] = np.asarray(handle["label"][:]).transpose(2, 1, 0)
        except Exception as error:  # missing file, not HDF5, missing keys
            report.skip(root / patient, f"{type(error).__name__}: {error}")
            continue
        yield Volume(patient, group, arrays["ed"], arrays["es"], arrays["ed_gt"], arrays["es_gt"], None, str(root))


def crop_centre(ed_gt: np.ndarray) -> tuple[tuple[int, int], str]:
    """Centroid (x, y) of the ED myocardium in the middle slice; falls back to the whole volume, then the image
    centre. Returns the centre and how it was found."""
    middle = ed_gt[..., ed_gt.shape[2] // 2] == MYOCARDIUM
    if middle.any():
        rows, cols = np.nonzero(middle)
        return (int(round(rows.mean())), int(round(cols.mean()))), "middle-slice ED myocardium"
    volume = ed_gt == MYOCARDIUM
    if volume.any():
        rows, cols, _ = np.nonzero(volume)
        return (int(round(rows.mean())), int(round(cols.mean()))), "ED myocardium of all slices (middle slice empty)"
    return (ed_gt.shape[0] // 2, ed_gt.shape[1] // 2), "image centre (no ED myocardium)"


def volume_to_pairs(volume: Volume, size: int, report: Report) -> tuple[list[PairSlices], dict]:
    """2D pairs of one patient and its metadata entry (empty list when the volumes do not match)."""
    shapes = {k: getattr(volume, k).shape for k in ("ed", "es", "ed_gt", "es_gt")}
    if len(set(shapes.values())) != 1 or len(shapes["ed"]) != 3:
        report.skip(volume.source + "/" + volume.patient, f"ED/ES images and labels must be 3D with one shape, got {shapes}")
        return [], {}
    centre, how = crop_centre(volume.ed_gt)
    pairs = []
    for z in range(volume.ed.shape[2]):
        crop = lambda a: crop_or_pad(a[..., z], centre, size)  # noqa: E731
        pairs.append(PairSlices(
            case=f"{volume.patient}_slice{z:02d}", patient=volume.patient,
            ed=crop(volume.ed).astype(np.float32), es=crop(volume.es).astype(np.float32),
            ed_gt=np.rint(crop(volume.ed_gt)).astype(np.uint8), es_gt=np.rint(crop(volume.es_gt)).astype(np.uint8),
            spacing=volume.spacing,
        ))
    meta = {
        "group": volume.group, "source": volume.source, "slices": volume.ed.shape[2],
        "native_shape_xyz": list(volume.ed.shape), "crop_centre_xy": list(centre), "crop_centre_from": how,
        "spacing_mm": list(volume.spacing) if volume.spacing else None,
    }
    return pairs, meta


def prepare(
    sources: list[tuple[Path, bool]], out_dir: Path, size: int, num_val: int, num_test: int, seed: int, fold: int = 0
) -> int:
    """Prepare every source (path, all_testing) into ``out_dir``; returns the exit status."""
    report = Report()
    out_dir.mkdir(parents=True, exist_ok=True)
    items, patients_meta, groups, forced_test = [], {}, {}, set()
    for root, all_testing in sources:
        layout = detect_layout(root)
        volumes = iter_official(root, report) if layout == "official" else iter_hdf5(root, report)
        for volume in volumes:
            pairs, meta = volume_to_pairs(volume, size, report)
            if not pairs:
                continue
            if volume.patient in patients_meta:
                report.skip(root / volume.patient, "patient already prepared from another source")
                continue
            for pair in pairs:
                items.append(write_pair(pair, out_dir))
                report.written += 1
            patients_meta[volume.patient] = {**meta, "layout": layout}
            groups[volume.patient] = volume.group or "unknown"
            if all_testing:
                forced_test.add(volume.patient)
    datalist = None
    if items:
        free = [p for p in patients_meta if p not in forced_test]
        sections = split_patients(free, groups, num_val, 0 if forced_test else num_test, seed, 0 if forced_test else fold)
        sections.update({p: "testing" for p in forced_test})
        for patient, section in sections.items():
            patients_meta[patient]["section"] = section
        spacing_known = all(m["spacing_mm"] for m in patients_meta.values())
        metadata = {
            "dataset": "ACDC", "image_size": [size, size], "frames": "ED (moving) -> ES (fixed)",
            "labels": {"0": "background", "1": "RV", "2": "myocardium", "3": "LV cavity"},
            "spacing": "from the NIfTI headers (mm, native in-plane resolution, no resampling)" if spacing_known else
            "unknown for patients with spacing_mm null (HDF5 layout carries no geometry): distances are in pixels",
            "split": {s: sorted(p for p, v in sections.items() if v == s) for s in ("training", "validation", "testing")},
            "seed": seed, "fold": fold, "patients": patients_meta, "skipped": report.skipped,
        }
        datalist = write_datalist(out_dir, items, sections, metadata)
    return finish(report, out_dir, datalist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="ACDC folder (official layout or HDF5 layout)")
    parser.add_argument("--test-source", type=Path, default=None,
                        help="optional second ACDC folder whose patients all go to 'testing' (e.g. the official testing set)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside the repository)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--val-patients", type=int, default=5)
    parser.add_argument("--test-patients", type=int, default=10, help="held-out patients of --source (0 with --test-source)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", type=int, default=0,
                        help="cross-validation fold: test on the fold-th block of --test-patients patients "
                             "(0 = the plain split; ACDC's 50 patients in blocks of 10 give folds 0-4)")
    args = parser.parse_args(argv)
    sources = [(args.source, False)] + ([(args.test_source, True)] if args.test_source else [])
    return prepare(sources, args.out, args.size, args.val_patients, args.test_patients, args.seed, args.fold)


if __name__ == "__main__":
    sys.exit(main())
