"""Alpa's own intra-operator cases (OSDI'22 and its auto-sharding tests), planned by plait's search.

Costs are Alpa's: alpha-beta per mesh axis (alpha = beta = 1 unless stated), compute free, every matmul
split on every model axis (Alpa's heavy-op rule), Adam, and Alpa's default space: gradients meet by
all-reduce (no ZeRO). The plan's program lists every collective a step issues (the runtime issues exactly
those: tests/runtime/test_intra_op_run.py).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import plait
from plait.cluster import local_cluster
from plait.cost.alpha_beta import AlphaBetaCost
from plait.models import zoo_model
from plait.models.mlp import MLP, MLPConfig, mse_loss
from plait.plan import MeshSpec, Placement, Plan, shard
from plait.planners.intra_op.planner import IntraOpOptions

ALPA = IntraOpOptions(replicated_heavy_ops=False)


def alpa_plan(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], loss, shape: tuple[int, int],
              alpha: tuple[float, float] = (1, 1), beta: tuple[float, float] = (1, 1)) -> Plan:
    mesh = MeshSpec(shape=shape, axes=("x", "y"))
    cluster = local_cluster(mesh.size)
    cost = AlphaBetaCost(cluster, mesh, dict(zip(mesh.axes, alpha, strict=True)), dict(zip(mesh.axes, beta, strict=True)))
    return plait.plan(model, batch, cluster, global_batch=batch[0].shape[0], loss_fn=loss, cost=cost, meshes=[mesh],
                      intra_op=ALPA, dp_kinds=("replicate",), optimizer="adam", families=("data-parallel", "intra-op"))


def mlp(hidden: int, batch: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Six dense layers of ``hidden`` features on a batch of ``batch`` rows (meta tensors)."""
    with torch.device("meta"):
        model = MLP(MLPConfig(in_dim=hidden, hidden=hidden, num_layers=5, out_dim=hidden))
    return model, (torch.empty(batch, hidden, device="meta"), torch.empty(batch, hidden, device="meta"))


def collectives(plan: Plan) -> Counter[tuple[str, tuple[str, ...], str]]:
    """(kind, axes, phase) of every collective of a step; gradient buckets read as phase "grad"."""
    return Counter((i.collective or "", i.axes, "grad" if "bucket" in i.name else i.phase)
                   for i in plan.programs[0].instrs if i.op == "collective")


def weights(plan: Plan) -> list[tuple[Placement, ...]]:
    return [p.placements for p in plan.params if p.name.endswith("weight")]


@pytest.mark.parametrize("shape", [(1, 4), (4, 1)])
def test_wide_batch_small_mlp_is_data_parallel(shape: tuple[int, int]) -> None:
    plan = alpa_plan(*mlp(32, 256), mse_loss, shape)
    assert plan.model_axes == () and plan.mesh.shape == shape  # planned on the given mesh
    assert all(all(p.is_replicate for p in w) for w in weights(plan))
    assert collectives(plan) == Counter({("all_reduce", ("x", "y"), "grad"): 1})  # one bucket of gradients, nothing else


def test_narrow_batch_big_mlp_is_megatron() -> None:
    plan = alpa_plan(*mlp(256, 32), mse_loss, (1, 4))
    assert plan.model_axes == ("y",)
    tp = [w[1] for w in weights(plan)]
    assert tp == [shard(0), shard(1)] * 3  # column, row, column, row, ...: Megatron's alternation
    # L-1 = 5 activation all-reduces (3 after the row layers in forward, 2 for the column layers' input
    # gradients in backward; the first layer's input needs none) and no gradient all-reduce
    assert collectives(plan) == Counter({("all_reduce", ("y",), "fwd"): 3, ("all_reduce", ("y",), "bwd"): 2})


def test_2d_mesh_data_parallel_on_the_slow_axis_megatron_on_the_fast_one() -> None:
    plan = alpa_plan(*mlp(32, 256), mse_loss, (2, 2), alpha=(1, 1), beta=(1, 0.1))
    assert plan.data_parallel_axes == ("x",) and plan.model_axes == ("y",)
    assert [w[1] for w in weights(plan)] == [shard(0), shard(1)] * 3 and all(w[0].is_replicate for w in weights(plan))
    assert collectives(plan) == Counter({("all_reduce", ("y",), "fwd"): 3, ("all_reduce", ("y",), "bwd"): 2,
                                         ("all_reduce", ("x",), "grad"): 1})


def test_transformer_layers_are_megatron() -> None:
    zm = zoo_model("transformer-tiny")  # 2 post-LN layers, batch 8, sequence 8, hidden 128, 8 heads
    with torch.device("meta"):
        model = zm.build()
    plan = alpa_plan(model, zm.make_batch(8, device="meta"), zm.loss, (1, 4))
    assert plan.model_axes == ("y",)
    split = {p.name: p.placements[1] for p in plan.params}
    for layer in ("layers.0", "layers.1"):
        for name in ("attn.qkv", "mlp.fc1"):  # column split
            assert split[f"{layer}.{name}.weight"] == shard(0) and split[f"{layer}.{name}.bias"] == shard(0)
        for name in ("attn.proj", "mlp.fc2"):  # row split
            assert split[f"{layer}.{name}.weight"] == shard(1) and split[f"{layer}.{name}.bias"].is_replicate
    assert collectives(plan) == Counter({("all_reduce", ("y",), "fwd"): 4, ("all_reduce", ("y",), "bwd"): 3})  # 4L-1
