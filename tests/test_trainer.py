"""AdaCSTrainer built directly in Python on tiny phantom pairs (32 x 32).

The reference computations below are written out from the method (doc sections 3-5) with MONAI ``Warp`` and
plain tensor arithmetic; they do not call the bundle's loss classes.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.networks.blocks import Warp
from torch.utils.data import DataLoader

from scripts.data import PairSampler
from scripts.losses import DisplacementLoss, GradientL2Loss, ScoringLoss
from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet
from scripts.phantom import cardiac_phantom_pair
from scripts.schedule import MomentumSmoothnessWeight, Phase
from scripts.trainer import LOSS_TERMS, AdaCSIterationEvents, AdaCSKeys, AdaCSTrainer, loss_terms

SIZE = 32
LAM, LOSS_MULT, ALPHA, BETA = 0.01, 2.0, 0.02, 1.5
WARP = Warp(mode="bilinear", padding_mode="zeros")
MSE = torch.nn.MSELoss(reduction="none")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- building blocks ---------------------------------------------------------------------------------------
def pairs(num: int, size: int = SIZE) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(num):
        pair = cardiac_phantom_pair(i, size=size, mode="mixed")
        out.append({"moving": torch.as_tensor(pair["moving"]), "fixed": torch.as_tensor(pair["fixed"])})
    return out


def sequential_loader(num_pairs: int = 4, batch_size: int = 2) -> DataLoader:
    return DataLoader(pairs(num_pairs), batch_size=batch_size, shuffle=False)


def sampled_loader(epoch_length: int, batch_size: int = 2, num_pairs: int = 6) -> DataLoader:
    """As train.yaml: pairs drawn with replacement by PairSampler (reseeded per epoch by the trainer)."""
    dataset = pairs(num_pairs)
    sampler = PairSampler(dataset, num_samples=epoch_length * batch_size, batch_size=batch_size, seed=0)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size)


def build(
    loader,
    seed: int = 0,
    motion: int = 0,
    scoring: int = 0,
    acc: int = 1,
    max_epochs: int = 1,
    epoch_length: int = 2,
    lr: float = 1e-3,
    use_scoring: bool = True,
    leak: bool = False,
    **kwargs,
) -> AdaCSTrainer:
    torch.manual_seed(seed)
    displacement = DiffeomorphicVoxelMorph()
    scoring_net = ScoringNet() if use_scoring else None
    return AdaCSTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        displacement_network=displacement,
        displacement_optimizer=torch.optim.Adam(displacement.parameters(), lr=lr),
        displacement_loss=DisplacementLoss(MSE, GradientL2Loss(loss_mult=LOSS_MULT), lam=LAM),
        scoring_network=scoring_net,
        scoring_optimizer=torch.optim.Adam(scoring_net.parameters(), lr=lr) if use_scoring else None,
        scoring_loss=ScoringLoss(MSE, alpha=ALPHA) if use_scoring else None,
        smoothness_weight=MomentumSmoothnessWeight(beta=BETA),
        use_scoring=use_scoring,
        motion_warmup_epochs=motion,
        scoring_warmup_epochs=scoring,
        accumulation_steps=acc,
        epoch_length=epoch_length,
        reference_gradient_leak=leak,
        **kwargs,
    )


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def grads(net: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in net.parameters()]


def same(a: list, b: list, atol: float = 0.0) -> bool:
    """Two parameter/gradient lists are equal (None only equals None or an all-zero tensor)."""
    for x, y in zip(a, b):
        if x is None or y is None:
            other = y if x is None else x
            if other is not None and other.abs().max() > 0:
                return False
            continue
        if not torch.allclose(x, y, rtol=0.0, atol=atol):
            return False
    return True


def flat(values: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if v is None else v).flatten() for v, p in zip(values, like)])


def assert_close_vectors(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    assert expected.norm() > 0
    assert (actual - expected).norm() <= rtol * expected.norm(), ((actual - expected).norm(), expected.norm())


def as_item(output) -> dict:
    return output[0] if isinstance(output, list) else output


# ---- the method, written out --------------------------------------------------------------------------------
def tv2(score: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((score[:, :, 1:] - score[:, :, :-1]).pow(2).mean() + (score[..., 1:] - score[..., :-1]).pow(2).mean())


def reference_displacement_loss(displacement, scoring, moving, fixed, use_scores: bool = True):
    """L_de = 0.5 sum_d mean(M * stopgrad(S_d) * r_d^2) + lam * 2 * TV2(v). Returns (total, data)."""
    mask = ((moving != 0) | (fixed != 0)).float()
    fields = displacement(torch.cat([moving, fixed], 1), return_fields=True)
    if use_scores:
        with torch.no_grad():
            score_f, score_b = scoring(fixed), scoring(moving)
    else:
        score_f = score_b = torch.ones_like(fixed)
    r_f = WARP(moving, fields.forward_ddf) - fixed
    r_b = WARP(fixed, fields.backward_ddf) - moving
    data = 0.5 * ((mask * score_f * r_f**2).mean() + (mask * score_b * r_b**2).mean())
    grad = LOSS_MULT * tv2(fields.regularized_field)
    return data + LAM * grad, data


def reference_scoring_loss(displacement, scoring, moving, fixed, weight: float):
    """L_se = 0.5 sum_d [mean(M S r^2) with r from stopgrad(warp), alpha mean(M (S-1)^2), w TV2(S)]."""
    mask = ((moving != 0) | (fixed != 0)).float()
    with torch.no_grad():
        fields = displacement(torch.cat([moving, fixed], 1), return_fields=True)
        r_f = WARP(moving, fields.forward_ddf) - fixed
        r_b = WARP(fixed, fields.backward_ddf) - moving
    score_f, score_b = scoring(fixed), scoring(moving)
    ucs = 0.5 * ((mask * score_f * r_f**2).mean() + (mask * score_b * r_b**2).mean())
    reg = 0.5 * ((mask * (score_f - 1) ** 2).mean() + (mask * (score_b - 1) ** 2).mean())
    smooth = 0.5 * (tv2(score_f) + tv2(score_b))
    return {"total": ucs + ALPHA * reg + weight * smooth, "ucs": ucs, "reg": reg, "smooth": smooth}


def reference_grads(net: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    loss.backward()
    return grads(net)


# ---- (a) + (c): gradient isolation, accumulation (summed gradients) in the joint phase ----------------------
@pytest.mark.parametrize("acc", [1, 2])
def test_joint_phase_gradients_are_isolated_and_match_the_method(acc):
    trainer = build(sequential_loader(), acc=acc, epoch_length=2, max_epochs=1)
    d_net, s_net = trainer.displacement_network, trainer.scoring_network
    record: dict = {}
    checks = defaultdict(int)

    @trainer.on(Events.ITERATION_STARTED)
    def snapshot(engine):
        batch = engine.state.batch
        record.update(
            moving=batch["moving"], fixed=batch["fixed"],
            d_copy=copy.deepcopy(d_net), s_copy=copy.deepcopy(s_net),
            s_params=params(s_net), s_grads=grads(s_net), d_grads=grads(d_net), d_params=params(d_net),
        )

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def after_displacement_backward(engine):
        # the displacement step has not touched the scoring network ...
        assert same(params(s_net), record["s_params"])
        assert same(grads(s_net), record["s_grads"])
        # ... and its gradient is exactly that of L_de (S detached), summed onto the previous micro-step's
        loss, data = reference_displacement_loss(record["d_copy"], record["s_copy"], record["moving"], record["fixed"])
        expected = reference_grads(record["d_copy"], loss)
        first_of_group = (engine.state.iteration - 1) % acc == 0
        previous = flat(record["d_grads"], expected) if not first_of_group else 0.0
        assert_close_vectors(flat(grads(d_net), expected), flat(expected, expected) + previous)
        assert engine.state.output["loss_data"].item() == pytest.approx(data.item(), rel=1e-5)
        assert engine.state.output["loss_displacement"].item() == pytest.approx(loss.item(), rel=1e-5)
        record["d_grads_after_de"] = grads(d_net)
        if not first_of_group:
            assert not same(record["d_grads"], [torch.zeros_like(p) for p in d_net.parameters()])
        checks["backward"] += 1

    @trainer.on(Events.ITERATION_COMPLETED)
    def after_iteration(engine):
        step = engine.state.iteration % acc == 0
        # the scoring step sent no gradient into the displacement network
        assert same(grads(d_net), record["d_grads_after_de"])
        # both networks step on the same accumulation boundaries
        assert same(params(d_net), record["d_params"]) != step
        assert same(params(s_net), record["s_params"]) != step
        # the scoring gradient is that of L_se against the warps of theta_{t+1} (warped image detached)
        item = as_item(engine.state.output)
        weight = item["smoothness_weight"]
        ref = reference_scoring_loss(copy.deepcopy(d_net), record["s_copy"], record["moving"], record["fixed"], weight)
        expected = reference_grads(record["s_copy"], ref["total"])
        previous = flat(record["s_grads"], expected) if engine.state.iteration % acc == 0 and acc > 1 else 0.0
        assert_close_vectors(flat(grads(s_net), expected), flat(expected, expected) + previous)
        for key in ("ucs", "reg", "smooth"):
            assert item[f"loss_{key}"] == pytest.approx(ref[key].item(), rel=1e-4), key
        assert item["loss_scoring"] == pytest.approx(ref["total"].item(), rel=1e-4)
        checks["iteration"] += 1

    trainer.run()
    assert checks == {"backward": 2, "iteration": 2}


# ---- the reference code's gradient leak (off by default) ---------------------------------------------------
def leaked_grads(displacement, scoring, moving, fixed) -> list[torch.Tensor]:
    """d L_ucs / d theta: the data term with the scores held fixed, through the warp of ``displacement``."""
    return reference_grads(displacement, reference_displacement_loss(displacement, scoring, moving, fixed)[1])


@pytest.mark.parametrize("leak", [False, True])
def test_scoring_warmup_leaks_dL_ucs_into_theta_only_when_asked(leak):
    """Reference code: the scoring-only epochs pile dL_ucs/dtheta into theta's gradients (never stepped there)."""
    trainer = build(sequential_loader(), scoring=1, acc=2, epoch_length=2, leak=leak)
    d_net = trainer.displacement_network
    d_start, s_start = copy.deepcopy(d_net), copy.deepcopy(trainer.scoring_network)
    batches = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: batches.append(e.state.batch))
    trainer.run()
    assert same(params(d_net), params(d_start))  # the displacement network never steps in the scoring warm-up
    if not leak:
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in d_net.parameters())
        return
    # the scores of both micro-steps come from phi_0 (phi steps after the second), theta is unchanged
    expected = [leaked_grads(copy.deepcopy(d_start), s_start, b["moving"], b["fixed"]) for b in batches]
    assert len(expected) == 2
    assert_close_vectors(flat(grads(d_net), expected[0]), flat(expected[0], expected[0]) + flat(expected[1], expected[1]))


def test_joint_phase_leak_adds_dL_ucs_at_theta_t_plus_1_into_the_next_update():
    """With the leak, theta's gradient after a micro-step = what was there + L_de grad (+ leak at theta_{t+1})."""
    acc = 2
    trainer = build(sequential_loader(num_pairs=8), acc=acc, epoch_length=4, leak=True)
    d_net = trainer.displacement_network
    record: dict = {}
    checks = defaultdict(int)

    @trainer.on(Events.ITERATION_STARTED)
    def snapshot(engine):
        batch = engine.state.batch
        record.update(moving=batch["moving"], fixed=batch["fixed"], d_copy=copy.deepcopy(d_net),
                      s_copy=copy.deepcopy(trainer.scoring_network), d_grads=grads(d_net))

    @trainer.on(Events.ITERATION_COMPLETED)
    def after_iteration(engine):
        moving, fixed, s_copy = record["moving"], record["fixed"], record["s_copy"]
        like = params(d_net)
        leak_now = flat(leaked_grads(copy.deepcopy(d_net), s_copy, moving, fixed), like)  # at theta_{t+1}
        if engine.state.iteration % acc == 0:  # stepped: gradients cleared after the step, then the leak
            assert_close_vectors(flat(grads(d_net), like), leak_now)
        else:  # theta unchanged: carried leak + L_de gradient + leak, all at theta_t
            loss, _ = reference_displacement_loss(record["d_copy"], s_copy, moving, fixed)
            de = flat(reference_grads(record["d_copy"], loss), like)
            assert_close_vectors(flat(grads(d_net), like), flat(record["d_grads"], like) + de + leak_now)
        checks[engine.state.iteration % acc] += 1

    trainer.run()
    assert checks == {0: 2, 1: 2}


def test_momentum_weight_follows_the_displacement_data_term():
    """m after each displacement step = b(running mean of the data terms) at epoch 0 (gamma_0 = 0)."""
    trainer = build(sequential_loader(), epoch_length=2)
    data_terms, weights = [], []

    @trainer.on(Events.ITERATION_COMPLETED)
    def collect(engine):
        item = as_item(engine.state.output)
        data_terms.append(item["loss_data"])
        weights.append(item["smoothness_weight"])

    trainer.run()
    b = [BETA * math.cos(3.14 * 50 * 0.5 * sum(data_terms[: i + 1]) / (i + 1)) for i in range(2)]
    assert weights == pytest.approx(b)


# ---- (b) + (d): phases, events and output keys --------------------------------------------------------------
def count_steps(trainer: AdaCSTrainer) -> dict[str, list[tuple[int, int]]]:
    calls: dict[str, list[tuple[int, int]]] = {"displacement": [], "scoring": []}
    for name, optimizer in (("displacement", trainer.displacement_optimizer), ("scoring", trainer.scoring_optimizer)):
        if optimizer is None:
            continue
        original = optimizer.step

        def step(*args, _name=name, _original=original, **kwargs):
            calls[_name].append((trainer.state.epoch, trainer.state.iteration))
            return _original(*args, **kwargs)

        optimizer.step = step
    return calls


def test_phases_events_and_outputs():
    trainer = build(sequential_loader(), motion=1, scoring=1, max_epochs=3, epoch_length=2, acc=1)
    d_net, s_net = trainer.displacement_network, trainer.scoring_network
    calls = count_steps(trainer)
    events = defaultdict(lambda: defaultdict(int))

    def counter(name):
        def count(engine):
            events[engine.state.epoch][name] += 1

        return count

    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                  IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, counter(event.name))
    snapshots = {0: (params(d_net), params(s_net), grads(d_net))}
    outputs = defaultdict(list)
    first_batch = {}

    @trainer.on(Events.ITERATION_STARTED)
    def keep_first_batch(engine):
        if engine.state.iteration == 1:
            first_batch.update(engine.state.batch, d_copy=copy.deepcopy(d_net))

    @trainer.on(Events.ITERATION_COMPLETED)
    def collect(engine):
        item = as_item(engine.state.output)
        assert set(LOSS_TERMS) <= set(item)
        outputs[engine.state.epoch].append((engine.state.phase, item))

    @trainer.on(Events.EPOCH_COMPLETED)
    def snapshot(engine):
        snapshots[engine.state.epoch] = (params(d_net), params(s_net), grads(d_net))

    trainer.run()

    # phase of every iteration
    assert [p for p, _ in outputs[1]] == [Phase.MOTION] * 2
    assert [p for p, _ in outputs[2]] == [Phase.SCORING] * 2
    assert [p for p, _ in outputs[3]] == [Phase.JOINT] * 2
    # motion warm-up: the scoring optimizer never steps, the scoring network never changes
    assert calls["displacement"] == [(1, 1), (1, 2), (3, 5), (3, 6)]
    assert calls["scoring"] == [(2, 3), (2, 4), (3, 5), (3, 6)]
    assert same(snapshots[1][1], snapshots[0][1])
    assert not same(snapshots[1][0], snapshots[0][0])
    # scoring warm-up: the displacement network and its gradient are frozen
    assert same(snapshots[2][0], snapshots[1][0])
    assert same(snapshots[2][2], snapshots[1][2])
    assert not same(snapshots[2][1], snapshots[1][1])
    # joint: both change
    assert not same(snapshots[3][0], snapshots[2][0]) and not same(snapshots[3][1], snapshots[2][1])

    # every IterationEvent fires once per iteration, in every phase
    for epoch in (1, 2, 3):
        assert events[epoch] == {
            "FORWARD_COMPLETED": 2, "LOSS_COMPLETED": 2, "BACKWARD_COMPLETED": 2, "MODEL_COMPLETED": 2
        }, epoch

    motion, scoring, joint = ([item for _, item in outputs[e]] for e in (1, 2, 3))
    for item in motion:  # S = 1: no scoring terms; loss is L_de
        assert all(math.isnan(item[k]) for k in ("loss_scoring", "loss_ucs", "loss_reg", "loss_smooth", "mean_score"))
        assert item["loss"] == item["loss_displacement"]
    for item in scoring:  # displacement branch skipped; loss is L_se
        assert all(math.isnan(item[k]) for k in ("loss_displacement", "loss_data", "loss_grad"))
        assert item["loss"] == item["loss_scoring"]
        # the smoothness weight stays frozen at its value from the end of the motion warm-up
        assert item["smoothness_weight"] == motion[-1]["smoothness_weight"]
    for item in joint:
        assert all(math.isfinite(item[k]) for k in LOSS_TERMS)
        assert item["loss"] == item["loss_displacement"]
        assert 0 < item["mean_score"] < 1

    # warm-up phase 1: the data term is the plain masked MSE (S = 1)
    loss, data = reference_displacement_loss(
        first_batch["d_copy"], None, first_batch["moving"], first_batch["fixed"], use_scores=False
    )
    assert motion[0]["loss_data"] == pytest.approx(data.item(), rel=1e-5)
    assert motion[0]["loss_displacement"] == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("acc, expected", [(2, [2, 4, 5, 7, 9, 10]), (3, [3, 5, 8, 10]), (1, list(range(1, 11)))])
def test_optimizers_step_every_accumulation_steps_micro_steps(acc, expected):
    trainer = build(sequential_loader(), acc=acc, epoch_length=5, max_epochs=2)  # epoch of 5 micro-steps
    calls = count_steps(trainer)
    zeroed = []
    original = trainer.displacement_optimizer.zero_grad

    def zero_grad(*args, **kwargs):
        zeroed.append(trainer.state.iteration)
        return original(*args, **kwargs)

    trainer.displacement_optimizer.zero_grad = zero_grad
    trainer.run()
    assert [it for _, it in calls["displacement"]] == expected
    assert [it for _, it in calls["scoring"]] == expected
    # gradients are zeroed at the first micro-step of every accumulation group (and of every epoch)
    assert zeroed == [1] + [it + 1 for it in expected[:-1]]


# ---- (e) checkpoint resume ----------------------------------------------------------------------------------
EPOCHS, EPOCH_LENGTH = 4, 2
CHECKPOINT_KEYS = ("displacement_network", "scoring_network", "displacement_optimizer", "scoring_optimizer", "trainer")


def build_resumable(seed: int, max_epochs: int) -> AdaCSTrainer:
    """Epoch 1 motion, epoch 2 scoring, then joint; accumulation over 2 micro-steps; pairs drawn by PairSampler."""
    loader = sampled_loader(EPOCH_LENGTH)
    return build(loader, seed=seed, motion=1, scoring=1, acc=2, max_epochs=max_epochs, epoch_length=EPOCH_LENGTH)


def run_recording(trainer: AdaCSTrainer) -> dict[int, dict]:
    """Per-iteration loss terms, phase, momentum state and both networks' parameters."""
    record: dict[int, dict] = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def collect(engine):
        record[engine.state.iteration] = {
            "epoch": engine.state.epoch,
            "phase": engine.state.phase,
            "terms": {k: as_item(engine.state.output)[k] for k in LOSS_TERMS},
            "momentum": engine.smoothness_weight.state_dict(),
            "displacement": params(engine.displacement_network),
            "scoring": params(engine.scoring_network),
        }

    trainer.run()
    return record


def save_dict(trainer: AdaCSTrainer) -> dict:
    return {
        "displacement_network": trainer.displacement_network,
        "scoring_network": trainer.scoring_network,
        "displacement_optimizer": trainer.displacement_optimizer,
        "scoring_optimizer": trainer.scoring_optimizer,
        "trainer": trainer,
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 4-epoch run (motion, scoring, joint, joint) that saves a full checkpoint after every epoch."""
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    trainer = build_resumable(seed=0, max_epochs=EPOCHS)
    saver = CheckpointSaver(str(ckpt_dir), save_dict(trainer), save_interval=1, n_saved=None, epoch_level=True)
    saver.attach(trainer)
    return run_recording(trainer), ckpt_dir


@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_resume_from_a_checkpoint_continues_exactly(uninterrupted, epoch):
    record, ckpt_dir = uninterrupted
    path = ckpt_dir / f"checkpoint_epoch={epoch}.pt"
    checkpoint = torch.load(path, weights_only=True)  # no pickled objects
    assert set(checkpoint) == set(CHECKPOINT_KEYS)
    assert checkpoint["trainer"]["iteration"] == epoch * EPOCH_LENGTH
    assert checkpoint["trainer"]["smoothness_weight_state"] == record[epoch * EPOCH_LENGTH]["momentum"]

    resumed = build_resumable(seed=123, max_epochs=EPOCHS)
    assert not same(params(resumed.displacement_network), record[epoch * EPOCH_LENGTH]["displacement"])
    CheckpointLoader(str(path), save_dict(resumed), map_location="cpu").attach(resumed)
    continued = run_recording(resumed)

    assert sorted(continued) == list(range(epoch * EPOCH_LENGTH + 1, EPOCHS * EPOCH_LENGTH + 1))
    assert resumed.state.epoch == EPOCHS
    for iteration, values in continued.items():
        expected = record[iteration]
        assert values["epoch"] == expected["epoch"] and values["phase"] is expected["phase"]
        for key in LOSS_TERMS:
            if math.isnan(expected["terms"][key]):
                assert math.isnan(values["terms"][key]), (iteration, key)
            else:
                expected_value = pytest.approx(expected["terms"][key], rel=1e-6, abs=1e-9)
                assert values["terms"][key] == expected_value, (iteration, key)
        assert values["momentum"] == pytest.approx(expected["momentum"])
        assert same(values["displacement"], expected["displacement"], atol=1e-6), iteration
        assert same(values["scoring"], expected["scoring"], atol=1e-6), iteration


def test_resume_without_the_momentum_state_would_differ(uninterrupted):
    """Guards the test above: the same resume with the momentum reset to its initial state changes the next step."""
    record, ckpt_dir = uninterrupted
    resumed = build_resumable(seed=123, max_epochs=3)
    CheckpointLoader(str(ckpt_dir / "checkpoint_epoch=2.pt"), save_dict(resumed), map_location="cpu").attach(resumed)

    @resumed.on(Events.STARTED)  # registered after the loader, so it runs after the state is restored
    def forget_momentum(engine):
        engine.smoothness_weight.load_state_dict(MomentumSmoothnessWeight(beta=BETA).state_dict())

    continued = run_recording(resumed)
    assert continued[5]["phase"] is record[5]["phase"] is Phase.JOINT
    assert continued[5]["terms"]["loss_data"] == pytest.approx(record[5]["terms"]["loss_data"], rel=1e-6)  # same batch
    got, expected = continued[5]["terms"], record[5]["terms"]
    assert got["smoothness_weight"] != pytest.approx(expected["smoothness_weight"], rel=1e-3)
    assert got["loss_scoring"] != pytest.approx(expected["loss_scoring"], rel=1e-6)


# ---- (f) VoxelMorph-MSE baseline ----------------------------------------------------------------------------
def test_use_scoring_false_is_voxelmorph_mse():
    trainer = build(sequential_loader(), use_scoring=False, motion=20, scoring=20, max_epochs=2, epoch_length=2)
    d_net = trainer.displacement_network
    assert trainer.scoring_network is None
    before = params(d_net)
    first = {}
    outputs = []

    @trainer.on(Events.ITERATION_STARTED)
    def keep(engine):
        if engine.state.iteration == 1:
            first.update(engine.state.batch, d_copy=copy.deepcopy(d_net))

    @trainer.on(Events.ITERATION_COMPLETED)
    def collect(engine):
        outputs.append((engine.state.phase, as_item(engine.state.output)))

    trainer.run()
    assert [p for p, _ in outputs] == [Phase.MOTION] * 4
    assert not same(params(d_net), before)
    for _, item in outputs:
        assert item["loss"] == item["loss_displacement"] and math.isfinite(item["loss"])
        assert all(math.isnan(item[k]) for k in ("loss_scoring", "loss_ucs", "loss_reg", "loss_smooth"))
        assert item["smoothness_weight"] != BETA  # the momentum is tracked, though no loss uses it (test below)
    loss, data = reference_displacement_loss(first["d_copy"], None, first["moving"], first["fixed"], use_scores=False)
    assert outputs[0][1]["loss_data"] == pytest.approx(data.item(), rel=1e-5)
    assert outputs[0][1]["loss_displacement"] == pytest.approx(loss.item(), rel=1e-5)



def test_baseline_checkpoint_is_adacs_motion_warmup_momentum_included():
    """AdaCS branched from a VoxelMorph-MSE checkpoint (the CPU schedule) starts its scoring phase as a from-scratch
    AdaCS run does: same displacement weights and the same momentum. With m = 0 instead (the baseline not tracking
    it), the first joint steps would weight L_smooth by about (1 - gamma_e) * b, a few percent of beta."""
    runs = {}
    for use_scoring in (False, True):
        trainer = build(sampled_loader(EPOCH_LENGTH), seed=0, use_scoring=use_scoring, motion=2, scoring=1, acc=2,
                        max_epochs=2, epoch_length=EPOCH_LENGTH)
        trainer.run()
        runs[use_scoring] = trainer
    baseline, adacs = runs[False], runs[True]
    assert same(params(baseline.displacement_network), params(adacs.displacement_network))
    momentum = adacs.smoothness_weight.state_dict()
    assert momentum["residual_count"] == EPOCH_LENGTH and momentum["momentum"] != 0.0  # updated, not the initial m = 0
    assert baseline.smoothness_weight.state_dict() == pytest.approx(momentum)

def test_invalid_construction():
    with pytest.raises(ValueError, match="scoring_network"):
        d = DiffeomorphicVoxelMorph()
        AdaCSTrainer("cpu", 1, sequential_loader(), d, torch.optim.Adam(d.parameters()),
                     DisplacementLoss(MSE, GradientL2Loss()), use_scoring=True)
    with pytest.raises(ValueError, match="accumulation_steps"):
        build(sequential_loader(), acc=0)
    with pytest.raises(ValueError, match="reference_gradient_leak"):
        d = DiffeomorphicVoxelMorph()
        s = ScoringNet()
        AdaCSTrainer("cpu", 1, sequential_loader(), d, torch.optim.Adam(d.parameters()),
                     DisplacementLoss(MSE, GradientL2Loss()), s, torch.optim.Adam(s.parameters()), ScoringLoss(MSE),
                     reference_gradient_leak="sometimes")


# ---- the trainer's own events and output keys ----------------------------------------------------------------
class EventCounter:
    """A handler as train.yaml gives them (``train_handlers``): attaches to the trainer's events by name."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.seen: dict[str, list[dict]] = defaultdict(list)

    def attach(self, engine: AdaCSTrainer) -> None:
        for event in AdaCSIterationEvents:
            engine.add_event_handler(event, self.count, event.name)

    def count(self, engine: AdaCSTrainer, name: str) -> None:
        self.counts[name][engine.state.epoch] += 1
        self.seen[name].append({str(k): v for k, v in engine.state.output.items() if k in LOSS_TERMS})


def test_each_trainer_event_fires_once_per_micro_step_of_the_phases_that_run_it():
    counter = EventCounter()
    trainer = build(sequential_loader(), motion=1, scoring=1, max_epochs=3, epoch_length=2, acc=2,
                    train_handlers=[counter])  # attached in the constructor: the events are registered before
    trainer.run()
    # epoch 1 motion warm-up, epoch 2 scoring warm-up, epoch 3 joint; 2 micro-steps each
    assert {name: dict(epochs) for name, epochs in counter.counts.items()} == {
        "SCORE_MAPS_COMPLETED": {2: 2, 3: 2},
        "DISPLACEMENT_STEP_COMPLETED": {1: 2, 3: 2},
        "SCORING_STEP_COMPLETED": {2: 2, 3: 2},
    }
    # when a step completes, its own terms are in the output
    for terms in counter.seen["DISPLACEMENT_STEP_COMPLETED"]:
        assert all(math.isfinite(float(terms[k])) for k in ("loss_displacement", "loss_data", "loss_grad"))
    for terms in counter.seen["SCORING_STEP_COMPLETED"]:
        assert all(math.isfinite(float(terms[k])) for k in ("loss_scoring", "loss_ucs", "loss_reg", "loss_smooth"))
        assert 0 < float(terms["mean_score"]) < 1


def test_the_baseline_fires_no_scoring_event():
    counter = EventCounter()
    trainer = build(sequential_loader(), use_scoring=False, max_epochs=2, epoch_length=2, train_handlers=[counter])
    trainer.run()
    assert {name: dict(epochs) for name, epochs in counter.counts.items()} == {
        "DISPLACEMENT_STEP_COMPLETED": {1: 2, 2: 2}
    }


def test_a_handler_attached_after_construction_and_extra_events():
    trainer = build(sequential_loader(), motion=0, scoring=0, max_epochs=1, epoch_length=3, event_names=["custom"])
    fired = []
    trainer.add_event_handler(AdaCSIterationEvents.SCORING_STEP_COMPLETED, lambda engine: fired.append("scoring"))
    trainer.add_event_handler("custom", lambda engine: fired.append("custom"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: engine.fire_event("custom"))
    trainer.run()
    assert fired == ["scoring", "custom"] * 3


def test_the_output_keys_keep_their_names():
    """Configs, logs and TensorBoard tags name the terms by these strings: the enum must not rename them."""
    assert [str(k) for k in LOSS_TERMS] == [
        "loss", "loss_displacement", "loss_data", "loss_grad", "loss_scoring", "loss_ucs", "loss_reg", "loss_smooth",
        "smoothness_weight", "mean_score",
    ]
    assert AdaCSKeys.MEAN_SCORE == "mean_score" and f"{AdaCSKeys.DATA_LOSS}" == "loss_data"
    terms = loss_terms({str(k): 1.0 for k in LOSS_TERMS})
    assert all(type(k) is str for k in terms) and set(terms) == {str(k) for k in LOSS_TERMS}


@pytest.mark.parametrize("value, expected", [(True, True), ("false", False), (" True ", True), ("0", False), (1, True)])
def test_switches_accept_what_the_command_line_passes(value, expected):
    assert build(sequential_loader(), use_mask=value).use_mask is expected

