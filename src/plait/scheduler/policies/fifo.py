"""First-in first-out: rigid jobs start in submission order and keep their GPUs until they finish."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from plait.scheduler.decisions import Allocations, ClusterView, Decision, JobView, free_gpus, most_free_first
from plait.scheduler.policies.base import JobMode


class FifoPolicy:
    """Non-preemptive FIFO; with ``backfill`` a later job may start when the head of the queue does not fit."""

    name = "fifo"
    job_mode: ClassVar[JobMode] = JobMode.RIGID

    def __init__(self, backfill: bool = False) -> None:
        self.backfill = backfill

    def decide(self, jobs: Sequence[JobView], cluster: ClusterView, current: Allocations,
               now: float) -> Decision:
        """Keep running jobs where they are and start queued ones in order while they fit."""
        names = {j.name for j in jobs}
        allocations = {k: tuple(v) for k, v in current.items() if k in names and v}
        free = free_gpus(cluster, allocations)
        for job in sorted(jobs, key=lambda j: j.submission_time):
            if job.name in allocations:
                continue
            need = job.requested_replicas or 1
            if need <= sum(free.values()):
                allocations[job.name] = tuple(most_free_first(free, need))
            elif not self.backfill:
                break
        return Decision(allocations=allocations, policy=self.name)
