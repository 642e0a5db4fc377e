"""The intra-op per-layer work and what the lowering makes of it: saved activations counted once per storage,
recomputed collectives, DTensor's host work, collective buffers, and gradients without buckets."""

from __future__ import annotations

import operator
from functools import cache
from math import ceil

import pytest
import torch
from plankit import dense_graph, gpu_cluster

from plait.cluster import local_cluster
from plait.cost.work import (
    DTENSOR_ADAMW_KERNELS,
    DTENSOR_OP_KERNELS,
    DTENSOR_REDISTRIBUTE_KERNELS,
    Comm,
    layer_work,
)
from plait.graph import ModelGraph, capture
from plait.graph.boundary import BOUNDARY_OPS
from plait.graph.joint import JointGraph, capture_joint
from plait.models.mlp import MLP, MLPConfig, mse_loss, regression_batch
from plait.plan.ir import Instr, Plan
from plait.plan.placement import REPLICATE, shard
from plait.planners import build_dp_plan
from plait.planners.intra_op.costs import local_bytes
from plait.planners.intra_op.dtensor_bridge import Transform, placements_of, planning_mesh
from plait.planners.intra_op.early_stop import last_saving_node, saves
from plait.planners.intra_op.propagate import Propagation, propagate_plan
from plait.planners.intra_op.work import (
    dispatched_ops,
    intra_op_work,
    layer_comms,
    runs_in_layer_forward,
    saved_storages,
    storage_root,
    temp_bytes,
)
from plait.planners.lowering import Builder, tp_collectives
from plait.sim.memory import resident_bytes

BATCH = 4
MLP_TINY = MLPConfig(in_dim=16, hidden=32, num_layers=3, out_dim=8)  # layers.0..2 (Linear + GELU), out


@cache
def mlp_tiny() -> tuple[ModelGraph, JointGraph]:
    """The captured layer view and joint graph (with boundary markers) of a tiny MLP at batch ``BATCH``."""
    with torch.device("meta"):
        model = MLP(MLP_TINY)
    batch = regression_batch(MLP_TINY, BATCH, device="meta")
    graph = capture(model, batch, loss_fn=mse_loss, with_ops=False)
    return graph, capture_joint(model, batch, loss_fn=mse_loss, markers=True)


def propagated(params: dict, pins: dict | None = None, tp: int = 2) -> Propagation:
    """DTensor's propagation of the tiny MLP under ``params`` (and pins by boundary key) on a ``tp`` axis."""
    _, joint = mlp_tiny()
    return propagate_plan(joint, planning_mesh((tp,), ("tp",)), params, pins or {}, joint.boundaries)


def work_of(params: dict, pins: dict | None = None, tp: int = 2) -> tuple:
    graph, joint = mlp_tiny()
    return intra_op_work(
        graph,
        joint,
        propagated(params, pins, tp),
        params,
        axes=("tp",),
        mesh_shape=(tp,),
        micro_batch=BATCH,
        joint_batch=BATCH,
        compute_dtype="fp32",
    )


MEGATRON = {  # layers.0 split by output features, layers.1 by input features (its output a pending sum)
    "layers.0.fc.weight": (shard(0),),
    "layers.0.fc.bias": (shard(0),),
    "layers.1.fc.weight": (shard(1),),
}


def test_replicated_plan_saves_what_the_layer_view_captured() -> None:
    graph, joint = mlp_tiny()
    prop = propagated({})
    plain = layer_work(graph, micro_batch=BATCH, compute_dtype="fp32")
    for mine, view in zip(work_of({}), plain, strict=True):  # never below the layer view; a scalar's bytes above it
        assert view.activation_bytes <= mine.activation_bytes <= view.activation_bytes + 8
    for layer, roots in saved_storages(joint, prop).items():  # each storage once, in the layer that keeps it
        assert sum(n.outputs[0].nbytes for n in roots.values()) == pytest.approx(
            graph.layers[layer].activation_bytes, abs=8
        )


def test_views_count_as_their_base_storage() -> None:
    _, joint = mlp_tiny()
    prop = propagated(MEGATRON)
    views = [
        n
        for n in joint.nodes
        if n.saved and n.target in (torch.ops.aten.t.default, torch.ops.aten.view.default)
    ]
    assert views
    for node in views:
        root = joint.nodes[storage_root(joint, prop, node.index)]
        assert root.kind != "call" or root.target not in (
            torch.ops.aten.t.default,
            torch.ops.aten.view.default,
        )


def test_sharded_layers_save_their_shards() -> None:
    # batch 4, fp32: layers.0 keeps the input (4 x 16, replicated) and its GELU's input (4 x 32, split in
    # two); layers.1 its Linear's input (the split GELU output) and its GELU's input (summed: 4 x 32, whole)
    work = work_of(MEGATRON)
    assert work[0].activation_bytes == pytest.approx(
        4 * 16 * 4 + 4 * 16 * 4, abs=8
    )  # (a scalar of a few bytes aside)
    assert work[1].activation_bytes == pytest.approx(4 * 16 * 4 + 4 * 32 * 4, abs=8)
    plain = layer_work(mlp_tiny()[0], micro_batch=BATCH, compute_dtype="fp32")
    assert work[2].activation_bytes == pytest.approx(plain[2].activation_bytes, abs=8)


def test_recomputation_repeats_only_the_collectives_inside_the_layer_forward() -> None:
    graph, joint = mlp_tiny()
    out_input = next(k for k, b in enumerate(joint.boundaries) if b.module == "out" and b.port == "input")
    params = {**MEGATRON, "layers.2.fc.weight": (shard(0),), "layers.2.fc.bias": (shard(0),)}
    prop = propagated(
        params, {out_input: (REPLICATE,)}
    )  # the split output of layers.2 is gathered at out's input pin
    comms = layer_comms(joint, prop, ("tp",), 1.0, (2,))
    inside = [e for e in prop.comms if e.phase == "fwd" and runs_in_layer_forward(joint, joint.nodes[e.node])]
    pin = [
        e
        for e in prop.comms
        if joint.nodes[e.node].target is BOUNDARY_OPS[0] and int(joint.nodes[e.node].args[1]) == out_input
    ]
    assert pin and not any(
        runs_in_layer_forward(joint, joint.nodes[e.node]) for e in pin
    )  # a hook around out's forward
    assert [
        e for e in inside if joint.nodes[e.node].module.startswith("layers.1")
    ]  # layers.1's sum, inside its forward
    assert sum(len(comms.get((layer.index, "recompute"), [])) for layer in graph.layers) == len(inside)


def test_dispatch_counts_every_op_and_redistribution() -> None:
    graph, joint = mlp_tiny()
    ops = dispatched_ops(joint)
    calls = [
        n
        for n in joint.nodes
        if n.kind == "call" and n.target is not operator.getitem and n.target not in BOUNDARY_OPS
    ]
    loss = [
        n
        for n in calls
        if n.target in (torch.ops.aten.mse_loss.default, torch.ops.aten.mse_loss_backward.default)
    ]
    assert (
        len(loss) == 2 and sum(ops.values()) < len(calls) - 1
    )  # the loss runs on the plain output, outside DTensor
    work = work_of(MEGATRON)
    for w in work:
        num_params = len(graph.params_of(w.index))
        assert w.dispatch_fwd == ceil(
            ops[(w.index, "fwd")] * DTENSOR_OP_KERNELS + len(w.tp_fwd) * DTENSOR_REDISTRIBUTE_KERNELS
        )
        assert w.dispatch_bwd == ceil(
            (ops[(w.index, "bwd")] + num_params) * DTENSOR_OP_KERNELS
            + len(w.tp_bwd) * DTENSOR_REDISTRIBUTE_KERNELS
        )


def test_collective_buffers() -> None:
    full = 1 << 20
    assert temp_bytes(Transform(collective="all_reduce", mesh_dim=0, nbytes=full), (4,)) == (full, 0)
    assert temp_bytes(Transform(collective="all_gather", mesh_dim=0, nbytes=full), (4,)) == (
        2 * full + full // 4,
        full + full // 4,
    )
    assert temp_bytes(Transform(collective="reduce_scatter", mesh_dim=0, nbytes=full), (4,)) == (full // 4, 0)


def test_lingering_buffers_are_freed_by_the_next_compute() -> None:
    plan = build_dp_plan(dense_graph(2, 64, 4), local_cluster(2), kind="replicate", global_batch=8)
    b = Builder()
    last = tp_collectives(
        b,
        plan,
        [Comm(collective="all_gather", nbytes=1000, axes=("dp",), temp_bytes=2500, linger_bytes=1500)],
        "fwd[0] x",
        b.add(Instr(op="compute", stream="compute", name="a")),
    )
    gather = b.instrs[last]
    assert (gather.alloc_bytes, gather.free_bytes) == (2500, 1000)
    b.add(Instr(op="free", stream="compute", name="not a compute"))
    nxt = b.instrs[b.add(Instr(op="compute", stream="compute", name="b", free_bytes=7))]
    assert nxt.free_bytes == 7 + 1500 and b.lingering == 0


def test_without_buckets_the_backward_makes_the_gradients_kept_to_the_step() -> None:
    graph = dense_graph(3, 64, 4)
    one = build_dp_plan(graph, gpu_cluster(devices=1), kind="replicate", global_batch=4, precision="fp32")
    two = build_dp_plan(graph, gpu_cluster(devices=2), kind="replicate", global_batch=8, precision="fp32")
    grads = sum(p.nbytes for p in graph.params)
    assert resident_bytes(two) - resident_bytes(one) == grads  # the bucket buffers
    step = next(i for i in one.programs[0].instrs if i.op == "optimizer")
    assert step.free_bytes - step.alloc_bytes == grads  # zero_grad(set_to_none=True) after the step

    def made(plan: Plan) -> int:
        return sum(i.alloc_bytes for i in plan.programs[0].instrs if i.phase == "bwd" and i.op == "compute")

    # each layer's backward makes all its gradients, not only the transient largest one added into a bucket
    largest = sum(max(p.nbytes for p in graph.params_of(layer.index)) for layer in graph.layers)
    assert made(one) - made(two) == grads - largest


def test_optimizer_dispatch_on_dtensor_parameters() -> None:
    graph = dense_graph(3, 64, 4)
    fsdp = build_dp_plan(graph, local_cluster(2), kind="fsdp", global_batch=8)
    replicate = build_dp_plan(graph, local_cluster(2), kind="replicate", global_batch=8)
    dispatch = [i for i in fsdp.programs[0].instrs if i.name == "dispatch optimizer step"]
    assert [i.num_kernels for i in dispatch] == [
        round(DTENSOR_ADAMW_KERNELS * len(graph.params))
    ]  # FSDP2's are DTensors
    assert not [i for i in replicate.programs[0].instrs if i.name.startswith("dispatch")]
    gpu = build_dp_plan(graph, gpu_cluster(devices=2), kind="fsdp", global_batch=8)
    assert not [
        i for i in gpu.programs[0].instrs if i.name.startswith("dispatch")
    ]  # foreach AdamW: not measured


def test_ops_that_save_tensors_for_backward_are_told_apart() -> None:
    _, joint = mlp_tiny()
    fwd = [n for n in joint.nodes if n.phase == "fwd" and n.kind == "call" and callable(n.target)]
    by_op = {str(n.target).split(".")[1]: saves(joint, n) for n in fwd if n.target not in BOUNDARY_OPS}
    assert by_op["addmm"] and by_op["gelu"], by_op  # save their inputs
    assert not by_op["t"], by_op  # a view saves nothing
    last = last_saving_node(joint, lambda n: True, 0)
    assert last >= 0 and str(joint.nodes[last].target).split(".")[1] in ("addmm", "gelu")


def test_a_pin_that_redistributes_saves_its_own_copy() -> None:
    """Heads split, the attention output pinned whole before the replicated projection: the pin's all-gathered
    copy is a storage of its own that the projection saves, next to the split attention output that attention's
    backward reads; the layer view of one device has only one of them, so its scaled bytes fall short."""
    from plait.models import GPT, GPTConfig, lm_batch, lm_loss

    cfg = GPTConfig(vocab_size=32, seq_len=8, num_layers=1, num_heads=2, hidden=16)
    with torch.device("meta"):
        model = GPT(cfg)
    batch = lm_batch(cfg, 2, device="meta")
    graph = capture(model, batch, loss_fn=lm_loss, with_ops=False)
    joint = capture_joint(model, batch, loss_fn=lm_loss, markers=True)
    key = next(k for k, b in enumerate(joint.boundaries) if (b.module, b.port) == ("blocks.0.attn.proj", "input"))
    params = {"blocks.0.attn.qkv.weight": (shard(0),), "blocks.0.attn.qkv.bias": (shard(0),)}
    prop = propagate_plan(joint, planning_mesh((2,), ("tp",)), params, {key: (REPLICATE,)}, joint.boundaries)
    work = intra_op_work(graph, joint, prop, params, axes=("tp",), mesh_shape=(2,), micro_batch=2, joint_batch=2,
                         compute_dtype="fp32")
    for layer, roots in saved_storages(joint, prop).items():
        per_rank = sum(
            n.outputs[0].nbytes if prop.specs[r][0] is None else local_bytes(n.outputs[0], placements_of(prop.specs[r][0]), (2,))
            for r, n in roots.items()
        )
        assert work[layer].activation_bytes >= per_rank, graph.layers[layer].name
    shared = next(n for n in joint.nodes if n.target is BOUNDARY_OPS[0] and int(n.args[1]) == key)
    assert storage_root(joint, prop, shared.index) == shared.index  # the pin's copy is a storage of its own
