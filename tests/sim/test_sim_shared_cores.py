"""CPU ranks share their node's cores: hand-computed processor-sharing timelines, rank groups, nodes, pipelines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from simkit import SharedCoreCost, UnitCost, coll, comp, hand_plan

from plait.plan import Instr, Plan
from plait.planners.pipeline_lowering import StageWork, lower_pipeline
from plait.planners.schedules import gpipe, one_f_one_b
from plait.planners.stage_dp import pipeline_time
from plait.sim import SimulationError, simulate


def spans(plan: Plan, cost: object, rank: int) -> dict[str, tuple[float, float]]:
    """Name -> (start, end) of ``rank``'s events, rounded."""
    events = simulate(plan, cost).events_of(rank)  # type: ignore[arg-type]
    return {e.name: (round(e.start, 9), round(e.end, 9)) for e in events}


def send(name: str, src: int, dst: int, seconds: int, *deps: int) -> Instr:
    """A transfer that takes ``seconds`` under UnitCost."""
    return Instr(op="send", stream="comm", name=name, nbytes=seconds, group=(src, dst), deps=deps)


def recv(name: str, src: int, dst: int) -> Instr:
    """The receive of ``send(name, src, dst, ...)``."""
    return Instr(op="recv", stream="comm", name=name, group=(src, dst))


def test_two_ranks_on_one_core_take_turns(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(((0,), [comp("a", 2)]), ((1,), [comp("b", 1)]))
    # one core: both run at half speed until b's 1 s of work is done at 2; a's last second runs alone
    assert spans(plan, SharedCoreCost(cores=1), 0) == {"a": (0, 3)}
    assert spans(plan, SharedCoreCost(cores=1), 1) == {"b": (0, 2)}
    # two cores: no one waits
    assert spans(plan, SharedCoreCost(cores=2), 0) == {"a": (0, 2)}


def test_a_rank_waiting_for_data_gives_its_core_away(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(
        ((0,), [comp("f0", 2), send("act", 0, 1, 1, 0), comp("g0", 2)]),
        ((1,), [comp("h1", 1), recv("act", 0, 1), comp("f1", 2, 1)]),
    )
    cost = SharedCoreCost(cores=1)
    # f0 and h1 share the core until h1 ends (2); rank 1 then sleeps in its receive and f0 finishes alone (3);
    # the transfer uses no core (3 to 4); g0 and f1 share the core again (4 to 8)
    assert spans(plan, cost, 0) == {"f0": (0, 3), "act": (3, 4), "g0": (4, 8)}
    assert spans(plan, cost, 1) == {"h1": (0, 2), "act": (3, 4), "f1": (4, 8)}


def test_a_rank_group_counts_all_its_ranks(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(((0, 1, 2, 3), [comp("fwd", 1), coll("ar", 1, 0, group=(0, 1, 2, 3)), comp("opt", 1, 1)]))
    # four ranks on two cores compute at half speed; the collective's time does not depend on the cores
    assert spans(plan, SharedCoreCost(cores=2), 0) == {"fwd": (0, 2), "ar": (2, 3), "opt": (3, 5)}


def test_a_collective_beside_computing_ranks_shares_the_cores(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(
        ((0,), [coll("ar", 2, group=(0, 1))]), ((1,), [coll("ar", 2, group=(0, 1))]),
        ((2,), [comp("c2", 1)]), ((3,), [comp("c3", 1)]),
    )
    # two cores, four busy ranks: the pair's all-reduce (measured with two busy ranks) and the computing ranks
    # both run at half speed until the computes end at 2; the all-reduce's last second then runs alone
    assert spans(plan, SharedCoreCost(cores=2), 0) == {"ar": (0, 3)}
    assert spans(plan, SharedCoreCost(cores=2), 2) == {"c2": (0, 2)}
    assert spans(plan, SharedCoreCost(cores=4), 0) == {"ar": (0, 2)}  # enough cores: as measured


def test_ranks_of_different_nodes_do_not_share(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(((0,), [comp("a", 2)]), ((1,), [comp("b", 2)]))
    one_per_node = replace(plan, cluster=replace(plan.cluster, num_nodes=2, devices_per_node=1))
    assert spans(one_per_node, SharedCoreCost(cores=1), 1) == {"b": (0, 2)}
    assert spans(plan, SharedCoreCost(cores=1), 1) == {"b": (0, 4)}


def pipeline(schedule_of: Callable[[int, int], object], p: int, m: int, cost: object) -> float:
    """Step of ``p`` uniform stages (forward 1 s, backward 2 s), one rank each, ``m`` micro-batches."""
    work = [StageWork(fwd_flops=1.0, bwd_flops=2.0, activation_bytes=10)] * p
    programs = lower_pipeline(schedule_of(p, m), work, [(s,) for s in range(p)])  # type: ignore[arg-type]
    return simulate(hand_plan(*[(q.ranks, q.instrs) for q in programs]), cost).prediction.step_s  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule_of", [gpipe, one_f_one_b])
@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 4)])
def test_pipelines_on_shared_cores(schedule_of: Callable[[int, int], object], p: int, m: int) -> None:
    full_speed = pipeline_time([3.0] * p, m)
    # as many cores as stages: the closed form, as without sharing
    assert pipeline(schedule_of, p, m, SharedCoreCost(cores=p)) == pytest.approx(full_speed)
    # fewer cores: never faster than all the work spread over the cores, never slower than every stage at
    # the speed of all of them computing at once
    cores = p // 2
    shared = pipeline(schedule_of, p, m, SharedCoreCost(cores=cores))
    assert 3.0 * m * p / cores <= shared + 1e-9
    assert shared <= full_speed * p / cores + 1e-9
    if p > cores:
        assert shared < full_speed * p / cores  # the bubbles let the other stages run faster


def test_programs_that_cannot_run_raise(plan_of: Callable[..., Plan]) -> None:
    cpu = UnitCost(overlaps_comm=False)
    crossed = plan_of(
        ((0,), [coll("x", 1, group=(0, 1)), coll("y", 1, group=(0, 1))]),
        ((1,), [coll("y", 1, group=(0, 1)), coll("x", 1, group=(0, 1))]),
    )
    with pytest.raises(SimulationError, match="deadlock"):
        simulate(crossed, cpu)  # type: ignore[arg-type]
    lonely = plan_of(((0,), [coll("x", 1, group=(0, 1))]), ((1,), [comp("c", 1)]))
    with pytest.raises(SimulationError, match="no instruction of that name"):
        simulate(lonely, cpu)  # type: ignore[arg-type]
    unsent = plan_of(((0,), [comp("c", 1)]), ((1,), [recv("act", 0, 1)]))
    with pytest.raises(SimulationError, match="no send of that name"):
        simulate(unsent, cpu)  # type: ignore[arg-type]
