"""What the app's infer tasks share: the bundle's displacement network, loaded once from ``model_path``."""

from __future__ import annotations

import os

import torch
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask


def image_id(path: str) -> str:
    """The datastore id of an image file: its name without ``.nii.gz`` / ``.nii``."""
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


class BundleInferTask(InferTask):
    """An infer task backed by the AdaCS bundle's displacement network (a flat state dict of ``network_def``).

    ``refine`` (set by the app from ``--conf refine_*``): the keyword arguments of the bundle's
    ``refinement.refiner_from_settings`` (``steps``, ``score_weighted``, ``scoring_ckpt_path``, ...); test-time
    refinement of every registered pair when ``steps`` > 0. ``bundle_path`` and ``network_config`` (set by the app
    from ``--conf bundle_path`` / ``--conf network_config``): the network is the bundle's ``network_def`` as
    ``configs/inference.yaml`` plus that backbone config builds it (``scripts.inference_engine.network_from_config``;
    ``None``: inference.yaml's own), checked on the task's ``image_size``."""

    refine: dict = {}
    bundle_path: str | None = None
    network_config: str | None = None

    model_path: str
    device: str

    def is_valid(self) -> bool:
        return os.path.isfile(self.model_path)

    def get_path(self, validate: bool = True):
        return self.model_path

    def _network(self) -> torch.nn.Module:
        """The bundle config's displacement network with the weights of ``model_path``, in eval mode on ``device``."""
        from scripts.inference_engine import check_image_size, network_from_config
        from scripts.io_safety import load_weights

        try:  # the bundle's checks: the config, the weights file (named, readable, finite, fitting), the grid size
            net = network_from_config(self.network_config, self.bundle_path)
            load_weights(net, self.model_path, "displacement network", self.device)
            net = net.to(self.device)
            check_image_size(net, getattr(self, "image_size", (128, 128)), "displacement network", self.device)
        except SystemExit as error:  # a server answers the request instead of exiting
            raise MONAILabelException(MONAILabelError.SERVER_ERROR, str(error).removeprefix("error: ")) from None
        return net.eval()

    def _refiner(self):
        """The bundle's test-time refiner from ``refine`` (``None`` when off); the scoring weights checked by the
        bundle (a problem is a server error naming the file)."""
        from scripts.networks import ScoringNet
        from scripts.refinement import refiner_from_settings

        settings = dict(self.refine or {})
        if int(settings.get("steps", 0)) <= 0:
            return None
        try:
            return refiner_from_settings(scoring_network=ScoringNet(), device=self.device, **settings)
        except (SystemExit, ValueError) as error:
            raise MONAILabelException(MONAILabelError.SERVER_ERROR, str(error).removeprefix("error: ")) from None

    def _partner(self, request: dict, own: str, partner: str, param: str) -> tuple[str, str, str]:
        """(request image id, partner frame id, partner image uri): the case's other frame, ``<case>_<partner>`` when
        the request's image is ``<case>_<own>``, or the request's ``param`` id."""
        own_id = image_id(request["image"])
        suffix = f"_{own}"
        partner_id = request.get(param) or (own_id[: -len(suffix)] + f"_{partner}" if own_id.endswith(suffix) else "")
        if not partner_id:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT,
                                      f"image '{own_id}' is not named <case>_{own}; pass the {partner} image id as '{param}'")
        uri = self.datastore().get_image_uri(partner_id)
        if not uri:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT,
                                      f"{partner} frame '{partner_id}' of '{own_id}' is not in the datastore")
        return own_id, partner_id, uri

    def _final_label(self, image: str, purpose: str) -> str:
        """The uri of ``image``'s final label, or a request error saying what it is needed for."""
        label = self.datastore().get_label_uri(image, DefaultLabelTag.FINAL.value)
        if not label:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT,
                                      f"ED frame '{image}' has no final label in the datastore ({purpose})")
        return label
