"""Per-layer work of an intra-op plan: the captured layer view, scaled by what the propagation found each rank does.

A layer's FLOPs are its joint-graph nodes' FLOPs over the ranks that share each node's work; its memory
traffic scales by the same share. Its saved activations scale by the share of the storages its backward
reads that one rank holds: views (``t``, ``transpose``, ``detach``, a pin that moves nothing) share their
base's storage, so each storage counts once, in the first layer whose backward reads it, as autograd keeps
it; and they are never below those storages' bytes on one rank (a pin that redistributes makes a storage the
single-device layer view does not have). Its boundary output scales by the placements of the value that leaves it; its parameters by their
placements. Its tensor-parallel collectives are the propagation's, at the plan's micro-batch (an
activation's collective grows with the batch, a gradient's does not), each with the out-of-place buffers
DTensor holds while it runs (and those its communication thread may hold a little longer). A recomputed
layer issues again the forward collectives that run inside its module's ``forward`` (not those of the pin
hooks on the layer module itself, nor of glue outside every layer), up to its last op that saves a tensor
for backward, where torch's checkpointing stops recomputing (``early_stop``). Every op runs DTensor's dispatch on
the host (``plait.cost.work``'s constants): the forward and backward ops, the detach of each fresh
parameter gradient and each redistribution.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from math import ceil

import torch
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from plait.cost.work import (
    DTENSOR_OP_KERNELS,
    DTENSOR_REDISTRIBUTE_KERNELS,
    Comm,
    LayerWork,
    dtype_ratio,
)
from plait.graph.boundary import BOUNDARY_OPS
from plait.graph.joint import JointGraph, JointNode
from plait.graph.model_graph import ModelGraph, TensorMeta
from plait.planners.intra_op.costs import local_bytes
from plait.planners.intra_op.dtensor_bridge import Placements, Transform, placements_of
from plait.planners.intra_op.early_stop import last_saving_node
from plait.planners.intra_op.propagate import Propagation

BOUNDARY, BOUNDARY_GRAD = BOUNDARY_OPS
# Ops that return a tensor sharing its input's storage although their schema does not say so.
_STORAGE_VIEWS = frozenset({torch.ops.aten._unsafe_view.default})


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 1.0


def temp_bytes(t: Transform, mesh_shape: Sequence[int]) -> tuple[int, int]:
    """Buffers one redistribution step holds while it runs, beyond its input, and how many may outlive it.

    DTensor's functional collectives write a new tensor: all_reduce a full copy; reduce_scatter and
    all_to_all this rank's part; an all_gather the gathered buffer and, when the split dim is not the first,
    the contiguous copy it is rearranged into (counted always: the step does not say which dim it gathers).
    The communication thread drops its reference to a finished collective's buffers only when it runs
    again: on busy cores after the rank has gone on computing. An all_gather's gathered buffer and input
    shard can so outlive it; the buffers of the others are their results (or their input's owner frees it).
    """
    n = mesh_shape[t.mesh_dim]
    part = -(-t.nbytes // n)
    if t.collective == "all_reduce":
        return t.nbytes, 0
    if t.collective == "all_gather":
        return 2 * t.nbytes + part, t.nbytes + part
    return part, 0


def layer_comms(joint: JointGraph, prop: Propagation, axes: Sequence[str], scale: float,
                mesh_shape: Sequence[int]) -> dict[tuple[int, str], list[Comm]]:
    """The collectives of each (layer, phase), in issue order, at ``scale`` x the captured batch; phase
    ``recompute`` holds the forward collectives a recomputation of the layer issues again."""
    out: dict[tuple[int, str], list[Comm]] = defaultdict(list)
    stops: dict[int, int] = {}
    for event in prop.comms:
        t = event.transform
        factor = scale if event.per_sample else 1.0
        scaled = Transform(collective=t.collective, mesh_dim=t.mesh_dim, nbytes=int(t.nbytes * factor))
        temp, linger = temp_bytes(scaled, mesh_shape)
        comm = Comm(collective=t.collective, nbytes=scaled.nbytes, axes=(axes[t.mesh_dim],), temp_bytes=temp,
                    linger_bytes=linger)
        out[(event.layer, event.phase)].append(comm)
        if event.phase == "fwd" and runs_in_layer_forward(joint, joint.nodes[event.node]):
            if event.layer not in stops:
                stops[event.layer] = last_saving_node(joint, lambda n: runs_in_layer_forward(joint, n), event.layer)
            if event.node <= stops[event.layer]:  # recomputation stops after the layer's last saving op
                out[(event.layer, "recompute")].append(comm)
    return out


def runs_in_layer_forward(joint: JointGraph, node: JointNode) -> bool:
    """Whether a forward node runs inside its layer module's ``forward`` (what recomputation runs again): an
    op of the layer or of a module inside it, or a pin of a module strictly inside it. The pins of the layer
    module itself are hooks around its ``forward``; glue outside every layer (a parent's op, the loss, the
    model's own input and output) runs outside."""
    layer = joint.layer_names[node.layer]
    if node.target is BOUNDARY:
        return joint.boundaries[int(node.args[1])].module.startswith(layer + ".")
    return node.module == layer or node.module.startswith(layer + ".")


def _leaving(joint: JointGraph, layer: int) -> int | None:
    """The last forward value of ``layer`` that a later layer's forward reads (its boundary output)."""
    found = None
    for node in joint.nodes:
        mine = node.layer == layer and node.phase == "fwd" and node.kind == "call" and bool(node.outputs)
        if mine and any(joint.nodes[u].layer > layer and joint.nodes[u].phase == "fwd" for u in joint.users[node.index]):
            found = node.index
    return found


def intra_op_work(
    graph: ModelGraph,
    joint: JointGraph,
    prop: Propagation,
    params: Mapping[str, Placements],
    *,
    axes: Sequence[str],
    mesh_shape: Sequence[int],
    micro_batch: int,
    joint_batch: int,
    compute_dtype: str,
    recompute: frozenset[str] = frozenset(),
    fsdp_degree: int = 1,
) -> tuple[LayerWork, ...]:
    """``LayerWork`` per layer of ``graph`` under the propagated plan, at ``micro_batch`` (see the module docstring)."""
    scale = micro_batch / joint_batch
    layer_scale = micro_batch / graph.batch_size
    comms = layer_comms(joint, prop, axes, scale, mesh_shape)
    shares = _shares(joint, prop, mesh_shape)
    ops = dispatched_ops(joint)
    out: list[LayerWork] = []
    for layer in graph.layers:
        fwd_share, bwd_share, saved_share, traffic_share, local_saved = shares.get(layer.index, (1.0, 1.0, 1.0, 1.0, 0.0))
        shard = {p.name: local_bytes_of(p.shape, p.dtype, params.get(p.name), mesh_shape) for p in graph.params_of(layer.index)}
        unit = int(sum(b * dtype_ratio(compute_dtype, p.dtype) for p, b in zip(graph.params_of(layer.index), shard.values(), strict=True)))
        output_share = _output_share(joint, prop, layer.index, mesh_shape)
        previous = out[-1].output_bytes if out else 0
        tp_fwd = tuple(comms.get((layer.index, "fwd"), ()))
        tp_bwd = tuple(comms.get((layer.index, "bwd"), ()))
        fwd_ops, bwd_ops = ops.get((layer.index, "fwd"), 0), ops.get((layer.index, "bwd"), 0)
        out.append(LayerWork(
            index=layer.index, name=layer.name,
            fwd_flops=layer.fwd_flops * layer_scale * fwd_share, bwd_flops=layer.bwd_flops * layer_scale * bwd_share,
            fwd_bytes_moved=layer.fwd_bytes_moved * layer_scale * traffic_share, num_kernels=layer.num_kernels,
            activation_bytes=int(max(layer.activation_bytes * layer_scale * saved_share, local_saved * scale)),
            output_bytes=int(layer.output_bytes * layer_scale * output_share), input_bytes=previous,
            grad_bytes=unit if fsdp_degree > 1 else max(shard.values(), default=0),
            unit_bytes=unit if fsdp_degree > 1 else 0,
            layer_grad_bytes=-(-sum(shard.values()) // fsdp_degree),
            recompute=layer.name in recompute,
            tp_fwd=tp_fwd, tp_bwd=tp_bwd, tp_recompute=tuple(comms.get((layer.index, "recompute"), ())),
            dispatch_fwd=dispatch_kernels(fwd_ops, len(tp_fwd)),
            dispatch_bwd=dispatch_kernels(bwd_ops + len(shard), len(tp_bwd)),
        ))
    return tuple(out)


def dispatch_kernels(num_ops: int, num_redistributions: int) -> int:
    """DTensor's host work for ``num_ops`` ops and ``num_redistributions`` collectives, in kernel launches."""
    return ceil(num_ops * DTENSOR_OP_KERNELS + num_redistributions * DTENSOR_REDISTRIBUTE_KERNELS)


def dispatched_ops(joint: JointGraph) -> dict[tuple[int, str], int]:
    """Per (layer, phase): the ops DTensor dispatches: every call but tuple reads and boundary markers, and
    but the loss and its gradient (after the model's output leaves as a plain tensor, before its gradient
    comes back)."""
    leaves, enters = _model_output_markers(joint)
    out: dict[tuple[int, str], int] = defaultdict(int)
    for node in joint.nodes:
        if node.kind != "call" or node.target is operator.getitem or node.target in BOUNDARY_OPS:
            continue
        if (node.phase == "fwd" and node.index > leaves) or (node.phase == "bwd" and node.index < enters):
            continue
        out[(node.layer, node.phase)] += 1
    return out


def _model_output_markers(joint: JointGraph) -> tuple[int, int]:
    """The nodes where the model's output leaves (forward) and its gradient comes back (backward); past the
    ends of the graph when it has no markers."""
    keys = {k for k, b in enumerate(joint.boundaries) if b.module == "" and b.port == "output"}
    leaves, enters = len(joint.nodes), -1
    for node in joint.nodes:
        if node.target in BOUNDARY_OPS and int(node.args[1]) in keys:
            if node.target is BOUNDARY:
                leaves = min(leaves, node.index)
            else:
                enters = max(enters, node.index)
    return leaves, enters


def local_bytes_of(shape: Sequence[int], dtype: str, placements: Placements | None, mesh_shape: Sequence[int]) -> int:
    """Bytes of a parameter's shard on one rank (its full size when it has no model-axis placements)."""
    meta = TensorMeta(shape=tuple(shape), dtype=dtype)
    return meta.nbytes if placements is None else local_bytes(meta, placements, mesh_shape)


def storage_root(joint: JointGraph, prop: Propagation, index: int) -> int:
    """The node whose output owns the storage of node ``index``'s output (itself unless it is a view)."""
    while True:
        node = joint.nodes[index]
        if node.kind != "call" or not node.refs:
            return index
        source = node.refs[0]
        if node.target is operator.getitem:
            target = joint.nodes[source].target
            if not _is_view(target):
                return index  # one output of a multi-output op: a storage of its own
            source = joint.nodes[source].refs[0]
        elif node.target is BOUNDARY:
            if _placements(prop, index) != _placements(prop, source):
                return index  # the pin redistributed: a new tensor
        elif not _is_view(node.target):
            return index
        index = source


def _placements(prop: Propagation, index: int) -> Placements | None:
    spec = prop.specs[index][0] if prop.specs[index] else None
    return None if spec is None else placements_of(spec)


def _is_view(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload) and (target.is_view or target in _STORAGE_VIEWS)


def saved_storages(joint: JointGraph, prop: Propagation) -> dict[int, dict[int, JointNode]]:
    """Per layer: the storages its backward reads (by root node), each once, in the first layer (in forward
    order) whose backward reads it; parameters and buffers are state, not activations."""
    first: dict[int, int] = {}
    for node in joint.nodes:
        if not (node.saved and node.phase == "fwd" and node.outputs):
            continue
        root = storage_root(joint, prop, node.index)
        if joint.nodes[root].kind in ("param", "buffer") or not joint.nodes[root].outputs:
            continue
        readers = [joint.nodes[u].layer for u in joint.users[node.index] if joint.nodes[u].phase == "bwd"]
        layer = min(readers, default=node.layer)
        first[root] = min(first.get(root, layer), layer)
    out: dict[int, dict[int, JointNode]] = defaultdict(dict)
    for root, layer in first.items():
        out[layer][root] = joint.nodes[root]
    return out


def _shares(joint: JointGraph, prop: Propagation, mesh_shape: Sequence[int]) -> dict[int, tuple[float, float, float, float, float]]:
    """Per layer: the fraction of its forward FLOPs, backward FLOPs, saved bytes and forward memory traffic
    (the bytes its forward ops write) one rank has, and the bytes of the storages it saves on one rank."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0] * 8)
    for node in joint.nodes:
        if node.kind != "call" or not node.outputs:
            continue
        acc = sums[node.layer]
        k = 0 if node.phase == "fwd" else 2
        acc[k] += node.flops / prop.divisor[node.index]
        acc[k + 1] += node.flops
        if node.phase == "fwd" and node.target not in BOUNDARY_OPS:
            acc[6] += _local_output_bytes(node, prop, mesh_shape)
            acc[7] += sum(m.nbytes for m in node.outputs)
    for layer, roots in saved_storages(joint, prop).items():
        acc = sums[layer]
        for root, node in roots.items():
            spec = prop.specs[root][0] if prop.specs[root] else None
            acc[5] += node.outputs[0].nbytes
            acc[4] += _on_rank(node.outputs[0], spec, mesh_shape)
    return {layer: (_ratio(a[0], a[1]), _ratio(a[2], a[3]), _ratio(a[4], a[5]), _ratio(a[6], a[7]), a[4])
            for layer, a in sums.items()}


def _on_rank(meta: TensorMeta, spec: DTensorSpec | None, mesh_shape: Sequence[int]) -> int:
    """Bytes of one rank's part of a tensor with ``spec`` (all of it when it has none)."""
    return meta.nbytes if spec is None else local_bytes(meta, placements_of(spec), mesh_shape)


def _local_output_bytes(node: JointNode, prop: Propagation, mesh_shape: Sequence[int]) -> int:
    specs = prop.specs[node.index]
    return sum(_on_rank(meta, specs[k] if k < len(specs) else None, mesh_shape) for k, meta in enumerate(node.outputs))


def _output_share(joint: JointGraph, prop: Propagation, layer: int, mesh_shape: Sequence[int]) -> float:
    node = _leaving(joint, layer)
    if node is None or not prop.specs[node] or prop.specs[node][0] is None:
        return 1.0
    meta = joint.nodes[node].outputs[0]
    return _ratio(_on_rank(meta, prop.specs[node][0], mesh_shape), meta.nbytes)
