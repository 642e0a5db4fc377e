"""Memory per device: static state from the cost model plus the live trace of the program's allocations."""

from __future__ import annotations

from collections.abc import Sequence

from plait.cost import memory_estimate
from plait.plan.ir import MemoryEstimate, Plan
from plait.sim.trace import Event


def shard_degree(plan: Plan) -> int:
    """Number of ranks each parameter is sharded over (1 when replicated)."""
    axis = plan.data_parallel.shard_axis
    return plan.mesh.axis_size(axis) if axis else 1


def static_memory(plan: Plan) -> MemoryEstimate:
    """The cost model's memory estimate for the plan's data-parallel kind, shard degree and micro-batch."""
    return memory_estimate(
        plan.model,
        kind=plan.data_parallel.kind,
        shard_degree=shard_degree(plan),
        micro_batch=plan.batch.micro_size,
        optimizer=plan.optimizer,
        device_kind=plan.cluster.device.kind,
    )


def resident_bytes(plan: Plan, static: MemoryEstimate) -> int:
    """What a device holds for the whole step: parameters, gradients, optimizer state and module buffers."""
    return static.params + static.grads + static.optimizer + plan.model.buffer_bytes


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
