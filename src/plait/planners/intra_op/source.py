"""The model a planner may capture again: its joint graph at the per-rank batch a candidate needs, kept once made."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from plait.graph.capture import capture
from plait.graph.joint import JointGraph, capture_joint
from plait.graph.model_graph import ModelGraph

T = TypeVar("T")


def with_batch_size(batch: Any, old: int, new: int) -> Any:
    """``batch`` with every tensor whose leading dimension is ``old`` replaced by an empty meta tensor of ``new`` rows."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() > 0 and batch.shape[0] == old:
            return torch.empty((new, *batch.shape[1:]), dtype=batch.dtype, device="meta")
        return batch
    if isinstance(batch, tuple | list):
        return type(batch)(with_batch_size(b, old, new) for b in batch)
    return batch


@dataclass
class ModelSource:
    """A model with an example batch (``batch_size`` rows) and its loss, to capture at other batch sizes."""

    model: nn.Module
    example_batch: Any
    batch_size: int
    loss_fn: Callable[..., Any] | None = None
    name: str | None = None
    autocast: str | None = None  # the compute dtype of mixed precision ("bf16"): captures run under autocast
    _joints: dict[int, JointGraph] = field(default_factory=dict)
    _graphs: dict[int, ModelGraph] = field(default_factory=dict)
    _kept: dict[Hashable, Any] = field(default_factory=dict)  # results derived from this model (see ``kept``)

    def batch(self, batch_size: int) -> Any:
        """The example batch at ``batch_size`` rows (meta tensors)."""
        return with_batch_size(self.example_batch, self.batch_size, batch_size)

    def graph(self, batch_size: int) -> ModelGraph:
        """The layer view at ``batch_size`` rows per rank (captured once per size)."""
        if batch_size not in self._graphs:
            self._graphs[batch_size] = capture(self.model, self.batch(batch_size), name=self.name, loss_fn=self.loss_fn,
                                               with_ops=False, autocast=self.autocast)
        return self._graphs[batch_size]

    def joint(self, batch_size: int) -> JointGraph:
        """The joint graph with boundary markers at ``batch_size`` rows per rank (captured once per size)."""
        if batch_size not in self._joints:
            self._joints[batch_size] = capture_joint(self.model, self.batch(batch_size), loss_fn=self.loss_fn, name=self.name,
                                                     markers=True, autocast=self.autocast)
        return self._joints[batch_size]

    def kept(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``'s result for ``key``, made once per source: a planner result that depends only on this model and
        what ``key`` names (a source kept across re-plans reuses it, see ``plait.planners.replan_cache``)."""
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]
