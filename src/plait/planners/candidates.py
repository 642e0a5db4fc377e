"""Data-parallel candidates: which options exist and how each is scored (by simulation, under a memory limit)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from plait.cluster import Cluster
from plait.cost import CostModel
from plait.cost.memory import OPTIMIZER_STATES
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import MeshSpec, Plan, PrecisionPolicy
from plait.plan.table import fmt_bytes
from plait.planners.buckets import DEFAULT_BUCKET_BYTES, MiB
from plait.planners.data_parallel import DataParallelKind, build_dp_plan, resolve_precision
from plait.planners.intra_op.planner import IntraOpOptions
from plait.planners.intra_op.search import MeshOption, score_mesh
from plait.planners.intra_op.source import ModelSource

DEFAULT_BUCKET_SIZES: tuple[int, ...] = (1 * MiB, 4 * MiB, 25 * MiB, 100 * MiB)


@dataclass(frozen=True, kw_only=True)
class Option:
    """One choice to score: a data-parallel kind and bucket cap (sharded kinds: the unit is the layer), or an
    intra-op candidate (``mesh``: a mesh, its model axes and the data-parallel treatment around them)."""

    kind: DataParallelKind
    bucket_bytes: int
    mesh: MeshOption | None = None
    pipeline: bool = False  # the pipeline planner's stages (data-parallel inside each)

    @property
    def family(self) -> str:
        """``data parallel``, ``intra-op`` or ``pipeline``."""
        if self.pipeline:
            return "pipeline"
        return "data parallel" if self.mesh is None else "intra-op"

    @property
    def name(self) -> str:
        """Short label used in the candidates table."""
        if self.pipeline:
            return "pipeline (stage DP)"
        if self.mesh is not None:
            return self.mesh.name
        if self.kind == "replicate":
            return f"replicate, bucket {_mib(self.bucket_bytes)}"
        return f"{self.kind}, unit = layer"


@dataclass(frozen=True, kw_only=True)
class Scored:
    """A scored option: its plan at the smallest accumulation that fits (or the leanest one tried)."""

    option: Option
    plan: Plan | None  # None: not applicable
    fits: bool
    peak_bytes: int
    reason: str = ""  # why it is not applicable


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:g} MiB"


def options(cluster: Cluster, bucket_sizes: Sequence[int]) -> list[Option]:
    """Every data-parallel candidate: replicate per bucket size, fsdp, and hybrid (scored only on >= 2 nodes)."""
    opts = [Option(kind="replicate", bucket_bytes=b) for b in bucket_sizes]
    return opts + [Option(kind="fsdp", bucket_bytes=0), Option(kind="hybrid", bucket_bytes=0)]


def intra_op_options(meshes: Sequence[MeshOption]) -> list[Option]:
    """The intra-op candidates as options."""
    return [Option(kind="fsdp" if m.fsdp else "replicate", bucket_bytes=DEFAULT_BUCKET_BYTES, mesh=m) for m in meshes]


def micro_options(global_batch: int, dp_degree: int, micro_batch: int | None) -> list[int]:
    """Accumulation steps to try, fewest first: powers of two (and the largest one) that split the batch."""
    if micro_batch is not None:
        return [0]  # the caller's micro-batch decides
    if global_batch % dp_degree:
        raise PlaitError(
            f"global batch {global_batch} does not split over {dp_degree} data-parallel ranks; "
            f"use a multiple of {dp_degree} (e.g. {dp_degree * max(1, global_batch // dp_degree)})"
        )
    per_rank = global_batch // dp_degree
    counts = [n for n in (1 << k for k in range(per_rank.bit_length())) if per_rank % n == 0]
    return counts + ([per_rank] if counts[-1] != per_rank else [])


def score(
    graph: ModelGraph,
    cluster: Cluster,
    option: Option,
    *,
    global_batch: int,
    micro_batch: int | None,
    cost: CostModel,
    limit: int,
    optimizer: str,
    precision: PrecisionPolicy | None = None,
    source: ModelSource | None = None,
    intra_op: IntraOpOptions | None = None,
    mesh: MeshSpec | None = None,
) -> Scored:
    """Build and simulate ``option`` with the fewest micro-batches whose peak memory fits ``limit``, first
    without and then with activation recomputation."""
    if option.mesh is not None or option.pipeline:
        floor = state_floor(graph, cluster, optimizer)
        if floor > limit:  # no sharding or pipeline can fit it: skip the captures, the ILPs and the stage search
            return Scored(option=option, plan=None, fits=False, peak_bytes=floor,
                          reason=f"cannot fit: its parameters and optimizer state alone need {fmt_bytes(floor)} per "
                                 f"device even split over all {cluster.world_size} devices")
    if option.mesh is not None:
        return _score_intra_op(option, cluster, global_batch=global_batch, micro_batch=micro_batch, cost=cost, limit=limit,
                               optimizer=optimizer, precision=precision, source=source, intra_op=intra_op)
    if option.pipeline:
        return _score_pipeline(option, graph, cluster, global_batch=global_batch, micro_batch=micro_batch, cost=cost,
                               limit=limit, optimizer=optimizer, precision=precision, source=source)
    if option.kind == "hybrid" and mesh is not None:
        return Scored(option=option, plan=None, fits=False, peak_bytes=0,
                      reason="not applicable: the mesh is given (fsdp shards over its last axis and replicates over the others)")
    if option.kind == "hybrid" and cluster.num_nodes < 2:
        return Scored(option=option, plan=None, fits=False, peak_bytes=0, reason="not applicable: one node (hybrid replicates across nodes)")
    if global_batch % cluster.world_size:  # the other families may still split it (a resized job's batch stays put)
        return Scored(option=option, plan=None, fits=False, peak_bytes=0,
                      reason=f"not applicable: global batch {global_batch} does not split over {cluster.world_size} "
                             f"data-parallel ranks (a multiple of {cluster.world_size} would)")
    leanest: Plan | None = None
    for n in micro_options(global_batch, cluster.world_size, micro_batch):
        for recompute in (False, True):
            plan = build_dp_plan(
                graph, cluster, kind=option.kind, global_batch=global_batch, bucket_bytes=option.bucket_bytes or MiB,
                micro_batch=micro_batch, num_micro=n or None, cost=cost, optimizer=optimizer, recompute=recompute,
                precision=precision, mesh=mesh,
            )
            assert plan.predicted is not None
            peak = max(plan.predicted.peak_memory_bytes)
            if peak <= limit:
                return Scored(option=option, plan=plan, fits=True, peak_bytes=peak)
            if leanest is None or peak <= max(leanest.predicted.peak_memory_bytes):  # type: ignore[union-attr]
                leanest = plan
    assert leanest is not None and leanest.predicted is not None
    return Scored(option=option, plan=leanest, fits=False, peak_bytes=max(leanest.predicted.peak_memory_bytes))


def state_floor(graph: ModelGraph, cluster: Cluster, optimizer: str) -> int:
    """Bytes per device that parameters and optimizer state need at the least: split evenly over every device
    (gradients, activations and buffers come on top in any plan)."""
    total = graph.param_bytes * (1 + OPTIMIZER_STATES[optimizer])
    return -(-total // cluster.world_size)


def _score_intra_op(option: Option, cluster: Cluster, *, global_batch: int, micro_batch: int | None, cost: CostModel,
                    limit: int, optimizer: str, precision: PrecisionPolicy | None, source: ModelSource | None,
                    intra_op: IntraOpOptions | None) -> Scored:
    assert option.mesh is not None
    if source is None:
        return Scored(option=option, plan=None, fits=False, peak_bytes=0,
                      reason="not applicable: intra-op planning captures the model's op graph; give an nn.Module, not a ModelGraph")
    dp = option.mesh.dp_degree
    if global_batch % dp:
        return Scored(option=option, plan=None, fits=False, peak_bytes=0,
                      reason=f"not applicable: global batch {global_batch} does not split over {dp} data-parallel ranks")
    counts = [max(1, global_batch // (dp * micro_batch))] if micro_batch else micro_options(global_batch, dp, None)
    found = score_mesh(option.mesh, source, cluster, global_batch=global_batch, micro_counts=counts, cost=cost, limit=limit,
                       optimizer=optimizer, precision=resolve_precision(precision, cluster), options=intra_op or IntraOpOptions())
    return Scored(option=option, plan=found.plan, fits=found.fits, peak_bytes=found.peak_bytes, reason=found.reason)


def _score_pipeline(option: Option, graph: ModelGraph, cluster: Cluster, *, global_batch: int, micro_batch: int | None,
                    cost: CostModel, limit: int, optimizer: str, precision: PrecisionPolicy | None,
                    source: ModelSource | None) -> Scored:
    """The pipeline planner's best plan of at least two stages on submeshes of one size (what the runtime runs),
    for a model whose forward is the chain of its layers (checked on the module when it is given)."""
    from plait.graph.chain import chain_problem
    from plait.planners.pipeline import PipelineOptions
    from plait.planners.pipeline_plan import plan_pipeline_full
    from plait.planners.stage_dp import StageError

    if cluster.world_size < 2 or len(graph.layers) < 2:
        return Scored(option=option, plan=None, fits=False, peak_bytes=0,
                      reason="not applicable: a pipeline needs at least two devices and two layers")
    names = tuple(layer.name for layer in graph.layers)
    problem = None if source is None else source.kept(("chain problem", names), partial(
        chain_problem, source.model, source.example_batch, names, source.loss_fn))
    if problem is not None:
        return Scored(option=option, plan=None, fits=False, peak_bytes=0, reason=f"not applicable: {problem}")
    policy = resolve_precision(precision, cluster)
    options = PipelineOptions(memory_fraction=limit / cluster.device.memory_bytes, optimizer=optimizer, same_size=True,
                              min_stages=2, rank_micro_batch=micro_batch, compute_dtype=policy.compute_dtype)
    try:
        plan = plan_pipeline_full(graph, cluster, global_batch=global_batch, cost=cost, options=options,
                                  precision=policy, source=source)
    except StageError as exc:
        return Scored(option=option, plan=None, fits=False, peak_bytes=0, reason=f"does not fit: {exc}")
    assert plan.predicted is not None
    peak = max(plan.predicted.peak_memory_bytes)
    return Scored(option=option, plan=plan, fits=peak <= limit, peak_bytes=peak)
