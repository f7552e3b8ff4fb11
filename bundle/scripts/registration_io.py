"""Registration of a user's NIfTI pairs at their native size and geometry (the engine of ``inference.yaml``).

For every pair (``<case>_ED.nii.gz`` moving, ``<case>_ES.nii.gz`` fixed, optional ``<case>_ED_gt.nii.gz`` /
``<case>_ES_gt.nii.gz``; or the ``testing`` section of a datalist JSON) :class:`PairRegistrationRunner` writes into
``output_dir``:

* ``<case>_ddf.nii.gz``: the displacement field on the moving image's voxel grid, with its affine; array
  ``(X, Y, C)`` for a 2D image (``(X, Y, 1, C)`` if stored with a singleton third axis) or ``(X, Y, Z, 3)``
  for a short-axis stack; **voxel units of the input grid, component i along NIfTI array axis i** (for stacks
  the through-plane component is 0), pull convention of MONAI ``Warp``: ``warped[x] = moving[x + ddf[x]]``.
* ``<case>_ddf_itk.nii.gz`` (``.nrrd`` for one-slice ``(X, Y, 1)`` files, see :func:`itk_field_extension`):
  the same field as an ITK displacement field (vector image written by ITK, NIfTI intent VECTOR,
  **millimetres, ITK physical (LPS) x, y(, z) components**), on the moving image's
  geometry as ITK reads it; ITK's convention ``T(p) = p + d(p)`` maps points of the fixed (ES) image to the
  moving (ED) image, so ``itk.WarpImageFilter`` / ``itk.DisplacementFieldTransform`` + ``ResampleImageFilter``,
  ``antsApplyTransforms`` or Slicer's transform module resample the moving image onto the fixed one with it.
* ``<case>_warped.nii.gz``: the moving image (original intensities) warped onto the fixed one (bilinear).
* ``<case>_warped_gt.nii.gz``: the moving label warped (each class bilinear, then argmax), when given.
* ``<case>_score.nii.gz``: the scoring network's correspondence score of the fixed image, on request.
* ``summary.csv``: one row per case: files, status, error message, Dice (when both labels exist; also the
  undeformed Dice), folding percentage, time.

Images of any in-plane size are min-max scaled and resized to the network grid (``image_size``); the field
is resized back to the native grid and its vectors scaled by the size ratio. 3D stacks are registered slice by
slice (slices along the third array axis). Every problem of a pair (unreadable file or symbolic link loop, missing
partner, two files for one frame, unequal shapes, a constant image, a label map with non-integer, negative or huge
values, a non-finite field, a case name that would leave ``output_dir``) is reported by name in the log and the CSV;
the other pairs still finish; :meth:`run` ends with ``SystemExit(1)`` when any pair failed. ``output_dir`` defaults
to ``<dataset_dir>_registered`` beside the input folder; one that holds an earlier run's outputs is refused unless
``overwrite`` (which removes them first), so the folder and ``summary.csv`` always agree. Problems that stop the run before any case (no pairs, an
unreadable or malformed datalist, weights that are missing, corrupt, non-finite or do not fit, an output folder that
is an input folder, a file or not writable) end it with a message naming the file and nothing written. Inputs are
never overwritten and every output file is written to a temporary name in ``output_dir`` and renamed into place
(whole or absent); temporary files of a killed run are removed at the next start (``io_safety``).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SimpleInferer
from monai.networks.blocks import Warp
from monai.transforms import MapTransform
from monai.utils import str2bool
from torch.utils.data import Dataset

from .data import DatasetError
from .evaluator import one_hot
from .io_safety import (
    PAIR_FRAMES, PAIR_RULE, TMP_PATTERN, assign_case_names, atomic_write, check_output_dir,
    claim_output_dir, default_output_dir,
    constant_problem, frame_pattern, input_file_problem, label_problem, list_dataset_folder, load_weights,
    match_named_files, nifti_stem, prepare_output_dir, read_datalist,
)
from .metrics import folding_percentage

logger = logging.getLogger(__name__)

PAIR_PATTERN = frame_pattern(("ED", "ES"))  # the naming rule; ED/ES/_gt in any case (x_ed.nii.gz)
FILE_KEYS = ("moving", "fixed", "moving_label", "fixed_label")
OUTPUT_SUFFIXES = ("_ddf.nii.gz", "_ddf_itk.nii.gz", "_ddf_itk.nrrd", "_warped.nii.gz", "_warped_gt.nii.gz", "_score.nii.gz")
MAX_LABEL = 255  # label maps with larger values fail by name (an image given as labels, a corrupt file)
CSV_COLUMNS = (
    "case", "status", "error", "notes", "moving", "fixed", "moving_label", "fixed_label", "shape", "outputs",
    "dice", "dice_undeformed", "dice_per_class", "dice_undeformed_per_class", "folding_pct", "time_s",
)


class PairError(RuntimeError):
    """A problem of one pair (message names the file); the other pairs go on."""


# ------------------------------------------------------------------------------------------------ pairs
def collect_pairs(
    dataset_dir: str | os.PathLike | None, datalist: str | os.PathLike | None = None, section: str = "testing"
) -> list[dict[str, Any]]:
    """Every case of a folder (naming rule) or of a datalist JSON section, as dicts of file paths.

    Folder files follow the naming rule with ``ED``/``ES``/``gt`` in any case (``x_ed.nii.gz``); other files are named
    in one warning (hidden ones skipped). A case that cannot run (no partner frame; ``x_ED.nii`` next to
    ``x_ED.nii.gz`` or ``x_ed.nii.gz``; a datalist item that is not an
    object, lacks ``moving`` / ``fixed`` or has a non-string path; a case name that is not a plain file name) is
    returned with an ``error`` entry instead of raising, so that it is reported while the other cases run. Case names
    are made unique (``io_safety.assign_case_names``: a later duplicate becomes ``<name>_2``, said in its ``notes``).
    Labels are kept individually (a moving label alone is warped; Dice needs both). A missing folder, a folder
    without pairs or an unreadable, malformed or empty datalist raises :class:`DatasetError`.
    """
    if datalist:
        out = []
        for item in read_datalist(datalist, section, dataset_dir, FILE_KEYS):
            if not item.get("error"):
                missing = [k for k in ("moving", "fixed") if k not in item]
                if missing:
                    item["error"] = (f"{datalist}: item {item['item']} of '{section}' has no "
                                     f"{' or '.join(repr(k) for k in missing)} entry")
            if "case" not in item:
                item["case"] = nifti_stem(item["moving"]) if "moving" in item else f"item{item['item']}"
            out.append(item)
        assign_case_names(out, describe=_describe)
        return out
    entries = list_dataset_folder(dataset_dir, "<case>_ED.nii.gz / <case>_ES.nii.gz pairs")
    root = Path(dataset_dir)
    cases: dict[str, dict[str, str]] = {}
    doubles: dict[str, list[str]] = {}
    for path, case, key in match_named_files(entries, PAIR_FRAMES, PAIR_RULE, root):
        files = cases.setdefault(case, {})
        if key in files:  # x_ED.nii and x_ED.nii.gz (or x_ed.nii.gz): which one is meant?
            doubles.setdefault(case, []).append(f"{Path(files[key]).name} and {path.name}")
        files[key] = str(path)
    if not cases:
        raise DatasetError(f"{root}: no <case>_ED.nii.gz / <case>_ES.nii.gz files found.")
    out = []
    for case, files in sorted(cases.items()):
        item: dict[str, Any] = {"case": case, **files}
        missing = [{"moving": "ED", "fixed": "ES"}[k] for k in ("moving", "fixed") if k not in files]
        if case in doubles:
            item["error"] = (f"{root}: {'; '.join(doubles[case])}: two files for one frame of case '{case}'; "
                             f"keep one of them")
        elif missing:
            have = ", ".join(Path(f).name for f in files.values())
            item["error"] = f"{have}: case '{case}' has no {' or '.join(missing)} frame"
        out.append(item)
    assign_case_names(out, describe=_describe)
    return out


def _describe(item: Mapping[str, Any]) -> str:
    """How a case is named in messages: its moving file, else its datalist position."""
    if isinstance(item.get("moving"), str):
        return Path(item["moving"]).name
    return f"item {item['item']}" if "item" in item else ""


@dataclass
class LoadedPair:
    """A pair read from disk: arrays ``(X, Y)`` or ``(X, Y, Z)`` (singleton dims beyond 2 dropped for 2D)."""

    case: str
    files: dict[str, str]
    moving: np.ndarray
    fixed: np.ndarray
    affine: np.ndarray  # the moving image's affine (RAS, nibabel)
    file_shape: tuple[int, ...]  # the moving file's array shape, as stored
    moving_label: np.ndarray | None = None
    fixed_label: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_stack(self) -> bool:
        return self.moving.ndim == 3


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    problem = input_file_problem(path)
    if problem:
        raise PairError(f"{path}: {problem}")
    try:
        image = nib.load(path)
        array = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises several types for corrupt files
        raise PairError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error})") from None
    shape = tuple(int(s) for s in array.shape)
    squeezed = array.reshape(shape[:3] + tuple(s for s in shape[3:] if s != 1)) if len(shape) > 3 else array
    if squeezed.ndim == 3 and squeezed.shape[2] == 1:
        squeezed = squeezed[..., 0]
    if squeezed.ndim not in (2, 3):
        raise PairError(f"{path}: shape {shape} is neither a 2D image nor a 3D stack")
    if not np.all(np.isfinite(squeezed)):
        raise PairError(f"{path}: contains NaN or infinite values")
    return squeezed, np.asarray(image.affine, dtype=np.float64), shape


def load_pair(item: Mapping[str, Any], max_label: int = MAX_LABEL) -> LoadedPair:
    """Read and check one pair; raises :class:`PairError` naming the offending file.

    Refused: unreadable files (or symbolic link loops), unequal shapes, NaN / infinite values, a constant moving or
    fixed image (nothing to register), label maps with non-integer, negative or values above ``max_label``."""
    if item.get("error"):
        raise PairError(item["error"])
    files = {k: str(item[k]) for k in FILE_KEYS if item.get(k)}
    arrays, affines, shapes = {}, {}, {}
    for key, path in files.items():
        arrays[key], affines[key], shapes[key] = _read_nifti(path)
    distinct = {arrays[k].shape for k in arrays}
    if len(distinct) > 1:
        listing = ", ".join(f"{Path(files[k]).name} {shapes[k]}" for k in arrays)
        raise PairError(f"{files['moving']}: pair has unequal shapes ({listing})")
    for key in ("moving", "fixed"):
        problem = constant_problem(arrays[key])
        if problem:
            raise PairError(f"{files[key]}: {problem}")
    notes = list(item.get("notes") or [])
    if not np.allclose(affines["moving"], affines["fixed"], atol=1e-3):
        notes.append(f"{Path(files['fixed']).name}: affine differs from the moving image's; outputs use the moving one")
    labels = {}
    for key in ("moving_label", "fixed_label"):
        if key in arrays:
            problem = label_problem(arrays[key], max_label)
            if problem:
                raise PairError(f"{files[key]}: {problem}")
            labels[key] = np.rint(arrays[key]).astype(np.int64)
    return LoadedPair(str(item["case"]), files, arrays["moving"], arrays["fixed"], affines["moving"],
                      shapes["moving"], labels.get("moving_label"), labels.get("fixed_label"), notes)


class PairDataset(Dataset):
    """The ``dataset`` of ``inference.yaml``: the cases of :func:`collect_pairs`, collected on first use;
    ``dataset[i]`` is a :class:`LoadedPair` or raises :class:`PairError` for that case only."""

    def __init__(self, dataset_dir: str | None, datalist: str | None = None, section: str = "testing",
                 max_label: int = MAX_LABEL) -> None:
        self.dataset_dir, self.datalist, self.section, self.max_label = dataset_dir, datalist, section, int(max_label)
        self._items: list[dict[str, Any]] | None = None

    @property
    def items(self) -> list[dict[str, Any]]:
        if self._items is None:
            self._items = collect_pairs(self.dataset_dir, self.datalist, self.section)
        return self._items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LoadedPair:
        return load_pair(self.items[index], self.max_label)


# --------------------------------------------------------------------------------- network-grid transforms
class FieldToNatived(MapTransform):
    """Resize displacement fields ``(2, h, w)`` (pixels of the network grid) to the native in-plane size given
    by ``data[size_key]`` and scale the vectors by the size ratio (bilinear, ``align_corners=False`` as
    ``Resized``), so that they are in pixels of the native grid. Also takes ``(B, 2, h, w)``."""

    def __init__(self, keys: Sequence[str], size_key: str = "native_size", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size_key = size_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        size = tuple(int(s) for s in out[self.size_key])
        for key in self.key_iterator(out):
            out[key] = resize_ddf(torch.as_tensor(out[key]), size)
        return out


def resize_ddf(ddf: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, 2, h, w)`` or ``(2, h, w)`` field in pixels of its grid -> the same motion on a grid of ``size``."""
    batched = ddf.ndim == 4
    field_ = ddf if batched else ddf[None]
    old = field_.shape[2:]
    if tuple(old) != tuple(size):
        scale = torch.tensor([size[0] / old[0], size[1] / old[1]], dtype=field_.dtype, device=field_.device)
        field_ = F.interpolate(field_, size=tuple(size), mode="bilinear", align_corners=False) * scale.view(1, 2, 1, 1)
    return field_ if batched else field_[0]


def minmax_resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(S, 1, H, W)`` -> min-max scaled per image to [0, 1] and resized (bilinear) to ``size``, as the
    bundle's ``preprocessing`` (``ScaleIntensityd`` + ``Resized``) does, batched."""
    flat = images.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    scaled = torch.where(high > low, (images - low) / (high - low).clamp_min(1e-12), torch.zeros_like(images))
    if tuple(images.shape[2:]) == tuple(size):
        return scaled
    return F.interpolate(scaled, size=tuple(size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------- registration core
@dataclass
class PairResult:
    """Native-resolution results of one pair: fields ``(S, 2, H, W)`` in native pixels, one row per slice."""

    ddf: torch.Tensor
    warped: torch.Tensor  # (S, 1, H, W)
    warped_label: torch.Tensor | None = None  # (S, 1, H, W) integer
    score: torch.Tensor | None = None  # (S, 1, H, W)


class PairRegistration:
    """Register native-size slices with the displacement network on its grid and warp at native size.

    Args:
        network: ``(B, 2, h, w) -> ddf`` (pixels of the network grid).
        image_size: the network grid.
        inferer: MONAI inferer wrapping the network call (default ``SimpleInferer``).
        postprocessing: maps ``{"pred": ddf (B, 2, h, w), "native_size": (H, W)}`` to the native field
            (default :class:`FieldToNatived`).
        scoring_network: optional ``(B, 1, h, w) -> (0, 1)`` scoring network for the score map.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        image_size: Sequence[int] = (128, 128),
        device: str | torch.device = "cpu",
        inferer: Callable | None = None,
        postprocessing: Callable | None = None,
        scoring_network: torch.nn.Module | None = None,
    ) -> None:
        self.network = network
        self.image_size = tuple(int(s) for s in image_size)
        self.device = torch.device(device)
        self.inferer = inferer or SimpleInferer()
        self.postprocessing = postprocessing or FieldToNatived(keys="pred")
        self.scoring_network = scoring_network
        self.warp = Warp(mode="bilinear", padding_mode="zeros")

    @torch.no_grad()
    def __call__(
        self, moving: np.ndarray | torch.Tensor, fixed: np.ndarray | torch.Tensor,
        moving_label: np.ndarray | torch.Tensor | None = None, num_classes: int | None = None,
        score_map: bool = False,
    ) -> PairResult:
        """``moving``/``fixed``: ``(S, H, W)`` slices (or ``(H, W)``); labels the same shape, integer (any values:
        one channel per value present; ``num_classes`` is accepted for older callers and not needed)."""
        mov = torch.as_tensor(moving, dtype=torch.float32, device=self.device)
        fix = torch.as_tensor(fixed, dtype=torch.float32, device=self.device)
        if mov.ndim == 2:
            mov, fix = mov[None], fix[None]
        mov, fix = mov[:, None], fix[:, None]  # (S, 1, H, W)
        native = tuple(mov.shape[2:])
        image = torch.cat([minmax_resize(mov, self.image_size), minmax_resize(fix, self.image_size)], dim=1)
        self.network.eval()
        ddf_net = self.inferer(image, self.network)
        ddf = self.postprocessing({"pred": ddf_net, "native_size": native})["pred"]
        if moving_label is None:
            result = PairResult(ddf=ddf, warped=self.warp(mov, ddf))
        else:  # image and one-hot label warped in one pass (one sampling grid), then argmax
            labels = torch.as_tensor(moving_label, device=self.device).long()
            labels = (labels[None] if labels.ndim == 2 else labels).contiguous()
            # one channel per label value present (plus background 0), not per integer up to the largest value:
            # the same argmax as a full one-hot (absent classes warp to 0 everywhere), memory bounded by the values
            values = torch.unique(torch.cat([labels.new_zeros(1), labels.flatten()]))
            index = torch.searchsorted(values, labels)
            channels = one_hot(index[:, None], max(len(values), 2))
            both = self.warp(torch.cat([mov, channels], 1), ddf)
            winner = both[:, 1:1 + len(values)].argmax(1, keepdim=True)
            result = PairResult(ddf=ddf, warped=both[:, :1], warped_label=values[winner])
        if score_map:
            if self.scoring_network is None:
                raise ValueError("score_map requested but no scoring network was given.")
            self.scoring_network.eval()
            score = self.scoring_network(image[:, 1:2])
            result.score = F.interpolate(score, size=native, mode="bilinear", align_corners=False)
        return result


# ----------------------------------------------------------------------------------------- geometry / ITK
def voxel_ddf_array(ddf: torch.Tensor, is_stack: bool, file_shape: Sequence[int]) -> np.ndarray:
    """``(S, 2, H, W)`` -> channel-last array on the moving file's grid: ``(X, Y, 2)`` / ``(X, Y, 1, 2)`` for
    2D, ``(X, Y, Z, 3)`` (through-plane 0) for a stack."""
    array = ddf.detach().cpu().numpy().astype(np.float32)  # (S, 2, X, Y)
    if is_stack:
        out = np.zeros(array.shape[2:] + (array.shape[0], 3), np.float32)
        out[..., :2] = np.moveaxis(array, (0, 1), (2, 3))
        return out
    out = np.moveaxis(array[0], 0, -1)  # (X, Y, 2)
    return out[:, :, None, :] if len(file_shape) >= 3 else out


def itk_geometry(path: str, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction) of an image file as ITK reads its header (LPS), first ``ndim`` axes.

    Taken from ITK itself rather than recomputed from the NIfTI affine, so that the field lands exactly on the
    geometry that ITK, ANTs and Slicer give the moving image (ITK's choice between qform and sform, its
    orthogonalisation of 2D directions)."""
    import itk

    reader = itk.ImageFileReader[itk.Image[itk.F, ndim]].New(FileName=str(path))
    try:
        reader.UpdateOutputInformation()
    except RuntimeError as error:
        raise PairError(f"{path}: ITK cannot read this file's header ({error})") from None
    image = reader.GetOutput()
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
    return origin, spacing, direction


def itk_displacement_field(ddf_vox: np.ndarray, origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray):
    """ITK ``Image[Vector[F, n], n]`` of the physical (mm, LPS) displacement ``direction @ (spacing * d)`` of a
    voxel field ``ddf_vox`` (channel-last ``(X, Y[, Z], C)``, axis order of the NIfTI array = ITK index order);
    missing components (a 2D field of a one-slice 3D file) are zero."""
    import itk

    ndim = len(spacing)
    spatial = ddf_vox.shape[:-1]
    if len(spatial) != ndim:
        raise ValueError(f"field of spatial shape {spatial} for an ITK image of {ndim} dimensions")
    vox = ddf_vox
    if vox.shape[-1] < ndim:
        vox = np.concatenate([vox, np.zeros(spatial + (ndim - vox.shape[-1],), vox.dtype)], axis=-1)
    matrix = direction @ np.diag(spacing)
    physical = (vox.astype(np.float64) @ matrix.T).astype(np.float32)  # d_phys = D S d_index
    # ITK arrays are index-reversed: (Z, Y, X, C) for an image indexed (x, y, z)
    array = np.ascontiguousarray(np.transpose(physical, tuple(reversed(range(ndim))) + (ndim,)))
    image = itk.image_from_array(array, ttype=itk.Image[itk.Vector[itk.F, ndim], ndim])
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction, dtype=np.float64)))
    return image


def itk_field_extension(pair: LoadedPair) -> str:
    """``.nii.gz``, except ``.nrrd`` for a one-slice 3D file ``(X, Y, 1)``: ITK's NIfTI reader (5.4) reads a
    vector image whose third axis has one voxel with spacing 1 and an in-plane-only direction, which would
    misplace an oblique slice; NRRD keeps the full 3D geometry (checked by reading back with ITK)."""
    return ".nrrd" if (not pair.is_stack and len(pair.file_shape) >= 3) else ".nii.gz"


# ------------------------------------------------------------------------------------------------ output
def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, intent: str | None = None) -> None:
    image = nib.Nifti1Image(array, affine)
    if intent:
        image.header.set_intent(intent)
    atomic_write(path, lambda tmp: nib.save(image, tmp))


def dice_scores(pred: np.ndarray, target: np.ndarray) -> dict[int, float]:
    """Dice per foreground label present in either map."""
    scores = {}
    for value in sorted((set(np.unique(pred).tolist()) | set(np.unique(target).tolist())) - {0}):
        a, b = pred == value, target == value
        denom = a.sum() + b.sum()
        scores[int(value)] = float(2.0 * np.logical_and(a, b).sum() / denom) if denom else 1.0
    return scores


class PairRegistrationRunner:
    """The ``evaluator`` of ``inference.yaml``: registers every case of ``dataset`` and writes the outputs and
    ``summary.csv`` (see the module docstring). Construction is cheap; weights are loaded in :meth:`run`.

    Args:
        dataset: a :class:`PairDataset`.
        network: the displacement network (``network_def`` on ``device``).
        output_dir: folder for the outputs (created; must not be an input folder); ``None``: ``<dataset_dir>_registered``
            beside the input folder.
        ckpt_path: flat state dict of ``network`` (``models/model.pt``); ``None`` keeps the current weights.
        image_size: the network grid.
        inferer, postprocessing: see :class:`PairRegistration`.
        score_map: also write the scoring network's score map of the fixed image.
        scoring_network, scoring_ckpt_path: the scoring network and its weights (used only with ``score_map``).
        write_itk: also write the ITK displacement field.
        exit_on_failure: raise ``SystemExit(1)`` at the end of :meth:`run` when a case failed.
        progress: show a tqdm progress bar.
        overwrite: replace an earlier run's outputs in ``output_dir`` (removed first); otherwise such a folder is
            refused before anything is written.
    """

    def __init__(
        self,
        dataset: PairDataset,
        network: torch.nn.Module,
        output_dir: str | os.PathLike | None = None,
        ckpt_path: str | None = None,
        image_size: Sequence[int] = (128, 128),
        device: str | torch.device = "cpu",
        inferer: Callable | None = None,
        postprocessing: Callable | None = None,
        score_map: bool = False,
        scoring_network: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
        scoring_ckpt_path: str | None = None,
        write_itk: bool = True,
        exit_on_failure: bool = True,
        progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        self.dataset, self.network = dataset, network
        self.output_dir = Path(output_dir) if output_dir else None
        self.ckpt_path, self.image_size, self.device = ckpt_path, tuple(image_size), torch.device(device)
        self.inferer, self.postprocessing = inferer, postprocessing
        # str2bool: the bundle CLI passes `--progress false` / `--write_itk false` as the string 'false'
        self.score_map, self.scoring_network, self.scoring_ckpt_path = str2bool(score_map), scoring_network, scoring_ckpt_path
        self.write_itk, self.exit_on_failure, self.progress = str2bool(write_itk), exit_on_failure, str2bool(progress)
        self.overwrite = str2bool(overwrite)
        self.rows: list[dict[str, Any]] = []

    # -- setup
    def _load_weights(self, network: torch.nn.Module, path: str | None, what: str) -> None:
        if path is not None:  # SystemExit naming the file: missing, empty, corrupt, non-finite or not fitting
            load_weights(network, path, what, self.device)

    def _check_output_dir(self) -> set[str]:
        """Refuse an output_dir that is an input folder or a file (nothing created); the real paths of the inputs."""
        inputs = {os.path.realpath(v) for item in self.dataset.items for k, v in item.items()
                  if k in FILE_KEYS and isinstance(v, str)}
        check_output_dir(self.output_dir, inputs, [self.dataset.dataset_dir] if self.dataset.dataset_dir else [])
        return inputs

    def build_registration(self) -> PairRegistration:
        scoring = None
        if self.score_map:
            scoring = self.scoring_network() if callable(self.scoring_network) and not isinstance(
                self.scoring_network, torch.nn.Module) else self.scoring_network
            if scoring is None:
                raise SystemExit("error: score_map needs scoring_network_def.")
            scoring = scoring.to(self.device)
            self._load_weights(scoring, self.scoring_ckpt_path, "scoring network")
        self._load_weights(self.network, self.ckpt_path, "displacement network")
        return PairRegistration(self.network, self.image_size, self.device, self.inferer, self.postprocessing, scoring)

    @staticmethod
    def is_output(entry: os.DirEntry) -> bool:
        """A file this engine writes: ``summary.csv`` or ``<case><suffix>`` for a suffix of ``OUTPUT_SUFFIXES``."""
        return entry.is_file(follow_symlinks=False) and (
            entry.name == "summary.csv" or entry.name.endswith(OUTPUT_SUFFIXES))

    # -- per case
    def _register_case(self, registration: PairRegistration, pair: LoadedPair, inputs: set[Path]) -> dict[str, Any]:
        moving = np.moveaxis(pair.moving, -1, 0) if pair.is_stack else pair.moving[None]
        fixed = np.moveaxis(pair.fixed, -1, 0) if pair.is_stack else pair.fixed[None]
        labels = None
        if pair.moving_label is not None:
            labels = np.moveaxis(pair.moving_label, -1, 0) if pair.is_stack else pair.moving_label[None]
        classes = None
        if pair.moving_label is not None:
            classes = int(max(pair.moving_label.max(), pair.fixed_label.max() if pair.fixed_label is not None else 0)) + 1
        result = registration(moving, fixed, labels, classes, score_map=self.score_map)

        def native(t: torch.Tensor) -> np.ndarray:  # (S, 1, X, Y) -> the file's spatial layout
            arr = t[:, 0].detach().cpu().numpy()
            if pair.is_stack:
                return np.moveaxis(arr, 0, -1)
            return arr[0][:, :, None] if len(pair.file_shape) >= 3 else arr[0]

        row: dict[str, Any] = {"shape": "x".join(map(str, pair.moving.shape))}
        outputs: dict[str, Path] = {}
        case = pair.case
        weights = f" (weights {self.ckpt_path})" if self.ckpt_path else ""
        for what, tensor in (("displacement field", result.ddf), ("warped image", result.warped), ("score map", result.score)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise PairError(f"{pair.files['moving']}: the network gave a {what} with NaN or infinite values{weights}; "
                                f"nothing written for this case")
        ddf_vox = voxel_ddf_array(result.ddf, pair.is_stack, pair.file_shape)
        outputs["ddf"] = self.output_dir / f"{case}_ddf.nii.gz"
        if self.write_itk:
            outputs["ddf_itk"] = self.output_dir / f"{case}_ddf_itk{itk_field_extension(pair)}"
        outputs["warped"] = self.output_dir / f"{case}_warped.nii.gz"
        warped_label = native(result.warped_label) if result.warped_label is not None else None
        if warped_label is not None:
            outputs["warped_gt"] = self.output_dir / f"{case}_warped_gt.nii.gz"
        if result.score is not None:
            outputs["score"] = self.output_dir / f"{case}_score.nii.gz"
        for path in outputs.values():  # defence in depth: case names are checked in collect_pairs
            if path.parent != self.output_dir or TMP_PATTERN.match(path.name):
                raise PairError(f"{pair.files['moving']}: output name {path.name!r} is not a plain name in output_dir")
        clash = [str(p) for p in outputs.values() if os.path.realpath(p) in inputs]
        if clash:
            raise PairError(f"{clash[0]}: output would overwrite an input file; choose another output_dir")

        field_image = None
        if self.write_itk:
            itk_ndim = 3 if len(pair.file_shape) >= 3 else 2
            vox = ddf_vox if itk_ndim == ddf_vox.ndim - 1 else ddf_vox[:, :, None, :]
            field_image = itk_displacement_field(vox, *itk_geometry(pair.files["moving"], itk_ndim))
        try:  # a case that fails half-way leaves none of its outputs behind
            _save_nifti(outputs["ddf"], ddf_vox, pair.affine, intent="vector")
            if field_image is not None:
                import itk

                atomic_write(outputs["ddf_itk"], lambda tmp: itk.imwrite(field_image, tmp))
            _save_nifti(outputs["warped"], native(result.warped).astype(np.float32), pair.affine)
            if warped_label is not None:
                _save_nifti(outputs["warped_gt"], warped_label.astype(np.int16), pair.affine)
            if result.score is not None:
                _save_nifti(outputs["score"], native(result.score).astype(np.float32), pair.affine)
        except BaseException:
            for path in outputs.values():
                path.unlink(missing_ok=True)
            raise

        row["outputs"] = ";".join(p.name for p in outputs.values())
        row["folding_pct"] = round(float(folding_percentage(result.ddf).mean()), 4)
        if warped_label is not None and pair.fixed_label is not None:
            moved = warped_label.reshape(pair.fixed_label.shape)
            scores = dice_scores(moved, pair.fixed_label)
            before = dice_scores(pair.moving_label, pair.fixed_label)
            row["dice"] = round(float(np.mean(list(scores.values()))), 4) if scores else ""
            row["dice_undeformed"] = round(float(np.mean(list(before.values()))), 4) if before else ""
            row["dice_per_class"] = ";".join(f"{k}:{v:.4f}" for k, v in scores.items())
            row["dice_undeformed_per_class"] = ";".join(f"{k}:{v:.4f}" for k, v in before.items())
        return row

    # -- driver
    def run(self) -> list[dict[str, Any]]:
        """Register every case; write outputs and ``summary.csv``; ``SystemExit(1)`` if any case failed.

        Before any case: the cases are collected, ``output_dir`` is checked (not an input folder, not a file), the
        weights are loaded and checked, and only then ``output_dir`` is created, checked writable and cleared of
        temporary files of a killed run; an earlier run's outputs there are refused, or removed with ``overwrite``;
        any problem there ends the run with a message and nothing written."""
        try:
            num_cases = len(self.dataset)
        except DatasetError as error:
            raise SystemExit(f"error: {error}") from None
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.dataset.dataset_dir, "_registered")
        logger.info(f"outputs: {self.output_dir}")
        inputs = self._check_output_dir()
        registration = self.build_registration()
        claim_output_dir(self.output_dir, self.is_output, self.overwrite, inputs)
        prepare_output_dir(self.output_dir)
        self.rows = []
        indices: Any = range(num_cases)
        if self.progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc="registering", unit="pair")
        for index in indices:
            self.rows.append(self._run_case(registration, index, inputs))
        summary = self.output_dir / "summary.csv"

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                for r in self.rows:
                    writer.writerow({k: r.get(k, "") for k in CSV_COLUMNS})

        try:
            atomic_write(summary, write_csv)
        except OSError as error:
            raise SystemExit(f"error: {summary}: cannot be written ({error.strerror or error}); the outputs of the "
                             f"cases are in {self.output_dir}.") from None
        failed = [r for r in self.rows if r["status"] != "ok"]
        message = f"{len(self.rows) - len(failed)} of {len(self.rows)} pairs registered into {self.output_dir}"
        if failed:
            message += f"; FAILED: {', '.join(str(r['case']) for r in failed)} (see {summary})"
        print(message)
        if failed and self.exit_on_failure:
            raise SystemExit(1)
        return self.rows

    def _run_case(self, registration: PairRegistration, index: int, inputs: set[str]) -> dict[str, Any]:
        """One case, whatever happens: a row with status ``ok`` or ``failed`` and the error naming the file."""
        item = self.dataset.items[index]
        case = str(item.get("case", ""))
        row: dict[str, Any] = {k: str(item.get(k, "")) for k in ("case", *FILE_KEYS)}
        notes = list(item.get("notes") or [])
        start = time.perf_counter()
        try:
            pair = self.dataset[index]
            notes = list(pair.notes)
            row.update(self._register_case(registration, pair, inputs))
            row.update(status="ok", error="")
        except (PairError, DatasetError) as error:
            row.update(status="failed", error=str(error))
        except Exception as error:  # an unexpected failure of one case must not stop the others
            where = item.get("moving") or case
            row.update(status="failed", error=f"{where}: {type(error).__name__}: {error}")
            logger.debug(f"case {case}: unexpected error", exc_info=True)
        if row["status"] != "ok":
            logger.error(f"case {case}: {row['error']}")
        for note in notes:
            logger.warning(f"{case}: {note}")
        row["notes"] = "; ".join(notes)
        row["time_s"] = round(time.perf_counter() - start, 4)
        return row
