"""The DiffuseMorph backbone (issue 30 item 3): a one-way field of the input's size, deterministic in eval mode (t = 0,
no noise), a diffusion loss in training mode that the trainer adds to L_de, and training on the phantom through the same
trainer (MSE, AdaCS, a baseline) by network_def alone; its export and folder inference: test_backbones.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_training
from scripts.diffusemorph import DiffuseMorph2D
from scripts.networks import registration_fields

pytestmark = pytest.mark.usefixtures("one_thread")


def test_maps_a_pair_to_a_one_way_field_of_its_size_near_the_identity_at_start():
    torch.manual_seed(0)
    net = DiffuseMorph2D().eval()
    image = torch.rand(2, 2, 32, 32)
    fields = registration_fields(net, image)
    assert fields.forward_ddf.shape == (2, 2, 32, 32) and fields.backward_ddf is None  # the reference: one way
    assert torch.equal(fields.regularized_field, fields.forward_ddf)  # int_steps 0: the displacement itself
    assert fields.forward_ddf.abs().max() < 1e-2  # the deformation head starts at N(0, 1e-5)
    assert sum(p.numel() for p in net.parameters()) == 1_145_091
    velocity = DiffuseMorph2D(int_steps=7, int_downsize=2, bidirectional=True).eval()  # int_steps > 0 still works
    assert registration_fields(velocity, image).backward_ddf.shape == (2, 2, 32, 32)


def test_eval_mode_is_deterministic_with_t_zero_and_the_unnoised_fixed_image():
    torch.manual_seed(0)
    net = DiffuseMorph2D(head_init_std=1e-2).eval()
    image = torch.rand(2, 2, 32, 32)
    first, second = net(image), net(image)
    assert torch.equal(first, second) and net.auxiliary_loss() is None
    moving, fixed = image[:, :1], image[:, 1:]
    with torch.no_grad():  # by hand: eps_hat = diffusion([m, f, f], t = 0), field = deformation([m, eps_hat])
        eps_hat = net.unet.diffusion(torch.cat([moving, fixed, fixed], 1), torch.zeros(2, dtype=torch.long))
        expected = net.unet.deformation(torch.cat([moving, eps_hat], 1))
    assert torch.allclose(first, expected, atol=1e-6)


def test_training_mode_diffusion_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    net = DiffuseMorph2D(num_train_timesteps=50, diffusion_weight=0.5).train()
    image = torch.rand(3, 2, 16, 16)
    torch.manual_seed(1)
    net(image)
    loss = net.auxiliary_loss()
    assert loss is not None and loss.requires_grad
    torch.manual_seed(1)  # the forward's draws, in its order: t ~ U{0..T-1}, then eps ~ N(0, 1)
    t = torch.randint(0, 50, (3,))
    noise = torch.randn(3, 1, 16, 16)
    alpha_bar = torch.cumprod(1.0 - torch.linspace(1e-6, 1e-2, 50), 0)[t].view(3, 1, 1, 1)
    fixed = image[:, 1:]
    x_t = alpha_bar.sqrt() * fixed + (1.0 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_hat = net.unet.diffusion(torch.cat([image[:, :1], fixed, x_t], 1), t)
    assert torch.allclose(loss, 0.5 * ((noise - eps_hat) ** 2).mean(), rtol=1e-5)
    net(image)
    assert not torch.equal(net.auxiliary_loss(), loss)  # a new t and noise every training forward


def _train(configs, tmp_path, **overrides):
    from ignite.engine import Events
    from scripts.trainer import loss_terms

    workflow = tiny_training(configs, tmp_path, accumulation_steps=1, **overrides)
    assert isinstance(workflow.parser.get_parsed_content("network"), DiffuseMorph2D)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    terms = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: terms.append(loss_terms(engine.state.output)))
    trainer.run()
    return workflow, terms


def test_trains_on_the_phantom_with_its_loss_decreasing_and_the_diffusion_term_in_l_de(tmp_path):
    workflow, terms = _train(["backbone_diffusemorph.yaml"], tmp_path, num_train_pairs=2, epoch_length=12,
                             use_scoring=False)
    lam = workflow.parser.get_parsed_content("lam")
    assert workflow.parser.get_parsed_content("regularization").loss_mult == 1  # the full-resolution field
    assert len(terms) == 12
    for item in terms:  # L_de = data + lam * grad + diffusion_weight * ||eps - eps_hat||^2
        assert math.isfinite(item["loss_displacement"]) and item["loss_auxiliary"] > 0
        assert item["loss_displacement"] == pytest.approx(
            item["loss_data"] + lam * item["loss_grad"] + item["loss_auxiliary"], rel=1e-5)
    data = [item["loss_data"] for item in terms]
    assert np.mean(data[-3:]) < np.mean(data[:3])  # the same two pairs every step: the data term falls


@pytest.mark.parametrize("config", [[], ["baseline_nll.yaml"]], ids=["adacs", "nll"])
def test_trains_with_a_second_network_by_network_def_alone(config, tmp_path):
    _, terms = _train(["backbone_diffusemorph.yaml", *config], tmp_path, motion_warmup_epochs=0, epoch_length=3)
    assert len(terms) == 3
    for item in terms:  # joint steps: both networks' terms, the diffusion term among L_de's
        assert all(math.isfinite(v) for v in item.values()) and item["loss_auxiliary"] > 0
        assert math.isfinite(item["loss_scoring"]) and math.isfinite(item["mean_score"])

