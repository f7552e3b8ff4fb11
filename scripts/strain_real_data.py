"""Myocardial strain of the bundle's strain workflow on real data (ACDC, CAMUS, Sunnybrook), summarised and checked.

    python scripts/strain_real_data.py --dataset acdc|camus|sunnybrook [--data ../shared/data] [--out DIR]
        [--ckpt FILE] [--tracking direct sequential drift_corrected] [--cases NAME ...] [--max-cases N]
        [--keep DIR] [--no-figures]

The dataset is converted to temporary NIfTI cases (a temporary folder outside the repository, deleted afterwards
unless ``--keep``), :class:`scripts.strain_workflow.StrainWorkflow` runs on them with the settings of
``configs/strain.yaml`` (cine MRI, ``models/model.pt``) or ``configs/strain.yaml`` + ``configs/strain_echo.yaml``
(CAMUS, ``models/model_echo.pt``), and ``--out`` (default ``../strain_runs/<dataset>``, outside the repository) gets
``report.md`` (printed too), ``cases.csv`` (one row per case) and the workflow's own outputs (``workflow/``).

* **acdc**: ED/ES pairs of 50 patients with ES labels (``pairs.csv``: group, ED = lower frame); identity affine
  (the h5 files carry no spacing; in-plane strain is a ratio of lengths and ACDC pixels are square, so it does not
  need the spacing). Global radial / circumferential strain per pathology group against DeepStrain's NOR values,
  ejection fraction from the labels, strain-EF correlations, Dice of the tracked ED labels at ES, AHA fallbacks.
* **camus**: 2CH / 4CH ED/ES pairs (224 x 224, ``np.rint`` labels, optionally the largest connected component per
  class); GLS of the mid-wall contour (engineering) and pixel-wise global longitudinal strain, against the
  fractional area change of the LV cavity and the healthy GLS range.
* **sunnybrook**: the 15 mid-ventricular 20-frame cines (``cines.csv``) with the expert ED contours (i-contour = LV
  cavity, o-contour = epicardium) and ES i-contours; for each tracking mode the LV-cavity Dice at ES of the ED
  contour carried through the cycle, paired comparisons, cycle drift, global strain at ES and time to peak.

The exit status is 2 when the data folder is absent, 1 when a case failed, else 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

from _bundle import BUNDLE, REPO, import_bundle
from propagate_labels_eval import _save, polygon_mask  # the shared converters' building blocks

import_bundle()

DATASETS = ("acdc", "camus", "sunnybrook")
TRACKING_MODES = ("direct", "sequential", "drift_corrected")
ACDC_GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
ACDC_STRUCTURES = ("rv", "myo", "lv")
CAMUS_VIEWS = ("2CH", "4CH")
ECHO_CODES = {"lv": 1, "myo": 2, "la": 3}  # CAMUS, as configs/strain_echo.yaml
CAVITY, MYOCARDIUM = 3, 2  # short-axis codes (ACDC's, used for Sunnybrook too); CAMUS: cavity 1, myocardium 2
# DeepStrain (Morales et al. 2021), ACDC NOR patients 061-080, ED->ES, Green strain, fractions: (mean, SD, n)
DEEPSTRAIN_NOR = {"global_radial_green": (0.245, 0.030, 20), "global_circumferential_green": (-0.178, 0.016, 20)}
HEALTHY_GLS = (-0.20, -0.159, -0.221)  # echo GLS meta-analysis: mean, range (engineering, fractions)
SAX_STRAIN = ("global_radial_green", "global_radial_engineering", "global_circumferential_green",
              "global_circumferential_engineering")
LAX_STRAIN = ("gls_midwall_engineering", "global_longitudinal_green", "global_longitudinal_engineering",
              "global_transverse_green")


# ================================================================================================== converters
def largest_components(label: np.ndarray, classes: Iterable[int]) -> tuple[np.ndarray, int]:
    """Keep the largest connected component (8-connected) of each class; the pixels of the other fragments take the
    label of the nearest kept pixel (so no holes open inside the myocardium). Returns (labels, pixels changed)."""
    keep = np.ones(label.shape, bool)
    for value in classes:
        components, count = ndimage.label(label == value, structure=np.ones((3,) * label.ndim))
        if count > 1:
            sizes = ndimage.sum_labels(np.ones(label.shape), components, index=np.arange(1, count + 1))
            keep &= ~((components > 0) & (components != 1 + int(np.argmax(sizes))))
    removed = int((~keep).sum())
    if not removed:
        return label, 0
    nearest = ndimage.distance_transform_edt(~keep, return_distances=False, return_indices=True)
    return label[tuple(nearest)], removed


def ejection_fraction(ed_labels: np.ndarray, es_labels: np.ndarray, cavity: int) -> float:
    """1 - (ES cavity voxels) / (ED cavity voxels): the volume EF of a stack (equal slice thickness) or the
    fractional area change of one slice."""
    ed = float((ed_labels == cavity).sum())
    return 1.0 - float((es_labels == cavity).sum()) / ed if ed else float("nan")


def equivalent_circle_strain(ed_labels: np.ndarray, es_labels: np.ndarray, myo: int, cavity: int) -> dict[str, float]:
    """Registration-free reference from the labels of a short-axis stack (slices on the last axis): per slice, the
    cavity and the cavity + myocardium as circles of the same area (radii r_endo, r_epi); wall thickness
    r_epi - r_endo and mid-wall radius (r_endo + r_epi) / 2 at ES over ED - 1, averaged over the slices with both
    structures at both phases weighted by the ED myocardial area (engineering strain; a slice holds other tissue at
    ES than at ED through-plane, so this is a geometric reference, not tissue tracking)."""
    radial, circ, weights = [], [], []
    for k in range(ed_labels.shape[-1]):
        areas = [((lab[..., k] == cavity).sum(), (lab[..., k] == myo).sum()) for lab in (ed_labels, es_labels)]
        if min(a for pair in areas for a in pair) == 0:
            continue
        (cav_ed, myo_ed), (cav_es, myo_es) = areas
        r_ed = np.sqrt(cav_ed / np.pi), np.sqrt((cav_ed + myo_ed) / np.pi)
        r_es = np.sqrt(cav_es / np.pi), np.sqrt((cav_es + myo_es) / np.pi)
        radial.append((r_es[1] - r_es[0]) / (r_ed[1] - r_ed[0]) - 1.0)
        circ.append((r_es[0] + r_es[1]) / (r_ed[0] + r_ed[1]) - 1.0)
        weights.append(myo_ed)
    if not weights:
        return {"label_radial_engineering": float("nan"), "label_circumferential_engineering": float("nan")}
    return {"label_radial_engineering": float(np.average(radial, weights=weights)),
            "label_circumferential_engineering": float(np.average(circ, weights=weights))}


def midwall_length_change(ed_labels: np.ndarray, es_labels: np.ndarray, codes: dict[str, int]) -> float:
    """Registration-free echo GLS reference: length of the ES labels' mid-wall line over the ED labels' - 1
    (``myocardium.midwall_contour``, 1 mm pixels; NaN when a line is not found)."""
    from scripts import myocardium

    try:
        lengths = [myocardium._length_mm(myocardium.midwall_contour(lab, (1.0, 1.0), codes), (1.0, 1.0))
                   for lab in (ed_labels, es_labels)]
    except ValueError:
        return float("nan")
    return lengths[1] / lengths[0] - 1.0


def _selected(name: str, cases: Sequence[str] | None) -> bool:
    return not cases or any(name == c or name.startswith(f"{c}_") for c in cases)


def convert_acdc(root: Path, out: Path, cases: Sequence[str] | None = None, max_cases: int | None = None) -> list[dict]:
    """``acdc/pairs.csv`` patients -> ``<patient>_ED/_ES[_gt].nii.gz`` in ``out`` ((z, y, x) -> (x, y, z), identity
    affine: no spacing in the h5 files). Returns per case: case, group, frames, shape, the volume EF of the labels
    and the label-geometry strain reference."""
    import h5py

    rows = [r for r in csv.DictReader(open(root / "pairs.csv")) if _selected(r["patient"], cases)][:max_cases]
    meta = []
    for row in rows:
        arrays = {}
        for phase, key in (("ED", "ed_file"), ("ES", "es_file")):
            with h5py.File(root / row[key], "r") as handle:
                arrays[phase] = np.transpose(handle["image"][:], (2, 1, 0)).astype(np.float32)
                arrays[f"{phase}_gt"] = np.transpose(handle["label"][:], (2, 1, 0)).astype(np.uint8)
        for name, array in arrays.items():
            _save(out / f"{row['patient']}_{name}.nii.gz", array, np.eye(4))
        meta.append({"case": row["patient"], "group": row["group"], "ed_frame": int(row["ed_frame"]),
                     "es_frame": int(row["es_frame"]), "shape_xyz": "x".join(map(str, arrays["ED"].shape)),
                     "myo_slices": int((arrays["ED_gt"] == MYOCARDIUM).any(axis=(0, 1)).sum()),
                     "ef_volume": ejection_fraction(arrays["ED_gt"], arrays["ES_gt"], CAVITY),
                     **equivalent_circle_strain(arrays["ED_gt"], arrays["ES_gt"], MYOCARDIUM, CAVITY)})
    return meta


def convert_camus(root: Path, out: Path, cases: Sequence[str] | None = None, max_cases: int | None = None,
                  keep_largest: bool = True) -> list[dict]:
    """``camus/pairs.csv`` -> ``<patient>_<view>_ED/_ES[_gt].nii.gz`` (224 x 224 in nibabel's (x, y) axes, identity
    affine: the resize lost the spacing); labels ``np.rint`` and, with ``keep_largest``, the largest connected
    component per class. Returns per case: case, patient, view, area-based EF (FAC) and pixels cleaned."""
    rows = [r for r in csv.DictReader(open(root / "pairs.csv"))
            if _selected(f"{r['patient']}_{r['view']}", cases)][:max_cases]
    meta = []
    for row in rows:
        case = f"{row['patient']}_{row['view']}"
        labels, cleaned = {}, 0
        for phase, image_key, gt_key in (("ED", "ed_image", "ed_gt"), ("ES", "es_image", "es_gt")):
            label = np.rint(np.load(root / row[gt_key])).astype(np.uint8)
            if keep_largest:
                label, changed = largest_components(label, (1, 2, 3))
                cleaned += changed
            labels[phase] = label
            _save(out / f"{case}_{phase}.nii.gz", np.load(root / row[image_key]).astype(np.float32), np.eye(4))
            _save(out / f"{case}_{phase}_gt.nii.gz", label, np.eye(4))
        meta.append({"case": case, "patient": row["patient"], "view": row["view"], "fragment_pixels": cleaned,
                     "fac_labels": ejection_fraction(labels["ED"], labels["ES"], 1),
                     "gls_labels_midwall": midwall_length_change(labels["ED"], labels["ES"], ECHO_CODES)})
    return meta


def read_dicom(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM slice with ITK: ``(rows, cols)`` float32 and its NIfTI (RAS) affine for those array axes (axis 0 =
    ITK index j (rows), axis 1 = index i (columns), axis 2 = the slice normal), from the DICOM position, direction
    cosines and spacing. With this real (oblique) affine ``myocardium.sax_segments`` takes anterior and patient
    right from the patient geometry instead of the array-axis convention of the stored ACDC data (whose axis 0 is
    x = columns: the transpose of these arrays)."""
    import itk

    image = itk.imread(str(path), itk.F)
    array = itk.array_from_image(image).astype(np.float32).reshape(image.shape[-2:])  # (row, col)
    spacing = np.asarray(image.GetSpacing(), np.float64)  # ITK order: x = column, y = row (, z)
    direction = np.asarray(image.GetDirection(), np.float64)  # LPS, columns = index axes i, j (, k)
    origin = np.asarray(image.GetOrigin(), np.float64)
    dims = direction.shape[0]
    columns = [direction[:, 1] * spacing[1], direction[:, 0] * spacing[0]]  # array axis 0 = j, axis 1 = i
    columns.append(direction[:, 2] * spacing[2] if dims == 3 else np.zeros(3))
    affine = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine[:3, :3] = lps_to_ras @ np.stack([np.resize(c, 3) for c in columns], 1)
    affine[:3, 3] = lps_to_ras @ np.resize(origin, 3)
    if dims < 3:  # a 2D image: no slice normal given
        affine[:3, 2] = np.cross(affine[:3, 0], affine[:3, 1]) / (spacing[0] * spacing[1])
    return array, affine


def affine_spacing(affine: np.ndarray) -> tuple[float, float]:
    """Pixel size (mm) along array axes 0 and 1 of an affine."""
    return tuple(float(np.linalg.norm(np.asarray(affine)[:3, i])) for i in range(2))


def contour_labels(icontour: np.ndarray, ocontour: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """Short-axis labels from expert contours ((x = column, y = row) points): inside the i-contour = LV cavity (3),
    inside the o-contour but not the i-contour = myocardium (2); no RV."""
    cavity = polygon_mask(np.asarray(icontour, np.float64), shape)
    label = np.zeros(shape, np.uint8)
    if ocontour is not None:
        label[polygon_mask(np.asarray(ocontour, np.float64), shape) & ~cavity] = MYOCARDIUM
    label[cavity] = CAVITY
    return label


EPICARDIUM_COVER = 0.95  # Sunnybrook: fraction of the i-contour's pixels inside the o-contour for a usable myocardium


def sunnybrook_case_name(patient: str, location: float) -> str:
    return f"{patient}_z{location:+08.2f}".replace("+", "p").replace("-", "m")


def convert_sunnybrook(root: Path, out: Path, cases: Sequence[str] | None = None,
                       max_cases: int | None = None) -> list[dict]:
    """``sunnybrook/cines.csv`` slices -> per-frame 2D NIfTI files (``<case>_tNN.nii.gz``, the DICOM geometry as a RAS
    affine: spacing, position and direction cosines; see ``read_dicom``),
    ED labels from the ED i/o-contours and the ES LV cavity from the ES i-contour (``pairs.csv`` rows matched by the
    DICOM path); writes ``datalist.json`` (``testing``: cine list, moving_label, ed/es index, trigger_ms). Returns per
    case: case, patient, files and the area EF of the contours."""
    contours = {r["ed_dicom"]: r for r in csv.DictReader(open(root / "pairs.csv"))}
    items, meta = [], []
    for row in csv.DictReader(open(root / "cines.csv")):
        case = sunnybrook_case_name(row["patient_id"], float(row["slice_location"]))
        if not _selected(case, cases) and not _selected(row["patient_id"], cases):
            continue
        if max_cases is not None and len(items) >= max_cases:
            break
        pair = contours.get(row["ed_dicom"])
        if pair is None or pair["es_dicom"] != row["es_dicom"]:
            raise SystemExit(f"error: {root / 'cines.csv'}: no pairs.csv contours for {row['ed_dicom']} / "
                             f"{row['es_dicom']}")
        frames = []
        for t, name in enumerate(row["frames"].split()):
            array, affine = read_dicom(root / name)
            frames.append(out / f"{case}_t{t:02d}.nii.gz")
            _save(frames[-1], array, affine)
        shape, spacing = array.shape, affine_spacing(affine)
        icontour = np.loadtxt(root / pair["ed_icontour"], ndmin=2)
        ocontour = np.loadtxt(root / pair["ed_ocontour"], ndmin=2) if pair["ed_ocontour"] else None
        cover = float("nan")
        if ocontour is not None:  # does the epicardium contour enclose the cavity contour?
            inside = polygon_mask(icontour.astype(np.float64), shape)
            cover = float((inside & polygon_mask(ocontour.astype(np.float64), shape)).sum() / max(inside.sum(), 1))
        ed_gt = contour_labels(icontour, ocontour, shape)
        es_gt = contour_labels(np.loadtxt(root / pair["es_icontour"], ndmin=2), None, shape)
        _save(out / f"{case}_ED_gt.nii.gz", ed_gt, affine)
        _save(out / f"{case}_ES_gt.nii.gz", es_gt, affine)
        ed_index, es_index = int(row["ed_index"]), int(row["es_index"])
        items.append({"case": case, "cine": [str(p) for p in frames], "moving_label": str(out / f"{case}_ED_gt.nii.gz"),
                      "ed_index": ed_index, "es_index": es_index,
                      "trigger_ms": [float(v) for v in row["trigger_ms"].split()]})
        meta.append({"case": case, "patient": row["patient_id"], "slice_location": float(row["slice_location"]),
                     "ed_index": ed_index, "es_index": es_index, "n_frames": len(frames),
                     "spacing_mm": "x".join(f"{s:g}" for s in spacing),
                     "has_epicardium": ocontour is not None, "epicardium_cover": cover,
                     "epicardium_ok": bool(ocontour is not None and cover >= EPICARDIUM_COVER),
                     "es_gt": str(out / f"{case}_ES_gt.nii.gz"),
                     "ed_gt": str(out / f"{case}_ED_gt.nii.gz"), "fac_labels": ejection_fraction(ed_gt, es_gt, CAVITY)})
    (out / "datalist.json").write_text(json.dumps({"testing": items}, indent=1))
    return meta


CONVERTERS: dict[str, Callable[..., list[dict]]] = {"acdc": convert_acdc, "camus": convert_camus,
                                                    "sunnybrook": convert_sunnybrook}


# ================================================================================================== statistics
def _values(rows: Sequence[dict], key: str) -> np.ndarray:
    out = []
    for row in rows:
        try:
            out.append(float(row.get(key, "nan")))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return np.asarray(out, np.float64)


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample SD (0 for one value) and count of the finite values."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt(mean: float, sd: float | None = None, scale: float = 100.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text if sd is None or not math.isfinite(sd) else f"{text} ± {sd * scale:.{digits}f}"


def group_table(rows: Sequence[dict], group_key: str, groups: Sequence[str], columns: dict[str, str],
                scale: float = 100.0, digits: int = 1, total: str | None = "all") -> list[str]:
    """Markdown table: one line per group (and ``total``), ``mean ± SD`` of each column (``key -> header``)."""
    lines = [f"| {group_key} | n | " + " | ".join(columns.values()) + " |", "|---|---" + "|---" * len(columns) + "|"]
    selections = [(g, [r for r in rows if r.get(group_key) == g]) for g in groups]
    if total:
        selections.append((total, list(rows)))
    for name, chosen in selections:
        if not chosen:
            continue
        cells = [fmt(*mean_sd(_values(chosen, key))[:2], scale=scale, digits=digits) for key in columns]
        lines.append(f"| {name} | {len(chosen)} | " + " | ".join(cells) + " |")
    return lines


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson r and Spearman rho with their two-sided p-values over the pairs where both values are finite."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"n": n, "pearson_r": float("nan"), "pearson_p": float("nan"), "spearman_rho": float("nan"),
                "spearman_p": float("nan")}
    pearson = stats.pearsonr(x[ok], y[ok])
    spearman = stats.spearmanr(x[ok], y[ok])
    return {"n": n, "pearson_r": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
            "spearman_rho": float(spearman.statistic), "spearman_p": float(spearman.pvalue)}


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of a - b over the pairs where both are finite, with ``scipy.stats.ttest_rel`` (t, two-sided p)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    diff = a[ok] - b[ok]
    if n < 2 or np.all(diff == diff[0]):
        return {"n": n, "mean_diff": float(diff.mean()) if n else float("nan"), "sd_diff": 0.0 if n else float("nan"),
                "t": float("nan"), "p": float("nan")}
    test = stats.ttest_rel(a[ok], b[ok])
    return {"n": n, "mean_diff": float(diff.mean()), "sd_diff": float(diff.std(ddof=1)), "t": float(test.statistic),
            "p": float(test.pvalue)}


def correlation_lines(rows: Sequence[dict], pairs: Sequence[tuple[str, str, str]]) -> list[str]:
    """Markdown table of ``correlation`` for (x key, y key, label) pairs."""
    lines = ["| correlation | n | Pearson r | p | Spearman rho | p |", "|---|---|---|---|---|---|"]
    for x_key, y_key, label in pairs:
        c = correlation(_values(rows, x_key), _values(rows, y_key))
        lines.append(f"| {label} | {c['n']} | {c['pearson_r']:.2f} | {_p(c['pearson_p'])} | {c['spearman_rho']:.2f} | "
                     f"{_p(c['spearman_p'])} |")
    return lines


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


_SLICE_NOTE = re.compile(r"^slice (\d+):", re.IGNORECASE)
_FALLBACK = re.compile(r"no (slice has )?RV contact|fall(s|ing)?[ -]?back|fell back|fallback", re.IGNORECASE)


def fallback_slices(notes: str, slices: int) -> dict[str, int]:
    """AHA fallbacks named in a case's notes (``myocardium.sax_segments``: "slice k: no RV contact; AHA origin from
    slice j", "no slice has RV contact: AHA origin from the image axes", "slice k: ... ambiguous"): the number of
    slices whose origin is not their own RV insertion (``slices`` when no slice has RV contact) and of the
    ambiguous ones."""
    fallback: set[int] = set()
    ambiguous: set[int] = set()
    whole = False
    last = None  # the summary joins notes with "; ", which also splits a note in two: a part without
    for note in filter(None, (n.strip() for n in str(notes or "").split(";"))):  # "slice k:" continues the last
        match = _SLICE_NOTE.match(note)
        last = int(match.group(1)) if match else last
        if _FALLBACK.search(note):
            if match:
                fallback.add(last)
            elif "no slice" in note.lower():
                whole = True
        elif "ambiguous" in note.lower() and last is not None:
            ambiguous.add(last)
    return {"aha_fallback_slices": slices if whole else len(fallback), "aha_ambiguous_slices": len(ambiguous)}


def note_kinds(rows: Sequence[dict]) -> list[str]:
    """The notes of the cases by kind (numbers replaced by k; the summary's "; " also splits a note in parts), with
    how many times and in how many cases each occurs."""
    counts: dict[str, list[int]] = {}
    for row in rows:
        kinds = [re.sub(r"-?\d+(\.\d+)?", "k", n.strip()) for n in str(row.get("notes", "")).split(";") if n.strip()]
        for kind in set(kinds):
            counts.setdefault(kind, [0, 0])[1] += 1
        for kind in kinds:
            counts[kind][0] += 1
    if not counts:
        return []
    return ["", "Notes of the cases, by kind (times / cases):", ""] + [
        f"- {kind} ({n} / {c})" for kind, (n, c) in sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))]


def time_line(rows: Sequence[dict], total_s: float, convert_s: float) -> str:
    m, sd, n = mean_sd(_values(rows, "time_s"))
    modes = " (summed over the tracking modes)" if rows and "direct_time_s" in rows[0] else ""
    return (f"Wall-clock time per case{modes} (workflow: tracking, strain, outputs"
            f"{', figures' if rows and rows[0].get('figures') else ''}): "
            f"{m:.2f} ± {sd:.2f} s over {n} cases (min {np.nanmin(_values(rows, 'time_s')):.2f}, "
            f"max {np.nanmax(_values(rows, 'time_s')):.2f}); conversion {convert_s:.1f} s; whole run {total_s:.1f} s "
            f"(CPU, torch threads {_threads()}).")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ================================================================================================== engine
def bundle_settings(echo: bool) -> dict[str, Any]:
    """The strain settings of the shipped configs (``strain.yaml``, + ``strain_echo.yaml`` for echo) and the network."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    files = [BUNDLE / "configs" / "strain.yaml"] + ([BUNDLE / "configs" / "strain_echo.yaml"] if echo else [])
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(BUNDLE)
    keys = ("labels", "view", "directions", "lagrangian", "image_size", "roi_size", "segment_options", "ckpt_path",
            "batch_size")
    settings = {k: parser.get_parsed_content(k) for k in keys}
    settings["network"] = parser.get_parsed_content("network_def")
    return settings


def run_workflow(settings: dict[str, Any], output_dir: Path, ckpt: Path, tracking: str, figures: bool,
                 dataset_dir: Path | None = None, datalist: Path | None = None) -> list[dict]:
    """``StrainWorkflow`` on a folder or datalist; rows of ``strain_summary.csv`` (failed cases included)."""
    from scripts.strain_workflow import StrainWorkflow

    workflow = StrainWorkflow(
        str(dataset_dir) if dataset_dir else None, settings["network"], output_dir, ckpt_path=str(ckpt),
        datalist=str(datalist) if datalist else None, labels=settings["labels"], view=settings["view"],
        directions=settings["directions"], tracking=tracking, lagrangian=settings["lagrangian"],
        image_size=settings["image_size"], roi_size=settings["roi_size"], segment_options=settings["segment_options"],
        figures=figures, device="cpu", batch_size=settings["batch_size"], progress=False, exit_on_failure=False,
        overwrite=True)  # the tool regenerates its outputs
    return workflow.run()


def _merge(meta: Sequence[dict], rows: Sequence[dict], prefix: str = "") -> list[dict]:
    by_case = {r["case"]: r for r in rows}
    merged = []
    for m in meta:
        row = dict(m)
        for key, value in by_case.get(m["case"], {"status": "missing"}).items():
            if key != "case":  # the converter's keys win ("view" is 2CH / 4CH there, the workflow's is long_axis)
                row[f"workflow_{key}" if not prefix and key in m else f"{prefix}{key}"] = value
        merged.append(row)
    return merged


def _failures(rows: Sequence[dict], prefix: str = "") -> list[str]:
    return [f"{r['case']}: {r.get(prefix + 'error', '')}" for r in rows if r.get(f"{prefix}status") != "ok"]


# ---------------------------------------------------------------------------------------------------------- acdc
def segment_values(case_dir: Path, keys: Sequence[str] = ("radial_green", "circumferential_green")) -> dict[str, float]:
    """The AHA segment values at ES of one case from the workflow's ``strain.csv`` (``seg<NN>_<key>``) and the
    number of segments found (``segments_found``); empty when the file is absent (failed case)."""
    path = case_dir / "strain.csv"
    if not path.is_file():
        return {}
    out: dict[str, float] = {}
    for row in csv.DictReader(open(path)):
        if row["region"].isdigit():
            for key in keys:
                out[f"seg{int(row['region']):02d}_{key}"] = float(row[f"{key}_es"])
    out["segments_found"] = len({k[3:5] for k in out})
    return out


def through_plane_sensitivity(case_dir: Path, ed_gt: Path, es_gt: Path, myo: int = MYOCARDIUM,
                              keys: Sequence[str] = ("radial_green", "circumferential_green")) -> dict[str, float]:
    """Slices whose ES labels hold no myocardium although the ED labels do (the base moved out of the slice:
    through-plane motion a 2D registration cannot follow), and the global strain at ES without them
    (``global_<key>_es_myo_slices``: mean over the ED myocardium of the other slices, from the workflow's maps)."""
    ed = np.asarray(nib.load(str(ed_gt)).dataobj) == myo  # (X, Y, Z)
    es = np.asarray(nib.load(str(es_gt)).dataobj) == myo
    lost = ed.any(axis=(0, 1)) & ~es.any(axis=(0, 1))
    out: dict[str, float] = {"slices_without_es_myo": int(lost.sum())}
    region = ed & ~lost[None, None, :]
    for key in keys:
        path = case_dir / f"strain_{key}.nii.gz"
        if not path.is_file():
            continue
        values = np.asarray(nib.load(str(path)).dataobj)
        if region.any():
            out[f"global_{key}_es_myo_slices"] = float(values[region].mean())
        if lost.any():
            out[f"{key}_lost_slices"] = float(values[ed & lost[None, None, :]].mean())
    return out


def segment_table(rows: Sequence[dict], groups: Sequence[str]) -> list[str]:
    """AHA segments (rows) x groups: mean radial / circumferential Green strain at ES (%)."""
    names = {1: "basal anterior", 2: "basal anteroseptal", 3: "basal inferoseptal", 4: "basal inferior",
             5: "basal inferolateral", 6: "basal anterolateral", 13: "apical anterior", 14: "apical septal",
             15: "apical inferior", 16: "apical lateral"}
    for k in range(7, 13):
        names[k] = names[k - 6].replace("basal", "mid")
    chosen = {g: [r for r in rows if r.get("group") == g] for g in groups}
    lines = ["| segment | " + " | ".join(f"{g} radial / circ." for g in groups if chosen[g]) + " |",
             "|---|" + "---|" * sum(1 for g in groups if chosen[g])]
    for s in range(1, 17):
        cells = []
        for g in groups:
            if chosen[g]:
                radial = mean_sd(_values(chosen[g], f"seg{s:02d}_radial_green"))[0]
                circ = mean_sd(_values(chosen[g], f"seg{s:02d}_circumferential_green"))[0]
                cells.append(f"{fmt(radial, digits=0)} / {fmt(circ, digits=0)}")
        lines.append(f"| {s} {names[s]} | " + " | ".join(cells) + " |")
    return lines


def shipped_model_split(pairs_csv: Path) -> dict[str, str]:
    """Patient -> section (training / validation / testing) of the ACDC split the shipped ``models/model.pt`` was
    trained with (``prepare_acdc.py --val-patients 5 --test-patients 10``, seed 0, stratified by group; see
    ``docs/reports/real_data_setup.md``), recomputed with ``_prep_common.split_patients`` over the same 50 patients."""
    from _prep_common import split_patients

    groups = {r["patient"]: r["group"] for r in csv.DictReader(open(pairs_csv))}
    if len(groups) <= 15:  # not the 50 patients of ../shared/data/acdc (a test folder): no split to recompute
        return {}
    return split_patients(sorted(groups), groups, 5, 10, 0)


def report_acdc(rows: list[dict], shipped: bool = True) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = ["## ACDC: global strain ED -> ES per pathology group", "",
             f"{len(ok)} of {len(rows)} patients analysed (ED/ES pairs with ES labels; groups from `pairs.csv`). "
             "Strain in %, mean ± SD over patients; global = mean over the ED myocardium of every slice. "
             "The h5 files carry no spacing: identity affine (1 mm). In-plane strain does not need it: F = I + dU/dX "
             "is a ratio of lengths and ACDC pixels are square, so the unit cancels; volumes and EF are voxel counts.",
             ""]
    columns = {"global_radial_green": "radial Green", "global_circumferential_green": "circ. Green",
               "global_radial_engineering": "radial eng.", "global_circumferential_engineering": "circ. eng.",
               "ef_volume": "EF (labels) %", "ef_tracked": "EF (tracked) %"}
    lines += group_table(ok, "group", ACDC_GROUPS, columns)
    lines += ["", "Registration-free reference from the labels (engineering, %; equivalent circles of the ED and ES "
              "cavity and cavity + myocardium per slice: wall thickening and mid-wall radius change; geometric, not "
              "tissue tracking) beside the tracked engineering strain:", ""]
    lines += group_table(ok, "group", ACDC_GROUPS, {
        "label_radial_engineering": "radial, labels", "global_radial_engineering": "radial, tracked",
        "label_circumferential_engineering": "circ., labels", "global_circumferential_engineering": "circ., tracked"})
    lines += [""] + correlation_lines(ok, [
        ("global_radial_engineering", "label_radial_engineering", "radial eng.: tracked vs labels"),
        ("global_circumferential_engineering", "label_circumferential_engineering", "circ. eng.: tracked vs labels")])
    lines += ["", "### NOR against DeepStrain (Green strain, ED -> ES, %)", "",
              "| cohort | n | radial | circumferential |", "|---|---|---|---|"]
    nor = [r for r in ok if r["group"] == "NOR"]
    ours = {k: mean_sd(_values(nor, k)) for k in DEEPSTRAIN_NOR}
    lines.append(f"| this bundle, ACDC NOR 061-070 | {len(nor)} | " +
                 " | ".join(fmt(*ours[k][:2]) for k in DEEPSTRAIN_NOR) + " |")
    lines.append("| DeepStrain (published), ACDC NOR 061-080 | 20 | " +
                 " | ".join(fmt(m, s) for m, s, _ in DEEPSTRAIN_NOR.values()) + " |")
    diffs = []
    for key, (m, s, _) in DEEPSTRAIN_NOR.items():
        mine = ours[key][0]
        diffs.append(f"{key.split('_')[1]}: {100 * (mine - m):+.1f} points ({(mine - m) / s:+.1f} DeepStrain SDs)")
        within = np.abs(_values(nor, key) - m) <= 2 * s
        diffs[-1] += f", {int(within.sum())}/{len(nor)} of our NOR patients within DeepStrain's mean ± 2 SD"
    lines += ["", "Difference (ours - DeepStrain): " + "; ".join(diffs) + ". DeepStrain's NOR are patients 061-080; "
              "we have 061-070 (a subset of theirs, so no independent test is made).", ""]
    lost = _values(ok, "slices_without_es_myo")
    lines += [f"Through-plane motion: in {int(np.nansum(lost))} of {int(np.nansum(_values(ok, 'myo_slices')))} slices "
              f"with ED myocardium ({int(np.sum(lost > 0))} of {len(ok)} patients) the ES labels hold no myocardium: "
              "the base has moved out of the slice by ES and the slice shows the atria or the outflow tract, which "
              "a 2D registration cannot follow. Their own mean Green strain (over their ED myocardium, mean ± SD "
              "over the patients that have such slices): radial "
              f"{fmt(*mean_sd(_values(ok, 'radial_green_lost_slices'))[:2])} "
              f"%, circumferential {fmt(*mean_sd(_values(ok, 'circumferential_green_lost_slices'))[:2])} %. "
              "The global values above keep every ED myocardium pixel (as DeepStrain); without those "
              "slices (sensitivity, Green, %):", ""]
    lines += group_table(ok, "group", ACDC_GROUPS, {
        "global_radial_green": "radial, all slices", "global_radial_green_es_myo_slices": "radial, ES myo slices",
        "global_circumferential_green": "circ., all slices",
        "global_circumferential_green_es_myo_slices": "circ., ES myo slices"})
    lines += [""]
    if shipped and any(r.get("model_split") for r in ok):
        lines += ["### Patients the network was trained on, and the held-out ones", "",
                  "The shipped `models/model.pt` was trained (unsupervised, ED -> ES image pairs) on 35 of these 50 "
                  "patients and selected on 5 (`prepare_acdc.py` seed 0); 10 were held out (2 per group). Training "
                  "registered exactly these ED/ES pairs, so the seen patients may be optimistic. Green strain and "
                  "Dice at ES by split:", ""]
        lines += group_table(ok, "model_split", ("testing", "validation", "training"), {
            "global_radial_green": "radial Green %", "global_circumferential_green": "circ. Green %",
            "ef_volume": "EF labels %", "ef_tracked": "EF tracked %"}, total=None)
        lines += [""] + group_table(ok, "model_split", ("testing", "validation", "training"), {
            "dice_es_lv": "Dice LV", "dice_es_myo": "Dice MYO", "dice_es_rv": "Dice RV",
            "dice_es_lv_undeformed": "Dice LV undeformed"}, scale=1, digits=3, total=None)
        held = [r for r in ok if r.get("model_split") == "testing"]
        seen = [r for r in ok if r.get("model_split") != "testing"]
        lines += [""] + correlation_lines(held, [("global_circumferential_green", "ef_volume",
                                                  "circ. Green vs EF, held-out patients")])
        cells = []
        for key in ("global_radial_green", "global_circumferential_green", "dice_es_lv"):
            test = stats.mannwhitneyu(_values(held, key), _values(seen, key)) if held and seen else None
            cells.append(f"{key} p = {_p(float(test.pvalue)) if test else 'n/a'}")
        lines += ["", "Held-out vs seen (Mann-Whitney U, groups mixed, so only a coarse check): " + "; ".join(cells) +
                  ".", ""]
    lines += ["### Strain against ejection fraction (over all patients)", "",
              "EF from the labels: 1 - (ES LV-cavity voxels) / (ED LV-cavity voxels) over the stack.", ""]
    lines += correlation_lines(ok, [("global_circumferential_green", "ef_volume", "circ. Green vs EF"),
                                    ("global_circumferential_engineering", "ef_volume", "circ. eng. vs EF"),
                                    ("global_radial_green", "ef_volume", "radial Green vs EF"),
                                    ("global_radial_engineering", "ef_volume", "radial eng. vs EF")])
    lines += ["", "### Dice at ES of the ED labels carried to ES (registered) against the ES labels (undeformed: "
              "ED labels as they are)", "", "| structure | n | undeformed | registered | gain | paired t p |",
              "|---|---|---|---|---|---|"]
    for name in ACDC_STRUCTURES:
        before, after = _values(ok, f"dice_es_{name}_undeformed"), _values(ok, f"dice_es_{name}")
        test = paired_comparison(after, before)
        lines.append(f"| {name} | {test['n']} | {fmt(*mean_sd(before)[:2], scale=1, digits=3)} | "
                     f"{fmt(*mean_sd(after)[:2], scale=1, digits=3)} | {test['mean_diff']:+.3f} | {_p(test['p'])} |")
    lines += ["", "Registered Dice per group (LV cavity / myocardium / RV):", "",
              "| group | n | LV | MYO | RV |", "|---|---|---|---|---|"]
    for group in ACDC_GROUPS:
        chosen = [r for r in ok if r["group"] == group]
        if chosen:
            cells = [fmt(*mean_sd(_values(chosen, f"dice_es_{s}"))[:2], scale=1, digits=3) for s in ("lv", "myo", "rv")]
            lines.append(f"| {group} | {len(chosen)} | " + " | ".join(cells) + " |")
    fallbacks = [fallback_slices(r.get("notes", ""), int(r["myo_slices"])) for r in ok]
    for row, counts in zip(ok, fallbacks):
        row.update(counts)
    total_slices = int(np.nansum(_values(ok, "myo_slices")))
    slices = [f["aha_fallback_slices"] for f in fallbacks]
    lines += ["", f"AHA segment fallbacks (from the notes; a slice without RV contact borrows the AHA origin of the "
              f"nearest slice that has one): {sum(slices)} of {total_slices} slices with myocardium, in "
              f"{sum(1 for s in slices if s)} of {len(ok)} patients (per group: " +
              ", ".join(f"{g} {sum(f['aha_fallback_slices'] for r, f in zip(ok, fallbacks) if r['group'] == g)}"
                        for g in ACDC_GROUPS) + "); anterior insertion ambiguous on "
              f"{sum(f['aha_ambiguous_slices'] for f in fallbacks)} slices."]
    lines += note_kinds(ok)
    if any("segments_found" in r for r in ok):
        found = _values(ok, "segments_found")
        lines += ["", "### AHA segments: mean Green strain at ES per group (radial / circumferential, %)", "",
                  f"Segments present: {int(np.sum(found == 16))} of {len(ok)} patients have all 16 "
                  f"(fewest {int(np.nanmin(found))}). Mean over the patients of each group of the segment's mean "
                  "over its ED myocardium pixels.", ""]
        lines += segment_table(ok, ACDC_GROUPS)
    return lines


# --------------------------------------------------------------------------------------------------------- camus
def annulus_motion(case_dir: Path, ed_gt: Path, es_gt: Path, codes: dict[str, int] = ECHO_CODES) -> dict[str, float]:
    """Where the basal ends of the mid-wall line (the mitral annulus, ``myocardium.midwall_contour``) go from ED to
    ES, in pixels (the spacing is unknown): ``annulus_labels_px``, the mean distance between the ED and the ES
    labels' ends (the excursion the expert labels show), ``annulus_tracked_px``, the mean |U| at the ED ends (what
    the tracking moves them by), and ``annulus_error_px``, the mean distance from the tracked ED ends to the ES
    labels' ends. The ends of both lines are ordered alike (the one with the smaller axis-0 index first)."""
    from scripts import myocardium

    path = case_dir / "displacement.nii.gz"
    if not path.is_file():
        return {}
    try:
        ends = [myocardium.midwall_contour(np.asarray(nib.load(str(p)).dataobj), (1.0, 1.0), codes)[[0, -1]]
                for p in (ed_gt, es_gt)]
    except ValueError:
        return {}
    field = np.asarray(nib.load(str(path)).dataobj, np.float64)  # (X, Y, 2): a pair's field at ES
    moved = ends[0] + np.stack([ndimage.map_coordinates(field[..., i], ends[0].T, order=1, mode="nearest")
                                for i in range(2)], 1)
    return {"annulus_labels_px": float(np.linalg.norm(ends[1] - ends[0], axis=1).mean()),
            "annulus_tracked_px": float(np.linalg.norm(moved - ends[0], axis=1).mean()),
            "annulus_error_px": float(np.linalg.norm(moved - ends[1], axis=1).mean())}


def report_camus(rows: list[dict], keep_largest: bool) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    cleaned = sum(int(r.get("fragment_pixels", 0)) for r in rows)
    lines = ["## CAMUS: global longitudinal strain ED -> ES (apical 2CH / 4CH)", "",
             f"{len(ok)} of {len(rows)} views analysed with `models/model_echo.pt` and the settings of "
             "`configs/strain_echo.yaml` (labels lv 1, myo 2, la 3; long axis; whole image resized, no crop). "
             "Labels: `np.rint` of the resized ground truth" +
             (f"; the largest connected component of each class kept (the thin rounding fragments' {cleaned} pixels "
              "over all ED/ES labels took the label of the nearest kept pixel)" if keep_largest else
              "; fragments kept as they are") +
             ". Spacing unknown (the 224 x 224 resize is anisotropic; 1 mm assumed): strain is a ratio of lengths but "
             "with non-square physical pixels the directions and lengths are distorted, so the values are "
             "approximate. Strain in %, mean ± SD.", ""]
    columns = {"gls_midwall_engineering": "GLS mid-wall contour (eng.)",
               "global_longitudinal_engineering": "longitudinal pixel-wise eng.",
               "global_longitudinal_green": "longitudinal pixel-wise Green",
               "gls_labels_midwall": "GLS reference: ES / ED label mid-wall lines",
               "global_transverse_green": "transverse Green", "fac_labels": "FAC (labels) %",
               "ef_tracked": "FAC (tracked) %"}
    lines += group_table(ok, "view", CAMUS_VIEWS, columns)
    gls = _values(ok, "gls_midwall_engineering")
    fac = _values(ok, "fac_labels")
    lines += ["", f"Published healthy echo GLS (engineering): about {100 * HEALTHY_GLS[0]:.0f} % (meta-analysis "
              f"-19.7 %, range {100 * HEALTHY_GLS[1]:.1f} to {100 * HEALTHY_GLS[2]:.1f} %; 4CH -20.1 ± 2.3, 2CH "
              "-21.2 ± 2.6). CAMUS includes low-EF patients, so a smaller mean magnitude is expected. "
              f"Views with mid-wall GLS more negative than -15.9 %: {int(np.sum(gls < HEALTHY_GLS[1]))} of "
              f"{int(np.isfinite(gls).sum())}; views with FAC >= 35 %: {int(np.sum(fac >= 0.35))}, their mid-wall GLS "
              f"{fmt(*mean_sd(gls[fac >= 0.35])[:2])} % tracked and "
              f"{fmt(*mean_sd(_values(ok, 'gls_labels_midwall')[fac >= 0.35])[:2])} % from the labels (FAC < 35 %: "
              f"{fmt(*mean_sd(gls[fac < 0.35])[:2])} % and "
              f"{fmt(*mean_sd(_values(ok, 'gls_labels_midwall')[fac < 0.35])[:2])} %).", "",
              "### GLS against the fractional area change of the LV cavity (FAC = 1 - A_ES / A_ED from the labels)", "",
              "The GLS reference compares the mid-wall line of the ES labels with that of the ED labels (no "
              "registration; the line's ends follow the labels at the mitral annulus): it says how much longitudinal "
              "shortening the expert labels themselves show on these resized images.", ""]
    pairs = [("gls_midwall_engineering", "fac_labels", "GLS mid-wall (eng.) vs FAC, all views"),
             ("global_longitudinal_engineering", "fac_labels", "longitudinal pixel-wise eng. vs FAC, all views"),
             ("gls_labels_midwall", "fac_labels", "GLS reference (labels) vs FAC, all views"),
             ("gls_midwall_engineering", "gls_labels_midwall", "GLS mid-wall (tracked) vs GLS reference (labels)"),
             ("ef_tracked", "fac_labels", "FAC tracked vs FAC labels")]
    lines += correlation_lines(ok, pairs)
    for view in CAMUS_VIEWS:
        chosen = [r for r in ok if r.get("view") == view]
        pair = ("gls_midwall_engineering", "fac_labels", f"GLS mid-wall vs FAC, {view}")
        lines += correlation_lines(chosen, [pair])[2:]
    if any("annulus_labels_px" in r for r in ok):
        lines += ["", "### Mitral annulus: the basal ends of the mid-wall line, ED -> ES (pixels of the 224 x 224 "
                  "images)", "",
                  "Longitudinal shortening is mostly the annulus moving toward the apex. Excursion in the labels = "
                  "distance between the ED and the ES labels' line ends; tracked = |U| at the ED ends; error = "
                  "distance from the tracked ED ends to the ES labels' ends.", ""]
        lines += group_table(ok, "view", CAMUS_VIEWS, {"annulus_labels_px": "excursion, labels",
                                                       "annulus_tracked_px": "excursion, tracked",
                                                       "annulus_error_px": "tracked end to ES labels' end"},
                             scale=1, digits=1)
        lines += [""] + correlation_lines(ok, [("annulus_tracked_px", "annulus_labels_px",
                                                "annulus excursion: tracked vs labels")])
    lines += ["", "### Dice at ES of the tracked ED labels (registered) vs undeformed", "",
              "| structure | n | undeformed | registered | gain | paired t p |", "|---|---|---|---|---|---|"]
    for name in ("lv", "myo", "la"):
        before, after = _values(ok, f"dice_es_{name}_undeformed"), _values(ok, f"dice_es_{name}")
        test = paired_comparison(after, before)
        lines.append(f"| {name} | {test['n']} | {fmt(*mean_sd(before)[:2], scale=1, digits=3)} | "
                     f"{fmt(*mean_sd(after)[:2], scale=1, digits=3)} | {test['mean_diff']:+.3f} | {_p(test['p'])} |")
    lines += note_kinds(ok)
    return lines


# ---------------------------------------------------------------------------------------------------- sunnybrook
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else float("nan")


def sunnybrook_dice(meta: dict, case_dir: Path) -> dict[str, float]:
    """LV-cavity Dice at ES of the tracked ED labels (``tracked_es_gt.nii.gz``) and of the ED labels as they are,
    against the expert ES i-contour."""
    es = np.asarray(nib.load(meta["es_gt"]).dataobj) == CAVITY
    ed = np.asarray(nib.load(meta["ed_gt"]).dataobj) == CAVITY
    tracked_path = case_dir / "tracked_es_gt.nii.gz"
    tracked = np.asarray(nib.load(str(tracked_path)).dataobj) == CAVITY if tracked_path.is_file() else None
    return {"dice_es_lv": _dice(tracked, es) if tracked is not None else float("nan"),
            "dice_es_lv_undeformed": _dice(ed, es)}


def cycle_drift_mm(settings: dict[str, Any], datalist: Path, ckpt: Path) -> dict[str, dict]:
    """Per case, on the network grid of ``CineRegistration`` (crop around the ED myocardium, resized), over the ED
    myocardium + LV cavity, in mm (network pixel -> native pixel -> mm; the crop is square and Sunnybrook's pixels
    too, so one scale): ``sequential_drift_mm``, the mean end-point distance of the frame-to-frame increments
    composed once round the cycle ED -> ... -> ED (``scripts.tracking.cycle_drift``), and ``direct_drift_mm``, the
    mean |U| of the network registering ED to itself (what 'direct' tracking does at the cycle's end)."""
    import torch

    from scripts import tracking
    from scripts.registration_io import minmax_resize
    from scripts.strain_analysis import CineRegistration, _crop
    from scripts.strain_io import collect_cases, load_case

    network = settings["network"]
    network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    network.eval()
    registration = CineRegistration(network, settings["image_size"], settings["roi_size"], settings["lagrangian"],
                                    "sequential", "cpu", settings["batch_size"])
    labels = settings["labels"]
    out: dict[str, dict] = {}
    for item in collect_cases(None, datalist):
        case = load_case(item)
        frames = torch.as_tensor(case.frames)
        num_frames, slices, height, width = frames.shape
        rows, cols, _ = registration.window(case, labels["myo"])
        crop = _crop(frames.reshape(-1, height, width), rows, cols)
        net = minmax_resize(crop[:, None], registration.image_size)[:, 0].reshape(num_frames, slices,
                                                                                   *registration.image_size)
        region = torch.as_tensor(np.isin(case.ed_labels, [labels["myo"], labels["lv"]]), dtype=torch.float32)
        region = torch.nn.functional.interpolate(_crop(region, rows, cols)[:, None], size=registration.image_size,
                                                 mode="nearest")[:, 0]  # (S, h, w)
        scale = [c / n * s for c, n, s in zip(crop.shape[1:], registration.image_size, case.spacing)]  # mm / net px
        start = time.perf_counter()
        with torch.no_grad():
            drift = tracking.cycle_drift(net, registration._lagrangian, case.ed_index, region, registration.batch_size)
            ed = net[case.ed_index]
            identity = torch.linalg.vector_norm(registration._lagrangian(ed, ed), dim=1)  # (S, h, w) net px
        identity = (identity * region).flatten(1).sum(1) / region.flatten(1).sum(1)
        out[case.case] = {"sequential_drift_mm": float(drift.mean()) * float(np.mean(scale)),
                          "direct_drift_mm": float(identity.mean()) * float(np.mean(scale)),
                          "drift_corrected_drift_mm": 0.0,
                          "drift_scale_anisotropy": abs(scale[0] / scale[1] - 1.0),
                          "drift_time_s": round(time.perf_counter() - start, 3)}
    return out


def field_difference_mm(meta: dict, folder: Path, mode: str, reference: str = "direct") -> float:
    """Mean |U_mode - U_reference| (mm) at ES over the ED myocardium + LV cavity, from the workflow's
    ``displacement.nii.gz`` of a one-slice cine (voxels; NIfTI's 5D layout X x Y x 1 x T x 2, or X x Y x T x 2 as
    written before the workflow adopted it)."""
    paths = [folder / m / meta["case"] / "displacement.nii.gz" for m in (mode, reference)]
    if not all(p.is_file() for p in paths):
        return float("nan")
    es = int(meta["es_index"])

    def at_es(path: Path) -> np.ndarray:  # (X, Y, 2)
        field = np.asarray(nib.load(str(path)).dataobj)
        return field[:, :, 0, es] if field.ndim == 5 else field[:, :, es]

    fields = [at_es(p) for p in paths]
    spacing = np.asarray([float(v) for v in meta["spacing_mm"].split("x")])
    distance = np.linalg.norm((fields[0] - fields[1]) * spacing, axis=-1)
    region = np.isin(np.asarray(nib.load(meta["ed_gt"]).dataobj), [MYOCARDIUM, CAVITY])
    return float(distance[region].mean())


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _step_range(rows: Sequence[dict]) -> str:
    """'a-b of the T': frames from ED to ES (cyclic) over the rows, e.g. '7-10 of the 20'."""
    steps, frames = [], []
    for r in rows:
        item_frames = int(r["n_frames"])
        steps.append((int(r["es_index"]) - int(r["ed_index"])) % item_frames)
        frames.append(item_frames)
    if not steps:
        return "n/a"
    span = f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"
    return f"{span} of the {max(frames)}"


def report_sunnybrook(rows: list[dict], modes: Sequence[str], drift_note: str) -> list[str]:
    bad = [r for r in rows if not _flag(r.get("epicardium_ok"))]
    lines = ["## Sunnybrook: ED contours carried through the cine to ES, per tracking mode", "",
             f"{len(rows)} mid-ventricular slices (5 heart-failure patients with infarction, 3 slices each), 20 frames "
             "in "
             "trigger order, ED = the contoured late-diastolic frame, ES = the contoured systolic frame (`cines.csv`). "
             "ED labels from the expert contours: i-contour = LV cavity (3), o-contour minus i-contour = myocardium "
             "(2); no RV labels, so the AHA origin falls back (noted per case). Spacing from the DICOM tags. Dice = "
             "LV cavity at ES against the expert ES i-contour (no ES epicardium exists).", "",
             f"Epicardium check: {len(bad)} of {len(rows)} slices have an ED o-contour that does not enclose the "
             f"i-contour (less than {100 * EPICARDIUM_COVER:.0f} % of the cavity inside it" +
             (f": {', '.join(sorted({str(r['patient']) for r in bad}))}, cover "
              f"{min(float(r['epicardium_cover']) for r in bad):.2f}-"
              f"{max(float(r['epicardium_cover']) for r in bad):.2f}"
              if bad else "") + "). Their myocardium label (o-contour minus i-contour) is not the myocardium, so "
             "their strain is left out of the strain columns (n strain); they stay in the Dice of the LV cavity, "
             "which does not use the epicardium (only the crop centre moves).", "",
             "| mode | n ok | Dice LV at ES registered | undeformed | gain | n strain | radial Green at ES % "
             "| circ. Green at ES % | circ. eng. at ES % | time to peak circ. (ms) | time to peak radial (ms) "
             "| FAC tracked % | time/case s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        ok = [r for r in rows if r.get(f"{mode}_status") == "ok"]
        strain_ok = [r for r in ok if _flag(r.get("epicardium_ok"))]
        after, before = _values(ok, f"{mode}_dice_es_lv"), _values(ok, "dice_es_lv_undeformed")
        cells = [fmt(*mean_sd(after)[:2], scale=1, digits=3), fmt(*mean_sd(before)[:2], scale=1, digits=3),
                 f"{np.nanmean(after - before):+.3f}", str(len(strain_ok))]
        cells += [fmt(*mean_sd(_values(strain_ok, f"{mode}_{k}"))[:2]) for k in
                  ("global_radial_green", "global_circumferential_green", "global_circumferential_engineering")]
        cells += [fmt(*mean_sd(_values(strain_ok, f"{mode}_time_to_peak_{k}"))[:2], scale=1, digits=0)
                  for k in ("circumferential_green", "radial_green")]
        cells.append(fmt(*mean_sd(_values(ok, f"{mode}_ef_tracked"))[:2]))
        cells.append(fmt(*mean_sd(_values(ok, f"{mode}_time_s"))[:2], scale=1, digits=2))
        lines.append(f"| {mode} | {len(ok)} | " + " | ".join(cells) + " |")
    first = modes[0]
    counts = [fallback_slices(r.get(f"{first}_notes", ""), 1) for r in rows if r.get(f"{first}_status") == "ok"]
    axes_note = sum("image axes" in str(r.get(f"{first}_notes", "")) for r in rows)
    lines += ["", f"AHA segments: no RV labels exist, so {sum(c['aha_fallback_slices'] for c in counts)} of "
              f"{len(counts)} slices fell back ({axes_note} to the fixed orientation: septum centred on patient "
              "right, 120 deg septal arc, with anterior and patient right from the DICOM direction cosines written "
              "into the NIfTI affine; the workflow's note calls this 'the image axes'). The segments are therefore "
              "approximate; every slice is one mid-level slice (segments 7-12)."]
    lines += ["", f"FAC of the LV cavity from the expert contours (1 - A_ES / A_ED): "
              f"{fmt(*mean_sd(_values(rows, 'fac_labels'))[:2])} %; FAC tracked = the ED cavity carried to ES. Time to "
              "peak: ms after the ED frame (trigger times, cyclic); the peak is the extreme of the global curve "
              "(maximum radial, minimum circumferential) over the cycle.", "",
              "### Paired comparisons of the LV Dice at ES (scipy.stats.ttest_rel, over slices)", "",
              "| comparison | n | mean difference | SD | t | p |", "|---|---|---|---|---|---|"]
    comparisons = [(m, "undeformed") for m in modes] + [(a, b) for i, a in enumerate(modes) for b in modes[i + 1:]]
    for a, b in comparisons:
        va = _values(rows, f"{a}_dice_es_lv")
        vb = _values(rows, "dice_es_lv_undeformed" if b == "undeformed" else f"{b}_dice_es_lv")
        test = paired_comparison(va, vb)
        lines.append(f"| {a} - {b} | {test['n']} | {test['mean_diff']:+.4f} | {test['sd_diff']:.4f} | "
                     f"{test['t']:.2f} | {_p(test['p'])} |")
    if any("sequential_drift_mm" in r for r in rows):
        lines += ["", "### Cycle drift (mm, mean end-point distance over the ED myocardium + LV cavity)", "",
                  drift_note.format(steps=_step_range(rows)), "",
                  "| quantity | n | mean ± SD (mm) | max over slices (mm) |", "|---|---|---|---|"]
        for key, label in (("sequential_drift_mm", "frame-to-frame chain round the cycle, ED -> ED (sequential)"),
                           ("direct_drift_mm", "network registering ED to itself (direct at the cycle's end)"),
                           ("drift_corrected_drift_mm", "drift_corrected at the cycle's end (zero by construction)")):
            values = _values(rows, key)
            summary = fmt(*mean_sd(values)[:2], scale=1, digits=2)
            lines.append(f"| {label} | {int(np.isfinite(values).sum())} | {summary} | {np.nanmax(values):.2f} |")
    differences = [m for m in modes if m != "direct" and f"{m}_es_field_vs_direct_mm" in (rows[0] if rows else {})]
    if differences:
        parts = [f"{m} {fmt(*mean_sd(_values(rows, f'{m}_es_field_vs_direct_mm'))[:2], scale=1, digits=2)}"
                 for m in differences]
        lines += ["", "Mean distance at ES between each mode's displacement and the direct one (mm, ED myocardium + "
                  "LV cavity): " + "; ".join(parts) + "."]
    lines += ["", "### Per slice", "", "| case | epicardium ok | undeformed | " +
              " | ".join(f"{m} Dice" for m in modes) + " | " + " | ".join(f"{m} circ. Green %" for m in modes) + " |",
              "|---|---|---|" + "---|" * (2 * len(modes))]
    for r in rows:
        lines.append(f"| {r['case']} | {'yes' if _flag(r.get('epicardium_ok')) else 'NO'} | "
                     f"{float(r['dice_es_lv_undeformed']):.3f} | " +
                     " | ".join(f"{float(r.get(f'{m}_dice_es_lv', 'nan')):.3f}" for m in modes) + " | " +
                     " | ".join(fmt(_values([r], f"{m}_global_circumferential_green")[0]) for m in modes) + " |")
    return lines


DRIFT_NOTE = ("What the numbers measure. 'Frame-to-frame chain': all T increments round the cycle "
              "(ED -> ED+1 -> ... -> ED, cyclic) registered and composed (`scripts.tracking.cycle_drift`, on the "
              "network grid, converted to mm); a perfect tracker brings every ED point back onto itself, so this is "
              "the "
              "error accumulated by the composition over a whole cycle. 'sequential' tracking uses the first T-1 of "
              "these increments, and up to ES ({steps} increments after ED here) only the first few, so by ES it has "
              "accumulated only part of this error. "
              "'direct' registers every frame to ED and composes nothing: at the cycle's end it registers ED to "
              "itself, and that number is only the network's error on identical images. 'drift_corrected' blends the "
              "forward chain with a backward chain that starts at ED, weighted towards the backward chain at the end "
              "of the cycle, so its field closes the cycle exactly (zero by construction); neither of the last two "
              "says how well those modes track at ES: the Dice above does.")


# ================================================================================================== driver
def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})


def run(dataset: str, data_root: Path, out: Path, work: Path, ckpt: Path | None, modes: Sequence[str],
        cases: Sequence[str] | None, max_cases: int | None, figures: bool,
        keep_largest: bool) -> tuple[list[dict], list[str]]:
    """Convert, run the workflow, summarise: (per-case rows, report lines)."""
    started = time.perf_counter()
    echo = dataset == "camus"
    settings = bundle_settings(echo)
    ckpt = Path(ckpt or settings["ckpt_path"])
    if not ckpt.is_file():
        raise SystemExit(f"error: {ckpt}: weights not found (pass --ckpt)")
    converted = work / "cases"
    converted.mkdir(parents=True, exist_ok=True)
    options = {"keep_largest": keep_largest} if echo else {}
    meta = CONVERTERS[dataset](data_root / dataset, converted, cases, max_cases, **options)
    if not meta:
        raise SystemExit(f"error: no {dataset} case matches {list(cases or [])}")
    convert_s = time.perf_counter() - started
    header = [f"# Strain workflow on real data: {dataset}", "",
              f"Weights `{ckpt.name if ckpt.parent == BUNDLE / 'models' else ckpt}`; directions "
              f"{settings['directions']}, Lagrangian field {settings['lagrangian']}, network grid "
              f"{settings['image_size']}, ROI {settings['roi_size']}; figures {'on' if figures else 'off'}.", ""]
    if dataset == "sunnybrook":
        rows = [dict(m) for m in meta]
        for mode in modes:
            mode_rows = run_workflow(settings, out / "workflow" / mode, ckpt, mode, figures,
                                     datalist=converted / "datalist.json")
            rows = _merge(rows, mode_rows, prefix=f"{mode}_")
            for row in rows:
                dice = sunnybrook_dice(row, out / "workflow" / mode / row["case"])
                row[f"{mode}_dice_es_lv"] = dice["dice_es_lv"]
                row["dice_es_lv_undeformed"] = dice["dice_es_lv_undeformed"]
        if "direct" in modes:
            for row in rows:
                for mode in modes[1:] if modes[0] == "direct" else [m for m in modes if m != "direct"]:
                    row[f"{mode}_es_field_vs_direct_mm"] = field_difference_mm(row, out / "workflow", mode)
        try:
            drift = cycle_drift_mm(settings, converted / "datalist.json", ckpt)
        except (AttributeError, ImportError, TypeError) as error:
            drift = {}
            header += [f"Cycle drift not computed: scripts.tracking.cycle_drift unavailable ({error}).", ""]
        for row in rows:
            row.update(drift.get(row["case"], {}))
        for row in rows:
            row["time_s"] = sum(float(row.get(f"{m}_time_s") or 0.0) for m in modes)
            row.pop("es_gt"), row.pop("ed_gt")
        body = report_sunnybrook(rows, modes, DRIFT_NOTE)
        failures = [f for m in modes for f in _failures(rows, f"{m}_")]
    else:
        mode = modes[0]
        rows = _merge(meta, run_workflow(settings, out / "workflow", ckpt, mode, figures, dataset_dir=converted))
        if dataset == "camus":
            for row in rows:
                row.update(annulus_motion(out / "workflow" / row["case"], converted / f"{row['case']}_ED_gt.nii.gz",
                                          converted / f"{row['case']}_ES_gt.nii.gz"))
        if dataset == "acdc":
            split = shipped_model_split(data_root / dataset / "pairs.csv")
            for row in rows:
                row["model_split"] = split.get(row["case"], "")
                row.update(segment_values(out / "workflow" / row["case"]))
                row.update(through_plane_sensitivity(out / "workflow" / row["case"],
                                                     converted / f"{row['case']}_ED_gt.nii.gz",
                                                     converted / f"{row['case']}_ES_gt.nii.gz"))
        shipped = ckpt.resolve() == (BUNDLE / "models" / ("model_echo.pt" if echo else "model.pt")).resolve()
        body = report_acdc(rows, shipped) if dataset == "acdc" else report_camus(rows, keep_largest)
        failures = _failures(rows)
        if mode != "direct":
            header += [f"Tracking: {mode}.", ""]
    for row in rows:
        row["figures"] = figures
    total_s = time.perf_counter() - started
    lines = header + body + ["", "### Time", "", time_line(rows, total_s, convert_s)]
    if failures:
        lines += ["", "### FAILED cases", ""] + [f"- {f}" for f in failures]
    lines += ["", "| case | time (s) |", "|---|---|"] + [f"| {r['case']} | {float(r.get('time_s') or 'nan'):.2f} |"
                                                         for r in rows]
    return rows, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding acdc/, camus/, sunnybrook/")
    parser.add_argument("--out", default=None, help="report folder (default ../strain_runs/<dataset>)")
    parser.add_argument("--ckpt", default=None,
                        help="network weights (default: the config's, model.pt or model_echo.pt)")
    parser.add_argument("--tracking", nargs="+", default=None, choices=TRACKING_MODES,
                        help="tracking mode(s); default: direct (pairs), all three for sunnybrook")
    parser.add_argument("--cases", nargs="+", default=None, help="only these cases (patient or case names)")
    parser.add_argument("--max-cases", type=int, default=None, help="the first N cases")
    parser.add_argument("--keep", default=None, help="keep the converted NIfTI cases in this folder")
    parser.add_argument("--no-figures", action="store_true", help="skip the workflow's PNG figures")
    parser.add_argument("--all-fragments", action="store_true",
                        help="CAMUS: keep the label fragments of np.rint (default: largest component per class)")
    args = parser.parse_args(argv)
    data_root = Path(args.data)
    if not (data_root / args.dataset).is_dir():
        print(f"error: {data_root / args.dataset} does not exist (the real data lives in ../shared/data next to the "
              "repository; pass --data)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPO.parent / "strain_runs" / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    modes = args.tracking or (list(TRACKING_MODES) if args.dataset == "sunnybrook" else ["direct"])
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix=f"strain_{args.dataset}_"))
    try:
        rows, lines = run(args.dataset, data_root, out, work, Path(args.ckpt) if args.ckpt else None, modes,
                          args.cases, args.max_cases, not args.no_figures, not args.all_fragments)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    _write_csv(out / "cases.csv", rows)
    print(text)
    print(f"report: {out / 'report.md'}; per-case rows: {out / 'cases.csv'}")
    return 1 if any("FAILED" in line for line in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())
