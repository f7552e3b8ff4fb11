"""MONAI Label infer task: myocardial strain of a case from its ED label, with the AdaCS bundle's strain workflow.

Given the ED frame (the image of the infer request, id ``<case>_ED``) with its final label, the task finds the ES
frame of the same case (image id ``<case>_ES``, or the request's ``fixed`` parameter), tracks ED -> ES with the
bundle's displacement network and runs the bundle's strain analysis (``scripts.strain_analysis``, the engine of
``configs/strain.yaml``). It returns, on the ED image's geometry, the **AHA segments** as the label (1-16 short axis,
the echo numbers in long axis: a label map the viewer can show) and, as the result's JSON, the strain at ES: global
and per-segment radial / circumferential (or transverse / longitudinal) strain, Green and engineering, in percent,
the mid-wall GLS in long axis, the ejection fraction of the tracked labels and every fallback taken (``notes``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Dict, Tuple, Union

import nibabel as nib
import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.bundle_task import BundleInferTask

ACDC_LABELS = {"rv": 1, "myo": 2, "lv": 3}


class StrainTask(BundleInferTask):
    """ED label + ES frame -> AHA segments (label) and strain at ES (JSON).

    Args:
        datastore: callable returning the app's datastore (``app.datastore``).
        model_path: flat state dict of the bundle's ``network_def``.
        image_size: the network grid; ``roi_size``: crop around the ED myocardium (``configs/strain.yaml``).
        labels: label codes (``rv``, ``myo``, ``lv``; echo ``lv``, ``myo``, ``la``); ``view``: short_axis / long_axis.
        lagrangian: ``inverse`` (the network's inverse field, as ``configs/strain.yaml``) or ``swap`` (ES moving, ED
            fixed: for one-way backbones such as ``backbone_diffusemorph.yaml``).
    """

    def __init__(self, datastore: Callable[[], Datastore], model_path: str, image_size=(128, 128),
                 roi_size=(128, 128), labels: Dict[str, int] | None = None, view: str = "short_axis",
                 device: str = "cpu", lagrangian: str = "inverse") -> None:
        segments = {f"segment {k}": k for k in range(1, 17)}
        super().__init__(
            type=InferType.OTHERS,
            labels=segments,
            dimension=2,
            description="Myocardial strain at ES (AHA segments as the label, strain values in the JSON result)",
            config={"fixed": ""},
        )
        self.datastore, self.model_path = datastore, model_path
        self.image_size, self.roi_size = tuple(image_size), None if roi_size is None else tuple(roi_size)
        self.codes, self.view, self.device = dict(labels or ACDC_LABELS), view, device
        self.lagrangian = lagrangian
        self._registration = None

    def _engine(self):
        if self._registration is None:
            from scripts.strain_analysis import CineRegistration

            try:
                self._registration = CineRegistration(self._network(), self.image_size, self.roi_size,
                                                      lagrangian=self.lagrangian, device=self.device,
                                                      refiner=self._refiner())
            except ValueError as error:  # e.g. the inverse field of a one-way backbone: --conf strain_lagrangian swap
                raise MONAILabelException(MONAILabelError.SERVER_ERROR,
                                          f"{error} (MONAI Label app: --conf strain_lagrangian swap)") from None
        return self._registration

    def _case(self, request: Dict[str, Any]) -> Dict[str, str]:
        moving_id, _, fixed = self._partner(request, "ED", "ES", "fixed")
        label = self._final_label(moving_id, "strain needs it")
        return {"case": moving_id.removesuffix("_ED"), "moving": request["image"], "moving_label": label, "fixed": fixed}

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        from scripts.strain_analysis import analyse_case
        from scripts.strain_io import CaseError, load_case
        from scripts.strain_workflow import region_rows, summary_row

        item = self._case(request)
        try:
            case = load_case(item)
            displacement = self._engine().track(case, self.codes["myo"])
            result = analyse_case(case, displacement, self.codes, self.view)
        except (CaseError, ValueError) as error:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(error)) from None
        segments = np.moveaxis(result.segments.segments.astype(np.uint8), 0, -1)  # (X, Y, S)
        image = nib.load(request["image"])
        handle, path = tempfile.mkstemp(suffix=".nii.gz", prefix="adacs_strain_")
        os.close(handle)
        nib.save(nib.Nifti1Image(segments.reshape(image.shape), image.affine), path)
        summary = summary_row(case, result)
        percent = lambda value: round(100.0 * float(value), 2)  # noqa: E731
        strain = {k[len("global_"):]: percent(v) for k, v in summary.items() if k.startswith("global_")}
        if "gls_midwall_engineering" in summary:
            strain["gls_midwall_engineering"] = percent(summary["gls_midwall_engineering"])
        regions = {row["region"]: {k[:-3]: percent(v) for k, v in row.items() if k.endswith("_es")}
                   for row in region_rows(case, result) if row["region"] not in ("global", "midwall_contour")}
        return path, {
            "fixed": os.path.basename(item["fixed"]), "units": "percent", "view": result.view,
            "global": strain, "segments": regions, "ef_tracked": summary.get("ef_tracked"),
            "folding_pct": summary.get("folding_pct_es"), "notes": result.notes,
        }
