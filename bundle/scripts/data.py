"""Registration datalists: the built-in phantom, or moving/fixed NIfTI pairs on disk, checked before training.

Pairs on disk follow one of two rules (documented in ``docs/README.md``):

* a folder with ``<case>_ED.nii.gz`` (moving) and ``<case>_ES.nii.gz`` (fixed), optionally
  ``<case>_ED_gt.nii.gz`` / ``<case>_ES_gt.nii.gz`` (labels);
* a datalist JSON (``{"training": [...], "validation": [...], "testing": [...]}``) whose items name
  ``moving``, ``fixed`` and optionally ``moving_label``, ``fixed_label``, relative to ``dataset_dir``.

Every problem (missing folder or file, unreadable file, unequal shapes, wrong dimensionality) is reported
with the file's name, all at once, as a :class:`DatasetError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Hashable, Iterator, Mapping, Sequence, Sized

import nibabel as nib
import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch.utils.data import Sampler

from .phantom import phantom_datalist

PAIR_KEYS = ("moving", "fixed", "moving_label", "fixed_label")
IMAGE_KEYS = ("moving", "fixed")
LABEL_KEYS = ("moving_label", "fixed_label")
_PAIR_PATTERN = re.compile(r"^(?P<case>.+)_(?P<phase>ED|ES)(?P<gt>_gt)?\.nii(\.gz)?$")


class DatasetError(ValueError):
    """A dataset problem a user can fix: the message names every offending file."""


def find_pairs(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Pairs in ``dataset_dir`` by the naming rule ``<case>_ED[_gt].nii[.gz]`` / ``<case>_ES[_gt].nii[.gz]``.

    A case with only one of ED/ES is an error; labels are kept only when both frames have one.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist (set --dataset_dir to a folder of NIfTI pairs).")
    cases: dict[str, dict[str, str]] = {}
    for path in sorted(root.iterdir()):
        match = _PAIR_PATTERN.match(path.name)
        if match:
            key = {"ED": "moving", "ES": "fixed"}[match["phase"]] + ("_label" if match["gt"] else "")
            cases.setdefault(match["case"], {})[key] = str(path)
    problems = []
    pairs = []
    for case, files in sorted(cases.items()):
        missing = [k for k in IMAGE_KEYS if k not in files]
        if missing:
            have = ", ".join(Path(f).name for f in files.values())
            problems.append(f"{have}: case '{case}' has no {' or '.join('ED' if k == 'moving' else 'ES' for k in missing)} frame")
            continue
        if not all(k in files for k in LABEL_KEYS):
            files = {k: v for k, v in files.items() if k in IMAGE_KEYS}
        pairs.append({"case": case, **files})
    if problems:
        raise DatasetError("dataset problems:\n  " + "\n  ".join(problems))
    if not pairs:
        raise DatasetError(f"{root}: no <case>_ED.nii.gz / <case>_ES.nii.gz pairs found.")
    return pairs


def load_datalist_json(path: str | os.PathLike, section: str, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Items of ``section`` in a datalist JSON, with paths made absolute against ``base_dir`` (default: its folder)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: datalist file does not exist.")
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not a readable JSON datalist ({error}).") from None
    if section not in content:
        raise DatasetError(f"{path}: has no '{section}' section (found: {', '.join(content) or 'none'}).")
    base = Path(base_dir) if base_dir else path.parent
    items = []
    for i, item in enumerate(content[section]):
        missing = [k for k in IMAGE_KEYS if k not in item]
        if missing:
            raise DatasetError(f"{path}: item {i} of '{section}' has no {', '.join(missing)} entry.")
        items.append({k: (str(base / v) if k in PAIR_KEYS else v) for k, v in item.items()})
    return items


def check_pairs(items: Sequence[Mapping[str, Any]], spatial_dims: int = 2) -> list[str]:
    """Problems of a datalist, one line per offending file (empty list when all is well).

    Reads NIfTI headers only. An image must have ``spatial_dims`` dimensions (a trailing singleton dimension
    is allowed for 2D); moving, fixed and their labels must share one shape.
    """
    problems = []
    for item in items:
        shapes = {}
        for key in PAIR_KEYS:
            if key not in item:
                continue
            filename = item[key]
            if not os.path.isfile(filename):
                problems.append(f"{filename}: file does not exist")
                continue
            try:
                shape = tuple(int(s) for s in nib.load(filename).shape)
            except Exception as error:  # nibabel raises several types for corrupt files
                problems.append(f"{filename}: cannot be read as NIfTI ({type(error).__name__}: {error})")
                continue
            squeezed = shape[:2] if len(shape) == 3 and shape[2] == 1 and spatial_dims == 2 else shape
            if len(squeezed) != spatial_dims:
                problems.append(f"{filename}: is {len(shape)}D with shape {shape}, expected a {spatial_dims}D image")
                continue
            shapes[key] = (filename, squeezed)
        distinct = {shape for _, shape in shapes.values()}
        if len(distinct) > 1:
            listing = ", ".join(f"{Path(f).name} {s}" for f, s in shapes.values())
            problems.append(f"{item.get('moving', '?')}: pair has unequal shapes ({listing})")
    return problems


def split_cases(items: Sequence[dict], section: str, validation_every: int = 5) -> list[dict]:
    """Split of a folder without a datalist: every ``validation_every``-th case (sorted) validates,
    the others train; ``testing`` takes every case."""
    if section == "testing" or len(items) < 2:
        return list(items)
    is_validation = [i % validation_every == validation_every - 1 for i in range(len(items))]
    if not any(is_validation):
        is_validation[-1] = True
    return [item for item, val in zip(items, is_validation) if val == (section == "validation")]


def pair_datalist(
    dataset_dir: str | os.PathLike | None,
    section: str = "training",
    datalist_file: str | None = None,
    require_labels: bool | None = None,
) -> list[dict[str, Any]]:
    """Checked datalist of NIfTI pairs, from a datalist JSON when given, else by the naming rule
    (split by :func:`split_cases`). Validation and testing pairs must have both labels unless
    ``require_labels`` is False (inference)."""
    if not dataset_dir:
        raise DatasetError("no dataset folder given: set --dataset_dir to a folder of <case>_ED/_ES NIfTI pairs.")
    if not Path(dataset_dir).is_dir():
        raise DatasetError(f"{dataset_dir}: dataset folder does not exist (set --dataset_dir to a folder of NIfTI pairs).")
    if datalist_file:
        items = load_datalist_json(datalist_file, section, dataset_dir)
    else:
        items = split_cases(find_pairs(dataset_dir), section)
    problems = check_pairs(items)
    if require_labels is None:
        require_labels = section in ("validation", "testing")
    if require_labels:
        problems += [f"{item['moving']}: {section} pair has no labels (needs <case>_ED_gt and <case>_ES_gt)"
                     for item in items if not all(k in item for k in LABEL_KEYS)]
    if problems:
        raise DatasetError("dataset problems:\n  " + "\n  ".join(problems))
    return items


def registration_datalist(
    dataset_dir: str | None,
    section: str = "training",
    datalist_file: str | None = None,
    num_phantom_pairs: int = 200,
    first_phantom_index: int = 0,
) -> list[dict[str, Any]]:
    """The phantom's indices when ``dataset_dir`` is empty, else the checked NIfTI pairs on disk."""
    if not dataset_dir:
        return phantom_datalist(num_phantom_pairs, first_phantom_index)
    return pair_datalist(dataset_dir, section, datalist_file)


def require_valid_dataset(dataset_dir: str | None, datalist_file: str | None = None, sections: Sequence[str] = ()) -> None:
    """Stop with one clear message (no traceback) when the dataset has problems; used in ``initialize``."""
    try:
        for section in sections or ("training",):
            registration_datalist(dataset_dir, section, datalist_file)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None


class DropSingletonDepthd(MapTransform):
    """(C, H, W, 1) -> (C, H, W): 2D images stored as one-slice NIfTI volumes."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            value = out[key]
            if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[-1] == 1:
                out[key] = value[..., 0]
        return out


class CopyMetad(MapTransform):
    """Give ``keys`` (e.g. the predicted field, the warped image) the metadata of ``source_key`` (the moving image),
    so that savers write them in the moving image's geometry and name them after it."""

    def __init__(self, keys: Sequence[str], source_key: str = "moving", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        source = out[self.source_key]
        meta = dict(source.meta) if isinstance(source, MetaTensor) else {}
        for key in self.key_iterator(out):
            value = out[key]
            plain = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            out[key] = MetaTensor(plain, meta=dict(meta))
        return out


class PairSampler(Sampler):
    """Pairs drawn uniformly with replacement (the paper's sampling), data-parallel aware.

    Every rank draws the same global sequence (seeded by ``seed`` and the epoch) and takes its share of every
    global micro-batch, so N processes with ``batch_size`` b see exactly the pairs one process with batch N*b sees.

    Args:
        dataset: the training dataset.
        num_samples: samples per epoch for this rank (epoch_length * batch_size).
        batch_size: this rank's micro-batch size.
    """

    def __init__(
        self,
        dataset: Sized,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas or (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if num_samples % batch_size:
            raise ValueError(f"num_samples ({num_samples}) must be a multiple of batch_size ({batch_size}).")
        self.dataset, self.num_samples, self.batch_size, self.seed = dataset, num_samples, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.num_samples * self.num_replicas
        indices = torch.randint(len(self.dataset), (total,), generator=generator)
        indices = indices.view(-1, self.num_replicas, self.batch_size)[:, self.rank].flatten()
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.num_samples
