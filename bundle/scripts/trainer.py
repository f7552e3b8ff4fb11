"""AdaCS trainer: two networks, two optimizers, one ``_iteration`` that reads like the algorithm.

Per micro-step (paper Alg. / reference ``train_vxm.py``):

1. score maps S_fwd = g(fixed), S_bwd = g(moving), computed once (one batched forward) and reused;
2. displacement step: L_de with S detached, backward, Adam step on theta every ``accumulation_steps``;
   then the momentum smoothness weight is updated from the data term;
3. scoring step: the warped images come from theta_{t+1} (a second forward without gradients, skipped when
   theta did not change, i.e. between accumulation boundaries), L_se with the warped image detached,
   backward, Adam step on phi every ``accumulation_steps``.

Warm start: ``motion_warmup_epochs`` with S = 1 and no scoring step, then ``scoring_warmup_epochs`` with the
displacement network frozen, then joint. ``use_scoring=False`` turns the same trainer into VoxelMorph-MSE.

``reference_gradient_leak=True`` reproduces the reference code instead of the paper's equations: its scoring step
re-runs f_theta with gradients and does not detach the warped image, so dL_ucs/dtheta lands in theta's gradients,
which are cleared only after a displacement step; the leak is added into the next displacement update (and piles up
over the scoring warm-up until the first joint step).

A displacement network may add a term of its own to L_de: a method ``auxiliary_loss()`` returning the (weighted)
term of its last training-mode forward, or None (e.g. :class:`~scripts.diffusemorph.DiffuseMorph2D`'s diffusion loss).
The displacement step adds it and reports it as ``loss_auxiliary`` (:data:`AUXILIARY_LOSS`, NaN in a micro-step that
skips the displacement step); networks without the method train exactly as before, without that key.

Vocabulary (as MONAI's ``AdversarialTrainer`` with ``AdversarialIterationEvents`` / ``AdversarialKeys``): besides
MONAI's ``IterationEvents`` the trainer fires :class:`AdaCSIterationEvents` (score maps, displacement step and scoring
step completed), registered before the handlers attach, so a handler attaches by name; its output dict is keyed by
MONAI's ``CommonKeys`` and :class:`AdaCSKeys` (string values, so configs and logs name them as before).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import EventEnum, Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Warp
from monai.utils import CommonKeys as Keys
from monai.utils import str2bool
from monai.utils.enums import StrEnum
from torch.optim import Optimizer

from .checkpoints import quiet_exception_handler
from .losses import Direction, DisplacementLoss, ScoringLoss, foreground_mask
from .networks import RegistrationFields, registration_fields
from .schedule import MomentumSmoothnessWeight, Phase, phase_for_epoch


class AdaCSKeys(StrEnum):
    """Keys of the trainer's output beyond MONAI's ``CommonKeys`` (``image``, ``label``, ``pred``, ``loss``).

    Every one is a scalar, NaN in a micro-step whose phase skips that branch:

    * ``DISPLACEMENT_LOSS``: L_de, with its ``DATA_LOSS`` (score-weighted dissimilarity) and ``GRAD_LOSS``
      (smoothness of the field) terms (and :data:`AUXILIARY_LOSS`, outside this enum, for networks that have one);
    * ``SCORING_LOSS``: L_se, with its ``UCS_LOSS``, ``REG_LOSS`` (pull of S to 1) and ``SMOOTH_LOSS`` terms;
    * ``SMOOTHNESS_WEIGHT``: the momentum weight of L_smooth after this micro-step;
    * ``MEAN_SCORE``: the mean of this micro-step's score maps.

    The values are the names the logs, TensorBoard tags and configs have always used.
    """

    DISPLACEMENT_LOSS = "loss_displacement"
    DATA_LOSS = "loss_data"
    GRAD_LOSS = "loss_grad"
    SCORING_LOSS = "loss_scoring"
    UCS_LOSS = "loss_ucs"
    REG_LOSS = "loss_reg"
    SMOOTH_LOSS = "loss_smooth"
    SMOOTHNESS_WEIGHT = "smoothness_weight"
    MEAN_SCORE = "mean_score"


class AdaCSIterationEvents(EventEnum):
    """Events of one AdaCS micro-step, fired besides MONAI's ``IterationEvents``; attach with
    ``trainer.add_event_handler(AdaCSIterationEvents.SCORING_STEP_COMPLETED, handler)`` (train_handlers included).

    * ``SCORE_MAPS_COMPLETED``: the score maps g(fixed) (and g(moving)) of a micro-step that trains the scoring
      network are computed (scoring warm-up and joint phases);
    * ``DISPLACEMENT_STEP_COMPLETED``: the displacement step is done (backward, optimizer step at an accumulation
      boundary, momentum updated); its loss terms are in ``engine.state.output`` (motion warm-up and joint phases);
    * ``SCORING_STEP_COMPLETED``: the scoring step is done; its loss terms and ``MEAN_SCORE`` are in
      ``engine.state.output`` (scoring warm-up and joint phases).
    """

    SCORE_MAPS_COMPLETED = "score_maps_completed"
    DISPLACEMENT_STEP_COMPLETED = "displacement_step_completed"
    SCORING_STEP_COMPLETED = "scoring_step_completed"


# every scalar the trainer reports (NaN when the phase skips that branch), in the order they are logged
LOSS_TERMS: tuple[str, ...] = (Keys.LOSS, *AdaCSKeys)
MOTION_TERMS: tuple[str, ...] = (AdaCSKeys.DISPLACEMENT_LOSS, AdaCSKeys.DATA_LOSS, AdaCSKeys.GRAD_LOSS)
SCORING_TERMS: tuple[str, ...] = (
    AdaCSKeys.SCORING_LOSS, AdaCSKeys.UCS_LOSS, AdaCSKeys.REG_LOSS, AdaCSKeys.SMOOTH_LOSS, AdaCSKeys.MEAN_SCORE
)
# the displacement network's own weighted term of L_de (``auxiliary_loss()``), in the output only for networks that
# have one (so LOSS_TERMS, every other network's output and their logs are unchanged)
AUXILIARY_LOSS = "loss_auxiliary"


class PreparePairBatch:
    """``prepare_batch`` for registration: returns ``(moving, fixed)`` on the device."""

    def __init__(self, moving_key: str = "moving", fixed_key: str = "fixed") -> None:
        self.moving_key = moving_key
        self.fixed_key = fixed_key

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        moving = batchdata[self.moving_key].to(device=device, non_blocking=non_blocking, **kwargs)
        fixed = batchdata[self.fixed_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return moving, fixed


def loss_terms(output: Any) -> dict[str, float]:
    """``output_transform`` for Stats/TensorBoard handlers: every loss term and the momentum as floats."""
    item = output[0] if isinstance(output, list) else output
    return {str(k): float(item[k]) for k in (*LOSS_TERMS, AUXILIARY_LOSS) if k in item}


def _switch(value: Any, name: str) -> bool:
    """``monai.utils.str2bool`` (the command line passes ``--use_scoring false`` as a string), naming the argument."""
    try:
        return str2bool(value if isinstance(value, bool) else str(value).strip())
    except ValueError as error:
        raise ValueError(f"{name} must be true or false: {error}") from None


class AdaCSTrainer(Trainer):
    """Alternating trainer of the displacement estimator f_theta and the scoring estimator g_phi.

    Args:
        device: where to train.
        max_epochs: total epochs, warm-up included (the paper: 20 + 20 + 300).
        train_data_loader: yields dicts with ``moving`` and ``fixed`` images (B, 1, H, W).
        displacement_network: any ``(B, 2, H, W) -> ddf`` network; ``DiffeomorphicVoxelMorph`` also gives the
            inverse field and the velocity (bidirectional training, smoothness on the velocity).
        scoring_network: ``(B, 1, H, W) -> S in (0, 1)``; may be None when ``use_scoring`` is False.
        displacement_optimizer, scoring_optimizer: one optimizer per network.
        displacement_loss: :class:`DisplacementLoss` (similarity, regulariser, lambda).
        scoring_loss: :class:`ScoringLoss` (similarity, alpha).
        smoothness_weight: :class:`MomentumSmoothnessWeight` (beta and the momentum constants).
        use_scoring: False gives the VoxelMorph baseline (S = 1, every epoch trains the displacement network);
            it still tracks the momentum, so its checkpoints are an AdaCS run's motion warm-up, state included.
        motion_warmup_epochs, scoring_warmup_epochs: the warm start (the paper: 20 and 20).
        accumulation_steps: micro-steps per optimizer step; gradients are summed, as in the reference code.
        use_mask: apply the background mask M = (moving != 0) | (fixed != 0).
        warp_padding_mode: padding of the image warp (VoxelMorph: zeros).
        reference_gradient_leak: reproduce the reference code's leak of dL_ucs/dtheta into the displacement
            updates (default False: the paper's stop-gradient). Off the paper, on the published numbers' code.
        event_names, event_to_attr: more custom events to register, as MONAI's ``Trainer``;
            :class:`AdaCSIterationEvents` are always registered (before ``train_handlers`` attach).
        The other arguments are MONAI's ``Trainer``'s.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        displacement_network: torch.nn.Module,
        displacement_optimizer: Optimizer,
        displacement_loss: DisplacementLoss,
        scoring_network: torch.nn.Module | None = None,
        scoring_optimizer: Optimizer | None = None,
        scoring_loss: ScoringLoss | None = None,
        smoothness_weight: MomentumSmoothnessWeight | None = None,
        use_scoring: bool = True,
        motion_warmup_epochs: int = 20,
        scoring_warmup_epochs: int = 20,
        accumulation_steps: int = 2,
        use_mask: bool = True,
        warp_padding_mode: str = "zeros",
        reference_gradient_leak: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = PreparePairBatch(),
        iteration_update: Callable | None = None,
        inferer: Any = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        train_handlers: Sequence | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
    ) -> None:
        use_scoring = _switch(use_scoring, "use_scoring")
        use_mask = _switch(use_mask, "use_mask")
        reference_gradient_leak = _switch(reference_gradient_leak, "reference_gradient_leak")
        if use_scoring and (scoring_network is None or scoring_optimizer is None or scoring_loss is None):
            raise ValueError("use_scoring=True needs scoring_network, scoring_optimizer and scoring_loss.")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}.")
        extra = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            decollate=decollate,
            to_kwargs=to_kwargs,
            # registered before train_handlers attach (MONAI's AdversarialTrainer registers its events after)
            event_names=[*(event_names or []), AdaCSIterationEvents],
            event_to_attr=event_to_attr,
            **extra,
        )
        self.displacement_network = displacement_network
        self.network = displacement_network  # the bundle's primary network, for handlers that look for it
        self.displacement_optimizer = displacement_optimizer
        self.displacement_loss = displacement_loss
        self.scoring_network = scoring_network
        self.scoring_optimizer = scoring_optimizer
        self.scoring_loss = scoring_loss
        self.smoothness_weight = smoothness_weight if smoothness_weight is not None else MomentumSmoothnessWeight()
        self.use_scoring = use_scoring
        self.motion_warmup_epochs = motion_warmup_epochs if use_scoring else 0
        self.scoring_warmup_epochs = scoring_warmup_epochs if use_scoring else 0
        self.accumulation_steps = accumulation_steps
        self.use_mask = use_mask
        self.reference_gradient_leak = reference_gradient_leak and use_scoring
        self.inferer = inferer
        self.optim_set_to_none = optim_set_to_none
        self.warp = Warp(mode="bilinear", padding_mode=warp_padding_mode)
        self.state.phase = self.phase_of(0)
        self.state.smoothness_weight_state = self.smoothness_weight.state_dict()
        self._state_dict_user_keys.append("smoothness_weight_state")
        self.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)

    def _register_handlers(self, handlers: Sequence) -> None:
        # first EXCEPTION_RAISED handler: a TrainingStopped (non-finite loss, failed save) leaves with its message,
        # without the traceback MONAI's StatsHandler would log
        self.add_event_handler(Events.EXCEPTION_RAISED, quiet_exception_handler)
        super()._register_handlers(handlers)

    # ---- schedule and state -------------------------------------------------------------------------------
    def phase_of(self, epoch_index: int) -> Phase:
        """Phase of a 0-based epoch (always MOTION when scoring is off)."""
        if not self.use_scoring:
            return Phase.MOTION
        return phase_for_epoch(epoch_index, self.motion_warmup_epochs, self.scoring_warmup_epochs)

    def _start_epoch(self, engine: AdaCSTrainer) -> None:
        sampler = getattr(engine.data_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # same pairs after a resume as in an uninterrupted run
            sampler.set_epoch(engine.state.epoch)
        engine.state.phase = engine.phase_of(engine.state.epoch - 1)
        engine.smoothness_weight.start_epoch(engine.state.epoch - 1)

    def state_dict(self):
        self.state.smoothness_weight_state = self.smoothness_weight.state_dict()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.smoothness_weight.load_state_dict(self.state.smoothness_weight_state)
        self.state.phase = self.phase_of(self.state.epoch)

    def _accumulation_boundaries(self) -> tuple[bool, bool]:
        """(zero the gradients before this micro-step, step the optimizers after it)."""
        acc = self.accumulation_steps
        epoch_length = self.state.epoch_length
        local = (self.state.iteration - 1) % epoch_length if epoch_length else self.state.iteration - 1
        last = epoch_length is not None and local + 1 == epoch_length
        return local % acc == 0, (local + 1) % acc == 0 or last

    # ---- building blocks ----------------------------------------------------------------------------------
    def score_maps(self, moving: torch.Tensor, fixed: torch.Tensor, bidirectional: bool) -> list[torch.Tensor]:
        """S = g(target) for each direction, in one batched forward: [g(fixed)] or [g(fixed), g(moving)]."""
        targets = torch.cat([fixed, moving]) if bidirectional else fixed
        return list(self.scoring_network(targets).split(fixed.shape[0]))

    def directions(
        self, moving: torch.Tensor, fixed: torch.Tensor, fields: RegistrationFields, scores: list | None
    ) -> list[Direction]:
        """The forward direction (moving onto fixed) and, if the network gives one, the backward direction."""
        scores = scores if scores is not None else [None, None]
        result = [Direction(self.warp(moving, fields.forward_ddf), fixed, scores[0])]
        if fields.backward_ddf is not None:
            result.append(Direction(self.warp(fixed, fields.backward_ddf), moving, scores[1]))
        return result

    # ---- one micro-step -----------------------------------------------------------------------------------
    def _iteration(self, engine: AdaCSTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        moving, fixed = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image = torch.cat([moving, fixed], dim=1)
        phase: Phase = engine.state.phase
        mask = foreground_mask(moving, fixed) if engine.use_mask else None
        zero_grad, step = engine._accumulation_boundaries()
        output: dict[str, Any] = {Keys.IMAGE: image, Keys.LABEL: fixed, Keys.PRED: None}
        output.update({k: math.nan for k in LOSS_TERMS})
        if _auxiliary_loss_of(engine.displacement_network) is not None:
            output[AUXILIARY_LOSS] = math.nan
        engine.state.output = output

        bidirectional = _is_bidirectional(engine.displacement_network)
        scores = None
        if phase.trains_scoring:
            engine.scoring_network.train()
            scores = engine.score_maps(moving, fixed, bidirectional)
            engine.fire_event(AdaCSIterationEvents.SCORE_MAPS_COMPLETED)

        warped_directions = None
        if phase.trains_motion:
            warped_directions = engine._displacement_step(image, moving, fixed, scores, mask, zero_grad, step)
        if phase.trains_scoring:
            engine._scoring_step(image, moving, fixed, scores, mask, zero_grad, step, reuse=warped_directions)
        output[Keys.LOSS] = output[AdaCSKeys.DISPLACEMENT_LOSS if phase.trains_motion else AdaCSKeys.SCORING_LOSS]
        output[AdaCSKeys.SMOOTHNESS_WEIGHT] = engine.smoothness_weight.value
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _displacement_step(self, image, moving, fixed, scores, mask, zero_grad: bool, step: bool):
        """L_de step on theta. Returns the detached directions when theta did not change (reusable)."""
        output = self.state.output
        self.displacement_network.train()
        if zero_grad and not self.reference_gradient_leak:  # the reference clears theta's gradients after a step
            self.displacement_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        fields = registration_fields(self.displacement_network, image)
        directions = self.directions(moving, fixed, fields, scores)
        output[Keys.PRED] = fields.forward_ddf
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        losses = self.displacement_loss(directions, mask, fields.regularized_field)
        total = losses["total"]
        auxiliary_loss = _auxiliary_loss_of(self.displacement_network)
        auxiliary = auxiliary_loss() if auxiliary_loss is not None else None
        if auxiliary is not None:  # the network's own term of this forward (DiffuseMorph: its diffusion loss)
            total = total + auxiliary
            output[AUXILIARY_LOSS] = auxiliary.detach()
        output.update({
            AdaCSKeys.DISPLACEMENT_LOSS: total.detach(),
            AdaCSKeys.DATA_LOSS: losses["data"].detach(),
            AdaCSKeys.GRAD_LOSS: losses["grad"].detach(),
        })
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        total.backward()
        self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step:
            self.displacement_optimizer.step()
            if self.reference_gradient_leak:
                self.displacement_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        # tracked in the baseline too (where no loss uses it): a run branched from a VoxelMorph-MSE checkpoint then
        # starts its scoring phase with the momentum a from-scratch AdaCS run has after the same motion warm-up.
        # The data term is averaged over the data-parallel ranks (identity in one process), so every rank keeps the
        # same momentum; cloned, as the all-reduce is in place and the output holds the detached term.
        data_term = idist.all_reduce(losses["data"].detach().clone(), op="SUM") / idist.get_world_size()
        self.smoothness_weight.update(float(data_term))
        self.fire_event(AdaCSIterationEvents.DISPLACEMENT_STEP_COMPLETED)
        if step:
            return None
        return [Direction(d.warped.detach(), d.target, None) for d in directions]

    def _scoring_step(self, image, moving, fixed, scores, mask, zero_grad: bool, step: bool, reuse=None) -> None:
        """L_se step on phi, against the warps of theta_{t+1} (recomputed only if theta changed)."""
        output = self.state.output
        if zero_grad:
            self.scoring_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        if self.reference_gradient_leak:
            reuse = self._leak_ucs_gradient(image, moving, fixed, scores, mask)
        if reuse is None:
            with torch.no_grad():
                fields = registration_fields(self.displacement_network, image)
                reuse = self.directions(moving, fixed, fields, None)
                if output[Keys.PRED] is None:
                    output[Keys.PRED] = fields.forward_ddf
        directions = [Direction(d.warped, d.target, s) for d, s in zip(reuse, scores)]
        losses = self.scoring_loss(directions, mask, self.smoothness_weight.value)
        if not self.state.phase.trains_motion:
            self.fire_event(IterationEvents.FORWARD_COMPLETED)
            self.fire_event(IterationEvents.LOSS_COMPLETED)
        losses["total"].backward()
        if not self.state.phase.trains_motion:
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step:
            self.scoring_optimizer.step()
        output.update({
            AdaCSKeys.SCORING_LOSS: losses["total"].detach(),
            AdaCSKeys.UCS_LOSS: losses["ucs"].detach(),
            AdaCSKeys.REG_LOSS: losses["reg"].detach(),
            AdaCSKeys.SMOOTH_LOSS: losses["smooth"].detach(),
            AdaCSKeys.MEAN_SCORE: torch.stack([s.detach().mean() for s in scores]).mean(),
        })
        self.fire_event(AdaCSIterationEvents.SCORING_STEP_COMPLETED)

    def _leak_ucs_gradient(self, image, moving, fixed, scores, mask) -> list[Direction]:
        """The reference code's leak: dL_ucs/dtheta at theta_{t+1} added into theta's gradients (not stepped here).

        L_ucs = mean(M * S * r^2) depends on theta only through the warp, so its theta-gradient is that of the
        displacement data term with S held fixed. Returns the (detached) warps for the scoring loss.
        """
        fields = registration_fields(self.displacement_network, image)
        live = self.directions(moving, fixed, fields, [s.detach() for s in scores])
        self.displacement_loss(live, mask, fields.regularized_field)["data"].backward()
        if self.state.output[Keys.PRED] is None:
            self.state.output[Keys.PRED] = fields.forward_ddf.detach()
        return [Direction(d.warped.detach(), d.target, None) for d in live]


def _auxiliary_loss_of(network: torch.nn.Module) -> Callable[[], torch.Tensor | None] | None:
    """The (possibly DDP-wrapped) displacement network's ``auxiliary_loss`` method, or None if it has none."""
    core = network.module if hasattr(network, "module") else network
    method = getattr(core, "auxiliary_loss", None)
    return method if callable(method) else None


def _is_bidirectional(network: torch.nn.Module) -> bool:
    """Whether the (possibly DDP-wrapped) displacement network also returns the inverse field."""
    core = network.module if hasattr(network, "module") else network
    return bool(getattr(core, "bidirectional", False))
