"""What a scheduling policy sees (jobs, cluster) and what it returns (a decision).

Policies are independent of where jobs run: the trace-driven simulator and a real cluster build
the same ``JobView`` objects and apply the same ``Decision``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from plait.errors import PlaitError
from plait.scheduler.goodput import BatchLimits, GoodputModel


class SchedulerError(PlaitError):
    """A scheduling input (cluster, workload, policy, decision) that cannot be used."""


@dataclass(frozen=True, kw_only=True)
class ClusterView:
    """A homogeneous pool of ``num_nodes`` nodes with ``gpus_per_node`` accelerators each."""

    num_nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise SchedulerError(f"cluster {self.num_nodes}x{self.gpus_per_node}: need at least 1 node "
                                 "and 1 GPU per node")

    @property
    def total_gpus(self) -> int:
        """Accelerators in the pool."""
        return self.num_nodes * self.gpus_per_node

    @classmethod
    def parse(cls, text: str) -> ClusterView:
        """Parse ``NODESxGPUS`` such as ``16x4``."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m:
            raise SchedulerError(f"cluster {text!r} is not NODESxGPUS; write e.g. 16x4 for 16 nodes of 4 GPUs")
        return cls(num_nodes=int(m.group(1)), gpus_per_node=int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.num_nodes}x{self.gpus_per_node}"


@runtime_checkable
class StepOracle(Protocol):
    """Exact knowledge of a fixed-batch job (Optimus+Oracle): work left and step time per GPU count."""

    def remaining_steps(self) -> float:
        """Optimizer steps the job still needs at its fixed batch size."""
        ...

    def step_time(self, num_replicas: int) -> float:
        """Seconds per optimizer step on ``num_replicas`` GPUs packed onto as few nodes as possible."""
        ...


@dataclass(frozen=True, kw_only=True)
class JobView:
    """One active (submitted, unfinished) job as a policy sees it."""

    name: str
    submission_time: float
    age: float  # seconds since submission
    attained_service: float  # GPU-seconds received so far
    num_restarts: int
    max_replicas: int
    min_replicas: int = 0
    requested_replicas: int | None = None  # rigid jobs: exactly this many GPUs or none
    batch_size: int | None = None  # fixed total batch, if the job does not adapt it
    goodput: GoodputModel | None = None  # fitted model; None before the job has run
    limits: BatchLimits | None = None  # batch limits the goodput model is optimised under
    oracle: StepOracle | None = None
    preemptible: bool = True


# job name -> one node index per replica, in the order the policy chose them
Allocations = Mapping[str, tuple[int, ...]]


def placement_of(allocation: Sequence[int]) -> tuple[int, ...]:
    """GPUs per node in order of appearance: runs of equal node indices, e.g. (3, 3, 5) -> (2, 1)."""
    out: list[int] = []
    for i, node in enumerate(allocation):
        if i and node == allocation[i - 1]:
            out[-1] += 1
        else:
            out.append(1)
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """A policy's answer: the allocation of every job that should hold GPUs after this round."""

    allocations: Allocations
    policy: str = ""
    info: Mapping[str, float] = field(default_factory=dict)

    def validate(self, cluster: ClusterView, jobs: Sequence[JobView] | None = None) -> None:
        """Raise if a node is oversubscribed, a node index is out of range or a job is unknown."""
        used: Counter[int] = Counter()
        for name, alloc in self.allocations.items():
            for node in alloc:
                if not 0 <= node < cluster.num_nodes:
                    raise SchedulerError(f"{self.policy}: job {name} placed on node {node}, "
                                         f"but the cluster has nodes 0..{cluster.num_nodes - 1}")
            used.update(alloc)
        over = {n: c for n, c in used.items() if c > cluster.gpus_per_node}
        if over:
            raise SchedulerError(f"{self.policy}: nodes {sorted(over)} given more than "
                                 f"{cluster.gpus_per_node} GPUs ({over})")
        if jobs is not None:
            known = {j.name for j in jobs}
            unknown = sorted(set(self.allocations) - known)
            if unknown:
                raise SchedulerError(f"{self.policy}: allocations for jobs that are not active: {unknown}")


class Policy(Protocol):
    """A cluster scheduling policy: called once per round with the active jobs."""

    name: str

    def decide(self, jobs: Sequence[JobView], cluster: ClusterView, current: Allocations,
               now: float) -> Decision:
        """Allocations for ``jobs`` (in submission order) given their ``current`` ones at time ``now``."""
        ...


def most_free_first(free: Counter[int], count: int) -> list[int]:
    """Take ``count`` GPUs, each time from the node with the most free GPUs (ties: lowest index first).

    ``free`` is updated in place; it must hold enough free GPUs.
    """
    out: list[int] = []
    while len(out) < count:
        node, avail = free.most_common(1)[0]
        take = min(avail, count - len(out))
        if take <= 0:
            raise SchedulerError(f"not enough free GPUs to place {count} replicas")
        out.extend([node] * take)
        free[node] -= take
    return out


def free_gpus(cluster: ClusterView, allocations: Allocations) -> Counter[int]:
    """Free GPUs per node (nodes in index order, fully used nodes left out) given allocations."""
    total = Counter(dict.fromkeys(range(cluster.num_nodes), cluster.gpus_per_node))
    used: Counter[int] = Counter()
    for alloc in allocations.values():
        used.update(alloc)
    return total - used
