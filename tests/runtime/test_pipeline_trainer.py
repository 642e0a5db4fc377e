"""The Trainer runs pipeline plans: the planner's stages on 4 gloo ranks match one plain process after 3 AdamW
steps (1F1B, GPipe, zero-bubble and interleaved 1F1B with two model chunks per rank, with a stage that
recomputes), and a checkpoint taken by the pipeline resumes exactly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from planrun import assert_trained_like_reference, fit_plan, model_parts

from plait.cluster import local_cluster
from plait.cost import CostModel
from plait.graph import capture
from plait.plan import LayerPlan, Plan, ScheduleSpec, plan_from_json, plan_to_json
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineOptions, plan_pipeline
from plait.planners.pipeline_plan import FP32, build_pipeline_plan, plan_pipeline_full, sharded_layers
from plait.runtime import init_distributed, run_ranks, teardown

NAME, STEPS, GLOBAL_BATCH = "gpt-tiny", 3, 8
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-6


def pipeline_plan(tp: int = 1, *, split: bool = False, schedule: str | None = None) -> Plan:
    """The pipeline planner's own choice for gpt-tiny on 4 local ranks (stages of one size, at least two), with
    stages of ``tp`` tensor-parallel ranks (the intra-op ILP's layers); ``split``: every boundary crosses as tp
    slices that the next stage all-gathers; ``schedule``: the pass lists the plan's programs hold (None: the
    planner's choice)."""
    build, make_batch, loss = model_parts(NAME)
    with torch.device("meta"):
        model = build()
    batch = make_batch(GLOBAL_BATCH // 2, device="meta")
    graph = capture(model, batch, name=NAME, loss_fn=loss, with_ops=False)
    source = ModelSource(model=model, example_batch=batch, batch_size=GLOBAL_BATCH // 2, loss_fn=loss, name=NAME)
    cluster = local_cluster(4)
    cost = CostModel(cluster)
    options = PipelineOptions(same_size=True, min_stages=2, micro_batches=(2, 4), tp_sizes=(tp,))
    if not split and schedule in (None, "interleaved-1f1b"):
        return plan_pipeline_full(graph, cluster, global_batch=GLOBAL_BATCH, cost=cost, options=options, source=source,
                                  schedule=schedule)
    sharded = sharded_layers(source, cluster, cost, tp_sizes=(tp,), joint_batch=GLOBAL_BATCH // 2, precision=FP32,
                             optimizer="adamw")
    choice = plan_pipeline(graph, cluster, global_batch=GLOBAL_BATCH, cost=cost, options=options, sharded=sharded)
    sliced = tuple(replace(w, send_split=tp if split else 1) for w in choice.work[:-1]) + choice.work[-1:]
    return build_pipeline_plan(graph, cluster, replace(choice, work=sliced), global_batch=GLOBAL_BATCH, cost=cost,
                               schedule=schedule or "1f1b")


def train_rank(plan_json: str, steps: int, out_dir: str | None = None, checkpoint_every: int = 0,
               resume: bool = False) -> dict[str, Any]:
    trainer, result = fit_plan(NAME, plan_json, steps, out_dir=out_dir, checkpoint_every=checkpoint_every, resume=resume)
    return {"losses": list(result.losses), "params": result.final_state, "start": result.start_step}


def assert_matches(got: dict[str, Any], steps: int = STEPS, first: int = 0) -> None:
    assert_trained_like_reference(got, NAME, GLOBAL_BATCH, steps, first=first, loss_rtol=LOSS_RTOL, param_atol=PARAM_ATOL)


def variants(plan: Plan) -> dict[str, Plan]:
    gpipe = replace(plan, schedule=ScheduleSpec(kind="gpipe", num_microbatches=plan.schedule.num_microbatches))
    zero = pipeline_plan(schedule="zero-bubble")
    first = plan.stages[0]
    recomputing = replace(plan, stages=(replace(first, recompute=True), *plan.stages[1:]),
                          layers=tuple(LayerPlan(name=layer.name, recompute=layer.name in first.layers) for layer in plan.layers))
    return {"1f1b": plan, "gpipe": gpipe, "recompute-stage-0": recomputing, "zero-bubble": zero}


@pytest.mark.parametrize("variant", ["1f1b", "gpipe", "recompute-stage-0", "zero-bubble", "interleaved"])
def test_the_trainer_runs_a_pipeline_plan(variant: str) -> None:
    plan = pipeline_plan(schedule="interleaved-1f1b") if variant == "interleaved" else variants(pipeline_plan())[variant]
    assert plan.is_pipeline and len(plan.stages) >= 2
    results = run_ranks(train_rank, 4, plan_to_json(plan), STEPS)
    assert_matches(results[0])
    assert all(r["losses"] == results[0]["losses"] for r in results)  # every rank logs the batch's loss


def test_the_trainer_runs_tensor_parallel_stages() -> None:
    # 2 stages x 2-way tensor parallelism with the intra-op ILP's placements (Megatron's column/row split), as
    # the planner schedules them (it may give each rank group two model chunks, interleaved 1F1B)
    plan = pipeline_plan(tp=2)
    assert plan.num_pipeline_ranks == 2 and all(s.stage_mesh.axes == ("dp", "tp") for s in plan.stages)
    assert plan.mesh.axes == ("pp", "dp", "tp") and plan.mesh.shape == (2, 1, 2)
    split = [p.name for p in plan.params if any(pl.is_shard for pl in p.placements)]
    assert any("qkv.weight" in n for n in split) and any("fc2.weight" in n for n in split)
    results = run_ranks(train_rank, 4, plan_to_json(plan), STEPS)
    assert_matches(results[0])


def test_a_boundary_sent_as_slices_is_gathered_by_the_next_stage() -> None:
    # each tp rank sends half the sequence; the next stage all-gathers it (and the gradient comes back halved)
    plan = pipeline_plan(tp=2, split=True)
    assert [str(p) for p in plan.stages[0].send_placements] == ["Replicate()", "Shard(1)"]
    whole = pipeline_plan(tp=2, schedule="1f1b")
    sent = [i.nbytes for i in plan.programs[0].instrs if i.op == "send"]
    assert sent == [-(-i.nbytes // 2) for i in whole.programs[0].instrs if i.op == "send"]
    assert any(i.collective == "all_gather" and i.name.startswith("gather act") for i in plan.programs[1].instrs)
    results = run_ranks(train_rank, 4, plan_to_json(plan), STEPS)
    assert_matches(results[0])


def test_a_pipeline_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    plan = plan_to_json(pipeline_plan())
    run_ranks(train_rank, 4, plan, 2, str(tmp_path), 2)
    resumed = run_ranks(train_rank, 4, plan, STEPS, str(tmp_path), 2, True)[0]
    assert resumed["start"] == 2
    assert_matches(resumed, first=2)


def test_stages_of_different_sizes_are_refused_clearly() -> None:
    plan = pipeline_plan()
    a, b = plan.stages
    uneven = replace(plan, stages=(replace(a, ranks=(0,), mesh=None), replace(b, ranks=(1, 2, 3), mesh=None)))
    results = run_ranks(_apply_only, 4, plan_to_json(uneven))
    assert all("submeshes of different sizes" in r for r in results)


def _apply_only(plan_json: str) -> str:
    from plait.errors import PlaitError
    from plait.runtime.pipeline_apply import apply_pipeline_plan

    ctx = init_distributed()
    try:
        apply_pipeline_plan(model_parts(NAME)[0](), plan_from_json(plan_json), ctx, model_parts(NAME)[2])
    except PlaitError as exc:
        return str(exc)
    finally:
        teardown()
    return "applied"

