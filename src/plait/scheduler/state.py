"""The scheduler as an explicit state machine over jobs, driven by policy decisions.

Each job moves through ``QUEUED -> RESTARTING -> RUNNING -> COMPLETED``. A decision that gives a
job a new allocation sends it to ``RESTARTING`` (it checkpoints and restarts on the new GPUs), one
that takes its GPUs away sends it back to ``QUEUED``. The executor (simulator or real cluster)
reports when a restart is done and when a job completes. Every change is recorded as a
``Transition`` and passed to listeners.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from plait.scheduler.decisions import ClusterView, Decision, SchedulerError


class JobPhase(enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RESTARTING = "restarting"
    RUNNING = "running"
    COMPLETED = "completed"

    @property
    def is_terminal(self) -> bool:
        """True once the job can no longer change."""
        return self is JobPhase.COMPLETED


@dataclass(frozen=True, kw_only=True)
class Transition:
    """One job's phase change at ``time``, with the allocation it has afterwards."""

    job: str
    old: JobPhase | None
    new: JobPhase
    allocation: tuple[int, ...]
    time: float


Listener = Callable[[Transition], None]


class SchedulerState:
    """Jobs' phases and allocations; changes only through ``submit``, ``apply``, ``started``, ``complete``."""

    def __init__(self, cluster: ClusterView) -> None:
        self.cluster = cluster
        self._phase: dict[str, JobPhase] = {}
        self._alloc: dict[str, tuple[int, ...]] = {}
        self._restarts: Counter[str] = Counter()
        self._ever_allocated: set[str] = set()
        self.history: list[Transition] = []
        self.listeners: list[Listener] = []

    def knows(self, job: str) -> bool:
        """True once ``job`` was submitted."""
        return job in self._phase

    def phase(self, job: str) -> JobPhase:
        """The phase of a known job."""
        if job not in self._phase:
            raise SchedulerError(f"unknown job {job!r}; submit it first")
        return self._phase[job]

    @property
    def allocations(self) -> dict[str, tuple[int, ...]]:
        """Allocations of jobs that hold GPUs."""
        return dict(self._alloc)

    def active_jobs(self) -> list[str]:
        """Submitted, unfinished jobs in submission order."""
        return [j for j, p in self._phase.items() if not p.is_terminal]

    def num_restarts(self, job: str) -> int:
        """Allocations after the first one (each costs a checkpoint-restart)."""
        return self._restarts[job]

    def used_gpus(self) -> int:
        """GPUs held by jobs."""
        return sum(len(a) for a in self._alloc.values())

    def _move(self, job: str, new: JobPhase, alloc: tuple[int, ...], time: float) -> Transition:
        t = Transition(job=job, old=self._phase.get(job), new=new, allocation=alloc, time=time)
        self._phase[job] = new
        if alloc:
            self._alloc[job] = alloc
        else:
            self._alloc.pop(job, None)
        self.history.append(t)
        for listener in self.listeners:
            listener(t)
        return t

    def submit(self, job: str, time: float) -> Transition:
        """A new job enters the queue."""
        if job in self._phase:
            raise SchedulerError(f"job {job!r} was already submitted")
        return self._move(job, JobPhase.QUEUED, (), time)

    def apply(self, decision: Decision, time: float) -> list[Transition]:
        """Apply a decision; returns the transitions of jobs whose allocation changed."""
        decision.validate(self.cluster)
        for job in decision.allocations:
            if self.phase(job).is_terminal:
                raise SchedulerError(f"{decision.policy}: job {job!r} has completed and cannot get GPUs")
        out = []
        for job in self.active_jobs():
            new = tuple(decision.allocations.get(job, ()))
            if new == self._alloc.get(job, ()):
                continue
            if new:
                if job in self._ever_allocated:
                    self._restarts[job] += 1
                self._ever_allocated.add(job)
                out.append(self._move(job, JobPhase.RESTARTING, new, time))
            else:
                out.append(self._move(job, JobPhase.QUEUED, (), time))
        return out

    def started(self, job: str, time: float) -> Transition:
        """A restarting job is running on its allocation."""
        if self.phase(job) is not JobPhase.RESTARTING:
            raise SchedulerError(f"job {job!r} is {self.phase(job).value}, not restarting")
        return self._move(job, JobPhase.RUNNING, self._alloc[job], time)

    def complete(self, job: str, time: float) -> Transition:
        """A job finished; its GPUs are free."""
        if self.phase(job).is_terminal:
            raise SchedulerError(f"job {job!r} already completed")
        return self._move(job, JobPhase.COMPLETED, (), time)
