"""Lower a data-parallel step to the instruction list that the simulator scores and the runtime mirrors.

Streams run in program order; ``deps`` add the cross-stream edges. Memory: ``alloc_bytes`` is taken
when an instruction starts, ``free_bytes`` given back when it ends (static state is not in the trace).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from plait.graph.model_graph import ModelGraph
from plait.plan.ir import BatchSpec, DataParallelSpec, Instr, MeshSpec, RankProgram


@dataclass(kw_only=True)
class _Builder:
    """An instruction list under construction; ``add`` returns the new instruction's index."""

    instrs: list[Instr] = field(default_factory=list)

    def add(self, instr: Instr) -> int:
        self.instrs.append(instr)
        return len(self.instrs) - 1


def first_rank_groups(mesh: MeshSpec) -> dict[str, tuple[int, ...]]:
    """For each mesh axis, the ranks that share rank 0's coordinates on every other axis."""
    groups: dict[str, tuple[int, ...]] = {}
    for k, axis in enumerate(mesh.axes):
        stride = 1
        for size in mesh.shape[k + 1 :]:
            stride *= size
        groups[axis] = tuple(i * stride for i in range(mesh.shape[k]))
    return groups


def _compute(graph: ModelGraph, index: int, phase: str, micro: int, scale: float) -> Instr:
    """A layer's work at ``scale`` x the captured batch, the only place that rule lives: backward does
    ``bwd_flops``, twice the forward's memory traffic and twice its kernels."""
    layer = graph.layers[index]
    fwd = phase == "fwd"
    return Instr(
        op="compute",
        stream="compute",
        name=f"{phase}[{micro}] {layer.name}",
        phase="fwd" if fwd else "bwd",
        layer=index,
        flops=(layer.fwd_flops if fwd else layer.bwd_flops) * scale,
        bytes_moved=layer.fwd_bytes_moved * scale * (1 if fwd else 2),
        num_kernels=layer.num_kernels * (1 if fwd else 2),
    )


def forward(graph: ModelGraph, index: int, micro: int, scale: float, deps: tuple[int, ...] = ()) -> Instr:
    """Forward of one layer: it allocates the activations it saves for backward."""
    act = int(graph.layers[index].activation_bytes * scale)
    return replace(_compute(graph, index, "fwd", micro, scale), alloc_bytes=act, deps=deps)


def backward(graph: ModelGraph, index: int, micro: int, scale: float, *, grad_bytes: int = 0, deps: tuple[int, ...] = ()) -> Instr:
    """Backward of one layer. It allocates the gradient of its input (the last layer also the gradient
    of its output, from the loss) plus ``grad_bytes`` (a sharded unit's unsharded parameter gradients),
    and frees its saved activations and the gradient of its output when it ends."""
    layer = graph.layers[index]
    out_grad = int(layer.output_bytes * scale)
    in_grad = int(graph.layers[index - 1].output_bytes * scale) if index > 0 else 0
    from_loss = out_grad if index == len(graph.layers) - 1 else 0
    act = int(layer.activation_bytes * scale)
    return replace(
        _compute(graph, index, "bwd", micro, scale),
        alloc_bytes=grad_bytes + in_grad + from_loss,
        free_bytes=act + out_grad,
        deps=deps,
    )


def copy_instr(name: str, nbytes: int, deps: tuple[int, ...] = (), *, alloc: int = 0, free: int = 0) -> Instr:
    """A memory-bound pass over ``nbytes`` (read and write) on the compute stream: scaling a bucket,
    packing gradients into a flat buffer, or splitting a gathered buffer into parameters."""
    return Instr(
        op="compute", stream="compute", name=name, bytes_moved=2.0 * nbytes, num_kernels=1, deps=deps,
        alloc_bytes=alloc, free_bytes=free,
    )


def lower_replicate(graph: ModelGraph, mesh: MeshSpec, batch: BatchSpec, dp: DataParallelSpec) -> RankProgram:
    """Replicated DP with wait-free backprop: forward and backward per micro-batch (gradients accumulate
    in place in the bucket buffers); on the last micro-batch each bucket is scaled by 1/world and
    all-reduced as soon as backward has filled it; the optimizer step waits for every bucket."""
    scale = batch.micro_size / graph.batch_size
    group = first_rank_groups(mesh)["dp"]
    b = _Builder()
    reduces: list[int] = []
    for m in range(batch.num_micro):
        last = m == batch.num_micro - 1
        for layer in graph.layers:
            b.add(forward(graph, layer.index, m, scale))
        for layer in reversed(graph.layers):
            done = b.add(backward(graph, layer.index, m, scale))
            ready = [bk for bk in dp.buckets if bk.ready_after_layer == layer.index] if last and len(group) > 1 else []
            for bk in ready:
                scaled = b.add(copy_instr(f"scale bucket {bk.index}", bk.nbytes, (done,)))
                ar = Instr(
                    op="collective", stream="comm", name=f"all_reduce bucket {bk.index}", phase="bwd",
                    collective="all_reduce", nbytes=bk.nbytes, group=group, axes=("dp",), deps=(scaled,),
                )
                reduces.append(b.add(ar))
    b.add(_optimizer(graph.num_params, len(graph.params), tuple(reduces)))
    return RankProgram(ranks=tuple(range(mesh.size)), instrs=tuple(b.instrs))


def _gather_sequence(graph: ModelGraph, num_micro: int) -> list[tuple[int, str]]:
    """Every all-gather of the step in issue order: (unit bytes, name); units without parameters have none."""
    seq: list[tuple[int, str]] = []
    for m in range(num_micro):
        seq += [(ly.param_bytes, f"all_gather[{m}] {ly.name} (fwd)") for ly in graph.layers if ly.param_bytes]
        seq += [(ly.param_bytes, f"all_gather[{m}] {ly.name} (bwd)") for ly in reversed(graph.layers) if ly.param_bytes]
    return seq


@dataclass(kw_only=True)
class _GatherWindow:
    """All-gathers with one unit of prefetch: gather k is issued as soon as the unit of gather k-2 is freed."""

    builder: _Builder
    group: tuple[int, ...]
    axis: str
    sequence: list[tuple[int, str]]
    frees: list[int] = field(default_factory=list)
    emitted: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        """Issue the first two gathers (nothing to wait for)."""
        for k in range(min(2, len(self.sequence))):
            self._emit(k)

    def copy_out(self, nbytes: int, name: str) -> tuple[int, ...]:
        """Split the gathered buffer of this unit into its parameters; returns the deps of the compute
        that uses the unit (nothing for a unit without parameters)."""
        if not nbytes:
            return ()
        label = name.replace("all_gather", "copy_out", 1)
        return (self.builder.add(copy_instr(label, nbytes, (self.emitted[name],))),)

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
        self.emitted[name] = self.builder.add(
            Instr(
                op="collective",
                stream="comm",
                name=name,
                phase="fwd" if name.endswith("(fwd)") else "bwd",
                collective="all_gather",
                nbytes=nbytes,
                group=self.group,
                axes=(self.axis,),
                deps=(self.frees[k - 2],) if k >= 2 else (),
                alloc_bytes=nbytes,
            )
        )


def lower_sharded(graph: ModelGraph, mesh: MeshSpec, batch: BatchSpec, dp: DataParallelSpec) -> RankProgram:
    """FSDP2 and hybrid: per-unit all-gather before forward and before backward (one unit prefetched),
    free after use, reduce-scatter after each unit's backward; hybrid adds the cross-node all-reduce of
    the shard on the last micro-batch. Then the optimizer step on the local shard."""
    if dp.shard_axis is None:
        raise ValueError("a sharded data-parallel spec needs a shard axis")
    groups = first_rank_groups(mesh)
    n = len(groups[dp.shard_axis])
    scale = batch.micro_size / graph.batch_size
    b = _Builder()
    window = _GatherWindow(builder=b, group=groups[dp.shard_axis], axis=dp.shard_axis, sequence=_gather_sequence(graph, batch.num_micro))
    window.start()
    finals: list[int] = []
    for m in range(batch.num_micro):
        for layer in graph.layers:
            deps = window.copy_out(layer.param_bytes, f"all_gather[{m}] {layer.name} (fwd)")
            done = b.add(forward(graph, layer.index, m, scale, deps))
            window.release(layer.param_bytes, f"free[{m}] {layer.name} (fwd)", done)
        for layer in reversed(graph.layers):
            unit = layer.param_bytes
            deps = window.copy_out(unit, f"all_gather[{m}] {layer.name} (bwd)")
            done = b.add(backward(graph, layer.index, m, scale, grad_bytes=unit, deps=deps))
            window.release(unit, f"free[{m}] {layer.name} (bwd)", done)
            if unit:
                finals += _reduce_grad(b, layer.name, unit, m, m == batch.num_micro - 1, done, groups, dp)
    b.add(_optimizer(-(-graph.num_params // n), len(graph.params), tuple(finals)))
    return RankProgram(ranks=tuple(range(mesh.size)), instrs=tuple(b.instrs))


def _reduce_grad(
    b: _Builder, name: str, unit: int, micro: int, last: bool, after: int, groups: dict[str, tuple[int, ...]], dp: DataParallelSpec
) -> list[int]:
    """Reduce-scatter one unit's gradient (and on the last micro-batch all-reduce the shard across
    replicas); returns the instructions the optimizer must wait for."""
    assert dp.shard_axis is not None
    # the unsharded gradient is copied into the flat reduce-scatter input, then dropped
    packed = b.add(copy_instr(f"pack[{micro}] {name}", unit, (after,), alloc=unit, free=unit))
    rs = b.add(
        Instr(
            op="collective",
            stream="comm",
            name=f"reduce_scatter[{micro}] {name}",
            phase="bwd",
            collective="reduce_scatter",
            nbytes=unit,
            group=groups[dp.shard_axis],
            axes=(dp.shard_axis,),
            deps=(packed,),
            free_bytes=unit,  # the reduce-scatter input
        )
    )
    if not last:
        return []
    if dp.replicate_axis is None:
        return [rs]
    n = len(groups[dp.shard_axis])
    ar = b.add(
        Instr(
            op="collective",
            stream="comm",
            name=f"all_reduce {name} shard",
            phase="bwd",
            collective="all_reduce",
            nbytes=-(-unit // n),
            group=groups[dp.replicate_axis],
            axes=(dp.replicate_axis,),
            deps=(rs,),
        )
    )
    return [ar]


def _optimizer(numel: int, num_tensors: int, deps: tuple[int, ...]) -> Instr:
    """The optimizer step over this rank's ``numel`` elements in ``num_tensors`` tensors (one update each)."""
    return Instr(op="optimizer", stream="compute", name="optimizer step", phase="step", numel=numel,
                 num_kernels=num_tensors, deps=deps)
