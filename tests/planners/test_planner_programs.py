"""The lowered data-parallel programs under the real cost model: step = compute + exposed comm, overlap, memory."""

from __future__ import annotations

import pytest
from plankit import dense_graph, gpu_cluster

from plait.cost import CostModel
from plait.cost.work import layer_work_of
from plait.planners import build_dp_plan
from plait.planners.lowering import backward, forward
from plait.sim import instruction_time, simulate


@pytest.mark.parametrize("kind,nodes", [("replicate", 1), ("fsdp", 1), ("hybrid", 2)])
@pytest.mark.parametrize("num_micro", [1, 3])
def test_step_is_busy_compute_plus_exposed_comm(kind: str, nodes: int, num_micro: int) -> None:
    cluster = gpu_cluster(nodes, inter_gb_s=5)
    plan = build_dp_plan(dense_graph(6, 1024, 8), cluster, kind=kind, global_batch=24 * nodes * 4, num_micro=num_micro)  # type: ignore[arg-type]
    p = plan.predicted
    assert p is not None and p.comm_s > 0
    assert p.step_s == pytest.approx(p.compute_s + p.exposed_comm_s, rel=1e-9)
    assert 0 <= p.exposed_comm_s <= p.comm_s


def test_single_rank_step_is_the_sum_of_layer_times() -> None:
    cluster = gpu_cluster(devices=1)
    graph = dense_graph(5, 512, 8)
    plan = build_dp_plan(graph, cluster, kind="replicate", global_batch=16, num_micro=2)
    assert plan.precision.compute_dtype == "bf16"  # a GPU cluster's default
    cost = CostModel(cluster)
    work = layer_work_of(graph, plan)
    per_micro = sum(
        instruction_time(forward(w, 0), cost, dtype="bf16") + instruction_time(backward(w, 0, last_layer=False), cost, dtype="bf16")
        for w in work
    )
    expected = 2 * per_micro + cost.optimizer_time(graph.num_params, num_tensors=len(graph.params))
    assert plan.predicted is not None
    assert plan.predicted.step_s == pytest.approx(expected, rel=1e-12)
    assert plan.predicted.comm_s == 0 and plan.predicted.exposed_comm_s == 0


def test_backward_has_twice_the_forward_traffic_and_kernels() -> None:
    graph = dense_graph(2, 64, 4)
    layer = graph.layers[1]
    plan = build_dp_plan(graph, gpu_cluster(devices=1), kind="replicate", global_batch=8)
    w = layer_work_of(graph, plan)[1]
    fwd, bwd = forward(w, 0), backward(w, 0, last_layer=True)
    assert (fwd.flops, fwd.bytes_moved, fwd.num_kernels) == (2 * layer.fwd_flops, 2 * layer.fwd_bytes_moved, layer.num_kernels)
    assert (bwd.flops, bwd.bytes_moved, bwd.num_kernels) == (2 * layer.bwd_flops, 4 * layer.fwd_bytes_moved, 2 * layer.num_kernels)
    cost = CostModel(gpu_cluster(devices=1))
    assert instruction_time(bwd, cost) == cost.compute_time(2 * layer.bwd_flops, 4 * layer.fwd_bytes_moved, num_kernels=2 * layer.num_kernels)


def test_first_bucket_reduce_starts_before_backward_ends() -> None:
    cluster = gpu_cluster()
    plan = build_dp_plan(dense_graph(8, 1024, 8), cluster, kind="replicate", global_batch=32, bucket_bytes=5 << 20)
    events = simulate(plan, CostModel(cluster)).events_of(0)
    backward_end = max(e.end for e in events if e.phase == "bwd" and e.op == "compute")
    first_reduce = min(e.start for e in events if e.name.startswith("all_reduce"))
    assert first_reduce < backward_end
    assert plan.predicted is not None and plan.predicted.overlap > 0


def test_peak_memory_by_hand() -> None:
    layers, act_scale = 6, 64
    graph = dense_graph(layers, 256, 8, act_scale=act_scale)
    unit, act, out = graph.layers[0].param_bytes, graph.layers[0].activation_bytes, graph.layers[0].output_bytes
    weight = graph.params[0].nbytes  # the largest parameter
    assert act > unit
    cluster = gpu_cluster(inter_gb_s=300)
    cost = CostModel(cluster)
    # replicated, at the start of the last layer's backward: every saved activation, the loss's two gradients
    # of the output, the gradient of the layer's input and the fresh gradient of its weight
    rep = simulate(build_dp_plan(graph, cluster, kind="replicate", global_batch=32, precision="fp32"), cost)
    assert rep.trace_of(0).peak_dynamic_bytes == layers * act + 3 * out + weight
    rep2 = simulate(build_dp_plan(graph, cluster, kind="replicate", global_batch=32, num_micro=2, precision="fp32"), cost)
    assert rep2.trace_of(0).peak_dynamic_bytes == (layers * act + 3 * out) // 2 + weight
    # fsdp, while the last unit's gradient is reduced: five units (its parameters, unsharded gradients and
    # their reduce-scatter input; the prefetched unit's all-gather output and parameters being copied
    # out), the sharded gradient the reduce-scatter writes, and the activations of the other layers
    fsdp = simulate(build_dp_plan(graph, cluster, kind="fsdp", global_batch=32, precision="fp32"), cost)
    assert fsdp.trace_of(0).peak_dynamic_bytes == (layers - 1) * act + out + 5 * unit + unit // 4
    p = fsdp.prediction
    shard = sum(-(-p_.shape[0] // 4) * (p_.numel // p_.shape[0]) * 4 for p_ in graph.params)
    assert (p.memory.params, p.memory.grads) == (shard, shard) and p.memory.optimizer >= 2 * shard
    batch = 8 * 8 * 256  # the micro-batch of 8 rows of 256 inputs on the device, at 8 bytes per element
    # sharded gradients are not held across steps: they are in the program (made by the reduce-scatters)
    assert p.peak_memory_bytes == (shard + p.memory.optimizer + batch + fsdp.trace_of(0).peak_dynamic_bytes,) * 4
    assert all(t.memory[-1][1] == 0 for t in (rep.trace_of(0), rep2.trace_of(0), fsdp.trace_of(0)))  # all given back
