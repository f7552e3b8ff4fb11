"""Guards shared by the inference engine (``registration_io``) and the strain workflow (``strain_workflow``):
nothing lost, nothing silent, nothing written outside ``output_dir``.

* **Case names** (:func:`assign_case_names`): a case's outputs are named after it inside ``output_dir``, so a name
  must be a plain file name (no ``/`` or ``\\``, no leading ``.``, no control characters, not empty, not reserved);
  a case with another name fails by name (it is not silently rewritten). Names are unique (ignoring case): a later
  duplicate gets the first free ``<name>_2``, ``<name>_3``, ... and the renaming is said in its ``notes``.
* **Temporary names** ``.tmp-<8 hex>-<name>`` (and ``.old-<8 hex>-<name>`` for a folder being replaced): every output
  is written under such a name in ``output_dir`` and renamed into place (:func:`atomic_write`), so a file is whole or
  absent. A killed run can leave such names behind; :func:`remove_leftovers` deletes them at the next start (only
  entries directly in ``output_dir`` that match this pattern). One run per ``output_dir`` at a time.
* **Output folder** (:func:`check_output_dir`, :func:`create_output_dir`): not an input folder, not a file; created
  (and checked writable) only after the weights loaded, so a run that cannot start leaves no empty folder. By
  default beside the input folder (:func:`default_output_dir`); an earlier run's outputs there are refused or, with
  ``overwrite``, removed first (:func:`claim_output_dir`), so the folder and its summary always agree.
* **Weights** (:func:`load_weights`): the file named in every problem: missing, empty, unreadable, not a state dict,
  NaN or infinite values, or not fitting the network (missing / unexpected / differently shaped tensors).
* **Datalists** (:func:`read_datalist`): a JSON object with a non-empty list section; an item that is not an object
  or whose file entry is not a string fails alone, by its position.
* **Input files** (:func:`input_file_problem`, :func:`label_problem`, :func:`constant_problem`): symbolic link loops,
  folders, label maps with non-integer, negative or huge values, constant images.

``ADACS_PAUSE_AFTER_TEMP=<seconds>`` (a test hook) sleeps after each temporary output is complete and before it is
renamed, so that a test can kill the process while it writes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .data import DatasetError, read_json_datalist

logger = logging.getLogger(__name__)

TMP_PATTERN = re.compile(r"^\.(?:tmp|old)-[0-9a-f]{8}-.")
PAUSE_ENV = "ADACS_PAUSE_AFTER_TEMP"
MAX_NAME_BYTES = 200  # a case name plus the longest output suffix stays under the usual 255-byte file name limit


# ------------------------------------------------------------------------------------------ temporary names
def temp_path(path: Path, kind: str = "tmp") -> Path:
    """``<folder>/.tmp-<8 hex>-<name>`` (``kind='old'``: ``.old-...``, a folder being replaced)."""
    return path.parent / f".{kind}-{uuid.uuid4().hex[:8]}-{path.name}"


def pause_if_asked(path: Path) -> None:
    """Test hook: with ``ADACS_PAUSE_AFTER_TEMP`` set, say that ``path`` is written and sleep that many seconds."""
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    try:
        seconds = float(value)
    except ValueError:
        return
    print(f"{PAUSE_ENV}: {path.name} written, pausing {seconds:g} s", flush=True)
    time.sleep(seconds)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file in the same folder (same extension),
    which is then renamed over ``path`` (``os.replace``)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        pause_if_asked(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def remove_leftovers(folder: Path) -> list[str]:
    """Delete the ``.tmp-*`` / ``.old-*`` entries (our pattern only) directly in ``folder``, left by a killed run."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not TMP_PATTERN.match(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError as error:
            logger.warning(f"{entry.path}: leftover temporary entry not removed ({error.strerror or error})")
    return sorted(removed)


def nifti_stem(path: str | os.PathLike) -> str:
    """A file's name without ``.nii.gz`` / ``.nii`` (or its last suffix): the default case name of a datalist item."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` (or name why it cannot be) and remove the leftovers of an interrupted run, saying so."""
    create_output_dir(output_dir)
    removed = remove_leftovers(output_dir)
    if removed:
        logger.warning(f"{output_dir}: removed {len(removed)} temporary entr{'y' if len(removed) == 1 else 'ies'} of "
                       f"an interrupted run: {', '.join(removed)}")


def default_output_dir(dataset_dir: str | os.PathLike | None, suffix: str) -> Path:
    """Where a run writes when ``--output_dir`` is not given: beside the input folder, ``<dataset_dir><suffix>``
    (``/data/pairs`` -> ``/data/pairs_registered``), never inside the bundle's source tree."""
    if not dataset_dir:
        raise SystemExit("error: no output folder: set --output_dir (it defaults to a folder beside --dataset_dir).")
    root = Path(dataset_dir).resolve()
    return root.with_name(root.name + suffix)


def earlier_run_outputs(output_dir: Path, is_output: Callable[[os.DirEntry], bool]) -> list[str]:
    """The names, directly in ``output_dir``, of an earlier run's outputs (``is_output`` recognises them)."""
    try:
        return sorted(entry.name for entry in os.scandir(output_dir)
                      if not TMP_PATTERN.match(entry.name) and is_output(entry))  # leftovers: remove_leftovers
    except OSError:
        return []


def claim_output_dir(
    output_dir: Path, is_output: Callable[[os.DirEntry], bool], overwrite: bool, inputs: Iterable[str] = (),
) -> list[str]:
    """Make ``output_dir`` hold only this run's outputs: an earlier run's outputs there (its summary, its cases'
    files, also those of a killed run) stop the run with one message unless ``overwrite``, which removes them first
    (never an input file, never a file we did not write). Other files are left alone. The names removed."""
    found = earlier_run_outputs(output_dir, is_output)
    if not found:
        return []
    if not overwrite:
        listed = ", ".join(found[:MAX_IGNORED_LISTED]) + (", ..." if len(found) > MAX_IGNORED_LISTED else "")
        raise SystemExit(f"error: {output_dir}: holds {len(found)} outputs of an earlier run ({listed}); "
                         "pass --overwrite true to replace them, or choose another --output_dir.")
    inputs = set(inputs)
    removed = []
    for name in found:
        path = output_dir / name
        if os.path.realpath(path) in inputs:
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(name)
        except OSError as error:
            raise SystemExit(f"error: {path}: output of an earlier run cannot be removed "
                             f"({error.strerror or error}); choose another --output_dir.") from None
    logger.warning(f"{output_dir}: removed {len(removed)} outputs of an earlier run (--overwrite true)")
    return removed


def list_dataset_folder(dataset_dir: str | os.PathLike | None, expected: str) -> list[Path]:
    """The entries of an input folder, sorted; ``DatasetError`` naming the folder (or, without one, what to pass:
    ``expected`` describes the folder's files) when it is not given, missing or unreadable."""
    if not dataset_dir:
        raise DatasetError(f"no input: set --dataset_dir to a folder of {expected} "
                           "(or --datalist to a JSON with a 'testing' section).")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist.")
    try:
        return sorted(root.iterdir())
    except OSError as error:
        raise DatasetError(f"{root}: cannot list the dataset folder ({error.strerror or error}).") from None


# ------------------------------------------------------------------------------------------- naming rules
PAIR_FRAMES = {("ED", False): "moving", ("ED", True): "moving_label", ("ES", False): "fixed", ("ES", True): "fixed_label"}
PAIR_RULE = "<case>_ED/_ES[_gt].nii[.gz]"
MAX_IGNORED_LISTED = 5


def frame_pattern(frames: Iterable[str]) -> re.Pattern:
    """``<case>_<frame>[_gt].nii[.gz]``, the frame names and ``_gt`` matched ignoring case (``x_ed.nii.gz``)."""
    names = "|".join(re.escape(f) for f in frames)
    return re.compile(rf"^(?P<case>.+)_(?P<frame>(?i:{names}))(?P<gt>(?i:_gt))?\.nii(?:\.gz)?$")


def match_named_files(
    entries: Iterable[Path], keys: Mapping[tuple[str, bool], str], rule: str, where: str | os.PathLike = "",
    say: Callable[[str], None] | None = None,
) -> list[tuple[Path, str, str]]:
    """``(path, case, key)`` for each entry named ``<case>_<frame>[_gt].nii[.gz]`` with ``(frame, gt)`` in ``keys``
    (frame names compared ignoring case: ``_ed`` is ``_ED``). Hidden entries are skipped quietly; every other entry
    that matches no rule is named in one warning (``say``, default ``logger.warning``), at most
    ``MAX_IGNORED_LISTED`` of them by name, with the ``rule`` a file must follow."""
    canonical = {frame.casefold(): frame for frame, _ in keys}
    pattern = frame_pattern(canonical.values())
    found, ignored = [], []
    for path in entries:
        path = Path(path)
        if path.name.startswith("."):
            continue
        match = pattern.match(path.name)
        key = keys.get((canonical[match["frame"].casefold()], bool(match["gt"]))) if match else None
        if key is None:
            ignored.append(path.name + ("/" if path.is_dir() else ""))
            continue
        found.append((path, match["case"], key))
    if ignored:
        listed = ", ".join(ignored[:MAX_IGNORED_LISTED]) + (f", ... ({len(ignored) - MAX_IGNORED_LISTED} more)"
                                                            if len(ignored) > MAX_IGNORED_LISTED else "")
        count = "1 file that matches" if len(ignored) == 1 else f"{len(ignored)} files that match"
        (say or logger.warning)(f"{str(where) + ': ' if str(where) else ''}ignored {count} no naming rule "
                                f"(not {rule}): {listed}")
    return found


# ----------------------------------------------------------------------------------------------- case names
def case_name_problem(name: str, reserved: Iterable[str] = ()) -> str:
    """Why ``name`` cannot name outputs inside ``output_dir`` ('' when it can)."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains a path separator, so its outputs would be written outside output_dir"
    if name.startswith("."):
        return "starts with '.' (a hidden or parent-folder name)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if name in set(reserved):
        return "is reserved for the run's summary table"
    return ""


def assign_case_names(items: list[dict[str, Any]], reserved: Iterable[str] = (), describe: Callable[[dict], str] | None = None) -> None:
    """Check and deduplicate ``item['case']`` in place.

    A name that is not a plain file name (:func:`case_name_problem`) sets the item's ``error`` (the case fails by
    name, nothing is written for it). A name used by an earlier item (compared ignoring case, as some file systems
    do) becomes the first free ``<name>_<k>`` (k = 2, 3, ...), never one that another item uses; the renaming is added
    to the item's ``notes``.
    """
    reserved = tuple(reserved)
    describe = describe or (lambda item: "")
    taken = {str(item["case"]).casefold() for item in items}
    used: dict[str, str] = {}
    for index, item in enumerate(items):
        name = str(item["case"])
        item["case"] = name
        problem = case_name_problem(name, reserved)
        if problem:
            if not item.get("error"):
                where = describe(item)
                item["error"] = (f"{where + ': ' if where else ''}case name {name!r} {problem}; "
                                 f"give the case a plain name (letters, digits, '-', '_', '.')")
            continue
        key = name.casefold()
        if key in used:
            k = 2
            while f"{name}_{k}".casefold() in taken or f"{name}_{k}".casefold() in used:
                k += 1
            new = f"{name}_{k}"
            where = describe(item)
            item.setdefault("notes", []).append(
                f"{where + ': ' if where else ''}case name {name!r} is already used by {used[key]}; "
                f"this case's outputs are named {new!r}")
            item["case"], key = new, new.casefold()
            taken.add(key)
        where = describe(item)
        used[key] = where or f"item {index}"


# ------------------------------------------------------------------------------------------------ the files
def input_file_problem(path: str) -> str:
    """Why ``path`` cannot be read as an input file ('' when it can); the message starts after ``<path>: ``."""
    if os.path.islink(path) and not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as error:
            if error.errno == errno.ELOOP:
                return "is a symbolic link loop"
        return "is a symbolic link whose target does not exist"
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "cannot be followed (a symbolic link loop in its path)"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return "file does not exist"
        return f"cannot be accessed ({error.strerror})"
    if not os.path.isfile(path):
        return "is not a regular file (a folder?)"
    return ""


def label_problem(array: np.ndarray, max_label: int) -> str:
    """Why ``array`` is not a label map of integer classes in ``0 .. max_label`` ('' when it is)."""
    if array.size == 0:
        return "label map is empty"
    rounded = np.rint(array)
    off = np.abs(array - rounded)
    if float(off.max()) > 1e-3:
        value = float(array.flat[int(np.argmax(off))])
        return f"label map has non-integer values (e.g. {value:g}); is it an image?"
    low, high = float(rounded.min()), float(rounded.max())
    if low < 0:
        return f"label map has negative values (down to {low:.0f})"
    if high > max_label:
        return f"label map has values up to {high:.0f}; expected a few integer classes (at most {max_label})"
    return ""


def constant_problem(array: np.ndarray, what: str = "image") -> str:
    """A message when every voxel of ``array`` has the same value ('' otherwise)."""
    if array.size and float(array.max()) == float(array.min()):
        return f"{what} is constant (every voxel {float(array.flat[0]):g}): nothing to register"
    return ""


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_datalist(
    path: str | os.PathLike, section: str, base_dir: str | os.PathLike | None, file_keys: Sequence[str],
    list_keys: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The items of ``section`` with their file entries made absolute against ``base_dir`` (default: the JSON's folder).

    Raises :class:`DatasetError` (run-level) for an unreadable file, a top level that is not an object, a missing,
    non-list or empty section. Problems of one item (not an object; a file entry that is not a string, or for
    ``list_keys`` a list of strings; a ``case`` that is not a string or number) set that item's ``error`` instead,
    so the other items still run. Items without a ``case`` get none here.
    """
    path = Path(path)
    problem = input_file_problem(str(path))
    if problem:
        raise DatasetError(f"{path}: datalist {problem}.")
    content = read_json_datalist(path)
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: the top level is a JSON {_json_type(content)}; expected an object with a "
                           f"'{section}' section ({{\"{section}\": [{{...}}, ...]}}).")
    if section not in content:
        raise DatasetError(f"{path}: has no '{section}' section (found: {', '.join(map(str, content)) or 'none'}).")
    entries = content[section]
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: the '{section}' section is a JSON {_json_type(entries)}; expected a list of items.")
    if not entries:
        raise DatasetError(f"{path}: the '{section}' section is empty: nothing to do.")
    base = Path(base_dir) if base_dir else path.parent
    items = []
    for i, raw in enumerate(entries):
        where = f"{path}: item {i} of '{section}'"
        if not isinstance(raw, dict):
            items.append({"case": f"item{i}", "error": f"{where} is a JSON {_json_type(raw)}, not an object"})
            continue
        item, errors = dict(raw), []
        for key in (*file_keys, *list_keys):
            value = item.get(key)
            if value is None:
                item.pop(key, None)
            elif isinstance(value, str) and value:
                item[key] = str(base / value)
            elif key in list_keys and isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
                item[key] = [str(base / v) for v in value]
            else:
                expected = "a file path (string) or a list of them" if key in list_keys else "a file path (string)"
                errors.append(f"'{key}' is {json.dumps(value)[:60]}, expected {expected}")
                item.pop(key)
        case = item.get("case")
        if case is None:
            item.pop("case", None)
        elif isinstance(case, (int, float)) and not isinstance(case, bool):
            item["case"] = str(case)
        elif not isinstance(case, str):
            errors.append(f"'case' is {json.dumps(case)[:60]}, expected a name (string)")
            item["case"] = f"item{i}"
        if errors:
            item.setdefault("case", f"item{i}")
            item["error"] = f"{where}: " + "; ".join(errors)
        item["item"] = i
        items.append(item)
    return items


# ------------------------------------------------------------------------------------------- output folder
def _torch_error(error: Exception) -> str:
    """The informative line of a ``torch.load`` error (its weights-only refusals start with a long preamble)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"{type(error).__name__}: {detail[:160]}"
    return f"{type(error).__name__}: {(lines or [''])[0][:160]}"


def check_output_dir(output_dir: Path, input_paths: Iterable[str], extra_input_dirs: Iterable[str] = ()) -> None:
    """Refuse (``SystemExit`` with a message) an ``output_dir`` that is an input folder, a file or unreachable;
    creates nothing."""
    out = Path(os.path.realpath(output_dir))
    folders = {Path(os.path.realpath(p)).parent for p in input_paths}
    folders |= {Path(os.path.realpath(d)) for d in extra_input_dirs}
    if out in folders:
        raise SystemExit(f"error: output_dir {out} is an input folder; choose another folder (inputs are never overwritten).")
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        what = "a symbolic link that cannot be followed" if os.path.islink(output_dir) else "a file, not a folder"
        raise SystemExit(f"error: output_dir {output_dir} is {what}; choose a folder.")
    for parent in Path(output_dir).absolute().parents:
        if os.path.lexists(parent) and not os.path.isdir(parent):
            raise SystemExit(f"error: output_dir {output_dir}: {parent} is not a folder; choose another output_dir.")


def create_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` (and parents) and check that a file can be written there; on failure remove what was
    created and ``SystemExit`` with a message."""
    output_dir = Path(output_dir)
    missing = [p for p in [output_dir, *output_dir.absolute().parents] if not os.path.lexists(p)]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: output_dir {output_dir} cannot be created ({error.strerror or error}).") from None
    probe = temp_path(output_dir / "write-test")
    try:
        with open(probe, "wb") as handle:
            handle.write(b"adacs")
        os.unlink(probe)
    except OSError as error:
        if os.path.lexists(probe):
            try:
                os.unlink(probe)
            except OSError:
                pass
        for folder in missing:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise SystemExit(f"error: output_dir {output_dir} is not writable ({error.strerror or error}).") from None


# ---------------------------------------------------------------------------------------------------- weights
def load_weights(network: torch.nn.Module, path: str | os.PathLike, what: str, device: str | torch.device = "cpu") -> None:
    """Load a flat state dict (or a training checkpoint's ``model``) into ``network``, or ``SystemExit`` with a
    message naming ``path`` and the problem; ``network`` is untouched unless every check passes."""
    path = str(path)
    problem = input_file_problem(path)
    if problem:
        hint = " (train first, or set --ckpt_path)" if problem == "file does not exist" else ""
        raise SystemExit(f"error: {path}: {what} weights {'not found' if hint else problem}{hint}.")
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: {path}: {what} weights file is empty (0 bytes; an interrupted copy or save?).")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise SystemExit(f"error: {path}: cannot be read as {what} weights: not a file of torch.save(state_dict), or "
                         f"a corrupt or truncated one ({_torch_error(error)}).") from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: {path}: not a state dict of tensors (found {type(state).__name__}); expected the "
                         f"{what}'s weights (torch.save(network.state_dict(), ...)).")
    bad = [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise SystemExit(f"error: {path}: {what} weights have NaN or infinite values in {len(bad)} tensor(s) "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); a diverged training?")
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if names:
                parts.append(f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        raise SystemExit(f"error: {path}: {what} weights do not fit the configured network: {'; '.join(parts)}; "
                         f"were they trained with another configuration?")
    network.load_state_dict(state)
    logger.info(f"{what} weights: {os.path.realpath(path)}")
