"""The sharding ILP's problem and solution types, exact evaluation and infeasibility messages."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from plait.errors import NoFeasiblePlanError


@dataclass(frozen=True, eq=False)
class ILPEdge:
    """A tensor from node ``src`` to node ``dst``; its cost depends on the groups of both nodes' choices.

    ``costs[src_groups[i], dst_groups[j]]`` is the cost when src takes choice i and dst choice j
    (inf: the pair is forbidden); ``count`` identical edges share the decision.
    """

    src: int
    dst: int
    src_groups: np.ndarray
    dst_groups: np.ndarray
    costs: np.ndarray
    count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "src_groups", _labels(self.src_groups))
        object.__setattr__(self, "dst_groups", _labels(self.dst_groups))
        object.__setattr__(self, "costs", _cost_array(self.costs, ndim=2))
        if self.src == self.dst:
            raise ValueError(f"edge {self.src} -> {self.dst} is a self-loop")
        if _exceeds(self.src_groups, self.costs.shape[0]) or _exceeds(self.dst_groups, self.costs.shape[1]):
            raise ValueError(f"edge {self.src} -> {self.dst}: group labels outside costs {self.costs.shape}")
        _check_count(self.count, f"edge {self.src} -> {self.dst}")

    @classmethod
    def dense(cls, src: int, dst: int, costs: np.ndarray, count: int = 1) -> ILPEdge:
        """An edge given its full [k_src, k_dst] cost matrix (each choice is its own group)."""
        matrix = np.asarray(costs, dtype=float)
        return cls(src, dst, np.arange(matrix.shape[0]), np.arange(matrix.shape[1]), matrix, count)


@dataclass(frozen=True, eq=False)
class ILPProblem:
    """Nodes with candidate choices (cost, memory, multiplicity) joined by edges with pair costs."""

    costs: Sequence[np.ndarray]
    memory: Sequence[np.ndarray] | None = None
    counts: Sequence[int] | None = None
    edges: Sequence[ILPEdge] = ()
    memory_limit: float | None = None
    names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "costs", tuple(_cost_array(c, ndim=1) for c in self.costs))
        object.__setattr__(self, "edges", tuple(self.edges))
        sizes = self.num_choices
        if self.memory is not None:
            memory = tuple(np.asarray(m, dtype=float).reshape(-1) for m in self.memory)
            if tuple(len(m) for m in memory) != sizes or not all(np.isfinite(m).all() for m in memory):
                raise ValueError("memory must give one finite number per choice of every node")
            object.__setattr__(self, "memory", memory)
        if self.counts is not None:
            if len(self.counts) != len(sizes):
                raise ValueError(f"{len(self.counts)} counts for {len(sizes)} nodes")
            for v, count in enumerate(self.counts):
                _check_count(count, self.node_label(v))
        if self.names is not None and len(self.names) != len(sizes):
            raise ValueError(f"{len(self.names)} names for {len(sizes)} nodes")
        if self.memory_limit is not None and self.memory is None:
            raise ValueError("a memory limit needs the memory of each choice")
        for k, edge in enumerate(self.edges):
            self._check_edge(k, edge, sizes)

    def _check_edge(self, k: int, edge: ILPEdge, sizes: tuple[int, ...]) -> None:
        if not (0 <= edge.src < len(sizes) and 0 <= edge.dst < len(sizes)):
            raise ValueError(f"edge {k} joins nodes {edge.src} -> {edge.dst}, but there are {len(sizes)}")
        if (len(edge.src_groups), len(edge.dst_groups)) != (sizes[edge.src], sizes[edge.dst]):
            raise ValueError(f"{self.edge_label(k)}: one group label per choice of each endpoint is needed")

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return len(self.costs)

    @property
    def num_choices(self) -> tuple[int, ...]:
        """Number of choices of each node."""
        return tuple(len(c) for c in self.costs)

    @property
    def node_counts(self) -> tuple[int, ...]:
        """Multiplicity of each node (1 when not given)."""
        return tuple(int(c) for c in self.counts) if self.counts is not None else (1,) * self.num_nodes

    def node_memory(self, v: int) -> np.ndarray:
        """Memory of each choice of node ``v`` (zeros without a memory term)."""
        return self.memory[v] if self.memory is not None else np.zeros(len(self.costs[v]))

    def node_label(self, v: int) -> str:
        """A node's name for messages."""
        return f"node {v} ({self.names[v]})" if self.names is not None else f"node {v}"

    def edge_label(self, k: int) -> str:
        """An edge's name for messages."""
        edge = self.edges[k]
        if self.names is None:
            return f"edge {k} (node {edge.src} -> node {edge.dst})"
        return f"edge {k} ({self.names[edge.src]} -> {self.names[edge.dst]})"


@dataclass(frozen=True)
class ILPStats:
    """Size of the solved model (after presolve) and the time spent building (presolve included) and solving it."""

    num_vars: int
    num_int_vars: int
    num_rows: int
    num_nonzeros: int
    num_nodes: int
    num_fixed_nodes: int
    num_edges: int
    num_pair_edges: int
    build_s: float
    solve_s: float

    def __str__(self) -> str:
        return (
            f"{self.num_vars} vars ({self.num_int_vars} binary), {self.num_rows} rows, "
            f"{self.num_nonzeros} nonzeros; {self.num_nodes} nodes ({self.num_fixed_nodes} fixed), "
            f"{self.num_edges} edges ({self.num_pair_edges} with pair variables); "
            f"build {self.build_s:.3f} s, solve {self.solve_s:.3f} s"
        )


@dataclass(frozen=True)
class ILPSolution:
    """One choice per node, with the exact objective and memory of that assignment."""

    choices: tuple[int, ...]
    objective: float
    memory: float
    status: str  # "optimal" | "time_limit"
    stats: ILPStats = field(compare=False)


def evaluate(problem: ILPProblem, choices: Sequence[int]) -> tuple[float, float]:
    """The objective and the memory of an assignment, summed exactly (inf when it uses a forbidden entry)."""
    counts = problem.node_counts
    terms = [counts[v] * float(problem.costs[v][i]) for v, i in enumerate(choices)]
    for edge in problem.edges:
        pair = edge.costs[edge.src_groups[choices[edge.src]], edge.dst_groups[choices[edge.dst]]]
        terms.append(edge.count * float(pair))
    memory = math.fsum(counts[v] * float(problem.node_memory(v)[i]) for v, i in enumerate(choices))
    objective = math.inf if any(math.isinf(t) for t in terms) else math.fsum(terms)
    return objective, memory


def no_choice_error(problem: ILPProblem, v: int) -> NoFeasiblePlanError:
    """The error for a node whose every choice has infinite cost."""
    return NoFeasiblePlanError(
        f"{problem.node_label(v)} has no choice of finite cost (all {len(problem.costs[v])} are inf); "
        "allow at least one strategy for it"
    )


def memory_error(problem: ILPProblem, minimum: float) -> NoFeasiblePlanError:
    """The error for a memory limit below the least memory any finite-cost assignment needs."""
    return NoFeasiblePlanError(
        f"no sharding fits the memory limit of {format_bytes(problem.memory_limit or 0.0)} per device: "
        f"the least memory any assignment reaches is {format_bytes(minimum)}; try more devices, a "
        "smaller batch, activation recomputation or offloading"
    )


def blocked_error(problem: ILPProblem, edge_ids: Sequence[int]) -> NoFeasiblePlanError:
    """The error for edges whose forbidden (inf) pairs leave no assignment of finite cost."""
    labels = ", ".join(problem.edge_label(k) for k in edge_ids[:5])
    more = f" and {len(edge_ids) - 5} more" if len(edge_ids) > 5 else ""
    verb = "forbids" if len(edge_ids) == 1 else "together forbid"
    return NoFeasiblePlanError(
        f"no assignment has finite cost: {labels}{more} {verb} (inf cost) every pair of choices left to "
        "their endpoints; allow a finite resharding cost there or more strategies on those nodes"
    )


def minimal_blocking(candidates: Sequence[int], feasible: Callable[[Sequence[int]], bool]) -> list[int]:
    """Drop edges one by one while the rest stay infeasible: a minimal infeasible subset of ``candidates``."""
    keep = list(candidates)
    for k in list(keep):
        trial = [j for j in keep if j != k]
        if not feasible(trial):
            keep = trial
    return keep


def format_bytes(num_bytes: float) -> str:
    """Bytes as a readable string that keeps the exact count (``1.5e+09 B (1.40 GiB)``)."""
    text = f"{num_bytes:.6g} B"
    return f"{text} ({num_bytes / 2**30:.2f} GiB)" if abs(num_bytes) >= 2**20 else text


def _labels(groups: np.ndarray) -> np.ndarray:
    labels = np.asarray(groups)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"group labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _exceeds(labels: np.ndarray, num_groups: int) -> bool:
    return bool(labels.size and (labels.min() < 0 or labels.max() >= num_groups))


def _cost_array(costs: np.ndarray, ndim: int) -> np.ndarray:
    array = np.array(costs, dtype=float)
    if array.ndim != ndim or array.size == 0:
        raise ValueError(f"costs must be a non-empty {ndim}-D array, got shape {array.shape}")
    if np.isnan(array).any() or (array == -math.inf).any():
        raise ValueError("costs may not be NaN or -inf (use +inf to forbid)")
    return array


def _check_count(count: int, what: str) -> None:
    if int(count) != count or count < 1:
        raise ValueError(f"{what}: count must be a positive integer, got {count}")
