"""The pipeline search's bulk pricing and pruning: candidates priced once per range signature equal pricing each
range on its own, reachability keeps exactly the ranges some pipeline uses, submesh shapes for one-size
pipelines, scatter-gather boundaries and tensor-parallel backward memory."""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from plankit import gpu_cluster

from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.cost.memory import OPTIMIZER_STATES
from plait.graph import capture
from plait.models import zoo_model
from plait.plan.ir import MeshSpec
from plait.planners.intra_op.planner import given_layout
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineOptions, plan_pipeline
from plait.planners.pipeline_lowering import stage_memory
from plait.planners.pipeline_search import rank_micros, same_size_meshes
from plait.planners.stage_candidates import Block, group_ranges, price_block
from plait.planners.stage_configs import ShardedLayers
from plait.planners.stage_pricing import StageConfig, StagePricer, layer_workspace
from plait.planners.stage_ranges import layer_arrays

BENCH = Path(__file__).resolve().parents[2] / "bench" / "plan_quality.py"


@pytest.fixture(scope="module")
def mini() -> tuple[StagePricer, StagePricer]:
    """gpt-mini's pricers on 2 nodes x 4 GPUs: replicated layers only, and 2-way layers in Megatron-LM's layout
    (the ILP replicates a model this small)."""
    zoo = zoo_model("gpt-mini")
    with torch.device("meta"):
        model = zoo.build()
    batch = zoo.make_batch(2, device="meta")
    graph = capture(model, batch, name="gpt-mini", loss_fn=zoo.loss, with_ops=False)
    source = ModelSource(model=model, example_batch=batch, batch_size=2, loss_fn=zoo.loss, name="gpt-mini")
    cluster = gpu_cluster(2, devices=4)
    cost = CostModel(cluster)
    spec = importlib.util.spec_from_file_location("plan_quality_layout", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    joint = source.joint(2)
    solved = given_layout(joint, MeshSpec(shape=(2,), axes=("tp",)), ("tp",),
                          *bench.megatron_layout(joint, 4, vocab_parallel=False))
    sharded = {2: ShardedLayers(tp=2, graph=source.graph(2), joint=joint, solved=solved, joint_batch=2,
                                compute_dtype="fp32")}
    plain = StagePricer(graph=graph, cluster=cluster, cost=cost, optimizer="adamw")
    return plain, StagePricer(graph=graph, cluster=cluster, cost=cost, optimizer="adamw", sharded=sharded)


@pytest.mark.parametrize("tp", [1, 2])
def test_bulk_prices_equal_each_range_priced_on_its_own(mini: tuple[StagePricer, StagePricer], tp: int) -> None:
    pricer = mini[1]
    L = len(pricer.graph.layers)
    starts = np.arange(L + 1)
    ga, gb = group_ranges(np.ones(L), 1.0, None)
    block = Block(submesh=0, devices=4, tp=tp, rank_micro=2, num_micro=4, split=tp > 1)
    limit = 1e9
    cands = price_block(pricer, layer_arrays(pricer, tp, 2), starts, ga, gb, block, limit=limit, max_stages=4)
    assert len(cands) >= len(ga)  # every range fits; recomputation only where it lets more stages follow
    configs = pricer.configs()
    for i in range(len(cands)):
        a, b = int(cands.first_layer[i]), int(cands.stop_layer[i])
        config = configs[int(cands.config[i])]
        assert config.tp == tp
        split = pricer.send_split(b - 1, 2, tp) if b < L else 1
        assert int(cands.send_split[i]) == split
        own = pricer.price(a, b, 2, config, last=b == L, send_split=split)
        assert cands.table.time_s[i] == pytest.approx(pricer.time_s(own.work), rel=1e-12)
        assert cands.table.once_s[i] == pytest.approx(pricer.once_s(own, 4 // tp, 4), rel=1e-12)
        memory = stage_memory(own.work, input_bytes=own.input_bytes, num_micro=4, step_temp_bytes=own.step_temp_bytes)
        in_flight = memory.max_in_flight(limit - own.param_bytes * (2 + OPTIMIZER_STATES["adamw"]), cap=4)
        assert int(cands.table.max_after[i]) == in_flight - 1


def test_reachability_keeps_exactly_the_ranges_some_pipeline_uses() -> None:
    rng = random.Random(3)
    for _ in range(40):
        G, S = rng.randint(1, 9), rng.randint(1, 5)
        flops = np.array([rng.choice([1.0, 2.0, 3.0]) for _ in range(G)])
        imbalance = rng.choice([0.2, 0.5, 1.0])
        share = flops.sum() / S
        allowed = set(zip(*group_ranges(flops, share, imbalance), strict=True))
        ga, gb = group_ranges(flops, share, imbalance, S)
        used = set()
        for cuts in itertools.combinations(range(1, G), S - 1):
            edges = (0, *cuts, G)
            chain = list(zip(edges[:-1], edges[1:], strict=True))
            if all(r in allowed for r in chain):
                used |= set(chain)
        assert set(zip(ga.tolist(), gb.tolist(), strict=True)) == used


def test_one_size_pipelines_take_any_whole_number_of_nodes_that_divides_the_cluster() -> None:
    # Megatron-LM's 530B runs 35 stages of 9 nodes on 315 nodes; its 1T 64 stages of 6 nodes on 384.
    assert 72 in same_size_meshes(load_cluster("dgx-a100:315"), 130, 1)
    meshes = same_size_meshes(load_cluster("dgx-a100:384"), 130, 1)
    assert 48 in meshes and all(3072 % d == 0 and 3072 // d <= 130 for d in meshes)
    assert same_size_meshes(load_cluster("dgx-a100:2"), 34, 2) == [1, 2, 4, 8]
    assert list(rank_micros(512, 4, (), None)) == [(1, 128), (2, 64), (4, 32), (8, 16), (16, 8), (32, 4), (64, 2)]
    assert list(rank_micros(8, 2, (2, 4), None)) == [(1, 4), (2, 2)]
    assert list(rank_micros(2520, 9, (), None)) == [(1, 280), (2, 140), (4, 70), (8, 35)]
    assert list(rank_micros(96, 3, (), 4)) == [(4, 8)]


def test_a_tensor_parallel_boundary_between_nodes_crosses_as_slices(mini: tuple[StagePricer, StagePricer]) -> None:
    # Between nodes (25 GB/s) each of 2 ranks sends half and the receiver all-gathers inside its node (300 GB/s).
    # 64 samples per rank: 4 MB cross, so bandwidth and not latency decides (2 samples stay whole).
    pricer = mini[1]
    assert pricer.send_split(1, 64, 2) == 2 and pricer.send_split(1, 2, 2) == 1
    assert pricer.send_split(1, 64, 1) == 1
    assert pricer.send_split(len(pricer.graph.layers) - 1, 64, 2) == 1  # the last layer sends nothing on
    whole = pricer.price(0, 2, 64, StageConfig(2, False), last=False)
    sliced = pricer.price(0, 2, 64, StageConfig(2, False), last=False, send_split=2)
    assert sliced.work.send_split == 2 and whole.work.send_split == 1
    assert pricer.time_s(sliced.work) < pricer.time_s(whole.work)
    nbytes = whole.work.boundary_bytes
    assert pricer.boundary_s(nbytes, 2, 2) == pytest.approx(
        2 * (pricer.cost.p2p_time(nbytes // 2, 0, 4) + pricer.cost.collective_time("all_gather", nbytes, (0, 1))))


def test_tensor_parallel_backward_memory_shrinks_with_the_local_shards(mini: tuple[StagePricer, StagePricer]) -> None:
    plain, pricer = mini
    layer = pricer.graph.layers[1]
    whole = layer_workspace(layer, plain.works(1, 2)[1], 1.0)
    assert whole == layer.bwd_workspace_bytes + layer.bwd_param_grad_bytes  # replicated layers: as captured
    local = pricer.local_params(2)[0][1]
    split = layer_workspace(layer, pricer.works(2, 2)[1], 1.0, local)
    assert split < whole
    assert split >= layer.bwd_param_grad_bytes * local / layer.param_bytes


def test_the_search_simulates_its_shortlist_and_the_unpruned_dp_is_no_worse_by_its_own_measure(
        mini: tuple[StagePricer, StagePricer]) -> None:
    # The simulator checks the DP's best few; the chosen one records its simulated step.
    pricer = mini[1]
    choice = plan_pipeline(pricer.graph, pricer.cluster, global_batch=16, cost=pricer.cost,
                           options=PipelineOptions(same_size=True, min_stages=2), sharded=pricer.sharded)
    assert choice.simulated_s is not None and len({len(r) for r in choice.stage_ranks}) == 1
    parts = dict(choice.searched)
    assert {"stage_pricing", "stage_dp", "simulate_shortlist"} <= set(parts) and parts["problems"] >= 1
    exact = plan_pipeline(pricer.graph, pricer.cluster, global_batch=16, cost=pricer.cost,
                          options=PipelineOptions(same_size=True, min_stages=2, stage_imbalance=None, simulate_top=0),
                          sharded=pricer.sharded)
    assert exact.simulated_s is None and exact.step_s <= choice.step_s * (1 + 1e-9)  # the DP's own optimum
