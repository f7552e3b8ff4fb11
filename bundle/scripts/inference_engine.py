"""Folder inference as a MONAI ``Evaluator``: the engine of ``inference.yaml``.

For every pair (``<case>_ED.nii.gz`` moving, ``<case>_ES.nii.gz`` fixed, optional ``<case>_ED_gt.nii.gz`` /
``<case>_ES_gt.nii.gz``; or the ``testing`` section of a datalist JSON) the engine writes into ``output_dir``:

* ``<case>_ddf.nii.gz``: the displacement field on the moving image's voxel grid, with its affine; array
  ``(X, Y, C)`` for a 2D image (``(X, Y, 1, C)`` if stored with a singleton third axis) or ``(X, Y, Z, 3)``
  for a short-axis stack; **voxel units of the input grid, component i along NIfTI array axis i** (for stacks
  the through-plane component is 0), pull convention of MONAI ``Warp``: ``warped[x] = moving[x + ddf[x]]``.
* ``<case>_ddf_itk.nii.gz`` (``.nrrd`` for one-slice ``(X, Y, 1)`` files, see ``registration_io.itk_field_extension``):
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

Images of any in-plane size are min-max scaled and resized to the network grid (``image_size``, the config's
``preprocessing``); the field is resized back to the native grid and its vectors scaled by the size ratio (the
config's ``postprocessing``). 3D stacks are registered slice by
slice (slices along the third array axis). Every problem of a pair (unreadable file or symbolic link loop, missing
partner, two files for one frame, unequal shapes, a constant image, a label map with non-integer, negative or huge
values, a non-finite field, a case name that would leave ``output_dir``) is reported by name in the log and the CSV;
the other pairs still finish; the run ends with ``SystemExit(1)`` when any pair failed. ``output_dir`` defaults
to ``<dataset_dir>_registered`` beside the input folder; one that holds an earlier run's outputs is refused unless
``overwrite`` (which removes them first), so the folder and ``summary.csv`` always agree. Problems that stop the run before any case (no pairs, an
unreadable or malformed datalist, weights that are missing, corrupt, non-finite or do not fit, an ``image_size``
the network cannot take (:func:`check_image_size`), an output folder that is an input folder, a file or not
writable) end it with a message naming the file and nothing written. Inputs are never overwritten and every output
file is written to a temporary name in ``output_dir`` and renamed into place (whole or absent); temporary files of a
killed run are removed at the next start (``io_safety``).

The parts, each configured in ``inference.yaml``:

* :class:`PairCases`: the cases of a folder or datalist (``registration_io.collect_pairs``), each read and checked
  (``load_pair``) and cut into network-grid slices by the config's ``preprocessing`` (dict transforms on one pair of
  ``(1, H, W)`` slices); a case that cannot be read becomes a dict with its ``error`` instead of raising;
* :class:`PairInferenceEvaluator`: a :class:`~scripts.evaluator.RegistrationEvaluator` whose iteration runs the
  network on the slices (the parent's iteration; ``postprocessing`` maps the field to the native grid on
  ``MODEL_COMPLETED``), warps the moving image and labels at native size and computes the score map; any error of a
  case is caught there and handed on as ``status: failed`` with a one-line message naming the file;
* handlers: MONAI's ``CheckpointLoader`` (weights; checked first by :func:`check_weights`), ignite's
  ``ProgressBar`` (``--progress false``), :class:`RegistrationWriter` (``ITERATION_COMPLETED``: each case's files,
  atomically) and :class:`RegistrationSummary` (``summary.csv``, Dice, the closing line, exit status 1 when a case
  failed).

:func:`register_folder` runs the bundle's config in-process (for tools and tests).
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.utils import CommonKeys as Keys
from monai.utils import convert_to_tensor, str2bool
from torch.utils.data import Dataset

from .checkpoints import TrainingStopped
from .data import DatasetError
from .evaluator import RegistrationEvaluator, RegistrationKeys
from .io_safety import (
    TMP_PATTERN, atomic_write, check_output_dir, claim_output_dir, default_output_dir, load_weights, prepare_output_dir,
)
from .metrics import dice_scores, folding_percentage
from .registration_io import (
    FILE_KEYS, MAX_LABEL, LoadedPair, PairError, collect_pairs, itk_displacement_field, itk_field_extension,
    itk_geometry, load_pair, save_nifti, voxel_ddf_array, warp_native,
)

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = ("_ddf.nii.gz", "_ddf_itk.nii.gz", "_ddf_itk.nrrd", "_warped.nii.gz", "_warped_gt.nii.gz", "_score.nii.gz")
SUMMARY = "summary.csv"
CSV_COLUMNS = (
    "case", "status", "error", "notes", "moving", "fixed", "moving_label", "fixed_label", "shape", "outputs",
    "dice", "dice_undeformed", "dice_per_class", "dice_undeformed_per_class", "folding_pct", "time_s",
)
STATUS, ERROR, SCORE = "status", "error", "score"


def case_error(error: BaseException, item: dict[str, Any]) -> str:
    """One line naming the file: a :class:`PairError` / ``DatasetError`` as it is, anything else with its type."""
    if isinstance(error, (PairError, DatasetError)):
        return str(error)
    logger.debug(f"case {item.get('case', '')}: unexpected error", exc_info=error)
    return f"{item.get('moving') or item.get('case', '')}: {type(error).__name__}: {error}"


def one_case(batch: list[dict]) -> dict:
    """``collate_fn`` of the data loader: one case per iteration, as it is (slices of any native size)."""
    return batch[0]


def check_weights(network: torch.nn.Module | None, path: str | None, what: str, device: Any = "cpu") -> None:
    """The check before ``CheckpointLoader`` loads ``path``: a missing, empty, corrupt, non-finite or
    non-fitting file stops the run with one line naming it (``io_safety.load_weights`` on a copy of the network)."""
    if path is None:
        return
    if network is None:
        raise SystemExit(f"error: {what} weights {path} given but no {what} is configured.")
    load_weights(copy.deepcopy(network), path, what, device)


def check_image_size(network: torch.nn.Module, image_size: Sequence[int], what: str = "displacement network",
                     device: Any = "cpu") -> None:
    """One pass of zeros on the network grid before anything is written: a network that cannot take ``image_size``
    (``TransMorph2D``: H, W multiples of 32; the VoxelMorph UNet: of 16, its ``size_multiple``) or does not return a
    field of that size stops the run with one line naming the network and the sizes it takes."""
    try:
        size = [int(s) for s in image_size]
    except (TypeError, ValueError):
        size = []
    if len(size) != 2 or min(size) < 1:
        raise SystemExit(f"error: image_size {image_size}: expected two positive sizes [H, W] (the network grid, "
                         f"e.g. [128, 128]).")
    core = network.module if hasattr(network, "module") else network
    name, multiple = type(core).__name__, getattr(core, "size_multiple", None)
    takes = ""
    if multiple and any(s % multiple for s in size):
        fit = [-(-s // multiple) * multiple for s in size]
        takes = f" (it takes H and W multiples of {multiple}: e.g. --image_size \"[{fit[0]},{fit[1]}]\")"
    training = network.training
    try:
        network.eval()
        with torch.no_grad():
            field = network(torch.zeros(1, 2, *size, device=device))
    except Exception as error:  # the network's own reason, first line
        reason = (str(error).strip().splitlines() or [""])[0]
        raise SystemExit(f"error: image_size {size} does not fit the {what} {name}{takes}: "
                         f"{type(error).__name__}: {reason}") from None
    finally:
        network.train(training)
    if not isinstance(field, torch.Tensor) or tuple(field.shape) != (1, 2, *size):
        got = tuple(field.shape) if isinstance(field, torch.Tensor) else type(field).__name__
        raise SystemExit(f"error: the {what} {name} maps (1, 2, {size[0]}, {size[1]}) to {got}, not to a field of the "
                         f"same size (network_def's contract: (B, 2, H, W) -> (B, 2, H, W)).")


BACKBONE_CONFIGS = "backbone_*.yaml"


def network_config_file(name: str | os.PathLike, bundle_root: str | os.PathLike | None = None) -> Path:
    """A backbone's override config (``configs/backbone_transmorph.yaml``): ``name`` absolute, relative to the bundle
    folder or to its ``configs`` folder (``backbone_transmorph.yaml``); otherwise ``SystemExit`` naming it and the
    bundle's backbone configs."""
    root = Path(bundle_root) if bundle_root else CONFIG_FILE.parents[1]
    path = Path(name).expanduser()
    for candidate in [path] if path.is_absolute() else [root / path, root / "configs" / path]:
        if candidate.is_file():
            return candidate
    known = ", ".join(p.name for p in sorted((root / "configs").glob(BACKBONE_CONFIGS))) or "none"
    raise SystemExit(f"error: {name}: network config not found (absolute, or relative to {root} or its configs "
                     f"folder; the bundle's backbones: {known}).")


def network_from_config(network_config: str | os.PathLike | None = None, bundle_root: str | os.PathLike | None = None,
                        config_file: str | os.PathLike | None = None) -> torch.nn.Module:
    """``network_def`` as ``python -m monai.bundle run --config_file "['configs/inference.yaml','<network_config>']"``
    builds it, with its initial weights, on the CPU: ``network_config`` is a backbone's override
    (:func:`network_config_file`; it must set ``network_def``), ``None`` gives ``inference.yaml``'s own network.
    The MONAI Label app builds its network with it (``--conf network_config``)."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root) if bundle_root else CONFIG_FILE.parents[1]
    files = [str(config_file or root / "configs" / "inference.yaml")]
    if network_config:
        override = network_config_file(network_config, root)
        content = ConfigParser.load_config_file(str(override))
        if not isinstance(content, dict) or "network_def" not in content:
            raise SystemExit(f"error: {override}: sets no network_def (a backbone config overrides network_def alone).")
        files.append(str(override))
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = str(root)
    return parser.get_parsed_content("network_def")


# ------------------------------------------------------------------------------------------------- data
class PairCases(Dataset):
    """The ``dataset`` of ``inference.yaml``: case ``i`` of :func:`collect_pairs` (collected on first use) read,
    checked and as network-grid slices, or ``{"error": ...}`` naming the file (never raises for one case).

    Keys: ``case``, ``item`` (the paths), ``pair`` (:class:`LoadedPair`), ``moving`` / ``fixed`` ``(S, 1, h, w)``
    (``transform`` applied per slice), ``native_moving`` ``(S, 1, H, W)``, ``native_moving_label`` ``(S, H, W)`` or
    absent, ``native_size`` ``(H, W)``, ``start`` (``time.perf_counter()`` when the case was read).

    Args:
        transform: the config's ``preprocessing``: dict transforms of ``{"moving", "fixed"}``, ``(1, H, W)`` each.
    """

    def __init__(self, dataset_dir: str | None, datalist: str | None = None, section: str = "testing",
                 max_label: int = MAX_LABEL, transform: Callable | None = None) -> None:
        self.dataset_dir, self.datalist, self.section = dataset_dir, datalist, section
        self.max_label, self.transform = int(max_label), transform
        self._items: list[dict[str, Any]] | None = None

    @property
    def items(self) -> list[dict[str, Any]]:
        if self._items is None:
            self._items = collect_pairs(self.dataset_dir, self.datalist, self.section)
        return self._items

    def input_paths(self) -> set[str]:
        """The real paths of every input file (outputs may never replace one)."""
        return {os.path.realpath(v) for item in self.items for k, v in item.items() if k in FILE_KEYS and isinstance(v, str)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        data: dict[str, Any] = {"case": str(item.get("case", "")), "item": item, "start": time.perf_counter()}
        try:
            pair = load_pair(item, self.max_label)
            data.update(self.network_slices(pair))
        except Exception as error:  # one case's problem: reported by name, the others go on
            data[ERROR] = case_error(error, item)
        return data

    def network_slices(self, pair: LoadedPair) -> dict[str, Any]:
        moving, fixed = pair.slices(pair.moving), pair.slices(pair.fixed)
        grid = {"moving": [], "fixed": []}
        for mov, fix in zip(moving, fixed):
            sample = {"moving": mov[None], "fixed": fix[None]}
            sample = self.transform(sample) if self.transform is not None else sample
            for key in grid:
                grid[key].append(convert_to_tensor(sample[key], dtype=torch.float32, track_meta=False))
        data = {"pair": pair, "native_size": tuple(moving.shape[1:]),
                "native_moving": torch.as_tensor(moving, dtype=torch.float32)[:, None],
                **{key: torch.stack(slices) for key, slices in grid.items()}}
        if pair.moving_label is not None:
            data["native_moving_label"] = torch.as_tensor(pair.slices(pair.moving_label))
        return data


# ------------------------------------------------------------------------------------------------ engine
class PairInferenceEvaluator(RegistrationEvaluator):
    """Registers the cases of :class:`PairCases` at their native size (see the module docstring).

    Output per case: ``status`` (``ok`` / ``failed``), ``error``, and for ``ok``: ``pred`` the native field
    ``(S, 2, H, W)`` (native pixels), ``warped`` ``(S, 1, H, W)``, ``warped_label`` ``(S, 1, H, W)`` (integer, the
    moving label's values) when a moving label is given, ``score`` ``(S, 1, H, W)`` with ``score_map``.

    Args:
        postprocessing: maps ``{"pred": (S, 2, h, w), "native_size": (H, W), ...}`` to the native field
            (``registration_io.FieldToNatived``).
        scoring_network: the scoring network, used when ``score_map``.
        ckpt_path: the displacement weights, named in the message of a non-finite result.
    """

    def __init__(self, device: str | torch.device, val_data_loader: Any, network: torch.nn.Module,
                 inferer: Callable | None = None, postprocessing: Callable | None = None,
                 val_handlers: Sequence | None = None, scoring_network: torch.nn.Module | None = None,
                 score_map: bool | str = False, ckpt_path: str | None = None, refiner: Any = None) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, inferer=inferer,
                         postprocessing=postprocessing, val_handlers=val_handlers, decollate=False, refiner=refiner)
        self.score_map = str2bool(score_map)
        self.scoring_network = scoring_network if self.score_map else None
        if self.score_map and scoring_network is None:
            raise SystemExit("error: score_map needs scoring_network_def.")
        self.ckpt_path = ckpt_path
        self.logger.addFilter(_not_cases_failed)  # the summary has said which cases failed

    def _iteration(self, engine: PairInferenceEvaluator, batchdata: dict[str, Any]) -> dict:
        try:
            if batchdata.get(ERROR):
                raise PairError(batchdata[ERROR])
            output = super()._iteration(engine, batchdata)  # network on the grid; postprocessing: native field
            engine._native_outputs(batchdata, output)
            output.update({STATUS: "ok", ERROR: ""})
        except Exception as error:  # one case's problem must not stop the others
            output = {STATUS: "failed", ERROR: case_error(error, batchdata["item"])}
        engine.state.output = output
        return output

    @torch.no_grad()
    def _native_outputs(self, batchdata: dict[str, Any], output: dict[str, Any]) -> None:
        device = self.state.device
        ddf = output[Keys.PRED]
        moving = batchdata["native_moving"].to(device)
        label = batchdata.get("native_moving_label")
        output[RegistrationKeys.WARPED], output[RegistrationKeys.WARPED_LABEL] = warp_native(
            self.warp, moving, ddf, None if label is None else label.to(device))
        if self.scoring_network is not None:
            with self.mode(self.scoring_network):
                score = self.scoring_network(output[Keys.IMAGE][:, 1:2])
            output[SCORE] = F.interpolate(score, size=tuple(batchdata["native_size"]), mode="bilinear",
                                          align_corners=False)
        weights = f" (weights {self.ckpt_path})" if self.ckpt_path else ""
        for what, key in (("displacement field", Keys.PRED), ("warped image", RegistrationKeys.WARPED),
                          ("score map", SCORE)):
            if output.get(key) is not None and not bool(torch.isfinite(output[key]).all()):
                raise PairError(f"{batchdata['pair'].files['moving']}: the network gave a {what} with NaN or infinite "
                                f"values{weights}; nothing written for this case")


# ---------------------------------------------------------------------------------------------- handlers
class RegistrationWriter:
    """Writes each case's files (``ITERATION_COMPLETED``) into ``output_dir``; also owns the output folder's rules,
    called from the config's ``run`` before the engine: :meth:`check` (before the weights: nothing created) and
    :meth:`claim` (after).

    A case whose writing fails is turned into ``status: failed`` and leaves none of its files; outputs are written
    to a temporary name and renamed (``io_safety.atomic_write``); an output may never replace an input file.

    Args:
        dataset: the :class:`PairCases`.
        output_dir: ``None``: ``<dataset_dir>_registered`` beside the input folder.
        write_itk: also write the ITK displacement field.
        overwrite: replace an earlier run's outputs in ``output_dir`` (otherwise such a folder is refused).
    """

    def __init__(self, dataset: PairCases, output_dir: str | os.PathLike | None = None, write_itk: bool | str = True,
                 overwrite: bool | str = False) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir) if output_dir else None
        self.write_itk, self.overwrite = str2bool(write_itk), str2bool(overwrite)
        self.inputs: set[str] = set()

    # -- the output folder (the config's run, before the engine)
    def check(self) -> None:
        """The cases are collected (a run-level problem ends the run with a message), ``output_dir`` is chosen and
        refused if it is an input folder or a file; nothing is created."""
        try:
            len(self.dataset)
        except DatasetError as error:
            raise SystemExit(f"error: {error}") from None
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.dataset.dataset_dir, "_registered")
        logger.info(f"outputs: {self.output_dir}")
        self.inputs = self.dataset.input_paths()
        check_output_dir(self.output_dir, self.inputs, [self.dataset.dataset_dir] if self.dataset.dataset_dir else [])

    def claim(self) -> None:
        """An earlier run's outputs are refused (or removed with ``overwrite``); the folder is created, checked
        writable and cleared of a killed run's temporary files."""
        if self.output_dir is None:
            self.check()
        claim_output_dir(self.output_dir, self.is_output, self.overwrite, self.inputs)
        prepare_output_dir(self.output_dir)

    @staticmethod
    def is_output(entry: os.DirEntry) -> bool:
        """A file this engine writes: ``summary.csv`` or ``<case><suffix>`` for a suffix of ``OUTPUT_SUFFIXES``."""
        return entry.is_file(follow_symlinks=False) and (entry.name == SUMMARY or entry.name.endswith(OUTPUT_SUFFIXES))

    # -- per case
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output, batch = engine.state.output, engine.state.batch
        if output.get(STATUS) != "ok":
            return
        try:
            output["outputs"] = self.write(batch["pair"], output)
        except Exception as error:
            output.update({STATUS: "failed", ERROR: case_error(error, batch["item"])})

    def write(self, pair: LoadedPair, output: dict[str, Any]) -> list[str]:
        """The case's files (names returned): the field, ITK field, warped image, warped label, score map."""
        case, folder = pair.case, self.output_dir
        ddf_vox = voxel_ddf_array(output[Keys.PRED], pair.is_stack, pair.file_shape)
        warped_label = output.get(RegistrationKeys.WARPED_LABEL)
        paths = {"ddf": folder / f"{case}_ddf.nii.gz"}
        if self.write_itk:
            paths["ddf_itk"] = folder / f"{case}_ddf_itk{itk_field_extension(pair)}"
        paths["warped"] = folder / f"{case}_warped.nii.gz"
        if warped_label is not None:
            paths["warped_gt"] = folder / f"{case}_warped_gt.nii.gz"
        if output.get(SCORE) is not None:
            paths["score"] = folder / f"{case}_score.nii.gz"
        for path in paths.values():  # defence in depth: case names are checked in collect_pairs
            if path.parent != folder or TMP_PATTERN.match(path.name):
                raise PairError(f"{pair.files['moving']}: output name {path.name!r} is not a plain name in output_dir")
        clash = [str(p) for p in paths.values() if os.path.realpath(p) in self.inputs]
        if clash:
            raise PairError(f"{clash[0]}: output would overwrite an input file; choose another output_dir")
        field_image = None
        if self.write_itk:
            itk_ndim = 3 if len(pair.file_shape) >= 3 else 2
            vox = ddf_vox if itk_ndim == ddf_vox.ndim - 1 else ddf_vox[:, :, None, :]
            field_image = itk_displacement_field(vox, *itk_geometry(pair.files["moving"], itk_ndim))
        try:  # a case that fails half-way leaves none of its outputs behind
            save_nifti(paths["ddf"], ddf_vox, pair.affine, intent="vector")
            if field_image is not None:
                import itk

                atomic_write(paths["ddf_itk"], lambda tmp: itk.imwrite(field_image, tmp))
            save_nifti(paths["warped"], pair.file_layout(output[RegistrationKeys.WARPED]).astype(np.float32), pair.affine)
            if warped_label is not None:
                save_nifti(paths["warped_gt"], pair.file_layout(warped_label).astype(np.int16), pair.affine)
            if "score" in paths:
                save_nifti(paths["score"], pair.file_layout(output[SCORE]).astype(np.float32), pair.affine)
        except BaseException:
            for path in paths.values():
                path.unlink(missing_ok=True)
            raise
        return [p.name for p in paths.values()]


class CasesFailed(TrainingStopped):
    """Exit status 1 after the summary (which names the failed cases): no message, no traceback."""

    def __init__(self) -> None:
        SystemExit.__init__(self, 1)
        self.line_ended = True


def _not_cases_failed(record: logging.LogRecord) -> bool:
    """Drop ignite's "Engine run is terminating due to exception: 1" line for :class:`CasesFailed`."""
    return not (record.levelno == logging.ERROR and record.getMessage().endswith(f"exception: {CasesFailed()}"))


class RegistrationSummary:
    """One ``summary.csv`` row per case (``ITERATION_COMPLETED``, after :class:`RegistrationWriter`): inputs, status,
    error, notes, outputs, Dice (``metrics.dice_scores``, MONAI's ``compute_dice``; with both labels) and the
    undeformed Dice, folding percentage, seconds. At ``COMPLETED``: ``summary.csv`` (atomic), the closing line, and
    exit status 1 (``SystemExit``) when a case failed and ``exit_on_failure``. Errors and notes are logged per case.
    """

    def __init__(self, writer: RegistrationWriter, exit_on_failure: bool = True) -> None:
        self.writer, self.exit_on_failure = writer, exit_on_failure
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.add_case)
        engine.add_event_handler(Events.COMPLETED, self.complete)

    def reset(self, engine: Engine) -> None:
        self.rows = []

    def add_case(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        item, pair = batch["item"], batch.get("pair")
        row: dict[str, Any] = {k: str(item.get(k, "")) for k in ("case", *FILE_KEYS)}
        row.update({STATUS: output[STATUS], ERROR: output[ERROR]})
        notes = list(pair.notes if pair is not None else item.get("notes") or [])
        refinement = output.get(RegistrationKeys.REFINEMENT_NOTES) or []
        notes += [f"slice {i}: {note}" if len(refinement) > 1 else note for i, note in enumerate(refinement) if note]
        if output[STATUS] == "ok":
            row.update(self.measures(pair, output))
        else:
            logger.error(f"case {row['case']}: {row[ERROR]}")
        for note in notes:
            logger.warning(f"{row['case']}: {note}")
        row["notes"] = "; ".join(notes)
        row["time_s"] = round(time.perf_counter() - batch["start"], 4)
        self.rows.append(row)

    @staticmethod
    def measures(pair: LoadedPair, output: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"shape": "x".join(map(str, pair.moving.shape)), "outputs": ";".join(output["outputs"]),
                               "folding_pct": round(float(folding_percentage(output[Keys.PRED]).mean()), 4)}
        warped_label = output.get(RegistrationKeys.WARPED_LABEL)
        if warped_label is not None and pair.fixed_label is not None:
            moved = pair.file_layout(warped_label).reshape(pair.fixed_label.shape)
            scores = dice_scores(moved, pair.fixed_label)
            before = dice_scores(pair.moving_label, pair.fixed_label)
            row["dice"] = round(float(np.mean(list(scores.values()))), 4) if scores else ""
            row["dice_undeformed"] = round(float(np.mean(list(before.values()))), 4) if before else ""
            row["dice_per_class"] = ";".join(f"{k}:{v:.4f}" for k, v in scores.items())
            row["dice_undeformed_per_class"] = ";".join(f"{k}:{v:.4f}" for k, v in before.items())
        return row

    def complete(self, engine: Engine) -> None:
        folder = self.writer.output_dir
        summary = folder / SUMMARY

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                for r in self.rows:
                    writer.writerow({k: r.get(k, "") for k in CSV_COLUMNS})

        try:
            atomic_write(summary, write_csv)
        except OSError as error:
            raise TrainingStopped(f"{summary}: cannot be written ({error.strerror or error}); the outputs of the "
                                  f"cases are in {folder}.") from None
        failed = [r for r in self.rows if r[STATUS] != "ok"]
        message = f"{len(self.rows) - len(failed)} of {len(self.rows)} pairs registered into {folder}"
        if failed:
            message += f"; FAILED: {', '.join(str(r['case']) for r in failed)} (see {summary})"
        print(message, flush=True)
        if failed and self.exit_on_failure:
            raise CasesFailed()


# ----------------------------------------------------------------------------------------------- in-process
CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "inference.yaml"


def register_folder(dataset_dir: str | os.PathLike | None, output_dir: str | os.PathLike | None,
                    network: torch.nn.Module | None = None, ckpt_path: str | os.PathLike | None = None,
                    datalist: str | os.PathLike | None = None, exit_on_failure: bool = True, progress: Any = False,
                    config_file: str | os.PathLike | Sequence = CONFIG_FILE, **overrides: Any) -> list[dict[str, Any]]:
    """``configs/inference.yaml`` in-process, as ``python -m monai.bundle run`` runs it (``initialize`` then ``run``),
    with ``network`` (a module, already on its device) instead of ``network_def`` and ``ckpt_path`` (``None``: the
    network's weights as they are); ``overrides`` are config entries (``write_itk``, ``score_map``,
    ``scoring_network``, ``overwrite``, ...). Returns the summary rows; ``SystemExit`` as the command line ends."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    values = {"bundle_root": str(Path(__file__).resolve().parents[1]),
              "dataset_dir": str(dataset_dir) if dataset_dir else None, "datalist": str(datalist) if datalist else None,
              "output_dir": str(output_dir) if output_dir else None, "ckpt_path": str(ckpt_path) if ckpt_path else None,
              "progress": progress, "summary#exit_on_failure": exit_on_failure, **overrides}
    if network is not None:
        values["network"] = network
    for key, value in values.items():
        parser[key] = value
    parser.parse(reset=True)
    for section in ("initialize", "run", "finalize"):
        for index in range(len(parser.get(section, []))):
            parser.get_parsed_content(f"{section}#{index}", lazy=True)
    return parser.get_parsed_content("summary").rows
