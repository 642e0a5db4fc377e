"""The pipeline-stage DP against brute force on random costs, and the cases that show what it weighs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from plait.planners.stage_brute import brute_force_stages
from plait.planners.stage_dp import (
    StageCandidate,
    StageError,
    StageProblem,
    StageSolution,
    pipeline_time,
    solve_stages,
    solve_table,
)
from plait.planners.stage_tables import _least_sum_general, least_sum


def random_problem(rng: random.Random, *, layers: int, devices: int, micro: int) -> StageProblem:
    """Every layer range on every power-of-two submesh up to ``devices``, one or two configurations each,
    random times (a bigger submesh usually faster) and random memory bounds."""
    sizes = tuple(d for d in (1, 2, 4, 8) if d <= devices)
    configs = rng.choice([1, 2])
    cands = []
    for start in range(layers):
        for stop in range(start + 1, layers + 1):
            work = sum(rng.uniform(0.5, 2.0) for _ in range(stop - start))
            for m, size in enumerate(sizes):
                for c in range(configs):
                    t = work / size ** rng.uniform(0.5, 1.0) + rng.uniform(0.0, 0.3)
                    cands.append(StageCandidate(start=start, stop=stop, submesh=m, config=c, time_s=t,
                                                max_after=rng.choice([0, 1, 2, 3, layers]),
                                                once_s=rng.choice([0.0, rng.uniform(0.0, 1.0)])))
    return StageProblem(num_layers=layers, submesh_devices=sizes, num_devices=devices, num_micro=micro,
                        candidates=tuple(cands))


def solved_like_brute_force(problem: StageProblem) -> tuple[StageSolution, StageSolution] | None:
    """(the DP's solution, brute force's), or None after checking that both find no pipeline."""
    try:
        expected = brute_force_stages(problem)
    except StageError:
        with pytest.raises(StageError):
            solve_stages(problem)
        return None
    return solve_stages(problem), expected


@pytest.mark.parametrize("micro", [1, 4, 16])
def test_dp_equals_brute_force_on_random_costs(micro: int) -> None:
    rng = random.Random(micro)
    checked = 0
    for _ in range(40):
        layers, devices = rng.randint(1, 8), rng.choice([1, 2, 3, 4, 6, 8])
        if layers * devices > 32:  # keeps brute force to seconds; the DP is checked up to 8 x 8 below
            layers = max(1, 32 // devices)
        problem = random_problem(rng, layers=layers, devices=devices, micro=micro)
        pair = solved_like_brute_force(problem)
        if pair is None:
            continue
        got, expected = pair
        assert got.step_s == pytest.approx(expected.step_s, rel=1e-9)
        assert got.step_s == pytest.approx(pipeline_time([s.time_s for s in got.stages], micro,
                                                         [s.once_s for s in got.stages]))
        assert [(s.start, s.stop) for s in got.stages][0][0] == 0 and got.stages[-1].stop == layers
        assert sum(problem.submesh_devices[s.submesh] for s in got.stages) == devices
        assert all(len(got.stages) - 1 - i <= s.max_after for i, s in enumerate(got.stages))
        checked += 1
    assert checked >= 25


def test_dp_equals_brute_force_at_eight_layers_on_eight_devices() -> None:
    rng = random.Random(8)
    for micro in (1, 4, 16):
        problem = random_problem(rng, layers=8, devices=8, micro=micro)
        problem = StageProblem(num_layers=8, submesh_devices=problem.submesh_devices, num_devices=8, num_micro=micro,
                               candidates=tuple(c for c in problem.candidates if c.config == 0))
        assert solve_stages(problem).step_s == pytest.approx(brute_force_stages(problem).step_s, rel=1e-9)


def uniform(layers: int, devices: int, micro: int, *, per_layer: float = 1.0, max_after: int = 99) -> StageProblem:
    """Layers of equal cost; a stage on d devices runs its layers d times faster (perfect scaling)."""
    sizes = tuple(d for d in (1, 2, 4, 8) if d <= devices)
    cands = tuple(StageCandidate(start=a, stop=b, submesh=m, time_s=per_layer * (b - a) / size, max_after=max_after)
                  for a in range(layers) for b in range(a + 1, layers + 1) for m, size in enumerate(sizes))
    return StageProblem(num_layers=layers, submesh_devices=sizes, num_devices=devices, num_micro=micro, candidates=cands)


def test_one_micro_batch_has_nothing_to_pipeline_and_many_pipeline_evenly() -> None:
    # One micro-batch: any split costs the same sum; the DP finds that value.
    one = solve_stages(uniform(4, 4, 1))
    assert one.step_s == pytest.approx(1.0)
    # 16 micro-batches on 4 single devices (no bigger submesh): 4 equal stages, sum 4 + 15 x 1.
    flat = StageProblem(num_layers=4, submesh_devices=(1,), num_devices=4, num_micro=16,
                        candidates=tuple(c for c in uniform(4, 4, 16).candidates if c.submesh == 0))
    got = solve_stages(flat)
    assert [(s.start, s.stop) for s in got.stages] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert got.step_s == pytest.approx(4 + 15 * 1.0)


def test_memory_bound_limits_the_stages_after_a_stage() -> None:
    # With no stage allowed a successor, the only pipeline is one stage on all devices.
    got = solve_stages(uniform(4, 4, 16, max_after=0))
    assert len(got.stages) == 1 and got.stages[0].submesh == 2


def test_boundary_cost_moves_the_split() -> None:
    # Two layers, two devices: splitting is faster unless the boundary transfer (in each stage's time) is dear.
    def problem(transfer: float) -> StageProblem:
        cands = (
            StageCandidate(start=0, stop=2, submesh=1, time_s=1.2, max_after=9),  # both layers, 2 devices
            StageCandidate(start=0, stop=1, submesh=0, time_s=1.0 + transfer, max_after=9),
            StageCandidate(start=1, stop=2, submesh=0, time_s=1.0 + transfer, max_after=9),
        )
        return StageProblem(num_layers=2, submesh_devices=(1, 2), num_devices=2, num_micro=8, candidates=cands)

    assert len(solve_stages(problem(0.0)).stages) == 2  # 2 + 7 x 1 = 9 < 8 x 1.2 = 9.6
    assert len(solve_stages(problem(0.5)).stages) == 1  # 3 + 7 x 1.5 = 13.5 > 9.6


def test_early_stop_tries_few_t_max_values() -> None:
    got = solve_stages(uniform(8, 8, 4))
    assert got.t_max_tried < got.t_max_total


def test_no_pipeline_is_a_clear_error() -> None:
    bad = StageProblem(num_layers=2, submesh_devices=(2,), num_devices=3, num_micro=1,
                       candidates=(StageCandidate(start=0, stop=2, submesh=0, time_s=1.0, max_after=1),))
    with pytest.raises(StageError, match="exactly 3 devices"):
        solve_stages(bad)
    with pytest.raises(StageError, match="not inside"):
        solve_stages(StageProblem(num_layers=2, submesh_devices=(1,), num_devices=1, num_micro=1,
                                  candidates=(StageCandidate(start=1, stop=3, submesh=0, time_s=1.0, max_after=0),)))


def test_once_per_step_work_counts_in_the_sum_only() -> None:
    # Splitting wins on per-micro-batch time, but each half's once-per-step work (sync, optimizer) is dear.
    def problem(once: float) -> StageProblem:
        cands = (
            StageCandidate(start=0, stop=2, submesh=1, time_s=1.2, max_after=9, once_s=0.5),
            StageCandidate(start=0, stop=1, submesh=0, time_s=1.0, max_after=9, once_s=once),
            StageCandidate(start=1, stop=2, submesh=0, time_s=1.0, max_after=9, once_s=once),
        )
        return StageProblem(num_layers=2, submesh_devices=(1, 2), num_devices=2, num_micro=8, candidates=cands)

    cheap = solve_stages(problem(0.1))
    assert len(cheap.stages) == 2 and cheap.step_s == pytest.approx(2.0 + 0.2 + 7 * 1.0)
    dear = solve_stages(problem(0.6))  # 2 + 1.2 + 7 = 10.2 > 8 x 1.2 + 0.5 = 10.1
    assert len(dear.stages) == 1 and dear.step_s == pytest.approx(8 * 1.2 + 0.5)


def one_size_problem(rng: random.Random, *, layers: int, size: int, devices: int, micro: int) -> StageProblem:
    """Random candidates that all run on submeshes of one size (a pipeline of ``devices / size`` stages)."""
    cands = []
    for start in range(layers):
        for stop in range(start + 1, layers + 1):
            for c in range(rng.choice([1, 2])):
                cands.append(StageCandidate(start=start, stop=stop, submesh=0, config=c,
                                            time_s=sum(rng.uniform(0.5, 2.0) for _ in range(stop - start)),
                                            max_after=rng.choice([0, 1, 2, 3, layers]),
                                            once_s=rng.choice([0.0, rng.uniform(0.0, 1.0)])))
    return StageProblem(num_layers=layers, submesh_devices=(size,), num_devices=devices, num_micro=micro,
                        candidates=tuple(cands))


@pytest.mark.parametrize("micro", [1, 4, 16])
def test_one_size_table_equals_the_general_table_and_brute_force(micro: int) -> None:
    # Every candidate on a submesh of the same size: the DP drops the device axis (exactly devices / size stages).
    rng = random.Random(100 + micro)
    for _ in range(30):
        layers, size, stages = rng.randint(1, 8), rng.choice([1, 2, 4]), rng.randint(1, 5)
        problem = one_size_problem(rng, layers=layers, size=size, devices=size * stages, micro=micro)
        table = problem.table()
        for t_max in (np.inf, float(np.median(table.time_s))):
            general = _least_sum_general(table, layers, size * stages, t_max)
            one = least_sum(table, layers, size * stages, t_max)
            assert (general is None) == (one is None)
            if one is not None and general is not None:
                assert one[0] == pytest.approx(general[0], rel=1e-12)
                assert len(one[1]) == stages and [int(table.start[i]) for i in one[1]][0] == 0
        pair = solved_like_brute_force(problem)
        if pair is not None:
            assert pair[0].step_s == pytest.approx(pair[1].step_s, rel=1e-9)


def test_a_bound_stops_a_search_that_cannot_beat_it() -> None:
    problem = uniform(8, 8, 4)
    best = solve_stages(problem)
    table = problem.table()
    kwargs = {"num_layers": 8, "num_devices": 8, "num_micro": 4}
    assert solve_table(table, **kwargs, bound=best.step_s * 0.999) is None  # nothing beats a bound below the optimum
    within = solve_table(table, **kwargs, bound=best.step_s * 1.001)
    assert within is not None and within.step_s == pytest.approx(best.step_s)
    unbounded = solve_table(table, **kwargs)
    assert unbounded is not None and unbounded.t_max_tried >= within.t_max_tried


def test_the_first_feasible_t_max_is_found_by_bisection() -> None:
    # 16 micro-batches on 8 single devices: t_max below one layer's time admits no pipeline; bisection skips
    # those levels instead of solving each.
    flat = StageProblem(num_layers=8, submesh_devices=(1,), num_devices=8, num_micro=16,
                        candidates=tuple(c for c in uniform(8, 8, 16).candidates if c.submesh == 0))
    got = solve_stages(flat)
    assert got.step_s == pytest.approx(8 + 15 * 1.0)
    assert got.t_max_tried <= 2 + got.t_max_total.bit_length()
