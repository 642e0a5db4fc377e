"""The Trainer runs token-sliced pipeline plans (TeraPipe, issue 8): the planner's gpt-tiny stages on 4 gloo ranks,
every micro-batch's sequence cut into the plan's token slices, match one plain unsliced process after 3 AdamW steps
(4 stages, 2 stages x 2-way data parallelism, and 2 stages x 2-way tensor parallelism with the intra-op ILP's
placements), and the planner's own sliced plan of 2-way tp stages (boundaries sent as ``Shard(2)`` halves); a
checkpoint taken by the token pipeline resumes exactly; `plait run` runs a sliced plan's JSON; and
what the token pipeline cannot run yet is refused, naming the way out."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from planrun import OPT, assert_trained_like_reference, fit_plan, model_parts, reference

from plait.cluster import local_cluster
from plait.cluster.load import cluster_from_dict
from plait.cost import CostModel
from plait.graph import capture
from plait.models import GPT, GPTConfig, lm_batch, lm_loss
from plait.plan import LayerPlan, Plan, plan_from_json, plan_to_json, save_plan
from plait.plan.placement import REPLICATE, shard
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineOptions, plan_pipeline
from plait.planners.pipeline_plan import FP32, build_pipeline_plan, plan_pipeline_full, sharded_layers
from plait.planners.pipeline_tokens import captures, stage_token_works, token_programs
from plait.runtime import TrainConfig, Trainer, init_distributed, run_ranks, teardown
from plait.runtime.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint
from plait.runtime.checks import PlanMismatchError
from plait.runtime.pipeline_apply import AppliedPipeline, check_pipeline_plan, replica_slicing
from plait.runtime.token_pipeline import TokenPipelineRank

NAME, STEPS, GLOBAL_BATCH = "gpt-tiny", 3, 8
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-6  # as the micro-batch pipeline's Trainer tests (fp32, AdamW amplifies rounding)
SCRIPT = Path(__file__).parent / "scripts" / "train_zoo.py"
CUTS = {4: (20, 20, 14, 10), 2: (40, 16, 8)}  # slices of gpt-tiny's 64 tokens, by number of stages


def token_plan(stages: int, tp: int = 1) -> Plan:
    """gpt-tiny on ``local:4`` as the pipeline planner stages it (``stages`` or more, two micro-batches, stages of
    ``tp`` tensor-parallel ranks), token-sliced into ``CUTS[stages]`` the way ``pipeline_tokens.token_variant``
    lowers a slicing (forced: the slicing DP keeps gpt-tiny's short sequences whole)."""
    build, make_batch, loss = model_parts(NAME)
    with torch.device("meta"):
        model = build()
    batch = make_batch(GLOBAL_BATCH, device="meta")
    graph = capture(model, batch, name=NAME, loss_fn=loss, with_ops=False)
    source = ModelSource(model=model, example_batch=batch, batch_size=GLOBAL_BATCH, loss_fn=loss, name=NAME)
    cluster = local_cluster(4)
    cost = CostModel(cluster)
    options = PipelineOptions(same_size=True, min_stages=stages, micro_batches=(2,), tp_sizes=(tp,), chunks=(),
                              simulate_top=1, stage_imbalance=None)
    sharded = sharded_layers(source, cluster, cost, tp_sizes=(tp,), joint_batch=GLOBAL_BATCH // 2, precision=FP32,
                             optimizer="adamw") if tp > 1 else None
    choice = plan_pipeline(graph, cluster, global_batch=GLOBAL_BATCH, cost=cost, options=options, sharded=sharded)
    works = stage_token_works(captures(source, graph), choice.layer_ranges)
    cuts = CUTS[stages]
    rank_micro = choice.micro_size // (len(choice.stage_ranks[0]) // tp)
    return build_pipeline_plan(graph, cluster, choice, global_batch=GLOBAL_BATCH, cost=cost, schedule="gpipe",
                               programs=token_programs(works, cuts, choice, rank_micro), token_slices=cuts)


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Plan]:
    """The sliced plans of 4 stages (one rank each), of 2 stages of two replicas and of 2 stages of 2-way tp, priced
    without this machine's profile (as conftest's per-test isolation would; this fixture is set up before it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLAIT_PROFILE", str(tmp_path_factory.mktemp("profile") / "profile-local.json"))
        return {"4x1": token_plan(4), "2x2-dp": token_plan(2), "2x2-tp": token_plan(2, tp=2)}


def train_rank(plan_json: str, steps: int, out_dir: str | None = None, checkpoint_every: int = 0,
               resume: bool = False) -> dict[str, Any]:
    trainer, result = fit_plan(NAME, plan_json, steps, out_dir=out_dir, checkpoint_every=checkpoint_every, resume=resume)
    rank = trainer.applied.rank if isinstance(trainer.applied, AppliedPipeline) else None
    slicing = [(n, list(c)) for n, c in rank.slicing] if isinstance(rank, TokenPipelineRank) else None
    return {"losses": list(result.losses), "params": result.final_state, "start": result.start_step, "slicing": slicing}


def assert_matches(got: dict[str, Any], steps: int = STEPS, first: int = 0) -> None:
    assert_trained_like_reference(got, NAME, GLOBAL_BATCH, steps, first=first, loss_rtol=LOSS_RTOL, param_atol=PARAM_ATOL)


MESHES = {"4x1": ((4, 1), ("pp", "dp")), "2x2-dp": ((2, 2), ("pp", "dp")), "2x2-tp": ((2, 1, 2), ("pp", "dp", "tp"))}


@pytest.mark.parametrize("variant", list(MESHES))
def test_the_trainer_runs_a_token_sliced_plan(plans: dict[str, Plan], variant: str) -> None:
    plan = plans[variant]
    assert plan.schedule.token_slices == CUTS[plan.num_pipeline_ranks] and plan.schedule.num_microbatches == 2
    assert (plan.mesh.shape, plan.mesh.axes) == MESHES[variant] and len(plan.stages) == plan.num_pipeline_ranks
    if variant == "2x2-tp":  # Megatron's split, as the ILP places it
        split = [p.name for p in plan.params if any(pl.is_shard for pl in p.placements)]
        assert any("qkv.weight" in n for n in split) and any("fc2.weight" in n for n in split)
    results = run_ranks(train_rank, 4, plan_to_json(plan), STEPS, timeout_s=300)
    replicas = plan.stages[0].stage_mesh.axis_size("dp")
    cuts = list(CUTS[plan.num_pipeline_ranks])  # every rank ran the token pipeline on the plan's slices
    assert all(r["slicing"] == [(GLOBAL_BATCH // (2 * replicas), cuts)] * 2 for r in results)
    assert_matches(results[0])
    assert all(r["losses"] == results[0]["losses"] for r in results)  # every rank logs the batch's loss


def test_a_token_pipeline_checkpoint_resumes_exactly(plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = plan_to_json(plans["2x2-dp"])
    run_ranks(train_rank, 4, plan, 2, str(tmp_path), 2, timeout_s=300)
    saved = load_checkpoint(latest_checkpoint(checkpoint_dir(tmp_path)))  # type: ignore[arg-type]
    names = set(reference(NAME, GLOBAL_BATCH, 0)[1])
    assert saved["step"] == 2 and set(saved["model"]) == names  # every stage's full tensors, keyed by name
    assert set(saved["optimizer"]["state"]) == names
    resumed = run_ranks(train_rank, 4, plan, STEPS, str(tmp_path), 2, True, timeout_s=300)[0]
    assert resumed["start"] == 2
    assert_matches(resumed, first=2)


def test_plait_run_runs_a_token_sliced_plan_json(plans: dict[str, Plan], tmp_path: Path) -> None:
    path = save_plan(plans["4x1"], tmp_path / "plan.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")
    ran = subprocess.run([sys.executable, "-m", "plait.cli", "run", str(SCRIPT), "--plan", str(path), "--out",
                          str(tmp_path / "run"), "--", "--steps", "3"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert ran.returncode == 0, ran.stderr[-2000:] + "\n--- stdout ---\n" + ran.stdout[-1500:]
    assert "[rank 3]" in ran.stdout and "done: 3 steps from step 0" in ran.stdout
    final = torch.load(tmp_path / "run" / "final.pt")
    assert set(final) >= set(reference(NAME, GLOBAL_BATCH, 0)[1])  # gathered from every stage


def test_a_replica_slices_every_micro_batch_the_same_way() -> None:
    assert replica_slicing((40, 16, 8), 2, 3) == [(2, [40, 16, 8])] * 3


def test_token_plans_the_token_pipeline_cannot_run_are_refused(plans: dict[str, Plan]) -> None:
    plan = plans["2x2-dp"]
    cpu = SimpleNamespace(world_size=4, device=torch.device("cpu"))
    check_pipeline_plan(plan, cpu)  # type: ignore[arg-type]
    check_pipeline_plan(plans["2x2-tp"], cpu)  # type: ignore[arg-type]
    with pytest.raises(PlanMismatchError, match="CPU .gloo. ranks for now, not cuda: re-plan with --no-token-slicing"):
        check_pipeline_plan(plan, SimpleNamespace(world_size=4, device=torch.device("cuda")))  # type: ignore[arg-type]
    chunked = replace(plans["4x1"], stages=tuple(replace(s, ranks=((0, 1), (2, 3))[s.index % 2], mesh=None)
                                                 for s in plans["4x1"].stages))  # 2 model chunks per rank
    with pytest.raises(PlanMismatchError, match="4 model chunks over 2 pipeline ranks.*--no-token-slicing"):
        check_pipeline_plan(chunked, cpu)  # type: ignore[arg-type]
    first = plan.stages[0]
    recomputing = replace(plan, stages=(replace(first, recompute=True), *plan.stages[1:]),
                          layers=tuple(LayerPlan(name=layer.name, recompute=layer.name in first.layers)
                                       for layer in plan.layers))
    with pytest.raises(PlanMismatchError, match="recomputes activations"):
        check_pipeline_plan(recomputing, cpu)  # type: ignore[arg-type]


# ---- a plan the planner sliced on tensor-parallel stages ----------------------------------------------------------

TP_CFG = GPTConfig(vocab_size=512, seq_len=2048, num_layers=2, num_heads=8, hidden=1024)  # slicing wins with tp=2


def planned_tp_plan() -> Plan:
    """``plait plan``'s pipeline family for a 2,048-token GPT at batch 1 on two nodes of two A100s, stages forced to
    2-way tp inside a node: token-sliced, each slice's boundary sent as tp halves of its hidden dim (``Shard(2)``)."""
    with torch.device("meta"):
        model = GPT(TP_CFG)
    batch = lm_batch(TP_CFG, 1, device="meta")
    graph = capture(model, batch, loss_fn=lm_loss, with_ops=False, name="gpt")
    source = ModelSource(model=model, example_batch=batch, batch_size=1, loss_fn=lm_loss, name="gpt")
    raw = yaml.safe_load(resources.files("plait.cluster.presets").joinpath("dgx-a100.yaml").read_text())
    cluster = cluster_from_dict({**raw, "num_nodes": 2, "devices_per_node": 2, "name": "a100-2x2"}, where="test")
    options = PipelineOptions(same_size=True, min_stages=2, tp_sizes=(2,))
    return plan_pipeline_full(graph, cluster, global_batch=1, cost=CostModel(cluster), options=options, source=source)


def tp_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return lm_batch(TP_CFG, 1, generator=torch.Generator().manual_seed(1000 + step))


def train_planned_tp(plan_json: str, steps: int) -> dict[str, Any]:
    ctx = init_distributed()
    try:
        trainer = Trainer(model_fn=lambda: GPT(TP_CFG), loss_fn=lm_loss, data=tp_data, plan=plan_from_json(plan_json),
                          config=TrainConfig(steps=steps, progress=False, **OPT), ctx=ctx)
        result = trainer.fit()
    finally:
        teardown()
    rank = trainer.applied.rank if isinstance(trainer.applied, AppliedPipeline) else None
    sliced_tp = isinstance(rank, TokenPipelineRank) and rank.tensor_parallel
    return {"losses": list(result.losses), "params": result.final_state, "sliced_tp": sliced_tp}


def test_the_trainer_runs_the_planners_sliced_tensor_parallel_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_PROFILE", str(tmp_path / "profile-local.json"))
    plan = planned_tp_plan()
    cuts = plan.schedule.token_slices
    assert cuts and len(cuts) > 1 and (plan.mesh.shape, plan.mesh.axes) == ((2, 1, 2), ("pp", "dp", "tp"))
    assert plan.stages[0].send_placements == (REPLICATE, shard(2))
    got = run_ranks(train_planned_tp, 4, plan_to_json(plan), STEPS, timeout_s=300)
    assert all(r["sliced_tp"] for r in got)  # every rank ran a tensor-parallel token stage
    torch.manual_seed(0)
    model = GPT(TP_CFG)
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = lm_loss(model, tp_data(step))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert got[0]["losses"] == pytest.approx(losses, rel=LOSS_RTOL)
    assert all(r["losses"] == got[0]["losses"] for r in got)
    for name, value in model.named_parameters():
        torch.testing.assert_close(got[0]["params"][name], value.detach(), atol=PARAM_ATOL, rtol=0, msg=name)
