"""The intra-op sharding ILP: brute-force agreement, hand-computed cases, size and clear errors."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from plait.errors import NoFeasiblePlanError
from plait.planners.ilp import ILPEdge, ILPProblem, ILPSolution, evaluate, solve_ilp
from plait.planners.ilp_brute import solve_brute_force

INF = math.inf


def random_problem(rng: np.random.Generator) -> ILPProblem:
    """2-7 nodes, 1-5 choices, random DAG edges (parallel ones too), groups, inf entries, counts, memory."""
    num_nodes = int(rng.integers(2, 8))
    sizes = rng.integers(1, 6, size=num_nodes)
    costs = [_with_infs(rng, rng.uniform(0, 10, size=k), 0.1) for k in sizes]
    memory = [rng.integers(1, 20, size=k).astype(float) for k in sizes]
    counts = rng.integers(1, 4, size=num_nodes).tolist()
    edges = []
    for src, dst in itertools.combinations(range(num_nodes), 2):
        for _ in range(int(rng.random() < 0.5) + int(rng.random() < 0.1)):
            edges.append(_random_edge(rng, src, dst, int(sizes[src]), int(sizes[dst])))
    limit = None
    if rng.random() < 0.5:
        low = sum(c * float(m.min()) for c, m in zip(counts, memory, strict=True))
        high = sum(c * float(m.max()) for c, m in zip(counts, memory, strict=True))
        limit = float(rng.integers(int(low) - 3, int(high) + 1))
    return ILPProblem(costs, memory, counts, edges, limit)


def _random_edge(rng: np.random.Generator, src: int, dst: int, k_src: int, k_dst: int) -> ILPEdge:
    num_src, num_dst = int(rng.integers(1, k_src + 1)), int(rng.integers(1, k_dst + 1))
    matrix = np.zeros((num_src, num_dst)) if rng.random() < 0.1 else rng.uniform(0, 10, (num_src, num_dst))
    src_groups, dst_groups = rng.integers(0, num_src, size=k_src), rng.integers(0, num_dst, size=k_dst)
    return ILPEdge(src, dst, src_groups, dst_groups, _with_infs(rng, matrix, 0.1), int(rng.integers(1, 4)))


def _with_infs(rng: np.random.Generator, array: np.ndarray, share: float) -> np.ndarray:
    return np.where(rng.random(array.shape) < share, INF, array)


def assert_achieves(problem: ILPProblem, solution: ILPSolution) -> None:
    """The choices are feasible and give exactly the reported objective and memory."""
    objective, memory = evaluate(problem, solution.choices)
    assert math.isfinite(objective)
    assert (objective, memory) == (solution.objective, solution.memory)
    assert problem.memory_limit is None or memory <= problem.memory_limit


def test_ilp_matches_brute_force_on_random_problems() -> None:
    rng = np.random.default_rng(20240611)
    solved = infeasible = 0
    for _ in range(160):
        problem = random_problem(rng)
        try:
            expected = solve_brute_force(problem)
        except NoFeasiblePlanError:
            with pytest.raises(NoFeasiblePlanError):
                solve_ilp(problem)
            infeasible += 1
            continue
        solution = solve_ilp(problem)
        assert_achieves(problem, solution)
        assert solution.status == "optimal"
        assert solution.objective == pytest.approx(expected.objective, rel=1e-9, abs=1e-12)
        solved += 1
    assert solved >= 100 and infeasible >= 10


def test_brute_force_matches_plain_enumeration() -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):
        problem = random_problem(rng)
        best = math.inf
        for choices in itertools.product(*(range(k) for k in problem.num_choices)):
            objective, memory = evaluate(problem, choices)
            if problem.memory_limit is None or memory <= problem.memory_limit:
                best = min(best, objective)
        if math.isinf(best):
            with pytest.raises(NoFeasiblePlanError):
                solve_brute_force(problem)
        else:
            assert solve_brute_force(problem).objective == pytest.approx(best, rel=1e-12)


def test_chain_where_cheapest_choice_per_node_is_not_optimal() -> None:
    mismatch = np.array([[0.0, 10.0], [10.0, 0.0]])
    problem = ILPProblem(
        costs=[np.array([0.0, 2.0]), np.array([5.0, 0.0]), np.array([0.0, 2.0])],
        edges=[ILPEdge.dense(0, 1, mismatch), ILPEdge.dense(1, 2, mismatch)],
    )
    # per-node cheapest (0, 1, 0) costs 20; the optimum (1, 1, 1) costs 2 + 0 + 2
    assert evaluate(problem, (0, 1, 0))[0] == 20.0
    for solve in (solve_ilp, solve_brute_force):
        solution = solve(problem)
        assert solution.choices == (1, 1, 1)
        assert solution.objective == 4.0


def test_memory_limit_forces_a_costlier_choice() -> None:
    def problem(limit: float | None) -> ILPProblem:
        costs = [np.array([1.0, 3.0]), np.array([0.0, 0.5])]
        memory = [np.array([10.0, 4.0]), np.array([2.0, 1.0])]
        return ILPProblem(costs, memory, edges=[ILPEdge.dense(0, 1, np.zeros((2, 2)))], memory_limit=limit)

    assert solve_ilp(problem(None)).choices == (0, 0)
    tight = solve_ilp(problem(9.0))
    assert (tight.choices, tight.objective, tight.memory) == ((1, 0), 3.0, 6.0)
    assert solve_brute_force(problem(9.0)).choices == (1, 0)


def test_counts_multiply_costs_and_memory() -> None:
    costs = [np.array([0.0, 1.0]), np.array([2.0, 0.0])]
    memory = [np.array([4.0, 1.0]), np.array([1.0, 1.0])]
    edge = np.array([[0.0, 5.0], [5.0, 0.0]])
    single = ILPProblem(costs, memory, edges=[ILPEdge.dense(0, 1, edge)])
    assert solve_ilp(single).choices == (1, 1)  # 1 beats 2
    tripled = ILPProblem(costs, memory, counts=[3, 1], edges=[ILPEdge.dense(0, 1, edge)])
    solution = solve_ilp(tripled)
    assert (solution.choices, solution.objective, solution.memory) == ((0, 0), 2.0, 13.0)

    pair = np.array([[0.0, 0.8], [0.8, 0.0]])
    node_costs = [np.array([0.0, 1.0]), np.array([1.1, 0.0])]
    assert solve_ilp(ILPProblem(node_costs, edges=[ILPEdge.dense(0, 1, pair)])).choices == (0, 1)
    doubled = solve_ilp(ILPProblem(node_costs, edges=[ILPEdge.dense(0, 1, pair, count=2)]))
    assert (doubled.choices, doubled.objective) == ((1, 1), 1.0)


def test_edges_are_sized_by_groups_and_presolve_folds_easy_parts() -> None:
    groups = np.array([0, 1, 0, 1, 0, 1])
    reshard = np.array([[0.0, 3.0], [2.0, 0.0]])
    costs = [np.arange(6.0), np.arange(6.0)[::-1], np.array([INF, 1.0, INF])]
    edges = [
        ILPEdge(0, 1, groups, groups, reshard),
        ILPEdge(1, 2, groups, np.array([0, 1, 1]), reshard),  # node 2 is fixed: folded into node 1
        ILPEdge.dense(0, 2, np.zeros((6, 3))),  # all zero: dropped
    ]
    solution = solve_ilp(ILPProblem(costs, edges=edges))
    stats = solution.stats
    assert (stats.num_int_vars, stats.num_vars) == (12, 12 + 4)  # 2x2 group pairs, not 6x6 choice pairs
    assert (stats.num_fixed_nodes, stats.num_pair_edges) == (1, 1)
    assert solution.objective == solve_brute_force(ILPProblem(costs, edges=edges)).objective
    assert "16 vars (12 binary)" in str(stats)


def test_same_problem_gives_same_choices() -> None:
    flat = [np.zeros(4) for _ in range(6)]
    edges = [ILPEdge.dense(i, i + 1, np.ones((4, 4)) - np.eye(4)) for i in range(5)]
    first = solve_ilp(ILPProblem(flat, edges=edges)).choices
    assert all(solve_ilp(ILPProblem(flat, edges=edges)).choices == first for _ in range(3))


def chain_with_skips(num_nodes: int, num_choices: int, num_groups: int, seed: int) -> ILPProblem:
    """A layer chain where each node also feeds the node three steps ahead (residual-like skips)."""
    rng = np.random.default_rng(seed)
    groups = np.arange(num_choices) % num_groups

    def reshard() -> np.ndarray:
        matrix = rng.uniform(0.5, 2.0, (num_groups, num_groups))
        np.fill_diagonal(matrix, 0.0)
        return matrix

    costs = [rng.uniform(0.0, 1.0, num_choices) for _ in range(num_nodes)]
    edges = [ILPEdge(i, i + 1, groups, groups, reshard()) for i in range(num_nodes - 1)]
    edges += [ILPEdge(i, i + 3, groups, groups, reshard()) for i in range(num_nodes - 3)]
    return ILPProblem(costs, edges=edges)


@pytest.mark.slow
def test_large_chain_with_skips_solves_fast() -> None:
    problem = chain_with_skips(3000, 8, 4, seed=3)
    start, start_cpu = time.perf_counter(), time.process_time()
    solution = solve_ilp(problem)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"\n3000 nodes x 8 choices: {solution.stats}; total {elapsed:.2f} s wall, {cpu:.2f} s cpu")
    # CPU time: other jobs on a shared machine stretch wall time but not this process's work
    assert solution.status == "optimal" and cpu < 10.0
    assert solution.stats.num_int_vars == 3000 * 8 and solution.stats.num_pair_edges == len(problem.edges)
    assert_achieves(problem, solution)
    uniform = min(evaluate(problem, (c,) * 3000)[0] for c in range(8))
    assert solution.objective < uniform


def test_time_limit_returns_best_found_or_says_so() -> None:
    base = chain_with_skips(300, 8, 4, seed=5)
    memory = [np.linspace(1.0, 2.0, 8)[::-1] for _ in range(300)]
    problem = ILPProblem(base.costs, memory, edges=base.edges, memory_limit=300 * 1.3)
    try:
        solution = solve_ilp(problem, time_limit_s=0.01)
    except NoFeasiblePlanError as error:
        assert "time limit of 0.01 s" in str(error)
    else:
        assert solution.status == "time_limit"
        assert_achieves(problem, solution)


def test_node_without_finite_choice_is_named() -> None:
    problem = ILPProblem([np.zeros(2), np.full(3, INF)], names=["embed", "attn.qkv"])
    for solve in (solve_ilp, solve_brute_force):
        with pytest.raises(NoFeasiblePlanError, match=r"node 1 \(attn.qkv\) has no choice of finite cost"):
            solve(problem)


def test_memory_error_reports_limit_and_reachable_minimum() -> None:
    # per-node minima would sum to 2, but the edge forbids that pair: the least reachable is 6
    forbid_both_small = np.array([[INF, 0.0], [0.0, 0.0]])
    problem = ILPProblem(
        costs=[np.zeros(2), np.zeros(2)],
        memory=[np.array([1.0, 5.0]), np.array([1.0, 5.0])],
        edges=[ILPEdge.dense(0, 1, forbid_both_small)],
        memory_limit=4.0,
    )
    for solve in (solve_ilp, solve_brute_force):
        with pytest.raises(NoFeasiblePlanError) as error:
            solve(problem)
        message = str(error.value)
        assert "memory limit of 4 B" in message and "reaches is 6 B" in message and "more devices" in message


def test_memory_error_in_gib() -> None:
    gib = float(2**30)
    problem = ILPProblem([np.zeros(2)], [np.array([3 * gib, 2 * gib])], counts=[2], memory_limit=3 * gib)
    with pytest.raises(NoFeasiblePlanError, match=r"3\.00 GiB.*4\.00 GiB"):
        solve_ilp(problem)


def test_all_inf_edge_is_named() -> None:
    problem = ILPProblem(
        [np.zeros(2), np.zeros(3), np.zeros(2)],
        edges=[ILPEdge.dense(0, 1, np.zeros((2, 3))), ILPEdge.dense(1, 2, np.full((3, 2), INF))],
        names=["fc1", "gelu", "fc2"],
    )
    for solve in (solve_ilp, solve_brute_force):
        with pytest.raises(NoFeasiblePlanError, match=r"edge 1 \(gelu -> fc2\) forbids"):
            solve(problem)


def test_blocking_cycle_beyond_arc_consistency_names_its_edges() -> None:
    # three nodes that must pairwise differ with two choices each: every pair is fine, the triangle is not
    differ = np.array([[INF, 0.0], [0.0, INF]])
    edges = [ILPEdge.dense(0, 1, differ), ILPEdge.dense(1, 2, differ), ILPEdge.dense(0, 2, differ)]
    edges.append(ILPEdge.dense(2, 3, np.array([[INF, 1.0], [1.0, 1.0]])))  # not part of the conflict
    problem = ILPProblem([np.zeros(2)] * 4, edges=edges)
    for solve in (solve_ilp, solve_brute_force):
        with pytest.raises(NoFeasiblePlanError, match="together forbid") as error:
            solve(problem)
        assert all(f"edge {k} " in str(error.value) for k in range(3)) and "edge 3 " not in str(error.value)


def test_malformed_problems_and_oversized_brute_force_are_refused() -> None:
    with pytest.raises(ValueError, match="one group label per choice"):
        ILPProblem(
            [np.zeros(2), np.zeros(2)],
            edges=[ILPEdge(0, 1, np.array([0]), np.array([0, 0]), np.zeros((1, 1)))],
        )
    with pytest.raises(ValueError, match="memory limit needs"):
        ILPProblem([np.zeros(2)], memory_limit=1.0)
    with pytest.raises(ValueError, match="NaN"):
        ILPProblem([np.array([0.0, math.nan])])
    with pytest.raises(ValueError, match="at most 200000"):
        solve_brute_force(ILPProblem([np.zeros(5)] * 8))
