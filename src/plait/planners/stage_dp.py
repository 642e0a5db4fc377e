"""Pipeline stages by dynamic programming (Alpa's inter-operator pass, OSDI'22 §5), on plain numbers.

The model is a chain of ``L`` layers; the cluster offers submeshes (each with a device count). A stage
candidate is a contiguous layer range ``[start, stop)`` on one submesh under one intra-op configuration,
with its time for one micro-batch (forward + backward, plus sending its boundary activation to the next
stage and receiving the gradient back: plait charges the boundary, Alpa did not) and ``max_after``, the most
stages that may follow it before its memory overflows (1F1B keeps ``stages after it + 1`` micro-batches of
activations alive); and ``once_s``, work the stage does once per step outside the pipeline (its
gradient all-reduce and optimizer step; counted whole, as if none of it overlapped). A pipeline of stages
with times ``t_i`` and ``o_i`` over ``B`` micro-batches takes

    T = sum_i (t_i + o_i) + (B - 1) * max_i t_i

and uses every device exactly once. ``solve_stages`` enumerates ``t_max`` over the distinct candidate
times in ascending order; for each, a DP over (first layer, stages, devices) finds the least ``sum t_i`` of
the candidates no slower than ``t_max`` (with their ``o_i``), and ``sum + (B - 1) * t_max`` bounds a feasible
pipeline from above, exactly at the optimum's own maximum. Feasibility only grows with ``t_max``, so a
binary search finds the first feasible one; from there the search ascends and stops once
``(B - 1) * t_max`` plus the least sum of any pipeline (or ``t_max`` if larger) reaches the best found, since
no later ``t_max`` can beat it. With one micro-batch the step is the least sum itself.

The DP runs on arrays (``StageTable``, one entry per candidate; ``plait.planners.stage_tables``). When every
candidate's submesh has the same size, every pipeline has ``devices / size`` stages and the device axis
drops out of the table (Alpa's DP on pipelines of one submesh shape).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plait.errors import PlaitError
from plait.planners.stage_tables import StageTable, least_sum


class StageError(PlaitError):
    """No pipeline of the candidates covers the layers with exactly the cluster's devices within memory."""


@dataclass(frozen=True, kw_only=True)
class StageCandidate:
    """Layers ``[start, stop)`` on submesh ``submesh`` under intra-op configuration ``config``."""

    start: int
    stop: int
    submesh: int
    config: int = 0
    time_s: float  # one micro-batch's forward + backward and its boundary transfers
    max_after: int  # the most stages that may follow it (memory); a large number when memory is no concern
    once_s: float = 0.0  # once per step, outside the pipeline: gradient sync and optimizer step


@dataclass(frozen=True, kw_only=True)
class StageProblem:
    """The layers, the submeshes' device counts, the devices to use exactly, micro-batches, candidates."""

    num_layers: int
    submesh_devices: tuple[int, ...]
    num_devices: int
    num_micro: int
    candidates: tuple[StageCandidate, ...]

    def validate(self) -> None:
        """Raise ``StageError`` naming the first malformed field."""
        if self.num_layers < 1 or self.num_devices < 1 or self.num_micro < 1:
            raise StageError(f"layers, devices and micro-batches must be positive, got {self.num_layers}, "
                             f"{self.num_devices}, {self.num_micro}")
        if any(d < 1 for d in self.submesh_devices):
            raise StageError(f"every submesh needs at least one device, got {self.submesh_devices}")
        for c in self.candidates:
            if not 0 <= c.start < c.stop <= self.num_layers:
                raise StageError(f"candidate layers [{c.start}, {c.stop}) are not inside [0, {self.num_layers})")
            if not 0 <= c.submesh < len(self.submesh_devices):
                raise StageError(f"candidate submesh {c.submesh} is not one of the {len(self.submesh_devices)} submeshes")
            if not (c.time_s >= 0 and c.once_s >= 0) or c.max_after < 0:
                raise StageError(f"candidate {c} needs times >= 0 and max_after >= 0")

    def table(self) -> StageTable:
        """The candidates as arrays."""
        cands = self.candidates
        return StageTable(
            start=np.array([c.start for c in cands], dtype=np.int64),
            stop=np.array([c.stop for c in cands], dtype=np.int64),
            devices=np.array([self.submesh_devices[c.submesh] for c in cands], dtype=np.int64),
            time_s=np.array([c.time_s for c in cands], dtype=float),
            once_s=np.array([c.once_s for c in cands], dtype=float),
            max_after=np.array([c.max_after for c in cands], dtype=np.int64),
        )


@dataclass(frozen=True)
class StageSolution:
    """The chosen stages in layer order, the pipeline's step time and how the search went."""

    stages: tuple[StageCandidate, ...]
    step_s: float
    t_max_tried: int
    t_max_total: int
    solve_s: float


@dataclass(frozen=True)
class TableSolution:
    """The DP's answer on a ``StageTable``: chosen candidate indices (first stage first) and the step."""

    picks: tuple[int, ...]
    step_s: float  # sum (t_i + o_i) + (B - 1) * max t_i of the chosen stages
    t_max_tried: int
    t_max_total: int


def pipeline_time(times: Sequence[float], num_micro: int, once: Sequence[float] = ()) -> float:
    """``sum(times) + sum(once) + (num_micro - 1) * max(times)``: a synchronous pipeline's step over
    ``num_micro`` micro-batches, with each stage's once-per-step work ``once`` added whole."""
    return float(sum(times) + sum(once) + (num_micro - 1) * max(times))


def stage_step(stages: Sequence[StageCandidate], num_micro: int) -> float:
    """The pipeline step of these stages (``pipeline_time`` of their times and once-per-step work)."""
    return pipeline_time([s.time_s for s in stages], num_micro, [s.once_s for s in stages])


def solve_stages(problem: StageProblem) -> StageSolution:
    """The fastest pipeline of ``problem``'s candidates (see the module docstring); ``StageError`` if none."""
    problem.validate()
    t0 = time.perf_counter()
    found = solve_table(problem.table(), num_layers=problem.num_layers, num_devices=problem.num_devices,
                        num_micro=problem.num_micro)
    if found is None:
        raise StageError(_no_pipeline(problem))
    stages = tuple(problem.candidates[i] for i in found.picks)
    return StageSolution(stages=stages, step_s=stage_step(stages, problem.num_micro), t_max_tried=found.t_max_tried,
                         t_max_total=found.t_max_total, solve_s=time.perf_counter() - t0)


def solve_table(table: StageTable, *, num_layers: int, num_devices: int, num_micro: int,
                bound: float = np.inf) -> TableSolution | None:
    """The fastest pipeline of the table's candidates whose step is below ``bound``; None when there is none
    (no pipeline at all, or none faster than ``bound``: the search stops as soon as none can be)."""
    usable = table.devices <= num_devices
    if not usable.all():
        table = table.take(np.flatnonzero(usable))
    index = np.flatnonzero(usable)
    levels = _levels(table.time_s)
    unbounded = least_sum(table, num_layers, num_devices, np.inf) if len(levels) else None
    if unbounded is None or unbounded[0] >= bound:
        return None
    floor = unbounded[0]  # no t_max has a smaller least sum
    if num_micro == 1:  # the step is the sum itself
        return _solution(table, index, unbounded[1], num_micro, 1, len(levels))
    first, tried = _first_feasible(table, num_layers, num_devices, levels)
    best: tuple[float, list[int]] | None = None
    limit = bound
    for t_max in levels[first:]:
        if (num_micro - 1) * t_max + max(floor, t_max) >= limit:
            break
        tried += 1
        found = least_sum(table, num_layers, num_devices, t_max)
        if found is None:
            continue
        total = found[0] + (num_micro - 1) * t_max
        if total < limit:
            best, limit = (total, found[1]), total
    if best is None:
        return None
    return _solution(table, index, best[1], num_micro, tried, len(levels))


def _levels(times: np.ndarray) -> np.ndarray:
    """The distinct candidate times in ascending order (times within 1e-12 of the previous one merged)."""
    levels = np.unique(times)
    if len(levels) < 2:
        return levels
    keep = np.ones(len(levels), dtype=bool)
    previous = levels[0]
    for i in range(1, len(levels)):
        if levels[i] - previous <= 1e-12 * max(1.0, levels[i]):
            keep[i] = False
        else:
            previous = levels[i]
    return levels[keep]


def _first_feasible(table: StageTable, num_layers: int, num_devices: int, levels: np.ndarray) -> tuple[int, int]:
    """The index of the least ``t_max`` admitting a pipeline (the last one does), and the DPs it took."""
    lo, hi, tried = 0, len(levels) - 1, 0
    while lo < hi:
        mid = (lo + hi) // 2
        tried += 1
        if least_sum(table, num_layers, num_devices, float(levels[mid])) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo, tried


def _solution(table: StageTable, index: np.ndarray, picks: list[int], num_micro: int, tried: int,
              total: int) -> TableSolution:
    times = [float(table.time_s[i]) for i in picks]
    once = [float(table.once_s[i]) for i in picks]
    return TableSolution(picks=tuple(int(index[i]) for i in picks), step_s=pipeline_time(times, num_micro, once),
                         t_max_tried=tried, t_max_total=total)


def _no_pipeline(problem: StageProblem) -> str:
    sizes = sorted(set(problem.submesh_devices))
    return (f"no pipeline of the {len(problem.candidates)} stage candidates covers layers 0..{problem.num_layers - 1} "
            f"with exactly {problem.num_devices} devices (submesh sizes {sizes}) within every stage's memory; "
            f"allow more stages after a stage (less memory per micro-batch: recomputation, a smaller micro-batch) "
            f"or other submesh sizes")
