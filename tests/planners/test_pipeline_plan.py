"""Pipeline plans: the pipeline planner's choice as a complete Plan (stages, placements on stage meshes, schedule,
programs, per-rank memory), its JSON, its table, `plait plan --family pipeline` and `plait sim`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_plan_cli import CLUSTER, run
from torch import nn

from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.cost.memory import OPTIMIZER_STATES
from plait.errors import PlaitError
from plait.graph import ModelGraph, capture
from plait.graph.chain import chain_problem
from plait.models import GPT, lm_batch, lm_loss, zoo_model
from plait.models.gpt import GPT_CONFIGS
from plait.plan import load_plan, plan_from_json, plan_text, plan_to_json
from plait.planners import plan as choose
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineOptions
from plait.planners.pipeline_plan import plan_pipeline_full
from plait.runtime.checks import PlanMismatchError, check_plan
from plait.runtime.context import DistContext
from plait.sim import simulate


def zoo_graph(name: str, batch: int = 2) -> ModelGraph:
    zoo = zoo_model(name)
    with torch.device("meta"):
        return capture(zoo.build(), zoo.make_batch(batch, device="meta"), name=name, loss_fn=zoo.loss, with_ops=False)


def gpt_graph(name: str) -> ModelGraph:
    with torch.device("meta"):
        return capture(GPT(GPT_CONFIGS[name]), lm_batch(GPT_CONFIGS[name], 1, device="meta"), name=name, loss_fn=lm_loss,
                       with_ops=False)


def test_a_pipeline_plan_is_complete_and_round_trips() -> None:
    graph = zoo_graph("gpt-tiny")
    cluster = load_cluster("local:4")
    cost = CostModel(cluster)
    plan = plan_pipeline_full(graph, cluster, global_batch=8, cost=cost, options=PipelineOptions(same_size=True, min_stages=2))
    assert plan.is_pipeline and plan.mesh.axes == ("pp", "dp") and plan.mesh.size == 4
    # stages cover the layer view in order, on disjoint ranks that fill the mesh row by row
    assert [name for s in plan.stages for name in s.layers] == [layer.name for layer in graph.layers]
    assert [r for s in plan.stages for r in s.ranks] == list(range(4))
    assert all(s.stage_mesh.size == len(s.ranks) for s in plan.stages)
    # each parameter lives on the stage that holds its layer, placed on that stage's mesh
    for p in plan.params:
        layer = graph.layers[next(q.layer for q in graph.params if q.name == p.name)].name
        assert layer in plan.stages[p.stage].layers  # type: ignore[index]
        assert len(p.placements) == len(plan.mesh_of(p).axes)
    b = plan.batch
    assert b.global_size == 8 and b.micro_size * b.num_micro * plan.dp_degree == 8
    # the chosen stages were simulated under 1F1B, the zero-bubble schedule and interleaved 1F1B; the fastest won
    # (which one depends on the machine's profile: zero-bubble runs a third pass per micro-batch, and each pass
    # costs host time)
    options = PipelineOptions(same_size=True, min_stages=2)
    fixed = [plan_pipeline_full(graph, cluster, global_batch=8, cost=cost, schedule=kind, options=options)
             for kind in ("1f1b", "zero-bubble")]
    assert plan.schedule.kind in ("1f1b", "zero-bubble", "interleaved-1f1b")
    assert plan.schedule.num_microbatches == b.num_micro and plan.predicted is not None
    assert all(p.predicted is not None and plan.predicted.step_s <= p.predicted.step_s for p in fixed)
    assert len(plan.programs) == len(plan.stages)  # ranks of a stage share one program
    assert plan_from_json(plan_to_json(plan)) == plan
    # the prediction is the simulator's; each stage's ranks hold that stage's state, not the whole model's
    assert plan.predicted == simulate(plan, cost).prediction
    result = simulate(plan, cost)
    states = 2 + OPTIMIZER_STATES["adamw"]
    for stage in plan.stages:
        numel = sum(q.numel for q in graph.params if any(p.name == q.name and p.stage == stage.index for p in plan.params))
        assert result.static_by_rank[stage.ranks[0]] >= numel * 4 * states
        assert result.static_by_rank[stage.ranks[0]] < graph.param_bytes * states
    assert 0 < plan.predicted.bubble_fraction < 1
    text = plan_text(plan, width=160)
    assert "pipeline stages" in text and f"2 stages (2 ranks each), {plan.schedule.kind}" in text and "MFU" in text


def test_stages_of_different_sizes_keep_a_flat_mesh() -> None:
    # GPT-3 6.7B in fp32 on one DGX-A100 at batch 128: the planner's stages take submeshes of different sizes
    cluster = load_cluster("dgx-a100:1")
    cost = CostModel(cluster)
    plan = plan_pipeline_full(gpt_graph("gpt3-6.7b"), cluster, global_batch=128, cost=cost)
    sizes = [len(s.ranks) for s in plan.stages]
    assert sum(sizes) == 8 and len(set(sizes)) > 1
    assert plan.mesh.axes == ("world",) and plan.dp_degree == 1
    assert plan.batch.micro_size * plan.batch.num_micro == 128  # each stage splits a micro-batch over its own ranks
    assert plan.predicted is not None and max(plan.predicted.peak_memory_bytes) <= 0.9 * cluster.device.memory_bytes
    assert plan_from_json(plan_to_json(plan)) == plan


def test_the_auto_planner_weighs_a_pipeline_when_asked() -> None:
    zoo = zoo_model("gpt-tiny")
    with torch.device("meta"):
        model = zoo.build()
    cluster = load_cluster("local:4")
    plan = choose(model, zoo.make_batch(2, device="meta"), cluster, global_batch=8, loss_fn=zoo.loss, name="gpt-tiny",
                  families=("data-parallel", "pipeline"))
    families = {c.family for c in plan.candidates}
    assert families == {"data parallel", "pipeline"}
    only = choose(model, zoo.make_batch(2, device="meta"), cluster, global_batch=8, loss_fn=zoo.loss, name="gpt-tiny",
                  families=("pipeline",))
    assert only.is_pipeline and len(only.candidates) == 1 and only.candidates[0].note.startswith("chosen")


def test_the_spmd_path_refuses_a_pipeline_plan_clearly() -> None:
    graph = zoo_graph("gpt-tiny")
    cluster = load_cluster("local:4")
    plan = plan_pipeline_full(graph, cluster, global_batch=8, cost=CostModel(cluster),
                              options=PipelineOptions(same_size=True, min_stages=2))
    ctx = DistContext(rank=0, world_size=4, local_rank=0, local_world_size=4, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(PlanMismatchError, match="2-stage pipeline: apply it with .*apply_pipeline_plan"):
        check_plan(plan, ctx)


class Residual(nn.Module):
    """Two layers whose output adds the model's input back: not a chain of its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)) + x


class Skip(Residual):
    """The second layer takes the model's input, not the first layer's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(x + self.first(x))


def mse(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def test_only_a_chain_of_layers_may_become_a_pipeline() -> None:
    batch = (torch.randn(2, 4), torch.randn(2, 4))
    layers = ["first", "second"]
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert chain_problem(seq, batch, ["0", "1"], mse) is None
    assert "does not return the output of its last layer" in str(chain_problem(Residual(), batch, layers, mse))
    assert "layer 'second' does not take exactly the output of 'first'" in str(chain_problem(Skip(), batch, layers, mse))
    assert "calls the model 2 times" in str(chain_problem(seq, batch, ["0", "1"], lambda m, b: mse(m, b) + mse(m, b)))
    # a Hugging Face GPT-2's loss passes labels to the model: no pipeline candidate, and the table says why
    zoo = zoo_model("hf-gpt2-tiny")
    with torch.device("meta"):
        model = zoo.build()
    plan = choose(model, zoo.make_batch(2, device="meta"), load_cluster("local:4"), global_batch=8, loss_fn=zoo.loss,
                  name="hf-gpt2-tiny", families=("data-parallel", "pipeline"))
    (pipeline,) = [c for c in plan.candidates if c.family == "pipeline"]
    assert not pipeline.fits and "the loss must call the model on the batch's first element alone" in pipeline.note


def test_plan_family_pipeline_then_sim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    code, text, err = run(["plan", "gpt-tiny", "--cluster", CLUSTER, "--batch", "8", "--family", "pipeline", "--out", str(out)],
                          capsys)
    assert code == 0, err
    assert "pipeline stages" in text and "bubble" in text and "plait run --plan" in text
    plan = load_plan(out)
    assert plan.is_pipeline
    png = tmp_path / "timeline.png"
    code, text, err = run(["sim", str(out), "--timeline", str(png)], capsys)
    assert code == 0, err
    assert "pipeline" in text and "throughput" in text and "peak memory, ranks 0-1" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensor_parallel_stages_carry_the_ilps_layout_and_its_collectives() -> None:
    zoo = zoo_model("gpt-mini")
    with torch.device("meta"):
        model = zoo.build()
    batch = zoo.make_batch(4, device="meta")
    graph = capture(model, batch, name="gpt-mini", loss_fn=zoo.loss, with_ops=False)
    source = ModelSource(model=model, example_batch=batch, batch_size=4, loss_fn=zoo.loss, name="gpt-mini")
    cluster = load_cluster("local:4")
    cost = CostModel(cluster)
    options = PipelineOptions(same_size=True, min_stages=2, tp_sizes=(2,))
    plan = plan_pipeline_full(graph, cluster, global_batch=16, cost=cost, options=options, source=source)
    assert plan.mesh.axes == ("pp", "dp", "tp") and all(s.stage_mesh.shape == (1, 2) for s in plan.stages)
    qkv = plan.param("blocks.0.attn.qkv.weight")
    assert str(qkv.placements[1]) == "Shard(0)" and qkv.stage == 0  # Megatron's column split, from the ILP
    assert plan.activations and all(len(a.placements) == 2 for a in plan.activations)
    assert len(plan.programs) == plan.num_pipeline_ranks  # one per rank group (its model chunks, if interleaved)
    for program in plan.programs:
        tp = [i for i in program.instrs if i.op == "collective" and i.axes == ("tp",)]
        assert tp and all(i.group == program.ranks[:2] for i in tp)  # the stage's tensor-parallel pair
    assert plan_from_json(plan_to_json(plan)) == plan


def test_an_interleaved_plan_runs_model_chunks_round_robin_with_a_smaller_bubble() -> None:
    """Interleaved 1F1B: the layers cut into 2 x p virtual stages, virtual stage v on rank group v % p, one
    program per rank group holding both chunks' passes; the simulator shows a smaller bubble than 1F1B on the
    same stages. A pipeline that cannot be interleaved is a clear error."""
    graph, cluster = zoo_graph("gpt-mini", batch=4), load_cluster("local:4")
    cost = CostModel(cluster)
    options = PipelineOptions(same_size=True, min_stages=2, micro_batches=(4,), tp_sizes=(1,))
    plan = plan_pipeline_full(graph, cluster, global_batch=16, cost=cost, options=options, schedule="interleaved-1f1b")
    p = plan.num_pipeline_ranks
    assert p >= 2 and len(plan.stages) == 2 * p and plan.mesh.shape[0] == p
    assert [s.ranks for s in plan.stages] == [plan.stages[v % p].ranks for v in range(2 * p)]
    assert [n for s in plan.stages for n in s.layers] == [layer.name for layer in graph.layers]
    assert len(plan.programs) == p and {i.stage for i in plan.program_of(0).instrs if i.stage is not None} == {0, p}
    assert plan.stages_of(0) == (plan.stages[0], plan.stages[p])
    assert plan_from_json(plan_to_json(plan)) == plan
    assert f"{p} stages x 2 model chunks" in plan_text(plan)
    plain = plan_pipeline_full(graph, cluster, global_batch=16, cost=cost, options=options, schedule="1f1b")
    assert plan.predicted is not None and plain.predicted is not None
    assert plan.predicted.bubble_fraction < plain.predicted.bubble_fraction
    too_few_layers = PipelineOptions(same_size=True, min_stages=2, micro_batches=(4,), tp_sizes=(1,), chunks=(4,))
    with pytest.raises(PlaitError, match="cannot be interleaved"):
        plan_pipeline_full(graph, cluster, global_batch=16, cost=cost, options=too_few_layers, schedule="interleaved-1f1b")
