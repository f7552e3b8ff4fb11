"""MONAI Label app of the AdaCS bundle: label propagation (ED label -> ES frame) by registration.

    monailabel start_server --app monailabel_app --studies <datastore> [--conf bundle_path <bundle>]
        [--conf model_path <bundle>/models/model.pt] [--conf image_size 128]

The datastore holds both frames of each case as images (``<case>_ED``, ``<case>_ES``) and the ED frame's label
as a final label (``labels/final/<case>_ED.nii.gz``). ``POST /infer/adacs_propagation?image=<case>_ES`` returns
the ED label propagated onto the ES frame.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

logger = logging.getLogger(__name__)
APP_DIR = os.path.dirname(os.path.realpath(__file__))


class MyApp(MONAILabelApp):
    """Registration app: one infer task, ``adacs_propagation``; no training (train with the bundle)."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.bundle_path = os.path.realpath(conf.get("bundle_path", os.path.join(app_dir, "..", "bundle")))
        self.model_path = conf.get("model_path", os.path.join(self.bundle_path, "models", "model.pt"))
        self.image_size = int(conf.get("image_size", "128"))
        for path in (self.bundle_path, APP_DIR):  # the bundle's `scripts` package and this app's `lib`
            if path not in sys.path:
                sys.path.insert(0, path)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="AdaCS label propagation",
                         description="ED -> ES label propagation by unsupervised registration (AdaCS bundle)",
                         version="0.1.0")

    def init_infers(self) -> Dict[str, InferTask]:
        from lib.propagation import LabelPropagationTask

        task = LabelPropagationTask(self.datastore, self.model_path, (self.image_size, self.image_size))
        if not task.is_valid():
            logger.warning(f"{self.model_path}: weights not found; train the bundle or pass --conf model_path")
        return {"adacs_propagation": task}
