"""The torch optimizer a plan names: ``Plan.optimizer`` is also the state the planner's memory estimate counts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_nomomentum")  # the names plait.cost.memory.OPTIMIZER_STATES knows


def build_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    momentum: float,
) -> torch.optim.Optimizer:
    """AdamW, Adam, SGD with ``momentum`` or SGD without, for a name in ``OPTIMIZERS`` (check_plan checks it)."""
    if name in ("sgd", "sgd_nomomentum"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum if name == "sgd" else 0.0, weight_decay=weight_decay)
    adam = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[name]
    return adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str | None:
    """The plan's name for a torch AdamW, Adam or SGD (by its momentum); None for any other optimizer."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return "sgd" if optimizer.defaults.get("momentum") else "sgd_nomomentum"
    return {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam"}.get(kind)
