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

from plait.cost.memory import memory_estimate, sharded_bytes
from plait.errors import PlaitError
from plait.graph import capture
from plait.graph.model_graph import ParamInfo
from plait.models.zoo import zoo_model

HERE = Path(__file__).parent


def test_replicated_by_hand() -> None:
    est = memory_estimate(tiny_graph(batch=4), kind="replicate", shard_degree=2, micro_batch=8)
    assert (est.params, est.grads) == (192, 192)  # 24 + 6 + 18 fp32 elements; grads are the buckets
    assert est.optimizer == 2 * 192 + 4 * 3  # two AdamW moments and a 4-byte step per tensor
    assert est.activations == 2 * (64 + 96)  # saved bytes at batch 4, scaled to micro-batch 8
    # module buffers + the largest parameter's fresh gradient + the largest output and its gradient
    assert est.buffers == 16 + 96 + 2 * 2 * 96
    assert est.total == est.params + est.grads + est.optimizer + est.activations + est.buffers


def test_sharded_by_hand() -> None:
    graph = tiny_graph(batch=4)
    est = memory_estimate(graph, kind="fsdp", shard_degree=4, micro_batch=8)
    shard = 2 * 4 * 4 + 2 * 4 + 1 * 6 * 4  # dim 0 padded to a multiple of 4: 6 -> 2 rows, 3 -> 1 row
    assert (est.params, est.grads) == (shard, shard)
    assert est.optimizer == 2 * shard + 4 * 3
    backward = 320 + 5 * 120 + 30  # activations, five units of the largest layer, its all-gather input
    assert est.buffers == 16 + backward - 320 - shard
    hybrid = memory_estimate(graph, kind="hybrid", shard_degree=4, micro_batch=8)
    assert hybrid == est


def test_padding_of_dim_zero() -> None:
    p = ParamInfo(name="w", shape=(5, 3), dtype="bf16", layer=0)
    assert sharded_bytes(p, 1) == 30
    assert sharded_bytes(p, 2) == 3 * 3 * 2
    assert sharded_bytes(p, 8) == 1 * 3 * 2


def test_foreach_step_on_cuda_holds_a_copy_of_all_parameters() -> None:
    params = tuple(ParamInfo(name=f"p{i}", shape=(6,), dtype="fp32", layer=0) for i in range(8))  # 8 x 24 B
    graph = replace(tiny_graph(batch=4), params=params)
    cpu = memory_estimate(graph, kind="replicate", shard_degree=1, micro_batch=1)
    cuda = memory_estimate(graph, kind="replicate", shard_degree=1, micro_batch=1, device_kind="cuda")
    # micro-batch 1: activations 40 B, boundary 2 x 24 B. The CPU step's two temporaries of one 24-byte
    # parameter stay below the backward moment; the foreach step's copy of all 192 bytes does not.
    assert cpu.buffers == 16 + 24 + 48
    assert cuda.buffers == 16 + 192 - 40


def test_unknown_optimizer_is_a_user_error() -> None:
    with pytest.raises(PlaitError, match="unknown optimizer 'lion'"):
        memory_estimate(tiny_graph(), kind="replicate", shard_degree=1, micro_batch=1, optimizer="lion")


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
        est = memory_estimate(graph, kind=kind, shard_degree=2, micro_batch=batch)
        assert est.total == pytest.approx(measured[kind], rel=0.15), (kind, est, measured[kind])
