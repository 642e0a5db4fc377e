"""What one rank does per layer and micro-batch under a plan: the input the lowering turns into instructions.

A ``LayerWork`` holds a layer's FLOPs, memory traffic, kernels and memory (saved activations, boundary
tensors, transient gradients, gathered parameters) as they are on one rank at the plan's micro-batch,
after the plan's sharding, plus the tensor-parallel collectives its forward and backward issue. The
data-parallel planner derives it from the captured layer view; the intra-op planner from the joint graph
under the chosen placements.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from plait.cost.comm import CollectiveOp
from plait.graph.model_graph import DTYPE_BYTES, ModelGraph
from plait.plan.ir import Plan


@dataclass(frozen=True, kw_only=True)
class Comm:
    """A collective that a layer's forward or backward waits for (tensor-parallel activations)."""

    collective: CollectiveOp
    nbytes: int  # the full tensor the collective works on, this rank's view of it
    axes: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class LayerWork:
    """One layer's work and memory on one rank for one micro-batch."""

    index: int
    name: str
    fwd_flops: float
    bwd_flops: float
    fwd_bytes_moved: float
    num_kernels: int
    activation_bytes: int  # saved for backward
    output_bytes: int  # the boundary tensor passed to the next layer
    input_bytes: int  # the layer's input (what a recomputed layer keeps)
    grad_bytes: int  # fresh parameter gradients alive while the layer's backward runs
    unit_bytes: int  # the layer's parameters as gathered for compute (sharded data parallelism)
    recompute: bool = False
    tp_fwd: tuple[Comm, ...] = ()
    tp_bwd: tuple[Comm, ...] = ()


def dtype_ratio(to: str, frm: str) -> float:
    """Bytes of dtype ``to`` per byte of dtype ``frm``."""
    return DTYPE_BYTES.get(to, 4) / DTYPE_BYTES.get(frm, 4)


def layer_work(
    graph: ModelGraph, *, micro_batch: int, compute_dtype: str, recompute: Collection[str] = (), shard_degree: int = 1
) -> tuple[LayerWork, ...]:
    """Per-layer work when nothing is sharded on model axes: the captured layer view scaled to
    ``micro_batch``, parameters gathered over ``shard_degree`` ranks in ``compute_dtype`` (1: replicated)."""
    scale = micro_batch / graph.batch_size
    out = []
    for layer in graph.layers:
        params = graph.params_of(layer.index)
        largest = max((p.nbytes for p in params), default=0)
        unit = int(sum(p.nbytes * dtype_ratio(compute_dtype, p.dtype) for p in params))
        previous = graph.layers[layer.index - 1].output_bytes if layer.index > 0 else 0
        out.append(
            LayerWork(
                index=layer.index, name=layer.name,
                fwd_flops=layer.fwd_flops * scale, bwd_flops=layer.bwd_flops * scale,
                fwd_bytes_moved=layer.fwd_bytes_moved * scale, num_kernels=layer.num_kernels,
                activation_bytes=int(layer.activation_bytes * scale), output_bytes=int(layer.output_bytes * scale),
                input_bytes=int(previous * scale),
                grad_bytes=unit if shard_degree > 1 else largest,
                unit_bytes=unit if shard_degree > 1 else 0,
                recompute=layer.name in recompute,
            )
        )
    return tuple(out)


def layer_work_of(graph: ModelGraph, plan: Plan, *, shard_degree: int = 1) -> tuple[LayerWork, ...]:
    """``layer_work`` at the plan's micro-batch, compute dtype and recomputed layers."""
    return layer_work(
        graph, micro_batch=plan.batch.micro_size, compute_dtype=plan.precision.compute_dtype,
        recompute={layer.name for layer in plan.layers if layer.recompute}, shard_degree=shard_degree,
    )


def total_flops(work: Sequence[LayerWork]) -> float:
    """Forward plus backward FLOPs of one micro-batch on one rank."""
    return sum(w.fwd_flops + w.bwd_flops for w in work)
