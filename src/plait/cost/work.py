"""What one rank does per layer and micro-batch under a plan: the input the lowering turns into instructions.

A ``LayerWork`` holds a layer's FLOPs, memory traffic, kernels and memory (saved activations, boundary
tensors, transient gradients, gathered parameters) as they are on one rank at the plan's micro-batch,
after the plan's sharding, plus the tensor-parallel collectives its forward and backward issue. The
data-parallel planner derives it from the captured layer view; the intra-op planner from the joint graph
under the chosen placements.

**DTensor's and FSDP2's host cost.** An op on DTensors runs DTensor's dispatch (sharding propagation,
wrapping the local result, plait's root hooks) on the host before the local kernel, and FSDP2 runs hooks
around each unit. The CostModel times host work in kernel launches of ``kernel_s``, so the work carries
this host work in that unit. The constants below were measured on this project's CPU machine (``python
bench/cost_fidelity.py --dtensor-host``: one process, a one-rank mesh, two GPT blocks of hidden 64 and
their AdamW step, six FSDP2 units; the op cost on a two-rank mesh with sharded parameters) as the extra
time over the same code on plain tensors, divided by the
profile's ``kernel_s`` measured in the same process. They are measured ratios, not fitted to the fidelity
benchmark's step times; a profile that measured them on the machine at hand would replace them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from plait.cost.comm import CollectiveOp
from plait.graph.model_graph import DTYPE_BYTES, ModelGraph
from plait.plan.ir import Plan

# Host cost of one DTensor op in forward or backward (every joint-graph op, and the detach of each fresh
# parameter gradient), in kernel launches, with the parameters really sharded: measured 3.79 and 3.82 on a
# quiet machine (two-rank mesh, Megatron placements, the step's redistributions subtracted at their measured
# time; ``--dtensor-host``'s ``op_sharded``). On a one-rank mesh, where every placement is Replicate, the same
# ops cost 1.41-1.67; the value used before, it left tensor-parallel steps 17-45 % under-predicted.
DTENSOR_OP_KERNELS = 3.8
# One redistribution of an activation or gradient (DTensor's Redistribute, the functional collective and
# its wait, plait's pin hooks) beyond the collective's own time: measured 2.84-3.00.
DTENSOR_REDISTRIBUTE_KERNELS = 3.0
# The single-tensor AdamW step of one DTensor parameter (about ten DTensor ops): measured 10.3-11.7.
DTENSOR_ADAMW_KERNELS = 10.5
# FSDP2's hooks of one unit (unshard and wait, copy-out, reshard; in backward also the gradients' copy-in,
# reduce-scatter and its wait), beyond their copies and collectives: measured 9.9-10.8 in forward and
# 25.6-31.4 in forward and backward on this machine (one-rank mesh, Linear + GELU units).
# One pass (F, B, I or W) of a pipeline stage run by ``torch.distributed.pipelining``: the schedule's action,
# the stage's chunk bookkeeping, posting its receives and sends and waiting on them, beyond the compute and
# the transfers' own time (``python bench/pipeline_host.py``: two stages of tiny layers, 4 and 16 micro-batches,
# GPipe and 1F1B; the measured steps' difference less the simulated one without this term, per pass on the
# critical path, over the profile's ``kernel_s``). 0.6-0.75 ms a pass on two ranks of this machine; in launches,
# medians 67, 61 and 72-84 against three profiles (kernel_s 9.9, 12.3 and 10.1 us at two ranks busy). With
# tensor-parallel stages (two stages x tp 2 on four ranks, sliced boundaries: the stages' DTensor wrapping and
# the boundary's all-gather) medians 79, 88 and 135-139 (44-219 per run) at four ranks' kernel_s.
PIPELINE_PASS_KERNELS = 65
PIPELINE_TP_PASS_KERNELS = 100
FSDP2_UNIT_FWD_KERNELS = 10
FSDP2_UNIT_BWD_KERNELS = 17


@dataclass(frozen=True, kw_only=True)
class Comm:
    """A collective that a layer's forward or backward waits for (tensor-parallel activations)."""

    collective: CollectiveOp
    nbytes: int  # the full tensor the collective works on, this rank's view of it
    axes: tuple[str, ...]
    temp_bytes: int = 0  # buffers held while it runs (DTensor's functional collectives are out of place)
    linger_bytes: int = 0  # of those, what its communication thread may hold until after the next compute


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
    layer_grad_bytes: int = 0  # all its parameters' gradients on this rank (kept to the step without buckets)
    recompute: bool = False
    tp_fwd: tuple[Comm, ...] = ()
    tp_bwd: tuple[Comm, ...] = ()
    tp_recompute: tuple[Comm, ...] = ()  # forward collectives a recomputation issues again (inside the layer)
    dispatch_fwd: int = 0  # host-only work of the forward, in kernel launches (DTensor's dispatch)
    dispatch_bwd: int = 0  # the same for the backward


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
        total = sum(p.nbytes for p in params)
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
                layer_grad_bytes=-(-total // shard_degree),
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
