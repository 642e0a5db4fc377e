"""What re-planning a job for another number of devices reuses from its earlier planning, in memory.

A resize changes the device count and nothing else of the request (``plait.planners.request``), so the model's
captures (its layer view and joint forward+backward graph at a per-rank batch) and the intra-op ILP's choice per
tensor-parallel size (``plait.planners.pipeline_plan.sharded_layers``: a model axis inside one node) stay valid as
long as the per-rank batch and the node's kind do. A ``ReplanCache`` keeps one ``ModelSource`` per (model, per-rank
batch, autocast); the source keeps its captures and the ILP results (``ModelSource.kept``, keyed by ``cost_key``).
A re-plan given the cache then runs only what depends on the device count: the stage search and the weighing of
the candidates. The results are the same as a cold plan's (tests/planners/test_replan_cache.py).

The cache lives in memory only: a restarted launcher warms a new one (``Replanner.warm``). Writing it to disk
would mean pickling torch modules and FX graphs, and loading a pickle runs code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from plait.cost import CostModel
from plait.plan.ir import PrecisionPolicy
from plait.planners.intra_op.source import ModelSource

MAX_SOURCES = 4  # (model, per-rank batch) sources kept; the least recently used goes first


def cost_key(cost: CostModel) -> Hashable:
    """What ``cost`` prices inside one node from: its cluster but for the node count and name, its measured profile
    and the ranks computing at once. Clusters of more or fewer nodes of one kind share it."""
    cluster = replace(cost.cluster, name="", num_nodes=1, profile=None)
    return repr(cluster), cost.profile, cost.concurrency


def batch_rows(batch: Any) -> int:
    """The batch size of an example batch, as ``capture`` reads it: the first tensor's leading dimension."""
    inputs = batch if isinstance(batch, tuple | list) else (batch,)
    first = next(x for x in inputs if isinstance(x, torch.Tensor))
    return int(first.shape[0]) if first.dim() > 0 else 1


@dataclass
class ReplanCache:
    """The model sources of a job's plannings, kept across its re-plans (see the module docstring); one planning at a
    time uses it (``plait.planners.request.Replanner`` holds a lock)."""

    max_sources: int = MAX_SOURCES
    made: int = 0  # sources made (each captures its model once)
    reused: int = 0  # sources found made
    _sources: OrderedDict[tuple[str, int, str | None], ModelSource] = field(default_factory=OrderedDict, repr=False)

    def source(self, model: str, per_rank: int, policy: PrecisionPolicy) -> ModelSource:
        """The source of zoo model or factory ``model`` captured at ``per_rank`` samples per rank under ``policy``."""
        from plait.planners.request import resolve_module

        autocast = policy.compute_dtype if policy.mixed else None
        key = (model, per_rank, autocast)
        if key in self._sources:
            self.reused += 1
            self._sources.move_to_end(key)
            return self._sources[key]
        module, batch, loss_fn, name = resolve_module(model, per_rank)
        self._sources[key] = ModelSource(model=module, example_batch=batch, batch_size=batch_rows(batch), loss_fn=loss_fn,
                                         name=name, autocast=autocast)
        self.made += 1
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        return self._sources[key]

    def clear(self) -> None:
        """Forget every source (their captures and ILP results)."""
        self._sources.clear()
