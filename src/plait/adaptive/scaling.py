"""Learning-rate scaling rules for a batch ``scale`` x the initial one, and progress in scale-invariant iterations.

Rules (the factor multiplies the learning rate tuned for the initial batch ``M0``; ``S = M / M0``,
``r`` the AdaScale gain of ``plait.adaptive.efficiency``):

* ``adascale``: ``r``. AdaScale (Johnson, Agrawal, Gu, Guestrin, ICML'20, "AdaScale SGD: A User-Friendly
  Algorithm for Distributed Training") for SGD, with or without momentum.
* ``adamscale``: ``sqrt(r)``. The rule Pollux (Qiao et al., OSDI'21) ships as AdaptDL's ``AdamScale``
  for Adam, AdamW and RMSProp: an adaptive optimizer divides by the gradient's RMS, so its update grows
  like the square root of the variance reduction rather than linearly (the square-root scaling of
  Krizhevsky 2014 / Hoffer et al. 2017, made adaptive by replacing ``S`` with ``r``).
* ``linear``: ``S`` (Goyal et al. 2017); ``sqrt``: ``sqrt(S)``; ``none``: 1.
* ``auto``: ``adascale`` for the SGD optimizers, ``adamscale`` for the Adam family.

Progress: a step of batch ``M`` is worth ``r`` steps of ``M0``. Counting ``sum(r)`` ("scale-invariant
iterations", AdaScale's ``tau``) lets learning-rate schedules and epoch ends written for ``M0`` stay valid
while the batch size changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from plait.errors import PlaitError

LR_SCALING_RULES = ("none", "linear", "sqrt", "adascale", "adamscale", "auto")
SGD_OPTIMIZERS = ("sgd", "sgd_nomomentum")  # the plan's optimizer names (plait.runtime.optim.OPTIMIZERS)
ADAM_OPTIMIZERS = ("adam", "adamw")


def resolve_lr_scaling(rule: str, optimizer: str) -> str:
    """The concrete rule for a plan's ``lr_scaling`` and optimizer name (``auto`` picks by optimizer)."""
    if rule not in LR_SCALING_RULES:
        raise PlaitError(f"unknown learning-rate scaling {rule!r}; use one of {', '.join(LR_SCALING_RULES)}")
    if rule != "auto":
        return rule
    if optimizer in SGD_OPTIMIZERS:
        return "adascale"
    if optimizer in ADAM_OPTIMIZERS:
        return "adamscale"
    raise PlaitError(f"lr_scaling 'auto' knows the optimizers {', '.join(SGD_OPTIMIZERS + ADAM_OPTIMIZERS)}, "
                     f"not {optimizer!r}; name a rule ({', '.join(LR_SCALING_RULES[:-1])})")


def lr_factor(rule: str, *, scale: float, gain: float) -> float:
    """Factor on the initial learning rate for a batch ``scale`` x the initial one with AdaScale gain ``gain``."""
    if not (math.isfinite(scale) and scale > 0):
        raise PlaitError(f"scale (batch / initial batch) is {scale}; it must be positive")
    if not (math.isfinite(gain) and gain > 0):
        raise PlaitError(f"gain is {gain}; an AdaScale gain is a positive number (1 <= gain <= scale)")
    factors = {"none": 1.0, "linear": scale, "sqrt": math.sqrt(scale), "adascale": gain, "adamscale": math.sqrt(gain)}
    if rule not in factors:
        raise PlaitError(f"learning-rate scaling {rule!r} has no factor; use one of {', '.join(factors)} "
                         "(resolve 'auto' with resolve_lr_scaling first)")
    return factors[rule]


@dataclass(kw_only=True)
class Progress:
    """Training progress in scale-invariant iterations: each step adds its AdaScale gain."""

    iterations: float = 0.0  # sum of gains: equivalent steps of the initial batch
    steps: int = 0  # optimizer steps taken

    def add(self, gain: float) -> float:
        """Count one optimizer step worth ``gain`` initial-batch steps; the new total."""
        if not (math.isfinite(gain) and gain > 0):
            raise PlaitError(f"gain is {gain}; a step's progress must be a positive number of iterations")
        self.iterations += gain
        self.steps += 1
        return self.iterations

    def samples(self, init_batch_size: float) -> float:
        """Progress in initial-batch samples (scale-invariant iterations x ``M0``)."""
        return self.iterations * init_batch_size

    def epochs(self, init_batch_size: float, dataset_size: int) -> float:
        """Statistical epochs done: ``iterations x M0 / dataset_size`` (AdaptDL ends an epoch at each whole number)."""
        if dataset_size <= 0:
            raise PlaitError(f"dataset_size is {dataset_size}; it must be a positive number of samples")
        return self.samples(init_batch_size) / dataset_size

    def state_dict(self) -> dict[str, Any]:
        """The counters, for a checkpoint."""
        return {"iterations": self.iterations, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.iterations = float(state["iterations"])
        self.steps = int(state["steps"])
