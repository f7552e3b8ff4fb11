"""What the app's infer tasks share: the bundle's displacement network, loaded once from ``model_path``."""

from __future__ import annotations

import os

import torch
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
        from scripts.networks import DiffeomorphicVoxelMorph

        net = DiffeomorphicVoxelMorph()
        net.load_state_dict(torch.load(self.model_path, map_location=self.device, weights_only=True))
        return net.to(self.device).eval()
