"""Intra-operator sharding as an integer linear program on plain arrays, solved with HiGHS.

Each node v (an operator or a parameter) picks one of its k_v choices (sharding strategies) with
cost c_v[i] and per-device memory m_v[i]. An edge e = (u, v) carries a tensor; its cost depends only
on the group of u's choice (its output placement) and the group of v's choice (the placement v
needs): R_e[g_u(i), g_v(j)]. With multiplicities n (repeated layers share one decision), minimise

    sum_v n_v c_v[x_v] + sum_e n_e R_e[g_u(x_u), g_v(x_v)]   subject to   sum_v n_v m_v[x_v] <= M;

inf marks a forbidden choice or pair.

Formulation (the intra-op ILP of the auto-sharding literature, in group form):

* one-hot binaries s_v with sum_i s_v[i] = 1; a forbidden choice has upper bound 0;
* per edge, continuous e[a, b] >= 0 over group pairs with marginals
  sum_b e[a, b] = sum_{i: g_u(i) = a} s_u[i] and sum_a e[a, b] = sum_{j: g_v(j) = b} s_v[j];
  a forbidden pair has upper bound 0. One column marginal per edge follows from the others and is
  left out. Pairs are over groups, so an edge between nodes with many strategies but few placements
  stays small;
* objective sum_v n_v c_v . s_v + sum_e n_e R_e . e; memory is one row sum_v n_v m_v . s_v <= M.

Presolve (exact): inf choices are dropped; arc consistency over edges with forbidden pairs drops
choices that no finite assignment can use; nodes left with one choice are fixed; an edge whose cost
over the groups still possible is separable (R[a, b] = r[a] + c[b]: all-zero and constant matrices,
and every edge at a fixed node) is folded into its endpoints' costs. Only the rest get pair variables.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import highspy
import numpy as np
import scipy.sparse as sp

from plait.errors import NoFeasiblePlanError
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

__all__ = ["ILPEdge", "ILPProblem", "ILPSolution", "ILPStats", "evaluate", "solve_ilp"]

_MAX_EXPLAINED_EDGES = 64  # above this many edges with forbidden pairs, an error names them without search


@dataclass(frozen=True)
class _Options:
    time_limit_s: float | None
    mip_rel_gap: float
    threads: int | None


@dataclass
class _Pair:
    """An edge that keeps pair variables: group position of each domain entry, count-scaled costs."""

    src: int
    dst: int
    src_pos: np.ndarray
    dst_pos: np.ndarray
    costs: np.ndarray


@dataclass
class _Reduced:
    """The problem after presolve: per-node domains with count-scaled costs and memory, kept edges."""

    domains: list[np.ndarray]
    costs: list[np.ndarray]
    memory: list[np.ndarray]
    pairs: list[_Pair]

    def free(self) -> list[int]:
        """Nodes left with more than one choice."""
        return [v for v, dom in enumerate(self.domains) if len(dom) > 1]


def solve_ilp(
    problem: ILPProblem,
    *,
    time_limit_s: float | None = None,
    mip_rel_gap: float = 0.0,
    threads: int | None = 1,
) -> ILPSolution:
    """One choice per node at least total cost within the memory limit, found by HiGHS.

    ``mip_rel_gap`` 0 (the absolute gap is then 0 too) makes the answer exact; a positive gap or a
    ``time_limit_s`` trades optimality for time (status "time_limit" when the limit ended the search).
    ``threads`` is HiGHS's thread count; 1 keeps small solves cheap.
    """
    options = _Options(time_limit_s, mip_rel_gap, threads)
    start = time.perf_counter()
    reduced = _presolve(problem, range(len(problem.edges)))
    budget = _memory_budget(problem, reduced)
    if budget is not None and sum(float(reduced.memory[v].min()) for v in reduced.free()) > budget:
        raise _explain(problem, reduced, options)
    lp, columns = _build(reduced, reduced.costs, reduced.pairs, budget)
    built = time.perf_counter()
    values, status = _run(lp, options)
    solved = time.perf_counter()
    if values is None:
        raise _explain(problem, reduced, options)
    choices = _choices(reduced, columns, values)
    objective, memory = evaluate(problem, choices)
    stats = ILPStats(
        num_vars=lp.num_col_,
        num_int_vars=sum(len(reduced.domains[v]) for v in reduced.free()),
        num_rows=lp.num_row_,
        num_nonzeros=len(lp.a_matrix_.value_),
        num_nodes=problem.num_nodes,
        num_fixed_nodes=problem.num_nodes - len(reduced.free()),
        num_edges=len(problem.edges),
        num_pair_edges=len(reduced.pairs),
        build_s=built - start,
        solve_s=solved - built,
    )
    return ILPSolution(choices, objective, memory, status, stats)


def _presolve(problem: ILPProblem, edge_ids: Iterable[int]) -> _Reduced:
    """Domains after dropping inf choices and arc consistency; separable edges folded into node costs."""
    edge_ids = list(edge_ids)
    masks = [np.isfinite(c) for c in problem.costs]
    for v, mask in enumerate(masks):
        if not mask.any():
            raise no_choice_error(problem, v)
    _arc_consistency(problem, masks, edge_ids)
    domains = [np.flatnonzero(mask) for mask in masks]
    counts = problem.node_counts
    costs = [counts[v] * problem.costs[v][dom] for v, dom in enumerate(domains)]
    memory = [counts[v] * problem.node_memory(v)[dom] for v, dom in enumerate(domains)]
    pairs = []
    for k in edge_ids:
        edge = problem.edges[k]
        src_groups, src_pos = np.unique(edge.src_groups[domains[edge.src]], return_inverse=True)
        dst_groups, dst_pos = np.unique(edge.dst_groups[domains[edge.dst]], return_inverse=True)
        matrix = edge.count * edge.costs[np.ix_(src_groups, dst_groups)]
        split = _separate(matrix)
        if split is None:
            pairs.append(_Pair(edge.src, edge.dst, src_pos, dst_pos, matrix))
        else:
            costs[edge.src] = costs[edge.src] + split[0][src_pos]
            costs[edge.dst] = costs[edge.dst] + split[1][dst_pos]
    return _Reduced(domains, costs, memory, pairs)


def _arc_consistency(problem: ILPProblem, masks: list[np.ndarray], edge_ids: list[int]) -> None:
    """Drop choices no finite pair of some edge supports, until nothing changes; raise when a node empties."""
    allowed = {k: np.isfinite(problem.edges[k].costs) for k in edge_ids}
    allowed = {k: ok for k, ok in allowed.items() if not ok.all()}
    incident: dict[int, list[int]] = defaultdict(list)
    for k in allowed:
        incident[problem.edges[k].src].append(k)
        incident[problem.edges[k].dst].append(k)
    queue, queued = deque(allowed), set(allowed)
    while queue:
        k = queue.popleft()
        queued.discard(k)
        for node in _revise(problem.edges[k], allowed[k], masks):
            if not masks[node].any():
                raise blocked_error(problem, [k])
            fresh = [j for j in incident[node] if j not in queued]
            queue.extend(fresh)
            queued.update(fresh)


def _revise(edge: ILPEdge, allowed: np.ndarray, masks: list[np.ndarray]) -> list[int]:
    """Shrink both endpoint masks of one edge to choices with a finite partner; return the nodes changed."""
    changed = []
    dst_present = np.zeros(allowed.shape[1], dtype=bool)
    dst_present[edge.dst_groups[masks[edge.dst]]] = True
    src_mask = masks[edge.src] & np.asarray(allowed[:, dst_present].any(axis=1))[edge.src_groups]
    if not np.array_equal(src_mask, masks[edge.src]):
        masks[edge.src] = src_mask
        changed.append(edge.src)
    src_present = np.zeros(allowed.shape[0], dtype=bool)
    src_present[edge.src_groups[src_mask]] = True
    dst_mask = masks[edge.dst] & np.asarray(allowed[src_present, :].any(axis=0))[edge.dst_groups]
    if not np.array_equal(dst_mask, masks[edge.dst]):
        masks[edge.dst] = dst_mask
        changed.append(edge.dst)
    return changed


def _separate(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Row and column terms (r, c) with matrix = r[:, None] + c[None, :], or None when there are none."""
    if not np.isfinite(matrix).all():
        return None
    rows, cols = matrix[:, 0], matrix[0, :] - matrix[0, 0]
    error = np.abs(matrix - rows[:, None] - cols[None, :]).max()
    return (rows, cols) if error <= 1e-12 * np.abs(matrix).max() else None


def _memory_budget(problem: ILPProblem, reduced: _Reduced) -> float | None:
    """The memory limit left for free nodes once fixed nodes take theirs (None without a limit)."""
    if problem.memory_limit is None:
        return None
    fixed = sum(float(m[0]) for m, dom in zip(reduced.memory, reduced.domains, strict=True) if len(dom) == 1)
    return problem.memory_limit - fixed


def _build(
    reduced: _Reduced, node_costs: list[np.ndarray], pairs: list[_Pair], budget: float | None
) -> tuple[highspy.HighsLp, dict[int, int]]:
    """The HiGHS model in bulk (column-wise sparse matrix) and the first column of each free node."""
    columns: dict[int, int] = {}
    col_cost: list[np.ndarray] = []
    col_upper: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    row_bound: list[float] = []
    num_cols = 0
    for v in reduced.free():
        size = len(reduced.domains[v])
        columns[v] = num_cols
        col_cost.append(node_costs[v])
        col_upper.append(np.ones(size))
        rows.append(np.full(size, len(row_bound)))
        cols.append(num_cols + np.arange(size))
        vals.append(np.ones(size))
        row_bound.append(1.0)
        num_cols += size
    num_int = num_cols
    # Pair columns stay continuous: once s is integral both marginals are one-hot, and a nonnegative
    # matrix with one-hot row and column sums has a single 1 at the chosen pair, so e is integral too.
    for pair in pairs:
        pair_rows, pair_cols, pair_vals = _pair_triplets(pair, columns, num_cols, len(row_bound))
        rows.append(pair_rows)
        cols.append(pair_cols)
        vals.append(pair_vals)
        n_src, n_dst = pair.costs.shape
        finite = np.isfinite(pair.costs).ravel()
        col_cost.append(np.where(finite, pair.costs.ravel(), 0.0))
        col_upper.append(finite.astype(float))
        row_bound.extend([0.0] * (n_src + n_dst - 1))
        num_cols += n_src * n_dst
    lower = np.array(row_bound)
    upper = lower.copy()
    if budget is not None:
        rows.append(np.full(num_int, len(row_bound)))
        cols.append(np.arange(num_int))
        vals.append(np.concatenate([reduced.memory[v] for v in columns]) if columns else np.zeros(0))
        lower, upper = np.append(lower, -highspy.kHighsInf), np.append(upper, budget)
    return _lp(col_cost, col_upper, num_int, (rows, cols, vals), (lower, upper)), columns


def _pair_triplets(
    pair: _Pair, columns: dict[int, int], first_col: int, first_row: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marginal rows of one edge: e's row sums equal the src group sums of s, column sums the dst ones."""
    n_src, n_dst = pair.costs.shape
    # The last column-sum row is implied (both sides sum to 1), so only n_dst - 1 of them are kept.
    cells = np.arange(n_src * n_dst)
    a, b = cells // n_dst, cells % n_dst
    kept_b = b < n_dst - 1
    kept_dst = pair.dst_pos < n_dst - 1
    col_rows = first_row + n_src
    row_idx = [
        first_row + a,
        col_rows + b[kept_b],
        first_row + pair.src_pos,
        col_rows + pair.dst_pos[kept_dst],
    ]
    col_idx = [
        first_col + cells,
        first_col + cells[kept_b],
        columns[pair.src] + np.arange(len(pair.src_pos)),
        columns[pair.dst] + np.flatnonzero(kept_dst),
    ]
    signs = [1.0, 1.0, -1.0, -1.0]
    values = [np.full(len(r), s) for r, s in zip(row_idx, signs, strict=True)]
    return np.concatenate(row_idx), np.concatenate(col_idx), np.concatenate(values)


def _lp(
    col_cost: list[np.ndarray],
    col_upper: list[np.ndarray],
    num_int: int,
    triplets: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]],
    row_bounds: tuple[np.ndarray, np.ndarray],
) -> highspy.HighsLp:
    """A HighsLp from column data, COO triplets and row bounds; the first ``num_int`` columns are integer."""
    costs = np.concatenate(col_cost) if col_cost else np.zeros(0)
    num_cols, num_rows = len(costs), len(row_bounds[0])
    rows, cols, vals = (np.concatenate(t) if t else np.zeros(0) for t in triplets)
    matrix = sp.csc_matrix((vals, (rows.astype(np.int64), cols.astype(np.int64))), shape=(num_rows, num_cols))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = num_cols, num_rows
    lp.col_cost_, lp.col_lower_ = costs, np.zeros(num_cols)
    lp.col_upper_ = np.concatenate(col_upper) if col_upper else np.zeros(0)
    lp.row_lower_, lp.row_upper_ = row_bounds
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = matrix.indptr.astype(np.int32)
    lp.a_matrix_.index_ = matrix.indices.astype(np.int32)
    lp.a_matrix_.value_ = matrix.data
    lp.integrality_ = [highspy.HighsVarType.kInteger] * num_int + [highspy.HighsVarType.kContinuous] * (
        num_cols - num_int
    )
    return lp


def _run(lp: highspy.HighsLp, options: _Options) -> tuple[np.ndarray | None, str]:
    """Solve with HiGHS: (column values, "optimal" | "time_limit"), or (None, "infeasible")."""
    if lp.num_col_ == 0:
        feasible = bool(np.all(np.asarray(lp.row_upper_) >= -1e-9))
        return (np.zeros(0), "optimal") if feasible else (None, "infeasible")
    highs = _quiet_highs()
    highs.setOptionValue("mip_rel_gap", options.mip_rel_gap)
    if options.mip_rel_gap == 0.0:
        highs.setOptionValue("mip_abs_gap", 0.0)
    if options.time_limit_s is not None:
        highs.setOptionValue("time_limit", float(options.time_limit_s))
    if options.threads is not None:
        highs.setOptionValue("threads", int(options.threads))
    if highs.passModel(lp) == highspy.HighsStatus.kError:
        raise RuntimeError("HiGHS rejected the sharding ILP model")
    if (
        highs.run() == highspy.HighsStatus.kError
        and highs.getModelStatus() == highspy.HighsModelStatus.kNotset
    ):
        # HiGHS keeps one thread pool per process; a different thread count needs a fresh one.
        highspy.Highs.resetGlobalScheduler(True)
        highs.run()
    return _outcome(highs, options)


def _quiet_highs() -> highspy.Highs:
    """A HiGHS instance with its output off; its constructor prints a banner from C++, kept off stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 1)
            highs = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    highs.setOptionValue("output_flag", False)
    return highs


def _outcome(highs: highspy.Highs, options: _Options) -> tuple[np.ndarray | None, str]:
    """Read the solver's verdict and solution."""
    status = highs.getModelStatus()
    if status == highspy.HighsModelStatus.kOptimal:
        return np.asarray(highs.getSolution().col_value), "optimal"
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
        return None, "infeasible"
    if status == highspy.HighsModelStatus.kTimeLimit:
        if highs.getInfo().primal_solution_status == 2:  # a feasible point was found
            return np.asarray(highs.getSolution().col_value), "time_limit"
        raise NoFeasiblePlanError(
            f"the sharding ILP found no assignment within its time limit of {options.time_limit_s} s; "
            "raise the time limit or shrink the problem (fewer strategies per operator)"
        )
    raise RuntimeError(f"HiGHS stopped with status {highs.modelStatusToString(status)}")


def _choices(reduced: _Reduced, columns: dict[int, int], values: np.ndarray) -> tuple[int, ...]:
    """Map the solver's one-hot columns back to one choice index per node."""
    choices = []
    for v, dom in enumerate(reduced.domains):
        pick = int(np.argmax(values[columns[v] : columns[v] + len(dom)])) if v in columns else 0
        choices.append(int(dom[pick]))
    return tuple(choices)


def _explain(problem: ILPProblem, reduced: _Reduced, options: _Options) -> NoFeasiblePlanError:
    """The error for an infeasible problem: memory (with the least reachable memory) or blocking edges."""
    if problem.memory_limit is not None:
        blocking = [p for p in reduced.pairs if not np.isfinite(p.costs).all()]
        lp, columns = _build(reduced, reduced.memory, blocking, None)
        values, _ = _run(lp, options)
        if values is not None:
            return memory_error(problem, evaluate(problem, _choices(reduced, columns, values))[1])
    return blocked_error(problem, _blocking_edges(problem, options))


def _blocking_edges(problem: ILPProblem, options: _Options) -> list[int]:
    """A minimal set of edges whose forbidden pairs together leave no finite assignment."""
    candidates = [k for k, e in enumerate(problem.edges) if not np.isfinite(e.costs).all()]
    if len(candidates) > _MAX_EXPLAINED_EDGES:
        return candidates
    return minimal_blocking(candidates, _feasibility(problem, options))


def _feasibility(problem: ILPProblem, options: _Options) -> Callable[[Sequence[int]], bool]:
    """A test: does some finite assignment exist when only the given edges count?"""

    def feasible(edge_ids: Sequence[int]) -> bool:
        try:
            reduced = _presolve(problem, edge_ids)
        except NoFeasiblePlanError:
            return False
        zero = [np.zeros(len(dom)) for dom in reduced.domains]
        lp, _ = _build(reduced, zero, reduced.pairs, None)
        return _run(lp, options)[0] is not None

    return feasible
