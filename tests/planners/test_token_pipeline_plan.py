"""Token slicing in plans (issue 8): slice fields of the IR and their JSON, the token lowering, and the pipeline
planner offering token slicing beside micro-batch pipelining (which the Trainer runs on CPU ranks)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.errors import PlaitError
from plait.graph import capture
from plait.models import GPT, GPTConfig, lm_batch, lm_loss
from plait.plan import Instr, Plan, load_plan, plan_from_json, plan_to_json, save_plan
from plait.plan.ir import ScheduleSpec
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineOptions
from plait.planners.pipeline_plan import plan_pipeline_full
from plait.planners.pipeline_tokens import (
    fused_attention,
    granularity_for,
    sliceable_problem,
    stage_slice_costs,
    token_slicing,
)
from plait.planners.token_cost import TokenWork, runtime_slice_cost
from plait.planners.token_slicing_lowering import TokenStageWork, lower_token_pipeline

CFG = GPTConfig(vocab_size=512, seq_len=1024, num_layers=4, num_heads=4, hidden=256)  # long sequence, batch 1


def work(hidden: int = 64) -> TokenWork:
    return TokenWork(fwd_flops=(0.0, 24.0 * hidden**2, 4.0 * hidden), bwd_flops=(0.0, 48.0 * hidden**2, 8.0 * hidden),
                     fwd_bytes=(1e4, 80.0 * hidden, 0.0), num_kernels=11, boundary_bytes=4.0 * hidden, dtype="fp32")


# ---- the IR -----------------------------------------------------------------------------------------------------------


def test_slice_index_is_in_the_json_only_when_set() -> None:
    plain = Instr(op="compute", stream="compute", name="fwd", pass_kind="F", micro=3, stage=0)
    sliced = replace(plain, token_slice=1)
    assert "token_slice" not in plain.to_json()
    assert sliced.to_json()["token_slice"] == 1
    assert (plain.pass_label, sliced.pass_label, replace(sliced, pass_kind="B").pass_label) == ("F3", "F3.s1", "B3.s1")
    assert Instr(op="wait", stream="compute", name="w").pass_label == ""
    spec = ScheduleSpec(kind="gpipe", num_microbatches=2, token_slices=(256, 128))
    assert spec.is_token_sliced and not ScheduleSpec().is_token_sliced and not ScheduleSpec(token_slices=()).is_token_sliced
    assert "unsliced_step_s" not in spec.to_json()
    assert replace(spec, unsliced_step_s=1.5).to_json()["unsliced_step_s"] == 1.5


@pytest.fixture(scope="module")
def token_plan() -> tuple[Plan, Plan, Plan]:
    """A 4-layer GPT on 1,024 tokens at batch 1 on 4 CPU ranks: the planner slices its tokens."""
    with torch.device("meta"):
        model = GPT(CFG)
    batch = lm_batch(CFG, 1, device="meta")
    graph = capture(model, batch, loss_fn=lm_loss, with_ops=False, name="gpt")
    cluster = load_cluster("local:4")
    source = ModelSource(model=model, example_batch=batch, batch_size=1, loss_fn=lm_loss, name="gpt")
    options = PipelineOptions(same_size=True, min_stages=2, tp_sizes=(1,))
    plan = plan_pipeline_full(graph, cluster, global_batch=1, cost=CostModel(cluster), options=options, source=source)
    with token_slicing(False):
        unsliced = plan_pipeline_full(graph, cluster, global_batch=1, cost=CostModel(cluster), options=options,
                                      source=source)
    off = plan_pipeline_full(graph, cluster, global_batch=1, cost=CostModel(cluster),
                             options=replace(options, token_slicing=False), source=source)
    return plan, unsliced, off


def test_plans_round_trip_and_old_plans_still_load(token_plan: Any, tmp_path: Any) -> None:
    plan, unsliced, _ = token_plan
    again = load_plan(save_plan(plan, tmp_path / "p.json"))
    assert again == plan
    raw = json.loads(plan_to_json(unsliced))
    assert all("token_slice" not in i for p in raw["programs"] for i in p["instrs"])
    assert "unsliced_step_s" not in raw["schedule"]
    assert plan_from_json(json.dumps(raw)) == unsliced
    raw["schedule"] = {"kind": raw["schedule"]["kind"], "num_microbatches": raw["schedule"]["num_microbatches"]}
    assert plan_from_json(json.dumps(raw)).schedule.token_slices is None  # written before the slice fields


# ---- the lowering -------------------------------------------------------------------------------------------------


def test_forwards_run_in_slice_order_and_backwards_in_reverse() -> None:
    stages = [TokenStageWork(work=work(), activation_bytes=1000, transient_bytes=100) for _ in range(3)]
    programs = lower_token_pipeline(stages, [32, 16, 16], [(0,), (1,), (2,)], num_micro=2, optimizer_numel=[10] * 3)
    for k, program in enumerate(programs):
        labels = [i.pass_label for i in program.instrs if i.pass_kind]
        forward = [f"F{m}.s{j}" for m in range(2) for j in range(3)]
        assert labels == forward + [f"B{m}.s{j}" for m in (1, 0) for j in (2, 1, 0)]
        assert all(i.stage == k for i in program.instrs if i.pass_kind)
        sends = [i.name for i in program.instrs if i.op == "send"]
        assert len(sends) == (6 if k in (0, 2) else 12)
        assert program.instrs[-1].op == "optimizer"
    first = [i for i in programs[1].instrs if i.op == "compute"]
    assert first[1].flops == pytest.approx(24.0 * 64**2 * 16 + 4.0 * 64 * 16 * (16 + 32))  # explicit mask: l (l + c)
    assert first[0].flops == pytest.approx(24.0 * 64**2 * 32 + 4.0 * 64 * 32 * 33 / 2)  # causal kernel: l (l + 1) / 2
    with pytest.raises(PlaitError, match="positive lengths"):
        lower_token_pipeline(stages, [32, 0], [(0,), (1,), (2,)])


def test_memory_is_freed_by_the_end_of_the_step() -> None:
    stages = [TokenStageWork(work=work(), activation_bytes=1000, transient_bytes=100, final_output_bytes=500)
              for _ in range(3)]
    for program in lower_token_pipeline(stages, [8, 8, 16], [(0,), (1,), (2,)], num_micro=3):
        assert sum(i.alloc_bytes for i in program.instrs) == sum(i.free_bytes for i in program.instrs)


def test_granularity_keeps_the_dp_small() -> None:
    assert granularity_for(1024) == 16 and granularity_for(2048) == 32 and granularity_for(48) == 1
    assert granularity_for(1000) == 10  # 100 units: the coarsest divisor leaving at least 64


# ---- the planner --------------------------------------------------------------------------------------------------


def test_planner_picks_token_slicing_when_it_wins_and_says_by_how_much(token_plan: Any) -> None:
    plan, unsliced, off = token_plan
    cuts = plan.schedule.token_slices
    assert cuts and sum(cuts) == CFG.seq_len and len(cuts) > 1
    assert plan.schedule.kind == "gpipe" and plan.predicted.step_s < unsliced.predicted.step_s
    assert plan.schedule.unsliced_step_s == pytest.approx(unsliced.predicted.step_s)
    assert not unsliced.schedule.token_slices and not off.schedule.token_slices
    assert off == unsliced or off.predicted.step_s == unsliced.predicted.step_s
    tagged = {(i.micro, i.token_slice) for p in plan.programs for i in p.instrs if i.pass_kind}
    assert tagged == {(0, j) for j in range(len(cuts))}
    from plait.plan.table import pipeline_text

    text = pipeline_text(plan)
    assert f"token slicing: {len(cuts)} slices" in text and "faster than micro-batch-only pipelining" in text
    ratio = plan.schedule.unsliced_step_s / plan.predicted.step_s
    assert f"{ratio:.2f}x" in text


def test_gpu_plans_price_later_slices_with_a_fused_attention_kernel() -> None:
    gpu, cpu = CostModel(load_cluster("dgx-a100:1")), CostModel(load_cluster("local:2"))
    assert fused_attention(gpu) and not fused_attention(cpu)
    tokens, later, first = np.array([128]), np.array([768]), np.array([0])
    big = replace(work(4096), fwd_flops=(0.0, 0.0, 4e6), bwd_flops=(0.0, 0.0, 8e6))  # attention-bound
    planned = stage_slice_costs([big], gpu, None, rank_micro=1, seq_len=1024)[0]
    masked = runtime_slice_cost(big, gpu, last_stage=True, causal_skip=False)  # the CPU runtime's explicit mask on later slices
    assert planned(1, tokens, later)[0] < masked(1, tokens, later)[0]
    assert planned(1, tokens, first)[0] == pytest.approx(masked(1, tokens, first)[0])  # the first slice: causal kernel


def test_models_without_causal_attention_are_not_sliced() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batch = torch.empty(4, 8, device="meta")
    graph = capture(model, batch, with_ops=False)
    source = ModelSource(model=model, example_batch=batch, batch_size=4)
    assert "causal attention" in str(sliceable_problem(source, graph))
    assert "module" in str(sliceable_problem(None, graph))


def test_the_trainer_takes_the_sliced_plan_on_cpu_ranks_only(token_plan: Any) -> None:
    from plait.runtime.pipeline_apply import check_pipeline_plan

    plan, unsliced, _ = token_plan
    cpu = SimpleNamespace(world_size=plan.world_size, device=torch.device("cpu"))
    check_pipeline_plan(plan, cpu)  # type: ignore[arg-type]
    check_pipeline_plan(unsliced, cpu)  # type: ignore[arg-type]
    gpu = SimpleNamespace(world_size=plan.world_size, device=torch.device("cuda"))
    with pytest.raises(PlaitError, match="--no-token-slicing"):  # the token pipeline runs on gloo only
        check_pipeline_plan(plan, gpu)  # type: ignore[arg-type]
