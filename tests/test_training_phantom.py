"""A short AdaCS training on the built-in phantom must register held-out pairs better than doing nothing.

One training (64 x 64 cine phantom, lr 1e-3, 6 motion + 1 scoring + 2 joint epochs of 25 micro-steps, batch 4)
is shared by the tests of this module. It is evaluated on held-out phantom pairs (indices 200000..) with the
bundle's RegistrationEvaluator, MONAI's MeanDice and the bundle's end-point error, exactly as the identity
(ZeroDisplacement) is.

Margins, measured with this exact setup (seeds 0, 1, 2; 60-90 s of training on the shared 2-core machine):
a correct trainer reached Dice 0.890 / 0.878 / 0.873 (identity 0.656), whole-image EPE 0.72 / 0.77 / 0.77 px
(identity 0.83), heart EPE 0.87 / 0.94 / 0.99 px (identity 1.62), and mean scores on the outlier pixels below
those of the rest of the foreground in 16/16 pairs (gap 0.10 / 0.06 / 0.13). A trainer with a zero learning
rate, and one whose displacement gradients are cut (warped image detached in L_de), both end exactly at the
identity's Dice and EPE. The thresholds below sit between the two.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.handlers import IgniteMetricHandler, MeanDice, from_engine
from torch.utils.data import DataLoader

from scripts.data import PairSampler
from scripts.evaluator import RegistrationEvaluator
from scripts.losses import DisplacementLoss, GradientL2Loss, ScoringLoss
from scripts.metrics import EndPointErrorMetric, FoldingMetric, end_point_error, field_and_truth
from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet, ZeroDisplacement
from scripts.phantom import cardiac_phantom_pair
from scripts.schedule import MomentumSmoothnessWeight, Phase
from scripts.trainer import AdaCSTrainer

SIZE, MODE = 64, "cine"
EPOCH_LENGTH, BATCH = 25, 4
MOTION, SCORING, EPOCHS = 6, 1, 9  # 6 motion warm-up, 1 scoring warm-up, 2 joint epochs
KEYS = ("moving", "fixed", "moving_label", "fixed_label", "true_ddf", "outlier_mask")


def phantom(indices) -> list[dict[str, torch.Tensor]]:
    pairs = (cardiac_phantom_pair(i, seed=0, size=SIZE, mode=MODE) for i in indices)
    return [{k: torch.as_tensor(pair[k]).float() for k in KEYS} for pair in pairs]


def evaluate(network: torch.nn.Module, pairs: list[dict]) -> dict[str, float]:
    """Dice (MONAI MeanDice, RV/MYO/LV), EPE over the image and over the heart, folding: as the bundle validates."""
    evaluator = RegistrationEvaluator(
        device="cpu",
        val_data_loader=DataLoader(pairs, batch_size=8),
        network=network,
        num_classes=4,
        key_val_metric={
            "dice": MeanDice(include_background=False, output_transform=from_engine(["warped_label", "label"]))
        },
        additional_metrics={
            "epe": IgniteMetricHandler(metric_fn=EndPointErrorMetric(), output_transform=field_and_truth),
            "folding": IgniteMetricHandler(metric_fn=FoldingMetric(), output_transform=from_engine(["pred", "pred"])),
        },
    )
    heart_epe = []

    @evaluator.on(Events.ITERATION_COMPLETED)
    def collect(engine):
        for item in engine.state.output:
            heart = 1.0 - item["label"][0:1]  # any of RV, MYO, LV in the fixed label
            heart_epe.append(end_point_error(item["pred"][None], item["true_ddf"][None], heart[None]).item())

    evaluator.run()
    metrics = dict(evaluator.state.metrics)
    metrics["heart_epe"] = float(np.mean(heart_epe))
    return metrics


@pytest.fixture(scope="module")
def trained():
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared 2-core machine: one thread is faster
    try:
        torch.manual_seed(0)
        train_pairs = phantom(range(64))
        loader = DataLoader(
            train_pairs, sampler=PairSampler(train_pairs, EPOCH_LENGTH * BATCH, BATCH, seed=0), batch_size=BATCH
        )
        displacement, scoring = DiffeomorphicVoxelMorph(), ScoringNet()
        similarity = torch.nn.MSELoss(reduction="none")
        trainer = AdaCSTrainer(
            device="cpu",
            max_epochs=EPOCHS,
            train_data_loader=loader,
            displacement_network=displacement,
            displacement_optimizer=torch.optim.Adam(displacement.parameters(), lr=1e-3),
            displacement_loss=DisplacementLoss(similarity, GradientL2Loss(loss_mult=2), lam=0.01),
            scoring_network=scoring,
            scoring_optimizer=torch.optim.Adam(scoring.parameters(), lr=1e-3),
            scoring_loss=ScoringLoss(similarity, alpha=0.02),
            smoothness_weight=MomentumSmoothnessWeight(beta=1.5),
            motion_warmup_epochs=MOTION,
            scoring_warmup_epochs=SCORING,
            accumulation_steps=1,
            epoch_length=EPOCH_LENGTH,
        )
        trainer.run()
        test_pairs = phantom(range(200000, 200016))
        yield {
            "trainer": trainer,
            "test_pairs": test_pairs,
            "adacs": evaluate(displacement, test_pairs),
            "identity": evaluate(ZeroDisplacement(), test_pairs),
        }
    finally:
        torch.set_num_threads(previous_threads)


def test_the_training_ran_every_phase(trained):
    trainer = trained["trainer"]
    assert trainer.state.epoch == EPOCHS and trainer.state.phase is Phase.JOINT
    assert 0 < trainer.smoothness_weight.value <= 1.5


def test_dice_beats_the_undeformed_baseline(trained):
    adacs, identity = trained["adacs"], trained["identity"]
    assert 0.6 < identity["dice"] < 0.7  # the phantom's undeformed overlap on these pairs
    assert adacs["dice"] > identity["dice"] + 0.12, (adacs["dice"], identity["dice"])


def test_end_point_error_is_lower_than_the_identity(trained):
    adacs, identity = trained["adacs"], trained["identity"]
    assert adacs["heart_epe"] < 0.7 * identity["heart_epe"], (adacs["heart_epe"], identity["heart_epe"])
    assert adacs["epe"] < 0.97 * identity["epe"], (adacs["epe"], identity["epe"])


def test_the_field_does_not_fold(trained):
    assert trained["identity"]["folding"] == 0.0
    assert trained["adacs"]["folding"] < 0.5  # percent of pixels; diffeomorphic by construction


def test_scores_are_lower_where_correspondence_fails(trained):
    """The phantom's outlier_mask marks places without correspondence: the scoring network must rate them lower."""
    scoring = trained["trainer"].scoring_network.eval()
    outlier_scores, other_scores = [], []
    with torch.no_grad():
        for pair in trained["test_pairs"]:
            score = scoring(pair["fixed"][None])[0, 0]
            outlier = pair["outlier_mask"][0] > 0
            foreground = (pair["fixed"][0] > 0) & ~outlier
            outlier_scores.append(score[outlier].mean().item())
            other_scores.append(score[foreground].mean().item())
    outlier_scores, other_scores = np.array(outlier_scores), np.array(other_scores)
    assert (outlier_scores < other_scores).mean() >= 0.8
    assert outlier_scores.mean() < other_scores.mean() - 0.02, (outlier_scores.mean(), other_scores.mean())
