"""The Plan: every decision a planner makes, as frozen dataclasses with a stable JSON form.

The runtime reads what it does from a Plan and the simulator scores a Plan; nothing else passes
between planners and the runtime. Later passes add stages, placements, sync kinds and schedules to
the same structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from itertools import product
from math import prod
from typing import Literal, get_args

from plait.cluster.spec import Cluster
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.placement import Placement

PLAN_VERSION = 2

SyncKind = Literal["allreduce", "reduce_scatter", "ps", "sfb", "none"]
SyncCompression = Literal["fp16", "bf16", "powersgd"]
SYNC_KINDS: tuple[str, ...] = get_args(SyncKind)
SYNC_COMPRESSIONS: tuple[str, ...] = get_args(SyncCompression)
InstrOp = Literal["compute", "collective", "send", "recv", "free", "optimizer", "wait"]
Stream = Literal["compute", "comm"]
Phase = Literal["fwd", "bwd", "step", "none"]
Port = Literal["input", "output"]
PassKind = Literal["F", "B", "I", "W"]
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class MeshSpec:
    """The device mesh: its shape and one name per axis (``dp``, ``tp``, ``pp``, ...); ranks lie row-major."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"mesh shape {self.shape} and axes {self.axes} differ in length")
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(f"mesh axes must be unique, got {self.axes}")

    @property
    def size(self) -> int:
        """Number of ranks in the mesh."""
        return prod(self.shape)

    def axis_size(self, axis: str) -> int:
        """Size of one named axis (1 when the mesh has no such axis)."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    def coords(self, rank: int) -> tuple[int, ...]:
        """The mesh coordinates of ``rank``."""
        out = []
        for size in reversed(self.shape):
            out.append(rank % size)
            rank //= size
        return tuple(reversed(out))

    def rank_at(self, coords: Sequence[int]) -> int:
        """The rank at mesh coordinates ``coords``."""
        rank = 0
        for c, size in zip(coords, self.shape, strict=True):
            rank = rank * size + c
        return rank

    def group(self, rank: int, axes: Sequence[str]) -> tuple[int, ...]:
        """The ranks that share ``rank``'s coordinates on every axis but ``axes`` (row-major over ``axes``)."""
        base = list(self.coords(rank))
        index = [self.axes.index(a) for a in axes]
        members = []
        for offsets in product(*(range(self.shape[i]) for i in index)):
            for i, c in zip(index, offsets, strict=True):
                base[i] = c
            members.append(self.rank_at(base))
        return tuple(members)

    def index_in(self, rank: int, axes: Sequence[str]) -> int:
        """``rank``'s position in its group over ``axes`` (row-major)."""
        return self.group(rank, axes).index(rank)


@dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """Batch sizes (global = micro x num_micro x data-parallel degree) and how the batch lies on the mesh.

    ``placements`` holds one entry per mesh axis: ``Shard(0)`` on the data-parallel axes, over which the
    global batch is split, ``Replicate()`` on the others (every rank of a model axis sees the same rows).
    """

    global_size: int
    micro_size: int  # per data-parallel rank, per forward/backward
    num_micro: int = 1  # gradient accumulation steps per optimizer step
    lr_scaling: str = "none"
    placements: tuple[Placement, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Bucket:
    """Gradients all-reduced together, in the order backward produces them (``nbytes``: this rank's shards)."""

    index: int
    params: tuple[str, ...]
    nbytes: int
    ready_after_layer: int  # the bucket is full once backward has finished this layer


@dataclass(frozen=True, kw_only=True)
class SyncSpec:
    """How one parameter's gradient meets its replicas over the mesh ``axes`` (one entry of an AutoDist-style strategy).

    ``kind``: ``allreduce`` (wait-free buckets), ``reduce_scatter`` (sharded optimizer, FSDP2), ``ps`` (parameter
    server), ``sfb`` (sufficient-factor broadcasting, ``nn.Linear`` only) or ``none``. ``bucket``: the all-reduce
    bucket (fusion group) the gradient travels in. ``compress``: all-reduce compression (``fp16``, ``bf16`` or
    ``powersgd`` of rank ``compress_rank``, with ``error_feedback``). A ``ps`` parameter is cut into ``num_shards``
    pieces along ``shard_dim`` (``torch.tensor_split``); ``servers[i]`` is the position, in the group the axes span,
    of the rank serving piece ``i`` (empty: round-robin); ``staleness`` is the SSP bound (0: synchronous).
    """

    kind: SyncKind
    axes: tuple[str, ...] = ()
    bucket: int | None = None
    compress: SyncCompression | None = None
    staleness: int = 0
    compress_rank: int = 1
    error_feedback: bool = True
    num_shards: int = 1
    shard_dim: int = 0
    servers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = _sync_problems(self)
        if problems:
            raise PlaitError("; ".join(f"SyncSpec.{p}" for p in problems))

    def to_json(self) -> dict[str, object]:
        """The JSON form: the five original keys always, the newer ones only when they differ from their defaults."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SYNC_KEYS_ALWAYS or value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_SYNC_KEYS_ALWAYS = ("kind", "axes", "bucket", "compress", "staleness")  # what plans written before the rest hold


def _sync_problems(s: SyncSpec) -> list[str]:
    """What is wrong with a SyncSpec, each message starting with the field's name (empty when valid)."""
    out = []
    if s.kind not in SYNC_KINDS:
        out.append(f"kind {s.kind!r} is not one of {', '.join(SYNC_KINDS)}")
    if len(set(s.axes)) != len(s.axes):
        out.append(f"axes {s.axes} name a mesh axis twice")
    if s.bucket is not None and s.bucket < 0:
        out.append(f"bucket {s.bucket} is negative; buckets are numbered from 0")
    if s.compress is not None and s.compress not in SYNC_COMPRESSIONS:
        out.append(f"compress {s.compress!r} is not one of {', '.join(SYNC_COMPRESSIONS)} (or null for none)")
    elif s.compress is not None and s.kind != "allreduce":
        out.append(f"compress {s.compress!r} applies to kind 'allreduce' only, not {s.kind!r}")
    if s.compress_rank < 1:
        out.append(f"compress_rank {s.compress_rank} must be at least 1")
    elif (s.compress_rank != 1 or not s.error_feedback) and s.compress != "powersgd":
        out.append("compress_rank and error_feedback set PowerSGD; they need compress='powersgd'")
    if s.staleness < 0:
        out.append(f"staleness {s.staleness} is negative; 0 is synchronous, s > 0 lets workers run s clocks apart")
    elif s.staleness > 0 and s.kind != "ps":
        out.append(f"staleness {s.staleness} bounds a parameter server; kind {s.kind!r} is synchronous (use 0)")
    if s.num_shards < 1:
        out.append(f"num_shards {s.num_shards} must be at least 1")
    if s.shard_dim < 0:
        out.append(f"shard_dim {s.shard_dim} is negative; give the tensor dimension counted from 0")
    if (s.num_shards != 1 or s.shard_dim != 0 or s.servers) and s.kind != "ps":
        out.append(f"num_shards, shard_dim and servers place parameter-server shards; kind is {s.kind!r}, not 'ps'")
    elif s.servers and len(s.servers) != s.num_shards:
        out.append(f"servers {s.servers} must name one rank per shard ({s.num_shards} shards)")
    elif any(r < 0 for r in s.servers):
        out.append(f"servers {s.servers} holds a negative position; give positions in the group the axes span")
    return out


@dataclass(frozen=True, kw_only=True)
class ParamPlan:
    """One parameter: its placement on each mesh axis (DTensor's names) and how its gradient is synchronised.

    In a pipeline plan ``stage`` names the stage that holds it, and ``placements`` and ``sync.axes`` refer to
    that stage's mesh; otherwise (``None``) to the plan's mesh.
    """

    name: str
    placements: tuple[Placement, ...]
    sync: SyncSpec
    stage: int | None = None


@dataclass(frozen=True, kw_only=True)
class ActivationPlan:
    """An activation pinned at a module boundary: input or output ``index`` of ``module`` has these placements."""

    module: str
    port: Port
    index: int = 0
    placements: tuple[Placement, ...]


@dataclass(frozen=True, kw_only=True)
class ShardUnit:
    """A module whose Shard(0)-on-a-data-parallel-axis parameters are gathered together (an FSDP2 unit)."""

    module: str
    reshard_after_forward: bool = True


@dataclass(frozen=True, kw_only=True)
class PrecisionPolicy:
    """Dtypes: parameters as stored (the master copy), compute (autocast / FSDP2's param dtype), gradient reduction."""

    param_dtype: str = "fp32"
    compute_dtype: str = "fp32"
    reduce_dtype: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("param_dtype", "compute_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"precision {name} {getattr(self, name)!r} is not one of {', '.join(DTYPES)}")

    @property
    def mixed(self) -> bool:
        """True when compute runs in a lower precision than the stored parameters."""
        return self.compute_dtype != self.param_dtype


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """Per layer of the layer view: whether its forward is recomputed in backward (activation checkpointing)."""

    name: str
    recompute: bool = False


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """A pipeline stage: a contiguous range of the layer view on its own submesh.

    ``ranks`` lie row-major on ``mesh`` (its axes name the stage's roles: ``dp`` splits each micro-batch,
    ``tp`` and other model axes shard the layers); ``recompute`` recomputes every layer's forward in backward.
    """

    index: int
    layers: tuple[str, ...]
    ranks: tuple[int, ...]
    mesh: MeshSpec | None = None  # None: one data-parallel axis over ``ranks``
    recompute: bool = False
    # how its output crosses to the next stage, on its mesh (empty: whole on every rank); a Shard on ``tp``
    # sends each rank's slice and the next stage all-gathers it (its gradient comes back the same way)
    send_placements: tuple[Placement, ...] = ()

    @property
    def stage_mesh(self) -> MeshSpec:
        """The stage's mesh (a ``dp`` axis over its ranks unless given)."""
        return self.mesh or MeshSpec(shape=(len(self.ranks),), axes=("dp",))


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """The step schedule: ``spmd`` (every rank runs the whole model) or a pipeline schedule (``gpipe``,
    ``1f1b``, ``interleaved-1f1b``, ``zero-bubble``) over ``num_microbatches`` micro-batches per step.

    ``token_slices`` (TeraPipe's token-level pipelining): the lengths, in tokens, of the slices every micro-batch's
    sequence is cut into, in pipeline order; ``None`` or empty: unsliced. A sliced schedule runs every (micro-batch,
    slice) cell forward in order, then every cell backward in reverse order (``kind`` is ``gpipe``).
    ``unsliced_step_s``: with token slices, the predicted step of the same stages pipelined by micro-batches only
    (the fastest other schedule), for the record of by how much slicing won; left out of the JSON when unset.
    """

    kind: str = "spmd"
    num_microbatches: int = 1
    token_slices: tuple[int, ...] | None = None
    unsliced_step_s: float | None = None

    @property
    def is_token_sliced(self) -> bool:
        """True when micro-batches are cut into more than nothing: a token-level pipeline."""
        return bool(self.token_slices)

    def to_json(self) -> dict[str, object]:
        """The JSON form: the original keys always, ``unsliced_step_s`` only when set (older plans still load)."""
        out: dict[str, object] = {"kind": self.kind, "num_microbatches": self.num_microbatches,
                                  "token_slices": None if self.token_slices is None else list(self.token_slices)}
        if self.unsliced_step_s is not None:
            out["unsliced_step_s"] = self.unsliced_step_s
        return out


@dataclass(frozen=True, kw_only=True)
class Instr:
    """One instruction of a rank's program; the simulator runs it against the CostModel."""

    op: InstrOp
    stream: Stream
    name: str
    phase: Phase = "none"
    layer: int | None = None
    flops: float = 0.0
    bytes_moved: float = 0.0  # memory traffic, for the roofline
    num_kernels: int = 0
    collective: str | None = None  # all_reduce, all_gather, reduce_scatter, broadcast, ...
    nbytes: int = 0  # message size of a collective or transfer
    group: tuple[int, ...] = ()  # ranks taking part in a collective
    deps: tuple[int, ...] = ()  # indices of instructions (same program) that must finish first
    alloc_bytes: int = 0  # memory this instruction allocates when it starts (negative: frees when it ends)
    free_bytes: int = 0  # memory this instruction releases when it ends
    numel: int = 0  # parameter elements an optimizer instruction updates
    axes: tuple[str, ...] = ()  # mesh axes a collective spans; in an SPMD program `group` is the first rank's
    # a pipeline's pass: F (forward), B (backward), I/W (the backward's input and weight halves) of micro-batch
    # ``micro`` on virtual stage ``stage``; the pipeline runtime executes these in program order
    pass_kind: PassKind | None = None
    micro: int | None = None
    stage: int | None = None
    # a token-sliced pipeline's pass runs slice ``token_slice`` (of ``ScheduleSpec.token_slices``) of its micro-batch
    token_slice: int | None = None

    def to_json(self) -> dict[str, object]:
        """The JSON form: every field, ``token_slice`` only when set (plans written before it load unchanged)."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "token_slice" or value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def pass_label(self) -> str:
        """The pass this instruction runs, e.g. ``F3`` (forward of micro-batch 3) or ``B3.s1`` (backward of its slice
        1); empty when it runs none."""
        if self.pass_kind is None:
            return ""
        micro = "" if self.micro is None else str(self.micro)
        return f"{self.pass_kind}{micro}" + ("" if self.token_slice is None else f".s{self.token_slice}")


@dataclass(frozen=True, kw_only=True)
class RankProgram:
    """The instruction list shared by a set of ranks (one entry covers all ranks of an SPMD step)."""

    ranks: tuple[int, ...]
    instrs: tuple[Instr, ...]


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per device, by kind."""

    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int  # communication buckets, gathered shards, workspace

    @property
    def total(self) -> int:
        """Sum of all kinds."""
        return self.params + self.grads + self.optimizer + self.activations + self.buffers


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """What the cost model expects of a plan."""

    step_s: float
    compute_s: float
    comm_s: float
    exposed_comm_s: float  # communication not hidden behind compute
    peak_memory_bytes: tuple[int, ...]  # per rank
    memory: MemoryEstimate
    bubble_fraction: float = 0.0  # pipelines: share of the step a rank's compute stands idle (mean over ranks)

    @property
    def overlap(self) -> float:
        """Fraction of communication hidden behind compute."""
        return 0.0 if self.comm_s <= 0 else 1.0 - self.exposed_comm_s / self.comm_s


@dataclass(frozen=True, kw_only=True)
class CandidateReport:
    """One option the planner weighed, and why it won or lost."""

    name: str
    family: str  # "data parallel", "intra-op", ...
    fits: bool
    step_s: float
    peak_memory_bytes: int
    memory_limit_bytes: int
    note: str = ""
    micro_size: int = 0  # per-rank micro-batch the candidate was scored with (0: not scored)
    num_micro: int = 1  # gradient-accumulation steps the candidate was scored with


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Who made the plan and how long each pass took."""

    planner: str
    version: str
    created: str
    search_s: float
    passes: dict[str, float] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A complete, serialisable training plan for one model on one cluster."""

    model: ModelGraph  # layer view and parameters (without the op list)
    cluster: Cluster
    mesh: MeshSpec
    batch: BatchSpec
    params: tuple[ParamPlan, ...]
    activations: tuple[ActivationPlan, ...] = ()
    buckets: tuple[Bucket, ...] = ()
    shard_units: tuple[ShardUnit, ...] = ()
    precision: PrecisionPolicy = PrecisionPolicy()
    layers: tuple[LayerPlan, ...] = ()
    schedule: ScheduleSpec = ScheduleSpec()
    stages: tuple[StageSpec, ...] = ()
    programs: tuple[RankProgram, ...] = ()
    predicted: Prediction | None = None
    candidates: tuple[CandidateReport, ...] = ()
    provenance: Provenance | None = None
    optimizer: str = "adamw"  # the optimizer whose state the memory estimate assumes
    version: int = PLAN_VERSION

    @property
    def world_size(self) -> int:
        """Number of ranks the plan runs on."""
        return self.mesh.size

    @property
    def data_parallel_axes(self) -> tuple[str, ...]:
        """Mesh axes over which the batch is split (``Shard(0)`` in ``batch.placements``)."""
        return tuple(a for a, p in zip(self.mesh.axes, self.batch.placements, strict=True) if p.is_shard)

    @property
    def model_axes(self) -> tuple[str, ...]:
        """Mesh axes over which the batch is not split: the model is (or may be) sharded there."""
        dp = set(self.data_parallel_axes)
        return tuple(a for a in self.mesh.axes if a not in dp)

    @property
    def dp_degree(self) -> int:
        """Number of data-parallel replicas the global batch is split over."""
        return prod(self.mesh.axis_size(a) for a in self.data_parallel_axes)

    def param(self, name: str) -> ParamPlan:
        """The plan of one parameter."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"the plan has no parameter {name!r}")

    @property
    def is_pipeline(self) -> bool:
        """True when the plan cuts the model into pipeline stages."""
        return bool(self.stages)

    def mesh_of(self, param: ParamPlan) -> MeshSpec:
        """The mesh ``param``'s placements refer to: its stage's in a pipeline plan, else the plan's."""
        return self.stages[param.stage].stage_mesh if param.stage is not None else self.mesh

    def stage_of(self, rank: int) -> StageSpec:
        """The (first) pipeline stage ``rank`` belongs to."""
        return self.stages_of(rank)[0]

    def stages_of(self, rank: int) -> tuple[StageSpec, ...]:
        """The pipeline stages ``rank`` runs: one, or its model chunks under an interleaved schedule."""
        found = tuple(stage for stage in self.stages if rank in stage.ranks)
        if not found:
            raise KeyError(f"rank {rank} is in no stage of this plan ({len(self.stages)} stages)")
        return found

    @property
    def num_pipeline_ranks(self) -> int:
        """Pipeline stages on distinct ranks (fewer than ``stages`` when each runs several model chunks)."""
        return len({stage.ranks for stage in self.stages})

    def program_of(self, rank: int) -> RankProgram:
        """The program that ``rank`` executes."""
        for program in self.programs:
            if rank in program.ranks:
                return program
        raise KeyError(f"rank {rank} has no program in this plan (world size {self.world_size})")
