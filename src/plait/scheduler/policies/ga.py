"""A small NSGA-II over allocation matrices (jobs x nodes of replica counts), in plain numpy.

Operators follow Pollux: single-point crossover over job rows; mutation that resets a job's row to
its current allocation, zeroes random cells, or raises random cells (favouring nodes with free
GPUs and nodes the job already uses); and a repair that makes every candidate feasible in job
priority order (at most one multi-node job per node, at most ``max_replicas`` per job, at most
``max_nodes_per_job`` nodes per job, node capacity, ``min_replicas`` or nothing). Survival is
NSGA-II's: non-dominated fronts, then crowding distance; parents are picked by binary
tournament on dominance, then crowding. Objectives are minimised.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

States = npt.NDArray[np.integer]  # (population, jobs, nodes) replica counts
Objectives = npt.NDArray[np.float64]  # (population, 2)


@dataclass(frozen=True, kw_only=True)
class AllocationProblem:
    """Feasibility data and the objective function of one scheduling round (jobs in priority order)."""

    base_state: States  # (jobs, nodes): the current allocation
    capacity: npt.NDArray[np.int64]  # (nodes,): GPUs per node
    max_replicas: npt.NDArray[np.int64]  # (jobs,)
    min_replicas: npt.NDArray[np.int64]  # (jobs,)
    evaluate: Callable[[States], Objectives]
    max_nodes_per_job: int | None = None


@dataclass(frozen=True, kw_only=True)
class GAConfig:
    """Search settings (the published policy: 100 individuals, 100 generations)."""

    pop_size: int = 100
    generations: int = 100
    crossover_prob: float = 0.9
    reset_prob: float = 0.1  # per job: back to its current allocation
    zero_row_prob: float = 0.1  # per job: its cells may be zeroed ...
    zero_cell_prob: float = 0.1  # ... each with this probability
    max_mating_attempts: int = 1  # batches of pop_size children per generation (duplicates are dropped)
    max_stalled: int = 5  # stop after this many generations in a row without a new candidate


class GeneticSearch:
    """NSGA-II driver with a seeded numpy generator."""

    def __init__(self, config: GAConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng

    def run(self, problem: AllocationProblem, init: States) -> tuple[States, Objectives]:
        """Search from ``init`` (population, jobs, nodes); returns the final non-dominated set."""
        if problem.capacity.max(initial=0) > 31:
            raise ValueError("GeneticSearch packs replica counts into bytes: at most 31 GPUs per node")
        weights = self.rng.integers(1, 2**62, size=problem.base_state.size)  # random projection: a hash
        pop = self.repair(problem, init.astype(np.int8))
        keys = _hash(pop, weights)
        _, first = np.unique(keys, return_index=True)
        pop, keys = pop[np.sort(first)], keys[np.sort(first)]
        fit = problem.evaluate(pop)
        rank, crowd = rank_and_crowding(fit)
        stalled = 0
        for _ in range(self.config.generations):
            off, off_keys = self._offspring(problem, pop, keys, fit, crowd, weights)
            stalled = 0 if len(off) else stalled + 1
            if stalled >= self.config.max_stalled:  # the reachable space looks exhausted
                break
            if not len(off):
                continue
            pop, keys = np.concatenate([pop, off]), np.concatenate([keys, off_keys])
            fit = np.concatenate([fit, problem.evaluate(off)])
            rank, crowd = rank_and_crowding(fit)
            noise = self.rng.random(len(fit))  # random order among equals
            keep = np.lexsort((noise, -crowd, rank))[: self.config.pop_size]
            pop, keys, fit, rank, crowd = pop[keep], keys[keep], fit[keep], rank[keep], crowd[keep]
        front = rank == 0
        return pop[front].astype(np.int64), fit[front]

    def _offspring(self, problem: AllocationProblem, pop: States, keys: npt.NDArray[np.int64],
                   fit: Objectives, crowd: npt.NDArray[np.float64], weights: npt.NDArray[np.int64],
                   ) -> tuple[States, npt.NDArray[np.int64]]:
        """Up to ``pop_size`` new candidates, unique and different from the population."""
        need = self.config.pop_size
        seen = set(keys.tolist())
        kids_out: list[States] = []
        keys_out: list[npt.NDArray[np.int64]] = []
        for _ in range(self.config.max_mating_attempts):
            n_pairs = (need + 1) // 2
            parents = self._tournament(fit, crowd, 2 * n_pairs).reshape(2, n_pairs)
            kids = self.repair(problem, self.mutate(problem, self.crossover(pop[parents[0]], pop[parents[1]])))
            k = _hash(kids, weights)
            new: list[int] = []
            for i, key in enumerate(k.tolist()):
                if key not in seen:
                    seen.add(key)
                    new.append(i)
                    if len(new) == need:
                        break
            kids_out.append(kids[new])
            keys_out.append(k[new])
            need -= len(new)
            if need == 0:
                break
        return np.concatenate(kids_out), np.concatenate(keys_out)

    def _tournament(self, fit: Objectives, crowd: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.int64]:
        """Binary tournaments: the dominating candidate wins, else the less crowded, else a coin flip."""
        a = self.rng.integers(len(fit), size=n)
        b = self.rng.integers(len(fit), size=n)
        fa, fb = fit[a], fit[b]
        a_dom = np.all(fa <= fb, axis=1) & np.any(fa < fb, axis=1)
        b_dom = np.all(fb <= fa, axis=1) & np.any(fb < fa, axis=1)
        coin = self.rng.random(n) < 0.5
        by_crowd = np.where(crowd[a] == crowd[b], coin, crowd[a] > crowd[b])
        pick_a = a_dom | (~b_dom & by_crowd)
        return np.where(pick_a, a, b)

    def crossover(self, p1: States, p2: States) -> States:
        """Single-point crossover over job rows; each pair gives two children."""
        n_pairs, n_jobs = p1.shape[:2]
        point = self.rng.integers(n_jobs, size=(n_pairs, 1)) if n_jobs else np.zeros((n_pairs, 1), np.int64)
        swap = (np.arange(n_jobs) < point) & (self.rng.random((n_pairs, 1)) < self.config.crossover_prob)
        kids = np.concatenate([p1, p2])
        kids[:n_pairs][swap] = p2[swap]
        kids[n_pairs:][swap] = p1[swap]
        return kids

    def mutate(self, problem: AllocationProblem, states: States) -> States:
        """Reset rows to the current allocation, zero random cells, raise random cells."""
        cfg, rng = self.config, self.rng
        p, j, n = states.shape
        states = states.copy()
        reset = rng.random((p, j)) < cfg.reset_prob
        states[reset] = np.broadcast_to(problem.base_state, states.shape)[reset]
        rows = states.reshape(p * j, n)
        hit = np.flatnonzero(rng.random(p * j) < cfg.zero_row_prob)
        sub = rows[hit]
        sub[rng.random(sub.shape) < cfg.zero_cell_prob] = 0
        rows[hit] = sub
        self._raise_cells(problem, states)
        return states

    def _raise_cells(self, problem: AllocationProblem, states: States) -> None:
        """Raise cells to a random value up to the node size, in place.

        On a node with free GPUs each job's cell is picked with probability 1/jobs, and a job already
        on the node is also picked with probability 1/(jobs on the node), independently. Picks are
        drawn sparsely: Bernoulli positions by geometric gaps, then the few occupied cells.
        """
        p, j, n = states.shape
        flat = states.reshape(-1)
        free = (problem.capacity - np.add.reduce(states, axis=1, dtype=np.int16) > 0).reshape(-1)  # (p*n,)
        picks = _bernoulli_positions(self.rng, flat.size, 1.0 / max(j, 1))
        picks = picks[free[_column(picks, j, n)]]
        occupied = np.flatnonzero(flat > 0)  # (on bool: much faster than on int8)
        col = _column(occupied, j, n)
        occupied, col = occupied[free[col]], col[free[col]]
        per_column = np.bincount(col, minlength=p * n)
        extra = occupied[self.rng.random(len(occupied)) * per_column[col] < 1.0]
        cells = np.union1d(picks, extra)
        flat[cells] = self.rng.integers(flat[cells].astype(np.int64), problem.capacity[cells % n] + 1)

    def repair(self, problem: AllocationProblem, states: States) -> States:
        """Make candidates feasible, cutting lower-priority (later) jobs first."""
        states = _avoid_shared_multinode(states)
        states = self._cap_job(states, problem.max_replicas, problem.max_nodes_per_job)
        capped = np.minimum(np.cumsum(states, axis=1, dtype=np.int16), problem.capacity)
        out = capped.astype(np.int8)
        out[:, 1:] -= out[:, :-1].copy()
        if problem.min_replicas.any():
            out[row_sums(out) < problem.min_replicas] = 0
        return out

    def _cap_job(self, states: States, max_replicas: npt.NDArray[np.int64], max_nodes: int | None) -> States:
        """At most ``max_replicas`` replicas and ``max_nodes`` nodes per job, cut in random node order."""
        over = row_sums(states) > max_replicas
        if max_nodes is not None:
            over |= row_sums(states > 0) > max_nodes
        if not over.any():
            return states
        rows = states[over].astype(np.int64)  # (rows, nodes)
        caps = np.broadcast_to(max_replicas, over.shape)[over][:, None]
        shuffle = np.argsort(self.rng.random(rows.shape), axis=1)
        r = np.take_along_axis(rows, shuffle, axis=1)
        r = np.diff(np.minimum(np.cumsum(r, axis=1), caps), axis=1, prepend=0)
        if max_nodes is not None:
            r = np.where(np.cumsum(r > 0, axis=1) > max_nodes, 0, r)
        states = states.copy()
        states[over] = np.take_along_axis(r, np.argsort(shuffle, axis=1), axis=1)
        return states


def _column(index: npt.NDArray[np.int64], num_jobs: int, num_nodes: int) -> npt.NDArray[np.int64]:
    """(candidate, node) column of flat cell indices into a (candidates, jobs, nodes) array."""
    return np.asarray((index // (num_jobs * num_nodes)) * num_nodes + index % num_nodes, dtype=np.int64)


def _bernoulli_positions(rng: np.random.Generator, size: int, prob: float) -> npt.NDArray[np.int64]:
    """Indices in ``range(size)`` each kept independently with probability ``prob`` (geometric gaps)."""
    if prob >= 1.0:
        return np.arange(size, dtype=np.int64)
    batch = int(size * prob + 4 * np.sqrt(size * prob) + 16)
    pos = np.cumsum(rng.geometric(prob, size=batch)) - 1
    while pos[-1] < size - 1:
        pos = np.concatenate([pos, pos[-1] + np.cumsum(rng.geometric(prob, size=batch))])
    return np.asarray(pos[pos < size], dtype=np.int64)


_BYTE_SUM = np.uint64(0x0101010101010101)


def row_sums(x: npt.NDArray[np.integer] | npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Sum over the last axis of small non-negative int8/bool cells (replica counts per job).

    With a last axis that is a multiple of 8 and cells of at most 31, eight cells are summed at once
    by multiplying their bytes, read as one uint64, by 0x0101...01 (the top byte collects the sum);
    about 6x faster than ``sum(axis=-1)`` on these shapes. Other inputs fall back to ``sum``.
    """
    if x.shape[-1] % 8 or x.dtype.itemsize != 1 or not x.flags.c_contiguous or x.size == 0:
        return np.asarray(x.sum(axis=-1), dtype=np.int64)
    words = (x.view(np.uint64) * _BYTE_SUM) >> np.uint64(56)
    total = words[..., 0].copy()
    for k in range(1, words.shape[-1]):
        total += words[..., k]
    return total.astype(np.int64)


def _hash(states: States, weights: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """A random projection of each candidate (exact, wrapping int64): equal candidates give equal keys."""
    return states.reshape(len(states), -1).astype(np.int64) @ weights


def _avoid_shared_multinode(states: States) -> States:
    """Interference avoidance: on each node, cells after the node's first multi-node job are cleared.

    As in the published policy, once a second multi-node job appears on a node (in priority order)
    that job and every later job on the node lose their replicas there.
    """
    occupied = states > 0
    multi = row_sums(occupied) > 1  # (p, j)
    on = occupied & multi[:, :, None]
    shared = np.add.reduce(on, axis=1, dtype=np.int16) > 1  # (p, n): nodes with 2+ multi-node jobs
    if not shared.any():
        return states
    rows = np.flatnonzero(shared.any(axis=1))
    clear = np.cumsum(on[rows], axis=1, dtype=np.int16) > 1
    states = states.copy()
    sub = states[rows]
    sub[clear] = 0
    states[rows] = sub
    return states


def rank_and_crowding(fit: Objectives) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Non-dominated front of each candidate (two objectives) and its crowding distance in the front.

    Candidates are visited in lexicographic order of the objectives; each joins the first front
    whose smallest second objective so far is larger than its own (fronts stay sorted, so a binary
    search finds it), and exact duplicates join their twin's front.
    """
    n = len(fit)
    order = np.lexsort((fit[:, 1], fit[:, 0]))
    f0, f1 = fit[order, 0], fit[order, 1]
    dup = np.r_[False, (f0[1:] == f0[:-1]) & (f1[1:] == f1[:-1])]
    ranks: list[int] = []
    mins: list[float] = []
    for value, is_dup in zip(f1.tolist(), dup.tolist(), strict=True):
        if is_dup:
            ranks.append(ranks[-1])
            continue
        k = bisect.bisect_right(mins, value)
        if k == len(mins):
            mins.append(value)
        else:
            mins[k] = value
        ranks.append(k)
    rank_sorted = np.array(ranks, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = rank_sorted
    crowd = np.zeros(n)
    keep = ~dup
    crowd[order[keep]] = _crowding(f0[keep], f1[keep], rank_sorted[keep])
    return rank, crowd


def _crowding(f0: npt.NDArray[np.float64], f1: npt.NDArray[np.float64],
              rank: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Crowding distance of distinct points sorted by (f0, f1), all fronts at once.

    Within a front of distinct non-dominated points f0 rises as f1 falls, so the neighbours along
    either objective are the same; boundary points (and fronts of one or two) get 1e14.
    """
    o = np.argsort(rank, kind="stable")
    r, a, b = rank[o], f0[o], f1[o]
    first = np.r_[True, r[1:] != r[:-1]]
    last = np.r_[r[1:] != r[:-1], True]
    seg = np.flatnonzero(first)
    seg_id = np.cumsum(first) - 1
    ends = np.r_[seg[1:], len(r)] - 1
    span0 = (a[ends] - a[seg])[seg_id]
    span1 = (b[seg] - b[ends])[seg_id]
    gap0 = np.zeros(len(r))
    gap1 = np.zeros(len(r))
    gap0[1:-1] = a[2:] - a[:-2]
    gap1[1:-1] = b[:-2] - b[2:]
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = (np.where(span0 > 0, gap0 / span0, 0.0) + np.where(span1 > 0, gap1 / span1, 0.0)) / 2
    dist = np.where(first | last, 1e14, dist)
    out = np.empty(len(r))
    out[o] = dist
    return out
