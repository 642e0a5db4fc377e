"""Lower a plan's step to the instruction list that the simulator scores and the runtime mirrors.

Streams run in program order; ``deps`` add the cross-stream edges. Memory: ``alloc_bytes`` is taken
when an instruction starts, ``free_bytes`` given back when it ends (static state is not in the trace).
The lowering reads the plan's fields only: data-parallel axes from the batch placements, sharded data
parallelism from a ``Shard(0)`` parameter placement on a data-parallel axis, buckets, recomputation,
and the per-layer work (``LayerWork``) with its tensor-parallel collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from plait.cost.memory import step_temporaries
from plait.cost.work import Comm, LayerWork, dtype_ratio
from plait.plan.ir import Instr, Plan, RankProgram


@dataclass(kw_only=True)
class Builder:
    """An instruction list under construction; ``add`` returns the new instruction's index."""

    mesh_groups: dict[tuple[str, ...], tuple[int, ...]] = field(default_factory=dict)
    instrs: list[Instr] = field(default_factory=list)

    def add(self, instr: Instr) -> int:
        self.instrs.append(instr)
        return len(self.instrs) - 1


def rank0_group(plan: Plan, axes: Sequence[str]) -> tuple[int, ...]:
    """Rank 0's group over ``axes`` (every rank finds its own from the instruction's ``axes``)."""
    return plan.mesh.group(0, tuple(axes))


def _compute(work: LayerWork, phase: str, micro: int, *, label: str | None = None) -> Instr:
    """A layer's forward or backward work; backward does ``bwd_flops``, twice the forward's traffic and kernels."""
    fwd = phase == "fwd"
    return Instr(
        op="compute", stream="compute", name=f"{label or phase}[{micro}] {work.name}", phase="fwd" if fwd else "bwd",
        layer=work.index, flops=work.fwd_flops if fwd else work.bwd_flops,
        bytes_moved=work.fwd_bytes_moved * (1 if fwd else 2), num_kernels=work.num_kernels * (1 if fwd else 2),
    )


def forward(work: LayerWork, micro: int, deps: tuple[int, ...] = ()) -> Instr:
    """Forward of one layer: it allocates what it saves for backward (its input only, when recomputed)."""
    kept = work.input_bytes if work.recompute else work.activation_bytes
    return replace(_compute(work, "fwd", micro), alloc_bytes=kept, deps=deps)


def recompute(work: LayerWork, micro: int, deps: tuple[int, ...] = ()) -> Instr:
    """The forward of a recomputed layer, run again just before its backward: it re-creates the activations."""
    return replace(_compute(work, "fwd", micro, label="recompute"), phase="bwd", alloc_bytes=work.activation_bytes, deps=deps)


def backward(work: LayerWork, micro: int, *, last_layer: bool, keep_grads: bool = False, deps: tuple[int, ...] = ()) -> Instr:
    """Backward of one layer. It allocates the gradient of its input and its parameters' fresh gradients
    (the last layer also two gradients of its output: the loss's backward holds the gradient of its input
    and of the intermediate it computes it from); it frees its saved activations, the gradient of its
    output and (unless ``keep_grads``: sharded gradients wait for their reduce-scatter) the fresh
    gradients, which have been added into their buckets."""
    in_grad = work.input_bytes
    from_loss = 2 * work.output_bytes if last_layer else 0
    saved = work.activation_bytes + (work.input_bytes if work.recompute else 0)
    return replace(
        _compute(work, "bwd", micro),
        alloc_bytes=work.grad_bytes + in_grad + from_loss,
        free_bytes=saved + (from_loss or work.output_bytes) + (0 if keep_grads else work.grad_bytes),
        deps=deps,
    )


def copy_instr(name: str, nbytes: int, deps: tuple[int, ...] = (), *, alloc: int = 0, free: int = 0) -> Instr:
    """A memory-bound pass over ``nbytes`` (read and write) on the compute stream: scaling a bucket,
    packing gradients into a flat buffer, or splitting a gathered buffer into parameters."""
    return Instr(
        op="compute", stream="compute", name=name, bytes_moved=2.0 * nbytes, num_kernels=1, deps=deps,
        alloc_bytes=alloc, free_bytes=free,
    )


def tp_collectives(b: Builder, plan: Plan, comms: Sequence[Comm], label: str, after: int) -> int:
    """The tensor-parallel collectives of a layer's forward or backward, in order after ``after``;
    returns the instruction the next compute must wait for."""
    last = after
    for k, c in enumerate(comms):
        last = b.add(Instr(
            op="collective", stream="comm", name=f"{c.collective} {label} #{k}", phase="bwd" if label.startswith("bwd") else "fwd",
            collective=c.collective, nbytes=c.nbytes, group=rank0_group(plan, c.axes), axes=c.axes, deps=(last,),
        ))
    return last


def optimizer(plan: Plan, numel: int, num_tensors: int, largest_bytes: int, total_bytes: int, deps: tuple[int, ...]) -> Instr:
    """The optimizer step over this rank's ``numel`` elements in ``num_tensors`` tensors; it holds its
    temporaries while it runs (foreach AdamW on GPUs: a copy of all parameters; on CPUs: two of the largest)."""
    temp = step_temporaries(plan.optimizer, largest_bytes, total_bytes, foreach=plan.cluster.device.kind == "cuda")
    return Instr(op="optimizer", stream="compute", name="optimizer step", phase="step", numel=numel,
                 num_kernels=num_tensors, deps=deps, alloc_bytes=temp, free_bytes=temp)


def lower_replicate(plan: Plan, work: Sequence[LayerWork], state: OptimizerShape) -> RankProgram:
    """Parameters replicated on every data-parallel axis, with wait-free backprop: forward and backward
    per micro-batch (gradients accumulate in place in the bucket buffers); on the last micro-batch each
    bucket is scaled by 1/dp and all-reduced as soon as backward has filled it; the optimizer step waits
    for every bucket. Tensor-parallel collectives block the layer that issues them."""
    dp_axes = plan.data_parallel_axes
    reduce_ratio = dtype_ratio(plan.precision.reduce_dtype, plan.precision.param_dtype)
    sync = plan.dp_degree > 1
    b = Builder()
    reduces: list[int] = []
    for m in range(plan.batch.num_micro):
        last_micro = m == plan.batch.num_micro - 1
        prev = -1
        for w in work:
            done = b.add(forward(w, m, deps=(prev,) if prev >= 0 else ()))
            prev = tp_collectives(b, plan, w.tp_fwd, f"fwd[{m}] {w.name}", done)
        for w in reversed(work):
            deps = (prev,) if prev >= 0 else ()
            if w.recompute:
                deps = (b.add(recompute(w, m, deps)),)
            done = b.add(backward(w, m, last_layer=w.index == len(work) - 1, deps=deps))
            prev = tp_collectives(b, plan, w.tp_bwd, f"bwd[{m}] {w.name}", done)
            ready = [bk for bk in plan.buckets if bk.ready_after_layer == w.index] if last_micro and sync else []
            for bk in ready:
                scaled = b.add(copy_instr(f"scale bucket {bk.index}", bk.nbytes, (prev,)))
                reduces.append(b.add(Instr(
                    op="collective", stream="comm", name=f"all_reduce bucket {bk.index}", phase="bwd",
                    collective="all_reduce", nbytes=int(bk.nbytes * reduce_ratio), group=rank0_group(plan, dp_axes),
                    axes=dp_axes, deps=(scaled,),
                )))
    b.add(optimizer(plan, state.numel, state.num_tensors, state.largest_bytes, state.total_bytes, tuple(reduces)))
    return RankProgram(ranks=tuple(range(plan.mesh.size)), instrs=tuple(b.instrs))


@dataclass(frozen=True, kw_only=True)
class OptimizerShape:
    """What one rank's optimizer step updates: elements, tensors, and the bytes of its largest and all tensors."""

    numel: int
    num_tensors: int
    largest_bytes: int
    total_bytes: int
