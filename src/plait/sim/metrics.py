"""Step time, busy time, exposed communication and peak memory from simulated timelines."""

from __future__ import annotations

from collections.abc import Sequence

from plait.cost.memory import state_bytes
from plait.plan.ir import MemoryEstimate, Plan, Prediction
from plait.sim.memory import stage_state_bytes
from plait.sim.trace import Event, ProgramTrace


def busy_intervals(events: Sequence[Event], stream: str) -> list[tuple[float, float]]:
    """Merged intervals during which ``stream`` runs something (zero-length instructions dropped)."""
    spans = sorted((e.start, e.end) for e in events if e.stream == stream and e.end > e.start)
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def total_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Summed length of disjoint intervals."""
    return sum(end - start for start, end in intervals)


def uncovered_length(spans: Sequence[tuple[float, float]], cover: Sequence[tuple[float, float]]) -> float:
    """Length of ``spans`` not covered by ``cover`` (both sorted and disjoint)."""
    total, j = 0.0, 0
    for start, end in spans:
        covered = 0.0
        while j < len(cover) and cover[j][1] <= start:
            j += 1
        k = j
        while k < len(cover) and cover[k][0] < end:
            covered += min(end, cover[k][1]) - max(start, cover[k][0])
            k += 1
        total += (end - start) - covered
    return total


def step_time(trace: ProgramTrace) -> float:
    """When the program's last instruction ends."""
    return max((e.end for e in trace.events), default=0.0)


def exposed_comm(trace: ProgramTrace) -> float:
    """Communication time during which the compute stream is idle."""
    return uncovered_length(busy_intervals(trace.events, "comm"), busy_intervals(trace.events, "compute"))


def activations_of(trace: ProgramTrace) -> int:
    """What the forward of the first micro-batch allocates: the activations one micro-batch keeps."""
    return sum(e.alloc_bytes for e in trace.events if e.op == "compute" and _first_forward(e.name))


def _first_forward(name: str) -> bool:
    """An SPMD program's ``fwd[0] ...`` or a pipeline's ``fwd v<stage> mb0`` (every slice ``fwd v<stage> mb0 s<j>`` of
    it in a token pipeline)."""
    return name.startswith("fwd[0]") or (name.startswith("fwd v") and (name.endswith(" mb0") or " mb0 s" in name))


def prediction_of(plan: Plan, traces: Sequence[ProgramTrace], resident: Sequence[int]) -> Prediction:
    """The Prediction of a simulated plan: the slowest program sets the step; memory per rank.

    ``resident[r]`` is what rank ``r`` holds for the whole step (``sim.memory.resident_by_rank``); a rank's
    peak adds its program's dynamic peak. ``memory`` describes the rank with the highest peak: its state
    (parameters, gradients, optimizer state), the activations one micro-batch keeps, and as buffers the rest
    of its peak (module buffers, the batch, gathered units, optimizer temporaries), so ``memory.total`` is the
    worst peak. In a pipeline ``bubble_fraction`` is the share of the step the ranks' compute stands idle.
    """
    slowest = max(traces, key=step_time)
    peaks = [0] * plan.world_size
    for trace in traces:
        for rank in trace.ranks:
            if rank < len(peaks):
                peaks[rank] = resident[rank] + trace.peak_dynamic_bytes
    top = max(range(len(peaks)), key=lambda r: peaks[r])
    worst = next((t for t in traces if top in t.ranks), traces[0])
    params, grads, optimizer = _state_of(plan, top)
    activations = min(activations_of(worst), worst.peak_dynamic_bytes)
    peak = peaks[top]
    memory = MemoryEstimate(  # buffers: the rest of the peak (gradients a program makes are not counted twice)
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        buffers=max(0, peak - params - grads - optimizer - activations),
    )
    step = step_time(slowest)
    return Prediction(
        step_s=step,
        compute_s=max(total_length(busy_intervals(t.events, "compute")) for t in traces),
        comm_s=max(total_length(busy_intervals(t.events, "comm")) for t in traces),
        exposed_comm_s=max(exposed_comm(t) for t in traces),
        peak_memory_bytes=tuple(peaks),
        memory=memory,
        bubble_fraction=bubble_fraction(traces, step) if plan.is_pipeline else 0.0,
    )


def _state_of(plan: Plan, rank: int) -> tuple[int, int, int]:
    """The state ``rank`` holds: its stage's in a pipeline, the plan's otherwise."""
    if not plan.is_pipeline:
        return state_bytes(plan)
    return stage_state_bytes(plan, rank)


def bubble_fraction(traces: Sequence[ProgramTrace], step: float) -> float:
    """Share of the step during which a rank's compute is idle, averaged over ranks."""
    if step <= 0:
        return 0.0
    ranks = sum(len(t.ranks) for t in traces)
    busy = sum(len(t.ranks) * total_length(busy_intervals(t.events, "compute")) for t in traces)
    return max(0.0, 1.0 - busy / (ranks * step))
