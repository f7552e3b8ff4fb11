"""AdaCS bundle code: networks, losses, schedules, trainer, evaluator, metrics, training monitors, data, and the
myocardial strain workflow (strain, myocardium, tracking, strain_io, strain_analysis, strain_workflow; strain_plots
is imported when figures are written)."""

from . import checkpoints, data, evaluator, losses, metrics, monitoring, networks, phantom, schedule, trainer  # noqa: F401
from . import myocardium, strain, strain_analysis, strain_io, strain_workflow, tracking  # noqa: F401
