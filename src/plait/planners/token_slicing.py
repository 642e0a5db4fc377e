"""Token-level pipelining (TeraPipe, ICML'21): the optimal slicing of sequences along their tokens, by DP.

A causal transformer's token ``i`` depends only on tokens ``<= i``, so a pipeline of ``K`` stages can work on
slices of one sequence: stage ``k`` starts slice ``j`` as soon as stage ``k - 1`` has finished it (and it has
finished slice ``j - 1`` itself, whose keys and values slice ``j`` attends to). A slice of ``l`` tokens after
``c`` tokens of context takes ``t(l, c)`` on every stage (its attention grows with ``c``), and a pipeline of
slices with times ``t_1 .. t_M`` takes

    T = sum_i t_i + (K - 1) * max_i t_i

(the proportionate flow shop: exact for any order). Sequences are cut at multiples of a granularity of ``g``
tokens (units); the tables below hold ``t[l, c]`` for ``l`` and ``c`` in units.

The max couples the slices, so the search fixes ``t_max``: with slices no slower than ``t_max`` the least sum is
a DP over units, ``S(i) = min_k S(i - k) + t(k, i - k)`` over ``t(k, i - k) <= t_max`` (Algorithm 1 of the
paper), and ``S(n) + (K - 1) * t_max`` bounds a pipeline from above, exactly at the optimum's own maximum.
``t_max`` runs over the distinct table values in ascending order, from the first that admits a slicing (found
by bisection: feasibility only grows with ``t_max``); the paper's pruning stops once ``K * t_max`` reaches the
best found (every slice time counts once in the sum, the slowest ``K`` times), and plait also stops once
``least_sum + (K - 1) * t_max`` does (``least_sum``: the least sum with no bound), which is exact as well.
Values within ``eps`` of a group's first are one group, evaluated once at the group's largest value, so the
answer is at most ``(K - 1) * eps`` above the optimum (``eps = 0``: exact).

Joint with micro-batching (the repository's extension): a batch of ``B`` sequences splits into micro-batches of
sizes ``b`` (each with its own table ``t_b[l, c]``), every micro-batch sliced; for a fixed ``t_max`` each size's
DP gives ``f(b)``, and ``g(B') = min_b g(B' - b) + f(b)`` composes the batch. The DPs run vectorised over a
chunk of ``t_max`` values at once (numpy), so a 2,048-token sequence at granularity 8 (256 units) takes well
under a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from plait.errors import PlaitError

SliceCostFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]  # (micro size, tokens l, context c) -> seconds
MAX_CHUNK = 128  # t_max values evaluated together


class SlicingError(PlaitError):
    """A token-slicing problem that cannot be solved as given (bad sizes, no feasible slicing)."""


@dataclass(frozen=True, kw_only=True)
class SlicingResult:
    """The chosen micro-batches and token slices, and the pipeline time they are predicted to take."""

    slices: tuple[tuple[int, tuple[int, ...]], ...]  # (micro-batch size, slice lengths in tokens) in pipeline order
    times: tuple[float, ...]  # every (micro-batch, slice) cell's time, in pipeline order
    t_max: float  # the slowest cell
    total_s: float  # sum(times) + (num_stages - 1) * t_max
    num_stages: int
    granularity: int = 1  # tokens per unit of the tables
    num_candidates: int  # t_max values the DP was run for (bisection included)
    search_s: float

    @property
    def num_cells(self) -> int:
        """How many (micro-batch, slice) cells the pipeline runs."""
        return len(self.times)

    def compact(self) -> str:
        """The slicing in a few characters, e.g. ``2xb1:[22x80,4x72]`` (two micro-batches of one sequence, each in 22
        slices of 80 tokens then 4 of 72)."""
        runs: list[tuple[int, int, tuple[int, ...]]] = []
        for size, cuts in self.slices:
            if runs and runs[-1][1:] == (size, cuts):
                runs[-1] = (runs[-1][0] + 1, size, cuts)
            else:
                runs.append((1, size, cuts))
        parts = []
        for count, size, cuts in runs:
            head = f"{count}x" if count > 1 else ""
            parts.append(f"{head}b{size}:[{_run_length(cuts)}]")
        return " ".join(parts)


def pipeline_time(times: Sequence[float], num_stages: int) -> float:
    """``sum(times) + (num_stages - 1) * max(times)``: ``K`` stages running the cells in order."""
    if not len(times):
        return 0.0
    return float(sum(times) + (num_stages - 1) * max(times))


def cost_table(cost: SliceCostFn, micro: int, num_units: int, granularity: int = 1) -> np.ndarray:
    """``t[l, c]`` in units (shape ``(n + 1, n + 1)``) from a vectorised cost in tokens; inf where ``l = 0`` or
    ``l + c > n``."""
    n = num_units
    lengths, contexts = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    valid = (lengths >= 1) & (lengths + contexts <= n)
    table = np.full((n + 1, n + 1), np.inf)
    values = cost(micro, lengths[valid] * granularity, contexts[valid] * granularity)
    table[valid] = np.broadcast_to(np.asarray(values, dtype=float), (int(valid.sum()),))
    return table


def whole_sequences(table: np.ndarray) -> np.ndarray:
    """The table with only the unsliced sequence allowed (micro-batch-only pipelining)."""
    t = np.asarray(table, dtype=float)
    out = np.full(t.shape, np.inf)
    n = t.shape[0] - 1
    out[n, 0] = t[n, 0]
    return out


def solve_slicing(table: np.ndarray, num_stages: int, *, eps: float = 0.0, prune: bool = True,
                  granularity: int = 1) -> SlicingResult:
    """The optimal slicing of one sequence with slice times ``table[l, c]`` (units) on ``num_stages`` stages."""
    return solve_joint({1: table}, 1, num_stages, eps=eps, prune=prune, granularity=granularity)


def solve_joint(tables: Mapping[int, np.ndarray], batch: int, num_stages: int, *, eps: float = 0.0,
                prune: bool = True, granularity: int = 1) -> SlicingResult:
    """The optimal split of ``batch`` sequences into micro-batches (sizes: the keys of ``tables``) and of each
    micro-batch into token slices, ``tables[b][l, c]`` being a slice's time for a micro-batch of ``b``."""
    t0 = time.perf_counter()
    sizes, stacked = _validate(tables, batch, num_stages, eps, granularity)
    problem = _Problem(sizes=sizes, matrix=_slice_matrices(stacked), batch=batch, num_stages=num_stages)
    thr, tried = _search(problem, eps=eps, prune=prune)
    return _result(problem, thr, tried, granularity, time.perf_counter() - t0)


def slice_tokens(cost: SliceCostFn, seq_len: int, num_stages: int, *, granularity: int = 8, batch: int = 1,
                 micro_sizes: Sequence[int] | None = None, eps: float = 0.0) -> SlicingResult:
    """The best micro-batching and token slicing of ``batch`` sequences of ``seq_len`` tokens, cut at multiples of
    ``granularity``, for a cost in tokens ``cost(micro, l, c)`` (vectorised over ``l`` and ``c``)."""
    if granularity < 1 or seq_len < 1 or seq_len % granularity:
        raise SlicingError(f"sequence length {seq_len} is not a positive multiple of the granularity {granularity}; "
                           f"choose a granularity that divides it")
    sizes = range(1, batch + 1) if micro_sizes is None else micro_sizes
    units = seq_len // granularity
    tables = {int(b): cost_table(cost, int(b), units, granularity) for b in sizes}
    return solve_joint(tables, batch, num_stages, eps=eps, granularity=granularity)


# ---- internals ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    sizes: tuple[int, ...]
    matrix: np.ndarray  # (sizes, n + 1, n + 1): matrix[s, j, i] = time of units [j, i) at size sizes[s]
    batch: int
    num_stages: int


def _validate(tables: Mapping[int, np.ndarray], batch: int, num_stages: int, eps: float,
              granularity: int) -> tuple[tuple[int, ...], np.ndarray]:
    if int(num_stages) != num_stages or num_stages < 1:
        raise SlicingError(f"num_stages must be a positive integer, got {num_stages!r}")
    if int(batch) != batch or batch < 1:
        raise SlicingError(f"batch must be a positive integer, got {batch!r}")
    if not eps >= 0:
        raise SlicingError(f"eps must be >= 0, got {eps!r}")
    if granularity < 1:
        raise SlicingError(f"granularity must be >= 1, got {granularity!r}")
    sizes = tuple(sorted(int(b) for b in tables))
    if not sizes or sizes[0] < 1 or sizes[-1] > batch:
        raise SlicingError(f"micro-batch sizes must lie in 1..{batch} (the batch), got {list(sizes)}")
    arrays = [np.asarray(tables[b], dtype=float) for b in sizes]
    shape = arrays[0].shape
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2:
        raise SlicingError(f"a cost table must be square (n + 1, n + 1) with n >= 1 units, got shape {shape}")
    for b, a in zip(sizes, arrays, strict=True):
        if a.shape != shape:
            raise SlicingError(f"the table of micro-batch size {b} has shape {a.shape}, the others {shape}")
        if np.isnan(a).any() or (a < 0).any():
            raise SlicingError(f"the table of micro-batch size {b} holds NaN or negative times")
    return sizes, np.stack(arrays)


def _slice_matrices(tables: np.ndarray) -> np.ndarray:
    """``t[l, c]`` tables as ``m[j, i]``, the time of the slice of units ``[j, i)`` (inf unless ``j < i``)."""
    n = tables.shape[1] - 1
    starts, stops = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    valid = stops > starts
    out = np.full(tables.shape, np.inf)
    out[:, valid] = tables[:, stops[valid] - starts[valid], starts[valid]]
    return out


def _least_sums(matrix: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Per size and threshold, the least sum of slice times covering all units with every slice ``<= thr``
    (inf when none): shape ``(sizes, len(thr))``."""
    num_sizes, n = matrix.shape[0], matrix.shape[1] - 1
    best = np.full((num_sizes, len(thr), n + 1), np.inf)
    best[:, :, 0] = 0.0
    limit = thr[None, :, None]
    longest = _longest(matrix, float(thr.max()))
    for i in range(1, n + 1):
        lo = max(0, i - longest)
        col = matrix[:, None, lo:i, i]  # slices ending at unit i, by start (no longer one fits under thr)
        reach = np.where(col <= limit, best[:, :, lo:i] + col, np.inf)
        best[:, :, i] = reach.min(axis=2)
    return best[:, :, n]


def _longest(matrix: np.ndarray, thr: float) -> int:
    """The most units any slice no slower than ``thr`` spans (at least 1)."""
    starts, stops = np.nonzero((matrix <= thr).any(axis=0))
    return max(1, int((stops - starts).max())) if len(starts) else 1


def _compose(sizes: Sequence[int], per_size: np.ndarray, batch: int) -> np.ndarray:
    """Per threshold, the least total over compositions of ``batch`` into the sizes: shape ``(len(thr),)``."""
    g = np.full((per_size.shape[1], batch + 1), np.inf)
    g[:, 0] = 0.0
    for total in range(1, batch + 1):
        for s, b in enumerate(sizes):
            if b <= total:
                np.minimum(g[:, total], g[:, total - b] + per_size[s], out=g[:, total])
    return g[:, batch]


def _joint(problem: _Problem, thr: np.ndarray) -> np.ndarray:
    """The least sum of all cells per threshold (inf where no slicing fits under it)."""
    return _compose(problem.sizes, _least_sums(problem.matrix, thr), problem.batch)


def _groups(values: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Ascending groups of ``values`` (distinct, sorted) spanning at most ``eps``: (first, last) of each."""
    if eps <= 0 or len(values) < 2:
        return values, values
    firsts, lasts = [], []
    i = 0
    while i < len(values):
        j = int(np.searchsorted(values, values[i] + eps, side="right"))
        firsts.append(values[i])
        lasts.append(values[j - 1])
        i = j
    return np.array(firsts), np.array(lasts)


def _search(problem: _Problem, *, eps: float, prune: bool) -> tuple[float, int]:
    """The threshold of the best pipeline and the number of thresholds evaluated."""
    values = np.unique(problem.matrix[np.isfinite(problem.matrix)])
    least = float(_joint(problem, np.array([np.inf]))[0])
    if not np.isfinite(least):
        raise SlicingError(f"no split of the batch of {problem.batch} into micro-batches of sizes {list(problem.sizes)} "
                           f"has a slicing with finite times; give finite times for some slicing")
    firsts, lasts = _groups(values, eps)
    k = problem.num_stages
    if k == 1 and prune:  # the step is the least sum itself
        return np.inf, 1
    start, tried = (_first_feasible(problem, lasts) if prune else (0, 0))
    best, best_thr = np.inf, np.inf
    chunk = 8
    while start < len(lasts):
        stop = min(start + chunk, len(lasts))
        if prune:  # no group whose first value is this large can beat the best
            bound = np.maximum(k * firsts[start:stop], least + (k - 1) * firsts[start:stop])
            stop = start + int(np.searchsorted(bound >= best, True))
            if stop == start:
                break
        thr = lasts[start:stop]
        totals = _joint(problem, thr) + (k - 1) * thr
        tried += len(thr)
        at = int(np.argmin(totals))
        if totals[at] < best:
            best, best_thr = float(totals[at]), float(thr[at])
        start, chunk = stop, min(2 * chunk, MAX_CHUNK)
    return best_thr, tried


def _first_feasible(problem: _Problem, thresholds: np.ndarray) -> tuple[int, int]:
    """Index of the least threshold admitting a slicing (the last one does), and the DPs the bisection ran."""
    lo, hi, tried = 0, len(thresholds) - 1, 0
    while lo < hi:
        mid = (lo + hi) // 2
        tried += 1
        if np.isfinite(_joint(problem, thresholds[mid:mid + 1])[0]):
            hi = mid
        else:
            lo = mid + 1
    return lo, tried


def _slicing_under(matrix: np.ndarray, thr: float) -> tuple[float, tuple[int, ...]]:
    """The least sum under ``thr`` for one size's slice matrix and its slices (units), by back-pointers."""
    n = matrix.shape[0] - 1
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    back = np.zeros(n + 1, dtype=int)
    for i in range(1, n + 1):
        col = matrix[:i, i]
        reach = np.where(col <= thr, best[:i] + col, np.inf)
        back[i] = int(np.argmin(reach))
        best[i] = reach[back[i]]
    cuts: list[int] = []
    i = n
    while i > 0 and np.isfinite(best[n]):
        cuts.append(int(i - back[i]))
        i = int(back[i])
    return float(best[n]), tuple(reversed(cuts))


def _result(problem: _Problem, thr: float, tried: int, granularity: int, search_s: float) -> SlicingResult:
    """Back-pointers at the chosen threshold: the micro-batches (largest first) and their slices."""
    per_size = [_slicing_under(problem.matrix[s], thr) for s in range(len(problem.sizes))]
    g = [0.0] + [np.inf] * problem.batch
    pick = [0] * (problem.batch + 1)
    for total in range(1, problem.batch + 1):
        for s, b in enumerate(problem.sizes):
            if b <= total and g[total - b] + per_size[s][0] < g[total]:
                g[total], pick[total] = g[total - b] + per_size[s][0], s
    chosen, left = [], problem.batch
    while left > 0:
        chosen.append(pick[left])
        left -= problem.sizes[pick[left]]
    chosen.sort(key=lambda s: -problem.sizes[s])
    slices, times = [], []
    for s in chosen:
        cuts = per_size[s][1]
        context = 0
        for length in cuts:
            times.append(float(problem.matrix[s, context, context + length]))
            context += length
        slices.append((problem.sizes[s], tuple(c * granularity for c in cuts)))
    return SlicingResult(slices=tuple(slices), times=tuple(times), t_max=max(times),
                         total_s=pipeline_time(times, problem.num_stages), num_stages=problem.num_stages,
                         granularity=granularity, num_candidates=max(1, tried), search_s=search_s)


def _run_length(cuts: Sequence[int]) -> str:
    """``512,3x256,128``: equal neighbours folded."""
    out: list[str] = []
    i = 0
    while i < len(cuts):
        j = i
        while j < len(cuts) and cuts[j] == cuts[i]:
            j += 1
        out.append(f"{j - i}x{cuts[i]}" if j - i > 1 else str(cuts[i]))
        i = j
    return ",".join(out)
