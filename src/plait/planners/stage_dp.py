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
the candidates no slower than ``t_max`` (with their ``o_i``), and ``sum + (B - 1) * t_max`` bounds a feasible pipeline from
above, exactly at the optimum's own maximum. A first pass without a bound gives the least sum of any
pipeline; the search stops once ``(B - 1) * t_max`` plus that least sum (or ``t_max`` if larger) reaches the
best found, since no later ``t_max`` can beat it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plait.errors import PlaitError


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


@dataclass(frozen=True)
class StageSolution:
    """The chosen stages in layer order, the pipeline's step time and how the search went."""

    stages: tuple[StageCandidate, ...]
    step_s: float
    t_max_tried: int
    t_max_total: int
    solve_s: float


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
    cands = [c for c in problem.candidates if problem.submesh_devices[c.submesh] <= problem.num_devices]
    levels = sorted({c.time_s for c in cands})
    unbounded = _least_sum(problem, cands, np.inf) if levels else None
    if unbounded is None:
        raise StageError(_no_pipeline(problem))
    floor = unbounded[0]  # no t_max has a smaller least sum
    best: tuple[float, list[int]] | None = None
    tried = 0
    previous = -np.inf
    for t_max in levels:
        if best is not None and (problem.num_micro - 1) * t_max + max(floor, t_max) >= best[0]:
            break
        if t_max - previous <= 1e-12 * max(1.0, t_max):
            continue
        previous = t_max
        tried += 1
        found = _least_sum(problem, cands, t_max)
        if found is None:
            continue
        total = found[0] + (problem.num_micro - 1) * t_max
        if best is None or total < best[0]:
            best = (total, found[1])
    if best is None:
        raise StageError(_no_pipeline(problem))
    stages = tuple(cands[i] for i in best[1])
    return StageSolution(stages=stages, step_s=stage_step(stages, problem.num_micro),
                         t_max_tried=tried, t_max_total=len(levels), solve_s=time.perf_counter() - t0)


def _least_sum(problem: StageProblem, cands: list[StageCandidate], t_max: float) -> tuple[float, list[int]] | None:
    """Least ``sum t_i`` of a pipeline of candidates no slower than ``t_max``, and its candidate indices.

    ``best[k, s, d]``: the least sum of ``s`` stages covering layers ``k..L-1`` on exactly ``d`` devices;
    filled from the last layer back, each candidate starting at ``k`` extending the tables at its ``stop``.
    """
    L, D = problem.num_layers, problem.num_devices
    S = min(L, D)
    best = np.full((L + 1, S + 1, D + 1), np.inf)
    pick = np.full((L + 1, S + 1, D + 1), -1, dtype=np.int64)
    best[L, 0, 0] = 0.0
    by_start: list[list[int]] = [[] for _ in range(L)]
    for i, c in enumerate(cands):
        if c.time_s <= t_max:
            by_start[c.start].append(i)
    for k in range(L - 1, -1, -1):
        for i in by_start[k]:
            c = cands[i]
            dev = problem.submesh_devices[c.submesh]
            after = min(S - 1, c.max_after)  # stages that may follow this one
            rest = best[c.stop, : after + 1, : D + 1 - dev]  # s' = 0..after stages after it, d' devices
            options = rest + (c.time_s + c.once_s)
            target = best[k, 1 : after + 2, dev:]
            better = options < target
            if better.any():
                target[better] = options[better]
                pick[k, 1 : after + 2, dev:][better] = i
    sums = best[0, :, D]
    if not np.isfinite(sums).any():
        return None
    s = int(np.argmin(sums))
    return float(sums[s]), _walk(problem, cands, pick, s)


def _walk(problem: StageProblem, cands: list[StageCandidate], pick: np.ndarray, stages: int) -> list[int]:
    """The candidate indices of the table entry ``(layer 0, stages, all devices)``, first stage first."""
    out = []
    k, s, d = 0, stages, problem.num_devices
    while s > 0:
        i = int(pick[k, s, d])
        out.append(i)
        k, s, d = cands[i].stop, s - 1, d - problem.submesh_devices[cands[i].submesh]
    return out


def _no_pipeline(problem: StageProblem) -> str:
    sizes = sorted(set(problem.submesh_devices))
    return (f"no pipeline of the {len(problem.candidates)} stage candidates covers layers 0..{problem.num_layers - 1} "
            f"with exactly {problem.num_devices} devices (submesh sizes {sizes}) within every stage's memory; "
            f"allow more stages after a stage (less memory per micro-batch: recomputation, a smaller micro-batch) "
            f"or other submesh sizes")
