"""A pipeline Plan from the pipeline planner's choice: stages on their submeshes, parameters placed on their
stage's mesh, the schedule and micro-batching, per-stage programs and the simulator's prediction.

Stages on submeshes of one size make the plan's mesh ``pp x dp`` (stage ``s`` holds ranks
``s * dp .. s * dp + dp - 1``, each data-parallel rank takes its share of every micro-batch); stages of
different sizes keep the mesh flat (one ``world`` axis, the batch not split on it: each stage splits every
micro-batch over its own ``dp`` axis, see ``StageSpec.stage_mesh``).
"""

from __future__ import annotations

import time
from dataclasses import replace

from plait.cluster.spec import Cluster
from plait.cost import CostModel
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import (
    BatchSpec,
    LayerPlan,
    MeshSpec,
    ParamPlan,
    Plan,
    PrecisionPolicy,
    ScheduleSpec,
    StageSpec,
    SyncSpec,
)
from plait.plan.placement import REPLICATE, shard
from plait.planners.data_parallel import provenance_of
from plait.planners.pipeline import PipelineChoice, PipelineOptions, plan_pipeline
from plait.sim import simulate

FP32 = PrecisionPolicy()
DEFAULT_OPTIONS = PipelineOptions()


def pipeline_stages(graph: ModelGraph, choice: PipelineChoice) -> tuple[StageSpec, ...]:
    """One StageSpec per chosen stage: its layers' names, its ranks on a ``dp`` axis, its recomputation."""
    return tuple(
        StageSpec(index=i, layers=tuple(layer.name for layer in graph.layers[a:b]), ranks=ranks,
                  mesh=MeshSpec(shape=(len(ranks),), axes=("dp",)), recompute=stage.config == 1)
        for i, ((a, b), ranks, stage) in enumerate(zip(choice.layer_ranges, choice.stage_ranks, choice.solution.stages,
                                                       strict=True))
    )


def pipeline_params(graph: ModelGraph, choice: PipelineChoice) -> tuple[ParamPlan, ...]:
    """Every parameter replicated over its stage's ranks, its gradient all-reduced there (when it has several)."""
    out = []
    for p in graph.params:
        stage = next(i for i, (a, b) in enumerate(choice.layer_ranges) if a <= p.layer < b)
        several = len(choice.stage_ranks[stage]) > 1
        sync = SyncSpec(kind="allreduce", axes=("dp",)) if several else SyncSpec(kind="none")
        out.append(ParamPlan(name=p.name, placements=(REPLICATE,), sync=sync, stage=stage))
    return tuple(out)


def pipeline_mesh(choice: PipelineChoice, global_batch: int) -> tuple[MeshSpec, BatchSpec]:
    """The plan's mesh and batch: ``pp x dp`` when the stages share one size, else a flat ``world`` axis."""
    sizes = {len(r) for r in choice.stage_ranks}
    world = sum(len(r) for r in choice.stage_ranks)
    if len(sizes) == 1:
        (dp,) = sizes
        mesh = MeshSpec(shape=(len(choice.stage_ranks), dp), axes=("pp", "dp"))
        batch = BatchSpec(global_size=global_batch, micro_size=choice.micro_size // dp, num_micro=choice.num_micro,
                          placements=(REPLICATE, shard(0)))
        return mesh, batch
    batch = BatchSpec(global_size=global_batch, micro_size=choice.micro_size, num_micro=choice.num_micro,
                      placements=(REPLICATE,))
    return MeshSpec(shape=(world,), axes=("world",)), batch


def build_pipeline_plan(graph: ModelGraph, cluster: Cluster, choice: PipelineChoice, *, global_batch: int, cost: CostModel,
                        schedule: str = "1f1b", optimizer: str = "adamw",
                        precision: PrecisionPolicy = FP32) -> Plan:
    """The Plan of ``choice`` under ``schedule`` (``1f1b`` or ``gpipe``), with the simulator's prediction."""
    mesh, batch = pipeline_mesh(choice, global_batch)
    stages = pipeline_stages(graph, choice)
    recompute = {name for s in stages if s.recompute for name in s.layers}
    plan = Plan(
        model=graph, cluster=cluster, mesh=mesh, batch=batch, params=pipeline_params(graph, choice), precision=precision,
        layers=tuple(LayerPlan(name=layer.name, recompute=layer.name in recompute) for layer in graph.layers),
        schedule=ScheduleSpec(kind=schedule, num_microbatches=choice.num_micro), stages=stages,
        programs=choice.programs(schedule), optimizer=optimizer,
    )
    return replace(plan, predicted=simulate(plan, cost).prediction)


def plan_pipeline_full(graph: ModelGraph, cluster: Cluster, *, global_batch: int, cost: CostModel,
                       options: PipelineOptions = DEFAULT_OPTIONS, schedule: str = "1f1b",
                       precision: PrecisionPolicy = FP32) -> Plan:
    """Search a pipeline (``plan_pipeline``) and return it as a complete Plan with its provenance."""
    t0 = time.perf_counter()
    choice = plan_pipeline(graph, cluster, global_batch=global_batch, cost=cost, options=options)
    t1 = time.perf_counter()
    plan = build_pipeline_plan(graph, cluster, choice, global_batch=global_batch, cost=cost, schedule=schedule,
                               optimizer=options.optimizer, precision=precision)
    t2 = time.perf_counter()
    provenance = provenance_of("plait.planners.pipeline", search_s=t2 - t0,
                               passes={"stage_dp": t1 - t0, "lower_and_simulate": t2 - t1},
                               options={"global_batch": str(global_batch), "schedule": schedule,
                                        "micro_batches": ",".join(str(m) for m in options.micro_batches),
                                        "same_size": str(options.same_size), "memory_fraction": str(options.memory_fraction)})
    return replace(plan, provenance=provenance)
