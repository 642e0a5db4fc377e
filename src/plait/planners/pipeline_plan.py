"""A pipeline Plan from the pipeline planner's choice: stages on their submeshes, parameters and pinned
activations placed on their stage's mesh, the schedule and micro-batching, per-stage programs and the
simulator's prediction.

A stage's mesh is ``dp`` over its ranks, or ``dp x tp`` (row-major) when it shards its layers over ``tp``
ranks with the intra-op ILP's choice. Stages on meshes of one shape make the plan's mesh ``pp x dp (x tp)``
(stage ``s`` holds the ``s``-th block of ranks, each data-parallel replica takes its share of every
micro-batch); other pipelines keep the plan's mesh flat (one ``world`` axis, the batch not split on it:
each stage splits every micro-batch over its own ``dp`` axis, see ``StageSpec.stage_mesh``).
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import replace
from functools import partial

from plait.cluster.spec import Cluster
from plait.cost import CostModel
from plait.errors import PlaitError
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import (
    ActivationPlan,
    BatchSpec,
    LayerPlan,
    MeshSpec,
    ParamPlan,
    Plan,
    PrecisionPolicy,
    RankProgram,
    ScheduleSpec,
    StageSpec,
    SyncKind,
    SyncSpec,
)
from plait.plan.placement import REPLICATE, Placement, shard
from plait.planners.data_parallel import provenance_of
from plait.planners.intra_op.planner import IntraOpOptions
from plait.planners.intra_op.propagate import PropagationError
from plait.planners.intra_op.source import ModelSource
from plait.planners.intra_op.strategies import UnsupportedOpError
from plait.planners.pipeline import PipelineChoice, PipelineOptions, plan_pipeline
from plait.planners.stage_configs import ShardedLayers, shard_layers, tensor_parallel_sizes
from plait.planners.stage_dp import StageError
from plait.sim import simulate

FP32 = PrecisionPolicy()
DEFAULT_OPTIONS = PipelineOptions()
SCHEDULES = ("1f1b", "zero-bubble")  # what a pipeline plan is simulated under when the caller does not fix it
LIST_DRIVEN = ("zero-bubble",)  # schedules the runtime runs from the plan's pass lists
INTERLEAVED = "interleaved-1f1b"  # a pipeline's variants with model chunks per rank run this


def fastest_that_fits(plans: list[Plan], limit: float) -> Plan:
    """The plan with the least predicted step among those whose predicted peak fits ``limit`` (else all)."""
    fits = [p for p in plans if p.predicted is not None and max(p.predicted.peak_memory_bytes) <= limit]
    return min(fits or plans, key=lambda p: p.predicted.step_s if p.predicted else float("inf"))


def stage_mesh(ranks: int, tp: int) -> MeshSpec:
    """A stage's mesh: ``dp`` over its ranks, or ``dp x tp``."""
    if tp == 1:
        return MeshSpec(shape=(ranks,), axes=("dp",))
    return MeshSpec(shape=(ranks // tp, tp), axes=("dp", "tp"))


def pipeline_stages(graph: ModelGraph, choice: PipelineChoice) -> tuple[StageSpec, ...]:
    """One StageSpec per chosen (virtual) stage: its layers' names, its ranks and mesh, its recomputation."""
    out, p = [], len(choice.stage_ranks)
    for i, (a, b) in enumerate(choice.layer_ranges):
        config, ranks = choice.configs[i], choice.stage_ranks[i % p]
        out.append(StageSpec(index=i, layers=tuple(layer.name for layer in graph.layers[a:b]), ranks=ranks,
                             mesh=stage_mesh(len(ranks), config.tp), recompute=config.recompute,
                             send_placements=send_placements(graph.layers[b - 1].output_shape, choice.work[i].send_split)))
    return tuple(out)


def send_placements(shape: tuple[int, ...], split: int) -> tuple[Placement, ...]:
    """A sliced boundary as placements on a ``dp x tp`` stage mesh: split along the first dim after the batch
    that divides evenly (a GPT's sequence); empty when the boundary crosses whole."""
    if split == 1:
        return ()
    dim = next((d for d in range(1, len(shape)) if shape[d] % split == 0), None)
    if dim is None:
        raise ValueError(f"a boundary of shape {list(shape)} cannot be sent as {split} slices")
    return (REPLICATE, shard(dim))


def pipeline_params(graph: ModelGraph, choice: PipelineChoice, stages: tuple[StageSpec, ...]) -> tuple[ParamPlan, ...]:
    """Every parameter on its stage's mesh: replicated over ``dp`` (gradients all-reduced there), on ``tp`` as
    the ILP placed it."""
    out = []
    for p in graph.params:
        stage = next(i for i, (a, b) in enumerate(choice.layer_ranges) if a <= p.layer < b)
        mesh, tp = stages[stage].stage_mesh, choice.configs[stage].tp
        model = choice.sharded[tp].placements.get(p.name, (REPLICATE,)) if tp > 1 else ()
        placements = (REPLICATE, *model)
        kind: SyncKind = "allreduce" if mesh.axis_size("dp") > 1 else "none"
        out.append(ParamPlan(name=p.name, placements=placements, sync=SyncSpec(kind=kind, axes=("dp",) if kind != "none" else ()),
                             stage=stage))
    return tuple(out)


def pipeline_pins(choice: PipelineChoice, stages: tuple[StageSpec, ...]) -> tuple[ActivationPlan, ...]:
    """The ILP's pinned activations of the modules of tensor-parallel stages, on their stage's mesh (batch
    split on ``dp``)."""
    out = []
    for stage, config in zip(stages, choice.configs, strict=True):
        if config.tp == 1:
            continue
        sharded = choice.sharded[config.tp]
        for key, placements in sorted(sharded.solved.pins.items()):
            b = sharded.joint.boundaries[key]
            if b.module and any(b.module == n or b.module.startswith(n + ".") for n in stage.layers):
                out.append(ActivationPlan(module=b.module, port=b.port, index=b.index,
                                          placements=(shard(0), *placements)))
    return tuple(out)


def pipeline_mesh(stages: tuple[StageSpec, ...], choice: PipelineChoice, global_batch: int) -> tuple[MeshSpec, BatchSpec]:
    """The plan's mesh and batch: ``pp x`` the stage mesh when every stage has the same, else a flat ``world`` axis."""
    meshes = {s.stage_mesh for s in stages}
    micro, n = choice.micro_size, choice.num_micro
    if len(meshes) == 1:
        (mesh,) = meshes
        dp = mesh.axis_size("dp")
        placements: tuple[Placement, ...] = tuple(shard(0) if a == "dp" else REPLICATE for a in mesh.axes)
        return (MeshSpec(shape=(len(choice.stage_ranks), *mesh.shape), axes=("pp", *mesh.axes)),
                BatchSpec(global_size=global_batch, micro_size=micro // dp, num_micro=n, placements=(REPLICATE, *placements)))
    world = sum(len(r) for r in choice.stage_ranks)
    return (MeshSpec(shape=(world,), axes=("world",)),
            BatchSpec(global_size=global_batch, micro_size=micro, num_micro=n, placements=(REPLICATE,)))


def build_pipeline_plan(graph: ModelGraph, cluster: Cluster, choice: PipelineChoice, *, global_batch: int, cost: CostModel,
                        schedule: str = "1f1b", optimizer: str = "adamw",
                        precision: PrecisionPolicy = FP32, programs: tuple[RankProgram, ...] | None = None,
                        token_slices: tuple[int, ...] | None = None) -> Plan:
    """The Plan of ``choice`` under ``schedule`` (``1f1b`` or ``gpipe``), with the simulator's prediction; ``programs``
    replaces the schedule's lowering (a token pipeline's, with its ``token_slices``)."""
    stages = pipeline_stages(graph, choice)
    mesh, batch = pipeline_mesh(stages, choice, global_batch)
    recompute = {name for s in stages if s.recompute for name in s.layers}
    plan = Plan(
        model=graph, cluster=cluster, mesh=mesh, batch=batch, params=pipeline_params(graph, choice, stages),
        activations=pipeline_pins(choice, stages), precision=precision,
        layers=tuple(LayerPlan(name=layer.name, recompute=layer.name in recompute) for layer in graph.layers),
        schedule=ScheduleSpec(kind=schedule, num_microbatches=choice.num_micro, token_slices=token_slices), stages=stages,
        programs=programs if programs is not None else _programs(choice, schedule), optimizer=optimizer,
    )
    return replace(plan, predicted=simulate(plan, cost).prediction)


def _programs(choice: PipelineChoice, schedule: str) -> tuple[RankProgram, ...]:
    """The choice's programs; torch's list-driven runtime (the zero-bubble schedule) keeps the last stage's
    outputs until the step ends whatever ``return_outputs`` says (measured by bench/pipeline_fidelity.py)."""
    if schedule in LIST_DRIVEN:
        choice = replace(choice, keep_outputs=True)
    return choice.programs(schedule)


def _schedules(choice: PipelineChoice, schedule: str | None) -> list[tuple[PipelineChoice, str]]:
    """The (pipeline, schedule) pairs to simulate: ``schedule`` if fixed, else 1F1B, zero-bubble and the interleaved
    variants; ``PlaitError`` when the fixed schedule cannot run this pipeline."""
    interleaved = [(v, INTERLEAVED) for v in choice.variants]
    if schedule is None:
        return [(choice, s) for s in SCHEDULES] + interleaved
    if schedule != INTERLEAVED:
        return [(choice, schedule)]
    if not interleaved:
        raise PlaitError(f"the chosen pipeline ({len(choice.stage_ranks)} stages, {choice.num_micro} micro-batches) "
                         f"cannot be interleaved: it needs at least 2 stages of one size, micro-batches a multiple of "
                         f"the stages and a layer per model chunk; choose another schedule")
    return interleaved


def sharded_layers(source: ModelSource, cluster: Cluster, cost: CostModel, *, tp_sizes: tuple[int, ...], joint_batch: int,
                   precision: PrecisionPolicy, optimizer: str) -> dict[int, ShardedLayers]:
    """The ILP's tensor-parallel layers for each size (none when the model's ops cannot be sharded), kept by the
    source: a re-plan on more or fewer nodes of the same kind reuses them."""
    from plait.planners.replan_cache import cost_key

    out: dict[int, ShardedLayers] = {}
    for tp in tp_sizes:
        key = ("sharded_layers", tp, joint_batch, precision, optimizer, cost_key(cost))
        try:
            out[tp] = source.kept(key, partial(shard_layers, source, cluster, cost, tp=tp, joint_batch=joint_batch,
                                               precision=precision, optimizer=optimizer, options=IntraOpOptions()))
        except (UnsupportedOpError, PropagationError):
            return {}
    return out


def plan_pipeline_full(graph: ModelGraph, cluster: Cluster, *, global_batch: int, cost: CostModel,
                       options: PipelineOptions = DEFAULT_OPTIONS, schedule: str | None = None,
                       precision: PrecisionPolicy = FP32, source: ModelSource | None = None) -> Plan:
    """Search a pipeline (``plan_pipeline``) and return it as a complete Plan with its provenance. With the
    model's ``source``, stages may also shard their layers over ``options.tp_sizes`` ranks (default: 2, 4, ...
    up to a node) as the intra-op ILP chooses. ``schedule`` fixes the schedule; by default the chosen stages are
    simulated under 1F1B, the zero-bubble schedule and interleaved 1F1B (``options.chunks`` model chunks per rank,
    where the stages allow) and the fastest that fits wins."""
    t0 = time.perf_counter()
    allowed = options.tp_sizes
    sizes = tensor_parallel_sizes(cluster) if allowed is None else tuple(t for t in allowed if t > 1)
    sharded = sharded_layers(source, cluster, cost, tp_sizes=sizes, joint_batch=graph.batch_size, precision=precision,
                             optimizer=options.optimizer) if source is not None and sizes else {}
    t1 = time.perf_counter()
    choice = plan_pipeline(graph, cluster, global_batch=global_batch, cost=cost, options=options, sharded=sharded)
    t2 = time.perf_counter()
    limit = options.memory_fraction * cluster.device.memory_bytes
    plans = [build_pipeline_plan(graph, cluster, c, global_batch=global_batch, cost=cost, schedule=s,
                                 optimizer=options.optimizer, precision=precision) for c, s in _schedules(choice, schedule)]
    plan = fastest_that_fits(plans, limit)
    t3 = time.perf_counter()
    tokens = _token_plan(graph, cluster, choice, plan, global_batch=global_batch, cost=cost, options=options,
                         schedule=schedule, precision=precision, source=source, limit=limit)
    plan = tokens or plan
    t4 = time.perf_counter()
    provenance = provenance_of("plait.planners.pipeline", search_s=t4 - t0,
                               passes={"tensor_parallel_ilp": t1 - t0, "stage_dp": t2 - t1, "lower_and_simulate": t3 - t2,
                                       "token_slicing": t4 - t3},
                               options={"global_batch": str(global_batch), "schedule": plan.schedule.kind,
                                        "micro_batches": ",".join(str(m) for m in options.micro_batches) or "auto",
                                        "tp_sizes": ",".join(str(t) for t in (1, *sorted(sharded))),
                                        "same_size": str(options.same_size), "memory_fraction": str(options.memory_fraction),
                                        "token_slicing": str(_token_slicing_on(options))})
    return replace(plan, provenance=provenance)


def _token_slicing_on(options: PipelineOptions) -> bool:
    """Whether the search offers token slicing: as the options say, else as the planning's context does."""
    from plait.planners.pipeline_tokens import token_slicing_enabled

    return token_slicing_enabled() if options.token_slicing is None else options.token_slicing


def _token_plan(graph: ModelGraph, cluster: Cluster, choice: PipelineChoice, best: Plan, *, global_batch: int,
                cost: CostModel, options: PipelineOptions, schedule: str | None, precision: PrecisionPolicy,
                source: ModelSource | None, limit: float) -> Plan | None:
    """The chosen stages token-sliced (``plait.planners.pipeline_tokens``) when that is on, applies, fits and is
    predicted faster than ``best``; its schedule records ``best``'s step (None otherwise). Stages with tensor
    parallelism are sliced as they are, and (where the options allow stages without it) searched again without it
    and sliced too: the faster sliced plan wins."""
    from plait.planners.pipeline_tokens import MIN_BUBBLE, token_variant

    if schedule not in (None, "gpipe") or not _token_slicing_on(options) or best.predicted is None:
        return None
    if best.predicted.bubble_fraction < MIN_BUBBLE:  # slicing removes bubble; too little to win back its overheads
        return None
    choices = [choice]
    if any(c.tp > 1 for c in choice.configs) and (options.tp_sizes is None or 1 in options.tp_sizes):
        with suppress(StageError):
            choices.append(plan_pipeline(graph, cluster, global_batch=global_batch, cost=cost,
                                         options=replace(options, tp_sizes=(1,), simulate_top=1, chunks=())))

    def build(chosen: PipelineChoice, programs: tuple[RankProgram, ...], cuts: tuple[int, ...]) -> Plan:
        return build_pipeline_plan(graph, cluster, chosen, global_batch=global_batch, cost=cost,
                                   schedule="gpipe", optimizer=options.optimizer, precision=precision,
                                   programs=programs, token_slices=cuts)

    found = [token_variant(graph, c, source=source, cost=cost, dtype=precision.compute_dtype, build=build).plan
             for c in choices]
    sliced = [p for p in found if p is not None and p.predicted is not None
              and max(p.predicted.peak_memory_bytes) <= limit and p.predicted.step_s < best.predicted.step_s]
    if not sliced:
        return None
    fastest = fastest_that_fits(sliced, limit)
    return replace(fastest, schedule=replace(fastest.schedule, unsliced_step_s=best.predicted.step_s))
