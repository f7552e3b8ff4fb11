"""AdaCS bundle code: networks, losses, schedules, trainer, evaluator, metrics, training monitors and data."""

from . import checkpoints, data, evaluator, losses, metrics, monitoring, networks, phantom, schedule, trainer  # noqa: F401
