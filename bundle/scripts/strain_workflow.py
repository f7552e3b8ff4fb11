"""The engine of ``configs/strain.yaml``: strain of every case of a folder or datalist, written case by case.

Per case, in ``output_dir/<case>/`` (written to a temporary folder and renamed into place: a case's outputs are
whole or absent; ``output_dir`` defaults to ``<dataset_dir>_strain`` and one holding an earlier run's outputs is refused
unless ``overwrite``, which removes them first):

* ``strain_<direction>_<definition>.nii.gz``: one map per component (``radial_green``, ``radial_engineering``,
  ``circumferential_green``, ...; long axis: ``transverse_*``, ``longitudinal_*``), fractions, on the ED geometry
  (the ED label file's grid and affine), 0 outside the ED myocardium; an ED/ES pair gives the ES map, a cine one map
  per frame (time last);
* ``aha_segments.nii.gz`` (AHA numbers), ``displacement.nii.gz`` (the Lagrangian field, voxels of the ED grid,
  component i along array axis i; a pair: the label file's shape + 2; a cine: ``X x Y x Z x T x 2``, NIfTI's 5D
  layout, Z = 1 for a single slice), ``tracked_es_gt.nii.gz`` (ED labels
  carried to ES);
* ``strain.csv``: one row per region (global, AHA segments, the echo mid-wall contour) and one column per component
  and definition at ES, plus, for a cine, the peak and time to peak of each; ``curves.csv`` (cine): one row per frame;
* figures (``figures: true``): bull's-eye (short axis) or segment diagram (long axis) of each component at ES, the
  strain map over the ED image with the displacement as a deformed grid, and the strain curves of a cine.

``output_dir/strain_summary.csv`` has one row per case: status, notes (every fallback taken is said there), the
global values (``global_<direction>_<definition>``), echo GLS of the mid-wall contour, peaks, ejection fractions
and, when ES labels are given, the Dice of the tracked ED labels at ES. The exit status is 1 when a case failed.

The case name is the folder name, so it must be a plain file name (a name with ``/`` or ``\\`` or a leading ``.``
fails by name; it is not rewritten); a duplicate name becomes ``<case>_2`` (said in the notes). Before any case the
weights are checked (readable, finite, fitting the network) and only then ``output_dir`` is created, checked
writable and cleared of ``.tmp-*`` / ``.old-*`` entries of a killed run (``io_safety``). Label values other than the
configured ``labels`` are said in the notes; a non-finite displacement fails the case.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.utils import str2bool

from .data import DatasetError
from .io_safety import (
    atomic_write, case_name_problem, check_output_dir, claim_output_dir, default_output_dir, load_weights,
    pause_if_asked, prepare_output_dir, temp_path,
)
from .metrics import folding_percentage
from .strain_analysis import COMPONENTS, SHORT_AXIS, CaseStrain, CineRegistration, analyse_case, echo_view, peak
from .strain_io import FILE_KEYS, RESERVED_NAMES, CaseError, StrainCase, collect_cases, load_case

logger = logging.getLogger(__name__)

ACDC_LABELS = {"rv": 1, "myo": 2, "lv": 3}
SUMMARY_FIRST = ("case", "status", "error", "notes", "view", "echo_view", "slices", "frames", "ed_index", "es_index",
                 "es_source", "spacing_mm")
SUMMARY_LAST = ("ef_labels", "ef_tracked", "folding_pct_es", "time_s")


class StrainWorkflow:
    """Run the strain analysis over ``dataset_dir`` / ``datalist`` (see the module docstring).

    Args:
        dataset_dir, datalist, section: the cases (``strain_io.collect_cases``).
        network: the displacement network; ``ckpt_path`` its flat state dict (``None`` keeps its weights).
        output_dir: the output folder (created; must not be an input folder); ``None``: ``<dataset_dir>_strain`` beside
            the input folder.
        labels: label codes of ``rv``, ``myo``, ``lv`` (cavity) (short axis) or ``lv``, ``myo``, ``la`` (echo).
        view: ``short_axis`` or ``long_axis``.
        directions: ``wall_normal`` or ``centroid`` (``myocardium.wall_directions``).
        tracking, lagrangian, image_size, roi_size, batch_size: see ``strain_analysis.CineRegistration``.
        segment_options: extra arguments of ``myocardium.sax_segments`` / ``la_segments``.
        figures: write the figures; ``figure_definition``: ``green`` or ``engineering`` in them.
        overwrite: replace an earlier run's outputs in ``output_dir`` (removed first); otherwise such a folder is
            refused before anything is written.
        refiner: optional test-time refinement of every registered pair (``refinement.InstanceRefiner``).
    """

    def __init__(
        self, dataset_dir: str | None, network: torch.nn.Module, output_dir: str | os.PathLike | None = None,
        ckpt_path: str | None = None, datalist: str | None = None, section: str = "testing",
        labels: dict[str, int] | None = None, view: str = SHORT_AXIS, directions: str = "wall_normal",
        tracking: str = "direct", lagrangian: str = "inverse", image_size: Sequence[int] = (128, 128),
        roi_size: Sequence[int] | None = (128, 128), segment_options: dict[str, Any] | None = None,
        figures: bool = True, figure_definition: str = "green", device: str | torch.device = "cpu",
        batch_size: int = 32, progress: bool = True, exit_on_failure: bool = True, overwrite: bool = False,
        refiner: Any = None,
    ) -> None:
        if view not in COMPONENTS:
            raise ValueError(f"view must be one of {tuple(COMPONENTS)}, got {view!r}.")
        self.dataset_dir, self.datalist, self.section = dataset_dir, datalist, section
        self.network, self.ckpt_path = network, ckpt_path
        self.output_dir = Path(output_dir) if output_dir else None
        self.overwrite = str2bool(overwrite)
        self.labels = {k: int(v) for k, v in (labels or ACDC_LABELS).items()}
        self.view, self.directions, self.segment_options = view, directions, dict(segment_options or {})
        self.figures, self.figure_definition = str2bool(figures), figure_definition
        self.registration = CineRegistration(network, image_size, roi_size, lagrangian, tracking, device, batch_size,
                                             refiner)
        self.device, self.progress, self.exit_on_failure = torch.device(device), str2bool(progress), exit_on_failure
        self.rows: list[dict[str, Any]] = []

    # -- setup
    def _load_weights(self) -> None:
        if self.ckpt_path is None:
            return
        load_weights(self.network, self.ckpt_path, "displacement network", self.device)  # SystemExit naming the file

    @staticmethod
    def _input_paths(items: list[dict[str, Any]]) -> list[str]:
        paths = []
        for item in items:
            for key, value in item.items():
                if key in FILE_KEYS:
                    paths += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
        return [os.path.realpath(p) for p in paths]

    @staticmethod
    def is_output(entry: os.DirEntry) -> bool:
        """What this workflow writes: ``strain_summary.csv`` and the case folders (each holds ``strain.csv``)."""
        if entry.name == "strain_summary.csv":
            return entry.is_file(follow_symlinks=False)
        return entry.is_dir(follow_symlinks=False) and os.path.isfile(os.path.join(entry.path, "strain.csv"))

    def _check_output_dir(self, items: list[dict[str, Any]]) -> None:
        """Refuse an output_dir that is an input folder or a file; creates nothing."""
        check_output_dir(self.output_dir, self._input_paths(items), [self.dataset_dir] if self.dataset_dir else [])

    # -- driver
    def run(self) -> list[dict[str, Any]]:
        """Analyse every case; write its outputs and ``strain_summary.csv``; ``SystemExit(1)`` if a case failed.

        Before any case: cases collected, ``output_dir`` checked, weights loaded and checked; then ``output_dir`` is
        created, checked writable and cleared of a killed run's temporary entries. A problem there ends the run
        with a message naming the file, nothing written."""
        try:
            items = collect_cases(self.dataset_dir, self.datalist, self.section)
        except DatasetError as error:
            raise SystemExit(f"error: {error}") from None
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.dataset_dir, "_strain")
        logger.info(f"outputs: {self.output_dir}")
        self._check_output_dir(items)
        self._load_weights()
        claim_output_dir(self.output_dir, self.is_output, self.overwrite, self._input_paths(items))
        prepare_output_dir(self.output_dir)
        self.rows = []
        iterator: Any = items
        if self.progress:
            from tqdm import tqdm

            iterator = tqdm(items, desc="strain", unit="case")
        for item in iterator:
            self.rows.append(self._run_case(item))
        try:
            self._write_summary()
        except OSError as error:
            raise SystemExit(f"error: {self.output_dir / 'strain_summary.csv'}: cannot be written "
                             f"({error.strerror or error}); the cases' outputs are in {self.output_dir}.") from None
        failed = [r["case"] for r in self.rows if r["status"] != "ok"]
        message = f"strain of {len(self.rows) - len(failed)} of {len(self.rows)} cases in {self.output_dir}"
        print(message + (f"; FAILED: {', '.join(failed)} (see strain_summary.csv)" if failed else ""))
        if failed and self.exit_on_failure:
            raise SystemExit(1)
        return self.rows

    def _run_case(self, item: dict[str, Any]) -> dict[str, Any]:
        """One case, whatever happens: a row with status ``ok`` or ``failed`` (the error naming the file)."""
        start = time.perf_counter()
        name = str(item["case"])
        row: dict[str, Any] = {"case": name}
        notes = list(item.get("notes") or [])
        try:
            case = load_case(item)
            case.notes += self._label_notes(case)
            result = self.analyse(case)
            row.update(self._write_case(case, result))
            row.update(status="ok", error="")
            notes = list(result.notes)
        except (CaseError, ValueError) as error:
            row.update(status="failed", error=str(error))
        except Exception as error:  # an unexpected failure of one case must not stop the others
            where = _describe(item) or name
            row.update(status="failed", error=f"{where}: {type(error).__name__}: {error}")
            logger.debug(f"case {name}: unexpected error", exc_info=True)
        if row["status"] != "ok":
            logger.error(f"case {name}: {row['error']}")
        for note in notes:
            logger.warning(f"{name}: {note}")
        row["notes"] = "; ".join(notes)
        row["time_s"] = round(time.perf_counter() - start, 3)
        return row

    def _label_notes(self, case: StrainCase) -> list[str]:
        """Label values other than the configured codes are said (they are not used as any structure)."""
        codes = set(self.labels.values())
        notes = []
        for key, labels in (("moving_label", case.ed_labels), ("fixed_label", case.es_labels)):
            if labels is None:
                continue
            others = sorted(set(np.unique(labels).tolist()) - codes - {0})
            if others:
                listed = ", ".join(map(str, others[:5])) + (", ..." if len(others) > 5 else "")
                configured = ", ".join(f"{k}={v}" for k, v in self.labels.items())
                notes.append(f"{Path(case.files[key]).name}: label values {listed} are not among the configured "
                             f"labels ({configured}); not used")
        return notes

    def analyse(self, case: StrainCase) -> CaseStrain:
        """Track and analyse one loaded case (no files written)."""
        displacement = self.registration.track(case, self.labels["myo"])
        if not bool(torch.isfinite(displacement).all()):
            weights = f" (weights {self.ckpt_path})" if self.ckpt_path else ""
            raise CaseError(f"{_describe(case.files) or case.case}: the network gave a displacement with NaN or "
                            f"infinite values{weights}; nothing written for this case")
        return analyse_case(case, displacement, self.labels, self.view, self.directions, self.segment_options)

    # -- outputs
    def _write_case(self, case: StrainCase, result: CaseStrain) -> dict[str, Any]:
        problem = case_name_problem(case.case, RESERVED_NAMES)  # defence in depth: collect_cases checks names
        if problem:
            raise CaseError(f"case name {case.case!r} {problem}")
        final = self.output_dir / case.case
        tmp = temp_path(final)
        tmp.mkdir()
        try:
            self._write_arrays(tmp, case, result)
            _write_csv(tmp / "strain.csv", region_rows(case, result))
            if case.is_cine:
                _write_csv(tmp / "curves.csv", curve_rows(case, result))
            if self.figures:
                self._write_figures(tmp, case, result)
            pause_if_asked(tmp)
            if os.path.lexists(final):
                trash = temp_path(final, "old")
                os.replace(final, trash)
                if trash.is_dir() and not trash.is_symlink():
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    trash.unlink()
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return summary_row(case, result)

    def _write_arrays(self, folder: Path, case: StrainCase, result: CaseStrain) -> None:
        cine = case.is_cine

        def spatial(slices_first: np.ndarray) -> np.ndarray:  # (S, X, Y, ...) -> the label file's layout
            moved = np.moveaxis(slices_first, 0, 2)  # (X, Y, S, ...)
            return moved if len(case.label_shape) >= 3 else moved[:, :, 0]

        def save(name: str, array: np.ndarray, intent: str | None = None) -> None:
            image = nib.Nifti1Image(array, case.affine)
            if intent:
                image.header.set_intent(intent)
            nib.save(image, str(folder / name))

        for key, maps in result.maps.items():  # (T, S, X, Y)
            data = np.moveaxis(maps, 0, -1) if cine else maps[result.es_index]  # (S, X, Y, T) or (S, X, Y)
            save(f"strain_{key}.nii.gz", spatial(data).astype(np.float32))
        save("aha_segments.nii.gz", spatial(result.segments.segments).astype(np.int16))
        field = result.displacement.cpu().numpy().astype(np.float32)  # (T, S, 2, X, Y)
        if cine:  # NIfTI's 5D layout X x Y x Z x T x vector, Z = 1 for a single slice (T never reads as Z)
            save("displacement.nii.gz", np.moveaxis(field, (1, 0, 2), (2, 3, 4)), intent="vector")
        else:
            save("displacement.nii.gz", spatial(np.moveaxis(field[result.es_index], 1, -1)), intent="vector")
        if result.tracked_es_labels is not None:
            save("tracked_es_gt.nii.gz", spatial(result.tracked_es_labels).astype(np.int16))

    def _write_figures(self, folder: Path, case: StrainCase, result: CaseStrain) -> None:
        from . import strain_plots

        definition = self.figure_definition
        es = result.es_index
        for name in COMPONENTS[result.view]:
            key = f"{name}_{definition}"
            values = {s: 100.0 * c[es] for s, c in result.segment_curves[key].items()}
            title = f"{case.case}: {name} strain at ES ({definition}), %"
            if result.view == SHORT_AXIS:
                strain_plots.bullseye(values, folder / f"bullseye_{key}.png", title=title)
            else:
                strain_plots.long_axis_segments(values, folder / f"segments_{key}.png", view=echo_view(case), title=title)
        slice_index = _display_slice(result)
        key = f"{COMPONENTS[result.view][0]}_{definition}"
        strain_plots.strain_overlay(
            case.frames[case.ed_index, slice_index], result.maps[key][es, slice_index],
            result.segments.segments[slice_index] > 0, result.displacement[es, slice_index].cpu().numpy(),
            folder / f"overlay_{key}.png", spacing=case.spacing,
            title=f"{case.case}: {key.replace('_', ' ')} strain at ES, slice {slice_index}")
        if case.is_cine:
            times = _times(case)
            order = np.argsort(times, kind="stable")  # the cycle from ED, whatever frame ED is
            curves = {f"global {k.replace('_', ' ')}": 100.0 * v[order] for k, v in result.global_curves.items()
                      if k.endswith(definition)}
            if result.midwall_gls is not None:
                curves["GLS, mid-wall contour (engineering)"] = 100.0 * result.midwall_gls[order]
            xlabel = "time after ED (ms)" if case.times_ms is not None else "frames after ED"
            strain_plots.strain_curves(times[order], curves, folder / "curves.png", title=f"{case.case}: global strain",
                                       xlabel=xlabel, markers={"ES": times[es]})
            for name in COMPONENTS[result.view]:
                key = f"{name}_{definition}"
                strain_plots.segment_curves(times[order], {s: 100.0 * c[order] for s, c in result.segment_curves[key].items()},
                                            folder / f"segment_curves_{key}.png", component=key.replace("_", " "),
                                            xlabel=xlabel)

    def _write_summary(self) -> None:
        keys = list(SUMMARY_FIRST)
        for row in self.rows:
            keys += [k for k in row if k not in keys and k not in SUMMARY_LAST]
        keys += list(SUMMARY_LAST)
        _write_csv(self.output_dir / "strain_summary.csv", self.rows, keys, atomic=True)


# ------------------------------------------------------------------------------------------------------- tables
def _describe(files: Any) -> str:
    """The file that names a case in messages: its ED labels, ED image or cine."""
    for key in ("moving_label", "moving", "cine"):
        value = files.get(key) if isinstance(files, dict) else None
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            return str(value[0])
    return ""


def _display_slice(result: CaseStrain) -> int:
    """The slice shown in the overlay: a mid-level slice with the most myocardium, else the one with the most."""
    areas = (result.segments.segments > 0).sum((1, 2))
    mid = [i for i, level in enumerate(result.segments.levels) if level == "mid"]
    return int(max(mid, key=lambda i: areas[i]) if mid else int(np.argmax(areas)))


def _times(case: StrainCase) -> np.ndarray:
    """Per frame: ms after ED when trigger times are known (cyclic), else frames after ED."""
    positions = (np.arange(case.num_frames) - case.ed_index) % case.num_frames
    if case.times_ms is None:
        return positions.astype(np.float64)
    period = float(np.median(np.diff(case.times_ms))) * case.num_frames
    return (case.times_ms - case.times_ms[case.ed_index]) % period


def region_rows(case: StrainCase, result: CaseStrain) -> list[dict[str, Any]]:
    """``strain.csv``: global and per-segment values at ES (and peaks for a cine), percent-free fractions."""
    levels = {}
    for level, seg_slice in zip(result.segments.levels, result.segments.segments):
        for s in np.unique(seg_slice[seg_slice > 0]):
            levels[int(s)] = level
    counts = {int(s): int((result.segments.segments == s).sum()) for s in levels}
    regions: list[tuple[str, str, int, dict[str, np.ndarray]]] = [
        ("global", "", int((result.segments.segments > 0).sum()), result.global_curves)]
    for s in sorted(levels):
        regions.append((str(s), levels[s] or "", counts[s], {k: v[s] for k, v in result.segment_curves.items()
                                                             if s in v}))
    if result.midwall_gls is not None:
        regions.append(("midwall_contour", "", 0, {"longitudinal_engineering": result.midwall_gls}))
    rows = []
    cine = case.is_cine
    times = _times(case)
    for region, level, count, curves in regions:
        row: dict[str, Any] = {"region": region, "level": level, "pixels": count}
        for key, curve in curves.items():
            row[f"{key}_es"] = _round(curve[result.es_index])
            if cine:
                value, offset = peak(curve, key, case.ed_index)
                row[f"{key}_peak"] = _round(value)
                row[f"{key}_time_to_peak"] = _round(times[(case.ed_index + offset) % case.num_frames])
        rows.append(row)
    return rows


def curve_rows(case: StrainCase, result: CaseStrain) -> list[dict[str, Any]]:
    """``curves.csv``: one row per frame, global and per-segment values of every component."""
    times = _times(case)
    rows = []
    for t in range(case.num_frames):
        row: dict[str, Any] = {"frame": t, "after_ed": _round(times[t])}
        row.update({f"global_{k}": _round(v[t]) for k, v in result.global_curves.items()})
        if result.midwall_gls is not None:
            row["gls_midwall_engineering"] = _round(result.midwall_gls[t])
        for key, segments in result.segment_curves.items():
            row.update({f"segment{s:02d}_{key}": _round(v[t]) for s, v in sorted(segments.items())})
        rows.append(row)
    return rows


def summary_row(case: StrainCase, result: CaseStrain) -> dict[str, Any]:
    """One row of ``strain_summary.csv`` (global values at ES, named ``global_<direction>_<definition>``)."""
    row: dict[str, Any] = {
        "notes": "; ".join(result.notes), "view": result.view, "echo_view": echo_view(case) or "",
        "slices": case.ed_labels.shape[0], "frames": case.num_frames, "ed_index": case.ed_index,
        "es_index": result.es_index, "es_source": result.es_source,
        "spacing_mm": "x".join(f"{s:g}" for s in case.spacing),
    }
    for key, curve in result.global_curves.items():
        row[f"global_{key}"] = _round(curve[result.es_index])
    if result.midwall_gls is not None:
        row["gls_midwall_engineering"] = _round(result.midwall_gls[result.es_index])
    if case.is_cine:
        times = _times(case)
        for key, curve in result.global_curves.items():
            value, offset = peak(curve, key, case.ed_index)
            row[f"peak_global_{key}"] = _round(value)
            row[f"time_to_peak_{key}"] = _round(times[(case.ed_index + offset) % case.num_frames])
    row.update({k: _round(v) for k, v in result.scores.items()})
    row["folding_pct_es"] = _round(float(folding_percentage(result.displacement[result.es_index].float()).mean()))
    return row


def _round(value: float) -> float:
    return round(float(value), 5) + 0.0  # + 0.0: no '-0.0' in the tables


def _write_csv(path: Path, rows: list[dict[str, Any]], keys: Sequence[str] | None = None, atomic: bool = False) -> None:
    if keys is None:
        keys = []
        for row in rows:
            keys += [k for k in row if k not in keys]

    def write(target: str) -> None:
        with open(target, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(keys), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in keys})

    if atomic:
        atomic_write(path, write)
    else:
        write(str(path))
