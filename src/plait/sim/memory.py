"""Memory per device: the state the plan's placements imply plus the live trace of the program's allocations."""

from __future__ import annotations

from collections.abc import Sequence

from plait.cost.memory import batch_bytes, state_bytes
from plait.plan.ir import Plan
from plait.plan.layout import shard_axis_of
from plait.sim.trace import Event


def resident_bytes(plan: Plan) -> int:
    """What a device holds for the whole step: parameters, optimizer state, module buffers, the batch, and the
    gradients when they are replicated buckets (sharded gradients are in the program: made by each unit's
    reduce-scatter, dropped after the optimizer step)."""
    params, grads, optimizer = state_bytes(plan)
    held_grads = grads if shard_axis_of(plan) is None else 0
    return params + held_grads + optimizer + plan.model.buffer_bytes + batch_bytes(plan)


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
