"""The lowering entry point: a plan's step program from its placements and per-layer work."""

from __future__ import annotations

from collections.abc import Sequence

from plait.cost.work import LayerWork
from plait.graph.model_graph import DTYPE_BYTES, ModelGraph
from plait.plan.ir import Plan, RankProgram
from plait.plan.layout import local_numel, shard_axis_of
from plait.planners.lowering import OptimizerShape, lower_replicate
from plait.planners.lowering_fsdp import lower_sharded


def optimizer_shape(plan: Plan, graph: ModelGraph) -> OptimizerShape:
    """What one rank's optimizer step updates under the plan's placements."""
    sizes = []
    numel = 0
    info = {p.name: p for p in graph.params}
    for p in plan.params:
        param = info[p.name]
        n = local_numel(param.shape, p.placements, plan.mesh)
        numel += n
        sizes.append(n * DTYPE_BYTES.get(plan.precision.param_dtype, 4))
    return OptimizerShape(numel=numel, num_tensors=len(plan.params), largest_bytes=max(sizes, default=0), total_bytes=sum(sizes))


def lower_program(plan: Plan, graph: ModelGraph, work: Sequence[LayerWork]) -> RankProgram:
    """The step program of ``plan`` (one list shared by every rank of an SPMD step)."""
    state = optimizer_shape(plan, graph)
    axis = shard_axis_of(plan)
    if axis is None:
        return lower_replicate(plan, work, state)
    return lower_sharded(plan, work, state, axis)
