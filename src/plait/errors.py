"""User-facing errors: each says what is wrong and how to fix it."""

from __future__ import annotations


class PlaitError(Exception):
    """An error caused by the user's input; the CLI prints its message without a traceback."""

    exit_code: int = 2


class ClusterSpecError(PlaitError):
    """A cluster file or preset name that cannot be used."""


class CaptureError(PlaitError):
    """A model that cannot be captured on the meta device."""


class NoFeasiblePlanError(PlaitError):
    """No candidate plan fits the devices' memory."""


class LaunchError(PlaitError):
    """A launched job whose ranks failed or could not start."""

    exit_code = 1
