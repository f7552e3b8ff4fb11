"""Registration datalists: the built-in phantom, or moving/fixed NIfTI pairs on disk, checked before training.

Pairs on disk follow one of two rules (documented in ``docs/README.md``):

* a folder with ``<case>_ED.nii.gz`` (moving) and ``<case>_ES.nii.gz`` (fixed), optionally
  ``<case>_ED_gt.nii.gz`` / ``<case>_ES_gt.nii.gz`` (labels);
* a datalist JSON (``{"training": [...], "validation": [...], "testing": [...]}``) whose items name
  ``moving``, ``fixed`` and optionally ``moving_label``, ``fixed_label``, relative to ``dataset_dir``.

Every problem (missing folder or file, unreadable file, unequal shapes, wrong dimensionality) is reported
with the file's name, all at once, as a :class:`DatasetError`. Before a training or an evaluation
(:func:`require_valid_dataset`) every file is also read once in full: truncated data, NaN or Inf values, a constant
image, and label values that are not integers in ``0 .. num_classes - 1`` are reported the same way.

Labels are optional: training never uses them (they are not loaded for training pairs); validation uses the pairs
that have both labels (Dice needs them), and there must be at least one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Hashable, Iterator, Mapping, Sequence, Sized

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import MapTransform
from torch.utils.data import Sampler

from .phantom import phantom_datalist

PAIR_KEYS = ("moving", "fixed", "moving_label", "fixed_label")
IMAGE_KEYS = ("moving", "fixed")
LABEL_KEYS = ("moving_label", "fixed_label")

logger = logging.getLogger(__name__)
_said: set[str] = set()


def _say_once(message: str) -> None:
    """Log a warning once per process (datalists are built more than once per run)."""
    if message not in _said:
        _said.add(message)
        logger.warning(message)


class DatasetError(ValueError):
    """A dataset problem a user can fix: the message names every offending file."""


def find_pairs(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Pairs in ``dataset_dir`` by the naming rule ``<case>_ED[_gt].nii[.gz]`` / ``<case>_ES[_gt].nii[.gz]``
    (``ED``/``ES``/``gt`` in any case: ``x_ed.nii.gz``); other files are named in one warning, hidden ones skipped.

    A case with only one of ED/ES is an error; labels are kept only when both frames have one.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist (set --dataset_dir to a folder of NIfTI pairs).")
    from .io_safety import PAIR_FRAMES, PAIR_RULE, match_named_files  # io_safety imports this module

    cases: dict[str, dict[str, str]] = {}
    problems = []
    for path, case, key in match_named_files(sorted(root.iterdir()), PAIR_FRAMES, PAIR_RULE, root, _say_once):
        files = cases.setdefault(case, {})
        if key in files:  # x_ED.nii and x_ED.nii.gz (or x_ed.nii.gz): which one is meant cannot be guessed
            problems.append(f"{files[key]} and {path}: two files for the same frame of case '{case}' (keep one)")
            continue
        files[key] = str(path)
    pairs = []
    for case, files in sorted(cases.items()):
        missing = [k for k in IMAGE_KEYS if k not in files]
        if missing:
            have = ", ".join(Path(f).name for f in files.values())
            problems.append(f"{have}: case '{case}' has no {' or '.join('ED' if k == 'moving' else 'ES' for k in missing)} frame")
            continue
        if not all(k in files for k in LABEL_KEYS):
            if any(k in files for k in LABEL_KEYS):
                only = ", ".join(Path(files[k]).name for k in LABEL_KEYS if k in files)
                _say_once(f"{only}: case '{case}' has a label for one frame only; its labels are not used")
            files = {k: v for k, v in files.items() if k in IMAGE_KEYS}
        pairs.append({"case": case, **files})
    if problems:
        raise DatasetError("dataset problems:\n  " + "\n  ".join(problems))
    if not pairs:
        raise DatasetError(f"{root}: no <case>_ED.nii.gz / <case>_ES.nii.gz pairs found.")
    return pairs


def read_json_datalist(path: Path) -> Any:
    """The parsed content of a datalist file; ``DatasetError`` naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not a readable JSON datalist ({error}).") from None


def load_datalist_json(path: str | os.PathLike, section: str, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Items of ``section`` in a datalist JSON, with paths made absolute against ``base_dir`` (default: its folder).

    Loaded by ``monai.data.load_decathlon_datalist``, after a check of the file's structure that names the file and
    the problem (MONAI's loader would fail on a top-level list or a non-list section with a bare ``TypeError``, and
    would turn an empty path into ``base_dir`` itself).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: datalist file does not exist.")
    content = read_json_datalist(path)
    if not isinstance(content, dict):
        raise DatasetError(
            f"{path}: the datalist must be a JSON object with 'training', 'validation' and 'testing' sections, "
            f"not {_json_type(content)}."
        )
    if section not in content:
        raise DatasetError(f"{path}: has no '{section}' section (found: {', '.join(content) or 'none'}).")
    if not isinstance(content[section], list):
        raise DatasetError(f"{path}: section '{section}' must be a list of pairs, not {_json_type(content[section])}.")
    base = Path(base_dir) if base_dir else path.parent
    for i, item in enumerate(content[section]):
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: item {i} of '{section}' must be an object with 'moving' and 'fixed' paths, "
                               f"not {_json_type(item)}.")
        missing = [k for k in IMAGE_KEYS if k not in item]
        if missing:
            raise DatasetError(f"{path}: item {i} of '{section}' has no {', '.join(missing)} entry.")
        for key in PAIR_KEYS:
            if key in item and (not isinstance(item[key], str) or not item[key].strip()):
                raise DatasetError(f"{path}: item {i} of '{section}': '{key}' must be a file path (a non-empty "
                                   f"string), not {json.dumps(item[key])}.")
    loaded = load_decathlon_datalist(path, is_segmentation=False, data_list_key=section, base_dir=base)
    # MONAI joins an entry to base_dir only when that path exists, whatever its key: a missing file is joined here
    # too (the check then names where it was looked for), and the entries that are not files stay as written (a
    # "case": "patient001" beside a folder patient001/ stays a name)
    for item, raw in zip(loaded, content[section]):
        for key in item:
            if key not in PAIR_KEYS:
                item[key] = raw[key]
            elif item[key] == raw[key] and not os.path.isabs(raw[key]):
                item[key] = os.path.normpath(base / raw[key])
    return loaded


def _json_type(value: Any) -> str:
    """'an object', 'a list', ... : what a JSON value is, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null" if value is None else f"a {type(value).__name__}")


def check_pairs(
    items: Sequence[Mapping[str, Any]],
    spatial_dims: int = 2,
    read_data: bool = False,
    num_classes: int | None = None,
) -> list[str]:
    """Problems of a datalist, one line per offending file (empty list when all is well).

    Reads NIfTI headers. An image must have ``spatial_dims`` dimensions (a trailing singleton dimension
    is allowed for 2D); moving, fixed and their labels must share one shape. With ``read_data`` every file that
    passes is also read in full (:func:`content_problems`).
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
            if read_data:
                problems += content_problems(filename, key in LABEL_KEYS, num_classes)
        distinct = {shape for _, shape in shapes.values()}
        if len(distinct) > 1:
            listing = ", ".join(f"{Path(f).name} {s}" for f, s in shapes.values())
            problems.append(f"{item.get('moving', '?')}: pair has unequal shapes ({listing})")
    return problems


def content_problems(filename: str, is_label: bool = False, num_classes: int | None = None) -> list[str]:
    """Problems of one file's data, read in full: truncated or corrupt data, NaN or Inf values, a constant image,
    label values that are not integers or outside ``0 .. num_classes - 1`` (each one line naming the file)."""
    try:
        data = np.asanyarray(nib.load(filename).dataobj)
    except Exception as error:  # nibabel / gzip / zlib raise several types for truncated data
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return [f"{filename}: the data cannot be read: truncated or corrupt file ({type(error).__name__}"
                f"{': ' + reason if reason else ''})"]
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        return [f"{filename}: unsupported data type {data.dtype} (expected real numbers)"]
    data = data.astype(np.float64, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        return [f"{filename}: contains {nan} NaN and {inf} infinite values (of {data.size}); "
                f"{'labels' if is_label else 'images'} must be finite (training would diverge to a NaN model)"]
    if not is_label:
        if data.size and data.min() == data.max():
            return [f"{filename}: the image is constant (every pixel {data.flat[0]:g}): nothing to register "
                    "(min-max scaling makes it all zero)"]
        return []
    values = np.unique(data)
    fractional = values[values != np.round(values)]
    if fractional.size:
        return [f"{filename}: label values must be integers (found {', '.join(f'{v:g}' for v in fractional[:5])})"]
    upper = num_classes - 1 if num_classes else None
    outside = values[(values < 0) | ((values > upper) if upper is not None else False)]
    if outside.size:
        allowed = f"0..{upper} (num_classes {num_classes})" if upper is not None else "0 or more"
        return [f"{filename}: label values outside {allowed}: found {', '.join(f'{v:g}' for v in outside[:5])}"
                f"{' ...' if outside.size > 5 else ''}"]
    return []


def has_labels(item: Mapping[str, Any]) -> bool:
    return all(k in item for k in LABEL_KEYS)


def split_cases(items: Sequence[dict], section: str, validation_every: int = 5) -> list[dict]:
    """Split of a folder without a datalist: every ``validation_every``-th case (sorted) validates,
    the others train; ``testing`` takes every case. When only some cases have labels, every
    ``validation_every``-th *labelled* case validates (validation needs labels); unlabelled cases train."""
    if section == "testing" or len(items) < 2:
        return list(items)
    labelled = [i for i, item in enumerate(items) if has_labels(item)]
    pool = labelled if labelled and len(labelled) < len(items) else list(range(len(items)))
    chosen = [index for rank, index in enumerate(pool) if rank % validation_every == validation_every - 1]
    if not chosen:
        chosen = [pool[-1]]
    is_validation = [i in set(chosen) for i in range(len(items))]
    return [item for item, val in zip(items, is_validation) if val == (section == "validation")]


def pair_datalist(
    dataset_dir: str | os.PathLike | None,
    section: str = "training",
    datalist_file: str | None = None,
    require_labels: bool | None = None,
    read_data: bool = False,
    num_classes: int | None = None,
) -> list[dict[str, Any]]:
    """Checked datalist of NIfTI pairs, from a datalist JSON when given, else by the naming rule
    (split by :func:`split_cases`).

    * ``training``: the labels are dropped (the trainer does not use them), so labelled and unlabelled pairs mix;
    * ``validation``: only the pairs with both labels validate (a warning names the others); at least one must;
    * ``testing``: every pair must have both labels unless ``require_labels`` is False (inference).

    ``read_data`` reads every file in full (:func:`content_problems`; before a run, :func:`require_valid_dataset`).
    """
    if not dataset_dir:
        raise DatasetError("no dataset folder given: set --dataset_dir to a folder of <case>_ED/_ES NIfTI pairs.")
    if not Path(dataset_dir).is_dir():
        raise DatasetError(f"{dataset_dir}: dataset folder does not exist (set --dataset_dir to a folder of NIfTI pairs).")
    if datalist_file:
        items = load_datalist_json(datalist_file, section, dataset_dir)
    else:
        items = split_cases(find_pairs(dataset_dir), section)
    if section == "training":
        items = [{k: v for k, v in item.items() if k not in LABEL_KEYS} for item in items]
    problems = []
    if section == "validation" and require_labels is not False:
        unlabelled = [item for item in items if not has_labels(item)]
        items = [item for item in items if has_labels(item)]
        if unlabelled and items:
            names = ", ".join(Path(item["moving"]).name for item in unlabelled)
            _say_once(f"validation: {len(unlabelled)} pair(s) without both labels left out (validation Dice is over "
                      f"the {len(items)} labelled pair(s)): {names}")
        elif unlabelled:
            problems += [f"{item['moving']}: validation pair has no labels (needs <case>_ED_gt and <case>_ES_gt)"
                         for item in unlabelled]
            problems.append("validation needs at least one pair with both labels (validation Dice)")
    elif require_labels or (require_labels is None and section == "testing"):
        problems += [f"{item['moving']}: {section} pair has no labels (needs <case>_ED_gt and <case>_ES_gt)"
                     for item in items if not has_labels(item)]
    problems = check_pairs(items, read_data=read_data, num_classes=num_classes) + problems
    if problems:
        raise DatasetError("dataset problems:\n  " + "\n  ".join(problems))
    return items


def registration_datalist(
    dataset_dir: str | None,
    section: str = "training",
    datalist_file: str | None = None,
    num_phantom_pairs: int = 200,
    first_phantom_index: int = 0,
    read_data: bool = False,
    num_classes: int | None = None,
) -> list[dict[str, Any]]:
    """The phantom's indices when ``dataset_dir`` is empty, else the checked NIfTI pairs on disk."""
    if not dataset_dir:
        return phantom_datalist(num_phantom_pairs, first_phantom_index)
    return pair_datalist(dataset_dir, section, datalist_file, read_data=read_data, num_classes=num_classes)


def require_valid_dataset(
    dataset_dir: str | None,
    datalist_file: str | None = None,
    sections: Sequence[str] = (),
    num_classes: int | None = None,
) -> None:
    """Stop with one clear message (no traceback) when the dataset has problems; used in ``initialize``.

    Every file of the ``sections`` is read in full once here (truncated data, NaN / Inf, constant images, label
    values outside ``0 .. num_classes - 1``), so that no bad value reaches the training.
    """
    problems: list[str] = []
    for section in sections or ("training",):
        try:
            registration_datalist(dataset_dir, section, datalist_file, read_data=True, num_classes=num_classes)
        except DatasetError as error:
            lines = str(error).splitlines()
            found = [line.strip() for line in lines[1:]] if lines[0] == "dataset problems:" else [str(error)]
            problems += [line for line in found if line not in problems]
    if problems:
        raise SystemExit("error: dataset problems:\n  " + "\n  ".join(problems)) from None


class DropSingletonDepthd(MapTransform):
    """(C, H, W, 1) -> (C, H, W): 2D images stored as one-slice NIfTI volumes; anything else passes unchanged.

    Ours: MONAI's ``SqueezeDimd(dim=-1)`` raises on a stack whose last axis is not 1 (a dataset may mix both).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            value = out[key]
            if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[-1] == 1:
                out[key] = value[..., 0]
        return out


class CopyMetad(MapTransform):
    """Give ``keys`` (e.g. the predicted field, the warped image) the metadata of ``source_key`` (the moving image),
    so that savers write them in the moving image's geometry and name them after it.

    Ours: MONAI's ``CopyItemsd`` copies data to new keys; nothing in MONAI copies one key's metadata onto others.
    """

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

    Ours: MONAI's ``DistributedSampler`` / ``DistributedWeightedRandomSampler`` give each rank its own part of the
    dataset, so N processes would not draw the pairs one process draws; here every rank shares one global draw.

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
