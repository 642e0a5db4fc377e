"""The simulator on token-sliced pipeline programs (issue 8): per-slice times are ``SliceCost``'s (they grow with the
context), TeraPipe's formula ``sum(t) + (K - 1) * t_max`` holds, and the timeline names every slice's pass."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.graph import LayerInfo, ModelGraph
from plait.plan import BatchSpec, MeshSpec, Plan, RankProgram
from plait.plan.ir import ScheduleSpec, StageSpec
from plait.plan.placement import REPLICATE
from plait.planners.token_cost import TokenWork, runtime_slice_cost
from plait.planners.token_slicing import pipeline_time, slice_tokens
from plait.planners.token_slicing_lowering import TokenStageWork, lower_token_pipeline
from plait.sim import draw_timeline, simulate
from plait.sim.engine import SimResult
from plait.sim.timeline import pass_rows

SEQ = 2048


class FreeLinks(CostModel):
    """An A100 node whose point-to-point transfers take no time (the formula counts compute only)."""

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        return 0.0


def block_work(hidden: int = 2048) -> TokenWork:
    """Two GPT blocks by the textbook count (fp32): 24 h^2 FLOPs per token forward, 4 h per query-key pair."""
    return TokenWork(fwd_flops=(0.0, 48.0 * hidden**2, 8.0 * hidden), bwd_flops=(0.0, 96.0 * hidden**2, 16.0 * hidden),
                     fwd_bytes=(48.0 * hidden**2, 160.0 * hidden, 0.0), num_kernels=22, boundary_bytes=4.0 * hidden,
                     dtype="fp32")


def token_plan(cost: CostModel, cuts: list[int], num_stages: int, num_micro: int = 1) -> Plan:
    """The token lowering of ``num_stages`` equal stages as a plan on ranks 0..K-1."""
    works = [TokenStageWork(work=block_work()) for _ in range(num_stages)]
    programs = lower_token_pipeline(works, cuts, [(k,) for k in range(num_stages)], num_micro=num_micro)
    layers = tuple(LayerInfo(index=k, name=f"blocks.{k}", kind="Block", fwd_flops=1, bwd_flops=2, num_params=0,
                             param_bytes=0, activation_bytes=0, output_bytes=8, output_shape=(1, SEQ, 8),
                             fwd_bytes_moved=0, num_kernels=1) for k in range(num_stages))
    graph = ModelGraph(name="gpt", dtype="fp32", batch_size=1, input_shapes=((1, SEQ),), layers=layers, params=())
    stages = tuple(StageSpec(index=k, layers=(f"blocks.{k}",), ranks=(k,)) for k in range(num_stages))
    return Plan(model=graph, cluster=cost.cluster, mesh=MeshSpec(shape=(num_stages,), axes=("pp",)),
                batch=BatchSpec(global_size=num_micro, micro_size=1, num_micro=num_micro, placements=(REPLICATE,)),
                params=(), stages=stages, programs=programs,
                schedule=ScheduleSpec(kind="gpipe", num_microbatches=num_micro, token_slices=tuple(cuts)))


def makespan(result: SimResult) -> float:
    """When the last pass of any stage ends (the optimizer step left out)."""
    return max(e.end for t in result.traces for e in t.events if e.label)


def cell_times(cost: CostModel, cuts: list[int], last: bool = False) -> np.ndarray:
    starts = np.cumsum([0, *cuts[:-1]])
    return runtime_slice_cost(block_work(), cost, last_stage=last)(1, np.array(cuts), starts)


@pytest.mark.parametrize("num_stages", [1, 2, 4, 8])
def test_pipeline_formula_holds_in_the_simulator_on_slice_costs(num_stages: int) -> None:
    cost = FreeLinks(load_cluster("dgx-a100:1"))
    cost_fn = runtime_slice_cost(block_work(), cost)
    cuts = list(slice_tokens(cost_fn, SEQ, num_stages, granularity=64).slices[0][1])
    assert len(cuts) > 1 or num_stages == 1
    result = simulate(token_plan(cost, cuts, num_stages), cost)
    assert makespan(result) == pytest.approx(pipeline_time(cell_times(cost, cuts).tolist(), num_stages), rel=1e-9)


def test_two_micro_batches_are_one_longer_run_of_cells() -> None:
    cost = FreeLinks(load_cluster("dgx-a100:1"))
    cuts = [1024, 512, 512]
    result = simulate(token_plan(cost, cuts, 4, num_micro=2), cost)
    times = np.tile(cell_times(cost, cuts), 2).tolist()
    assert makespan(result) == pytest.approx(pipeline_time(times, 4), rel=1e-9)


def test_each_cell_takes_its_slice_cost_which_grows_with_the_context() -> None:
    cost = CostModel(load_cluster("dgx-a100:1"))
    cuts = [512, 512, 512, 512]
    result = simulate(token_plan(cost, cuts, 2), cost)
    events = result.trace_of(1).events  # the last stage: nothing sent on, so a cell is its compute
    per_cell = [sum(e.duration for e in events if e.label in (f"F0.s{j}", f"B0.s{j}")) for j in range(len(cuts))]
    expect = cell_times(cost, cuts, last=True)
    assert per_cell == pytest.approx(expect.tolist(), rel=1e-9)
    assert all(np.diff(per_cell) > 0)  # same length, more context: slower


def test_the_timeline_names_every_slice(tmp_path: Path) -> None:
    cost = CostModel(load_cluster("dgx-a100:1"))
    result = simulate(token_plan(cost, [1024, 512, 512], 2), cost)
    rows = pass_rows(result)
    assert [r for r, _ in rows] == ["rank 0", "rank 1"]
    assert rows[0][1].split()[0].startswith("F0.s0@") and "B0.s2@" in rows[1][1] and rows[1][1].split()[-1].startswith("B0.s0@")
    assert "more" in pass_rows(result, max_passes=2)[0][1]
    image = mpimg.imread(draw_timeline(result, str(tmp_path / "t.png")))
    assert image.shape[1] > 1000


def test_programs_without_passes_have_no_rows() -> None:
    cost = CostModel(load_cluster("dgx-a100:1"))
    plan = token_plan(cost, [2048], 1)
    bare = RankProgram(ranks=(0,), instrs=tuple(replace(i, pass_kind=None, token_slice=None) for i in plan.programs[0].instrs))
    assert pass_rows(simulate(replace(plan, programs=(bare,)), cost)) == []
