"""Strain of one case: track the frames against ED with the registration network, then strain, regions and curves.

Steps (``docs/README.md`` "Strain"):

1. :class:`CineRegistration`: every frame of the case is cropped around the ED myocardium (``roi_size`` pixels at
   native resolution, as ``prepare_acdc.py`` crops ACDC for training; ``None`` = the whole image, as CAMUS is
   prepared), min-max scaled, resized to the network grid and tracked against ED (``tracking.track_cycle``: every
   frame to ED, or frame to frame composed, with or without drift correction). The Lagrangian field U (ED grid) is
   the **inverse** field of the registration ED (moving) -> frame t (fixed): that registration's forward field pulls
   ED onto the frame's grid (``frame(x) ~ ED(x + ddf(x))``), so its inverse, on the ED grid, sends each ED point X to
   its position X + U(X) at frame t. The diffeomorphic network gives that inverse exactly (it integrates -v), in the
   direction it was trained (ED moving). ``lagrangian: swap`` registers frame t (moving) -> ED (fixed) instead, whose
   forward field is U too; it is the only choice for one-way networks.
2. :func:`analyse_case`: F, Green and engineering strain along the myocardium's own directions (radial and
   circumferential in short axis, transverse and longitudinal in long axis), AHA segments, global and segment
   means per frame, peaks and times to peak; echo: global longitudinal strain of the mid-wall contour; the ED labels
   carried to ES (Dice against ES labels when given) and the ejection fraction from labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from monai.networks.blocks import Warp

from . import myocardium, tracking
from .evaluator import one_hot
from .networks import DiffeomorphicVoxelMorph
from .registration_io import minmax_resize, resize_ddf
from .strain import strain_components
from .strain_io import StrainCase

SHORT_AXIS, LONG_AXIS = "short_axis", "long_axis"
COMPONENTS = {SHORT_AXIS: ("radial", "circumferential"), LONG_AXIS: ("transverse", "longitudinal")}
POSITIVE_PEAK = {"radial", "transverse"}  # thickening; the others shorten (negative peaks)
_VIEW_NAME = re.compile(r"(?i)(?:^|[_\-])(2CH|4CH|A2C|A4C)(?:$|[_\-])")


# ------------------------------------------------------------------------------------------------ registration
class CineRegistration:
    """Lagrangian fields of a case's frames on its native ED grid, from the displacement network.

    Args:
        network: ``(B, 2, h, w) -> ddf`` (pixels of the network grid); the bundle's ``network_def``.
        image_size: the network grid.
        roi_size: crop (native pixels) centred on the ED myocardium before resizing to the network grid; ``None``
            resizes the whole image (echo).
        lagrangian: ``"inverse"`` (ED moving, the inverse field; needs a diffeomorphic network) or ``"swap"``.
        tracking_mode: ``"direct"``, ``"sequential"`` or ``"drift_corrected"`` (see ``tracking.track_cycle``).
        batch_size: pairs per network call.
        refiner: optional test-time refinement of each pair (``refinement.InstanceRefiner``; its velocity is refined,
            so the inverse field stays exact).
    """

    def __init__(self, network: torch.nn.Module, image_size: Sequence[int] = (128, 128),
                 roi_size: Sequence[int] | None = (128, 128), lagrangian: str = "inverse",
                 tracking_mode: str = "direct", device: str | torch.device = "cpu", batch_size: int = 32,
                 refiner: Any = None) -> None:
        if lagrangian not in ("inverse", "swap"):
            raise ValueError(f"lagrangian must be 'inverse' or 'swap', got {lagrangian!r}.")
        core = network.module if hasattr(network, "module") else network
        if lagrangian == "inverse" and not (isinstance(core, DiffeomorphicVoxelMorph) and core.bidirectional):
            raise ValueError(f"lagrangian 'inverse' needs a diffeomorphic network with its inverse field "
                             f"(DiffeomorphicVoxelMorph, bidirectional: true; this one is {type(core).__name__}"
                             f"{', one way' if isinstance(core, DiffeomorphicVoxelMorph) else ''}); "
                             "use lagrangian: swap for one-way networks.")
        self.network, self.image_size = network, tuple(int(s) for s in image_size)
        self.roi_size = None if roi_size is None else tuple(int(s) for s in roi_size)
        self.lagrangian, self.tracking_mode = lagrangian, tracking_mode
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.refiner = refiner if (refiner is not None and refiner.active) else None

    @torch.no_grad()
    def _lagrangian(self, reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(N, h, w)`` network-grid images -> U ``(N, 2, h, w)`` on the reference grid (network pixels)."""
        if self.lagrangian == "swap":
            image = torch.stack([target, reference], 1)
            return self.network(image) if self.refiner is None else self.refiner(self.network, image).ddf
        image = torch.stack([reference, target], 1)
        if self.refiner is not None:
            return self.refiner(self.network, image).backward_ddf
        return self.network(image, return_fields=True).backward_ddf

    def window(self, case: StrainCase, myo_code: int) -> tuple[slice, slice, tuple[int, int]]:
        """The crop (native pixels, may extend past the image) centred on the ED myocardium's centroid."""
        native = case.frames.shape[2:]
        if self.roi_size is None:
            return slice(0, native[0]), slice(0, native[1]), (0, 0)
        mask = case.ed_labels == myo_code
        centre = np.argwhere(mask)[:, 1:].mean(0) if mask.any() else np.asarray(native) / 2.0
        start = [int(round(c)) - r // 2 for c, r in zip(centre, self.roi_size)]
        return slice(start[0], start[0] + self.roi_size[0]), slice(start[1], start[1] + self.roi_size[1]), tuple(start)

    def track(self, case: StrainCase, myo_code: int) -> torch.Tensor:
        """U ``(T, S, 2, H, W)`` in native pixels on the ED grid, zero outside the crop; ``U[ed_index] = 0``."""
        frames = torch.as_tensor(case.frames, device=self.device)
        num_frames, slices, height, width = frames.shape
        rows, cols, _ = self.window(case, myo_code)
        crop = _crop(frames.reshape(-1, height, width), rows, cols)  # (T*S, h, w)
        net = minmax_resize(crop[:, None], self.image_size)[:, 0].reshape(num_frames, slices, *self.image_size)
        self.network.eval()
        fields = tracking.track_cycle(net, self._lagrangian, self.tracking_mode, case.ed_index, self.batch_size)
        roi = resize_ddf(fields.reshape(-1, 2, *self.image_size), crop.shape[1:])
        native = torch.zeros(num_frames * slices, 2, height, width, device=self.device)
        _paste(native, roi, rows, cols)
        return native.reshape(num_frames, slices, 2, height, width)


def _crop(images: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """``(N, H, W)`` -> ``(N, h, w)`` window, zero padded where it leaves the image."""
    out = images.new_zeros(images.shape[0], rows.stop - rows.start, cols.stop - cols.start)
    src, dst = _overlap(images.shape[1:], rows, cols)
    out[:, dst[0], dst[1]] = images[:, src[0], src[1]]
    return out


def _paste(native: torch.Tensor, roi: torch.Tensor, rows: slice, cols: slice) -> None:
    src, dst = _overlap(native.shape[2:], rows, cols)
    native[:, :, src[0], src[1]] = roi[:, :, dst[0], dst[1]]


def _overlap(shape: Sequence[int], rows: slice, cols: slice) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    src, dst = [], []
    for size, window in zip(shape, (rows, cols)):
        lo, hi = max(window.start, 0), min(window.stop, size)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - window.start, max(hi, lo) - window.start))
    return (src[0], src[1]), (dst[0], dst[1])


# ---------------------------------------------------------------------------------------------------- analysis
@dataclass
class CaseStrain:
    """Everything computed for one case (fractions; frames in the case's order)."""

    view: str
    displacement: torch.Tensor  # (T, S, 2, H, W) native pixels, ED grid
    maps: dict[str, np.ndarray]  # '<direction>_<definition>' -> (T, S, H, W), 0 outside the ED myocardium
    segments: myocardium.SegmentResult
    global_curves: dict[str, np.ndarray]  # component -> (T,)
    segment_curves: dict[str, dict[int, np.ndarray]]  # component -> segment -> (T,)
    es_index: int
    es_source: str  # 'given' or how it was estimated
    midwall_gls: np.ndarray | None = None  # (T,) echo, engineering
    tracked_es_labels: np.ndarray | None = None  # (S, H, W)
    scores: dict[str, float] = field(default_factory=dict)  # Dice at ES, ejection fractions
    notes: list[str] = field(default_factory=list)

    @property
    def components(self) -> list[str]:
        return list(self.global_curves)


def echo_view(case: StrainCase) -> str | None:
    """'2CH' / '4CH' from the datalist item's ``view`` or the case name (A2C / A4C too), else None."""
    given = case.files.get("view")
    match = _VIEW_NAME.search(case.case)
    name = (given or (match.group(1) if match else "")).upper().replace("A2C", "2CH").replace("A4C", "4CH")
    return name if name in ("2CH", "4CH") else None


def analyse_case(case: StrainCase, displacement: torch.Tensor, labels: dict[str, int], view: str = SHORT_AXIS,
                 direction_method: str = "wall_normal", segment_options: dict[str, Any] | None = None) -> CaseStrain:
    """Strain maps, regions, curves and label scores of a tracked case (``displacement`` from :class:`CineRegistration`)."""
    if view not in COMPONENTS:
        raise ValueError(f"view must be one of {tuple(COMPONENTS)}, got {view!r}.")
    options = dict(segment_options or {})
    myo = case.ed_labels == labels["myo"]
    if not myo.any():
        raise ValueError(f"{case.files['moving_label'] if isinstance(case.files.get('moving_label'), str) else case.case}: "
                         f"no myocardium (label {labels['myo']}) in the ED labels; strain needs it")
    notes = list(case.notes)
    normal, tangent = myocardium.wall_directions(case.ed_labels, case.spacing, labels, method=direction_method)
    if view == SHORT_AXIS:
        segments = myocardium.sax_segments(case.ed_labels, case.spacing, labels, affine=case.affine, **options)
    else:
        segments = myocardium.la_segments(case.ed_labels, case.spacing, labels, view=echo_view(case), **options)
    notes += segments.notes
    names = COMPONENTS[view]
    directions = {names[0]: torch.as_tensor(normal), names[1]: torch.as_tensor(tangent)}

    rows, cols = _bounding_box(myo, margin=3)
    local = displacement[..., rows, cols].float().cpu()
    num_frames, slices = local.shape[:2]
    tiled = {k: v[..., rows, cols].float().repeat(num_frames, 1, 1, 1) for k, v in directions.items()}
    strains = strain_components(local.reshape(-1, *local.shape[2:]), case.spacing, tiled)
    maps, global_curves, segment_curves = {}, {}, {}
    seg_local = segments.segments[:, rows, cols]
    myo_local = myo[:, rows, cols]
    for key, value in strains.items():
        value = value.reshape(num_frames, slices, *value.shape[1:]).numpy()
        value = np.where(myo_local[None], value, 0.0)
        full = np.zeros((num_frames,) + myo.shape, np.float32)
        full[:, :, rows, cols] = value
        maps[key] = full
        global_curves[key] = value[:, myo_local].mean(1)
        segment_curves[key] = {int(s): value[:, seg_local == s].mean(1) for s in np.unique(seg_local) if s > 0}

    es_index, es_source = _es_frame(case, global_curves, names[1])
    result = CaseStrain(view, displacement, maps, segments, global_curves, segment_curves, es_index, es_source,
                        notes=notes)
    if view == LONG_AXIS:
        result.midwall_gls = _midwall_curve(case, displacement, labels, notes)
    _label_scores(result, case, labels)
    return result


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    where = np.argwhere(mask)[:, 1:]
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + margin + 1, mask.shape[1:])
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


def _es_frame(case: StrainCase, curves: dict[str, np.ndarray], shortening: str) -> tuple[int, str]:
    if case.es_index is not None:
        return case.es_index, "given"
    curve = curves[f"{shortening}_green"]
    return int(np.argmin(curve)), f"estimated: the frame of peak global {shortening} strain"


def _midwall_curve(case: StrainCase, displacement: torch.Tensor, labels: dict[str, int], notes: list[str]):
    """Echo GLS: relative length change of the ED mid-wall contour carried by U, per frame (engineering)."""
    if case.ed_labels.shape[0] != 1:
        notes.append("mid-wall GLS needs a single long-axis slice; not computed")
        return None
    try:
        contour = myocardium.midwall_contour(case.ed_labels[0], case.spacing, labels)
    except ValueError as error:
        notes.append(f"mid-wall contour not found ({error}); GLS from the contour not computed")
        return None
    fields = displacement[:, 0].cpu().numpy()
    return np.asarray([myocardium.contour_strain(contour, u, case.spacing) for u in fields])


# ------------------------------------------------------------------------------------------- labels at ES, EF
def invert_displacement(displacement: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Eulerian pull field on the deformed grid of a Lagrangian U ``(B, 2, H, W)``: d with x + d(x) = X where
    X + U(X) = x, by the fixed-point iteration d <- -U(x + d) (MONAI ``Warp``)."""
    warp = Warp(mode="bilinear", padding_mode="border")
    inverse = -displacement
    for _ in range(iterations):
        inverse = -warp(displacement, inverse)
    return inverse


def carry_labels(labels: np.ndarray, displacement: torch.Tensor, num_classes: int) -> np.ndarray:
    """ED labels ``(S, H, W)`` carried to a frame by its Lagrangian U ``(S, 2, H, W)``: one-hot warp, argmax."""
    pull = invert_displacement(displacement.float().cpu())
    onehot = one_hot(torch.as_tensor(labels)[:, None].long(), num_classes).float()
    return Warp(mode="bilinear", padding_mode="zeros")(onehot, pull).argmax(1).numpy()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else float("nan")


def _label_scores(result: CaseStrain, case: StrainCase, labels: dict[str, int]) -> None:
    classes = max(int(case.ed_labels.max()) + 1, max(labels.values()) + 1)
    tracked = carry_labels(case.ed_labels, result.displacement[result.es_index], classes)
    result.tracked_es_labels = tracked
    cavity = labels["lv"]
    ed_area = float((case.ed_labels == cavity).sum())
    if ed_area:
        result.scores["ef_tracked"] = 1.0 - float((tracked == cavity).sum()) / ed_area
    if case.es_labels is not None and result.es_source == "given":
        if ed_area:
            result.scores["ef_labels"] = 1.0 - float((case.es_labels == cavity).sum()) / ed_area
        for name, code in labels.items():
            result.scores[f"dice_es_{name}"] = _dice(tracked == code, case.es_labels == code)
            result.scores[f"dice_es_{name}_undeformed"] = _dice(case.ed_labels == code, case.es_labels == code)


def peak(curve: np.ndarray, component: str, ed_index: int = 0) -> tuple[float, int]:
    """(peak value, frames after ED) of a curve: the maximum for radial / transverse, the minimum otherwise."""
    index = int(np.argmax(curve) if component.split("_")[0] in POSITIVE_PEAK else np.argmin(curve))
    return float(curve[index]), (index - ed_index) % len(curve)
