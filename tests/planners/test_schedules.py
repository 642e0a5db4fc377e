"""Pipeline schedules: every micro-batch runs forward then backward on every stage, 1F1B's memory bound, and
the step times of uniform stages (sum + (m - 1) x max; interleaving's (p - 1) / (v m) bubble; the
zero-bubble schedule's split backward within 1F1B's memory and no slower than it)."""

from __future__ import annotations

import pytest

from plait.errors import PlaitError
from plait.planners.schedules import Action, gpipe, interleaved_1f1b, one_f_one_b, peak_in_flight, timed
from plait.planners.stage_dp import pipeline_time
from plait.planners.zero_bubble import zero_bubble

SHAPES = [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2), (4, 4), (4, 8), (3, 7), (8, 16)]


def schedules(p: int, m: int) -> dict[str, tuple[tuple[Action, ...], ...]]:
    out = {"gpipe": gpipe(p, m), "1f1b": one_f_one_b(p, m)}
    for v in (2, 3):
        if m % p == 0:
            out[f"interleaved v={v}"] = interleaved_1f1b(p, m, v)
    return out


@pytest.mark.parametrize(("p", "m"), SHAPES)
def test_every_micro_batch_runs_forward_then_backward_once_per_chunk(p: int, m: int) -> None:
    for name, schedule in schedules(p, m).items():
        assert len(schedule) == p, name
        chunks = 1 + max(a.chunk for acts in schedule for a in acts)
        for acts in schedule:
            assert len(acts) == 2 * m * chunks, name
            for c in range(chunks):
                for micro in range(m):
                    f, b = acts.index(Action("F", micro, c)), acts.index(Action("B", micro, c))
                    assert f < b, (name, micro, c)
        timed(schedule, 1.0, 2.0)  # runs to the end: no stage waits for a pass that never comes


@pytest.mark.parametrize(("p", "m"), SHAPES)
def test_1f1b_holds_at_most_stages_after_it_plus_one(p: int, m: int) -> None:
    for i, acts in enumerate(one_f_one_b(p, m)):
        assert peak_in_flight(acts) <= p - i
        assert peak_in_flight(acts) == min(p - i, m)
    assert all(peak_in_flight(acts) == m for acts in gpipe(p, m))


@pytest.mark.parametrize(("p", "m"), SHAPES)
def test_uniform_stages_follow_the_closed_form(p: int, m: int) -> None:
    fwd, bwd = 1.0, 2.0
    for schedule in (gpipe(p, m), one_f_one_b(p, m)):
        makespan, _ = timed(schedule, fwd, bwd)
        assert makespan == pytest.approx(pipeline_time([fwd + bwd] * p, m))


@pytest.mark.parametrize(("p", "m", "v"), [(2, 2, 2), (4, 4, 2), (4, 8, 2), (4, 8, 3), (2, 4, 4), (3, 6, 2), (8, 16, 2)])
def test_interleaving_shrinks_the_bubble_to_p_minus_1_over_v_m(p: int, m: int, v: int) -> None:
    fwd, bwd = 1.0, 2.0  # one micro-batch's passes through a whole rank; a chunk does 1/v of them
    makespan, _ = timed(interleaved_1f1b(p, m, v), fwd / v, bwd / v)
    ideal = m * (fwd + bwd)
    assert (makespan - ideal) / ideal == pytest.approx((p - 1) / (v * m))


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(PlaitError, match="multiple of the stages"):
        interleaved_1f1b(4, 6, 2)
    with pytest.raises(PlaitError, match="at least one stage"):
        one_f_one_b(0, 4)
    with pytest.raises(PlaitError, match="deadlocks"):
        timed(((Action("B", 0), Action("F", 0)),), 1.0, 1.0)


@pytest.mark.parametrize(("p", "m"), SHAPES)
def test_zero_bubble_splits_each_backward_and_fills_the_bubble(p: int, m: int) -> None:
    schedule = zero_bubble(p, m)
    for i, acts in enumerate(schedule):
        assert len(acts) == 3 * m
        for micro in range(m):  # input gradient after the forward, weight gradient after the input gradient
            assert acts.index(Action("F", micro)) < acts.index(Action("I", micro)) < acts.index(Action("W", micro))
        assert peak_in_flight(acts) <= p - i  # 1F1B's memory: held from F until W
    # with F = I = W (backward twice a forward), never slower than 1F1B, and faster once the pipeline has a bubble
    zb, plain = timed(schedule, 1.0, 2.0)[0], timed(one_f_one_b(p, m), 1.0, 2.0)[0]
    assert zb <= plain and (zb < plain or p == 1 or m == 1)
