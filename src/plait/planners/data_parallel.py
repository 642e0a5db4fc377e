"""Build a complete data-parallel Plan for one fixed choice: replicated, fully sharded (FSDP2) or hybrid."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata

from plait.cluster.spec import Cluster
from plait.cost import CostModel, check_optimizer
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import (
    BatchSpec,
    DataParallelKind,
    DataParallelSpec,
    MeshSpec,
    ParamPlan,
    Plan,
    Provenance,
    SyncSpec,
)
from plait.planners.buckets import DEFAULT_BUCKET_BYTES, make_buckets
from plait.planners.lowering import lower_replicate, lower_sharded
from plait.sim import simulate

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


def dp_spec(graph: ModelGraph, kind: DataParallelKind, mesh: MeshSpec, bucket_bytes: int) -> DataParallelSpec:
    """Buckets (replicate) or shard units (fsdp/hybrid; the bucket is the unit, so its size is recorded)."""
    if bucket_bytes < 1:
        raise PlaitError(f"bucket size must be a positive number of bytes, got {bucket_bytes}")
    if kind == "replicate":
        return DataParallelSpec(
            kind=kind, replicate_axis="dp", shard_axis=None, bucket_bytes=bucket_bytes, buckets=make_buckets(graph, bucket_bytes)
        )
    units = tuple(layer.name for layer in graph.layers if layer.param_bytes)
    largest = max((layer.param_bytes for layer in graph.layers), default=0)
    return DataParallelSpec(
        kind=kind,
        replicate_axis="dp_replicate" if kind == "hybrid" else None,
        shard_axis="dp_shard" if kind == "hybrid" else "dp",
        bucket_bytes=largest,
        shard_units=units,
    )


def param_plans(graph: ModelGraph, spec: DataParallelSpec, mesh: MeshSpec) -> tuple[ParamPlan, ...]:
    """Placement per mesh axis and gradient sync of every parameter."""
    bucket_of = {name: b.index for b in spec.buckets for name in b.params}
    plans = []
    for p in graph.params:
        placements = tuple("Shard(0)" if axis == spec.shard_axis else "Replicate" for axis in mesh.axes)
        if spec.kind == "replicate":
            sync = SyncSpec(kind="allreduce", axes=mesh.axes, bucket=bucket_of[p.name])
        else:
            sync = SyncSpec(kind="reduce_scatter", axes=mesh.axes)
        plans.append(ParamPlan(name=p.name, placements=placements, sync=sync))
    return tuple(plans)


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
) -> Plan:
    """A complete data-parallel Plan (mesh, batch, buckets or shard units, per-parameter placement and
    sync, the lowered step program) with the simulator's Prediction and provenance."""
    t0 = time.perf_counter()
    check_optimizer(optimizer)
    mesh = dp_mesh(kind, cluster)
    batch = batch_spec(global_batch, mesh.size, micro_batch=micro_batch, num_micro=num_micro)
    spec = dp_spec(graph, kind, mesh, bucket_bytes)
    lower = lower_replicate if kind == "replicate" else lower_sharded
    plan = Plan(
        model=graph.without_ops(),
        cluster=cluster,
        mesh=mesh,
        batch=batch,
        data_parallel=spec,
        params=param_plans(graph, spec, mesh),
        programs=(lower(graph, mesh, batch, spec),),
        optimizer=optimizer,
    )
    t1 = time.perf_counter()
    result = simulate(plan, cost or CostModel(cluster))
    t2 = time.perf_counter()
    provenance = provenance_of(
        "plait.planners.data_parallel",
        search_s=t2 - t0,
        passes={"data_parallel": t1 - t0, "simulate": t2 - t1},
        options={"kind": kind, "bucket_bytes": str(bucket_bytes), "optimizer": optimizer},
    )
    return replace(plan, predicted=result.prediction, provenance=provenance)
