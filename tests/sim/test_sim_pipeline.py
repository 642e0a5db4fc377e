"""Pipeline schedules lowered to per-rank instruction lists and run by the simulator: the closed forms of
uniform stages, interleaving's bubble, 1F1B's memory, and what boundary transfers add."""

from __future__ import annotations

import pytest
from simkit import UnitCost, hand_plan

from plait.planners.pipeline_lowering import StageWork, lower_pipeline
from plait.planners.schedules import Schedule, gpipe, interleaved_1f1b, one_f_one_b
from plait.planners.stage_dp import pipeline_time
from plait.sim import SimResult, simulate


def run(schedule: Schedule, work: list[StageWork], *, overlap: bool = True) -> SimResult:
    """Simulate ``schedule`` with one rank per stage under UnitCost (1 s per FLOP and per byte sent)."""
    ranks = [(s,) for s in range(len(schedule))]
    programs = lower_pipeline(schedule, work, ranks)
    return simulate(hand_plan(*[(p.ranks, p.instrs) for p in programs]), UnitCost(overlaps_comm=overlap))  # type: ignore[arg-type]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize(("p", "m"), [(1, 4), (2, 2), (4, 4), (4, 8), (3, 5)])
def test_uniform_stages_take_sum_plus_m_minus_1_max(p: int, m: int, overlap: bool) -> None:
    work = [StageWork(fwd_flops=1.0, bwd_flops=2.0, activation_bytes=10)] * p
    for schedule in (gpipe(p, m), one_f_one_b(p, m)):
        result = run(schedule, work, overlap=overlap)
        assert result.prediction.step_s == pytest.approx(pipeline_time([3.0] * p, m))


@pytest.mark.parametrize(("p", "m", "v"), [(2, 4, 2), (4, 8, 2), (4, 4, 3)])
def test_interleaving_bubble(p: int, m: int, v: int) -> None:
    work = [StageWork(fwd_flops=1.0 / v, bwd_flops=2.0 / v)] * (p * v)
    ideal = 3.0 * m
    step = run(interleaved_1f1b(p, m, v), work).prediction.step_s
    assert (step - ideal) / ideal == pytest.approx((p - 1) / (v * m))


def test_1f1b_memory_is_stages_after_plus_one_micro_batches() -> None:
    p, m, act = 4, 8, 100
    work = [StageWork(fwd_flops=1.0, bwd_flops=2.0, activation_bytes=act)] * p
    for schedule, expect in ((one_f_one_b(p, m), [min(p - i, m) for i in range(p)]), (gpipe(p, m), [m] * p)):
        result = run(schedule, work)
        assert [result.trace_of(i).peak_dynamic_bytes for i in range(p)] == [e * act for e in expect]


def test_boundary_transfers_lengthen_the_step() -> None:
    # 2 stages, 1 micro-batch: fwd 1 + transfer 5 + fwd 1 + bwd 2 + transfer 5 + bwd 2 (UnitCost: 1 s per byte).
    work = [StageWork(fwd_flops=1.0, bwd_flops=2.0, boundary_bytes=5), StageWork(fwd_flops=1.0, bwd_flops=2.0)]
    assert run(one_f_one_b(2, 1), work).prediction.step_s == pytest.approx(16.0)
