"""Brute-force oracle for the sharding ILP: enumerate every assignment of a small problem."""

from __future__ import annotations

import math
import time

import numpy as np

from plait.planners.ilp_model import (
    ILPEdge,
    ILPProblem,
    ILPSolution,
    ILPStats,
    blocked_error,
    evaluate,
    memory_error,
    minimal_blocking,
    no_choice_error,
)

MAX_ASSIGNMENTS = 200_000


def solve_brute_force(problem: ILPProblem) -> ILPSolution:
    """The optimal assignment by enumeration (ties: the first in lexicographic order); for tests only."""
    sizes = problem.num_choices
    total = math.prod(sizes)
    if total > MAX_ASSIGNMENTS:
        raise ValueError(
            f"brute force would enumerate {total} assignments (at most {MAX_ASSIGNMENTS}); use solve_ilp"
        )
    start = time.perf_counter()
    for v, costs in enumerate(problem.costs):
        if not np.isfinite(costs).any():
            raise no_choice_error(problem, v)
    costs = _cost_tensor(problem, range(len(problem.edges)))
    memory = _memory_tensor(problem)
    allowed = (
        costs if problem.memory_limit is None else np.where(memory <= problem.memory_limit, costs, math.inf)
    )
    if not np.isfinite(allowed).any():
        if np.isfinite(costs).any():
            raise memory_error(problem, float(memory[np.isfinite(costs)].min()))
        raise blocked_error(problem, _blocking_edges(problem))
    choices = tuple(int(i) for i in np.unravel_index(int(np.argmin(allowed)), sizes))
    objective, used = evaluate(problem, choices)
    stats = ILPStats(
        0, 0, 0, 0, problem.num_nodes, 0, len(problem.edges), 0, 0.0, time.perf_counter() - start
    )
    return ILPSolution(choices, objective, used, "optimal", stats)


def _cost_tensor(problem: ILPProblem, edge_ids: range | list[int]) -> np.ndarray:
    """Total cost of every assignment, one axis per node, counting only the given edges."""
    counts = problem.node_counts
    total = np.zeros(problem.num_choices)
    for v, costs in enumerate(problem.costs):
        total = total + counts[v] * _on_axis(problem, v, costs)
    for k in edge_ids:
        edge = problem.edges[k]
        total = total + edge.count * _edge_term(problem, edge)
    return total


def _memory_tensor(problem: ILPProblem) -> np.ndarray:
    """Total memory of every assignment, one axis per node."""
    counts = problem.node_counts
    total = np.zeros(problem.num_choices)
    for v in range(problem.num_nodes):
        total = total + counts[v] * _on_axis(problem, v, problem.node_memory(v))
    return total


def _edge_term(problem: ILPProblem, edge: ILPEdge) -> np.ndarray:
    """An edge's cost over its two endpoint axes, broadcastable to the full tensor."""
    matrix = edge.costs[np.ix_(edge.src_groups, edge.dst_groups)]
    if edge.src > edge.dst:
        matrix = matrix.T
    shape = [1] * problem.num_nodes
    shape[edge.src], shape[edge.dst] = len(edge.src_groups), len(edge.dst_groups)
    return matrix.reshape(shape)


def _on_axis(problem: ILPProblem, v: int, vector: np.ndarray) -> np.ndarray:
    """A vector over node ``v``'s choices laid along that node's axis."""
    shape = [1] * problem.num_nodes
    shape[v] = len(vector)
    return vector.reshape(shape)


def _blocking_edges(problem: ILPProblem) -> list[int]:
    """A minimal set of edges whose forbidden pairs together leave no finite assignment."""
    candidates = [k for k, edge in enumerate(problem.edges) if not np.isfinite(edge.costs).all()]
    return minimal_blocking(
        candidates, lambda edge_ids: bool(np.isfinite(_cost_tensor(problem, list(edge_ids))).any())
    )
