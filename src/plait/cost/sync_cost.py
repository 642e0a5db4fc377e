"""Cost entries of the gradient synchronizers: the bytes each moves and the seconds each takes (docs/sync.md).

Each synchronizer's step is a short chain of ``SyncStep``s (compute passes, collectives over the data-parallel
group, a server's optimizer step); ``chain_time`` runs a chain on the CostModel the way the simulator runs
the instructions the lowering makes from it, so a cost entry and the simulated step agree by construction.

- **All-reduce** of a bucket: a scaling pass and a ring all-reduce of its bytes; ``fp16``/``bf16`` cast to half
  the bytes and back; PowerSGD all-reduces rank-r factors P (n x r) and Q (m x r) of every matrix worth it
  (r(n + m) < n·m) plus the rest uncompressed, and pays the matmuls (three of 2nmr FLOPs) and the QR. The
  wait-free buckets (a plan whose every parameter is a plain all-reduce) call the backend's all-reduce, priced by
  ``CostModel.collective_time``. Every other bucket (compressed, or in a plan that also has PS or SFB parameters)
  runs through ``plait.runtime.sync``'s own flat ring over point-to-point messages, in group order: n - 1
  reduce-scatter steps (each an ``add_`` of the received chunk) and n - 1 all-gather steps, in each of which every
  rank sends one chunk of payload/n to the next at once; a step lasts as long as its slowest hop (``p2p_ring``:
  a hop between nodes over the node's link, shared by the hops crossing it the same way, one inside a node on the
  measured point-to-point table), whatever the hierarchy the backend's collectives would use.
- **Parameter server** (co-located servers): the push and the pull each move, per server r, one message of its
  L_r bytes from (to) each of the n - 1 other ranks. The runtime's server receives its pushes one at a time
  (``dist.recv`` in a thread) and sends its answers one at a time (``isend`` then ``wait``), so the most loaded
  server bounds each phase: n - 1 messages of L_max in a row, each priced on the link it crosses (``p2p_serial``:
  a node-mate's on the intra-node point-to-point table, another node's over the node's link, which moves
  ``devices_per_node`` x the cluster's per-rank inter-node bandwidth), unless a node's link is slower: every rank
  of another node sends it all the bytes the node's ranks serve (``ps_exchange`` prices both, keeps the slower).
  Between them the busiest server sums the n pushes
  of its shards (a clone, n - 1 adds and a division: (3n + 1)·L bytes of traffic), steps its optimizer over
  them and copies a snapshot of them for each of the n answers (2n·L); the workers pack one message per
  server and copy every answered shard back (one kernel per shard). With staleness s = 0 this is exact
  (bulk-synchronous: push, sum, step, answer, pull). For
  s > 0 the model assumes identical workers (no straggler, whose wait SSP would hide) and the runtime's
  ``finish()``, which waits for its own answers: the transfers and the answers' snapshots stay on the critical
  path, and only the server's sum and step leave it (a server answers before it applies the clock),
  overlapping the pull on devices that overlap compute and communication.
- **SFB**: one all-gather of every worker's K x (M + N) factors of all SFB layers, then per layer the rebuild
  matmul dY_all^T X_all (2·M·N·P·K FLOPs) and the bias's column sums.

Poseidon's byte rule (HybComm) and its per-worker counts are here too, in numbers (floats) per iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from plait.cost.comm import CollectiveOp, P2PPattern
from plait.cost.model import CostModel

StepKind = Literal["compute", "collective", "optimizer"]
StepStream = Literal["compute", "comm"]


@dataclass(frozen=True, kw_only=True)
class SyncStep:
    """One piece of a synchronizer's step: a compute pass, a collective over the group, or a server's optimizer step.

    ``after``: index (in its chain) of the step it waits for; None: the step before it. ``nbytes`` is a
    collective's full tensor, as ``CostModel.collective_time`` takes it (a ``p2p_serial`` pattern's: one message).
    ``order``: the group positions a collective runs over, in its order (empty: the whole group); a ``p2p_serial``
    pattern's first position exchanges a message with each of the others in turn.
    """

    name: str
    kind: StepKind
    stream: StepStream = "compute"
    collective: CollectiveOp | P2PPattern | None = None
    order: tuple[int, ...] = ()
    nbytes: int = 0
    flops: float = 0.0
    bytes_moved: float = 0.0
    num_kernels: int = 0
    numel: int = 0
    after: int | None = None
    alloc_bytes: int = 0
    free_bytes: int = 0


def step_group(step: SyncStep, group: Sequence[int]) -> tuple[int, ...]:
    """The ranks a collective step runs over, in its order: ``group`` at the step's ``order`` positions (all of it,
    in order, when empty)."""
    ranks = tuple(group)
    return tuple(ranks[p] for p in step.order) if step.order else ranks


def step_time(step: SyncStep, cost: CostModel, group: Sequence[int], *, dtype: str = "fp32") -> float:
    """Seconds of one step on ``cost`` (collectives over ``group``; compute in ``dtype``)."""
    if step.kind == "collective":
        assert step.collective is not None
        return cost.collective_time(step.collective, step.nbytes, step_group(step, group))
    if step.kind == "optimizer":
        return cost.optimizer_time(step.numel, num_tensors=step.num_kernels)
    return cost.compute_time(step.flops, step.bytes_moved, dtype=dtype, num_kernels=step.num_kernels)


def chain_time(steps: Sequence[SyncStep], cost: CostModel, group: Sequence[int], *, dtype: str = "fp32") -> float:
    """Seconds from the chain's start to its last step's end: two in-order lanes (compute, comm) where the device
    overlaps them, one lane otherwise; a step starts when its lane is free and the step it waits for has ended."""
    free = {"compute": 0.0, "comm": 0.0}
    ends: list[float] = []
    for k, step in enumerate(steps):
        lane = step.stream if cost.overlaps_comm else "compute"
        dep = k - 1 if step.after is None else step.after
        start = max(free[lane], ends[dep] if dep >= 0 else 0.0)
        ends.append(start + step_time(step, cost, group, dtype=dtype))
        free[lane] = ends[-1]
    return max(ends, default=0.0)


# ---- Poseidon's per-iteration counts (floats) and the HybComm rule --------------------------------------


def ps_worker_floats(m: int, n: int) -> int:
    """Floats a pure worker sends plus receives per iteration for an M x N layer through a parameter server: 2MN."""
    return 2 * m * n


def ps_server_floats(m: int, n: int, num_workers: int, num_servers: int) -> float:
    """Floats each of P2 servers sends plus receives for an M x N layer: 2·P1·M·N / P2."""
    return 2 * num_workers * m * n / num_servers


def ps_colocated_floats(m: int, n: int, num_workers: int, num_servers: int) -> float:
    """Floats a machine running a worker and a server moves for an M x N layer: 2MN(P1 + P2 - 2) / P2."""
    return 2 * m * n * (num_workers + num_servers - 2) / num_servers


def sfb_worker_floats(k: int, m: int, n: int, num_workers: int) -> int:
    """Floats a worker sends plus receives broadcasting the sufficient factors of an M x N layer: 2K(P1 - 1)(M + N)."""
    return 2 * k * (num_workers - 1) * (m + n)


def hybcomm_prefers_sfb(k: int, m: int, n: int, num_workers: int, num_servers: int) -> bool:
    """Poseidon's rule: SFB iff 2K(P1-1)(M+N) <= 2MN(P1+P2-2)/P2 (per-worker batch K, weight M x N)."""
    if num_workers < 2:
        return False
    return sfb_worker_floats(k, m, n, num_workers) <= ps_colocated_floats(m, n, num_workers, num_servers)


def sfb_crossover_batch(m: int, n: int, num_workers: int, num_servers: int) -> float:
    """The largest per-worker batch K at which SFB still moves no more than the parameter server (real-valued)."""
    return m * n * (num_workers + num_servers - 2) / (num_servers * (num_workers - 1) * (m + n))


# ---- all-reduce ----------------------------------------------------------------------------------------


def matrix_of(shape: Sequence[int]) -> tuple[int, int] | None:
    """The n x m matrix PowerSGD sees in a parameter (shape[0] by the rest); None for a vector or scalar."""
    if len(shape) < 2:
        return None
    n = shape[0]
    m = 1
    for s in shape[1:]:
        m *= s
    return n, m


def powersgd_rank(shape: Sequence[int], rank: int) -> int:
    """The rank PowerSGD factors ``shape`` with (r capped at min(n, m)), or 0 when it goes uncompressed."""
    nm = matrix_of(shape)
    if nm is None:
        return 0
    n, m = nm
    r = min(rank, n, m)
    return r if r * (n + m) < n * m else 0


def numel_of(shape: Sequence[int]) -> int:
    """Elements of a tensor of ``shape``."""
    out = 1
    for s in shape:
        out *= s
    return out


def allreduce_payload(shapes: Sequence[Sequence[int]], *, compress: str | None = None, rank: int = 1,
                      elem_bytes: int = 4, reduce_ratio: float = 1.0) -> float:
    """Bytes the all-reduces of one bucket work on (each rank sends 2(n-1)/n of them)."""
    if compress in ("fp16", "bf16"):
        return 2.0 * sum(numel_of(s) for s in shapes)
    if compress == "powersgd":
        total = 0
        for s in shapes:
            r = powersgd_rank(s, rank)
            nm = matrix_of(s)
            total += r * (nm[0] + nm[1]) if r and nm else numel_of(s)
        return float(elem_bytes * total)
    return sum(numel_of(s) for s in shapes) * elem_bytes * reduce_ratio


def allreduce_sent_bytes(shapes: Sequence[Sequence[int]], num_workers: int, **payload: object) -> float:
    """Bytes each rank sends (and receives) per step for one bucket: the ring's 2(n-1)/n of the payload."""
    if num_workers < 2:
        return 0.0
    return 2 * (num_workers - 1) / num_workers * allreduce_payload(shapes, **payload)  # type: ignore[arg-type]


def _plain_steps(label: str, nbytes: int, reduce_ratio: float, stream: StepStream) -> list[SyncStep]:
    """Scale a flat bucket by 1/n and all-reduce it (the uncompressed path)."""
    return [SyncStep(name=f"scale {label}", kind="compute", stream=stream, bytes_moved=2.0 * nbytes, num_kernels=1),
            SyncStep(name=f"all_reduce {label}", kind="collective", stream="comm", collective="all_reduce",
                     nbytes=int(nbytes * reduce_ratio))]


def ring_steps(label: str, nbytes: int, num_workers: int = 2) -> list[SyncStep]:
    """``plait.runtime.sync``'s flat ring all-reduce of ``nbytes`` over point-to-point messages, on the communication
    thread: n - 1 reduce-scatter steps, the n - 1 ``add_`` of a received chunk (3 chunks of traffic each), then
    n - 1 all-gather steps (each step as slow as its slowest hop)."""
    chunk = -(-nbytes // max(1, num_workers))
    adds = max(0, num_workers - 1)
    return [SyncStep(name=f"ring reduce_scatter {label}", kind="collective", stream="comm", collective="p2p_ring",
                     nbytes=nbytes),
            SyncStep(name=f"ring adds {label}", kind="compute", stream="comm", bytes_moved=3.0 * adds * chunk,
                     num_kernels=adds),
            SyncStep(name=f"ring all_gather {label}", kind="collective", stream="comm", collective="p2p_ring",
                     nbytes=nbytes)]


def _ring_plain_steps(label: str, nbytes: int, num_workers: int) -> list[SyncStep]:
    """An uncompressed bucket (or rest) through the runtime: scale on the communication thread, then its ring."""
    return [SyncStep(name=f"scale {label}", kind="compute", stream="comm", bytes_moved=2.0 * nbytes, num_kernels=1),
            *ring_steps(label, nbytes, num_workers)]


def _cast_steps(label: str, numel: int, elem_bytes: int, compress: str, num_workers: int) -> list[SyncStep]:
    """Scale and cast to half precision, all-reduce the half-size buffer, cast back (on the communication thread)."""
    full = numel * elem_bytes
    return [SyncStep(name=f"cast {label} to {compress}", kind="compute", stream="comm", bytes_moved=1.5 * full + 2.0 * full,
                     num_kernels=2, alloc_bytes=numel * 2),
            *ring_steps(f"{label} ({compress})", numel * 2, num_workers),
            SyncStep(name=f"cast {label} back", kind="compute", stream="comm", bytes_moved=1.5 * full, num_kernels=1,
                     free_bytes=numel * 2)]


def _powersgd_steps(label: str, mats: Sequence[tuple[int, int, int]], elem_bytes: int,
                    error_feedback: bool, num_workers: int) -> list[SyncStep]:
    """One power iteration over the matrices (n, m, r): P = MQ, all-reduce P, QR, Q = M^T P, all-reduce Q, P Q^T."""
    eb = elem_bytes
    nmr = sum(2.0 * n * m * r for n, m, r in mats)
    nm = sum(n * m for n, m, _ in mats)
    k = len(mats)
    return [
        SyncStep(name=f"powersgd P {label}", kind="compute", stream="comm", flops=nmr, bytes_moved=eb * 3.0 * nm,
                 num_kernels=2 * k),
        *ring_steps(f"P {label}", eb * sum(n * r for n, _, r in mats), num_workers),
        SyncStep(name=f"powersgd qr {label}", kind="compute", stream="comm", flops=sum(4.0 * n * r * r for n, _, r in mats),
                 bytes_moved=eb * 2.0 * sum(n * r for n, _, r in mats), num_kernels=k),
        SyncStep(name=f"powersgd Q {label}", kind="compute", stream="comm", flops=nmr, bytes_moved=eb * 1.0 * nm,
                 num_kernels=k),
        *ring_steps(f"Q {label}", eb * sum(m * r for _, m, r in mats), num_workers),
        SyncStep(name=f"powersgd rebuild {label}", kind="compute", stream="comm", flops=nmr,
                 bytes_moved=eb * (3.0 if error_feedback else 1.0) * nm, num_kernels=(2 if error_feedback else 1) * k),
    ]


def allreduce_steps(label: str, shapes: Sequence[Sequence[int]], *, compress: str | None = None, rank: int = 1,
                    error_feedback: bool = True, elem_bytes: int = 4, reduce_ratio: float = 1.0, ring: bool = False,
                    num_workers: int = 2) -> list[SyncStep]:
    """The steps of one all-reduce bucket of parameters of ``shapes`` over ``num_workers`` ranks (uncompressed and not
    ``ring``: the wait-free bucket's scaling pass on the compute stream and the backend's all-reduce; compressed or
    ``ring``: ``plait.runtime.sync``'s work on its communication thread and its flat point-to-point ring)."""
    numel = sum(numel_of(s) for s in shapes)
    if compress in ("fp16", "bf16"):
        return _cast_steps(label, numel, elem_bytes, compress, num_workers)
    if compress != "powersgd":
        if ring:
            return _ring_plain_steps(label, numel * elem_bytes, num_workers)
        return _plain_steps(label, numel * elem_bytes, reduce_ratio, "compute")
    mats, rest = [], 0
    for s in shapes:
        r, nm = powersgd_rank(s, rank), matrix_of(s)
        if r and nm:
            mats.append((nm[0], nm[1], r))
        else:
            rest += numel_of(s)
    steps = _powersgd_steps(label, mats, elem_bytes, error_feedback, num_workers) if mats else []
    return steps + (_ring_plain_steps(f"{label} rest", rest * elem_bytes, num_workers) if rest else [])


# ---- SFB -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SFBLayerSize:
    """One SFB layer: K rows per worker per step, weight M x N (out x in), and whether SFB rebuilds its bias."""

    rows: int
    out_features: int
    in_features: int
    bias: bool = False


def sfb_factor_bytes(layers: Sequence[SFBLayerSize], elem_bytes: int = 4) -> int:
    """Bytes of one worker's factors for every layer: sum of K(M + N) numbers."""
    return elem_bytes * sum(s.rows * (s.out_features + s.in_features) for s in layers)


def sfb_sent_bytes(layers: Sequence[SFBLayerSize], num_workers: int, elem_bytes: int = 4) -> int:
    """Bytes each worker sends (and receives) per step: its factors to each of the P1 - 1 others."""
    return (num_workers - 1) * sfb_factor_bytes(layers, elem_bytes)


def sfb_steps(layers: Sequence[SFBLayerSize], num_workers: int, elem_bytes: int = 4) -> list[SyncStep]:
    """All-gather every worker's factors (one message per peer), then rebuild each layer's gradient from them."""
    gathered = num_workers * sfb_factor_bytes(layers, elem_bytes)
    flops = bytes_moved = 0.0
    kernels = 0
    for s in layers:
        rows = num_workers * s.rows
        flops += 2.0 * s.out_features * s.in_features * rows + (rows * s.out_features if s.bias else 0)
        bytes_moved += elem_bytes * (rows * (s.out_features + s.in_features) + s.out_features * s.in_features)
        kernels += 2 + (2 if s.bias else 0)
    return [SyncStep(name="sfb all_gather", kind="collective", stream="comm", collective="all_gather", nbytes=gathered,
                     alloc_bytes=gathered),
            SyncStep(name="sfb rebuild", kind="compute", flops=flops, bytes_moved=bytes_moved, num_kernels=kernels,
                     free_bytes=gathered)]


# ---- parameter server ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServerLoads:
    """What each group position serves: bytes and elements of its shards, and how many shards."""

    bytes: tuple[int, ...]
    numel: tuple[int, ...]
    shards: tuple[int, ...]

    @property
    def total(self) -> int:
        """Bytes of every served shard (T)."""
        return sum(self.bytes)

    @property
    def busiest(self) -> int:
        """Bytes the busiest rank moves one way in a push (or a pull): max_r max((n-1)·L_r, T - L_r)."""
        n = len(self.bytes)
        return max((max((n - 1) * b, self.total - b) for b in self.bytes), default=0)

    def sent_bytes(self) -> tuple[int, ...]:
        """Bytes each rank sends (= receives) per step: its pushes to other servers plus its answers, T + (n-2)·L_r."""
        n = len(self.bytes)
        return tuple(self.total + (n - 2) * b for b in self.bytes)


def split_sizes(size: int, pieces: int) -> list[int]:
    """Lengths of ``torch.tensor_split`` of ``size`` into ``pieces``: the first ``size % pieces`` one longer."""
    base, extra = divmod(size, pieces)
    return [base + (1 if i < extra else 0) for i in range(pieces)]


def server_loads(params: Sequence[tuple[Sequence[int], int, int, Sequence[int]]], size: int,
                 elem_bytes: int = 4) -> ServerLoads:
    """Loads of ``size`` positions from parameters ``(shape, num_shards, shard_dim, servers)`` in parameter order;
    empty servers: round-robin, the j-th parameter's shard i on position (j + i) mod size (as the runtime does)."""
    nbytes, numel, shards = [0] * size, [0] * size, [0] * size
    for j, (shape, num_shards, dim, servers) in enumerate(params):
        along = shape[dim] if shape else 1
        per_row = numel_of(shape) // along if along else 0
        for i, length in enumerate(split_sizes(along, num_shards)):
            where = servers[i] if servers else (j + i) % size
            numel[where] += length * per_row
            nbytes[where] += length * per_row * elem_bytes
            shards[where] += 1
    return ServerLoads(bytes=tuple(nbytes), numel=tuple(numel), shards=tuple(shards))


def ps_exchange(name: str, loads: ServerLoads, cost: CostModel | None = None,
                group: Sequence[int] | None = None) -> SyncStep:
    """The push (or the pull) as the slower of its bottlenecks: the busiest server's n - 1 messages in a row, or (with
    ``cost`` and a ``group`` spanning nodes) a node's link, over which every rank of another node sends (receives)
    all that node's served bytes, one message per rank in a row."""
    n = len(loads.bytes)
    hot = max(loads.bytes)
    lead = loads.bytes.index(hot)
    step = SyncStep(name=name, kind="collective", stream="comm", collective="p2p_serial", nbytes=hot,
                    order=(lead, *(p for p in range(n) if p != lead)))
    if cost is None or group is None or len(group) != n:
        return step
    nodes: dict[int, list[int]] = {}
    for p, r in enumerate(group):
        nodes.setdefault(cost.cluster.node_of(r), []).append(p)
    worst = step_time(step, cost, group)
    for into in nodes.values():
        served = sum(loads.bytes[p] for p in into)
        for node_from in (ps for ps in nodes.values() if ps is not into):
            link = replace(step, nbytes=served, order=(into[0], *node_from))
            if served and step_time(link, cost, group) > worst:
                step, worst = link, step_time(link, cost, group)
    return step


def ps_steps(loads: ServerLoads, *, staleness: int = 0, label: str = "ps", cost: CostModel | None = None,
             group: Sequence[int] | None = None) -> list[SyncStep]:
    """Pack one message per server, push (``ps_exchange``: the runtime's server receives its pushes one at a time),
    the busiest server's sum of the n pushes and optimizer step, its n answers' snapshots, pull (it sends its answers
    one at a time), copy every shard back; with s > 0 the answer does not wait for the server's sum and step."""
    n = len(loads.bytes)
    if n < 2 or loads.total == 0:
        return []
    t = loads.total
    hot = max(loads.bytes)  # the busiest server's bytes: it sums, steps and answers these
    push = ps_exchange(f"{label} push", loads, cost, group)
    pull = ps_exchange(f"{label} pull", loads, cost, group)
    reduce = SyncStep(name=f"{label} server sum", kind="compute", bytes_moved=(3.0 * n + 1.0) * hot, num_kernels=n + 1)
    step = SyncStep(name=f"{label} server step", kind="optimizer", numel=max(loads.numel), num_kernels=max(loads.shards))
    answer = SyncStep(name=f"{label} server answers", kind="compute", bytes_moved=2.0 * n * hot, num_kernels=n)
    pack = SyncStep(name=f"{label} pack", kind="compute", bytes_moved=2.0 * t, num_kernels=n, alloc_bytes=2 * t)
    copies = max(1, sum(loads.shards))
    if staleness == 0:
        unpack = SyncStep(name=f"{label} unpack", kind="compute", bytes_moved=2.0 * t, num_kernels=copies,
                          free_bytes=2 * t)
        return [pack, push, reduce, step, answer, pull, unpack]
    unpack = SyncStep(name=f"{label} unpack", kind="compute", bytes_moved=2.0 * t, num_kernels=copies, free_bytes=2 * t,
                      after=3)
    return [pack, push, answer, pull, replace(reduce, after=1), step, unpack]
