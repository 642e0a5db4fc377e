"""Brute force for the stage DP (tests only): every split of the layers into stages and every candidate choice."""

from __future__ import annotations

from plait.planners.stage_dp import StageCandidate, StageError, StageProblem, StageSolution, stage_step

BRUTE_FORCE_LIMIT = 2_000_000  # partial pipelines visited before giving up


def brute_force_stages(problem: StageProblem) -> StageSolution:
    """The fastest pipeline by enumeration; ``StageError`` if there is none or the search is too big."""
    problem.validate()
    by_start: dict[int, list[StageCandidate]] = {}
    for c in problem.candidates:
        by_start.setdefault(c.start, []).append(c)
    best: list[tuple[float, tuple[StageCandidate, ...]]] = []
    visited = 0

    def extend(layer: int, devices: int, chosen: tuple[StageCandidate, ...]) -> None:
        nonlocal visited
        visited += 1
        if visited > BRUTE_FORCE_LIMIT:
            raise StageError(f"brute force visited more than {BRUTE_FORCE_LIMIT} partial pipelines; use a smaller problem")
        if layer == problem.num_layers:
            if devices == problem.num_devices and _fits(chosen):
                step = stage_step(chosen, problem.num_micro)
                if not best or step < best[0][0]:
                    best[:] = [(step, chosen)]
            return
        for c in by_start.get(layer, []):
            used = devices + problem.submesh_devices[c.submesh]
            if used <= problem.num_devices:
                extend(c.stop, used, (*chosen, c))

    extend(0, 0, ())
    if not best:
        raise StageError("no pipeline covers the layers with exactly the cluster's devices within memory")
    return StageSolution(stages=best[0][1], step_s=best[0][0], t_max_tried=0, t_max_total=0, solve_s=0.0)


def _fits(stages: tuple[StageCandidate, ...]) -> bool:
    return all(len(stages) - 1 - i <= c.max_after for i, c in enumerate(stages))
