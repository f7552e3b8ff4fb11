"""Training monitors: a warning when the scoring network's sigmoid has saturated at S = 1.

Once the scores are 1 everywhere, the sigmoid's gradient S (1 - S) vanishes, the scoring network cannot come back,
and AdaCS trains exactly as VoxelMorph-MSE (with another pair order) for the rest of the run. On real data this
happened with the paper's alpha 0.02 on ACDC in several seeds, within one or two scoring epochs
(``docs/results_real_data.md``). Nothing in the loss curves shows it, so the monitor says it in the log.
``score_headroom > 0`` (``scripts.networks.ScoringNet``, not the paper's) puts S = 1 at a finite logit; on ACDC it
kept the seeds that saturate with the paper's sigmoid from saturating.
MONAI has no handler for this; it is ours.
"""

from __future__ import annotations

import logging
import math

from ignite.engine import Engine, Events

from .trainer import loss_terms


def epoch_mean_score(values: list[float]) -> float:
    """Mean of the finite per-iteration mean scores (NaN: no scoring step this epoch)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


class ScoreSaturationMonitor:
    """Log a warning at the first epoch whose mean score S reaches ``threshold``.

    Reads ``engine.state.output["mean_score"]`` (the trainer reports NaN in motion-only epochs, which are
    ignored). The epoch of saturation is kept in ``engine.state.score_saturation_epoch`` (``None`` until then).

    Args:
        threshold: epoch-mean score at or above which the scores count as saturated.
        name: logger name (default: this module's).
    """

    def __init__(self, threshold: float = 0.999, name: str | None = None) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
        self.threshold = threshold
        self.logger = logging.getLogger(name or __name__)
        self._epoch_scores: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.state.score_saturation_epoch = None
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _reset(self, engine: Engine) -> None:
        self._epoch_scores = []

    def _record(self, engine: Engine) -> None:
        self._epoch_scores.append(loss_terms(engine.state.output).get("mean_score", math.nan))

    def _check(self, engine: Engine) -> None:
        mean_score = epoch_mean_score(self._epoch_scores)
        if engine.state.score_saturation_epoch is not None or not mean_score >= self.threshold:
            return
        engine.state.score_saturation_epoch = engine.state.epoch
        self.logger.warning(
            f"Epoch {engine.state.epoch}: the scores have saturated (mean S = {mean_score:.4f} >= {self.threshold}). "
            "With the paper's sigmoid (score_headroom 0) its gradient vanishes there, so AdaCS now trains as "
            "VoxelMorph-MSE and will not recover. Set score_headroom (e.g. 0.05; not the paper's) or lower alpha "
            "(e.g. 0.01 on min-max normalised cine MRI) or scoring_learning_rate."
        )
