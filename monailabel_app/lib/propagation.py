"""MONAI Label infer task: propagate the ED label of a case onto its ES frame with the AdaCS bundle.

Given the ES frame (the image of the infer request, id ``<case>_ES``), the task finds the ED frame of the same case
in the datastore (image id ``<case>_ED``, or the request's ``moving`` parameter) and its final label, registers
ED -> ES with the bundle's displacement network (``scripts.registration_io.PairRegistration``: any in-plane size,
2D or 3D short-axis stack, the same engine as ``configs/inference.yaml``) and returns the ED label warped onto the
ES frame (one-hot bilinear warp, argmax) as a NIfTI file in the ES image's geometry.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Union

import nibabel as nib
import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.bundle_task import BundleInferTask


class LabelPropagationTask(BundleInferTask):
    """ED label -> ES frame by unsupervised registration (AdaCS displacement network).

    Args:
        datastore: callable returning the app's datastore (``app.datastore``).
        model_path: flat state dict of the bundle's ``network_def`` (``bundle/models/model.pt``).
        image_size: the network grid.
        device: torch device.
    """

    def __init__(self, datastore: Callable[[], Datastore], model_path: str, image_size=(128, 128),
                 device: str = "cpu", labels: Dict[str, int] | None = None) -> None:
        super().__init__(
            type=InferType.OTHERS,
            labels=labels or {"label 1": 1, "label 2": 2, "label 3": 3},
            dimension=2,
            description="Propagate the ED label of the same case onto this ES frame (AdaCS registration)",
            config={"moving": ""},
        )
        self.datastore, self.model_path = datastore, model_path
        self.image_size, self.device = tuple(image_size), device
        self._registration = None

    def _engine(self):
        if self._registration is None:
            from scripts.registration_io import PairRegistration

            self._registration = PairRegistration(self._network(), self.image_size, self.device,
                                                  refiner=self._refiner())
        return self._registration

    def _moving(self, request: Dict[str, Any]) -> Tuple[str, str, str]:
        _, moving_id, moving = self._partner(request, "ES", "ED", "moving")
        return moving_id, moving, self._final_label(moving_id, "to propagate")

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        from scripts.registration_io import PairError, load_pair

        moving_id, moving, moving_label = self._moving(request)
        try:
            pair = load_pair({"case": moving_id, "moving": moving, "fixed": request["image"], "moving_label": moving_label})
        except PairError as error:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(error)) from None
        to_slices = (lambda a: np.moveaxis(a, -1, 0)) if pair.is_stack else (lambda a: a[None])
        result = self._engine()(to_slices(pair.moving), to_slices(pair.fixed), to_slices(pair.moving_label),
                                int(pair.moving_label.max()) + 1)
        label = result.warped_label[:, 0].cpu().numpy().astype(np.uint8)
        label = np.moveaxis(label, 0, -1) if pair.is_stack else label[0].reshape(pair.file_shape[:2] + (1,) * (len(pair.file_shape) - 2))
        fixed_image = nib.load(request["image"])
        handle, path = tempfile.mkstemp(suffix=".nii.gz", prefix="adacs_propagated_")
        os.close(handle)
        nib.save(nib.Nifti1Image(label.reshape(fixed_image.shape), fixed_image.affine), path)
        from scripts.metrics import folding_percentage

        return path, {"moving": moving_id, "moving_label": Path(moving_label).name,
                      "folding_pct": float(folding_percentage(result.ddf).mean())}
