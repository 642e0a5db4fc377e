"""Lower a step whose parameters are ``Shard(0)`` on a data-parallel axis (FSDP2, and HSDP with a second,
replicated data-parallel axis) to one rank's instruction list. On a CPU rank the host work of FSDP2's
hooks around each unit rides on the unit's copy-out (``plait.cost.work``'s measured constants; taken as
hidden on a GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from plait.cost.work import FSDP2_UNIT_BWD_KERNELS, FSDP2_UNIT_FWD_KERNELS, LayerWork, dtype_ratio
from plait.plan.ir import Instr, Plan, RankProgram
from plait.planners.lowering import (
    Builder,
    OptimizerShape,
    copy_instr,
    layer_backward,
    layer_forward,
    layer_recompute,
    optimizer_step,
    rank0_group,
)


def _gather_sequence(work: Sequence[LayerWork], num_micro: int) -> list[tuple[int, str]]:
    """Every all-gather of the step in issue order: (unit bytes, name); layers without parameters have none."""
    seq: list[tuple[int, str]] = []
    for m in range(num_micro):
        seq += [(w.unit_bytes, f"all_gather[{m}] {w.name} (fwd)") for w in work if w.unit_bytes]
        seq += [(w.unit_bytes, f"all_gather[{m}] {w.name} (bwd)") for w in reversed(work) if w.unit_bytes]
    return seq


@dataclass(kw_only=True)
class _GatherWindow:
    """All-gathers with one unit of prefetch: gather k is issued as soon as the unit of gather k-2 is freed.

    A gather allocates its output buffer; the copy-out splits it into the unit's parameters (allocated
    while the buffer is still alive) and then drops the buffer.
    """

    builder: Builder
    group: tuple[int, ...]
    axis: str
    sequence: list[tuple[int, str]]
    hook_kernels: tuple[int, int] = (0, 0)  # FSDP2's hooks per unit in forward and backward, kernel launches
    frees: list[int] = field(default_factory=list)
    emitted: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        """Issue the first two gathers (nothing to wait for)."""
        for k in range(min(2, len(self.sequence))):
            self._emit(k)

    def copy_out(self, nbytes: int, name: str, after: tuple[int, ...]) -> tuple[int, ...]:
        """Split the gathered buffer of this unit into its parameters, with the host work of FSDP2's hooks
        around the unit's forward or backward on a CPU rank (``hook_kernels``); returns the deps of the
        compute that uses the unit (``after`` alone for a layer without parameters)."""
        if not nbytes:
            return after
        label = name.replace("all_gather", "copy_out", 1)
        deps = (self.emitted[name], *after)
        hooks = self.hook_kernels[1] if name.endswith("(bwd)") else self.hook_kernels[0]
        copy = copy_instr(label, nbytes, deps, alloc=nbytes, free=nbytes)
        return (self.builder.add(replace(copy, num_kernels=1 + hooks)),)

    def release(self, nbytes: int, name: str, after: int) -> None:
        """Free a gathered unit after instruction ``after`` and issue the gather this makes room for."""
        if nbytes == 0:
            return
        self.frees.append(self.builder.add(Instr(op="free", stream="compute", name=name, deps=(after,), free_bytes=nbytes)))
        k = len(self.frees) + 1
        if k < len(self.sequence):
            self._emit(k)

    def _emit(self, k: int) -> None:
        nbytes, name = self.sequence[k]
        self.emitted[name] = self.builder.add(Instr(
            op="collective", stream="comm", name=name, phase="fwd" if name.endswith("(fwd)") else "bwd",
            collective="all_gather", nbytes=nbytes, group=self.group, axes=(self.axis,),
            deps=(self.frees[k - 2],) if k >= 2 else (), alloc_bytes=nbytes,
        ))


def lower_sharded(plan: Plan, work: Sequence[LayerWork], state: OptimizerShape, shard_axis: str) -> RankProgram:
    """FSDP2 and HSDP: per-unit all-gather before forward and before backward (one unit prefetched), free
    after use, reduce-scatter after each unit's backward; a replicated data-parallel axis adds the
    all-reduce of the shard on the last micro-batch. Then the optimizer step on the local shard."""
    replicate_axes = tuple(a for a in plan.data_parallel_axes if a != shard_axis)
    b = Builder()
    hooks = (0, 0) if plan.cluster.device.kind == "cuda" else (FSDP2_UNIT_FWD_KERNELS, FSDP2_UNIT_BWD_KERNELS)
    window = _GatherWindow(builder=b, group=rank0_group(plan, (shard_axis,)), axis=shard_axis,
                           sequence=_gather_sequence(work, plan.batch.num_micro), hook_kernels=hooks)
    window.start()
    reduce_ratio = dtype_ratio(plan.precision.reduce_dtype, plan.precision.compute_dtype)
    finals: list[int] = []
    prev: tuple[int, ...] = ()
    for m in range(plan.batch.num_micro):
        last_micro = m == plan.batch.num_micro - 1
        for w in work:
            deps = window.copy_out(w.unit_bytes, f"all_gather[{m}] {w.name} (fwd)", prev)
            done = layer_forward(b, plan, w, m, deps)
            window.release(w.unit_bytes, f"free[{m}] {w.name} (fwd)", done)
            prev = (done,)
        backward_order = list(reversed(work))
        prefetched: dict[str, tuple[int, ...]] = {}
        for k, w in enumerate(backward_order):
            gathered = f"all_gather[{m}] {w.name} (bwd)"
            deps = prefetched.pop(w.name, ()) or window.copy_out(w.unit_bytes, gathered, prev)
            if w.recompute:
                deps = layer_recompute(b, plan, w, m, deps)
            prev = (layer_backward(b, plan, w, m, last_layer=w.index == len(work) - 1,
                                   keep_grads=bool(w.unit_bytes), deps=deps),)
            if not w.unit_bytes:
                continue
            packed = b.add(copy_instr(f"pack[{m}] {w.name}", int(w.unit_bytes * reduce_ratio), prev, alloc=int(w.unit_bytes * reduce_ratio)))
            nxt = next((v for v in backward_order[k + 1:] if v.unit_bytes), None)
            if nxt is not None:  # the prefetched unit is copied out while this unit's gradients are still being reduced
                prefetched[nxt.name] = window.copy_out(nxt.unit_bytes, f"all_gather[{m}] {nxt.name} (bwd)", (packed,))
            rs, final = _reduce_grad(b, plan, w, m, last_micro, packed, shard_axis, replicate_axes)
            window.release(w.unit_bytes, f"free[{m}] {w.name} (bwd)", rs)
            finals += final
    grads = sum(sharded_grad_bytes(w, plan, shard_axis) for w in work if w.unit_bytes)
    # zero_grad(set_to_none=True) drops the sharded gradients after the step
    optimizer_step(b, plan, state, tuple(finals), free_bytes=grads)
    return RankProgram(ranks=tuple(range(plan.mesh.size)), instrs=tuple(b.instrs))


def sharded_grad_bytes(w: LayerWork, plan: Plan, shard_axis: str) -> int:
    """This rank's shard of a unit's gradient, in the parameters' dtype."""
    unit = w.unit_bytes * dtype_ratio(plan.precision.param_dtype, plan.precision.compute_dtype)
    return int(-(-unit // plan.mesh.axis_size(shard_axis)))


def _reduce_grad(
    b: Builder, plan: Plan, w: LayerWork, micro: int, last: bool, packed: int, shard_axis: str,
    replicate_axes: tuple[str, ...],
) -> tuple[int, list[int]]:
    """Reduce-scatter one unit's packed gradient (and on the last micro-batch all-reduce the shard across the
    replicated axes); returns the reduce-scatter and the instructions the optimizer must wait for."""
    unit = int(w.unit_bytes * dtype_ratio(plan.precision.reduce_dtype, plan.precision.compute_dtype))
    rs = b.add(Instr(
        op="collective", stream="comm", name=f"reduce_scatter[{micro}] {w.name}", phase="bwd",
        collective="reduce_scatter", nbytes=unit, group=rank0_group(plan, (shard_axis,)), axes=(shard_axis,),
        deps=(packed,), free_bytes=unit + w.grad_bytes,  # its input and the unsharded gradients
        alloc_bytes=sharded_grad_bytes(w, plan, shard_axis) if micro == 0 else 0,  # the sharded gradient, kept to the step
    ))
    if not last:
        return rs, []
    if not replicate_axes:
        return rs, [rs]
    n = plan.mesh.axis_size(shard_axis)
    ar = b.add(Instr(
        op="collective", stream="comm", name=f"all_reduce {w.name} shard", phase="bwd",
        collective="all_reduce", nbytes=-(-unit // n), group=rank0_group(plan, replicate_axes), axes=replicate_axes,
        deps=(rs,),
    ))
    return rs, [ar]
