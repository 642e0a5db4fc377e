"""Run a Plan's instruction programs against the CostModel: a timeline per program and a Prediction.

Each program has two in-order streams (compute and comm); on a cost model that does not overlap
communication with compute (CPU ranks) both run on one lane in program order, and the ranks of a node share
its cores (``plait.sim.shared_cores``: compute runs at the speed the profile measured for as many ranks
computing at once as compute at that moment). An instruction starts when its lane is free, its ``deps``
have finished and, for a collective that spans several programs, when every partner instruction (same
name) is ready too; then all partners run together. A transfer is
non-blocking, as pipeline runtimes post it (``isend``/``irecv``): a ``send`` runs as soon as its lane and
deps allow, whether or not the receiver is there yet, and the ``recv`` of the same name ends when both it
is posted and the send has ended, so two ranks that send to each other before receiving cannot deadlock.
Every instruction is timed from its own fields (the lowering puts a layer's FLOPs, bytes and kernels
on it), each distinct piece of work once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from plait.cost import CostModel
from plait.errors import PlaitError
from plait.plan.ir import Instr, Plan, Prediction, RankProgram
from plait.sim.memory import memory_trace, resident_by_rank
from plait.sim.metrics import prediction_of
from plait.sim.shared_cores import ScheduleError, SharedCoreSchedule, Timer
from plait.sim.trace import Event, ProgramTrace

_RENDEZVOUS = ("collective",)
_TRANSFERS = ("send", "recv")


class SimulationError(PlaitError):
    """A plan whose programs cannot be executed (bad deps, unmatched collectives, a deadlock)."""


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """What the simulator found: per-program timelines and the plan's Prediction."""

    traces: tuple[ProgramTrace, ...]
    prediction: Prediction
    static_bytes: int  # parameters, gradients, optimizer state and module buffers on the device that holds the most
    static_by_rank: tuple[int, ...] = ()  # the same per rank (they differ between pipeline stages)

    def trace_of(self, rank: int) -> ProgramTrace:
        """The trace of the program that ``rank`` runs."""
        for trace in self.traces:
            if rank in trace.ranks:
                return trace
        raise KeyError(f"rank {rank} runs no program in this result")

    def events_of(self, rank: int) -> tuple[Event, ...]:
        """Events of ``rank`` (start, end, stream, name), in program order."""
        return self.trace_of(rank).events


def instruction_time(instr: Instr, cost: CostModel, *, dtype: str = "fp32") -> float:
    """Seconds one instruction takes on the cost model (compute in ``dtype``, the model's dtype)."""
    if instr.op == "compute":
        return cost.compute_time(instr.flops, instr.bytes_moved, dtype=dtype, num_kernels=instr.num_kernels)
    if instr.op == "optimizer":
        return cost.optimizer_time(instr.numel, num_tensors=instr.num_kernels)
    if instr.op == "collective":
        if instr.collective is None:
            raise SimulationError(f"collective instruction {instr.name!r} names no collective op")
        return cost.collective_time(instr.collective, instr.nbytes, instr.group)  # type: ignore[arg-type]
    if instr.op in ("send", "recv"):
        if len(instr.group) != 2:
            raise SimulationError(f"{instr.op} {instr.name!r} needs group=(src, dst), got {instr.group}")
        return cost.p2p_time(instr.nbytes, instr.group[0], instr.group[1])
    return 0.0  # free, wait


def _work_of(instr: Instr) -> tuple[object, ...]:
    """What ``instruction_time`` reads: instructions equal in it take equal time (micro-batches repeat them)."""
    return (instr.op, instr.flops, instr.bytes_moved, instr.num_kernels, instr.numel, instr.collective, instr.nbytes, instr.group)


def _durations(plan: Plan, cost: CostModel) -> list[list[float]]:
    """Seconds of every instruction of every program, each distinct piece of work timed once."""
    seen: dict[tuple[object, ...], float] = {}
    durations = []
    for program in plan.programs:
        row = []
        for instr in program.instrs:
            key = _work_of(instr)
            if key not in seen:
                seen[key] = instruction_time(instr, cost, dtype=plan.precision.compute_dtype)
            row.append(seen[key])
        durations.append(row)
    return durations


def simulate(plan: Plan, cost: CostModel) -> SimResult:
    """Execute every program of ``plan`` against ``cost``; see the module docstring for the rules."""
    if not plan.programs:
        raise SimulationError("the plan has no programs to simulate; build it with a planner (`plait plan`)")
    for program in plan.programs:
        _validate(program)
    times = _schedule(plan.programs, _durations(plan, cost)) if cost.overlaps_comm else _schedule_shared(plan, cost)
    resident = resident_by_rank(plan)
    traces = []
    for program, (starts, ends) in zip(plan.programs, times, strict=True):
        events = tuple(
            Event(
                index=k,
                name=ins.name,
                op=ins.op,
                stream=ins.stream,
                phase=ins.phase,
                axes=ins.axes,
                start=starts[k],
                end=ends[k],
                alloc_bytes=ins.alloc_bytes,
                free_bytes=ins.free_bytes,
                label=ins.pass_label,
            )
            for k, ins in enumerate(program.instrs)
        )
        trace, peak = memory_trace(events)
        traces.append(ProgramTrace(ranks=program.ranks, events=events, memory=trace, peak_dynamic_bytes=peak))
    return SimResult(traces=tuple(traces), prediction=prediction_of(plan, traces, resident), static_bytes=max(resident),
                     static_by_rank=resident)


def _timer(plan: Plan, cost: CostModel) -> Timer:
    """Seconds of instruction ``k`` of program ``p`` with ``level`` ranks of its node computing at once (``None``:
    the cost model as it is); each distinct piece of work is timed once per level."""
    seen: dict[tuple[object, ...], float] = {}
    dtype = plan.precision.compute_dtype

    def time_of(p: int, k: int, level: int | None) -> float:
        instr = plan.programs[p].instrs[k]
        key = (*_work_of(instr), level)
        if key not in seen:
            seen[key] = instruction_time(instr, cost if level is None else cost.at_concurrency(level), dtype=dtype)
        return seen[key]

    return time_of


def _schedule_shared(plan: Plan, cost: CostModel) -> list[tuple[list[float], list[float]]]:
    """One lane per program, compute sharing each node's cores (``plait.sim.shared_cores``)."""
    nodes = [Counter(plan.cluster.node_of(r) for r in program.ranks) for program in plan.programs]
    try:
        return SharedCoreSchedule(plan.programs, _timer(plan, cost), nodes, cores=getattr(cost, "cores_per_node", None)).run()
    except ScheduleError as e:
        raise SimulationError(str(e)) from e


def _validate(program: RankProgram) -> None:
    for k, ins in enumerate(program.instrs):
        for d in ins.deps:
            if not 0 <= d < k:
                raise SimulationError(
                    f"instruction {k} ({ins.name!r}) depends on {d}; deps must point to earlier instructions"
                )


def _schedule(programs: Sequence[RankProgram], durations: list[list[float]]) -> list[tuple[list[float], list[float]]]:
    """List-schedule every program on its two streams; returns (starts, ends) per program."""
    lane = _lane
    queues = [{s: [k for k, i in enumerate(p.instrs) if lane(i) == s] for s in ("compute", "comm")} for p in programs]
    heads = [{"compute": 0, "comm": 0} for _ in programs]
    free_at = [{"compute": 0.0, "comm": 0.0} for _ in programs]
    starts = [[-1.0] * len(p.instrs) for p in programs]
    ends = [[-1.0] * len(p.instrs) for p in programs]
    by_name = [{i.name: k for k, i in enumerate(p.instrs) if i.op in (*_RENDEZVOUS, *_TRANSFERS)} for p in programs]
    owner = {r: q for q, p in enumerate(programs) for r in p.ranks}  # the program each rank runs
    remaining = sum(len(p.instrs) for p in programs)
    while remaining:
        progressed = False
        for pi in range(len(programs)):
            for stream in ("compute", "comm"):
                queue = queues[pi][stream]
                while heads[pi][stream] < len(queue):
                    k = queue[heads[pi][stream]]
                    parts = _ready_parts(pi, k, programs, queues, heads, ends, by_name, owner)
                    if parts is None:
                        break
                    start = max(max([free_at[q][lane(programs[q].instrs[j])]] + [ends[q][d] for d in programs[q].instrs[j].deps]) for q, j in parts)
                    arrival = _arrival(pi, k, programs, ends, by_name, owner)
                    sent = _arrival(pi, k, programs, starts, by_name, owner)  # a receive is busy from its send's start
                    for q, j in parts:
                        own = 0.0 if programs[q].instrs[j].op == "recv" else durations[q][j]  # the send moves the data
                        ends[q][j] = max(start + own, arrival)
                        starts[q][j] = min(max(start, sent), ends[q][j])  # waiting before the data moves is idle
                        free_at[q][lane(programs[q].instrs[j])] = ends[q][j]
                        heads[q][lane(programs[q].instrs[j])] += 1
                        remaining -= 1
                    progressed = True
        if not progressed:
            raise SimulationError(_deadlock_message(programs, queues, heads))
    return list(zip(starts, ends, strict=True))


def _ready_parts(
    pi: int,
    k: int,
    programs: Sequence[RankProgram],
    queues: list[dict[str, list[int]]],
    heads: list[dict[str, int]],
    ends: list[list[float]],
    by_name: list[dict[str, int]],
    owner: dict[int, int],
) -> list[tuple[int, int]] | None:
    """The (program, index) pairs that run together with instruction ``k`` of program ``pi``, or None
    when one of them is not at the head of its stream or waits for a dependency."""
    ins = programs[pi].instrs[k]
    parts = [(pi, k)]
    if ins.op == "recv" and _arrival(pi, k, programs, ends, by_name, owner) < 0:
        return None  # the matching send has not run yet
    if ins.op in _RENDEZVOUS:
        for q in sorted({owner[r] for r in ins.group if r in owner} - {pi}):
            other = programs[q]
            if ins.name not in by_name[q]:
                raise SimulationError(
                    f"{ins.op} {ins.name!r} of ranks {programs[pi].ranks} spans ranks {other.ranks}, "
                    "whose program has no instruction of that name"
                )
            parts.append((q, by_name[q][ins.name]))
    for q, j in parts:
        partner = programs[q].instrs[j]
        queue = queues[q][partner.stream]
        if heads[q][partner.stream] >= len(queue) or queue[heads[q][partner.stream]] != j:
            return None
        if any(ends[q][d] < 0 for d in partner.deps):
            return None
    return parts


def _arrival(pi: int, k: int, programs: Sequence[RankProgram], ends: list[list[float]], by_name: list[dict[str, int]],
             owner: dict[int, int]) -> float:
    """When the data of receive ``k`` of program ``pi`` has arrived: its send's end in ``ends`` (its start when
    given the starts; -1 while the send has not run); 0 for any other instruction."""
    ins = programs[pi].instrs[k]
    if ins.op != "recv":
        return 0.0
    src = ins.group[0] if ins.group else None
    q = owner.get(src) if src is not None else None
    if q is not None and q != pi:
        j = by_name[q].get(ins.name)
        if j is None or programs[q].instrs[j].op != "send":
            raise SimulationError(f"recv {ins.name!r} of ranks {programs[pi].ranks} has no send of that name on rank {src}")
        return ends[q][j]
    raise SimulationError(f"recv {ins.name!r} of ranks {programs[pi].ranks} comes from rank {src}, which runs no program")


def _lane(instr: Instr) -> str:
    return instr.stream


def _deadlock_message(programs: Sequence[RankProgram], queues: list[dict[str, list[int]]], heads: list[dict[str, int]]) -> str:
    waiting = []
    for pi, program in enumerate(programs):
        for stream, queue in queues[pi].items():
            if heads[pi][stream] < len(queue):
                waiting.append(f"ranks {program.ranks} {stream}: {program.instrs[queue[heads[pi][stream]]].name!r}")
    return "the plan's programs deadlock; instructions waiting: " + "; ".join(waiting[:8])
