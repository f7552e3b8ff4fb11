"""Reading, checking and registering NIfTI pairs at their native size and geometry, and writing the fields: the pure
helpers of the inference engine (``inference_engine.py``, ``configs/inference.yaml``), whose outputs are described there.

* the pairs: :func:`collect_pairs` (one discovery and naming rule for a folder, ``io_safety.match_named_files``, or a
  datalist's ``testing`` section), :func:`load_pair` (a case read and checked, problems raised as :class:`PairError`
  naming the file: unreadable files or symbolic link loops, unequal shapes, non-finite or constant images, label maps
  with non-integer, negative or huge values);
* the field between the network grid and the native grid: :class:`FieldToNatived` (the config's ``postprocessing``),
  :func:`resize_ddf`, :func:`minmax_resize` (the config's ``preprocessing``, batched) and :func:`warp_native` (image
  and labels warped at native size);
* :class:`PairRegistration`: one pair in memory (MONAI Label's propagation, benchmarks), with the same steps;
* the files: :func:`voxel_ddf_array` (the field on the moving file's grid), :func:`itk_geometry` /
  :func:`itk_displacement_field` / :func:`itk_field_extension` (the ITK field on the moving image's geometry as ITK
  reads it) and :func:`save_nifti` (atomic).
"""

from __future__ import annotations

import logging
import os
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

from .data import DatasetError
from .evaluator import one_hot
from .io_safety import (
    PAIR_FRAMES, PAIR_RULE, assign_case_names, atomic_write, constant_problem, input_file_problem, label_problem,
    list_dataset_folder, match_named_files, nifti_stem, read_datalist,
)

logger = logging.getLogger(__name__)

FILE_KEYS = ("moving", "fixed", "moving_label", "fixed_label")
MAX_LABEL = 255  # label maps with larger values fail by name (an image given as labels, a corrupt file)


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

    def slices(self, array: np.ndarray) -> np.ndarray:
        """An array of this pair ``(X, Y)`` / ``(X, Y, Z)`` -> its slices ``(S, X, Y)`` (one for a 2D image)."""
        return np.moveaxis(array, -1, 0) if self.is_stack else array[None]

    def file_layout(self, tensor: torch.Tensor) -> np.ndarray:
        """Slices ``(S, 1, X, Y)`` -> the moving file's spatial layout: ``(X, Y)``, ``(X, Y, 1)`` or ``(X, Y, Z)``."""
        array = tensor[:, 0].detach().cpu().numpy()
        if self.is_stack:
            return np.moveaxis(array, 0, -1)
        return array[0][:, :, None] if len(self.file_shape) >= 3 else array[0]


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
        refiner: optional test-time refinement of each slice's field (``refinement.InstanceRefiner``).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        image_size: Sequence[int] = (128, 128),
        device: str | torch.device = "cpu",
        inferer: Callable | None = None,
        postprocessing: Callable | None = None,
        scoring_network: torch.nn.Module | None = None,
        refiner: Any = None,
    ) -> None:
        self.network = network
        self.refiner = refiner if (refiner is not None and refiner.active) else None
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
        ddf_net = self.inferer(image, self.network) if self.refiner is None else self.refiner(self.network, image).ddf
        ddf = self.postprocessing({"pred": ddf_net, "native_size": native})["pred"]
        warped, warped_label = warp_native(self.warp, mov, ddf, moving_label)
        result = PairResult(ddf=ddf, warped=warped, warped_label=warped_label)
        if score_map:
            if self.scoring_network is None:
                raise ValueError("score_map requested but no scoring network was given.")
            self.scoring_network.eval()
            score = self.scoring_network(image[:, 1:2])
            result.score = F.interpolate(score, size=native, mode="bilinear", align_corners=False)
        return result


def warp_native(warp: Warp, moving: torch.Tensor, ddf: torch.Tensor, moving_label: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Warp native slices ``(S, 1, H, W)`` (and integer labels ``(S, H, W)``, optional) by a native field
    ``(S, 2, H, W)``: the image bilinear; the labels one channel per value present (plus background 0), each warped
    bilinearly with the image in one pass (one sampling grid), then argmax. The same argmax as a full one-hot (absent
    classes warp to 0 everywhere), with memory bounded by the values present, not by the largest value."""
    if moving_label is None:
        return warp(moving, ddf), None
    labels = torch.as_tensor(moving_label, device=moving.device).long()
    labels = (labels[None] if labels.ndim == 2 else labels).contiguous()
    values = torch.unique(torch.cat([labels.new_zeros(1), labels.flatten()]))
    index = torch.searchsorted(values, labels)
    channels = one_hot(index[:, None], max(len(values), 2))
    both = warp(torch.cat([moving, channels], 1), ddf)
    winner = both[:, 1:1 + len(values)].argmax(1, keepdim=True)
    return both[:, :1], values[winner]


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
def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, intent: str | None = None) -> None:
    image = nib.Nifti1Image(array, affine)
    if intent:
        image.header.set_intent(intent)
    atomic_write(path, lambda tmp: nib.save(image, tmp))
