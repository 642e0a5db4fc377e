"""Lower a pipeline schedule into per-rank instruction lists the simulator (and later the runtime) executes.

Each pipeline stage is one ``RankProgram`` shared by the ranks of its submesh. For every action of the
schedule it gets: a forward that first receives its input activation from the previous virtual stage
(none on the first), computes (holding the micro-batch's saved activations) and sends its output on; a
backward that receives the output gradient from the next virtual stage (none on the last), computes
(freeing the saved activations) and sends the input gradient back; on the last virtual stage the merge of
its outputs; then the gradient all-reduce over the stage's ranks (when it has several) and the optimizer
step. Transfers are non-blocking sends and receives between the stages' first ranks, named by the
boundary, direction and micro-batch, so the simulator pairs them.

Memory follows what ``torch.distributed.pipelining`` (plait's pipeline runtime) holds, as measured by
``bench/pipeline_fidelity.py``:

* a receive buffer for a micro-batch's input activation from its receive until its last backward pass
  (``B``, or ``W`` when the backward is split), and one for its output's gradient from that receive until the
  same pass (``plait.runtime.pipeline_buffers``: torch alone would keep one per micro-batch for the whole run);
  with several chunks per rank (interleaved), torch's multi-stage runtime posts each receive when the sender's
  time step runs, ahead of its pass: one more buffer each way counts there for the whole step;
* per micro-batch from its forward to its backward, the saved activations and the output (kept to run
  the backward with the gradient that comes back); with ``keep_outputs`` (torch's ``step`` returns the
  outputs unless told ``return_outputs=False``, as plait's runtime tells it) the last virtual stage
  keeps every output until the step ends and then concatenates them (``merge outputs``);
* while a backward runs, its workspace (``StageWork.transient_bytes``) and the gradient of its input;
* what a send was given stays referenced after it (``release_points``): a backward's input gradient
  until the stage's next backward ends (and the end of its run of backwards); in 1F1B the output of the
  second-to-last warm-up forward until the steady state ends; in GPipe every sent tensor until the last
  backward ends. (Interleaved schedules run on torch's multi-stage runtime, whose references were not
  measured; they get the 1F1B rules.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from plait.cost.work import Comm
from plait.errors import PlaitError
from plait.plan.ir import Instr, Phase, RankProgram
from plait.planners.schedules import Action, Schedule


@dataclass(frozen=True, kw_only=True)
class StageWork:
    """One virtual stage's work for one micro-batch (the layers of one model chunk on its submesh)."""

    fwd_flops: float
    bwd_flops: float
    fwd_bytes_moved: float = 0.0
    num_kernels: int = 1
    bwd_bytes_moved: float = 0.0
    bwd_kernels: int = 2
    activation_bytes: int = 0  # saved from forward until backward, per micro-batch
    boundary_bytes: int = 0  # the output activation sent to the next virtual stage (its gradient comes back)
    # held only while the backward runs: the layers' backward workspace (the loss's gradients on the last
    # stage), the gradients flowing between its layers, a recomputed layer's activations
    transient_bytes: int = 0
    final_output_bytes: int = 0  # the last virtual stage's output per micro-batch (kept until the step ends)
    tp: int = 1  # tensor-parallel ranks per replica of the stage (its ranks are dp x tp, row-major)
    # the boundary crosses as this many slices (each tp rank sends one) and the receiver all-gathers it over its
    # tp group; the gradient comes back the same way (Megatron's scatter-gather)
    send_split: int = 1
    fwd_comms: tuple[Comm, ...] = ()  # tensor-parallel collectives the forward waits for, in order
    bwd_comms: tuple[Comm, ...] = ()  # and the backward (a recomputed forward's again)
    # the pipeline runtime's own host work per pass (F, B, I or W: the schedule's step, the stage's bookkeeping,
    # posting and waiting on its sends and receives), in kernel launches (``plait.cost.work.PIPELINE_PASS_KERNELS``)
    pass_kernels: int = 0

    @property
    def comm_temp_bytes(self) -> int:
        """The most a tensor-parallel collective holds while it runs (they run one at a time)."""
        return max((c.temp_bytes for c in (*self.fwd_comms, *self.bwd_comms)), default=0)


@dataclass(frozen=True)
class StageMemory:
    """An upper bound on one stage's dynamic memory in its lowered program: ``per_micro`` for each micro-batch
    in flight plus ``during`` while micro-batches run, and ``after`` once all are done (merge, optimizer)."""

    per_micro: int
    during: int
    after: int

    def peak(self, in_flight: int) -> int:
        """The bound with at most ``in_flight`` micro-batches between their forward and backward."""
        return max(in_flight * self.per_micro + self.during, self.after)

    def max_in_flight(self, room: float, cap: int) -> int:
        """The most micro-batches in flight (at most ``cap``) whose peak fits in ``room``; 0 when none does."""
        if self.after > room or self.during + self.per_micro > room:
            return 0
        return cap if self.per_micro == 0 else min(cap, int((room - self.during) // self.per_micro))


def stage_memory(w: StageWork, *, input_bytes: int, num_micro: int, step_temp_bytes: int = 0,
                 keep_outputs: bool = False, split_backward: bool = False, input_split: int = 1) -> StageMemory:
    """The bound ``lower_pipeline``'s program of a stage running ``w`` stays under (one virtual stage per rank;
    ``input_bytes``: the previous stage's ``boundary_bytes``): each in-flight micro-batch holds its input's receive
    buffer, its activations and output (or, once its backward ran, its input's gradient and, in GPipe, its
    output); while they run, the next input's receive buffer, the running and the next backward's output
    gradients, the kept final outputs, the backward's workspace and two input gradients (its own and the one its
    previous backward sent), and 1F1B's held warm-up output; after them, the kept outputs and their merge or the
    optimizer step's temporaries. With ``split_backward`` (the zero-bubble schedule) a micro-batch between its
    ``I`` and ``W`` also holds the gradients of its weight ops' outputs, counted as its backward's workspace,
    and its output gradient's receive buffer. Receive buffers hold what crosses: a boundary sent as slices
    (``input_split``, ``w.send_split``) needs slices."""
    finals = num_micro * w.final_output_bytes if keep_outputs else 0
    received = -(-input_bytes // input_split)  # an input's receive buffer: what crosses
    kept = _slice(w) + (0 if keep_outputs else w.final_output_bytes) + received
    held = w.activation_bytes + (_kept_for_w(w) + _slice(w) if split_backward else 0)  # I to W: output gradients
    return StageMemory(
        per_micro=kept + max(held, input_bytes),
        # the next input being received, the running backward's output gradient and the next one's
        during=finals + received + 2 * _slice(w) + w.transient_bytes + 2 * input_bytes + w.boundary_bytes + w.comm_temp_bytes,
        after=finals + max(finals, step_temp_bytes),
    )


def lower_pipeline(schedule: Schedule, work: Sequence[StageWork], stage_ranks: Sequence[tuple[int, ...]], *,
                   optimizer_numel: Sequence[int] | None = None,
                   sync_bytes: Sequence[int] | None = None,
                   step_temp_bytes: Sequence[int] | None = None,
                   keep_outputs: bool = False) -> tuple[RankProgram, ...]:
    """Per-stage programs for ``schedule``; ``work[v]`` is virtual stage ``v = chunk * p + stage``;
    ``sync_bytes[stage]`` the gradients its ranks all-reduce, ``optimizer_numel[stage]`` what they update and
    ``step_temp_bytes[stage]`` the temporaries their optimizer step makes; ``keep_outputs``: the last virtual
    stage keeps its outputs until the step ends (see the module docstring)."""
    p = len(schedule)
    if len(stage_ranks) != p:
        raise PlaitError(f"the schedule has {p} stages but {len(stage_ranks)} rank groups were given")
    chunks = 1 + max(a.chunk for acts in schedule for a in acts)
    if len(work) != chunks * p:
        raise PlaitError(f"{p} stages x {chunks} chunks need {chunks * p} stage works, got {len(work)}")
    programs = []
    for stage, actions in enumerate(schedule):
        instrs, held = _lower_actions(actions, stage, p, work, stage_ranks, keep_outputs)
        ranks = tuple(stage_ranks[stage])
        sync = sync_bytes[stage] if sync_bytes is not None else 0
        replicas = ranks[::work[stage].tp]  # the first data-parallel group of a dp x tp stage
        if len(replicas) > 1 and sync > 0:
            instrs.append(Instr(op="collective", stream="comm", name=f"grad sync stage {stage}", phase="bwd",
                                collective="all_reduce", nbytes=sync, group=replicas, axes=("dp",),
                                deps=(len(instrs) - 1,)))
        numel = optimizer_numel[stage] if optimizer_numel is not None else 0
        temp = step_temp_bytes[stage] if step_temp_bytes is not None else 0
        instrs.append(Instr(op="optimizer", stream="compute", name="optimizer step", phase="step", numel=numel,
                            deps=(len(instrs) - 1,), alloc_bytes=temp, free_bytes=temp + held))
        programs.append(RankProgram(ranks=ranks, instrs=tuple(instrs)))
    return tuple(programs)


def release_points(actions: Sequence[Action]) -> list[int]:
    """For each action, the action at whose end torch's schedules let go of what it sent (a forward's output,
    which its backward needs too; a backward's input gradient): see the module docstring."""
    if any(a.kind in ("I", "W") for a in actions):
        return _split_release_points(actions)
    n = len(actions)
    backward_of = {(a.micro, a.chunk): i for i, a in enumerate(actions) if a.kind == "B"}
    first_b = min(backward_of.values(), default=n)
    last_b = max(backward_of.values(), default=n - 1)
    if all(a.kind == "B" for a in actions[first_b:]):  # fill-drain (GPipe): every send is waited on at the end
        return [max(i, last_b) for i in range(n)]
    steady_end = max(i for i in range(1, n) if actions[i].kind == "B" and actions[i - 1].kind == "F")
    out = []
    for i, a in enumerate(actions):
        if a.kind == "F":
            own = backward_of.get((a.micro, a.chunk), last_b)
            out.append(max(own, steady_end) if i == first_b - 2 else own)
            continue
        run_end = i
        while run_end + 1 < n and actions[run_end + 1].kind == "B":
            run_end += 1
        later = next((j for j in range(i + 1, n) if actions[j].kind == "B"), i)
        out.append(max(run_end, later))
    return out


def _split_release_points(actions: Sequence[Action]) -> list[int]:
    """With split backwards: a forward's output until its micro-batch's ``W`` ends, an input gradient until the
    next ``I`` ends (the last ones until the end)."""
    n = len(actions)
    weight_of = {(a.micro, a.chunk): i for i, a in enumerate(actions) if a.kind == "W"}
    out = []
    for i, a in enumerate(actions):
        if a.kind == "F":
            out.append(weight_of.get((a.micro, a.chunk), n - 1))
        else:
            out.append(next((j for j in range(i + 1, n) if actions[j].kind == "I"), n - 1))
    return out


def _lower_actions(actions: Sequence[Action], stage: int, p: int, work: Sequence[StageWork],
                   stage_ranks: Sequence[tuple[int, ...]], keep_outputs: bool) -> tuple[list[Instr], int]:
    """One stage's instructions for its actions, and the bytes still held when they are done (the final outputs,
    and with several chunks per rank the receive buffers posted ahead; freed with the optimizer step)."""
    last = len(work) - 1
    # torch's multi-stage runtime (several chunks per rank) posts a receive when the sender's time step runs, ahead
    # of its pass: there one more buffer each way per chunk counts for the whole step (as measured by pipeline_fidelity)
    chunks = {a.chunk for a in actions}
    released: defaultdict[int, int] = defaultdict(int)  # action index -> bytes let go when it ends
    points = release_points(actions)
    instrs: list[Instr] = []
    finals = 0
    for i, a in enumerate(actions):
        v = a.chunk * p + stage
        kept = _kept_output(work, v, keep_outputs)
        sent = kept if a.kind == "F" else 0 if a.kind == "W" else _sent_back(work, v)
        released[points[i]] += sent
        _lower_action(instrs, a, stage, p, work, stage_ranks, released[i])
        finals += work[v].final_output_bytes if keep_outputs and a.kind == "F" and v == last else 0
    held = finals
    if len(chunks) > 1 and instrs:
        ahead = sum(_received(work, c * p + stage) for c in chunks)  # one posted ahead per chunk each way
        instrs[0] = replace(instrs[0], alloc_bytes=instrs[0].alloc_bytes + ahead)
        held += ahead
    if finals:
        instrs.append(Instr(op="compute", stream="compute", name="merge outputs", phase="bwd", bytes_moved=2 * finals,
                            num_kernels=1, deps=(len(instrs) - 1,), alloc_bytes=finals, free_bytes=finals))
    return instrs, held


def _kept_output(work: Sequence[StageWork], v: int, keep_outputs: bool) -> int:
    """The output virtual stage ``v`` keeps from a forward to its backward: what it sends on (the whole boundary,
    or this rank's slice: the whole output is freed once sliced), or on the last one the output it gives the
    loss (unless it keeps them all until the step ends)."""
    if v < len(work) - 1:
        return _slice(work[v])
    return 0 if keep_outputs else work[v].final_output_bytes


def _sent_back(work: Sequence[StageWork], v: int) -> int:
    """The gradient virtual stage ``v`` sends back and keeps until torch lets go: its input's, or its slice."""
    return _slice(work[v - 1]) if v > 0 else 0


def _input_bytes(work: Sequence[StageWork], v: int) -> int:
    """The input activation of virtual stage ``v`` (and its gradient): the previous one's boundary."""
    return work[v - 1].boundary_bytes if v > 0 else 0


def _lower_action(instrs: list[Instr], a: Action, stage: int, p: int, work: Sequence[StageWork],
                  stage_ranks: Sequence[tuple[int, ...]], released: int) -> None:
    """Receive, compute and send of one action; ``released``: bytes sent earlier that are let go as it ends."""
    v = a.chunk * p + stage
    if a.kind == "F":
        _lower_forward(instrs, a, v, stage, p, work, stage_ranks, released)
    elif a.kind == "W":
        w = work[v]
        instrs.append(Instr(op="compute", stream="compute", name=f"bwdW v{v} mb{a.micro}", phase="bwd",
                            flops=w.bwd_flops / 2, bytes_moved=w.bwd_bytes_moved / 2, num_kernels=max(1, w.bwd_kernels // 2) + w.pass_kernels,
                            free_bytes=w.activation_bytes + _kept_for_w(w) + _received(work, v) + released,  # after its I
                            pass_kind="W", micro=a.micro, stage=v))
    else:
        _lower_backward(instrs, a, v, stage, p, work, stage_ranks, released)


def _rank_of(stage_ranks: Sequence[tuple[int, ...]], p: int, virtual: int) -> int:
    """The first rank of the stage that runs virtual stage ``virtual``."""
    return stage_ranks[virtual % p][0]


def _lower_forward(instrs: list[Instr], a: Action, v: int, stage: int, p: int, work: Sequence[StageWork],
                   stage_ranks: Sequence[tuple[int, ...]], released: int) -> None:
    """Receive the input (and gather its slices), compute, its collectives, send the output on."""
    w, last, me = work[v], len(work) - 1, stage_ranks[stage][0]
    group = stage_ranks[stage][:w.tp]
    deps: tuple[int, ...] = ()
    if v > 0:
        before = work[v - 1]
        instrs.append(Instr(op="recv", stream="comm", name=f"act {v - 1}>{v} mb{a.micro}", phase="fwd",
                            nbytes=_slice(before), group=(_rank_of(stage_ranks, p, v - 1), me),
                            alloc_bytes=_slice(before)))
        _gather(instrs, before, f"act {v - 1}>{v} mb{a.micro}", "fwd", group)
        deps = (len(instrs) - 1,)
    output = w.boundary_bytes if v < last else w.final_output_bytes
    sliced_off = output - _slice(w) if v < last else 0  # the whole output lives until its slice is taken
    instrs.append(Instr(op="compute", stream="compute", name=f"fwd v{v} mb{a.micro}", phase="fwd", flops=w.fwd_flops,
                        bytes_moved=w.fwd_bytes_moved, num_kernels=w.num_kernels + w.pass_kernels, deps=deps,
                        alloc_bytes=w.activation_bytes + output, free_bytes=released + sliced_off, pass_kind="F",
                        micro=a.micro, stage=v))
    _tensor_parallel(instrs, w.fwd_comms, f"fwd v{v} mb{a.micro}", "fwd", group)
    if v < last:
        instrs.append(Instr(op="send", stream="comm", name=f"act {v}>{v + 1} mb{a.micro}", phase="fwd",
                            nbytes=_slice(w), group=(me, _rank_of(stage_ranks, p, v + 1)), deps=(len(instrs) - 1,)))


def _lower_backward(instrs: list[Instr], a: Action, v: int, stage: int, p: int, work: Sequence[StageWork],
                    stage_ranks: Sequence[tuple[int, ...]], released: int) -> None:
    """Receive the output's gradient (and gather it), compute the whole backward (``B``) or its input half
    (``I``, which keeps the activations for its ``W``), its collectives, send the input's gradient back."""
    w, last, me = work[v], len(work) - 1, stage_ranks[stage][0]
    group = stage_ranks[stage][:w.tp]
    deps: tuple[int, ...] = ()
    if v < last:
        instrs.append(Instr(op="recv", stream="comm", name=f"grad {v + 1}>{v} mb{a.micro}", phase="bwd",
                            nbytes=_slice(w), group=(_rank_of(stage_ranks, p, v + 1), me), alloc_bytes=_slice(w)))
        _gather(instrs, w, f"grad {v + 1}>{v} mb{a.micro}", "bwd", group)
        deps = (len(instrs) - 1,)
    whole = a.kind == "B"
    share = 1.0 if whole else 0.5
    # an I keeps, for its W, the gradients of the weight ops' outputs: counted as its backward's workspace plus
    # the gradient of the stage's output (the last layer's weights need it)
    kept_for_w = 0 if whole else _kept_for_w(w)
    freed = w.activation_bytes + _received(work, v) + released if whole else released
    freed += _input_bytes(work, v) - _sent_back(work, v)  # the input's gradient is kept as the slice it sends
    instrs.append(Instr(op="compute", stream="compute", name=f"bwd{'' if whole else 'I'} v{v} mb{a.micro}", phase="bwd",
                        flops=w.bwd_flops * share, bytes_moved=w.bwd_bytes_moved * share,
                        num_kernels=max(1, int(w.bwd_kernels * share)) + w.pass_kernels, deps=deps,
                        alloc_bytes=w.transient_bytes + _input_bytes(work, v) + kept_for_w,
                        free_bytes=freed + w.transient_bytes, pass_kind=a.kind, micro=a.micro, stage=v))
    _tensor_parallel(instrs, w.bwd_comms, f"bwd v{v} mb{a.micro}", "bwd", group)
    if v > 0:
        instrs.append(Instr(op="send", stream="comm", name=f"grad {v}>{v - 1} mb{a.micro}", phase="bwd",
                            nbytes=_slice(work[v - 1]), group=(me, _rank_of(stage_ranks, p, v - 1)),
                            deps=(len(instrs) - 1,)))


def _kept_for_w(w: StageWork) -> int:
    """What an ``I`` pass keeps for its ``W``: the weight ops' output gradients (the backward's workspace) and the
    gradient of the stage's output."""
    return w.transient_bytes + (w.boundary_bytes or w.final_output_bytes)


def _received(work: Sequence[StageWork], v: int) -> int:
    """The receive buffers a micro-batch of virtual stage ``v`` holds until its last backward pass: its input's and
    its output gradient's."""
    return (_slice(work[v - 1]) if v > 0 else 0) + (_slice(work[v]) if v < len(work) - 1 else 0)


def _slice(w: StageWork) -> int:
    """What one rank sends or receives of ``w``'s boundary (or its gradient): all of it, or its slice."""
    return -(-w.boundary_bytes // w.send_split)


def _gather(instrs: list[Instr], w: StageWork, label: str, phase: Phase, group: tuple[int, ...]) -> None:
    """After a sliced boundary arrives, the all-gather of the whole tensor over the receiving tp group."""
    if w.send_split > 1 and len(group) > 1:
        instrs.append(Instr(op="collective", stream="comm", name=f"gather {label}", phase=phase, collective="all_gather",
                            nbytes=w.boundary_bytes, group=group, axes=("tp",), deps=(len(instrs) - 1,)))


def _tensor_parallel(instrs: list[Instr], comms: Sequence[Comm], label: str, phase: Phase, group: tuple[int, ...]) -> None:
    """The tensor-parallel collectives a pass waits for, one after another on the comm stream after its compute,
    then a wait on the compute stream: the stage's next computation needs their results (the work between two
    of a pass's collectives is counted with the pass's compute, before them, which errs slow)."""
    if not comms or len(group) < 2:
        return
    for k, c in enumerate(comms):
        instrs.append(Instr(op="collective", stream="comm", name=f"tp {label} #{k}", phase=phase, collective=c.collective,
                            nbytes=c.nbytes, group=group, axes=("tp",), deps=(len(instrs) - 1,),
                            alloc_bytes=c.temp_bytes, free_bytes=c.temp_bytes))
    instrs.append(Instr(op="wait", stream="compute", name=f"tp done {label}", phase=phase, deps=(len(instrs) - 1,)))
