"""Pipeline schedules as per-stage action lists: GPipe, 1F1B and interleaved 1F1B (the zero-bubble schedule
is in ``plait.planners.zero_bubble``).

A schedule gives each pipeline rank (``stage``) the order in which it runs forward (``F``) and backward
(``B``) passes of micro-batches on its model chunks; a backward may also run as two passes, the gradient of
its input (``I``) and then of its weights (``W``). With ``v`` chunks per rank (interleaved 1F1B, as in
Megatron-LM, SC'21) virtual stage ``chunk * p + stage`` holds the chunk, so a micro-batch visits ranks
0..p-1 once per chunk. ``timed`` runs the lists with given pass times and the dependencies of the pipeline
(a forward after the same micro-batch's forward on the previous virtual stage, a backward after the next
virtual stage's backward and its own forward) -- the closed forms the stage DP relies on hold on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.errors import PlaitError

Schedule = tuple[tuple["Action", ...], ...]  # per stage, in run order


@dataclass(frozen=True)
class Action:
    """One pass of micro-batch ``micro`` on the rank's model chunk ``chunk``: forward ``F``, backward ``B``, or
    the backward's two halves, input gradient ``I`` and weight gradient ``W``."""

    kind: Literal["F", "B", "I", "W"]
    micro: int
    chunk: int = 0


def check_schedule_size(num_stages: int, num_micro: int) -> None:
    """Raise ``PlaitError`` unless there is at least one stage and one micro-batch."""
    if num_stages < 1 or num_micro < 1:
        raise PlaitError(f"a pipeline needs at least one stage and one micro-batch, got {num_stages} and {num_micro}")


def gpipe(num_stages: int, num_micro: int) -> Schedule:
    """Every forward, then every backward (GPipe): holds all ``num_micro`` micro-batches' activations."""
    check_schedule_size(num_stages, num_micro)
    one = tuple(Action("F", m) for m in range(num_micro)) + tuple(Action("B", m) for m in range(num_micro))
    return tuple(one for _ in range(num_stages))


def one_f_one_b(num_stages: int, num_micro: int) -> Schedule:
    """1F1B (PipeDream-Flush): stage ``i`` runs ``p - i - 1`` warm-up forwards, then alternates one forward
    and one backward, then drains; it never holds more than ``p - i`` micro-batches."""
    check_schedule_size(num_stages, num_micro)
    out = []
    for stage in range(num_stages):
        warm = min(num_stages - stage - 1, num_micro)
        acts = [Action("F", m) for m in range(warm)]
        for k in range(num_micro - warm):
            acts += [Action("F", warm + k), Action("B", k)]
        acts += [Action("B", m) for m in range(num_micro - warm, num_micro)]
        out.append(tuple(acts))
    return tuple(out)


def interleaved_1f1b(num_stages: int, num_micro: int, chunks: int) -> Schedule:
    """Interleaved 1F1B with ``chunks`` model chunks per rank (Megatron-LM): micro-batches go through the
    chunks in groups of ``p``; bubble ``(p - 1) / (chunks * m)`` of the ideal time. Needs ``m % p == 0``."""
    check_schedule_size(num_stages, num_micro)
    if chunks < 1:
        raise PlaitError(f"chunks per rank must be at least 1, got {chunks}")
    if chunks > 1 and num_micro % num_stages:
        raise PlaitError(f"interleaved 1F1B needs the micro-batches ({num_micro}) to be a multiple of the stages "
                         f"({num_stages}); use {num_micro + (-num_micro) % num_stages} micro-batches or plain 1F1B")
    p, total = num_stages, num_micro * chunks

    def forward(k: int) -> Action:
        group, within = divmod(k, p * chunks)
        return Action("F", group * p + within % p, (k // p) % chunks)

    def backward(k: int) -> Action:
        group, within = divmod(k, p * chunks)
        return Action("B", group * p + within % p, chunks - 1 - (k // p) % chunks)

    out = []
    for stage in range(p):
        warm = min(total, (p - stage - 1) * 2 + (chunks - 1) * p)
        acts = [forward(k) for k in range(warm)]
        for k in range(total - warm):
            acts += [forward(warm + k), backward(k)]
        acts += [backward(k) for k in range(total - warm, total)]
        out.append(tuple(acts))
    return tuple(out)


def peak_in_flight(actions: tuple[Action, ...]) -> int:
    """The most micro-batches (per chunk) whose forward has run and backward (its ``W`` when split) has not."""
    live = peak = 0
    for a in actions:
        live += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
        peak = max(peak, live)
    return peak


def needs(a: Action, v: int, last: int) -> list[tuple[str, int, int]]:
    """The passes (kind, micro, virtual stage) action ``a`` on virtual stage ``v`` waits for."""
    if a.kind == "F":
        return [("F", a.micro, v - 1)] if v > 0 else []
    if a.kind == "W":
        return [("I", a.micro, v)]
    after = [(_GRAD, a.micro, v + 1)] if v < last else []
    return [("F", a.micro, v), *after]


_GRAD = "grad"  # a B or I pass: either sends the gradient back to the previous stage


def timed(schedule: Schedule, fwd_s: float, bwd_s: float) -> tuple[float, list[list[tuple[float, float]]]]:
    """Run ``schedule`` with every forward taking ``fwd_s`` and every backward ``bwd_s`` (per chunk; ``I`` and
    ``W`` half of it each), free transfers: the makespan and each stage's (start, end) per action.
    ``PlaitError`` on a deadlock."""
    p = len(schedule)
    chunks = 1 + max(a.chunk for acts in schedule for a in acts)
    last = chunks * p - 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, micro, virtual stage) -> end time
    clock = [0.0] * p
    heads = [0] * p
    spans: list[list[tuple[float, float]]] = [[] for _ in range(p)]
    while any(h < len(acts) for h, acts in zip(heads, schedule, strict=True)):
        progressed = False
        for stage, acts in enumerate(schedule):
            while heads[stage] < len(acts):
                a = acts[heads[stage]]
                v = a.chunk * p + stage
                waits = needs(a, v, last)
                if any(n not in done for n in waits):
                    break
                start = max([clock[stage], *(done[n] for n in waits)])
                end = start + {"F": fwd_s, "B": bwd_s}.get(a.kind, bwd_s / 2)
                done[(a.kind, a.micro, v)] = end
                if a.kind in ("B", "I"):
                    done[(_GRAD, a.micro, v)] = end
                clock[stage] = end
                spans[stage].append((start, end))
                heads[stage] += 1
                progressed = True
        if not progressed:
            raise PlaitError("the schedule deadlocks: a stage waits for a pass no stage can run")
    return max(clock), spans
