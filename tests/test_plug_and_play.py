"""Plug and play: another displacement network or similarity trains under AdaCSTrainer by config overrides alone."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.networks.nets import LocalNet, RegUNet

from conftest import BUNDLE
from scripts.trainer import LOSS_TERMS, AdaCSTrainer

TRAIN = str(BUNDLE / "configs" / "train.yaml")
# epoch 1 motion warm-up, epoch 2 joint: both branches run
TINY = {
    "image_size": [32, 32], "num_train_pairs": 4, "num_val_pairs": 2, "epoch_length": 2, "batch_size": 2,
    "epochs": 2, "motion_warmup_epochs": 1, "scoring_warmup_epochs": 0, "learning_rate": 1e-3,
}
LOCALNET = {
    "_target_": "LocalNet", "spatial_dims": 2, "in_channels": 2, "out_channels": 2,
    "num_channel_initial": 8, "extract_levels": [0, 1, 2, 3],
}
REGUNET = {
    "_target_": "RegUNet", "spatial_dims": 2, "in_channels": 2, "out_channels": 2, "num_channel_initial": 8, "depth": 3,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def train_with_overrides(tmp_path, **override) -> dict:
    """Run train.yaml with ``override``; return the trainer, the networks before/after, and every iteration's terms."""
    workflow = ConfigWorkflow(
        workflow_type="train", config_file=TRAIN, logging_file=False,
        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"), **TINY, **override,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    network = workflow.parser.get_parsed_content("network")
    before = [p.detach().clone() for p in network.parameters()]
    terms, first_batches = [], []

    @trainer.on(Events.ITERATION_STARTED)
    def keep_batch(engine):
        first_batches.append(engine.state.batch)

    @trainer.on(Events.ITERATION_COMPLETED)
    def collect(engine):
        item = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        terms.append((engine.state.phase.value, {k: float(item[k]) for k in LOSS_TERMS}))

    workflow.run()
    workflow.finalize()
    return {"trainer": trainer, "network": network, "before": before, "terms": terms, "batches": first_batches}


def check_trained(result: dict) -> None:
    trainer, network = result["trainer"], result["network"]
    assert isinstance(trainer, AdaCSTrainer)
    assert trainer.displacement_network is network
    assert [phase for phase, _ in result["terms"]] == ["motion", "motion", "joint", "joint"]
    for phase, terms in result["terms"]:
        names = ("loss", "loss_displacement", "loss_data", "loss_grad") + (
            ("loss_scoring", "loss_ucs", "loss_reg", "loss_smooth", "mean_score") if phase == "joint" else ()
        )
        assert all(math.isfinite(terms[name]) for name in names), terms
    after = list(network.parameters())
    changed = sum(not torch.equal(a.detach(), b) for a, b in zip(after, result["before"]))
    assert changed > len(after) // 2, f"only {changed} of {len(after)} parameter tensors changed"


@pytest.mark.parametrize("network_def, cls", [(LOCALNET, LocalNet), (REGUNET, RegUNet)], ids=["LocalNet", "RegUNet"])
def test_monai_displacement_network_plugs_in(tmp_path, network_def, cls):
    result = train_with_overrides(tmp_path, network_def=network_def)
    assert type(result["network"]) is cls
    check_trained(result)
    # a one-way network: the trainer uses the forward direction only and regularises the ddf itself
    assert not getattr(result["trainer"].displacement_network, "bidirectional", False)
    assert (tmp_path / "models" / "model.pt").is_file()
    cls(**{k: v for k, v in network_def.items() if k != "_target_"}).load_state_dict(
        torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    )


def test_similarity_plugs_in(tmp_path):
    result = train_with_overrides(tmp_path, similarity="$torch.nn.L1Loss(reduction='none')")
    trainer = result["trainer"]
    assert isinstance(trainer.displacement_loss.similarity, torch.nn.L1Loss)
    assert trainer.scoring_loss.similarity is trainer.displacement_loss.similarity
    check_trained(result)
    # the first step (S = 1, field ~ 0 from the VoxelMorph head init) reports the masked mean absolute difference,
    # which differs clearly from the mean squared one
    batch = result["batches"][0]
    moving, fixed = batch["moving"].float(), batch["fixed"].float()
    mask = ((moving != 0) | (fixed != 0)).float()
    l1 = (mask * (moving - fixed).abs()).mean().item()
    l2 = (mask * (moving - fixed) ** 2).mean().item()
    reported = result["terms"][0][1]["loss_data"]
    assert reported == pytest.approx(l1, rel=1e-3)
    assert reported != pytest.approx(l2, rel=0.1)
