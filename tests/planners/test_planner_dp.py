"""build_dp_plan: mesh, batch arithmetic, placements, sync and the lowered step programs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from plait.cluster import Cluster
from plait.errors import PlaitError
from plait.graph import ModelGraph
from plait.plan import REPLICATE, Instr, Plan, plan_from_json, plan_to_json, shard
from plait.planners import batch_spec, build_dp_plan


def _ops(plan: Plan, collective: str) -> list[tuple[int, Instr]]:
    return [(k, i) for k, i in enumerate(plan.programs[0].instrs) if i.collective == collective]


def test_batch_arithmetic() -> None:
    assert batch_spec(64, 8).micro_size == 8
    b = batch_spec(64, 4, num_micro=4)
    assert (b.micro_size, b.num_micro, b.global_size) == (4, 4, 64)
    b = batch_spec(64, 4, micro_batch=2)  # accumulation inferred
    assert (b.micro_size, b.num_micro) == (2, 8)
    with pytest.raises(PlaitError, match="divisible by 12"):
        batch_spec(64, 4, num_micro=3)
    with pytest.raises(PlaitError, match="multiple of 12"):
        batch_spec(64, 4, micro_batch=3)
    with pytest.raises(PlaitError, match=r"64 != micro-batch 2 x 2"):
        batch_spec(64, 4, micro_batch=2, num_micro=2)
    with pytest.raises(PlaitError, match="positive"):
        batch_spec(0, 4)
    with pytest.raises(PlaitError, match="micro_batch must be a positive"):
        batch_spec(8, 4, micro_batch=0)


def test_replicate_plan(make_graph: Callable[..., ModelGraph], make_cluster: Callable[..., Cluster]) -> None:
    graph = make_graph(num_layers=4)
    plan = build_dp_plan(graph, make_cluster(), kind="replicate", global_batch=32, bucket_bytes=300_000)
    assert plan.mesh.shape == (4,) and plan.mesh.axes == ("dp",)
    assert (plan.batch.micro_size, plan.batch.num_micro) == (8, 1)
    assert all(p.placements == (REPLICATE,) and p.sync.kind == "allreduce" for p in plan.params)
    bucket_of = {n: b.index for b in plan.buckets for n in b.params}
    assert all(p.sync.bucket == bucket_of[p.name] for p in plan.params)
    instrs = plan.programs[0].instrs
    assert plan.programs[0].ranks == (0, 1, 2, 3)
    reduces = _ops(plan, "all_reduce")
    assert len(reduces) == len(plan.buckets)
    for (_, ins), bucket in zip(reduces, plan.buckets, strict=True):
        (scaled,) = ins.deps  # the bucket is scaled by 1/world right after the backward of its lowest layer
        (dep,) = instrs[scaled].deps
        assert instrs[scaled].bytes_moved == 2 * bucket.nbytes and instrs[scaled].name == f"scale bucket {bucket.index}"
        assert instrs[dep].phase == "bwd" and instrs[dep].layer == bucket.ready_after_layer
        assert ins.nbytes == bucket.nbytes and ins.group == (0, 1, 2, 3) and ins.stream == "comm"
    opt = instrs[-1]
    assert opt.op == "optimizer" and opt.numel == graph.num_params and set(opt.deps) == {k for k, _ in reduces}
    assert plan.provenance is not None and plan.predicted is not None


def test_replicate_reduces_only_on_last_micro_batch(make_graph: Callable[..., ModelGraph], make_cluster: Callable[..., Cluster]) -> None:
    plan = build_dp_plan(make_graph(), make_cluster(), kind="replicate", global_batch=32, num_micro=4, bucket_bytes=300_000)
    instrs = plan.programs[0].instrs
    computes = [i for i in instrs if i.op == "compute" and i.layer is not None]
    assert len(computes) == 4 * 2 * 4  # micro x (fwd, bwd) x layers
    first_reduce = min(k for k, _ in _ops(plan, "all_reduce"))
    last_micro_start = next(k for k, i in enumerate(instrs) if i.name.startswith("fwd[3]"))
    assert first_reduce > last_micro_start
    assert plan.batch.micro_size == 2


def test_fsdp_plan_gathers_prefetches_and_reduce_scatters(make_graph: Callable[..., ModelGraph], make_cluster: Callable[..., Cluster]) -> None:
    graph = make_graph(num_layers=5)
    plan = build_dp_plan(graph, make_cluster(), kind="fsdp", global_batch=32, num_micro=2, precision="fp32")
    assert [u.module for u in plan.shard_units] == [layer.name for layer in graph.layers]
    assert all(p.placements == (shard(0),) and p.sync.kind == "reduce_scatter" for p in plan.params)
    instrs = plan.programs[0].instrs
    gathers, scatters = _ops(plan, "all_gather"), _ops(plan, "reduce_scatter")
    assert len(gathers) == 2 * 5 * 2 and len(scatters) == 5 * 2
    for k, ins in enumerate(instrs):
        if ins.op == "compute" and ins.layer is not None:  # each layer waits for its unit, gathered and split
            (dep,) = ins.deps
            copy = instrs[dep]
            assert copy.name.startswith("copy_out") and copy.bytes_moved == 2 * graph.layers[ins.layer].param_bytes
            assert instrs[copy.deps[0]].collective == "all_gather" and ins.name.split(" ", 1)[1] in copy.name
        if ins.collective == "reduce_scatter":  # after the unit's backward, its gradient packed
            pack = instrs[ins.deps[0]]
            # it frees its input and the unit's unsharded gradients
            assert pack.name.startswith("pack") and instrs[pack.deps[0]].phase == "bwd" and ins.free_bytes == 2 * ins.nbytes
        assert all(d < k for d in ins.deps)
    # prefetch one ahead: at most two gathered units at any point of the program order
    live = 0
    for ins in instrs:
        live += 1 if ins.collective == "all_gather" else -1 if ins.op == "free" else 0
        assert live <= 2
    opt = instrs[-1]
    assert opt.numel == -(-graph.num_params // 4)
    assert set(opt.deps) == {k for k, i in scatters if i.name.startswith("reduce_scatter[1]")}


def test_hybrid_plan(make_graph: Callable[..., ModelGraph], make_cluster: Callable[..., Cluster]) -> None:
    plan = build_dp_plan(make_graph(), make_cluster(2), kind="hybrid", global_batch=64)
    assert plan.mesh.shape == (2, 4) and plan.mesh.axes == ("dp_replicate", "dp_shard")
    assert plan.batch.micro_size == 8
    assert all(p.placements == (REPLICATE, shard(0)) for p in plan.params)
    instrs = plan.programs[0].instrs
    for _, ins in _ops(plan, "reduce_scatter") + _ops(plan, "all_gather"):
        assert ins.group == (0, 1, 2, 3) and ins.axes == ("dp_shard",)
    reduces = _ops(plan, "all_reduce")
    assert len(reduces) == 4
    for _, ins in reduces:
        assert ins.group == (0, 4) and ins.axes == ("dp_replicate",)
        assert instrs[ins.deps[0]].collective == "reduce_scatter" and ins.nbytes == -(-instrs[ins.deps[0]].nbytes // 4)


def test_hybrid_needs_two_nodes_and_kinds_are_checked(make_graph: Callable[..., ModelGraph], make_cluster: Callable[..., Cluster]) -> None:
    with pytest.raises(PlaitError, match="one node"):
        build_dp_plan(make_graph(), make_cluster(1), kind="hybrid", global_batch=32)
    with pytest.raises(PlaitError, match="unknown data-parallel kind"):
        build_dp_plan(make_graph(), make_cluster(1), kind="zero", global_batch=32)  # type: ignore[arg-type]
    with pytest.raises(PlaitError, match="optimizer"):
        build_dp_plan(make_graph(), make_cluster(1), kind="fsdp", global_batch=32, optimizer="lion")
    with pytest.raises(PlaitError, match="divisible by 4"):
        build_dp_plan(make_graph(), make_cluster(1), kind="fsdp", global_batch=30)


@pytest.mark.parametrize("kind,nodes", [("replicate", 1), ("fsdp", 1), ("hybrid", 2)])
def test_json_round_trip(kind: str, nodes: int, make_graph: Callable[..., ModelGraph], make_cluster: Callable[..., Cluster]) -> None:
    plan = build_dp_plan(make_graph(), make_cluster(nodes), kind=kind, global_batch=64, num_micro=2)  # type: ignore[arg-type]
    assert plan_from_json(plan_to_json(plan)) == plan


@pytest.mark.parametrize("kind", ["replicate", "fsdp"])
def test_layers_without_parameters(kind: str, make_graph: Callable[..., ModelGraph], make_cluster: Callable[..., Cluster]) -> None:
    from dataclasses import replace

    graph = make_graph(num_layers=3)
    bare = replace(graph.layers[1], num_params=0, param_bytes=0)
    graph = replace(graph, layers=(graph.layers[0], bare, graph.layers[2]), params=tuple(p for p in graph.params if p.layer != 1))
    plan = build_dp_plan(graph, make_cluster(), kind=kind, global_batch=32, num_micro=2, bucket_bytes=1000)  # type: ignore[arg-type]
    instrs = plan.programs[0].instrs
    assert not any("layers.1" in i.name for i in instrs if i.op != "compute" or i.layer is None)
    assert sum(1 for i in instrs if i.layer == 1) == 4  # fwd and bwd, two micro-batches
    if kind == "fsdp":
        assert [u.module for u in plan.shard_units] == ["layers.0", "layers.2"]
    assert plan.predicted is not None and plan.predicted.step_s > 0
