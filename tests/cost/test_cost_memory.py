"""The memory model: hand-computed totals on a tiny graph, and real 2-rank runs measured by the tracker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from costkit import tiny_graph

from plait.cluster import load_cluster, local_cluster
from plait.cost.memory import memory_estimate
from plait.cost.work import layer_work_of
from plait.errors import PlaitError
from plait.graph import ModelGraph, capture
from plait.graph.model_graph import ParamInfo
from plait.models.zoo import zoo_model
from plait.plan import MemoryEstimate, MeshSpec, shard
from plait.plan.layout import local_numel
from plait.planners import build_dp_plan

HERE = Path(__file__).parent


def _estimate(graph: ModelGraph, kind: str, ranks: int, micro: int, **kwargs: object) -> MemoryEstimate:
    plan = build_dp_plan(graph, local_cluster(ranks), kind=kind, global_batch=micro * ranks, precision="fp32", **kwargs)  # type: ignore[arg-type]
    return memory_estimate(plan, layer_work_of(graph, plan, shard_degree=ranks if kind != "replicate" else 1))


def test_replicated_by_hand() -> None:
    est = _estimate(tiny_graph(batch=4), "replicate", 2, 8)
    assert (est.params, est.grads) == (192, 192)  # 24 + 6 + 18 fp32 elements; grads are the buckets
    assert est.optimizer == 2 * 192 + 4 * 3  # two AdamW moments and a 4-byte step per tensor
    assert est.activations == 2 * (64 + 96)  # saved bytes at batch 4, scaled to micro-batch 8
    batch = 8 * 16 * 4  # the global batch of 16 rows of 4 inputs on a CPU rank, 8 bytes per element
    # module buffers, the batch, the largest parameter's fresh gradient, the largest output and its gradient
    assert est.buffers == 16 + batch + 96 + 2 * 2 * 96
    assert est.total == est.params + est.grads + est.optimizer + est.activations + est.buffers


def test_sharded_by_hand() -> None:
    graph = tiny_graph(batch=4)
    est = _estimate(graph, "fsdp", 4, 8)
    shard = 2 * 4 * 4 + 2 * 4 + 1 * 6 * 4  # dim 0 padded to a multiple of 4: 6 -> 2 rows, 3 -> 1 row
    assert (est.params, est.grads) == (shard, shard)
    assert est.optimizer == 2 * shard + 4 * 3
    backward = 320 + 5 * 120 + 30  # activations, five units of the largest layer, its all-gather input
    assert est.buffers == 16 + 8 * 32 * 4 + backward - 320 - shard


def test_padding_of_dim_zero() -> None:
    def shard_of(n: int) -> int:
        return local_numel((5, 3), (shard(0),), MeshSpec(shape=(n,), axes=("dp",)))

    assert (shard_of(1), shard_of(2), shard_of(8)) == (15, 3 * 3, 1 * 3)


def test_foreach_step_on_cuda_holds_a_copy_of_all_parameters() -> None:
    params = tuple(ParamInfo(name=f"p{i}", shape=(6,), dtype="fp32", layer=0) for i in range(8))  # 8 x 24 B
    graph = replace(tiny_graph(batch=4), params=params)
    cpu = _estimate(graph, "replicate", 1, 1)
    gpu = build_dp_plan(graph, load_cluster("h200:1"), kind="replicate", global_batch=1, precision="fp32")
    cuda = memory_estimate(gpu, layer_work_of(graph, gpu))
    # micro-batch 1: activations 40 B, boundary 2 x 24 B. The CPU step's two temporaries of one 24-byte
    # parameter stay below the backward moment; the foreach step's copy of all 192 bytes does not.
    assert cpu.buffers == 16 + 8 * 4 + 24 + 48
    assert cuda.buffers == 16 + 8 * 4 + 192 - 40


def test_unknown_optimizer_is_a_user_error() -> None:
    with pytest.raises(PlaitError, match="unknown optimizer 'lion'"):
        _estimate(tiny_graph(), "replicate", 1, 1, optimizer="lion")


@pytest.mark.parametrize(("name", "batch"), [("gpt-mini", 8), ("mlp-small", 8)])
def test_estimate_matches_measured_peak_on_two_ranks(name: str, batch: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, str(HERE / "memory_ranks.py"), name, str(batch)],
        capture_output=True, text=True, timeout=300, env=env, check=True,
    ).stdout
    measured = {row["kind"]: row["total_peak_bytes"] for row in map(json.loads, out.strip().splitlines())}
    zm = zoo_model(name)
    with torch.device("meta"):
        model = zm.build()
    graph = capture(model, zm.make_batch(batch, device="meta"), loss_fn=zm.loss, with_ops=False)
    for kind in ("replicate", "fsdp"):
        plan = build_dp_plan(graph, local_cluster(2), kind=kind, global_batch=2 * batch)  # type: ignore[arg-type]
        est = memory_estimate(plan, layer_work_of(graph, plan, shard_degree=2 if kind == "fsdp" else 1))
        assert est.total == pytest.approx(measured[kind], rel=0.15), (kind, est, measured[kind])
        # what the planner decides with: the simulated peak of the step program, never below the measurement
        assert plan.predicted is not None
        peak = max(plan.predicted.peak_memory_bytes)
        assert measured[kind] <= peak <= 1.15 * measured[kind], (kind, peak, measured[kind])
