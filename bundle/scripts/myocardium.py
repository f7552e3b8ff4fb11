"""Myocardial geometry that strain needs: local wall directions, AHA segments, the mid-wall contour (numpy / scipy).

Conventions (``notes/strain_conventions.md``): stacks ``(S, H, W)``, H and W the NIfTI array axes 0 and 1; ``spacing``
``(s0, s1)`` mm per pixel; directions ``(S, 2, H, W)`` physical unit vectors with components along the array axes;
points ``(N, 2)`` in pixels (axis 0, axis 1); angles ``atan2(axis 1, axis 0)`` in mm around a centre.

Image orientation defaults, established by looking at the stored images (../shared/data):

* ACDC (h5 ``(z, y, x)`` -> NIfTI ``(x, y, z)``, identity affine; stack ``(z, x, y)``): shown with rows = y and
  columns = x (the h5 layout) the slices are the standard short-axis view: chest wall upper left, liver, stomach and
  diaphragm at the bottom (larger y), descending aorta below-right of the LV, RV to the left. So in NIfTI array axes
  **anterior = decreasing axis 1** (``ACDC_ANTERIOR``) and the septum / RV lies toward **decreasing axis 0**
  (``ACDC_SEPTAL``); the LV->RV direction points to decreasing axis 0 in all 50 stored patients (its angle
  within +-67 deg of -axis 0). The handedness only needs the septum on the correct side of the anterior direction.
* Built-in phantom (``phantom.py``, 2D): the RV is at decreasing axis 1 (left when shown as rows/columns), i.e. the
  transpose of the ACDC layout: pass ``**PHANTOM_ORIENTATION`` (anterior = decreasing axis 0).
* CAMUS (``.npy`` nibabel ``(x, y)``, probe at axis 1 = 0): shown apex up (rows = axis 1) the 4CH views have the RV
  and the right atrium on the screen-left of the LV (checked on the 15 stored patients), the standard echo display.
  So the septal (4CH) / inferior (2CH) wall is the one toward **decreasing axis 0** (``septal_side="axis0_low"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

ACDC_LABELS = {"rv": 1, "myo": 2, "lv": 3}
CAMUS_LABELS = {"lv": 1, "myo": 2, "la": 3}
ACDC_ANTERIOR = (0.0, -1.0)  # NIfTI array axes of the stored ACDC data: anterior = decreasing axis 1
ACDC_SEPTAL = (-1.0, 0.0)  # patient right / septum = decreasing axis 0
PHANTOM_ORIENTATION = {"anterior": (-1.0, 0.0), "septal": (0.0, -1.0)}
SIDES = {"axis0_low": (-1.0, 0.0), "axis0_high": (1.0, 0.0), "axis1_low": (0.0, -1.0), "axis1_high": (0.0, 1.0)}
# echo 6-segment numbering: view -> ((wall A basal, mid, apical), (wall B ...)); wall A = septal_side
LA_NUMBERS = {"4CH": ((3, 9, 14), (6, 12, 16)), "2CH": ((4, 10, 15), (1, 7, 13)), None: ((1, 2, 3), (4, 5, 6))}
BASAL_ORDER = (2, 3, 4, 5, 6, 1)  # 60 deg sectors from the anterior insertion into the septum
APICAL_ORDER = (14, 15, 16, 13)  # 90 deg sectors, 14 centred on the septum
LEVELS = ("basal", "mid", "apical")
_FULL = np.ones((3, 3), bool)


@dataclass
class SegmentResult:
    segments: np.ndarray  # (S, H, W) int, 0 outside the myocardium, AHA numbers
    levels: list  # per slice: 'basal' | 'mid' | 'apical' | 'long_axis' | None (no myocardium)
    insertion_points: list  # per slice: ((anterior), (inferior)) RV insertions in pixels (LA: (wall A, wall B) bases)
    notes: list = field(default_factory=list)  # fallbacks, one line each ('slice 3: ...')


def _as_stack(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels[None]
    if labels.ndim != 3:
        raise ValueError(f"expected labels (S, H, W) or (H, W), got shape {labels.shape}.")
    return labels


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    return components == np.argmax(ndimage.sum(mask, components, range(1, count + 1))) + 1


def _cavity(slice_labels: np.ndarray, codes: dict) -> np.ndarray:
    return _largest_component(slice_labels == codes["lv"])


def _centre_mm(slice_labels: np.ndarray, spacing, codes: dict) -> np.ndarray:
    """LV-cavity centroid in mm (the myocardium's if the slice has no cavity)."""
    cavity = _cavity(slice_labels, codes)
    mask = cavity if cavity.any() else slice_labels == codes["myo"]
    return np.asarray(ndimage.center_of_mass(mask)) * np.asarray(spacing, float)


def transmural_coordinate(slice_labels: np.ndarray, spacing, codes: dict) -> np.ndarray | None:
    """phi = d_endo / (d_endo + d_epi) (0 in the cavity, 1 outside the heart), ``(H, W)``; None without a cavity."""
    cavity = _cavity(slice_labels, codes)
    heart = cavity | (slice_labels == codes["myo"])
    if not cavity.any() or heart.all():
        return None
    sampling = [float(s) for s in spacing]
    d_endo = ndimage.distance_transform_edt(~cavity, sampling=sampling)
    d_epi = ndimage.distance_transform_edt(heart, sampling=sampling)
    return d_endo / (d_endo + d_epi)


def wall_directions(labels: np.ndarray, spacing, codes: dict, method: str = "wall_normal",
                    smoothing: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """(normal, tangent), each ``(S, 2, H, W)`` physical unit vectors on the myocardium (0 elsewhere).

    normal: outward (cavity -> epicardium), radial (SAX) / transverse (LAX); tangent: normal rotated +90 deg
    (axis 0 -> axis 1), circumferential / longitudinal. ``method``: ``"centroid"`` (from the slice's LV-cavity
    centroid, the myocardium's without a cavity) or ``"wall_normal"`` (gradient of ``transmural_coordinate``
    smoothed by a Gaussian of ``smoothing`` finest-axis pixels; centroid direction where it is undefined).
    """
    if method not in ("centroid", "wall_normal"):
        raise ValueError(f"method must be 'centroid' or 'wall_normal', got {method!r}.")
    stack = _as_stack(labels)
    s = np.asarray(spacing, float)
    n_slices, h, w = stack.shape
    g0, g1 = np.meshgrid(np.arange(h) * s[0], np.arange(w) * s[1], indexing="ij")
    normal = np.zeros((n_slices, 2, h, w))
    for k in range(n_slices):
        myo = stack[k] == codes["myo"]
        if not myo.any():
            continue
        c = _centre_mm(stack[k], s, codes)
        vec = np.stack([g0 - c[0], g1 - c[1]])
        phi = transmural_coordinate(stack[k], s, codes) if method == "wall_normal" else None
        if phi is not None:
            phi = ndimage.gaussian_filter(phi, smoothing * s.min() / s) if smoothing > 0 else phi
            grad = np.stack(np.gradient(phi, s[0], s[1]))
            defined = np.hypot(grad[0], grad[1]) > 1e-6 / s.min()
            vec = np.where(defined, grad, vec)
        length = np.hypot(vec[0], vec[1])
        normal[k] = np.where(myo & (length > 0), vec / np.where(length > 0, length, 1.0), 0.0)
    tangent = np.stack([-normal[:, 1], normal[:, 0]], axis=1)
    return normal, tangent


def _orientation(affine, anterior, septal, notes: list) -> tuple[np.ndarray, np.ndarray, str]:
    """Anterior and patient-right in-plane directions, and their source: a real (non-diagonal) RAS affine, else the
    convention (``anterior`` / ``septal``)."""
    if affine is not None:
        a = np.asarray(affine, float)[:3, :3]
        if not np.allclose(a, np.diag(np.diag(a))):
            axes = a[:, :2] / np.linalg.norm(a[:, :2], axis=0)  # world direction of array axes 0, 1
            if np.hypot(*axes[1]) > 0.1:
                return _unit(axes[1]), _unit(axes[0]), "the affine"  # RAS +y = anterior, +x = patient right
            notes.append("affine: anterior is nearly normal to the slices; image convention used")
    return _unit(anterior), _unit(septal), "the image-axis convention"


def _rv_arc(slice_labels: np.ndarray, spacing, codes: dict, centre: np.ndarray, contact_px: int):
    """Angular arc of RV pixels within ``contact_px`` of the myocardium: (start, span, start px, end px) or None."""
    if "rv" not in codes:
        return None
    near = ndimage.binary_dilation(slice_labels == codes["myo"], _FULL, iterations=contact_px)
    pixels = np.argwhere((slice_labels == codes["rv"]) & near)
    if len(pixels) < 3:
        return None
    offset = pixels * np.asarray(spacing, float) - centre
    angles = np.arctan2(offset[:, 1], offset[:, 0])
    order = np.argsort(angles)
    a = angles[order]
    gap = int(np.argmax(np.diff(np.append(a, a[0] + 2 * np.pi))))  # the largest empty sector is outside the arc
    first = (gap + 1) % len(a)
    span = (a[gap] - a[first]) % (2 * np.pi)
    return a[first], span, pixels[order[first]], pixels[order[gap]]


def _slice_origin(arc, anterior: np.ndarray):
    """(angle of the anterior insertion, direction into the septum (+-1), septal span), the insertions
    ((anterior px), (inferior px)) and whether the septum lies almost along the anterior direction (ambiguous)."""
    start, span, p_start, p_end = arc
    middle = start + span / 2
    cross = np.cos(middle) * anterior[1] - np.sin(middle) * anterior[0]  # > 0: anterior at +angle of the septum
    points = [None if p is None else tuple(map(float, p)) for p in (p_start, p_end)]
    if cross > 0:
        return (start + span, -1.0, span), (points[1], points[0]), abs(cross) < 0.2
    return (start, 1.0, span), (points[0], points[1]), abs(cross) < 0.2


def _slice_levels(stack: np.ndarray, codes: dict, single_slice_level: str, base: str, notes: list) -> list:
    """Basal / mid / apical thirds of the slices with myocardium, the base at ``base`` ('first' / 'last' slice or
    'auto': the end whose half of the slices has the larger heart area, all labels of ``codes``)."""
    levels: list = [None] * len(stack)
    present = [k for k in range(len(stack)) if (stack[k] == codes["myo"]).any()]
    n = len(present)
    if n == 1:
        levels[present[0]] = single_slice_level
    elif n > 1:
        area = [int(np.isin(stack[k], list(codes.values())).sum()) for k in present]
        half = n // 2
        if base == "last" or (base == "auto" and sum(area[n - half:]) > sum(area[:half])):
            present = present[::-1]
            notes.append("base = the last slices" + (" (larger heart area)" if base == "auto" else ""))
        for rank, k in enumerate(present):  # a slice takes the third its centre falls in (n = 2: basal + apical)
            levels[k] = LEVELS[min(int(3 * (rank + 0.5) / n), 2)]
    return levels


def sax_segments(labels: np.ndarray, spacing, codes: dict, affine: np.ndarray | None = None,
                 single_slice_level: str = "mid", anterior=ACDC_ANTERIOR, septal=ACDC_SEPTAL,
                 contact_px: int = 2, base: str = "auto") -> SegmentResult:
    """AHA segments 1-16 of a short-axis stack ``(S, H, W)`` (or one ``(H, W)`` slice).

    Levels: the slices with myocardium are cut into thirds, each slice taking the third its centre falls in
    (sizes as equal as possible; 2 slices -> basal + apical; 1 slice -> ``single_slice_level``); ``base="auto"``:
    the base is the end whose half of the slices has the larger heart area (LV cavity + myocardium + RV; ties: the
    first slice; the LV cavity alone put the base at the apex in 3 of the 100 stored ACDC stacks (HCM, MINF),
    the heart area in none), or ``"first"`` / ``"last"`` slice. Angles: around each slice's
    LV-cavity centroid in mm; origin at the anterior RV insertion (ends of the arc of RV pixels within
    ``contact_px`` of the myocardium), basal / mid 60 deg sectors 2, 3, 4, 5, 6, 1 going into the septum, apical
    90 deg sectors 14 (centred on the septal arc), 15, 16, 13. Anterior: a real RAS ``affine`` (3x3 not diagonal:
    +y) or else ``anterior`` (array-axis direction; default right for the stored ACDC data, see the module doc).
    A slice without RV contact borrows the origin of the nearest slice that has one (ties: the lower index); with
    none in the stack, the septum is taken along ``septal`` (affine: patient right) with a 120 deg septal arc.
    """
    stack = _as_stack(labels)
    notes: list = []
    s = np.asarray(spacing, float)
    ant, sep, source = _orientation(affine, anterior, septal, notes)
    if base not in ("auto", "first", "last"):
        raise ValueError(f"base must be 'auto', 'first' or 'last', got {base!r}.")
    levels = _slice_levels(stack, codes, single_slice_level, base, notes)
    centres, origins, insertions = {}, {}, [None] * len(stack)
    for k, level in enumerate(levels):
        if level is None:
            continue
        centres[k] = _centre_mm(stack[k], s, codes)
        arc = _rv_arc(stack[k], s, codes, centres[k], contact_px)
        if arc is not None:
            origins[k], insertions[k], ambiguous = _slice_origin(arc, ant)
            if ambiguous:
                notes.append(f"slice {k}: the septum lies along the anterior direction; anterior insertion ambiguous")
    if centres and not origins:
        middle = np.arctan2(sep[1], sep[0])
        default, _, _ = _slice_origin((middle - np.pi / 3, 2 * np.pi / 3, None, None), ant)
        notes.append(f"no slice has RV contact: AHA origin from the image axes (septum along {np.round(sep, 2)}, "
                     f"from {source})")
    found = dict(origins)  # donors: slices with their own insertion points only
    segments = np.zeros(stack.shape, np.int16)
    s_idx, s_row, s_col = np.nonzero(stack == codes["myo"])
    for k in centres:
        if k not in origins:
            if found:
                donor = min(found, key=lambda j: (abs(j - k), j))
                notes.append(f"slice {k}: no RV contact; AHA origin from slice {donor}")
                origins[k] = found[donor]
            else:
                origins[k] = default
        start, direction, span = origins[k]
        rows, cols = s_row[s_idx == k], s_col[s_idx == k]
        theta = np.arctan2(cols * s[1] - centres[k][1], rows * s[0] - centres[k][0])
        alpha = (direction * (theta - start)) % (2 * np.pi)
        if levels[k] == "apical":
            sector = (((alpha - span / 2 + np.pi / 4) % (2 * np.pi)) // (np.pi / 2)).astype(int)
            numbers = np.asarray(APICAL_ORDER)[np.clip(sector, 0, 3)]
        else:
            sector = (alpha // (np.pi / 3)).astype(int)
            numbers = np.asarray(BASAL_ORDER)[np.clip(sector, 0, 5)] + (6 if levels[k] == "mid" else 0)
        segments[k, rows, cols] = numbers
    return SegmentResult(segments, levels, insertions, notes)


def _length_mm(points: np.ndarray, spacing) -> float:
    return float(np.linalg.norm(np.diff(points, axis=0) * np.asarray(spacing, float), axis=1).sum())


def _resample(points: np.ndarray, spacing, step_mm: float) -> np.ndarray:
    steps = np.linalg.norm(np.diff(points, axis=0) * np.asarray(spacing, float), axis=1)
    keep = np.append(True, steps > 1e-9)
    points, arc = points[keep], np.append(0.0, np.cumsum(steps[steps > 1e-9]))
    t = np.linspace(0.0, arc[-1], max(int(np.ceil(arc[-1] / step_mm)), 2) + 1)
    return np.stack([np.interp(t, arc, points[:, i]) for i in range(2)], axis=1)


def midwall_contour(labels: np.ndarray, spacing, codes: dict, step: float = 1.0) -> np.ndarray:
    """Mid-wall line (phi = 0.5) of one 2D myocardium, ``(N, 2)`` pixels, evenly resampled (``step`` x the finest
    spacing). Long axis: open, from the basal end with the smaller axis-0 index through the apex to the other.
    Short axis: a closed loop, first point repeated at the end, turning with increasing angle (axis 0 -> axis 1).
    Where the cavity meets the outside directly (the mitral opening) no line is drawn."""
    labels = np.asarray(labels)
    lab = labels[0] if labels.ndim == 3 and labels.shape[0] == 1 else labels
    phi = transmural_coordinate(lab, spacing, codes)
    myo = lab == codes["myo"]
    if phi is None or not myo.any():
        raise ValueError("midwall_contour needs an LV cavity and a myocardium in the slice.")
    cavity = _cavity(lab, codes)
    outside = ~(cavity | myo)
    opening = (cavity & ndimage.binary_dilation(outside, _FULL)) | (outside & ndimage.binary_dilation(cavity, _FULL))
    keep = myo | (ndimage.binary_dilation(myo, _FULL) & ~opening)
    try:
        import contourpy  # ships with matplotlib; not in requirements.txt (only this function needs it)
    except ImportError as error:
        raise ImportError("midwall_contour needs contourpy (pip install contourpy, or matplotlib).") from error
    lines = contourpy.contour_generator(z=np.ma.array(phi, mask=~keep), line_type="Separate").lines(0.5)
    lines = [line[:, ::-1] for line in lines if len(line) > 1]  # contourpy (x = axis 1, y = axis 0)
    if not lines:
        raise ValueError("no mid-wall line found (myocardium too thin or fragmented).")
    line = max(lines, key=lambda p: _length_mm(p, spacing))
    if np.allclose(line[0], line[-1]):
        area = np.sum(line[:-1, 0] * line[1:, 1] - line[1:, 0] * line[:-1, 1])
        line = line if area > 0 else line[::-1]  # a guard: contourpy already turns this way on rings
    elif tuple(line[0]) > tuple(line[-1]):
        line = line[::-1]
    return _resample(line, spacing, step * float(min(spacing)))


def contour_strain(contour: np.ndarray, displacement: np.ndarray, spacing) -> float:
    """Engineering strain (fraction) of a contour's length when its points move by the Lagrangian displacement
    ``(2, H, W)`` (or ``(1, 2, H, W)``) in pixels, bilinearly sampled; lengths in mm. A closed contour repeats its
    first point. On the long-axis mid-wall contour ED -> ES this is the echo global longitudinal strain."""
    u = np.asarray(displacement, float)
    u = u[0] if u.ndim == 4 else u
    points = np.asarray(contour, float)
    moved = points + np.stack([ndimage.map_coordinates(u[i], points.T, order=1, mode="nearest") for i in range(2)], 1)
    return _length_mm(moved, spacing) / _length_mm(points, spacing) - 1.0


def la_segments(labels: np.ndarray, spacing, codes: dict, view: str | None = None,
                septal_side: str = "axis0_low") -> SegmentResult:
    """Six echo segments of one long-axis slice ``(H, W)`` or ``(1, H, W)``: basal / mid / apical thirds along the
    axis from the mid-point of the two basal ends of the mid-wall line (mitral annulus) to the myocardial pixel
    farthest from it (apex; ties averaged), for each wall (side of the axis). Wall A is the wall toward
    ``septal_side`` (CAMUS: ``"axis0_low"``, see the module doc), septal in 4CH and inferior in 2CH. Numbers:
    4CH A 3/9/14, B 6/12/16; 2CH A 4/10/15, B 1/7/13; ``view`` None or unknown: A 1/2/3, B 4/5/6 (base to apex).
    ``insertion_points`` holds the (wall A, wall B) basal ends; ``levels`` is ``["long_axis"]``."""
    stack = _as_stack(labels)
    if stack.shape[0] != 1:
        raise ValueError(f"la_segments takes one long-axis slice, got {stack.shape[0]}.")
    key = {"4CH": "4CH", "A4C": "4CH", "2CH": "2CH", "A2C": "2CH"}.get(str(view).upper()) if view else None
    if septal_side not in SIDES:
        raise ValueError(f"septal_side must be one of {sorted(SIDES)}, got {septal_side!r}.")
    s = np.asarray(spacing, float)
    line = midwall_contour(stack[0], s, codes)
    if np.allclose(line[0], line[-1]):
        raise ValueError("the long-axis myocardium forms a closed ring: no open base (mitral annulus) found.")
    base = (line[0] + line[-1]) / 2 * s
    myo = stack[0] == codes["myo"]
    points = np.argwhere(_largest_component(myo)) * s
    distance = np.linalg.norm(points - base, axis=1)
    apex = points[distance >= distance.max() - s.min()].mean(axis=0)  # farthest pixels (ties averaged)
    axis = apex - base
    rows, cols = np.nonzero(myo)
    rel = np.stack([rows, cols], 1) * s - base
    third = np.clip((3 * (rel @ axis) / (axis @ axis)).astype(int), 0, 2)
    wanted = np.sign(axis[0] * SIDES[septal_side][1] - axis[1] * SIDES[septal_side][0]) or 1.0
    wall_a = (axis[0] * rel[:, 1] - axis[1] * rel[:, 0]) * wanted >= 0
    numbers = np.asarray(LA_NUMBERS[key])
    segments = np.zeros(stack.shape, np.int16)
    segments[0, rows, cols] = np.where(wall_a, numbers[0][third], numbers[1][third])
    ends = [tuple(map(float, p)) for p in (line[0], line[-1])]
    end_a = (axis[0] * (line[0] * s - base)[1] - axis[1] * (line[0] * s - base)[0]) * wanted >= 0
    return SegmentResult(segments, ["long_axis"], [tuple(ends) if end_a else tuple(ends[::-1])], [])
