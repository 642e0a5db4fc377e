"""The simulator on hand-computed timelines: overlap, dependencies, rendezvous, memory, errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from simkit import UnitCost, coll, comp

from plait.plan import Instr, Plan
from plait.sim import SimulationError, simulate


def _spans(plan: Plan, cost: UnitCost, rank: int = 0) -> dict[str, tuple[float, float]]:
    return {e.name: (e.start, e.end) for e in simulate(plan, cost).events_of(rank)}  # type: ignore[arg-type]


def test_no_overlap_is_the_sum(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    plan = plan_of(((0,), [comp("fwd", 1), comp("bwd", 2), coll("ar", 3, 1), comp("opt", 1, 2)]))
    result = simulate(plan, unit_cost)  # type: ignore[arg-type]
    assert _spans(plan, unit_cost) == {"fwd": (0, 1), "bwd": (1, 3), "ar": (3, 6), "opt": (6, 7)}
    p = result.prediction
    assert (p.step_s, p.compute_s, p.comm_s, p.exposed_comm_s) == (7, 4, 3, 3)
    assert p.overlap == 0


def test_wait_free_backprop_overlaps(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    # bwd L1 [0,2] -> ar1 [2,5] runs while bwd L0 [2,4]; ar0 waits for the comm stream [5,6]; opt [6,7]
    plan = plan_of(((0,), [comp("bwd1", 2), coll("ar1", 3, 0), comp("bwd0", 2), coll("ar0", 1, 2), comp("opt", 1, 1, 3)]))
    assert _spans(plan, unit_cost) == {"bwd1": (0, 2), "ar1": (2, 5), "bwd0": (2, 4), "ar0": (5, 6), "opt": (6, 7)}
    p = simulate(plan, unit_cost).prediction  # type: ignore[arg-type]
    assert (p.step_s, p.compute_s, p.comm_s, p.exposed_comm_s) == (7, 5, 4, 2)
    assert p.step_s == p.compute_s + p.exposed_comm_s  # the step is busy compute plus exposed communication
    assert p.overlap == pytest.approx(0.5)


def test_shared_cores_serialise_comm_in_program_order(plan_of: Callable[..., Plan]) -> None:
    # CPU ranks: gloo's threads share the cores, so the same program as above runs on one lane
    shared = UnitCost(overlaps_comm=False)
    plan = plan_of(((0,), [comp("bwd1", 2), coll("ar1", 3, 0), comp("bwd0", 2), coll("ar0", 1, 2), comp("opt", 1, 1, 3)]))
    assert _spans(plan, shared) == {"bwd1": (0, 2), "ar1": (2, 5), "bwd0": (5, 7), "ar0": (7, 8), "opt": (8, 9)}
    p = simulate(plan, shared).prediction  # type: ignore[arg-type]
    assert (p.step_s, p.compute_s, p.comm_s, p.exposed_comm_s, p.overlap) == (9, 5, 4, 4, 0)


def test_comm_fully_hidden(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    plan = plan_of(((0,), [comp("a", 1), coll("x", 2, 0), comp("b", 5), comp("c", 1, 1)]))
    p = simulate(plan, unit_cost).prediction  # type: ignore[arg-type]
    assert (p.step_s, p.exposed_comm_s, p.overlap) == (7, 0, 1)


def test_collective_across_programs_waits_for_every_member(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    plan = plan_of(
        ((0,), [comp("c", 1), coll("x", 2, 0, group=(0, 1)), comp("after", 1, 1)]),
        ((1,), [comp("c", 3), coll("x", 2, 0, group=(0, 1)), comp("after", 1, 1)]),
    )
    result = simulate(plan, unit_cost)  # type: ignore[arg-type]
    for rank in (0, 1):
        spans = {e.name: (e.start, e.end) for e in result.events_of(rank)}
        assert spans["x"] == (3, 5) and spans["after"] == (5, 6)
    assert result.prediction.step_s == 6
    assert result.prediction.exposed_comm_s == 2


def test_send_and_recv_meet(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    send = Instr(op="send", stream="comm", name="act", nbytes=2, group=(0, 1), deps=(0,))
    recv = Instr(op="recv", stream="comm", name="act", nbytes=2, group=(0, 1))
    plan = plan_of(((0,), [comp("f0", 4), send]), ((1,), [recv, comp("f1", 1, 0)]))
    result = simulate(plan, unit_cost)  # type: ignore[arg-type]
    assert {e.name: e.end for e in result.events_of(1)} == {"act": 6, "f1": 7}


def test_sends_do_not_wait_for_their_receiver(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    # Each rank sends to the other before it receives (1F1B's steady state does this): blocking transfers would
    # deadlock; posted sends run at once, and a receive ends when its data has arrived.
    def rank(me: int, other: int, work: float) -> tuple[tuple[int], list[Instr]]:
        out = Instr(op="send", stream="comm", name=f"from{me}", nbytes=2, group=(me, other), deps=(0,))
        into = Instr(op="recv", stream="comm", name=f"from{other}", nbytes=2, group=(other, me))
        return (me,), [comp(f"w{me}", work), out, into, comp(f"use{me}", 1, 2)]

    result = simulate(plan_of(rank(0, 1, 1), rank(1, 0, 5)), unit_cost)  # type: ignore[arg-type]
    zero = {e.name: (e.start, e.end) for e in result.events_of(0)}
    one = {e.name: (e.start, e.end) for e in result.events_of(1)}
    assert zero["from0"] == (1, 3) and one["from1"] == (5, 7)  # each send right after its own work
    # rank 0 waits for rank 1's data: idle from 3 to 5, then receiving while it moves (5 to 7)
    assert zero["from1"] == (5, 7) and zero["use0"] == (7, 8)
    assert one["from0"] == (7, 7) and one["use1"] == (7, 8)  # already there: the receive costs nothing


def test_dependency_and_stream_order_hold(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    instrs = [comp("a", 1), coll("x", 4, 0), comp("b", 1), coll("y", 1, 2), comp("c", 2, 3), comp("d", 1), coll("z", 2, 5)]
    plan = plan_of(((0,), instrs))
    events = simulate(plan, unit_cost).events_of(0)  # type: ignore[arg-type]
    for ev, ins in zip(events, instrs, strict=True):
        assert all(ev.start >= events[d].end for d in ins.deps)
    for stream in ("compute", "comm"):
        mine = [e for e in events if e.stream == stream]
        assert all(b.start >= a.end for a, b in zip(mine, mine[1:], strict=False))
    # y waits for the comm stream (x ends at 5), c for y: c [6, 8], d after c
    assert {e.name: (e.start, e.end) for e in events}["c"] == (6, 8)


def test_memory_peak_follows_allocs_and_frees(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    # f0 holds 10 until b0 ends; f1 holds 20 until b1 ends; the gather buffer (5) is freed when "free" ends.
    instrs = [
        coll("gather", 1, alloc=5),
        comp("f0", 1, 0, alloc=10),
        comp("f1", 1, alloc=20),
        Instr(op="free", stream="compute", name="free", free_bytes=5),
        comp("b1", 1, free=20),
        comp("b0", 1, free=10, alloc=7),
        comp("tail", 1, alloc=-7),
    ]
    result = simulate(plan_of(((0,), instrs)), unit_cost)  # type: ignore[arg-type]
    trace = result.trace_of(0)
    assert trace.peak_dynamic_bytes == 35
    assert trace.memory[-1][1] == 0
    static = result.static_bytes
    assert result.prediction.peak_memory_bytes == (static + 35,)
    assert result.prediction.memory.total == static + 35


def test_bad_programs_raise(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    with pytest.raises(SimulationError, match="earlier instructions"):
        simulate(plan_of(((0,), [comp("a", 1, 1), comp("b", 1)])), unit_cost)  # type: ignore[arg-type]
    crossed = plan_of(
        ((0,), [coll("x", 1, group=(0, 1)), coll("y", 1, group=(0, 1))]),
        ((1,), [coll("y", 1, group=(0, 1)), coll("x", 1, group=(0, 1))]),
    )
    with pytest.raises(SimulationError, match="deadlock"):
        simulate(crossed, unit_cost)  # type: ignore[arg-type]
    lonely = plan_of(((0,), [coll("x", 1, group=(0, 1))]), ((1,), [comp("c", 1)]))
    with pytest.raises(SimulationError, match="no instruction of that name"):
        simulate(lonely, unit_cost)  # type: ignore[arg-type]
    with pytest.raises(SimulationError, match="no programs"):
        simulate(plan_of(((0,), [])).__class__(**{**plan_of(((0,), [])).__dict__, "programs": ()}), unit_cost)  # type: ignore[arg-type]


def test_compute_is_timed_from_the_instruction_not_its_layer(plan_of: Callable[..., Plan], unit_cost: UnitCost) -> None:
    # the tiny graph's layer does 1 forward FLOP at this batch; the lowering's instruction says 5
    ins = Instr(op="compute", stream="compute", name="fwd[0] fc", phase="fwd", layer=0, flops=5)
    assert simulate(plan_of(((0,), [ins])), unit_cost).prediction.step_s == 5  # type: ignore[arg-type]


class CountingCost(UnitCost):
    """UnitCost that counts how often each kind of instruction is timed."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"compute": 0, "collective": 0}

    def compute_time(self, flops: float, bytes_moved: float = 0.0, *, dtype: str = "fp32", num_kernels: int = 1) -> float:
        self.calls["compute"] += 1
        return flops

    def collective_time(self, op: str, nbytes: float, group: Sequence[int]) -> float:
        self.calls["collective"] += 1
        return nbytes


def test_repeated_work_is_timed_once(plan_of: Callable[..., Plan]) -> None:
    cost = CountingCost()
    instrs = [comp("fwd[0]", 2), comp("fwd[1]", 2, 0), coll("ar[0]", 3, 1), coll("ar[1]", 3, 2), comp("step", 1, 3)]
    assert simulate(plan_of(((0,), instrs)), cost).prediction.step_s == 11  # type: ignore[arg-type]
    assert cost.calls == {"compute": 2, "collective": 1}
