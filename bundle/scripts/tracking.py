"""Whole-cycle motion tracking: the Lagrangian field of every frame of a cine on the ED grid.

A pairwise registration (``LagrangianFn``, built by the caller from the network or a classical method) is turned
into ``U`` of shape ``(T, S, 2, H, W)`` (pixels, ED reference, ``U[ed_index] == 0``) in one of three ways
(:func:`track_cycle`): every frame against ED, frame-to-frame increments composed forward, or forward and backward
compositions blended to cancel the drift (the UK Biobank pipeline's scheme). All registrations of a call are
batched (``batch_size`` 2D pairs per call of ``lagrangian``); the compositions are cheap resamplings.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from monai.networks.blocks import Warp

MODES = ("direct", "sequential", "drift_corrected")

LagrangianFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``lagrangian(reference (N, H, W), target (N, H, W)) -> (N, 2, H, W)``: displacement in pixels on the reference
grid taking the tissue at X in ``reference`` to X + U(X) in ``target``."""

_RESAMPLE = Warp(mode="bilinear", padding_mode="border")


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Chain two Lagrangian fields (B, 2, H, W) in pixels: ``first`` maps grid A to B (on A's grid), ``second`` B to C
    (on B's grid); the result maps A to C on A's grid: U(X) = first(X) + second(X + first(X)) (bilinear, border)."""
    return first + _RESAMPLE(second, first)


def _register_pairs(
    frames: torch.Tensor, pairs: Sequence[tuple[int, int]], lagrangian: LagrangianFn, batch_size: int
) -> torch.Tensor:
    """Register every slice of each (reference frame, target frame) pair -> (P, S, 2, H, W), ``batch_size`` 2D pairs
    per call."""
    num_slices, height, width = frames.shape[1:]
    if not pairs:
        return frames.new_zeros((0, num_slices, 2, height, width))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    index = torch.as_tensor(pairs, dtype=torch.long, device=frames.device)  # (P, 2)
    slices = torch.arange(num_slices, device=frames.device)
    reference_t = index[:, 0].repeat_interleave(num_slices)
    target_t = index[:, 1].repeat_interleave(num_slices)
    slice_index = slices.repeat(len(pairs))
    fields = []
    for start in range(0, len(reference_t), batch_size):
        chunk = slice(start, start + batch_size)
        reference = frames[reference_t[chunk], slice_index[chunk]]
        target = frames[target_t[chunk], slice_index[chunk]]
        field = lagrangian(reference, target)
        if field.shape != (len(reference), 2, height, width):
            expected = (len(reference), 2, height, width)
            raise ValueError(f"lagrangian returned {tuple(field.shape)}, expected {expected}.")
        fields.append(field.to(frames.device))
    return torch.cat(fields).reshape(len(pairs), num_slices, 2, height, width)


def _cycle_frames(num_frames: int, ed_index: int) -> list[int]:
    """Frame index at each cycle position k = 0..T-1 (position 0 is ED)."""
    if not 0 <= ed_index < num_frames:
        raise ValueError(f"ed_index must lie in [0, {num_frames}), got {ed_index}.")
    return [(ed_index + k) % num_frames for k in range(num_frames)]


def _chain(start: torch.Tensor, increments: torch.Tensor) -> list[torch.Tensor]:
    """[start, compose(start, inc_0), compose(compose(start, inc_0), inc_1), ...] (every element (S, 2, H, W))."""
    chain = [start]
    for increment in increments:
        chain.append(compose(chain[-1], increment))
    return chain


def track_cycle(
    frames: torch.Tensor, lagrangian: LagrangianFn, mode: str = "direct", ed_index: int = 0, batch_size: int = 32
) -> torch.Tensor:
    """Lagrangian motion of a whole cycle: ``frames`` (T, S, H, W) -> U (T, S, 2, H, W) in pixels on the ED grid.

    ``U[t]`` takes the tissue at X in frame ``ed_index`` to X + U[t](X) in frame t; ``U[ed_index] == 0``. Frames are
    in cycle order and the cycle wraps: frame t sits at cycle position k = (t - ed_index) mod T.

    Modes:
      * ``"direct"``: every frame registered against ED (ED the reference): T - 1 pairs per slice, no accumulation,
        but large deformations near ES.
      * ``"sequential"``: increments position k -> k + 1 (reference k) for k = 0..T-2, composed forward from ED;
        small deformations, but errors accumulate (drift).
      * ``"drift_corrected"``: the forward chain of ``"sequential"`` (U_f) plus a backward chain from ED the other
        way round the cycle, ED -> position T-1 -> T-2 -> ... -> k (U_b, increments with reference k + 1), blended
        U = (1 - k / T) U_f + (k / T) U_b. Near ED going forward (few increments) dominates, near the end of the cycle
        the short backward chain does; at position T-1 the backward chain is a single registration ED -> T-1.

    The UK Biobank pipeline (github baiwenjia/ukbb_cardiac, ``common/cardiac_utils.py``,
    ``cine_2d_sa_motion_and_strain_analysis``) does the same per 2D slice with MIRTK free-form deformations: it
    registers consecutive frames in both directions (forward target fr - 1 / source fr; backward target (fr + 1) mod T
    / source fr), composes them with ``mirtk compose-dofs -approximate`` into forward 0 -> fr and backward
    0 -> T-1 -> ... -> fr transformations, averages the two B-spline control-point fields with weights (T - fr) / T
    and fr / T (``average_3d_ffd``) and moves the ED contours with the result. We work on dense displacement fields:
    the chains are exact resamplings (:func:`compose`, bilinear) instead of a B-spline approximation of each
    composition, the blend averages the displacement fields with the same weights, and ED may be any frame.

    Every registration of a call is batched: ``batch_size`` 2D (reference, target) pairs per call of ``lagrangian``
    (direct: (T-1) S pairs, sequential: (T-1) S, drift-corrected: 2 (T-1) S). Tensors stay on ``frames.device``.
    """
    if mode not in MODES:
        raise ValueError(f"tracking mode must be one of {MODES}, got {mode!r}.")
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, S, H, W), got shape {tuple(frames.shape)}.")
    num_frames = frames.shape[0]
    order = _cycle_frames(num_frames, ed_index)
    motion = frames.new_zeros((num_frames, frames.shape[1], 2) + tuple(frames.shape[2:]))
    if num_frames == 1:
        return motion
    if mode == "direct":
        fields = _register_pairs(frames, [(order[0], t) for t in order[1:]], lagrangian, batch_size)
        motion[order[1:]] = fields.to(motion.dtype)
        return motion
    forward_pairs = [(order[k], order[k + 1]) for k in range(num_frames - 1)]
    backward_pairs = [(order[(k + 1) % num_frames], order[k]) for k in range(num_frames - 1, 0, -1)]
    pairs = forward_pairs + (backward_pairs if mode == "drift_corrected" else [])
    increments = _register_pairs(frames, pairs, lagrangian, batch_size).to(motion.dtype)
    zero = motion[order[0]]
    forward = _chain(zero, increments[: num_frames - 1])  # position k: ED -> k
    if mode == "sequential":
        for k in range(1, num_frames):
            motion[order[k]] = forward[k]
        return motion
    backward = _chain(zero, increments[num_frames - 1 :])  # element j: ED -> position T - j
    for k in range(1, num_frames):
        weight = k / num_frames
        motion[order[k]] = (1.0 - weight) * forward[k] + weight * backward[num_frames - k]
    return motion


def cycle_drift(
    frames: torch.Tensor,
    lagrangian: LagrangianFn,
    ed_index: int = 0,
    region: torch.Tensor | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """How far frame-to-frame tracking fails to close the cycle: (S,) mean end-point distance in pixels.

    All T increments round the cycle (ED -> ED + 1 -> ... -> T-1 -> ED, cyclic) are composed; a perfect tracker
    returns every ED point onto itself. The mean of |U_cycle| is taken over ``region`` (S, H, W) (e.g. the ED
    myocardium) if given, else over each slice; NaN for a slice whose region is empty."""
    num_frames = frames.shape[0]
    order = _cycle_frames(num_frames, ed_index)
    pairs = [(order[k], order[(k + 1) % num_frames]) for k in range(num_frames)]
    increments = _register_pairs(frames, pairs, lagrangian, batch_size)
    closed = _chain(torch.zeros_like(increments[0]), increments)[-1]
    distance = torch.linalg.vector_norm(closed, dim=1)  # (S, H, W)
    if region is None:
        return distance.flatten(1).mean(dim=1)
    weights = region.to(device=distance.device, dtype=distance.dtype)
    return (distance * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1)
