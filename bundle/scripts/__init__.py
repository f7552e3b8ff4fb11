"""AdaCS bundle code: networks, losses, schedules, trainer, evaluator, metrics, training monitors and data."""

from . import data, evaluator, losses, metrics, monitoring, networks, phantom, schedule, trainer  # noqa: F401
