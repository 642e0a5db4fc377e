"""Optimus (EuroSys'18) with an oracle: greedy GPUs by marginal reduction of remaining run time.

Every job with room gets one GPU first (in submission order). Each further GPU goes to the job
whose remaining time falls most from one more GPU:
``(T_step(k) - T_step(k + 1)) * remaining_steps``, until GPUs run out or no job gains. Jobs keep
their fixed total batch (accumulating when their GPUs cannot hold it). With an oracle
(``JobView.oracle``) step times and remaining steps are exact, as in the Pollux artifact's
Optimus+Oracle baseline; without one, step times come from the job's goodput model (or ideal
scaling) and every job is weighted equally. Jobs whose GPU count is unchanged keep their GPUs;
the others are placed, fewest GPUs first, on the nodes with the most free GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from plait.scheduler.decisions import (
    Allocations,
    ClusterView,
    Decision,
    JobView,
    free_gpus,
    most_free_first,
)
from plait.scheduler.goodput import fixed_batch_config
from plait.scheduler.policies.base import JobMode

StepTimeFn = Callable[[int], float]


class OptimusPolicy:
    """Greedy marginal-gain allocation of GPUs to elastic, fixed-batch jobs."""

    name = "optimus"
    job_mode: ClassVar[JobMode] = JobMode.FIXED_BATCH

    def decide(self, jobs: Sequence[JobView], cluster: ClusterView, current: Allocations,
               now: float) -> Decision:
        """Allocate all GPUs greedily, then place the jobs whose GPU count changed."""
        counts = self._counts(jobs, cluster)
        by_name = {j.name: j for j in jobs}
        allocations = {k: tuple(v) for k, v in current.items() if k in by_name and len(v) == counts[k]}
        free = free_gpus(cluster, allocations)
        for key in sorted(counts, key=lambda k: counts[k]):
            if counts[key] > 0 and not allocations.get(key):
                allocations[key] = tuple(most_free_first(free, counts[key]))
        return Decision(allocations=allocations, policy=self.name)

    def _counts(self, jobs: Sequence[JobView], cluster: ClusterView) -> dict[str, int]:
        num_gpus = cluster.total_gpus
        step_fns = {j.name: _step_time_fn(j, cluster.gpus_per_node) for j in jobs}
        remaining = {j.name: _remaining(j) for j in jobs}
        counts: dict[str, int] = {}
        gain: dict[str, float] = {}
        by_name = {j.name: j for j in jobs}

        def marginal(key: str) -> float:
            k = counts[key]
            if k + 1 > by_name[key].max_replicas or num_gpus < 1:
                return 0.0
            return (step_fns[key](k) - step_fns[key](k + 1)) * remaining[key]

        for job in jobs:
            if num_gpus < 1:
                counts[job.name], gain[job.name] = 0, 0.0
                continue
            counts[job.name] = 1
            num_gpus -= 1
            gain[job.name] = marginal(job.name)
        while num_gpus > 0 and gain and max(gain.values()) > 0:
            key = max(gain, key=lambda k: gain[k])
            counts[key] += 1
            gain[key] = marginal(key)
            num_gpus -= 1
        return counts


def _remaining(job: JobView) -> float:
    return job.oracle.remaining_steps() if job.oracle is not None else 1.0


def _step_time_fn(job: JobView, gpus_per_node: int) -> StepTimeFn:
    """Seconds per optimizer step on k GPUs: the oracle, else the goodput model, else ideal scaling."""
    oracle, model, limits, batch = job.oracle, job.goodput, job.limits, job.batch_size
    if oracle is not None:
        return oracle.step_time
    if model is not None and limits is not None and batch is not None:
        def predicted(k: int) -> float:
            atomic, accum = fixed_batch_config(batch, k, model.init_batch_size, limits)
            nodes = -(-k // gpus_per_node)  # packed onto as few nodes as possible
            thr = model.throughput(nodes, k, atomic, accum)
            return float(k * atomic * (accum + 1) / thr)
        return predicted
    return lambda k: 1.0 / k
