"""Tiresias (NSDI'19): discretised two-dimensional least-attained-service, rigid and preemptive.

Jobs wait in priority queues; a job is demoted to the next queue once its attained service
(GPU-time = run time x requested GPUs) passes the queue's threshold. Every round, queues are
scanned in priority order (FIFO within a queue) and each job that still fits in the remaining GPU
count runs with exactly its requested GPUs; the others are preempted or keep waiting. A job that
keeps running keeps its GPUs; a job that starts gets GPUs from the nodes with the most free GPUs
(consolidated placement). This follows the tuned configuration of the Pollux artifact: two queues,
one threshold of 16 GPU-hours, no promotion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from plait.scheduler.decisions import (
    Allocations,
    ClusterView,
    Decision,
    JobView,
    SchedulerError,
    free_gpus,
    most_free_first,
)
from plait.scheduler.policies.base import JobMode

DEFAULT_THRESHOLDS_S = (16 * 3600.0,)


class TiresiasPolicy:
    """Discretised 2D-LAS over rigid jobs (each job runs on exactly ``requested_replicas`` GPUs)."""

    name = "tiresias"
    job_mode: ClassVar[JobMode] = JobMode.RIGID

    def __init__(self, thresholds_gpu_s: Sequence[float] = DEFAULT_THRESHOLDS_S) -> None:
        if list(thresholds_gpu_s) != sorted(thresholds_gpu_s):
            raise SchedulerError("Tiresias queue thresholds must be increasing")
        self.thresholds = tuple(thresholds_gpu_s)
        self.queues: list[list[str]] = [[] for _ in range(len(self.thresholds) + 1)]
        self.running: set[str] = set()
        self.executed_s: dict[str, int] = {}
        self.last_check: dict[str, int] = {}

    def _forget_finished(self, active: set[str]) -> None:
        self.queues = [[k for k in q if k in active] for q in self.queues]
        self.running &= active

    def _update_service(self, jobs: Sequence[JobView], now: int) -> None:
        for job in jobs:
            if job.name in self.running:
                self.executed_s[job.name] = self.executed_s.get(job.name, 0) + now - self.last_check.get(job.name, 0)
                self._maybe_demote(job)
            self.last_check[job.name] = now

    def _maybe_demote(self, job: JobView) -> None:
        gpu_time = self.executed_s[job.name] * _replicas(job)
        for level, threshold in enumerate(self.thresholds):
            if job.name in self.queues[level] and gpu_time >= threshold:
                self.queues[level].remove(job.name)
                self.queues[level + 1].append(job.name)

    def decide(self, jobs: Sequence[JobView], cluster: ClusterView, current: Allocations,
               now: float) -> Decision:
        """Admit jobs in queue order while GPUs remain; preempt the rest."""
        by_name = {j.name: j for j in jobs}
        self._forget_finished(set(by_name))
        known = {k for q in self.queues for k in q}
        self.queues[0].extend(j.name for j in jobs if j.name not in known)
        self._update_service(jobs, int(now))
        allocations = {k: tuple(v) for k, v in current.items() if k in by_name}
        remaining = cluster.total_gpus
        self.running = set()
        for queue in self.queues:
            for key in queue:
                need = _replicas(by_name[key])
                if need <= remaining:
                    self.running.add(key)
                    remaining -= need
                else:
                    allocations.pop(key, None)
        free = free_gpus(cluster, allocations)
        for queue in self.queues:
            for key in queue:
                if key in self.running and not allocations.get(key):
                    allocations[key] = tuple(most_free_first(free, _replicas(by_name[key])))
        return Decision(allocations=allocations, policy=self.name,
                        info={f"queue{i}": float(len(q)) for i, q in enumerate(self.queues)})


def _replicas(job: JobView) -> int:
    return job.requested_replicas if job.requested_replicas is not None else job.max_replicas
