"""Cases of the strain workflow (``configs/strain.yaml``): which files, read and checked, as frames on the ED grid.

A case is an ED frame with its labels and either an ES frame or a whole cine:

* in a folder, by the inference naming rule plus one name: ``<case>_ED.nii.gz`` (image), ``<case>_ED_gt.nii.gz``
  (labels, required), then ``<case>_ES.nii.gz`` (optional ``<case>_ES_gt.nii.gz``, used to score the tracked labels)
  **or** ``<case>_cine.nii.gz`` (the whole cycle: ``X x Y x T`` for one slice, ``X x Y x Z x T`` for a stack; the ED
  image is then the cine's frame ``ed_index``, 0 unless a datalist says otherwise); ``ED``/``ES``/``cine``/``gt`` in
  any case (``x_ed.nii.gz``); other files are named in one warning (hidden ones skipped);
* or the ``testing`` section of a datalist JSON whose items name ``moving`` (ED), ``moving_label`` (ED labels),
  ``fixed`` (ES) and optionally ``fixed_label``, or ``cine`` (one 3D/4D file or a list of per-frame files) with
  optional ``ed_index``, ``es_index`` and ``trigger_ms`` (one time per frame), and optionally ``case``.

Every problem of one case raises :class:`CaseError` naming the file; the engine reports it and goes on: unreadable
files or symbolic link loops, two files for one frame (``x_ED.nii`` and ``x_ED.nii.gz``), a datalist item that is not
an object or has a non-string path, a case name that is not a plain file name (it names the case's output folder;
a duplicate becomes ``<case>_2``, said in the notes), constant frames, label maps with non-integer, negative or huge
values, grids that differ. See ``io_safety`` for the shared rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from .data import DatasetError
from .io_safety import (
    assign_case_names, constant_problem, frame_pattern, input_file_problem, label_problem, list_dataset_folder,
    match_named_files, nifti_stem, read_datalist,
)

CASE_PATTERN = frame_pattern(("ED", "ES", "cine"))  # ED/ES/cine/_gt in any case (x_ed.nii.gz)
CASE_RULE = "<case>_ED[_gt]/_ES[_gt]/_cine.nii[.gz]"
_KEYS = {("ED", False): "moving", ("ED", True): "moving_label", ("ES", False): "fixed", ("ES", True): "fixed_label",
         ("cine", False): "cine"}
FILE_KEYS = ("moving", "moving_label", "fixed", "fixed_label", "cine")
RESERVED_NAMES = ("strain_summary.csv",)  # a case folder may not take the summary table's name
MAX_LABEL = 255


class CaseError(RuntimeError):
    """A problem of one case; the message names the file. The other cases go on."""


@dataclass
class StrainCase:
    """One case read from disk, frames in cycle order on the ED grid.

    ``frames`` ``(T, S, H, W)`` float32 (T = 2 for an ED/ES pair), ``ed_labels`` ``(S, H, W)`` int64; ``H``, ``W`` are the
    NIfTI array axes 0 and 1 and ``S`` the slices (third axis; 1 for a 2D image)."""

    case: str
    files: dict[str, Any]
    frames: np.ndarray
    ed_labels: np.ndarray
    ed_index: int
    es_index: int | None
    spacing: tuple[float, float]
    affine: np.ndarray
    label_shape: tuple[int, ...]  # the ED label file's array shape, as stored (outputs use it)
    es_labels: np.ndarray | None = None
    times_ms: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_cine(self) -> bool:
        return "cine" in self.files

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


# ---------------------------------------------------------------------------------------------------- discovery
def collect_cases(dataset_dir: str | os.PathLike | None, datalist: str | os.PathLike | None = None,
                  section: str = "testing") -> list[dict[str, Any]]:
    """The cases of a folder or of a datalist section, as dicts of absolute paths (plus ``error`` for a case that
    cannot run, so that it is reported while the others run). Case names are checked and made unique
    (``io_safety.assign_case_names``). A missing folder, a folder without cases or an unreadable, malformed or empty
    datalist raises ``DatasetError``."""
    items = _datalist_items(datalist, section, dataset_dir) if datalist else _folder_items(dataset_dir)
    assign_case_names(items, RESERVED_NAMES, describe=_describe)
    for item in items:
        if not item.get("error"):
            item["error"] = _missing(item)
    return items


def _describe(item: Mapping[str, Any]) -> str:
    for key in ("moving_label", "moving", "cine"):
        value = item.get(key)
        if isinstance(value, str) or (isinstance(value, list) and value):
            return _name(value)
    return f"item {item['item']}" if "item" in item else ""


def _folder_items(dataset_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    entries = list_dataset_folder(dataset_dir, "<case>_ED.nii.gz + <case>_ED_gt.nii.gz with <case>_ES.nii.gz or "
                                                "<case>_cine.nii.gz")
    root = Path(dataset_dir)
    cases: dict[str, dict[str, Any]] = {}
    doubles: dict[str, list[str]] = {}
    for path, name, key in match_named_files(entries, _KEYS, CASE_RULE, root):
        case = cases.setdefault(name, {"case": name})
        if key in case:  # x_ED.nii and x_ED.nii.gz (or x_ed.nii.gz): which one is meant?
            doubles.setdefault(name, []).append(f"{Path(case[key]).name} and {path.name}")
        case[key] = str(path)
    if not cases:
        raise DatasetError(f"{root}: no <case>_ED_gt.nii.gz with <case>_ES.nii.gz or <case>_cine.nii.gz found.")
    for name, files in doubles.items():
        cases[name]["error"] = f"{root}: {'; '.join(files)}: two files for one frame of case '{name}'; keep one of them"
    return [cases[name] for name in sorted(cases)]


def _datalist_items(path: str | os.PathLike, section: str, base_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    items = read_datalist(path, section, base_dir, ("moving", "moving_label", "fixed", "fixed_label"), ("cine",))
    for item in items:
        if "case" not in item:
            first = item.get("moving_label") or item.get("moving") or item.get("cine") or f"item{item['item']}"
            item["case"] = (nifti_stem(first[0] if isinstance(first, list) else first).removesuffix("_ED_gt")
                            .removesuffix("_ED").removesuffix("_cine"))
    return items


def _missing(item: Mapping[str, Any]) -> str:
    have = ", ".join(Path(v).name for k, v in item.items() if k in FILE_KEYS and isinstance(v, str)) or "no files"
    if not item.get("moving_label"):
        return f"{have}: case '{item['case']}' has no ED labels (<case>_ED_gt): strain needs the ED myocardium"
    if not item.get("cine") and not (item.get("moving") and item.get("fixed")):
        return f"{have}: case '{item['case']}' needs an ED and an ES image (<case>_ED, <case>_ES) or a cine (<case>_cine)"
    return ""


# ------------------------------------------------------------------------------------------------------ reading
def _read(path: str) -> nib.Nifti1Image:
    problem = input_file_problem(path)
    if problem:
        raise CaseError(f"{path}: {problem}")
    try:
        image = nib.load(path)
        image.get_fdata(dtype=np.float32)  # read the data now: a truncated file fails here, by name
    except Exception as error:  # nibabel raises several types for corrupt files
        raise CaseError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error})") from None
    return image


def _as_slices(array: np.ndarray, path: str) -> np.ndarray:
    """``(X, Y)``, ``(X, Y, 1)`` or ``(X, Y, Z)`` -> ``(S, X, Y)``."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise CaseError(f"{path}: shape {array.shape} is neither a 2D image nor a 3D short-axis stack")
    return np.ascontiguousarray(np.moveaxis(array, -1, 0))


def _finite(array: np.ndarray, path: str) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise CaseError(f"{path}: contains NaN or infinite values")
    return array


def _image_slices(path: str) -> np.ndarray:
    image = _read(path)
    return _finite(_as_slices(np.asarray(image.dataobj, dtype=np.float32), path), path)


def _label_slices(path: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = _read(path)
    array = _finite(np.asarray(image.dataobj, dtype=np.float32), path)
    problem = label_problem(array, MAX_LABEL)
    if problem:
        raise CaseError(f"{path}: {problem}")
    return _as_slices(np.rint(array).astype(np.int64), path), image


def _cine_frames(value: str | Sequence[str], slices: int) -> np.ndarray:
    """A cine as ``(T, S, X, Y)``: one file with time last, or a list of per-frame files."""
    if isinstance(value, (list, tuple)):
        frames = [_image_slices(p) for p in value]
        for path, frame in zip(value, frames):
            if frame.shape != frames[0].shape:
                raise CaseError(f"{path}: frame of shape {_xyz(frame.shape)} in a cine whose first frame "
                                f"{Path(value[0]).name} is {_xyz(frames[0].shape)}")
        return np.stack(frames)
    image = _read(value)
    array = _finite(np.asarray(image.dataobj, dtype=np.float32), value)
    if array.ndim == 5 and array.shape[3] == 1:  # X, Y, Z, 1, T (some writers)
        array = array[:, :, :, 0]
    if array.ndim == 3:  # X, Y, T: one slice
        if slices != 1:
            raise CaseError(f"{value}: a 3D cine (X, Y, T) for ED labels of {slices} slices; expected X x Y x Z x T")
        array = array[:, :, None]
    if array.ndim != 4:
        raise CaseError(f"{value}: shape {array.shape} is not a cine (X x Y x T or X x Y x Z x T)")
    return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))


def load_case(item: Mapping[str, Any]) -> StrainCase:
    """Read and check one case; raises :class:`CaseError` naming the offending file."""
    if item.get("error"):
        raise CaseError(item["error"])
    files = {k: item[k] for k in FILE_KEYS if item.get(k)}
    if item.get("view"):  # a datalist item's echo view (2CH / 4CH), read by strain_analysis.echo_view
        files["view"] = str(item["view"])
    label_path = files["moving_label"]
    ed_labels, label_image = _label_slices(label_path)
    shape = ed_labels.shape
    notes: list[str] = list(item.get("notes") or [])
    es_labels = None
    if "cine" in files:
        frames = _cine_frames(files["cine"], shape[0])
        ed_index = int(item.get("ed_index", 0))
        es_index = item.get("es_index")
        if frames.shape[0] < 2:
            raise CaseError(f"{_name(files['cine'])}: the cine has {frames.shape[0]} frame; tracking needs at least 2")
        if not 0 <= ed_index < frames.shape[0]:
            raise CaseError(f"{_name(files['cine'])}: ed_index {ed_index} outside its {frames.shape[0]} frames")
        if es_index is not None and not 0 <= int(es_index) < frames.shape[0]:
            raise CaseError(f"{_name(files['cine'])}: es_index {es_index} outside its {frames.shape[0]} frames")
        source = _name(files["cine"])
    else:
        ed_image, es_image = _image_slices(files["moving"]), _image_slices(files["fixed"])
        if es_image.shape != ed_image.shape:
            raise CaseError(f"{files['fixed']}: ES image of shape {_xyz(es_image.shape)} is not on the grid of the ED "
                            f"image {Path(files['moving']).name} ({_xyz(ed_image.shape)})")
        frames = np.stack([ed_image, es_image])
        ed_index, es_index, source = 0, 1, Path(files["fixed"]).name
        if "fixed_label" in files:
            es_labels = _label_slices(files["fixed_label"])[0]
    _check_not_constant(files, frames)
    if frames.shape[1:] != shape:
        raise CaseError(f"{label_path}: labels of shape {_xyz(shape)} are not on the image grid of {source} "
                        f"({_xyz(frames.shape[1:])}); resample them onto the ED image first")
    if es_labels is not None and es_labels.shape != shape:
        notes.append(f"{Path(files['fixed_label']).name}: ES labels not on the ED grid; ES Dice not computed")
        es_labels = None
    times = item.get("trigger_ms")
    if times is not None:
        times = np.asarray(times, dtype=np.float64)
        if times.shape != (frames.shape[0],):
            notes.append(f"trigger_ms has {times.size} values for {frames.shape[0]} frames; times not used")
            times = None
    zooms = label_image.header.get_zooms()
    spacing = (float(zooms[0]), float(zooms[1]) if len(zooms) > 1 else float(zooms[0]))
    if min(spacing) <= 0:
        notes.append(f"{Path(label_path).name}: header spacing {spacing} invalid; 1 mm assumed")
        spacing = (1.0, 1.0)
    return StrainCase(str(item["case"]), files, frames.astype(np.float32), ed_labels, ed_index,
                      None if es_index is None else int(es_index), spacing, np.asarray(label_image.affine),
                      tuple(int(s) for s in label_image.shape), es_labels, times, notes)


def _check_not_constant(files: Mapping[str, Any], frames: np.ndarray) -> None:
    """A constant frame (every voxel one value) has nothing to track: fail, naming the file (and frame)."""
    if "cine" not in files:
        for index, key in enumerate(("moving", "fixed")):
            problem = constant_problem(frames[index])
            if problem:
                raise CaseError(f"{files[key]}: {problem}")
        return
    cine = files["cine"]
    for t in range(frames.shape[0]):
        problem = constant_problem(frames[t], f"frame {t}")
        if problem:
            raise CaseError(f"{cine[t] if isinstance(cine, (list, tuple)) else cine}: {problem}")


def _name(value: str | Sequence[str]) -> str:
    return Path(value).name if isinstance(value, str) else f"{Path(value[0]).name} (+{len(value) - 1} frames)"


def _xyz(slices_first: Sequence[int]) -> str:
    s, x, y = slices_first
    return f"{x}x{y}" + (f"x{s}" if s > 1 else "")
