"""Pipeline memory in the lowered programs: what torch's schedules hold after a send, receive buffers (only while
their micro-batch is in flight), the last stage's kept outputs and their merge, by hand and against the bound the
pipeline planner checks."""

from __future__ import annotations

import numpy as np
import pytest
from simkit import UnitCost, hand_plan

from plait.planners.pipeline_lowering import StageWork, lower_pipeline, release_points, stage_memory
from plait.planners.schedules import Schedule, gpipe, one_f_one_b
from plait.planners.zero_bubble import zero_bubble
from plait.sim import SimResult, simulate


class ByteCost(UnitCost):
    """UnitCost, and a compute instruction also takes a second per byte it moves (the outputs' merge takes time)."""

    def compute_time(self, flops: float, bytes_moved: float = 0.0, *, dtype: str = "fp32", num_kernels: int = 1) -> float:
        return flops + bytes_moved


def run(schedule: Schedule, work: list[StageWork], *, keep_outputs: bool = True,
        temps: list[int] | None = None) -> SimResult:
    """Simulate ``schedule`` with one rank per stage under ByteCost."""
    ranks = [(s,) for s in range(len(schedule))]
    programs = lower_pipeline(schedule, work, ranks, keep_outputs=keep_outputs, step_temp_bytes=temps)
    return simulate(hand_plan(*[(p.ranks, p.instrs) for p in programs]), ByteCost())  # type: ignore[arg-type]


def test_release_points_follow_torchs_schedules() -> None:
    # 1F1B stage 0 of 4, 8 micro-batches: F0-F3, then (B0 F4) ... (B4), then B5-B7 at indices 12-15.
    points = release_points(one_f_one_b(4, 8)[0])
    assert points[:4] == [4, 6, 12, 10]  # F2, the warm-up's second-to-last forward, is held until B4 (index 12) ends
    assert points[4] == 6 and points[6] == 8  # an input gradient until the next backward ends
    assert points[12:] == [15, 15, 15, 15]  # the cool-down holds its gradients until it ends
    assert release_points(gpipe(2, 3)[1]) == [5] * 6  # GPipe waits on every send at the end


def test_two_stage_1f1b_memory_by_hand() -> None:
    first = StageWork(fwd_flops=1.0, bwd_flops=2.0, activation_bytes=100, boundary_bytes=10, transient_bytes=7)
    last = StageWork(fwd_flops=1.0, bwd_flops=2.0, activation_bytes=200, transient_bytes=30, final_output_bytes=50)
    result = run(one_f_one_b(2, 4), [first, last])
    # stage 0: 2 micro-batches in flight, the held warm-up output, the workspace, the running backward's gradient
    # receive buffer (receive buffers live from their receive to their micro-batch's backward)
    assert result.trace_of(0).peak_dynamic_bytes == 2 * 110 + 10 + 7 + 10
    # stage 1: all 4 kept outputs, one micro-batch with its input's receive buffer, the workspace, two input gradients
    assert result.trace_of(1).peak_dynamic_bytes == 4 * 50 + 200 + 10 + 30 + 2 * 10
    released = run(one_f_one_b(2, 4), [first, last], keep_outputs=False)
    assert released.trace_of(1).peak_dynamic_bytes == 250 + 10 + 30 + 2 * 10
    names = [i.name for i in lower_pipeline(one_f_one_b(2, 4), [first, last], [(0,), (1,)], keep_outputs=True)[1].instrs]
    assert names[-2:] == ["merge outputs", "optimizer step"]


def test_a_boundary_sent_as_slices_is_kept_and_received_as_slices() -> None:
    """A tensor-parallel stage keeps (and sends) only its slice of the output once taken, and the next stage
    keeps only the slice of the input gradient it sends back; the whole tensors live while they are computed."""
    first = StageWork(fwd_flops=1.0, bwd_flops=2.0, activation_bytes=100, boundary_bytes=10, transient_bytes=7,
                      tp=2, send_split=2)
    last = StageWork(fwd_flops=1.0, bwd_flops=2.0, activation_bytes=200, transient_bytes=30, final_output_bytes=50)
    result = run(one_f_one_b(2, 4), [first, last], keep_outputs=False)
    # stage 0: 2 in flight with their output slices, the held warm-up slice, the workspace, a gradient slice
    assert result.trace_of(0).peak_dynamic_bytes == 2 * (100 + 5) + 5 + 7 + 5
    # stage 1: one micro-batch with its input slice, the workspace, its whole input gradient and the slice sent before
    assert result.trace_of(1).peak_dynamic_bytes == 250 + 5 + 30 + 10 + 5


def test_the_last_stage_peaks_when_it_merges_its_outputs() -> None:
    last = StageWork(fwd_flops=1.0, bwd_flops=2.0, activation_bytes=5, final_output_bytes=100)
    assert run(gpipe(1, 4), [last]).trace_of(0).peak_dynamic_bytes == 2 * 4 * 100
    assert run(gpipe(1, 4), [last], keep_outputs=False).trace_of(0).peak_dynamic_bytes == 4 * 105


def _random_work(rng: np.random.Generator, last: bool) -> StageWork:
    size = lambda: int(rng.integers(0, 100))  # noqa: E731
    return StageWork(fwd_flops=float(rng.integers(1, 4)), bwd_flops=float(rng.integers(1, 8)),
                     activation_bytes=size(), boundary_bytes=0 if last else size(), transient_bytes=size(),
                     final_output_bytes=size() if last else 0)


@pytest.mark.parametrize("seed", range(40))
def test_the_planners_bound_is_never_below_the_simulated_peak(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = int(rng.integers(1, 5))
    m = int(rng.integers(p, 9))
    work = [_random_work(rng, s == p - 1) for s in range(p)]
    temps = [int(rng.integers(0, 300)) for _ in range(p)]
    keep = bool(rng.integers(0, 2))
    in_1f1b = [min(p - s, m) for s in range(p)]
    for schedule, in_flight in ((one_f_one_b(p, m), in_1f1b), (gpipe(p, m), [m] * p), (zero_bubble(p, m), in_1f1b)):
        result = run(schedule, work, keep_outputs=keep, temps=temps)
        split = schedule == zero_bubble(p, m)
        for s in range(p):
            bound = stage_memory(work[s], input_bytes=work[s - 1].boundary_bytes if s else 0, num_micro=m,
                                 step_temp_bytes=temps[s], keep_outputs=keep, split_backward=split)
            assert result.trace_of(s).peak_dynamic_bytes <= bound.peak(in_flight[s]), (schedule is None, s)
