"""Registration evaluator: predicts the field, warps the moving image and labels, hands them to MONAI metrics.

MONAI's ``SupervisedEvaluator`` runs one network on one image; registration needs the pair in, the field out, and
the moving image and labels warped by it, so the iteration is ours. Its output keys are MONAI's ``CommonKeys`` and
:class:`RegistrationKeys`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from ignite.engine import Events
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.inferers import SimpleInferer
from monai.networks import one_hot as monai_one_hot
from monai.networks.blocks import Warp
from monai.utils import CommonKeys as Keys
from monai.utils.enums import StrEnum

from .checkpoints import quiet_exception_handler
from .trainer import PreparePairBatch

LABEL_WARPS = ("onehot", "binary_bilinear")


class RegistrationKeys(StrEnum):
    """Output keys of :class:`RegistrationEvaluator` beyond MONAI's ``CommonKeys`` (``image``, ``label``, ``pred``)."""

    WARPED = "warped"  # the moving image warped by the predicted field
    WARPED_LABEL = "warped_label"  # the moving label warped by the field, one-hot
    MOVING_LABEL = "moving_label"  # the moving label, one-hot: the undeformed baseline
    TRUE_DDF = "true_ddf"  # the true field, when the data has one (phantom)
    REFINEMENT_NOTES = "refinement_notes"  # per pair: what test-time refinement did ("" when nothing to say)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, ...) integer labels -> (B, C, ...) float one-hot (``monai.networks.one_hot``; negative values count as
    background)."""
    return monai_one_hot(labels.long().clamp_min(0), num_classes, dtype=torch.float, dim=1)


def warp_labels(labels: torch.Tensor, ddf: torch.Tensor, num_classes: int, method: str = "onehot") -> torch.Tensor:
    """Warp integer labels and return one-hot ``(B, num_classes, H, W)``.

    * ``onehot``: each class warped bilinearly, then argmax (the default protocol, any number of labels);
    * ``binary_bilinear``: the paper's protocol, the label map warped bilinearly and counted as foreground where
      > 0 (a slight dilation; meant for one foreground label, e.g. the myocardium).
    """
    if method == "onehot":
        warped = Warp(mode="bilinear", padding_mode="zeros")(one_hot(labels, num_classes), ddf)
        return one_hot(warped.argmax(1, keepdim=True), num_classes)
    if method == "binary_bilinear":
        warped = Warp(mode="bilinear", padding_mode="zeros")((labels > 0).float(), ddf)
        return one_hot((warped > 0).long(), 2)
    raise ValueError(f"label warp must be one of {LABEL_WARPS}, got {method!r}.")


class RegistrationEvaluator(Evaluator):
    """Runs the displacement network on (moving, fixed) pairs; output keys for handlers and metrics:

    ``pred`` the field, ``warped`` the warped moving image, ``label`` the fixed label (one-hot),
    ``warped_label`` the warped moving label (one-hot), ``moving_label`` the moving label (one-hot, i.e. the
    undeformed baseline), ``true_ddf`` the true field when the data has one (phantom).

    Args:
        network: the displacement network ``(B, 2, H, W) -> ddf``.
        num_classes: label classes including background.
        label_warp: see :func:`warp_labels`.
        labels_to_keep: optional label values kept as foreground (others become background), e.g. ``[2]`` to
            evaluate the myocardium only; they are renumbered 1..n in that order.
        refiner: optional test-time refinement of each pair (``refinement.InstanceRefiner``); inactive (0 steps) or
            ``None``: the inferer's field.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: torch.nn.Module,
        num_classes: int = 4,
        label_warp: str = "onehot",
        labels_to_keep: Sequence[int] | None = None,
        moving_label_key: str = "moving_label",
        fixed_label_key: str = "fixed_label",
        true_ddf_key: str = "true_ddf",
        prepare_batch: Callable = PreparePairBatch(),
        inferer: Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        postprocessing: Callable | None = None,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        val_handlers: Sequence | None = None,
        decollate: bool = True,
        to_kwargs: dict | None = None,
        refiner: Any = None,
    ) -> None:
        extra = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            postprocessing=postprocessing,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            decollate=decollate,
            to_kwargs=to_kwargs,
            **extra,
        )
        if label_warp not in LABEL_WARPS:
            raise ValueError(f"label_warp must be one of {LABEL_WARPS}, got {label_warp!r}.")
        self.network = network
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.labels_to_keep = list(labels_to_keep) if labels_to_keep else None
        self.num_classes = (len(self.labels_to_keep) + 1) if self.labels_to_keep else num_classes
        if label_warp == "binary_bilinear" and self.num_classes != 2:
            raise ValueError("label_warp='binary_bilinear' needs one foreground label (set labels_to_keep).")
        self.label_warp = label_warp
        self.moving_label_key, self.fixed_label_key, self.true_ddf_key = moving_label_key, fixed_label_key, true_ddf_key
        self.warp = Warp(mode="bilinear", padding_mode="zeros")
        self.refiner = refiner if (refiner is not None and refiner.active) else None

    def _register_handlers(self, handlers: Sequence) -> None:
        self.add_event_handler(Events.EXCEPTION_RAISED, quiet_exception_handler)  # see AdaCSTrainer
        super()._register_handlers(handlers)

    def _select_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.round().long()
        if self.labels_to_keep is None:
            return labels
        out = torch.zeros_like(labels)
        for new_value, old_value in enumerate(self.labels_to_keep, start=1):
            out[labels == old_value] = new_value
        return out

    def _iteration(self, engine: RegistrationEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        moving, fixed = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image = torch.cat([moving, fixed], dim=1)
        with engine.mode(engine.network), torch.no_grad():
            if engine.refiner is None:
                ddf = engine.inferer(image, engine.network)
            else:  # Adam on each pair's field (the refiner enables gradients for its own variable only)
                refined = engine.refiner(engine.network, image)
                ddf = refined.ddf
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        output: dict[str, Any] = {Keys.IMAGE: image, Keys.PRED: ddf, RegistrationKeys.WARPED: engine.warp(moving, ddf)}
        if engine.refiner is not None:
            output[RegistrationKeys.REFINEMENT_NOTES] = refined.notes
        if all(isinstance(batchdata.get(k), torch.Tensor) for k in (engine.moving_label_key, engine.fixed_label_key)):
            device = engine.state.device
            moving_label = engine._select_labels(batchdata[engine.moving_label_key].to(device))
            fixed_label = engine._select_labels(batchdata[engine.fixed_label_key].to(device))
            output[Keys.LABEL] = one_hot(fixed_label, engine.num_classes)
            output[RegistrationKeys.MOVING_LABEL] = one_hot(moving_label, engine.num_classes)
            warped_label = warp_labels(moving_label, ddf, engine.num_classes, engine.label_warp)
            output[RegistrationKeys.WARPED_LABEL] = warped_label
        if isinstance(batchdata.get(engine.true_ddf_key), torch.Tensor):
            output[RegistrationKeys.TRUE_DDF] = batchdata[engine.true_ddf_key].to(engine.state.device)
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
