"""Build a complete data-parallel Plan for one fixed choice: replicated, fully sharded (FSDP2) or hybrid (HSDP).

The choice is a planner's word only: the plan it writes holds placements (Replicate or Shard(0) on the
data-parallel axes), sync specs, buckets or shard units, and the runtime reads those.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from typing import Literal

from plait.cluster.spec import Cluster
from plait.cost import CostModel, check_optimizer
from plait.cost.work import layer_work_of
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import (
    BatchSpec,
    Bucket,
    LayerPlan,
    MeshSpec,
    ParamPlan,
    Plan,
    PrecisionPolicy,
    Provenance,
    ShardUnit,
    SyncSpec,
)
from plait.plan.placement import REPLICATE, shard
from plait.planners.buckets import DEFAULT_BUCKET_BYTES, make_buckets
from plait.planners.program import lower_program
from plait.sim import simulate

DataParallelKind = Literal["replicate", "fsdp", "hybrid"]  # the data-parallel options this planner weighs
DP_KINDS: tuple[DataParallelKind, ...] = ("replicate", "fsdp", "hybrid")


def planner_version() -> str:
    """The installed plait version, recorded in each plan's provenance."""
    try:
        return metadata.version("plait")
    except metadata.PackageNotFoundError:
        return "unknown"


def provenance_of(planner: str, *, search_s: float, passes: dict[str, float], options: dict[str, str]) -> Provenance:
    """The provenance of a plan made now by ``planner`` (this plait's version, UTC timestamp)."""
    return Provenance(
        planner=planner,
        version=planner_version(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        search_s=search_s,
        passes=passes,
        options=options,
    )


def dp_mesh(kind: DataParallelKind, cluster: Cluster) -> MeshSpec:
    """1-D ``dp`` mesh for replicate/fsdp; (nodes, devices per node) ``dp_replicate x dp_shard`` for hybrid."""
    if kind == "hybrid":
        if cluster.num_nodes < 2:
            raise PlaitError(
                f"hybrid data parallelism replicates across nodes, but cluster {cluster.name} has one node; "
                "use kind='fsdp' or 'replicate', or a cluster with >= 2 nodes"
            )
        return MeshSpec(shape=(cluster.num_nodes, cluster.devices_per_node), axes=("dp_replicate", "dp_shard"))
    if kind not in DP_KINDS:
        raise PlaitError(f"unknown data-parallel kind {kind!r}; choose one of {', '.join(DP_KINDS)}")
    return MeshSpec(shape=(cluster.world_size,), axes=("dp",))


def batch_spec(global_batch: int, dp_degree: int, *, micro_batch: int | None = None, num_micro: int | None = None) -> BatchSpec:
    """Split ``global_batch`` into micro-batches per rank: global = micro x num_micro x dp degree."""
    if global_batch < 1:
        raise PlaitError(f"the global batch must be a positive integer, got {global_batch}")
    for name, value in (("micro_batch", micro_batch), ("num_micro", num_micro)):
        if value is not None and value < 1:
            raise PlaitError(f"{name} must be a positive integer, got {value}")
    if micro_batch is None:
        n = num_micro or 1
        if global_batch % (n * dp_degree):
            raise PlaitError(
                f"global batch {global_batch} does not split over {dp_degree} data-parallel ranks x {n} "
                f"micro-batches; use a global batch divisible by {n * dp_degree}"
            )
        return BatchSpec(global_size=global_batch, micro_size=global_batch // (n * dp_degree), num_micro=n)
    per_step = micro_batch * dp_degree
    n = num_micro if num_micro is not None else max(1, global_batch // per_step)
    if micro_batch * n * dp_degree != global_batch:
        raise PlaitError(
            f"global batch {global_batch} != micro-batch {micro_batch} x {n} micro-batches x {dp_degree} "
            f"data-parallel ranks; pick a global batch that is a multiple of {per_step}"
        )
    return BatchSpec(global_size=global_batch, micro_size=micro_batch, num_micro=n)


PRECISIONS = {
    "fp32": PrecisionPolicy(),
    "bf16": PrecisionPolicy(param_dtype="fp32", compute_dtype="bf16", reduce_dtype="fp32"),
    "bf16-reduce": PrecisionPolicy(param_dtype="fp32", compute_dtype="bf16", reduce_dtype="bf16"),
}


def resolve_precision(precision: PrecisionPolicy | str | None, cluster: Cluster) -> PrecisionPolicy:
    """A precision policy from a name (``fp32``, ``bf16``: bf16 compute with fp32 master weights and fp32
    gradient reduction, ``bf16-reduce``: also bf16 reduction) or None: bf16 on GPUs, fp32 on CPUs."""
    if isinstance(precision, PrecisionPolicy):
        return precision
    if precision is None:
        return PRECISIONS["bf16" if cluster.device.kind == "cuda" else "fp32"]
    if precision not in PRECISIONS:
        raise PlaitError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def dp_params(graph: ModelGraph, kind: DataParallelKind, mesh: MeshSpec, buckets: tuple[Bucket, ...]) -> tuple[ParamPlan, ...]:
    """Placement per mesh axis and gradient sync of every parameter: Replicate everywhere (all-reduce in its
    bucket) for replicate; Shard(0) on the shard axis (reduce-scatter) for fsdp and hybrid."""
    bucket_of = {name: b.index for b in buckets for name in b.params}
    shard_axis = None if kind == "replicate" else fsdp_axis(mesh)
    plans = []
    for p in graph.params:
        placements = tuple(shard(0) if axis == shard_axis else REPLICATE for axis in mesh.axes)
        if shard_axis is None:
            sync = SyncSpec(kind="allreduce", axes=mesh.axes, bucket=bucket_of[p.name])
        else:
            sync = SyncSpec(kind="reduce_scatter", axes=mesh.axes)
        plans.append(ParamPlan(name=p.name, placements=placements, sync=sync))
    return tuple(plans)


def fsdp_axis(mesh: MeshSpec) -> str:
    """The axis FSDP2 shards over on an all-data-parallel mesh: the last one of more than one rank."""
    return next((a for a, n in zip(reversed(mesh.axes), reversed(mesh.shape), strict=True) if n > 1), mesh.axes[-1])


def shard_units(graph: ModelGraph, *, reshard_after_forward: bool = True) -> tuple[ShardUnit, ...]:
    """One FSDP2 unit per layer of the layer view that has parameters, in layer order."""
    return tuple(ShardUnit(module=layer.name, reshard_after_forward=reshard_after_forward)
                 for layer in graph.layers if layer.param_bytes)


def build_dp_plan(
    graph: ModelGraph,
    cluster: Cluster,
    *,
    kind: DataParallelKind,
    global_batch: int,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    micro_batch: int | None = None,
    num_micro: int | None = None,
    cost: CostModel | None = None,
    optimizer: str = "adamw",
    precision: PrecisionPolicy | str | None = None,
    recompute: bool = False,
    mesh: MeshSpec | None = None,
) -> Plan:
    """A complete data-parallel Plan for one choice (mesh, batch placements, buckets or shard units,
    per-parameter placement and sync, precision, recomputation, the lowered step program) with the
    simulator's Prediction and provenance. ``mesh`` fixes the mesh (every axis data-parallel; fsdp shards
    over its last axis of more than one rank and replicates over the others)."""
    t0 = time.perf_counter()
    check_optimizer(optimizer)
    if bucket_bytes < 1:
        raise PlaitError(f"bucket size must be a positive number of bytes, got {bucket_bytes}")
    if mesh is not None and mesh.size != cluster.world_size:
        raise PlaitError(f"mesh {mesh.shape} has {mesh.size} ranks but cluster {cluster.name} has {cluster.world_size}")
    mesh = mesh or dp_mesh(kind, cluster)
    batch = replace(
        batch_spec(global_batch, mesh.size, micro_batch=micro_batch, num_micro=num_micro),
        placements=tuple(shard(0) for _ in mesh.axes),
    )
    buckets = make_buckets(graph, bucket_bytes) if kind == "replicate" else ()
    plan = Plan(
        model=graph.without_ops(),
        cluster=cluster,
        mesh=mesh,
        batch=batch,
        params=dp_params(graph, kind, mesh, buckets),
        buckets=buckets,
        shard_units=shard_units(graph) if kind != "replicate" else (),
        precision=resolve_precision(precision, cluster),
        layers=tuple(LayerPlan(name=layer.name, recompute=recompute) for layer in graph.layers),
        optimizer=optimizer,
    )
    shard_degree = mesh.axis_size(fsdp_axis(mesh)) if kind != "replicate" else 1
    plan = replace(plan, programs=(lower_program(plan, graph, layer_work_of(graph, plan, shard_degree=shard_degree)),))
    t1 = time.perf_counter()
    result = simulate(plan, cost or CostModel(cluster))
    t2 = time.perf_counter()
    provenance = provenance_of(
        "plait.planners.data_parallel",
        search_s=t2 - t0,
        passes={"data_parallel": t1 - t0, "simulate": t2 - t1},
        options={"kind": kind, "bucket_bytes": str(bucket_bytes), "optimizer": optimizer, "recompute": str(recompute)},
    )
    return replace(plan, predicted=result.prediction, provenance=provenance)
