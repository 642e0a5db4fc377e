"""Automatic choice: enumerate data-parallel, intra-op and pipeline candidates, score each by simulation, keep the fastest that fits."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from plait.cluster import Cluster, load_cluster
from plait.cost import CostModel
from plait.errors import NoFeasiblePlanError, PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import MeshSpec, Plan, PrecisionPolicy
from plait.planners.candidates import DEFAULT_BUCKET_SIZES, Option, intra_op_options, options, score
from plait.planners.data_parallel import DP_KINDS, DataParallelKind, provenance_of, resolve_precision
from plait.planners.explain import explain, infeasible_message, winner_of
from plait.planners.intra_op.planner import IntraOpOptions
from plait.planners.intra_op.search import mesh_options
from plait.planners.intra_op.source import ModelSource
from plait.planners.sync_lowering import sync_scored
from plait.planners.sync_strategies import SyncBuilder, param_roles, sync_builder

FAMILIES = ("data-parallel", "intra-op", "pipeline")


def _graph_of(model_or_graph: Any, example_batch: Any, loss_fn: Any, name: str | None, policy: PrecisionPolicy,
              with_ops: bool = False) -> ModelGraph:
    if isinstance(model_or_graph, ModelGraph):
        return model_or_graph
    if example_batch is None:
        raise PlaitError("planning a module needs an example batch (real or meta tensors) to capture it with")
    from plait.graph import capture

    return capture(model_or_graph, example_batch, name=name, loss_fn=loss_fn, with_ops=with_ops, autocast=_autocast(policy))


def _autocast(policy: PrecisionPolicy) -> str | None:
    """The dtype captures run under: the compute dtype of mixed precision."""
    return policy.compute_dtype if policy.mixed else None


def _source_of(model_or_graph: Any, example_batch: Any, loss_fn: Any, name: str | None, graph: ModelGraph,
               policy: PrecisionPolicy) -> ModelSource | None:
    """The module to capture again for intra-op candidates (None for a ModelGraph)."""
    if isinstance(model_or_graph, ModelGraph):
        return None
    return ModelSource(model=model_or_graph, example_batch=example_batch, batch_size=graph.batch_size, loss_fn=loss_fn,
                       name=name or graph.name, autocast=_autocast(policy))


def plan(
    model_or_graph: Any,
    example_batch: Any,
    cluster: Cluster | str | os.PathLike[str],
    *,
    global_batch: int | None = None,
    micro_batch: int | None = None,
    cost: CostModel | None = None,
    bucket_sizes: Sequence[int] | None = None,
    memory_fraction: float = 0.9,
    optimizer: str = "adamw",
    loss_fn: Callable[..., Any] | None = None,
    name: str | None = None,
    precision: PrecisionPolicy | str | None = None,
    families: Sequence[str] | None = None,
    meshes: Sequence[MeshSpec] | None = None,
    force_batch_axis: str | None = None,
    intra_op: IntraOpOptions | None = None,
    dp_kinds: Sequence[DataParallelKind] = DP_KINDS,
    progress: Callable[[str], None] | None = None,
    sync: str | SyncBuilder | None = None,
    source: ModelSource | None = None,
) -> Plan:
    """Choose the fastest plan that fits each device's memory, and explain the choice.

    ``model_or_graph`` is an ``nn.Module`` (captured with ``example_batch`` and ``loss_fn``) or a
    ModelGraph (data-parallel candidates only: intra-op planning captures the module's op graph). The
    global batch defaults to the captured batch on every rank (captured batch x world size).
    ``precision`` is ``fp32``, ``bf16`` (bf16 compute, fp32 master weights and gradient reduction) or a
    PrecisionPolicy; by default bf16 on GPUs and fp32 on CPUs. ``families`` restricts the search to
    ``data-parallel``, ``intra-op`` and/or ``pipeline`` candidates (default: every family that applies; a
    ModelGraph plans data-parallel, and a pipeline only when asked for, since only the module shows that its
    layers form a chain); ``meshes`` gives the intra-op meshes to try (every
    role of their axes; by default a model axis of 2, 4, ... ranks inside a node), ``force_batch_axis``
    keeps one axis data-parallel, ``intra_op`` holds the ILP's options. ``dp_kinds`` limits how parameters
    meet on data-parallel axes: ``replicate`` (all-reduce), ``fsdp`` and ``hybrid`` (sharded parameters,
    gradients and optimizer state, ZeRO-3); ``("fsdp",)`` is the prefer-reduce-scatter option. Every
    candidate weighed is in ``plan.candidates``; ``progress`` is told which candidate is being scored.
    ``sync`` (a strategy builder or its name, see ``sync_strategies``) synchronises the replicated data-parallel
    candidates per parameter (default: the wait-free all-reduce); a module is then captured with its ops, which
    tell the builders each parameter's role. ``source`` is ``model_or_graph`` with its example batch as a ModelSource
    the caller keeps (``plait.planners.replan_cache``): its captures and the ILP results it keeps are reused by every
    plan given it. Raises NoFeasiblePlanError when none fits.
    """
    t0 = time.perf_counter()
    if not 0 < memory_fraction <= 1:
        raise PlaitError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    cluster = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    policy = resolve_precision(precision, cluster)
    builder = sync_builder(sync) if isinstance(sync, str) else sync
    if source is not None and source.autocast != _autocast(policy):
        raise PlaitError(f"the model source captures under autocast {source.autocast!r}, this plan's precision under "
                         f"{_autocast(policy)!r}; make the source for this precision")
    with_ops = builder is not None
    if source is not None:  # captured as below, once per source
        graph = source.kept(("layer view", with_ops), partial(_graph_of, source.model, source.example_batch,
                                                               source.loss_fn, source.name, policy, with_ops=with_ops))
    else:
        graph = _graph_of(model_or_graph, example_batch, loss_fn, name, policy, with_ops=with_ops)
    roles = param_roles(graph, None if isinstance(model_or_graph, ModelGraph) else model_or_graph) if builder else None
    t1 = time.perf_counter()
    cost = cost or CostModel(cluster)
    if global_batch is None:
        global_batch = (micro_batch or graph.batch_size) * cluster.world_size
    limit = int(cluster.device.memory_bytes * memory_fraction)
    sizes = tuple(bucket_sizes) if bucket_sizes else DEFAULT_BUCKET_SIZES
    asked = families is not None
    families = tuple(families) if families is not None else FAMILIES
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        raise PlaitError(f"unknown plan families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    unknown_kinds = set(dp_kinds) - set(DP_KINDS)
    if unknown_kinds or not dp_kinds:
        raise PlaitError(f"unknown data-parallel kinds {sorted(unknown_kinds)}; choose from {', '.join(DP_KINDS)}")
    if builder is not None and ("data-parallel" not in families or "replicate" not in dp_kinds):
        raise PlaitError(f"sync strategy {builder.name!r} applies to replicated data-parallel candidates; search the "
                         "data-parallel family with the replicate kind, or leave the sync strategy out")
    source = source if source is not None else _source_of(model_or_graph, example_batch, loss_fn, name, graph, policy)
    if source is None and "intra-op" in families:
        if "data-parallel" not in families:
            raise PlaitError("intra-op planning captures the model's op graph: give the nn.Module (with an example batch), "
                             "not a ModelGraph")
        families = tuple(f for f in families if f != "intra-op")  # a ModelGraph plans data-parallel only
    if source is None and not asked:
        families = tuple(f for f in families if f != "pipeline")
    candidates = [o for o in options(cluster, sizes) if o.kind in dp_kinds] if "data-parallel" in families else []
    if "intra-op" in families:
        max_axes = (intra_op or IntraOpOptions()).max_model_axes
        sharded = [f for f in (False, True) if ("fsdp" if f else "replicate") in dp_kinds]
        candidates += intra_op_options(mesh_options(cluster, meshes, force_batch_axis=force_batch_axis, fsdp=sharded,
                                                    max_model_axes=max_axes))
    if "pipeline" in families:
        candidates.append(Option(kind="replicate", bucket_bytes=0, pipeline=True))
    scored = []
    for k, option in enumerate(candidates):
        if progress is not None:
            progress(f"candidate {k + 1}/{len(candidates)}: {option.name}")
        scored.append(score(graph, cluster, option, global_batch=global_batch, micro_batch=micro_batch, cost=cost, limit=limit,
                            optimizer=optimizer, precision=policy, source=source, intra_op=intra_op,
                            mesh=meshes[0] if meshes and len(meshes) == 1 else None))
        if builder is not None:
            scored[-1] = sync_scored(scored[-1], graph, builder, cost=cost, roles=roles, limit=limit)
    t2 = time.perf_counter()
    best = winner_of(scored)
    if best is None:
        raise NoFeasiblePlanError(infeasible_message(graph, cluster, scored, limit, memory_fraction))
    assert best.plan is not None
    t3 = time.perf_counter()
    provenance = provenance_of(
        "plait.planners.auto",
        search_s=t3 - t0,
        passes={"capture": t1 - t0, "score_candidates": t2 - t1, "choose": t3 - t2},
        options={
            "global_batch": str(global_batch),
            "micro_batch": str(micro_batch),
            "memory_fraction": str(memory_fraction),
            "optimizer": optimizer,
            "precision": f"{policy.compute_dtype} compute, {policy.param_dtype} parameters, {policy.reduce_dtype} reduction",
            "bucket_sizes": ",".join(str(s) for s in sizes),
            "families": ",".join(families),
            "dp_kinds": ",".join(dp_kinds),
            **({"sync": builder.name} if builder is not None else {}),
        },
    )
    return replace(best.plan, candidates=explain(scored, limit), provenance=provenance)
