"""The score-saturation monitor: unit behaviour on a scripted engine, and wired into train.yaml's trainer."""

from __future__ import annotations

import logging
import math

import pytest
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from conftest import BUNDLE
from scripts.monitoring import ScoreSaturationMonitor, epoch_mean_score

TRAIN = str(BUNDLE / "configs" / "train.yaml")
WARNING = "the scores have saturated"

pytestmark = pytest.mark.usefixtures("one_thread")


def scripted_engine(epochs: list[list[float]]) -> Engine:
    """An engine whose iteration outputs are the given mean scores, one list per epoch."""
    flat = [score for epoch in epochs for score in epoch]
    return Engine(lambda engine, batch: {"mean_score": flat[engine.state.iteration - 1]})


def run_scripted(epochs: list[list[float]], caplog) -> tuple[Engine, list[str]]:
    engine = scripted_engine(epochs)
    ScoreSaturationMonitor(threshold=0.999).attach(engine)
    with caplog.at_level(logging.WARNING, logger="scripts.monitoring"):
        engine.run(range(len(epochs[0])), max_epochs=len(epochs))
    return engine, [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


def test_epoch_mean_ignores_motion_only_iterations():
    assert epoch_mean_score([math.nan, 0.5, 1.0]) == pytest.approx(0.75)
    assert math.isnan(epoch_mean_score([math.nan, math.nan]))


def test_warns_once_at_the_first_saturated_epoch(caplog):
    nan = math.nan
    epochs = [[nan, nan], [0.6, 0.9], [0.9995, 1.0], [1.0, 1.0]]  # motion, scoring, saturated, still saturated
    engine, warnings = run_scripted(epochs, caplog)
    assert engine.state.score_saturation_epoch == 3
    assert len(warnings) == 1 and warnings[0].startswith("Epoch 3:")


def test_no_warning_below_the_threshold(caplog):
    epochs = [[math.nan, math.nan], [0.998, 0.999], [0.95, 0.97]]  # epoch 2 averages 0.9985 < 0.999
    engine, warnings = run_scripted(epochs, caplog)
    assert engine.state.score_saturation_epoch is None and warnings == []


def test_threshold_must_be_a_score():
    with pytest.raises(ValueError, match="threshold"):
        ScoreSaturationMonitor(threshold=1.5)


def tiny_trainer(tmp_path, **overrides):
    """train.yaml's trainer on the phantom: 1 motion epoch, then 3 scoring-only epochs of 4 scoring steps."""
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(
        {
            "image_size": [32, 32], "num_train_pairs": 4, "num_val_pairs": 2, "epoch_length": 8, "batch_size": 2,
            "epochs": 4, "motion_warmup_epochs": 1, "scoring_warmup_epochs": 3, "val_interval": 100,
            "ckpt_dir": str(tmp_path), "output_dir": str(tmp_path), **overrides,
        }
    )
    parser.parse()
    parser.get_parsed_content("initialize#0")
    return parser.get_parsed_content("train#trainer")


@pytest.mark.parametrize(
    "overrides, saturates",
    [
        ({"alpha": 100.0, "scoring_learning_rate": 0.02}, True),  # the pull to 1 dominates, large steps: S -> 1
        ({"alpha": 0.01, "scoring_learning_rate": 1e-4}, False),  # S stays near sigmoid(0) = 0.5
    ],
    ids=["saturating", "healthy"],
)
def test_train_yaml_trainer_reports_saturation(tmp_path, caplog, overrides, saturates):
    trainer = tiny_trainer(tmp_path, **overrides)
    with caplog.at_level(logging.WARNING, logger="scripts.monitoring"):
        trainer.run()
    warned = any(WARNING in r.getMessage() for r in caplog.records)
    assert warned == saturates
    assert (trainer.state.score_saturation_epoch is not None) == saturates


def test_train_yaml_console_names_the_phase_and_prints_only_active_terms(tmp_path, caplog):
    """The console line says which phase runs and leaves out the terms it skips (NaN by design), issue 31."""
    trainer = tiny_trainer(tmp_path, epochs=2, epoch_length=2, log_every=1)  # 1 displacement warm-up, 1 scoring epoch
    stats_logger = logging.getLogger("monai.handlers.StatsHandler")  # does not propagate: listen to it directly
    stats_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="monai.handlers.StatsHandler"):
            trainer.run()
    finally:
        stats_logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if "Iter:" in r.getMessage() and "loss" in r.getMessage()]
    motion = [line for line in lines if line.startswith("Epoch: 1/")]
    scoring = [line for line in lines if line.startswith("Epoch: 2/")]
    assert motion and scoring, lines
    for line in lines:
        assert "nan" not in line.lower(), line  # an inactive term printed as nan reads as divergence
    assert all("phase: displacement warm-up" in line and "loss_data:" in line and "loss_ucs" not in line
               for line in motion), motion
    assert all("phase: scoring warm-up" in line and "loss_ucs:" in line and "loss_data" not in line
               for line in scoring), scoring


def test_console_still_prints_an_active_term_that_is_really_nan(caplog):
    """Only the terms the phase skips are left out: a real NaN in an active term is printed (and stops the run)."""
    from scripts.checkpoints import TrainingStopped
    from scripts.monitoring import NonFiniteGuard, PhaseStatsHandler
    from scripts.schedule import Phase
    from scripts.trainer import loss_terms

    nan = math.nan
    output = {"loss": nan, "loss_displacement": nan, "loss_data": nan, "loss_grad": 0.0, "loss_scoring": nan,
              "loss_ucs": nan, "loss_reg": nan, "loss_smooth": nan, "smoothness_weight": 0.5, "mean_score": nan}
    engine = Engine(lambda e, batch: output)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "phase", Phase.MOTION))
    PhaseStatsHandler(output_transform=loss_terms, name="phase_stats_test").attach(engine)
    NonFiniteGuard().attach(engine)
    logger = logging.getLogger("phase_stats_test")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="phase_stats_test"), pytest.raises(TrainingStopped, match="loss_data"):
            engine.run([0], max_epochs=1)
    finally:
        logger.removeHandler(caplog.handler)
    line = next(r.getMessage() for r in caplog.records if "Iter:" in r.getMessage())
    assert "phase: displacement warm-up" in line and "loss_data: nan" in line and "loss_ucs" not in line, line
