"""Pipeline schedules lowered to per-rank instruction lists and run by the simulator: the closed forms of
uniform stages, interleaving's bubble, 1F1B's memory, and what boundary transfers add."""

from __future__ import annotations

import pytest
import torch
from simkit import UnitCost, hand_plan

from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.errors import PlaitError
from plait.graph import ModelGraph, capture
from plait.models import GPT, lm_batch, lm_loss
from plait.models.gpt import GPT_CONFIGS
from plait.planners.pipeline import (
    PipelineChoice,
    PipelineOptions,
    assign_ranks,
    plan_pipeline,
    submesh_sizes,
)
from plait.planners.pipeline_lowering import StageWork, lower_pipeline, stage_memory
from plait.planners.schedules import Schedule, gpipe, interleaved_1f1b, one_f_one_b
from plait.planners.stage_dp import StageError, pipeline_time
from plait.planners.zero_bubble import zero_bubble
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


def gpt_graph(name: str) -> ModelGraph:
    """The layer view of a zoo GPT config, captured on the meta device at batch 1."""
    cfg = GPT_CONFIGS[name]
    with torch.device("meta"):
        model = GPT(cfg)
    return capture(model, lm_batch(cfg, 1, device="meta"), name=name, loss_fn=lm_loss, with_ops=False)


def test_planned_pipeline_simulates_to_its_stage_dp_prediction() -> None:
    # GPT-3 6.7B in fp32 does not fit one A100 replicated: the planner must cut it into stages.
    cluster = load_cluster("dgx-a100:2")
    cost = CostModel(cluster)
    choice = plan_pipeline(gpt_graph("gpt3-6.7b"), cluster, global_batch=256, cost=cost)
    assert len(choice.layer_ranges) >= 2
    assert choice.layer_ranges[0][0] == 0 and choice.layer_ranges[-1][1] == 34
    assert sorted(r for ranks in choice.stage_ranks for r in ranks) == list(range(16))
    programs = choice.programs()
    result = simulate(hand_plan(*[(p.ranks, p.instrs) for p in programs]), cost)  # type: ignore[arg-type]
    # The DP counts each stage's gradient sync and optimizer step whole; the simulator overlaps them with the
    # other stages' drain, so it may only be a little faster.
    assert 0.95 * choice.step_s <= result.prediction.step_s <= choice.step_s * (1 + 1e-9)
    check_memory_agrees(choice, result, 0.9 * cluster.device.memory_bytes)


def test_a_model_that_fits_replicated_is_one_data_parallel_stage() -> None:
    cluster = load_cluster("dgx-a100:1")
    choice = plan_pipeline(gpt_graph("gpt-tiny"), cluster, global_batch=16, cost=CostModel(cluster))
    assert choice.layer_ranges == ((0, 4),) and choice.stage_ranks == (tuple(range(8)),)


def test_a_model_too_big_for_the_cluster_is_a_clear_error() -> None:
    cluster = load_cluster("dgx-a100:1")
    with pytest.raises(StageError, match="no pipeline of gpt3-175b fits dgx-a100:1"):
        plan_pipeline(gpt_graph("gpt3-175b"), cluster, global_batch=64, cost=CostModel(cluster))


def test_submeshes_and_rank_blocks_are_aligned() -> None:
    assert submesh_sizes(load_cluster("dgx-a100:4")) == (1, 2, 4, 8, 16, 32)
    assert submesh_sizes(load_cluster("dgx-a100:3")) == (1, 2, 4, 8, 16)
    cluster = load_cluster("dgx-a100:2")
    blocks = assign_ranks([2, 8, 4, 2], cluster)
    assert [len(b) for b in blocks] == [2, 8, 4, 2]  # stage order kept
    assert all(len({cluster.node_of(r) for r in b}) == 1 for b in blocks)  # no slice of a node straddles two
    with pytest.raises(PlaitError, match="do not add up"):
        assign_ranks([8, 4], cluster)


def test_stages_recompute_when_memory_needs_it_and_fit_in_the_simulator() -> None:
    # GPT 39B in fp32 on 64 A100s: the first stages hold the most micro-batches in flight (1F1B) and must
    # recompute (configuration 1); the last ones need not. The last stage must not keep every micro-batch's
    # logits until the step ends (52 GB per rank here, as torch's schedule does unless told
    # return_outputs=False, which plait's runtime tells it): with them no pipeline fits.
    cluster = load_cluster("dgx-a100:8")
    cost = CostModel(cluster)
    graph = gpt_graph("gpt-39b")
    with pytest.raises(StageError, match="no pipeline"):
        plan_pipeline(graph, cluster, global_batch=512, cost=cost, options=PipelineOptions(keep_outputs=True))
    choice = plan_pipeline(graph, cluster, global_batch=512, cost=cost)
    configs = [s.config for s in choice.solution.stages]
    assert configs[0] == 1 and configs[-1] == 0 and configs == sorted(configs, reverse=True)
    result = simulate(hand_plan(*[(p.ranks, p.instrs) for p in choice.programs()]), cost)  # type: ignore[arg-type]
    assert 0.95 * choice.step_s <= result.prediction.step_s <= choice.step_s * (1 + 1e-9)
    check_memory_agrees(choice, result, 0.9 * cluster.device.memory_bytes)


def check_memory_agrees(choice: PipelineChoice, result: SimResult, limit: float) -> None:
    """Every stage's simulated peak is at most the bound the planner checked, and that bound fits the limit."""
    p, m = len(choice.layer_ranges), choice.num_micro
    for s, (ranks, params) in enumerate(zip(choice.stage_ranks, choice.sync_bytes, strict=True)):
        static = params * 4  # parameters, gradients, two AdamW moments
        bound = stage_memory(choice.work[s], input_bytes=choice.work[s - 1].boundary_bytes if s else 0, num_micro=m,
                             step_temp_bytes=choice.step_temp_bytes[s], keep_outputs=choice.keep_outputs)
        assert result.trace_of(ranks[0]).peak_dynamic_bytes <= bound.peak(min(p - s, m)) <= limit - static


def test_every_pass_carries_the_pipeline_runtimes_host_work() -> None:
    """``StageWork.pass_kernels`` (the runtime's own work per pass, ``PIPELINE_PASS_KERNELS`` from the stage
    pricing) is added to the kernels of every F, B, I and W pass."""
    work = [StageWork(fwd_flops=1.0, bwd_flops=2.0, num_kernels=3, bwd_kernels=6, pass_kernels=50)] * 2
    passes = [i for p in lower_pipeline(one_f_one_b(2, 4), work, [(0,), (1,)]) for i in p.instrs if i.pass_kind]
    assert {(i.pass_kind, i.num_kernels) for i in passes} == {("F", 53), ("B", 56)}
    split = [i for p in lower_pipeline(zero_bubble(2, 4), work, [(0,), (1,)]) for i in p.instrs if i.pass_kind]
    assert {(i.pass_kind, i.num_kernels) for i in split} == {("F", 53), ("I", 53), ("W", 53)}
