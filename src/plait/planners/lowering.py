"""Lower a plan's step to the instruction list that the simulator scores and the runtime mirrors.

Streams run in program order; ``deps`` add the cross-stream edges. Memory: ``alloc_bytes`` is taken
when an instruction starts, ``free_bytes`` given back when it ends (static state is not in the trace).
The lowering reads the plan's fields only: data-parallel axes from the batch placements, sharded data
parallelism from a ``Shard(0)`` parameter placement on a data-parallel axis, buckets, recomputation,
and the per-layer work (``LayerWork``) with its tensor-parallel collectives.

DTensor's own work on a CPU rank is an instruction after the compute it belongs to (``dispatch``): the host
work of a layer's dispatched ops and redistributions, with the copies its out-of-place collectives make, and
of the optimizer step's ops on DTensor parameters (the parameters are DTensors under model-axis placements,
and under FSDP2). On a GPU the host runs ahead of the device and this work is taken as hidden. A recomputed
layer runs its forward's ops and tensor-parallel collectives again before its backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from plait.cost.memory import step_temporaries
from plait.cost.work import DTENSOR_ADAMW_KERNELS, Comm, LayerWork, dtype_ratio
from plait.plan.ir import Bucket, Instr, Phase, Plan, RankProgram
from plait.plan.layout import shard_axis_of


@dataclass(kw_only=True)
class Builder:
    """An instruction list under construction; ``add`` returns the new instruction's index.

    ``lingering`` bytes (buffers a finished collective's communication thread still holds) are given back at
    the end of the next compute instruction added.
    """

    mesh_groups: dict[tuple[str, ...], tuple[int, ...]] = field(default_factory=dict)
    instrs: list[Instr] = field(default_factory=list)
    lingering: int = 0

    def add(self, instr: Instr) -> int:
        if self.lingering and instr.op == "compute":
            instr = replace(instr, free_bytes=instr.free_bytes + self.lingering)
            self.lingering = 0
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


def dispatch(b: Builder, plan: Plan, kernels: int, name: str, after: int, phase: Phase = "none", *,
             comms: Sequence[Comm] = ()) -> int:
    """DTensor's work after instruction ``after`` on a CPU rank: host work of ``kernels`` launches (the
    dispatch of the ops that instruction stands for) and a copy of the tensor of each of ``comms`` (a
    functional all_reduce works on a copy of its input; a gather or scatter over a dim other than the first
    rearranges the tensor). Returns the instruction the next one waits for (``after`` when there is none)."""
    copied = sum(c.nbytes for c in comms)
    if plan.cluster.device.kind == "cuda" or (kernels <= 0 and not copied):
        return after
    return b.add(Instr(op="compute", stream="compute", name=name, phase=phase, num_kernels=kernels,
                       bytes_moved=2.0 * copied, deps=(after,)))


def layer_forward(b: Builder, plan: Plan, w: LayerWork, micro: int, deps: tuple[int, ...]) -> int:
    """A layer's forward, DTensor's work for it and its tensor-parallel collectives; returns the last."""
    done = b.add(forward(w, micro, deps=deps))
    done = dispatch(b, plan, w.dispatch_fwd, f"dispatch fwd[{micro}] {w.name}", done, "fwd", comms=w.tp_fwd)
    return tp_collectives(b, plan, w.tp_fwd, f"fwd[{micro}] {w.name}", done)


def layer_recompute(b: Builder, plan: Plan, w: LayerWork, micro: int,
                    deps: tuple[int, ...]) -> tuple[int, ...]:
    """A recomputed layer's forward again (DTensor's work and the collectives inside it too); the deps of its
    backward."""
    done = b.add(recompute(w, micro, deps))
    label = f"recompute[{micro}] {w.name}"
    done = dispatch(b, plan, w.dispatch_fwd, f"dispatch {label}", done, "bwd", comms=w.tp_recompute)
    return (tp_collectives(b, plan, w.tp_recompute, label, done),)


def layer_backward(b: Builder, plan: Plan, w: LayerWork, micro: int, *, last_layer: bool,
                   keep_grads: bool = False, deps: tuple[int, ...] = ()) -> int:
    """A layer's backward, DTensor's work for it and its tensor-parallel collectives; returns the last."""
    done = b.add(backward(w, micro, last_layer=last_layer, keep_grads=keep_grads, deps=deps))
    done = dispatch(b, plan, w.dispatch_bwd, f"dispatch bwd[{micro}] {w.name}", done, "bwd", comms=w.tp_bwd)
    return tp_collectives(b, plan, w.tp_bwd, f"bwd[{micro}] {w.name}", done)


def copy_instr(name: str, nbytes: int, deps: tuple[int, ...] = (), *, alloc: int = 0, free: int = 0) -> Instr:
    """A memory-bound pass over ``nbytes`` (read and write) on the compute stream: scaling a bucket,
    packing gradients into a flat buffer, or splitting a gathered buffer into parameters."""
    return Instr(
        op="compute", stream="compute", name=name, bytes_moved=2.0 * nbytes, num_kernels=1, deps=deps,
        alloc_bytes=alloc, free_bytes=free,
    )


def tp_collectives(b: Builder, plan: Plan, comms: Sequence[Comm], label: str, after: int) -> int:
    """The tensor-parallel collectives of a layer's forward, backward or recomputation, in order after
    ``after``, each holding its buffers while it runs (some until the next compute ends); returns the
    instruction the next compute must wait for."""
    last = after
    phase: Phase = "fwd" if label.startswith("fwd") else "bwd"
    for k, c in enumerate(comms):
        last = b.add(Instr(
            op="collective", stream="comm", name=f"{c.collective} {label} #{k}", phase=phase,
            collective=c.collective, nbytes=c.nbytes, group=rank0_group(plan, c.axes), axes=c.axes, deps=(last,),
            alloc_bytes=c.temp_bytes, free_bytes=c.temp_bytes - c.linger_bytes,
        ))
        b.lingering += c.linger_bytes
    return last


def dtensor_params(plan: Plan) -> int:
    """How many parameters the runtime makes DTensors: all under model-axis placements or FSDP2, else none."""
    model_parallel = any(plan.mesh.axis_size(a) > 1 for a in plan.model_axes)
    return len(plan.params) if model_parallel or shard_axis_of(plan) is not None else 0


def optimizer_dispatch(plan: Plan) -> int:
    """DTensor's host work in the optimizer step, in kernel launches: the single-tensor AdamW of a CPU rank
    dispatches its ops per DTensor parameter (a GPU's foreach step counts nothing: see ``dispatch``)."""
    n = dtensor_params(plan)
    if not n or plan.optimizer not in ("adamw", "adam"):
        return 0
    return round(DTENSOR_ADAMW_KERNELS * n)


def optimizer_step(b: Builder, plan: Plan, state: OptimizerShape, deps: tuple[int, ...], *,
                   free_bytes: int = 0) -> int:
    """The optimizer step after ``deps`` and DTensor's dispatch of its ops (``free_bytes`` more freed at its
    end)."""
    step = optimizer(plan, state.numel, state.num_tensors, state.largest_bytes, state.total_bytes, deps)
    done = b.add(replace(step, free_bytes=step.free_bytes + free_bytes))
    return dispatch(b, plan, optimizer_dispatch(plan), "dispatch optimizer step", done, "step")


def optimizer(plan: Plan, numel: int, num_tensors: int, largest_bytes: int, total_bytes: int, deps: tuple[int, ...]) -> Instr:
    """The optimizer step over this rank's ``numel`` elements in ``num_tensors`` tensors; it holds its
    temporaries while it runs (foreach AdamW on GPUs: a copy of all parameters; on CPUs: two of the largest)."""
    temp = step_temporaries(plan.optimizer, largest_bytes, total_bytes, foreach=plan.cluster.device.kind == "cuda")
    return Instr(op="optimizer", stream="compute", name="optimizer step", phase="step", numel=numel,
                 num_kernels=num_tensors, deps=deps, alloc_bytes=temp, free_bytes=temp)


class SyncHooks(Protocol):
    """How per-parameter synchronizers lower (``planners.sync_lowering``): each bucket, the work after the last
    backward (SFB, parameter servers), and what the local optimizer steps."""

    def reduce_bucket(self, b: Builder, bucket: Bucket, after: int) -> int:
        """Instructions that reduce ``bucket`` once instruction ``after`` has filled it; returns the last."""
        ...

    def after_backward(self, b: Builder, after: int) -> tuple[int, ...]:
        """Instructions after the step's last backward ``after``; returns those the optimizer waits for."""
        ...

    def local_state(self, state: OptimizerShape) -> OptimizerShape:
        """What the local optimizer steps, given what it would step without parameter servers."""
        ...


def lower_replicate(plan: Plan, work: Sequence[LayerWork], state: OptimizerShape,
                    hooks: SyncHooks | None = None) -> RankProgram:
    """Parameters replicated on every data-parallel axis, with wait-free backprop: forward and backward
    per micro-batch (gradients accumulate in place in the bucket buffers); on the last micro-batch each
    bucket is scaled by 1/dp and all-reduced as soon as backward has filled it; the optimizer step waits
    for every bucket. Tensor-parallel collectives block the layer that issues them. Without data-parallel
    replicas there are no buckets: the first micro-batch's backward makes each layer's gradients, which live
    until ``zero_grad(set_to_none=True)`` after the optimizer step. ``hooks`` lower per-parameter synchronizers
    (compressed buckets, SFB, parameter servers) in place of the plain bucket all-reduce."""
    dp_axes = plan.data_parallel_axes
    reduce_ratio = dtype_ratio(plan.precision.reduce_dtype, plan.precision.param_dtype)
    sync = plan.dp_degree > 1
    b = Builder()
    reduces: list[int] = []
    for m in range(plan.batch.num_micro):
        last_micro = m == plan.batch.num_micro - 1
        prev = -1
        for w in work:
            prev = layer_forward(b, plan, w, m, (prev,) if prev >= 0 else ())
        for w in reversed(work):
            deps: tuple[int, ...] = (prev,) if prev >= 0 else ()
            if w.recompute:
                deps = layer_recompute(b, plan, w, m, deps)
            made = not sync and m == 0  # the gradients made here are the ones kept
            prev = layer_backward(b, plan, replace(w, grad_bytes=w.layer_grad_bytes) if made else w, m,
                                  last_layer=w.index == len(work) - 1, keep_grads=made, deps=deps)
            ready = [bk for bk in plan.buckets if bk.ready_after_layer == w.index] if last_micro and sync else []
            for bk in ready:
                if hooks is not None:
                    reduces.append(hooks.reduce_bucket(b, bk, prev))
                    continue
                scaled = b.add(copy_instr(f"scale bucket {bk.index}", bk.nbytes, (prev,)))
                reduces.append(b.add(Instr(
                    op="collective", stream="comm", name=f"all_reduce bucket {bk.index}", phase="bwd",
                    collective="all_reduce", nbytes=int(bk.nbytes * reduce_ratio), group=rank0_group(plan, dp_axes),
                    axes=dp_axes, deps=(scaled,),
                )))
    if hooks is not None and sync:
        reduces.extend(hooks.after_backward(b, prev))
        state = hooks.local_state(state)
    kept = 0 if sync else sum(w.layer_grad_bytes for w in work)
    optimizer_step(b, plan, state, tuple(reduces), free_bytes=kept)
    return RankProgram(ranks=tuple(range(plan.mesh.size)), instrs=tuple(b.instrs))


@dataclass(frozen=True, kw_only=True)
class OptimizerShape:
    """What one rank's optimizer step updates: elements, tensors, and the bytes of its largest and all tensors."""

    numel: int
    num_tensors: int
    largest_bytes: int
    total_bytes: int
