"""MONAI Label app of the AdaCS bundle: label propagation (ED label -> ES frame) by registration.

    monailabel start_server --app monailabel_app --studies <datastore> [--conf bundle_path <bundle>]
        [--conf model_path <bundle>/models/model.pt] [--conf image_size 128]
        [--conf network_config backbone_transmorph.yaml]

The datastore holds both frames of each case as images (``<case>_ED``, ``<case>_ES``) and the ED frame's label
as a final label (``labels/final/<case>_ED.nii.gz``). ``POST /infer/adacs_propagation?image=<case>_ES`` returns
the ED label propagated onto the ES frame; ``POST /infer/adacs_strain?image=<case>_ED`` returns the AHA segments
of the ED label (``output=image``) and the strain at ES per segment (``output=json``). Strain options:
``--conf strain_labels '{"rv": 1, "myo": 2, "lv": 3}'`` (ACDC codes), ``--conf strain_view short_axis|long_axis``,
``--conf roi_size 128|none``. Test-time refinement of every registered pair (both tasks): ``--conf refine_steps 50``
[``--conf refine_score_weighted false``] [``--conf scoring_model_path <bundle>/models/scoring_model.pt``].
Another backbone (``--conf network_config backbone_transmorph.yaml``: an override config of the bundle, by name in
``configs/``, relative to the bundle or absolute) builds ``network_def`` as ``inference.yaml`` plus that config does;
``model_path`` then holds weights trained with it; a one-way backbone (``backbone_diffusemorph.yaml``) needs
``--conf strain_lagrangian swap`` for strain, as ``configs/strain.yaml``'s ``lagrangian``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict, Optional

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

logger = logging.getLogger(__name__)
APP_DIR = os.path.dirname(os.path.realpath(__file__))


def refine_settings(conf: Dict[str, str], bundle_path: str) -> Dict[str, object]:
    """``--conf refine_*`` as the bundle's ``refinement.refiner_from_settings`` arguments (0 steps: no refinement)."""
    return {"steps": int(conf.get("refine_steps", "0")),
            "score_weighted": conf.get("refine_score_weighted", "true"),
            "scoring_ckpt_path": conf.get("scoring_model_path", os.path.join(bundle_path, "models", "scoring_model.pt"))}


def network_config(conf: Dict[str, str], bundle_path: str) -> Optional[str]:
    """``--conf network_config`` as the path of a backbone's override config of the bundle (``None``: inference.yaml's
    own network); a name that is not a file is a ``ValueError`` naming the bundle's backbone configs (the server does
    not start). Needs the bundle's ``scripts`` importable."""
    name = conf.get("network_config") or None
    if name is None:
        return None
    from scripts.inference_engine import network_config_file

    try:
        return str(network_config_file(name, bundle_path))
    except SystemExit as error:
        raise ValueError(str(error).removeprefix("error: ")) from None


class MyApp(MONAILabelApp):
    """Registration app: infer tasks ``adacs_propagation`` and ``adacs_strain``; no training (train with the bundle)."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.bundle_path = os.path.realpath(conf.get("bundle_path", os.path.join(app_dir, "..", "bundle")))
        self.model_path = conf.get("model_path", os.path.join(self.bundle_path, "models", "model.pt"))
        self.image_size = int(conf.get("image_size", "128"))
        roi = conf.get("roi_size", "128")  # strain: crop around the ED myocardium ("none": the whole image, echo)
        self.roi_size = None if roi.lower() == "none" else (int(roi), int(roi))
        self.strain_labels = json.loads(conf.get("strain_labels", '{"rv": 1, "myo": 2, "lv": 3}'))
        self.strain_view = conf.get("strain_view", "short_axis")
        self.strain_lagrangian = conf.get("strain_lagrangian", "inverse")  # swap: one-way backbones (DiffuseMorph)
        self.refine = refine_settings(conf, self.bundle_path)
        for path in (self.bundle_path, APP_DIR):  # the bundle's `scripts` package and this app's `lib`
            if path not in sys.path:
                sys.path.insert(0, path)
        self.network_config = network_config(conf, self.bundle_path)  # checked at start (the bundle's scripts)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="AdaCS label propagation",
                         description="ED -> ES label propagation by unsupervised registration (AdaCS bundle)",
                         version="0.1.0")

    def init_infers(self) -> Dict[str, InferTask]:
        from lib.propagation import LabelPropagationTask
        from lib.strain import StrainTask

        size = (self.image_size, self.image_size)
        task = LabelPropagationTask(self.datastore, self.model_path, size)
        task.refine, task.bundle_path, task.network_config = self.refine, self.bundle_path, self.network_config
        if not task.is_valid():
            logger.warning(f"{self.model_path}: weights not found; train the bundle or pass --conf model_path")
        strain = StrainTask(self.datastore, self.model_path, size, roi_size=self.roi_size, labels=self.strain_labels,
                            view=self.strain_view, lagrangian=self.strain_lagrangian)
        strain.refine, strain.bundle_path, strain.network_config = self.refine, self.bundle_path, self.network_config
        return {"adacs_propagation": task, "adacs_strain": strain}
