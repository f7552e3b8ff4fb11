"""AdaCS bundle code: networks, losses, schedules, trainer, evaluator, metrics and data."""

from . import data, evaluator, losses, metrics, networks, phantom, schedule, trainer  # noqa: F401
