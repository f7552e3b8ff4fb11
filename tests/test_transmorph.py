"""The TransMorph backbone (issue 30 item 3): a field of the input's size, trains on the phantom through the same
trainer (MSE and AdaCS); its export and folder inference: test_backbones.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_training
from scripts.networks import registration_fields
from scripts.transmorph import TransMorph2D

pytestmark = pytest.mark.usefixtures("one_thread")


def test_maps_a_pair_to_a_field_of_its_size_near_the_identity_at_start():
    torch.manual_seed(0)
    net = TransMorph2D().eval()
    image = torch.rand(2, 2, 64, 64)
    fields = registration_fields(net, image)
    assert fields.forward_ddf.shape == (2, 2, 64, 64) and fields.backward_ddf.shape == (2, 2, 64, 64)
    assert fields.forward_ddf.abs().max() < 1e-2  # the head starts at N(0, 1e-5)
    assert sum(p.numel() for p in net.parameters()) == 6_302_564
    direct = TransMorph2D(int_steps=0, bidirectional=False).eval()
    assert direct(image).shape == (2, 2, 64, 64) and registration_fields(direct, image).backward_ddf is None


@pytest.mark.parametrize("use_scoring", [False, True], ids=["mse", "adacs"])
def test_trains_on_the_phantom_with_its_loss_decreasing(use_scoring, tmp_path):
    from ignite.engine import Events
    from scripts.trainer import loss_terms

    workflow = tiny_training(["backbone_transmorph.yaml"], tmp_path, image_size=[64, 64], num_train_pairs=2,
                             epoch_length=12, accumulation_steps=1, motion_warmup_epochs=0 if use_scoring else 1,
                             use_scoring=use_scoring)
    assert isinstance(workflow.parser.get_parsed_content("network"), TransMorph2D)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    data = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: data.append(loss_terms(engine.state.output)["loss_data"]))
    trainer.run()
    assert len(data) == 12 and all(math.isfinite(v) for v in data)
    assert np.mean(data[-3:]) < np.mean(data[:3])  # the same two pairs every step: the data term falls

