"""Lower a token-sliced pipeline (TeraPipe, ICML'21) into per-stage instruction lists the simulator executes.

Every micro-batch's sequence is cut into the same token slices; a (micro-batch, slice) pair is a cell. Each stage
runs what ``plait.runtime.token_pipeline`` runs: every cell forward in pipeline order (receive its input slice from
the previous stage, compute, send its output slice on), then every cell backward in reverse order (receive its
output's gradient, compute, send its input's gradient back), then the gradient all-reduce over the stage's ranks
(when it has several) and the optimizer step. Every pass is tagged with its kind, micro-batch, stage and slice
(``Instr.token_slice``), so the timeline shows ``F0.s2`` and ``B0.s2``. A tensor-parallel stage (``tp`` ranks per
replica) computes its share of each pass and then waits for the pass's tp collectives over its first replica's tp
group (``tp fwd v1 mb0 s2 #0``, as ``pipeline_lowering`` lowers a micro-batch pass's); a boundary sent as tp slices
is all-gathered by the receiving stage; the gradient all-reduce runs over the stage's first dp group.

A cell's compute is priced as ``SliceCost`` prices it: ``q0 + micro * (q1 * l + q2 * pairs)`` for the forward's
FLOPs and memory traffic and the backward's FLOPs (the backward moving twice the forward's bytes and launching twice
its kernels), where ``pairs`` counts the query-key pairs the runtime's attention computes: the first slice runs the
causal kernel (``l (l + 1) / 2``), later slices attend to the cached keys and values through an explicit mask
(``l (l + c)``), or with ``causal_skip`` a fused kernel that skips masked tiles (``l c + l (l + 1) / 2``).

Memory (per rank, erring safe): a cell's forward holds its share ``l / seq_len`` of the stage's activations per
micro-batch, and its output slice, until its backward ends; receive buffers live until the cell's backward ends; a
backward holds the stage's whole backward workspace while it runs, and its input's gradient until the next backward
ends (the runtime waits on its sends at the end of the step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from plait.errors import PlaitError
from plait.plan.ir import Instr, Phase, RankProgram
from plait.planners.token_cost import SliceComm, TokenWork


@dataclass(frozen=True, kw_only=True)
class TokenStageWork:
    """One stage's work per token slice: ``work`` is per sample (``token_work`` of its layers), ``micro`` the samples
    a rank runs per micro-batch; the memory fields are per micro-batch of the whole sequence."""

    work: TokenWork
    micro: int = 1
    causal_skip: bool = False  # later slices' attention skips masked tiles (a fused kernel with an offset)
    activation_bytes: int = 0  # saved from forward until backward, per micro-batch
    transient_bytes: int = 0  # held while a backward runs
    final_output_bytes: int = 0  # the last stage's output per micro-batch (what the loss reads)
    tp: int = 1  # tensor-parallel ranks per replica of the stage (its ranks are dp x tp, row-major); ``work`` is then
    # one rank's share (``tp`` times less per slice)
    send_split: int = 1  # the boundary crosses as this many slices, all-gathered over the receiver's tp group
    fwd_comms: tuple[SliceComm, ...] = ()  # tensor-parallel collectives a slice's forward waits for, in order
    bwd_comms: tuple[SliceComm, ...] = ()  # and its backward

    def pairs(self, tokens: int, context: int) -> float:
        """Query-key pairs the runtime's attention computes for a slice of ``tokens`` after ``context`` tokens."""
        if context == 0 or self.causal_skip:
            return tokens * context + tokens * (tokens + 1) / 2
        return float(tokens * (tokens + context))

    def amount(self, poly: tuple[float, float, float], tokens: int, context: int) -> float:
        """``(q0 + micro * (q1 * l + q2 * pairs)) / tp`` of one of ``work``'s polynomials (one rank's share)."""
        return (poly[0] + poly[1] * tokens * self.micro + poly[2] * self.pairs(tokens, context) * self.micro) / self.tp

    def boundary(self, tokens: int) -> int:
        """Bytes of a slice's output (and of its gradient) crossing to the next stage."""
        return int(self.micro * tokens * self.work.boundary_bytes)

    def sent(self, tokens: int) -> int:
        """What one rank sends (or receives) of a slice's boundary: all of it, or its share."""
        return -(-self.boundary(tokens) // self.send_split)

    def group(self, ranks: Sequence[int]) -> tuple[int, ...]:
        """The tp group of the stage's first replica (its first ``tp`` ranks)."""
        return tuple(ranks[:self.tp])


def check_slices(cuts: Sequence[int]) -> None:
    """``PlaitError`` unless ``cuts`` is a non-empty list of positive slice lengths."""
    if not cuts or any(int(n) < 1 for n in cuts):
        raise PlaitError(f"token slices must be positive lengths in tokens, got {list(cuts)}")


def lower_token_pipeline(works: Sequence[TokenStageWork], cuts: Sequence[int], stage_ranks: Sequence[tuple[int, ...]], *,
                         num_micro: int = 1, optimizer_numel: Sequence[int] | None = None,
                         optimizer_tensors: Sequence[int] | None = None, sync_bytes: Sequence[int] | None = None,
                         step_temp_bytes: Sequence[int] | None = None) -> tuple[RankProgram, ...]:
    """Per-stage programs of a token pipeline: stage ``k`` (``works[k]`` on ``stage_ranks[k]``) runs ``num_micro``
    micro-batches cut into slices ``cuts`` (tokens); see the module docstring. ``sync_bytes[k]``: gradients its
    ranks all-reduce; ``optimizer_numel[k]`` / ``optimizer_tensors[k]``: what its optimizer step updates;
    ``step_temp_bytes[k]``: the step's temporaries."""
    check_slices(cuts)
    if len(works) != len(stage_ranks) or not works:
        raise PlaitError(f"{len(works)} stage works for {len(stage_ranks)} rank groups; give one per stage")
    if num_micro < 1:
        raise PlaitError(f"a pipeline needs at least one micro-batch, got {num_micro}")
    programs = []
    for k, ranks in enumerate(stage_ranks):
        instrs, pending = _cells(works, k, list(cuts), stage_ranks, num_micro)
        replicas = tuple(ranks)[::works[k].tp]  # the first data-parallel group of a dp x tp stage
        sync = sync_bytes[k] if sync_bytes is not None else 0
        if len(replicas) > 1 and sync > 0:
            instrs.append(Instr(op="collective", stream="comm", name=f"grad sync stage {k}", phase="bwd",
                                collective="all_reduce", nbytes=sync, group=replicas, axes=("dp",),
                                deps=(len(instrs) - 1,)))
        temp = step_temp_bytes[k] if step_temp_bytes is not None else 0
        instrs.append(Instr(op="optimizer", stream="compute", name="optimizer step", phase="step",
                            numel=optimizer_numel[k] if optimizer_numel is not None else 0,
                            num_kernels=optimizer_tensors[k] if optimizer_tensors is not None else 0,
                            deps=(len(instrs) - 1,) if instrs else (), alloc_bytes=temp, free_bytes=temp + pending))
        programs.append(RankProgram(ranks=tuple(ranks), instrs=tuple(instrs)))
    return tuple(programs)


def _cells(works: Sequence[TokenStageWork], k: int, cuts: list[int], stage_ranks: Sequence[tuple[int, ...]],
           num_micro: int) -> tuple[list[Instr], int]:
    """Stage ``k``'s forwards of every cell in order and backwards in reverse order; the bytes still held after."""
    w, last, me = works[k], len(works) - 1, stage_ranks[k][0]
    seq = sum(cuts)
    starts = [sum(cuts[:j]) for j in range(len(cuts))]
    cells = [(m, j) for m in range(num_micro) for j in range(len(cuts))]
    instrs: list[Instr] = []
    for m, j in cells:
        tokens, context = cuts[j], starts[j]
        tag = f"mb{m} s{j}"
        deps: tuple[int, ...] = ()
        if k > 0:
            got = works[k - 1].sent(tokens)
            instrs.append(Instr(op="recv", stream="comm", name=f"act {k - 1}>{k} {tag}", phase="fwd", nbytes=got,
                                group=(stage_ranks[k - 1][0], me), alloc_bytes=got))
            _gather(instrs, works[k - 1], tokens, f"act {k - 1}>{k} {tag}", "fwd", w.group(stage_ranks[k]))
            deps = (len(instrs) - 1,)
        instrs.append(Instr(op="compute", stream="compute", name=f"fwd v{k} {tag}", phase="fwd",
                            flops=w.amount(w.work.fwd_flops, tokens, context),
                            bytes_moved=w.amount(w.work.fwd_bytes, tokens, context), num_kernels=w.work.num_kernels,
                            deps=deps, alloc_bytes=_held(w, k == last, tokens, seq), pass_kind="F", micro=m, stage=k,
                            token_slice=j))
        _tensor_parallel(instrs, w, w.fwd_comms, tokens, f"fwd v{k} {tag}", "fwd", w.group(stage_ranks[k]))
        if k < last:
            instrs.append(Instr(op="send", stream="comm", name=f"act {k}>{k + 1} {tag}", phase="fwd",
                                nbytes=w.sent(tokens), group=(me, stage_ranks[k + 1][0]), deps=(len(instrs) - 1,)))
    pending = 0  # the input gradient the previous backward sent, let go when the next one ends
    for m, j in reversed(cells):
        tokens, context = cuts[j], starts[j]
        tag = f"mb{m} s{j}"
        deps = ()
        received = works[k - 1].sent(tokens) if k > 0 else 0
        if k < last:
            instrs.append(Instr(op="recv", stream="comm", name=f"grad {k + 1}>{k} {tag}", phase="bwd",
                                nbytes=w.sent(tokens), group=(stage_ranks[k + 1][0], me), alloc_bytes=w.sent(tokens)))
            _gather(instrs, w, tokens, f"grad {k + 1}>{k} {tag}", "bwd", w.group(stage_ranks[k]))
            deps = (len(instrs) - 1,)
        grad_in = received  # the input's gradient, sent back
        freed = (_held(w, k == last, tokens, seq) + received + (w.sent(tokens) if k < last else 0)
                 + w.transient_bytes + pending)
        instrs.append(Instr(op="compute", stream="compute", name=f"bwd v{k} {tag}", phase="bwd",
                            flops=w.amount(w.work.bwd_flops, tokens, context),
                            bytes_moved=2 * w.amount(w.work.fwd_bytes, tokens, context),
                            num_kernels=2 * w.work.num_kernels, deps=deps, alloc_bytes=w.transient_bytes + grad_in,
                            free_bytes=freed, pass_kind="B", micro=m, stage=k, token_slice=j))
        pending = grad_in
        _tensor_parallel(instrs, w, w.bwd_comms, tokens, f"bwd v{k} {tag}", "bwd", w.group(stage_ranks[k]))
        if k > 0:
            instrs.append(Instr(op="send", stream="comm", name=f"grad {k}>{k - 1} {tag}", phase="bwd",
                                nbytes=received, group=(me, stage_ranks[k - 1][0]), deps=(len(instrs) - 1,)))
    return instrs, pending


def _gather(instrs: list[Instr], w: TokenStageWork, tokens: int, label: str, phase: Phase, group: tuple[int, ...]) -> None:
    """After a slice's boundary arrives as slices (``w.send_split``), its all-gather over the receiving tp group."""
    if w.send_split > 1 and len(group) > 1:
        instrs.append(Instr(op="collective", stream="comm", name=f"gather {label}", phase=phase, collective="all_gather",
                            nbytes=w.boundary(tokens), group=group, axes=("tp",), deps=(len(instrs) - 1,)))


def _tensor_parallel(instrs: list[Instr], w: TokenStageWork, comms: Sequence[SliceComm], tokens: int, label: str,
                     phase: Phase, group: tuple[int, ...]) -> None:
    """A slice pass's tensor-parallel collectives, one after another on the comm stream after its compute, then a
    wait on the compute stream (as ``pipeline_lowering`` lowers a micro-batch pass's)."""
    if not comms or len(group) < 2:
        return
    for n, c in enumerate(comms):
        temp = c.temp(w.micro, tokens)
        instrs.append(Instr(op="collective", stream="comm", name=f"tp {label} #{n}", phase=phase, collective=c.collective,
                            nbytes=c.nbytes(w.micro, tokens), group=group, axes=("tp",), deps=(len(instrs) - 1,),
                            alloc_bytes=temp, free_bytes=temp))
    instrs.append(Instr(op="wait", stream="compute", name=f"tp done {label}", phase=phase, deps=(len(instrs) - 1,)))


def _held(w: TokenStageWork, last: bool, tokens: int, seq: int) -> int:
    """What a cell's forward keeps until its backward: its share of the activations and its output slice."""
    share = tokens / seq
    output = w.final_output_bytes * share if last else w.boundary(tokens)
    return int(-(-(w.activation_bytes * share + output) // 1))
