"""Lower a pipeline schedule into per-rank instruction lists the simulator (and later the runtime) executes.

Each pipeline stage is one ``RankProgram`` shared by the ranks of its submesh. For every action of the
schedule it gets: a forward that first receives its input activation from the previous virtual stage
(none on the first), computes (holding the micro-batch's saved activations) and sends its output on; a
backward that receives the output gradient from the next virtual stage (none on the last), computes
(freeing the saved activations) and sends the input gradient back; then the gradient all-reduce over the stage's ranks (when it has several) and the optimizer step. Transfers are
non-blocking sends and receives between the stages' first ranks, named by the boundary, direction and
micro-batch, so the simulator pairs them. Besides its saved activations a stage holds each in-flight
micro-batch's output (kept for its backward) and, during a backward, the gradient it received.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from plait.errors import PlaitError
from plait.plan.ir import Instr, RankProgram
from plait.planners.schedules import Action, Schedule


@dataclass(frozen=True, kw_only=True)
class StageWork:
    """One virtual stage's work for one micro-batch (the layers of one model chunk on its submesh)."""

    fwd_flops: float
    bwd_flops: float
    fwd_bytes_moved: float = 0.0
    num_kernels: int = 1
    bwd_bytes_moved: float = 0.0
    bwd_kernels: int = 2
    activation_bytes: int = 0  # saved from forward until backward, per micro-batch
    boundary_bytes: int = 0  # the output activation sent to the next virtual stage (its gradient comes back)
    transient_bytes: int = 0  # held only while the backward runs (input and loss gradients, a recomputed layer)


def lower_pipeline(schedule: Schedule, work: Sequence[StageWork], stage_ranks: Sequence[tuple[int, ...]], *,
                   optimizer_numel: Sequence[int] | None = None,
                   sync_bytes: Sequence[int] | None = None,
                   step_temp_bytes: Sequence[int] | None = None) -> tuple[RankProgram, ...]:
    """Per-stage programs for ``schedule``; ``work[v]`` is virtual stage ``v = chunk * p + stage``;
    ``sync_bytes[stage]`` the gradients its ranks all-reduce, ``optimizer_numel[stage]`` what they update and
    ``step_temp_bytes[stage]`` the temporaries their optimizer step makes."""
    p = len(schedule)
    if len(stage_ranks) != p:
        raise PlaitError(f"the schedule has {p} stages but {len(stage_ranks)} rank groups were given")
    chunks = 1 + max(a.chunk for acts in schedule for a in acts)
    if len(work) != chunks * p:
        raise PlaitError(f"{p} stages x {chunks} chunks need {chunks * p} stage works, got {len(work)}")
    programs = []
    for stage, actions in enumerate(schedule):
        instrs: list[Instr] = []
        for action in actions:
            _lower_action(instrs, action, stage, p, work, stage_ranks)
        ranks = tuple(stage_ranks[stage])
        sync = sync_bytes[stage] if sync_bytes is not None else 0
        if len(ranks) > 1 and sync > 0:
            instrs.append(Instr(op="collective", stream="comm", name=f"grad sync stage {stage}", phase="bwd",
                                collective="all_reduce", nbytes=sync, group=ranks, deps=(len(instrs) - 1,)))
        numel = optimizer_numel[stage] if optimizer_numel is not None else 0
        temp = step_temp_bytes[stage] if step_temp_bytes is not None else 0
        instrs.append(Instr(op="optimizer", stream="compute", name="optimizer step", phase="step", numel=numel,
                            deps=(len(instrs) - 1,), alloc_bytes=temp, free_bytes=temp))
        programs.append(RankProgram(ranks=tuple(stage_ranks[stage]), instrs=tuple(instrs)))
    return tuple(programs)


def _kept_output(w: StageWork, v: int, last: int) -> int:
    """The output a stage keeps from forward to backward to run its backward with the gradient it receives
    (torch's pipeline stages do); the last stage's output goes into the loss and is counted with it."""
    return w.boundary_bytes if v < last else 0


def _lower_action(instrs: list[Instr], a: Action, stage: int, p: int, work: Sequence[StageWork],
                  stage_ranks: Sequence[tuple[int, ...]]) -> None:
    v = a.chunk * p + stage
    last = len(work) - 1
    me = stage_ranks[stage][0]

    def rank_of(virtual: int) -> int:
        return stage_ranks[virtual % p][0]

    w = work[v]
    if a.kind == "F":
        deps: tuple[int, ...] = ()
        if v > 0:
            instrs.append(Instr(op="recv", stream="comm", name=f"act {v - 1}>{v} mb{a.micro}", phase="fwd",
                                nbytes=work[v - 1].boundary_bytes, group=(rank_of(v - 1), me)))
            deps = (len(instrs) - 1,)
        instrs.append(Instr(op="compute", stream="compute", name=f"fwd v{v} mb{a.micro}", phase="fwd", flops=w.fwd_flops,
                            bytes_moved=w.fwd_bytes_moved, num_kernels=w.num_kernels, deps=deps,
                            alloc_bytes=w.activation_bytes + _kept_output(w, v, last)))
        if v < last:
            instrs.append(Instr(op="send", stream="comm", name=f"act {v}>{v + 1} mb{a.micro}", phase="fwd",
                                nbytes=w.boundary_bytes, group=(me, rank_of(v + 1)), deps=(len(instrs) - 1,)))
        return
    deps = ()
    if v < last:
        instrs.append(Instr(op="recv", stream="comm", name=f"grad {v + 1}>{v} mb{a.micro}", phase="bwd",
                            nbytes=w.boundary_bytes, group=(rank_of(v + 1), me), alloc_bytes=w.boundary_bytes))
        deps = (len(instrs) - 1,)
    instrs.append(Instr(op="compute", stream="compute", name=f"bwd v{v} mb{a.micro}", phase="bwd", flops=w.bwd_flops,
                        bytes_moved=w.bwd_bytes_moved, num_kernels=w.bwd_kernels, deps=deps,
                        alloc_bytes=w.transient_bytes,
                        free_bytes=w.activation_bytes + w.transient_bytes + _kept_output(w, v, last) * 2))
    if v > 0:
        instrs.append(Instr(op="send", stream="comm", name=f"grad {v}>{v - 1} mb{a.micro}", phase="bwd",
                            nbytes=work[v - 1].boundary_bytes, group=(me, rank_of(v - 1)), deps=(len(instrs) - 1,)))
