"""Training monitors: a warning when the scoring network's sigmoid has saturated at S = 1, and a stop at the first
non-finite loss or weight (``NonFiniteGuard``).

Once the scores are 1 everywhere, the sigmoid's gradient S (1 - S) vanishes, the scoring network cannot come back,
and AdaCS trains exactly as VoxelMorph-MSE (with another pair order) for the rest of the run. On real data this
happened with the paper's alpha 0.02 on ACDC in several seeds, within one or two scoring epochs
(``docs/reports/paper_alpha.md``). Nothing in the loss curves shows it, so the monitor says it in the log.
``score_headroom > 0`` (``scripts.networks.ScoringNet``, not the paper's) puts S = 1 at a finite logit; on ACDC it
kept the seeds that saturate with the paper's sigmoid from saturating.
MONAI has no handler for this; it is ours.
"""

from __future__ import annotations

import logging
import math

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import StatsHandler
from monai.utils import CommonKeys as Keys

from .checkpoints import TrainingStopped, loadable_checkpoint
from .trainer import LOSS_TERMS, MOTION_TERMS, SCORING_TERMS, AdaCSKeys, loss_terms


def epoch_mean_score(values: list[float]) -> float:
    """Mean of the finite per-iteration mean scores (NaN: no scoring step this epoch)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


class ScoreSaturationMonitor:
    """Log a warning at the first epoch whose mean score S reaches ``threshold``.

    Reads ``engine.state.output[AdaCSKeys.MEAN_SCORE]`` (the trainer reports NaN in motion-only epochs, which are
    ignored). Attached to ``ITERATION_COMPLETED``, so it also runs on engines other than the AdaCS trainer. The
    epoch of saturation is kept in ``engine.state.score_saturation_epoch`` (``None`` until then).

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
        self._epoch_scores.append(loss_terms(engine.state.output).get(AdaCSKeys.MEAN_SCORE, math.nan))

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


def phase_label(engine: Engine) -> str:
    """What the current epoch trains, in words, for the console log."""
    phase = getattr(engine.state, "phase", None)
    if phase is None:
        return "unknown"
    if not getattr(engine, "use_scoring", True):
        return "displacement only (no scoring network)"
    if not phase.trains_scoring:
        return "displacement warm-up"
    if not phase.trains_motion:
        return "scoring warm-up"
    return "joint"


class PhaseStatsHandler(StatsHandler):
    """``StatsHandler`` for the training console line: names the phase and prints only the terms it computes.

    The trainer reports the terms a phase skips as NaN (e.g. every scoring term during the displacement warm-up);
    printed, they read as divergence. The console line leaves them out and says which phase runs
    (``phase: displacement warm-up -- loss: ...``). Which terms are active comes from ``NonFiniteGuard.active_terms``,
    so an active term that is really NaN is still printed (and stops the run, ``NonFiniteGuard``).
    TensorBoard keeps every term (``TensorBoardStatsHandler``).
    """

    def _default_iteration_print(self, engine: Engine) -> None:
        terms = self.output_transform(engine.state.output)
        if not isinstance(terms, dict) or getattr(engine.state, "phase", None) is None:
            super()._default_iteration_print(engine)
            return
        active = set(NonFiniteGuard.active_terms(engine))
        out_str = "".join(
            self.key_var_format.format(name, float(terms[name])) for name in sorted(terms) if name in active
        )
        num_iterations = engine.state.epoch_length
        current_iteration = engine.state.iteration
        if num_iterations is not None:
            current_iteration = (current_iteration - 1) % num_iterations + 1
        base_str = (f"Epoch: {engine.state.epoch}/{engine.state.max_epochs}, Iter: {current_iteration}/{num_iterations}"
                    f" -- phase: {phase_label(engine)} --")
        self.logger.info(" ".join([base_str, out_str]))


class NonFiniteGuard:
    """Stop the training at the first micro-step whose loss terms, network weights or optimizer states are NaN or Inf.

    Checked after every micro-step, so the run stops before the epoch's validation and checkpoint: nothing
    computed from the diverged state is saved, and the message names the last good checkpoint in ``ckpt_dir``
    (the savers also refuse non-finite states, ``scripts.checkpoints.AtomicDiskSaver``). Terms a phase skips are
    reported as NaN by the trainer and are not checked (``active_terms``). Under
    torch.distributed the verdict is shared, so every process stops at the same micro-step.

    Args:
        ckpt_dir: the run's checkpoint folder, to name the checkpoint to resume from.
    """

    def __init__(self, ckpt_dir: str | None = None) -> None:
        self.ckpt_dir = ckpt_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    @staticmethod
    def active_terms(engine: Engine) -> tuple[str, ...]:
        """The loss terms this micro-step computed (the others are NaN by design)."""
        phase = getattr(engine.state, "phase", None)
        motion = getattr(phase, "trains_motion", True)
        scoring = getattr(phase, "trains_scoring", True) and getattr(engine, "use_scoring", True)
        return tuple(
            key for key in LOSS_TERMS
            if key in (Keys.LOSS, AdaCSKeys.SMOOTHNESS_WEIGHT)
            or (motion and key in MOTION_TERMS)
            or (scoring and key in SCORING_TERMS)
        )

    @classmethod
    def _problems(cls, engine: Engine) -> list[str]:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]  # decollated: one dict per pair
        problems = []
        for key in cls.active_terms(engine):
            values = [item[key] for item in items if isinstance(item, dict) and key in item]
            bad = [v for v in values if isinstance(v, (torch.Tensor, float, int))
                   and not bool(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all())]
            if bad:
                problems.append(f"{key} = {float(torch.as_tensor(bad[0], dtype=torch.float64).mean())}")
        for name in ("displacement_network", "scoring_network"):
            network = getattr(engine, name, None)
            if network is None:
                continue
            bad = [key for key, tensor in network.named_parameters() if not bool(torch.isfinite(tensor).all())]
            if bad:
                problems.append(f"{name} weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        for name in ("displacement_optimizer", "scoring_optimizer"):  # e.g. Adam's second moment overflowing
            optimizer = getattr(engine, name, None)
            if optimizer is None:
                continue
            bad = sorted({key for state in optimizer.state.values() for key, value in state.items()
                          if isinstance(value, torch.Tensor) and value.is_floating_point()
                          and not bool(torch.isfinite(value).all())})
            if bad:
                problems.append(f"{name} state ({', '.join(bad)})")
        return problems

    def _check(self, engine: Engine) -> None:
        problems = self._problems(engine)
        # the verdict of every data-parallel rank (the number itself in one process)
        if idist.all_reduce(float(bool(problems)), op="MAX") and not problems:
            problems = ["another process's loss or weights"]
        if not problems:
            return
        found = loadable_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        if found:
            path, epoch = found
            trained = f" (epoch {epoch})" if epoch is not None else ""
            last = (f"the last good checkpoint is {path}{trained}: resume from it with --resume_checkpoint \"{path}\" "
                    "and a lower learning rate, or check the data")
        else:
            last = "no checkpoint had been saved yet: lower the learning rate or check the data and train again"
        raise TrainingStopped(
            f"training stopped at epoch {engine.state.epoch}, iteration {engine.state.iteration}: not finite (NaN or "
            f"Inf): {'; '.join(problems)}. Nothing of this epoch was saved; {last}."
        )
