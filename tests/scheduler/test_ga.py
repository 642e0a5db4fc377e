"""The genetic search: non-dominated ranking, crowding, repair rules, and optimality on small cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from plait.scheduler.policies.ga import AllocationProblem, GAConfig, GeneticSearch, rank_and_crowding


def _brute_rank(fit: np.ndarray) -> np.ndarray:
    left, rank, level = set(range(len(fit))), np.full(len(fit), -1), 0
    while left:
        front = [i for i in left
                 if not any(np.all(fit[j] <= fit[i]) and np.any(fit[j] < fit[i]) for j in left)]
        rank[front] = level
        left -= set(front)
        level += 1
    return rank


def test_rank_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        fit = rng.integers(0, 5, size=(int(rng.integers(1, 40)), 2)).astype(float)
        rank, _ = rank_and_crowding(fit)
        assert np.array_equal(rank, _brute_rank(fit))


def test_crowding_by_hand() -> None:
    fit = np.array([[0.0, 4.0], [1.0, 3.0], [3.0, 1.0], [4.0, 0.0], [0.0, 4.0], [5.0, 5.0]])
    rank, crowd = rank_and_crowding(fit)
    assert list(rank) == [0, 0, 0, 0, 0, 1]
    assert crowd[0] == 1e14 and crowd[3] == 1e14  # boundary points
    assert crowd[4] == 0.0  # duplicate of point 0
    assert crowd[1] == pytest.approx(((3 - 0) / 4 + (4 - 1) / 4) / 2)
    assert crowd[2] == pytest.approx(((4 - 1) / 4 + (3 - 0) / 4) / 2)


def _problem(num_jobs: int, evaluate, max_replicas=None, base=None) -> AllocationProblem:  # type: ignore[no-untyped-def]
    nodes = 2
    return AllocationProblem(
        base_state=np.zeros((num_jobs, nodes), np.int64) if base is None else base,
        capacity=np.array([2, 2]), max_replicas=np.array(max_replicas or [4] * num_jobs),
        min_replicas=np.zeros(num_jobs, np.int64), evaluate=evaluate)


def test_repair_enforces_capacity_caps_and_interference_in_priority_order() -> None:
    search = GeneticSearch(GAConfig(), np.random.default_rng(0))
    problem = _problem(3, lambda s: np.zeros((len(s), 2)), max_replicas=[4, 4, 1])
    states = np.array([
        [[2, 2], [1, 1], [0, 0]],  # job 0 spans both nodes; job 1 too: job 1 loses both cells
        [[2, 0], [2, 0], [0, 0]],  # node 0 oversubscribed: job 1 (lower priority) is cut
        [[0, 0], [0, 0], [1, 1]],  # job 2 capped at 1 replica
    ], dtype=np.int8)
    out = search.repair(problem, states)
    assert out[0].tolist() == [[2, 2], [0, 0], [0, 0]]
    assert out[1].tolist() == [[2, 0], [0, 0], [0, 0]]
    assert out[2].sum() == 1
    assert np.all(out.sum(axis=1) <= 2)


def test_mutation_and_crossover_keep_cells_in_range() -> None:
    search = GeneticSearch(GAConfig(), np.random.default_rng(0))
    problem = _problem(4, lambda s: np.zeros((len(s), 2)))
    rng = np.random.default_rng(2)
    pop = rng.integers(0, 3, size=(50, 4, 2)).astype(np.int8)
    kids = search.mutate(problem, search.crossover(pop[:25], pop[25:]))
    assert kids.shape == (50, 4, 2)
    assert kids.min() >= 0 and kids.max() <= 2


def test_search_finds_the_brute_force_optimum() -> None:
    # Three jobs on 2 nodes x 2 GPUs; fitness = harmonic mean of (speedup + 1e-3).
    speed = np.array([[0, 1.0, 1.9, 2.7, 3.4], [0, 1.0, 1.2, 1.3, 1.35], [0, 1.0, 1.8, 2.4, 2.9]])

    def evaluate(states: np.ndarray) -> np.ndarray:
        k = states.sum(axis=2)
        s = speed[np.arange(3), k] + 1e-3
        fitness = 1 / np.mean(1 / s, axis=1)
        return np.column_stack([-fitness, -k.sum(axis=1) / 4.0])

    all_states = np.array(list(itertools.product(range(3), repeat=6))).reshape(-1, 3, 2)
    feasible = all_states[np.all(all_states.sum(axis=1) <= 2, axis=1)]
    best = -evaluate(feasible)[:, 0].min()
    problem = _problem(3, evaluate)
    front, fit = GeneticSearch(GAConfig(pop_size=30, generations=30), np.random.default_rng(0)).run(
        problem, problem.base_state[None])
    assert -fit[:, 0].min() == pytest.approx(best)
    assert np.all(front.sum(axis=1) <= 2)


def test_search_is_reproducible_with_a_seed() -> None:
    def evaluate(states: np.ndarray) -> np.ndarray:
        k = states.sum(axis=2).astype(float)
        return np.column_stack([-np.sqrt(k).sum(axis=1), k.sum(axis=1)])

    problem = _problem(3, evaluate)
    runs = [GeneticSearch(GAConfig(pop_size=20, generations=10), np.random.default_rng(5)).run(
        problem, problem.base_state[None]) for _ in range(2)]
    assert np.array_equal(runs[0][0], runs[1][0])


def test_raise_mutation_picks_cells_with_the_published_probabilities() -> None:
    # A cell on a node with free GPUs is picked with p1 = 1/jobs, or, if its job is on the node,
    # with p1 + p2 - p1 * p2 where p2 = 1 / (jobs on the node); it then gets a value in [old, capacity].
    jobs, nodes, draws = 5, 8, 20000
    state = np.zeros((jobs, nodes), np.int8)
    state[0, :3] = 1
    state[1, 0] = 2
    state[2, 5] = 4  # node 5 is full: nothing there may change
    state[3, 3] = 1
    cap = np.full(nodes, 4)
    problem = AllocationProblem(base_state=state.astype(np.int64), capacity=cap, max_replicas=np.full(jobs, 8),
                                min_replicas=np.zeros(jobs, np.int64), evaluate=lambda s: np.zeros((len(s), 2)))
    pop = np.repeat(state[None], draws, axis=0)
    GeneticSearch(GAConfig(), np.random.default_rng(0))._raise_cells(problem, pop)
    free = cap - state.sum(axis=0) > 0
    on = (state > 0) & free
    p1 = free / jobs
    p2 = 1 / np.maximum(on.sum(axis=0), 1)
    picked = np.where(on, p1 + p2 - p1 * p2, p1)
    expected_change = picked * (1 - 1 / (cap - state + 1))  # a pick may redraw the old value
    assert np.abs((pop != state).mean(axis=0) - expected_change).max() < 0.015
    assert np.all(pop >= state) and np.all(pop <= 4)
