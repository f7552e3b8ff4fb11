"""What the app's infer tasks share: the bundle's displacement network, loaded once from ``model_path``."""

from __future__ import annotations

import os

import torch
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask


class BundleInferTask(InferTask):
    """An infer task backed by the AdaCS bundle's displacement network (a flat state dict of ``network_def``)."""

    model_path: str
    device: str

    def is_valid(self) -> bool:
        return os.path.isfile(self.model_path)

    def get_path(self, validate: bool = True):
        return self.model_path

    def _network(self) -> torch.nn.Module:
        """The displacement network with the weights of ``model_path``, in eval mode on ``device``."""
        from scripts.io_safety import load_weights
        from scripts.networks import DiffeomorphicVoxelMorph

        net = DiffeomorphicVoxelMorph()
        try:  # the bundle's checks: the file named, readable, finite, fitting the network
            load_weights(net, self.model_path, "displacement network", self.device)
        except SystemExit as error:  # a server answers the request instead of exiting
            raise MONAILabelException(MONAILabelError.SERVER_ERROR, str(error).removeprefix("error: ")) from None
        return net.to(self.device).eval()
