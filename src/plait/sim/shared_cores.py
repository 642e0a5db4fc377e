"""One-lane schedule of CPU ranks that share their node's cores.

A CPU rank runs its compute and its communication in program order on one lane (gloo's threads run on the
cores that compute, so the two take turns). The ranks of a node also share the node's cores: a compute or
optimizer instruction progresses at the speed the profile measured with as many ranks computing at once as
are computing at that moment on its node. A rank that waits for a transfer sleeps and uses no core, so in a
pipeline's bubbles the ranks that still compute run faster. Transfers take their own fixed times. A
collective's gloo threads need a core too (measured: a 512 KB all-reduce of a 2-way tensor-parallel pair took
3.1 ms on average while the other pair computed, against 1.27 ms with the pair alone): its ranks count as busy
in the level the compute of the node's other ranks runs at, and while the node has fewer cores than busy ranks
the collective stretches by busy ranks over the cores it had when the profile timed it with only its own ranks
busy (``max(cores, its ranks on the node)``; ``cores=None``: collectives take their fixed times, as on GPUs).
The schedule advances from event to event (an instruction ending), re-reading each running instruction's
speed in between: processor sharing, with the measured per-level rates.

Rendezvous rules are the list scheduler's (``plait.sim.engine``): a collective starts when every partner is
at it; a ``send`` runs on its own; the ``recv`` of the same name ends once it is posted and the send has
ended, and counts as busy only from the send's start.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from plait.plan.ir import RankProgram

# (program, instruction, ranks computing at once on its node, or None for instructions that use no core)
Timer = Callable[[int, int, int | None], float]

CORE_OPS = ("compute", "optimizer")  # instructions whose speed depends on how many ranks share the cores
_EPS = 1e-12


@dataclass
class _Running:
    """The instruction a program runs: ``left`` is the fraction of its work left (core work and collectives
    on shared cores) or its end time (fixed)."""

    index: int
    on_cores: bool
    left: float
    collective: bool = False


class ScheduleError(ValueError):
    """Programs that cannot run: a receive or collective without its partner, or a deadlock."""


class SharedCoreSchedule:
    """Processor-sharing schedule of one-lane programs; ``run()`` returns (starts, ends) per program."""

    def __init__(self, programs: Sequence[RankProgram], timer: Timer, nodes: Sequence[Counter[int]],
                 cores: int | None = None) -> None:
        self.programs = programs
        self.timer = timer
        self.nodes = nodes  # per program: ranks per node
        self.cores = cores  # per node, for collectives that share them (None: collectives take fixed times)
        self.head = [0] * len(programs)
        self.running: list[_Running | None] = [None] * len(programs)
        self.starts = [[-1.0] * len(p.instrs) for p in programs]
        self.ends = [[-1.0] * len(p.instrs) for p in programs]
        self.done = [[False] * len(p.instrs) for p in programs]
        self.by_name = [{i.name: k for k, i in enumerate(p.instrs) if i.op in ("collective", "send", "recv")} for p in programs]
        self.now = 0.0
        self.remaining = sum(len(p.instrs) for p in programs)

    def run(self) -> list[tuple[list[float], list[float]]]:
        """Schedule every instruction; raises ``ScheduleError`` when the programs cannot proceed."""
        while self.remaining:
            self._start_ready()
            if not self.remaining:
                break
            if all(r is None for r in self.running):
                raise ScheduleError(self._waiting())
            self._advance()
        return list(zip(self.starts, self.ends, strict=True))

    # ---- starting ------------------------------------------------------------------------------

    def _start_ready(self) -> None:
        """Start every instruction that can start now (instructions of zero length end at once)."""
        progressed = True
        while progressed:
            progressed = False
            for pi in range(len(self.programs)):
                if self.running[pi] is None and self.head[pi] < len(self.programs[pi].instrs):
                    progressed |= self._try_start(pi)
            for pi, run in enumerate(self.running):
                if run is not None and not run.on_cores and not run.collective and run.left <= self.now:
                    self._finish(pi, self.now)
                    progressed = True

    def _try_start(self, pi: int) -> bool:
        k = self.head[pi]
        ins = self.programs[pi].instrs[k]
        if not all(self.done[pi][d] for d in ins.deps):
            return False
        if ins.op == "recv":
            return self._try_recv(pi, k)
        if ins.op == "collective":
            return self._try_collective(pi, k)
        if ins.op in CORE_OPS and self.timer(pi, k, 1) > 0:
            self.starts[pi][k] = self.now
            self.running[pi] = _Running(index=k, on_cores=True, left=1.0)
            return True
        self._begin_fixed(pi, k, self.now, self.now + self.timer(pi, k, None))
        return True

    def _try_recv(self, pi: int, k: int) -> bool:
        """A receive waits for its send to start; it ends when the send ends (or now, if that is past)."""
        q, j = self.send_of(pi, k)
        if self.starts[q][j] < 0:
            return False
        end = max(self.now, self.ends[q][j])
        self._begin_fixed(pi, k, min(max(self.now, self.starts[q][j]), end), end)
        return True

    def _try_collective(self, pi: int, k: int) -> bool:
        """A collective starts when every program it spans is at it; all of them run it together."""
        ins = self.programs[pi].instrs[k]
        parts = [(pi, k)]
        for q, other in enumerate(self.programs):
            if q == pi or set(ins.group).isdisjoint(other.ranks):
                continue
            j = self.by_name[q].get(ins.name)
            if j is None:
                raise ScheduleError(f"{ins.op} {ins.name!r} of ranks {self.programs[pi].ranks} spans ranks {other.ranks}, "
                               "whose program has no instruction of that name")
            if self.running[q] is not None or self.head[q] != j or not all(self.done[q][d] for d in other.instrs[j].deps):
                return False
            parts.append((q, j))
        if self.cores is None or self.timer(pi, k, None) <= 0:
            end = self.now + self.timer(pi, k, None)
            for q, j in parts:
                self._begin_fixed(q, j, self.now, end)
            return True
        for q, j in parts:
            self.starts[q][j] = self.now
            self.running[q] = _Running(index=j, on_cores=False, left=1.0, collective=True)
        return True

    def _begin_fixed(self, pi: int, k: int, start: float, end: float) -> None:
        self.starts[pi][k] = start
        self.ends[pi][k] = end  # known now: a receive of this send reads it
        self.running[pi] = _Running(index=k, on_cores=False, left=end)

    def send_of(self, pi: int, k: int) -> tuple[int, int]:
        """(program, instruction) of the send that receive ``k`` of program ``pi`` waits for."""
        ins = self.programs[pi].instrs[k]
        src = ins.group[0] if ins.group else None
        for q, other in enumerate(self.programs):
            if q != pi and src in other.ranks:
                j = self.by_name[q].get(ins.name)
                if j is None or other.instrs[j].op != "send":
                    raise ScheduleError(f"recv {ins.name!r} of ranks {self.programs[pi].ranks} has no send of that name on rank {src}")
                return q, j
        raise ScheduleError(f"recv {ins.name!r} of ranks {self.programs[pi].ranks} comes from rank {src}, which runs no program")

    # ---- advancing -----------------------------------------------------------------------------

    def _busy(self) -> Counter[int]:
        """Per node, how many ranks compute or communicate in a collective now."""
        busy: Counter[int] = Counter()
        for pi, run in enumerate(self.running):
            if run is not None and (run.on_cores or run.collective):
                busy.update(self.nodes[pi])
        return busy

    def levels(self) -> list[int]:
        """Per program, how many ranks compute or communicate in a collective on the busiest node it has ranks on."""
        busy = self._busy()
        return [max((busy[n] for n in self.nodes[pi]), default=0) for pi in range(len(self.programs))]

    def stretches(self) -> dict[int, float]:
        """Per program in a collective: how much slower than measured it runs now (see the module docstring); the
        ranks of one collective finish together, at the slowest one's pace."""
        if self.cores is None:
            return {}
        busy, cores = self._busy(), self.cores
        names: dict[int, str] = {}
        slowest: dict[str, float] = {}
        for pi, run in enumerate(self.running):
            if run is not None and run.collective:
                ins = self.programs[pi].instrs[run.index]
                factor = max(max(1.0, busy[n] / max(cores, min(len(ins.group), busy[n]))) for n in self.nodes[pi])
                names[pi] = ins.name
                slowest[ins.name] = max(slowest.get(ins.name, 1.0), factor)
        return {pi: slowest[name] for pi, name in names.items()}

    def _duration(self, pi: int, run: _Running, levels: list[int], stretches: dict[int, float]) -> float:
        """Seconds the whole of ``run``'s work would take at the current speeds."""
        if run.collective:
            return self.timer(pi, run.index, None) * stretches[pi]
        return self.timer(pi, run.index, levels[pi])

    def _advance(self) -> None:
        """Move time to the next end of an instruction, progressing shared work at the current speeds."""
        levels, stretches = self.levels(), self.stretches()
        finish: dict[int, float] = {}
        for pi, run in enumerate(self.running):
            if run is not None:
                shared = run.on_cores or run.collective
                finish[pi] = self.now + run.left * self._duration(pi, run, levels, stretches) if shared else run.left
        horizon = min(finish.values())
        slack = _EPS * max(1.0, horizon)
        for pi, end in finish.items():
            run = self.running[pi]
            assert run is not None
            if end <= horizon + slack:
                self._finish(pi, horizon)
            elif run.on_cores or run.collective:
                run.left -= (horizon - self.now) / self._duration(pi, run, levels, stretches)
        self.now = horizon

    def _finish(self, pi: int, at: float) -> None:
        run = self.running[pi]
        assert run is not None
        self.ends[pi][run.index] = at
        self.done[pi][run.index] = True
        self.running[pi] = None
        self.head[pi] += 1
        self.remaining -= 1

    def _waiting(self) -> str:
        waiting = [f"ranks {p.ranks}: {p.instrs[self.head[pi]].name!r}" for pi, p in enumerate(self.programs)
                   if self.head[pi] < len(p.instrs)]
        return "the plan's programs deadlock; instructions waiting: " + "; ".join(waiting[:8])
