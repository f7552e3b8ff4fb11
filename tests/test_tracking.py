"""Whole-cycle tracking: field composition, the three tracking modes against the phantom's true motion, drift."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.phantom import cine_motion
from scripts.tracking import compose, cycle_drift, track_cycle

SIZE, T = 64, 12
SLICES = (0, 5)  # two phantom cases play two slices


def identity(size: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).double()


# ---------------------------------------------------------------------------------------------------------- compose


def test_compose_translations_add():
    first = torch.tensor([1.25, -0.5]).double().view(1, 2, 1, 1).expand(1, 2, 16, 16)
    second = torch.tensor([-0.75, 2.0]).double().view(1, 2, 1, 1).expand(1, 2, 16, 16)
    result = compose(first, second)
    torch.testing.assert_close(result, (first + second).contiguous(), atol=1e-6, rtol=0)


def test_compose_affine_fields_is_the_analytic_composition():
    """first(X) = A X + a, second(Y) = B Y + b -> U(X) = A X + a + B (X + A X + a) + b (bilinear: exact on affine)."""
    size = 32
    x = identity(size)
    A, a = torch.tensor([[0.05, -0.08], [0.03, -0.04]]).double(), torch.tensor([0.7, -1.2]).double()
    B, b = torch.tensor([[-0.06, 0.02], [0.09, 0.05]]).double(), torch.tensor([-0.4, 0.9]).double()
    affine = lambda M, m, points: torch.einsum("ij,jhw->ihw", M, points) + m[:, None, None]  # noqa: E731
    first, second = affine(A, a, x)[None], affine(B, b, x)[None]
    expected = affine(A, a, x) + affine(B, b, x + affine(A, a, x))
    result = compose(first, second)[0]
    landing = x + first[0]
    interior = ((landing > 0) & (landing < size - 1)).all(dim=0)
    assert interior.float().mean() > 0.8
    assert (result - expected)[:, interior].abs().max() < 1e-6
    swapped = compose(second, first)[0]  # the order matters: the other way round is another map
    assert (swapped - expected)[:, interior].abs().max() > 0.05


def test_compose_smooth_fields_within_interpolation_error():
    size = 64
    x = identity(size)
    k = 2 * math.pi / 24
    first = torch.stack([1.5 * torch.sin(k * x[1]), -1.0 * torch.cos(k * x[0])])[None]
    def second_at(p: torch.Tensor) -> torch.Tensor:
        return torch.stack([0.8 * torch.cos(k * p[0] + 0.3), 1.2 * torch.sin(k * (p[0] + p[1]))])

    expected = first[0] + second_at(x + first[0])
    result = compose(first, second_at(x)[None])[0]
    interior = ((x + first[0] > 1) & (x + first[0] < size - 2)).all(dim=0)
    error = (result - expected)[:, interior].abs()
    assert error.max() < 0.03 and error.mean() < 0.01  # bilinear: h^2 |f''| / 8 ~ 0.02 px
    assert (first[0] + second_at(x) - expected)[:, interior].abs().max() > 0.1  # the resampling matters


# ------------------------------------------------------------------------------------------ oracles on the phantom


class PhantomOracle:
    """A LagrangianFn built from the phantom's analytic motion. Frames are index-coded: the image of frame t, slice s
    is the constant t + 1000 s, so the oracle knows which pair it is asked for. The exact field taking frame a to
    frame b on a's grid is e_a(x) + U_b(x + e_a(x)) (e_a: a's Eulerian pull to ED, U_b analytic).
    ``bias`` is added to every answer (a tracker with a constant error); calls and pair counts are recorded."""

    def __init__(self, size: int = SIZE, num_frames: int = T, bias: tuple[float, float] = (0.0, 0.0)):
        self.size, self.num_frames = size, num_frames
        self.motions = [cine_motion(index, size=size, num_frames=num_frames) for index in SLICES]
        self.pulls = [[m.eulerian(t, size)[0] for t in range(num_frames)] for m in self.motions]
        self.bias = np.asarray(bias, np.float64)[:, None, None]
        self.calls: list[int] = []

    def frames(self, ed_index: int = 0) -> torch.Tensor:
        """(T, S, H, W): frame t at cycle position (t - ed_index) mod T."""
        positions = [(t - ed_index) % self.num_frames for t in range(self.num_frames)]
        codes = torch.tensor([[k + 1000.0 * s for s in range(len(SLICES))] for k in positions], dtype=torch.float64)
        return codes[:, :, None, None].expand(-1, -1, self.size, self.size).contiguous()

    def field(self, slice_index: int, a: int, b: int) -> np.ndarray:
        if a == b:
            return np.zeros((2, self.size, self.size))
        pull = self.pulls[slice_index][a]
        ed_points = np.mgrid[0 : self.size, 0 : self.size].astype(np.float64) + pull
        return pull + self.motions[slice_index].displacement(b, ed_points)[0]

    def truth(self, position: int) -> torch.Tensor:
        """(S, 2, H, W): the true U at a cycle position."""
        return torch.from_numpy(np.stack([m.lagrangian(position, self.size)[0] for m in self.motions]))

    def __call__(self, reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(reference))
        out = []
        for ref, tgt in zip(reference[:, 0, 0].tolist(), target[:, 0, 0].tolist()):
            s, a, b = int(ref) // 1000, int(ref) % 1000, int(tgt) % 1000
            assert int(tgt) // 1000 == s  # pairs never mix slices
            out.append(self.field(s, a, b) + self.bias)
        return torch.from_numpy(np.stack(out))


@pytest.fixture(scope="module")
def oracle():
    return PhantomOracle()


@pytest.fixture(scope="module")
def heart():
    """(S, H, W): the ED myocardial band and a margin (where errors are measured; far from the image border; the
    cavity, squeezed hardest, is left out)."""
    masks = []
    for index in SLICES:
        motion = cine_motion(index, size=SIZE, num_frames=T)
        x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
        radius = np.hypot(x[0] - motion.lv_centre[0], x[1] - motion.lv_centre[1])
        masks.append((radius >= motion.inner_radius) & (radius < motion.outer_radius + 4))
    return torch.from_numpy(np.stack(masks))


def errors(motion: torch.Tensor, oracle: PhantomOracle, region: torch.Tensor, ed_index: int = 0, reduce=torch.max):
    """End-point error over the region (max, or ``reduce``) at each cycle position."""
    out = []
    for position in range(T):
        t = (position + ed_index) % T
        distance = torch.linalg.vector_norm(motion[t] - oracle.truth(position), dim=1)
        out.append(reduce(distance[region]).item())
    return np.array(out)


def test_direct_mode_returns_the_truth(oracle, heart):
    motion = track_cycle(oracle.frames(), oracle, mode="direct")
    assert motion.shape == (T, len(SLICES), 2, SIZE, SIZE) and motion.dtype == torch.float64
    assert not motion[0].any()
    assert errors(motion, oracle, torch.ones_like(heart)).max() < 1e-9


def test_sequential_mode_with_exact_increments_reproduces_the_truth(oracle, heart):
    motion = track_cycle(oracle.frames(), oracle, mode="sequential")
    error = errors(motion, oracle, heart)
    assert error[0] == 0.0
    # bilinear resampling of the increments along the chain: largest at the endocardium near ES (curved field)
    assert error.max() < 0.25 and errors(motion, oracle, heart, reduce=torch.mean).max() < 0.01
    es = round(0.35 * T)
    assert error[es] > 1e-3  # composed, not looked up: the error is interpolation, not zero


def test_drift_corrected_mode_is_exact_at_both_ends(oracle, heart):
    motion = track_cycle(oracle.frames(), oracle, mode="drift_corrected")
    error = errors(motion, oracle, heart)
    assert error[0] == 0.0
    assert error.max() < 0.25 and errors(motion, oracle, heart, reduce=torch.mean).max() < 0.01
    assert error[T - 1] < 0.01  # mostly the single ED -> T-1 registration
    sequential = track_cycle(oracle.frames(), oracle, mode="sequential")
    direct_last = oracle.truth(T - 1)
    blend = (1 / T) * sequential[T - 1] + (1 - 1 / T) * direct_last  # the documented weights at position T-1
    torch.testing.assert_close(motion[T - 1], blend, atol=1e-9, rtol=0)


def test_a_constant_bias_drifts_sequentially_and_is_corrected(heart):
    bias = torch.tensor([0.05, -0.03], dtype=torch.float64)
    biased = PhantomOracle(bias=tuple(bias.tolist()))
    frames = biased.frames()
    sequential = track_cycle(frames, biased, mode="sequential")
    corrected = track_cycle(frames, biased, mode="drift_corrected")
    norm = bias.norm().item()
    for k in range(1, T):
        # translations compose additively: k biased increments forward, T - k backward
        seq_error = (sequential[k] - biased.truth(k)).permute(1, 0, 2, 3)[:, heart].mean(dim=1)
        torch.testing.assert_close(seq_error, k * bias, atol=0.05, rtol=0)
        cor_error = (corrected[k] - biased.truth(k)).permute(1, 0, 2, 3)[:, heart].mean(dim=1)
        torch.testing.assert_close(cor_error, 2 * k * (T - k) / T * bias, atol=0.05, rtol=0)
    end_sequential = (sequential[T - 1] - biased.truth(T - 1)).norm(dim=1)[heart].mean().item()
    end_corrected = (corrected[T - 1] - biased.truth(T - 1)).norm(dim=1)[heart].mean().item()
    assert end_sequential > 0.9 * (T - 1) * norm and end_corrected < 2.1 * norm  # back to ~0 at the cycle's end
    drift = cycle_drift(frames, biased, region=heart)
    assert drift.shape == (len(SLICES),)
    torch.testing.assert_close(drift, torch.full((2,), T * norm, dtype=torch.float64), atol=0.03, rtol=0)


def test_cycle_drift_of_exact_increments_is_small(oracle, heart):
    drift = cycle_drift(oracle.frames(), oracle, region=heart)
    assert drift.shape == (2,) and (drift < 0.05).all()
    whole = cycle_drift(oracle.frames(), oracle)  # whole slices, image borders included
    assert torch.isfinite(whole).all()
    empty = cycle_drift(oracle.frames(), oracle, region=torch.zeros_like(heart))
    assert torch.isnan(empty).all()


@pytest.mark.parametrize("mode", ["direct", "sequential", "drift_corrected"])
def test_ed_anywhere_in_the_cycle(oracle, heart, mode):
    """ED at frame 9 of 12: frames 9, 10, 11, 0, ..., 8 are cycle positions 0..11; the same answer, rolled."""
    ed = 9
    rolled = track_cycle(oracle.frames(ed), oracle, mode=mode, ed_index=ed)
    assert not rolled[ed].any()
    reference = track_cycle(oracle.frames(), oracle, mode=mode)
    for t in range(T):
        torch.testing.assert_close(rolled[t], reference[(t - ed) % T], atol=1e-12, rtol=0)
    assert errors(rolled, oracle, heart, ed_index=ed).max() < 0.25
    drift = cycle_drift(oracle.frames(ed), oracle, ed_index=ed, region=heart)
    torch.testing.assert_close(drift, cycle_drift(oracle.frames(), oracle, region=heart), atol=1e-12, rtol=0)


class CountingZero:
    """A LagrangianFn that records its batch sizes and returns zeros (on the device of its inputs)."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert reference.shape == target.shape and reference.ndim == 3
        self.calls.append(len(reference))
        return reference.new_zeros((len(reference), 2) + tuple(reference.shape[1:]))


@pytest.mark.parametrize(
    "mode, pairs_per_slice", [("direct", 29), ("sequential", 29), ("drift_corrected", 58), ("cycle_drift", 30)]
)
def test_registrations_are_batched(mode, pairs_per_slice):
    """A 10-slice, 30-frame cine: (T-1) S pairs in ceil(pairs / 32) calls, never one call per pair."""
    frames = torch.rand(30, 10, 8, 8)
    counter = CountingZero()
    if mode == "cycle_drift":
        cycle_drift(frames, counter, ed_index=4)
    else:
        out = track_cycle(frames, counter, mode=mode, ed_index=4, batch_size=32)
        assert out.shape == (30, 10, 2, 8, 8) and out.device == frames.device and out.dtype == frames.dtype
    assert sum(counter.calls) == 10 * pairs_per_slice
    assert len(counter.calls) == math.ceil(10 * pairs_per_slice / 32) and max(counter.calls) <= 32


def test_invalid_arguments():
    frames = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="mode"):
        track_cycle(frames, CountingZero(), mode="backward")
    with pytest.raises(ValueError, match="ed_index"):
        track_cycle(frames, CountingZero(), ed_index=4)
    with pytest.raises(ValueError, match=r"\(T, S, H, W\)"):
        track_cycle(frames[:, 0], CountingZero())
    with pytest.raises(ValueError, match="lagrangian returned"):
        track_cycle(frames, lambda r, t: torch.zeros(len(r), 2, 4, 4))
