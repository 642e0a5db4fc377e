"""Pipeline schedules as per-stage action lists: GPipe, 1F1B and interleaved 1F1B.

A schedule gives each pipeline rank (``stage``) the order in which it runs forward (``F``) and backward
(``B``) passes of micro-batches on its model chunks. With ``v`` chunks per rank (interleaved 1F1B, as in
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
    """One pass: ``F`` or ``B`` of micro-batch ``micro`` on the rank's model chunk ``chunk``."""

    kind: Literal["F", "B"]
    micro: int
    chunk: int = 0


def _check(num_stages: int, num_micro: int) -> None:
    if num_stages < 1 or num_micro < 1:
        raise PlaitError(f"a pipeline needs at least one stage and one micro-batch, got {num_stages} and {num_micro}")


def gpipe(num_stages: int, num_micro: int) -> Schedule:
    """Every forward, then every backward (GPipe): holds all ``num_micro`` micro-batches' activations."""
    _check(num_stages, num_micro)
    one = tuple(Action("F", m) for m in range(num_micro)) + tuple(Action("B", m) for m in range(num_micro))
    return tuple(one for _ in range(num_stages))


def one_f_one_b(num_stages: int, num_micro: int) -> Schedule:
    """1F1B (PipeDream-Flush): stage ``i`` runs ``p - i - 1`` warm-up forwards, then alternates one forward
    and one backward, then drains; it never holds more than ``p - i`` micro-batches."""
    _check(num_stages, num_micro)
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
    _check(num_stages, num_micro)
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
    """The most micro-batches (per chunk) whose forward has run and backward has not, at any point."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak


def timed(schedule: Schedule, fwd_s: float, bwd_s: float) -> tuple[float, list[list[tuple[float, float]]]]:
    """Run ``schedule`` with every forward taking ``fwd_s`` and every backward ``bwd_s`` (per chunk), free
    transfers: the makespan and each stage's (start, end) per action. ``PlaitError`` on a deadlock."""
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
                needs = [("F", a.micro, v - 1)] if a.kind == "F" and v > 0 else []
                if a.kind == "B":
                    needs = [("F", a.micro, v)] + ([("B", a.micro, v + 1)] if v < last else [])
                if any(n not in done for n in needs):
                    break
                start = max([clock[stage], *(done[n] for n in needs)])
                end = start + (fwd_s if a.kind == "F" else bwd_s)
                done[(a.kind, a.micro, v)] = end
                clock[stage] = end
                spans[stage].append((start, end))
                heads[stage] += 1
                progressed = True
        if not progressed:
            raise PlaitError("the schedule deadlocks: a stage waits for a pass no stage can run")
    return max(clock), spans
