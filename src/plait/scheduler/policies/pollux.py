"""Pollux (OSDI'21): allocate GPUs to maximise a fair combination of the jobs' goodput speedups.

Each round the policy searches allocation matrices (jobs x nodes of replica counts) with a genetic
algorithm (``ga.py``). A job's speedup is its best goodput on an allocation (batch size and
accumulation re-optimised) over its best goodput on a fair share (``ceil(GPUs / jobs)`` replicas
on one node); jobs not yet measured are assumed to scale perfectly. The fitness is the power mean
with ``p = -1`` of the speedups (scaled so one node is 1, plus 1e-3), where a job whose allocation
changes has its speedup multiplied by the restart penalty ``max(age - restarts * delay, 0) /
(age + delay)``. A second objective, the cluster utility (speedup per allocated GPU), keeps the
population diverse; the result is the candidate with the best fitness. The final population's
non-dominated set seeds the next round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from plait.scheduler.decisions import Allocations, ClusterView, Decision, JobView
from plait.scheduler.policies.base import JobMode
from plait.scheduler.policies.ga import (
    AllocationProblem,
    GAConfig,
    GeneticSearch,
    Objectives,
    States,
    row_sums,
)

FloatArray = npt.NDArray[np.float64]


class PolluxPolicy:
    """Goodput-driven co-adaptive allocation (p-mean of fair-share speedups, searched by NSGA-II)."""

    name = "pollux"
    job_mode: ClassVar[JobMode] = JobMode.ADAPTIVE

    def __init__(self, *, p: float = -1.0, restart_delay: float = 30.0, seed: int = 0,
                 ga: GAConfig | None = None, max_nodes_per_job: int | None = None) -> None:
        self.p = p
        self.restart_delay = restart_delay
        self.ga = ga or GAConfig()
        self.max_nodes_per_job = max_nodes_per_job
        self.search = GeneticSearch(self.ga, np.random.default_rng(seed))
        self._prev: tuple[list[str], States] | None = None
        self._goodput_rows: dict[str, tuple[object, FloatArray]] = {}
        self.search_time_s = 0.0

    def decide(self, jobs: Sequence[JobView], cluster: ClusterView, current: Allocations,
               now: float) -> Decision:
        """Run one search and return the fittest allocation."""
        if not jobs:
            return Decision(allocations={}, policy=self.name)
        t0 = time.perf_counter()
        order = sorted(jobs, key=lambda j: (j.preemptible or not current.get(j.name),
                                            j.attained_service, j.submission_time))
        names = [j.name for j in order]
        base = _to_state(names, current, cluster.num_nodes)
        table = self._speedup_table(order, cluster)
        problem = AllocationProblem(
            base_state=base, capacity=np.full(cluster.num_nodes, cluster.gpus_per_node, dtype=np.int64),
            max_replicas=np.array([j.max_replicas for j in order], dtype=np.int64),
            min_replicas=np.array([j.min_replicas for j in order], dtype=np.int64),
            evaluate=self._objectives(order, base, table, cluster), max_nodes_per_job=self.max_nodes_per_job)
        front, fit = self.search.run(problem, self._initial(names, base))
        self._prev = (names, front)
        best = int(np.argmin(fit[:, 0]))
        self._goodput_rows = {k: v for k, v in self._goodput_rows.items() if k in set(names)}
        self.search_time_s += time.perf_counter() - t0
        return Decision(allocations=_to_allocations(names, front[best]), policy=self.name,
                        info={"fitness": float(-fit[best, 0]), "utility": float(-fit[best, 1])})

    def _initial(self, names: list[str], base: States) -> States:
        """The previous round's non-dominated set, remapped to today's jobs (new jobs start empty)."""
        if self._prev is None:
            return base[None]
        prev_names, prev = self._prev
        index = {k: i for i, k in enumerate(prev_names)}
        out = np.zeros((len(prev), *base.shape), dtype=np.int64)
        for j, name in enumerate(names):
            if name in index and prev.shape[2] == base.shape[1]:
                out[:, j] = prev[:, index[name]]
        return out

    def _speedup_table(self, jobs: Sequence[JobView], cluster: ClusterView) -> FloatArray:
        """speedup[j, multi_node, replicas] relative to the fair-share goodput."""
        total = cluster.total_gpus
        fair = math.ceil(total / len(jobs))
        ks = np.arange(total + 1)
        table = np.empty((len(jobs), 2, total + 1))
        for i, job in enumerate(jobs):
            rows = self._goodput(job, total)
            if rows is None:
                table[i] = ks / fair
            else:
                table[i] = rows / _fair_goodput(rows, fair)
        return table

    def _goodput(self, job: JobView, total: int) -> FloatArray | None:
        """Best goodput on one node (row 0) and on several nodes (row 1) for 0..total replicas."""
        model, limits = job.goodput, job.limits
        if model is None or limits is None:
            return None
        key = (model.perf, model.grad, limits, total)
        cached = self._goodput_rows.get(job.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        ks = np.arange(1, total + 1)
        nodes = np.stack([np.ones_like(ks), np.full_like(ks, 2)])
        good, _, _ = model.optimize(nodes, np.broadcast_to(ks, nodes.shape), limits)
        rows = np.zeros((2, total + 1))
        rows[:, 1:] = good
        self._goodput_rows[job.name] = (key, rows)
        return rows

    def _objectives(self, jobs: Sequence[JobView], base: States, table: FloatArray,
                    cluster: ClusterView) -> _Objectives:
        age = np.array([j.age for j in jobs], dtype=np.float64)
        restarts = np.array([j.num_restarts for j in jobs], dtype=np.float64)
        penalty = np.maximum(age - restarts * self.restart_delay, 0.0) / (age + self.restart_delay)
        return _Objectives(table=table, base=base, penalty=penalty, p=self.p,
                           scale=cluster.num_nodes / cluster.total_gpus, gpus_per_node=cluster.gpus_per_node)


class _Objectives:
    """(-fitness, -utility) of candidate allocations; both minimised."""

    def __init__(self, *, table: FloatArray, base: States, penalty: FloatArray, p: float, scale: float,
                 gpus_per_node: int) -> None:
        self.table, self.base, self.penalty, self.p = table, base, penalty, p
        self.scale, self.gpus_per_node = scale, gpus_per_node
        self.jobs = np.arange(len(table))

    def __call__(self, states: States) -> Objectives:
        replicas = row_sums(states)
        multi = (row_sums(states > 0) > 1).astype(np.int64)
        speedup = self.table[self.jobs, multi, replicas]  # (pop, jobs)
        changed = row_sums(states != self.base) > 0
        scaled = speedup * self.scale * np.where(changed, self.penalty, 1.0)
        fitness = power_mean(scaled + 1e-3, self.p)
        used_nodes = np.count_nonzero(states.sum(axis=1), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            utility = np.where(used_nodes > 0, speedup.sum(axis=1) / (used_nodes * self.gpus_per_node), 0.0)
        return np.column_stack([-fitness, -utility])


def _fair_goodput(rows: FloatArray, fair: int) -> float:
    """Goodput on the fair share (one node); the largest feasible share if the fair one cannot run."""
    feasible = np.flatnonzero(rows[0, : fair + 1] > 0)
    return float(rows[0, feasible[-1]]) if len(feasible) else 1.0


def power_mean(x: FloatArray, p: float) -> FloatArray:
    """Power mean over the last axis (p = 0 is the geometric mean)."""
    if p == 0:
        return np.asarray(np.exp(np.mean(np.log(x), axis=-1)), dtype=np.float64)
    return np.asarray(np.mean(x**p, axis=-1) ** (1.0 / p), dtype=np.float64)


def _to_state(names: list[str], allocations: Allocations, num_nodes: int) -> States:
    state = np.zeros((len(names), num_nodes), dtype=np.int64)
    for j, name in enumerate(names):
        for node in allocations.get(name, ()):
            state[j, node] += 1
    return state


def _to_allocations(names: list[str], state: npt.NDArray[np.int64]) -> dict[str, tuple[int, ...]]:
    out = {}
    for j, name in enumerate(names):
        alloc = tuple(n for n in range(state.shape[1]) for _ in range(int(state[j, n])))
        if alloc:
            out[name] = alloc
    return out
