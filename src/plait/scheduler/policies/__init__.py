"""Cluster scheduling policies: Pollux, Optimus(+oracle), Tiresias and FIFO, by name."""

from __future__ import annotations

from plait.scheduler.decisions import Policy, SchedulerError
from plait.scheduler.policies.base import JobMode
from plait.scheduler.policies.fifo import FifoPolicy
from plait.scheduler.policies.optimus import OptimusPolicy
from plait.scheduler.policies.pollux import PolluxPolicy
from plait.scheduler.policies.tiresias import TiresiasPolicy

POLICY_NAMES = ("pollux", "optimus", "tiresias", "fifo")


def make_policy(name: str, *, seed: int = 0) -> Policy:
    """A fresh policy by name (``pollux`` is seeded with ``seed``)."""
    key = name.strip().lower()
    if key == "pollux":
        return PolluxPolicy(seed=seed)
    if key == "optimus":
        return OptimusPolicy()
    if key == "tiresias":
        return TiresiasPolicy()
    if key == "fifo":
        return FifoPolicy()
    raise SchedulerError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


__all__ = ["POLICY_NAMES", "FifoPolicy", "JobMode", "OptimusPolicy", "PolluxPolicy", "TiresiasPolicy",
           "make_policy"]
