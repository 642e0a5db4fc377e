"""Memory per device: the state the plan's placements imply plus the live trace of the program's allocations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from plait.cost.memory import batch_bytes, state_bytes
from plait.plan.ir import Plan
from plait.plan.layout import shard_axis_of
from plait.sim.trace import Event


def resident_bytes(plan: Plan) -> int:
    """What a device holds for the whole step: parameters, optimizer state, module buffers, the batch, and the
    gradients when they live in the buckets of a replicated data-parallel axis. Other gradients are in the
    program: sharded ones made by each unit's reduce-scatter, those of a rank without buckets (no
    data-parallel replicas) by each layer's backward; ``zero_grad(set_to_none=True)`` drops both after the
    optimizer step."""
    params, grads, optimizer = state_bytes(plan)
    held_grads = grads if has_buckets(plan) else 0
    return params + held_grads + optimizer + plan.model.buffer_bytes + batch_bytes(plan)


def resident_by_rank(plan: Plan) -> tuple[int, ...]:
    """``resident_bytes`` of every rank: the same on every rank of an SPMD plan; in a pipeline, each stage's
    ranks hold their stage's parameters, gradients and optimizer state (plus the module buffers and the batch)."""
    if not plan.is_pipeline:
        return (resident_bytes(plan),) * plan.world_size
    out = [0] * plan.world_size
    for ranks in {stage.ranks for stage in plan.stages}:
        params, grads, optimizer = stage_state_bytes(plan, ranks[0])
        for rank in ranks:
            out[rank] = params + grads + optimizer + plan.model.buffer_bytes + batch_bytes(plan)
    return tuple(out)


def stage_state_bytes(plan: Plan, rank: int) -> tuple[int, int, int]:
    """Parameters, gradients and optimizer state pipeline rank ``rank`` holds between steps: its stages'."""
    mine = {stage.index for stage in plan.stages_of(rank)}
    return state_bytes(replace(plan, params=tuple(p for p in plan.params if p.stage in mine)))


def has_buckets(plan: Plan) -> bool:
    """Whether gradients live in flat bucket buffers for the whole step (replicated data parallelism)."""
    return shard_axis_of(plan) is None and plan.dp_degree > 1


def memory_trace(events: Sequence[Event]) -> tuple[tuple[tuple[float, int], ...], int]:
    """Live dynamic bytes over time and their peak.

    ``alloc_bytes`` counts from an instruction's start, ``free_bytes`` (and a negative ``alloc_bytes``)
    until its end; at equal times frees come first, so memory handed back is reused at once.
    """
    changes: list[tuple[float, int, int]] = []  # (time, 0 = free / 1 = alloc, delta)
    for ev in events:
        if ev.alloc_bytes > 0:
            changes.append((ev.start, 1, ev.alloc_bytes))
        elif ev.alloc_bytes < 0:
            changes.append((ev.end, 0, ev.alloc_bytes))
        if ev.free_bytes:
            changes.append((ev.end, 0, -ev.free_bytes))
    changes.sort(key=lambda c: (c[0], c[1]))
    live, peak = 0, 0
    trace: list[tuple[float, int]] = []
    for time, _, delta in changes:
        live += delta
        peak = max(peak, live)
        trace.append((time, live))
    return tuple(trace), peak
