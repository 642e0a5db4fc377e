"""Plan quality in small: Megatron-LM's hand layout of a small GPT on a small fake cluster, built by the logic
of ``bench/plan_quality.py``, and plait's plan is no worse under the same cost model (the bench: 1.3B-39B)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from plankit import gpu_cluster

from plait.cost import CostModel
from plait.graph.boundary import Boundary
from plait.models import GPT, GPTConfig, lm_batch, lm_loss
from plait.plan.ir import MeshSpec
from plait.plan.placement import REPLICATE, shard
from plait.planners.ilp_model import evaluate
from plait.planners.intra_op.planner import build_intra_op_plan
from plait.planners.intra_op.problem import layout_choices
from plait.planners.intra_op.source import ModelSource

BENCH = Path(__file__).resolve().parents[2] / "bench" / "plan_quality.py"
CFG = GPTConfig(
    vocab_size=128, seq_len=32, num_layers=2, num_heads=4, hidden=64
)  # 4 heads: whole heads on tp=4
GLOBAL_BATCH = 16
R, COL, ROW = REPLICATE, shard(0), shard(1)


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plan_quality_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The bench script as a module."""
    return _load_bench()


@pytest.fixture(scope="module")
def hand(bench: ModuleType) -> list[Any]:
    """Megatron-LM's layout (both vocabulary treatments) of the small GPT on 2 nodes x 4 GPUs."""
    cluster = gpu_cluster(2, devices=4)
    with torch.device("meta"):
        model = GPT(CFG)
    source = bench.model_source(model, CFG, cluster)
    limit = int(cluster.device.memory_bytes * bench.MEMORY_FRACTION)
    return list(
        bench.megatron_plans(
            source, cluster, CFG.num_layers, global_batch=GLOBAL_BATCH, cost=CostModel(cluster), limit=limit
        )
    )


def test_megatron_layout_is_tensor_parallel_in_a_node_and_data_parallel_across(hand: list[Any]) -> None:
    replicated, split = hand
    plan = replicated.plan
    assert plan.mesh.axes == ("dp", "tp") and plan.mesh.shape == (2, 4)
    assert replicated.fits and not replicated.fsdp and plan.batch.num_micro == 1
    for i in range(CFG.num_layers):
        assert plan.param(f"blocks.{i}.attn.qkv.weight").placements == (R, COL)
        assert plan.param(f"blocks.{i}.mlp.fc1.bias").placements == (R, COL)
        assert plan.param(f"blocks.{i}.attn.proj.weight").placements == (R, ROW)
        assert plan.param(f"blocks.{i}.mlp.fc2.bias").placements == (R, R)
        assert plan.param(f"blocks.{i}.ln1.weight").placements == (R, R)
    pinned = {(a.module, a.port, a.index): a.placements for a in plan.activations}
    assert pinned[("blocks.0.attn.proj", "output", 0)] == (shard(0), R)  # batch split on dp, replicated on tp
    assert pinned[("blocks.1.mlp.fc2", "output", 0)] == (shard(0), R)
    assert plan.param("head.out.weight").placements == (R, R)
    assert split.plan.param("head.out.weight").placements == (R, COL)
    assert split.plan.param("embed.tok.weight").placements == (R, COL)
    for p in (
        plan.params
    ):  # gradients meet over dp in buckets (and over tp where a replicated weight sees a split input)
        assert p.sync.kind == "allreduce" and "dp" in p.sync.axes


def test_megatron_layout_is_captured_in_the_compute_dtype_plait_plans_in(hand: list[Any]) -> None:
    # both sides run under bf16 autocast: the hand layout's activations cross the tp axis in bf16, as plait's do
    plan = hand[0].plan
    assert plan.precision.compute_dtype == "bf16"
    tp = [
        i for i in plan.programs[0].instrs if i.op == "collective" and i.axes == ("tp",) and i.phase == "fwd"
    ]
    assert len(tp) == 2 * CFG.num_layers  # attention's and the MLP's output all-reduce per block
    assert {i.nbytes for i in tp} == {plan.batch.micro_size * CFG.seq_len * CFG.hidden * 2}


def test_megatron_layout_names_boundaries_the_joint_graph_has(bench: ModuleType) -> None:
    with torch.device("meta"):
        model = GPT(CFG)
    joint = ModelSource(
        model=model, example_batch=lm_batch(CFG, 2, device="meta"), batch_size=2, loss_fn=lm_loss
    ).joint(2)
    params, pins = bench.megatron_layout(joint, CFG.num_layers, vocab_parallel=True)
    assert {joint.boundaries[k] for k in pins} == {
        Boundary(f"blocks.{i}.{m}", "output", 0)
        for i in range(CFG.num_layers)
        for m in ("attn.proj", "mlp.fc2")
    } | {Boundary("embed.tok", "output", 0)}
    assert len(params) == 8 * CFG.num_layers + 2


def test_plait_is_no_worse_than_megatron_under_the_same_cost_model(bench: ModuleType) -> None:
    c = bench.compare(CFG, gpu_cluster(2, devices=4), global_batch=GLOBAL_BATCH, name="gpt-test")
    assert c.plait is not None and c.megatron_fits
    assert c.ratio is not None and c.ratio >= 1 - 1e-9, (c.plait, c.megatron)
    assert c.megatron["mesh"] == "dp=2 x tp=4"
    assert {v["vocab"] for v in c.megatron_variants} == {"replicated", "split"}
    assert any(cand["note"].startswith("chosen") for cand in c.candidates)
    assert (
        c.same_mesh is not None and c.same_mesh["name"] == "intra-op dp=2 x tp=4"
    )  # plait's ILP on Megatron's mesh


def test_megatron_layout_is_a_point_of_the_ilp_that_costs_no_less_than_its_solution(
    bench: ModuleType,
) -> None:
    cluster = gpu_cluster(devices=4)
    with torch.device("meta"):
        model = GPT(CFG)
    source = bench.model_source(model, CFG, cluster)
    graph, joint = source.graph(GLOBAL_BATCH), source.joint(GLOBAL_BATCH)
    _, solved = build_intra_op_plan(
        graph, joint, cluster, mesh=MeshSpec(shape=(1, 4), axes=("dp", "tp")), model_axes=("tp",),
        global_batch=GLOBAL_BATCH, joint_batch=GLOBAL_BATCH, cost=CostModel(cluster), precision="bf16",
    )  # fmt: skip
    problem, solution = solved.problem, solved.solution
    assert problem is not None and solution is not None
    assert layout_choices(problem, solved.params, solved.pins) == list(solution.choices)
    for split in (False, True):
        choices = layout_choices(problem, *bench.megatron_layout(joint, CFG.num_layers, vocab_parallel=split))
        assert choices is not None, "Megatron's layout must be a point of the ILP's space"
        objective, _ = evaluate(problem.ilp, choices)
        assert solution.objective <= objective * (1 + 1e-9), (split, solution.objective, objective)
