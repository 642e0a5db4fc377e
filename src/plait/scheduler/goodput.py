"""Pollux's per-job goodput model, as the scheduler uses it.

The one implementation lives in ``plait.adaptive`` (the scheduler depends on adaptive, never the other
way round): the step-time model in ``plait.adaptive.throughput`` and goodput, efficiency and the batch
search in ``plait.adaptive.goodput``. This module re-exports them under the scheduler's names.
"""

from __future__ import annotations

from plait.adaptive.goodput import (
    NUM_BATCH_CANDIDATES,
    BatchLimits,
    GoodputModel,
    GradParams,
    candidate_configs,
    efficiency,
    fixed_batch_config,
)
from plait.adaptive.throughput import (
    FloatArray,
    IntArray,
    PerfParams,
    grad_time,
    iteration_time,
    log_sync_step_time,
    sync_time,
)

__all__ = [
    "NUM_BATCH_CANDIDATES",
    "BatchLimits",
    "FloatArray",
    "GoodputModel",
    "GradParams",
    "IntArray",
    "PerfParams",
    "candidate_configs",
    "efficiency",
    "fixed_batch_config",
    "grad_time",
    "iteration_time",
    "log_sync_step_time",
    "sync_time",
]
