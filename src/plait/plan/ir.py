"""The Plan: every decision a planner makes, as frozen dataclasses with a stable JSON form.

The runtime reads what it does from a Plan and the simulator scores a Plan; nothing else passes
between planners and the runtime. Later passes add stages, placements, sync kinds and schedules to
the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from plait.cluster.spec import Cluster
from plait.graph.model_graph import ModelGraph

PLAN_VERSION = 1

DataParallelKind = Literal["replicate", "fsdp", "hybrid"]
SyncKind = Literal["allreduce", "reduce_scatter", "ps", "sfb", "none"]
InstrOp = Literal["compute", "collective", "send", "recv", "free", "optimizer", "wait"]
Stream = Literal["compute", "comm"]
Phase = Literal["fwd", "bwd", "step", "none"]


@dataclass(frozen=True, kw_only=True)
class MeshSpec:
    """The device mesh: its shape and one name per axis (``dp``, ``tp``, ``pp``, ...)."""

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
        n = 1
        for s in self.shape:
            n *= s
        return n

    def axis_size(self, axis: str) -> int:
        """Size of one named axis (1 when the mesh has no such axis)."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1


@dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """Batch sizes: global = micro x num_micro x data-parallel degree."""

    global_size: int
    micro_size: int  # per rank, per forward/backward
    num_micro: int = 1  # gradient accumulation steps per optimizer step
    lr_scaling: str = "none"


@dataclass(frozen=True, kw_only=True)
class Bucket:
    """Gradients reduced together, in the order backward produces them."""

    index: int
    params: tuple[str, ...]
    nbytes: int
    ready_after_layer: int  # the bucket is full once backward has finished this layer


@dataclass(frozen=True, kw_only=True)
class SyncSpec:
    """How one parameter's gradient meets its replicas."""

    kind: SyncKind
    axes: tuple[str, ...] = ()
    bucket: int | None = None
    compress: str | None = None
    staleness: int = 0


@dataclass(frozen=True, kw_only=True)
class ParamPlan:
    """Placement (one entry per mesh axis, DTensor names) and sync of one parameter."""

    name: str
    placements: tuple[str, ...]  # "Replicate", "Shard(0)", "Partial"
    sync: SyncSpec


@dataclass(frozen=True, kw_only=True)
class DataParallelSpec:
    """The data-parallel part: replicated, fully sharded or hybrid, with its buckets or shard units."""

    kind: DataParallelKind
    replicate_axis: str | None  # mesh axis over which copies are replicated
    shard_axis: str | None  # mesh axis over which parameters are sharded
    bucket_bytes: int
    buckets: tuple[Bucket, ...] = ()
    shard_units: tuple[str, ...] = ()  # module FQNs wrapped by fully_shard, innermost first
    reshard_after_forward: bool = True


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """A pipeline stage: a contiguous range of layers on a submesh."""

    index: int
    layers: tuple[str, ...]
    ranks: tuple[int, ...]
    recompute: bool = False


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """The step schedule: ``data_parallel`` now; pipeline kinds come with the pipeline planner."""

    kind: str = "data_parallel"
    num_microbatches: int = 1
    token_slices: tuple[int, ...] | None = None


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

    @property
    def overlap(self) -> float:
        """Fraction of communication hidden behind compute."""
        return 0.0 if self.comm_s <= 0 else 1.0 - self.exposed_comm_s / self.comm_s


@dataclass(frozen=True, kw_only=True)
class CandidateReport:
    """One option the planner weighed, and why it won or lost."""

    name: str
    kind: DataParallelKind
    bucket_bytes: int
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
    data_parallel: DataParallelSpec
    params: tuple[ParamPlan, ...]
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

    def program_of(self, rank: int) -> RankProgram:
        """The program that ``rank`` executes."""
        for program in self.programs:
            if rank in program.ranks:
                return program
        raise KeyError(f"rank {rank} has no program in this plan (world size {self.world_size})")
