"""Per-layer work of an intra-op plan: the captured layer view, scaled by what the propagation found each rank does.

A layer's FLOPs are its joint-graph nodes' FLOPs over the ranks that share each node's work; its memory
traffic and saved activations scale by the same shares; its boundary output by the placements of the value
that leaves it; its parameters by their placements. Its tensor-parallel collectives are the propagation's,
at the plan's micro-batch (an activation's collective grows with the batch, a gradient's does not).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from plait.cost.work import Comm, LayerWork, dtype_ratio
from plait.graph.joint import JointGraph
from plait.graph.model_graph import ModelGraph, TensorMeta
from plait.planners.intra_op.costs import local_bytes
from plait.planners.intra_op.dtensor_bridge import Placements, placements_of
from plait.planners.intra_op.propagate import Propagation


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 1.0


def layer_comms(joint: JointGraph, prop: Propagation, axes: Sequence[str], scale: float) -> dict[tuple[int, str], list[Comm]]:
    """The collectives of each (layer, phase), in issue order, at ``scale`` x the captured batch."""
    out: dict[tuple[int, str], list[Comm]] = defaultdict(list)
    for event in prop.comms:
        t = event.transform
        nbytes = int(t.nbytes * scale) if event.per_sample else t.nbytes
        out[(event.layer, event.phase)].append(Comm(collective=t.collective, nbytes=nbytes, axes=(axes[t.mesh_dim],)))
    return out


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
    comms = layer_comms(joint, prop, axes, scale)
    shares = _shares(joint, prop, mesh_shape)
    out: list[LayerWork] = []
    for layer in graph.layers:
        fwd_share, bwd_share, saved_share = shares.get(layer.index, (1.0, 1.0, 1.0))
        shard = {p.name: local_bytes_of(p.shape, p.dtype, params.get(p.name), mesh_shape) for p in graph.params_of(layer.index)}
        unit = int(sum(b * dtype_ratio(compute_dtype, p.dtype) for p, b in zip(graph.params_of(layer.index), shard.values(), strict=True)))
        output_share = _output_share(joint, prop, layer.index, mesh_shape)
        previous = out[-1].output_bytes if out else 0
        out.append(LayerWork(
            index=layer.index, name=layer.name,
            fwd_flops=layer.fwd_flops * layer_scale * fwd_share, bwd_flops=layer.bwd_flops * layer_scale * bwd_share,
            fwd_bytes_moved=layer.fwd_bytes_moved * layer_scale * fwd_share, num_kernels=layer.num_kernels,
            activation_bytes=int(layer.activation_bytes * layer_scale * saved_share),
            output_bytes=int(layer.output_bytes * layer_scale * output_share), input_bytes=previous,
            grad_bytes=unit if fsdp_degree > 1 else max(shard.values(), default=0),
            unit_bytes=unit if fsdp_degree > 1 else 0,
            recompute=layer.name in recompute,
            tp_fwd=tuple(comms.get((layer.index, "fwd"), ())), tp_bwd=tuple(comms.get((layer.index, "bwd"), ())),
        ))
    return tuple(out)


def local_bytes_of(shape: Sequence[int], dtype: str, placements: Placements | None, mesh_shape: Sequence[int]) -> int:
    """Bytes of a parameter's shard on one rank (its full size when it has no model-axis placements)."""
    meta = TensorMeta(shape=tuple(shape), dtype=dtype)
    return meta.nbytes if placements is None else local_bytes(meta, placements, mesh_shape)


def _shares(joint: JointGraph, prop: Propagation, mesh_shape: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """Per layer: the fraction of its forward FLOPs, backward FLOPs and saved bytes one rank holds."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0] * 6)
    for node in joint.nodes:
        if node.kind != "call" or not node.outputs:
            continue
        acc = sums[node.layer]
        k = 0 if node.phase == "fwd" else 2
        acc[k] += node.flops / prop.divisor[node.index]
        acc[k + 1] += node.flops
        if node.saved and prop.specs[node.index]:
            spec = prop.specs[node.index][0]
            if spec is not None:
                acc[4] += local_bytes(node.outputs[0], placements_of(spec), mesh_shape)
                acc[5] += node.outputs[0].nbytes
    return {layer: (_ratio(a[0], a[1]), _ratio(a[2], a[3]), _ratio(a[4], a[5])) for layer, a in sums.items()}


def _output_share(joint: JointGraph, prop: Propagation, layer: int, mesh_shape: Sequence[int]) -> float:
    node = _leaving(joint, layer)
    if node is None or not prop.specs[node] or prop.specs[node][0] is None:
        return 1.0
    meta = joint.nodes[node].outputs[0]
    spec = prop.specs[node][0]
    assert spec is not None
    return _ratio(local_bytes(meta, placements_of(spec), mesh_shape), meta.nbytes)
