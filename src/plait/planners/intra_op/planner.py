"""Build a complete intra-op Plan: solve the sharding ILP on the model axes, predict exactly what DTensor does
with the choice, and fill the plan (placements, pins, sync, buckets or FSDP2 units, programs, prediction).

The mesh's data-parallel axes split the batch; each parameter is replicated there (plait's wait-free
buckets) or ``Shard(0)`` on the last one (FSDP2). The model axes are the ILP's: every parameter's
placement and every pinned activation come from its solution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from plait.cluster.spec import Cluster
from plait.cost.memory import OPTIMIZER_STATES, check_optimizer
from plait.cost.work import dtype_ratio
from plait.errors import PlaitError
from plait.graph.joint import JointGraph
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import (
    ActivationPlan,
    LayerPlan,
    MeshSpec,
    ParamPlan,
    Plan,
    PrecisionPolicy,
    ShardUnit,
    SyncKind,
    SyncSpec,
)
from plait.plan.placement import REPLICATE, Placement, shard
from plait.planners.buckets import DEFAULT_BUCKET_BYTES, make_buckets
from plait.planners.data_parallel import batch_spec, provenance_of, resolve_precision
from plait.planners.ilp import ILPSolution, solve_ilp
from plait.planners.intra_op.costs import CostTable, DataParallel
from plait.planners.intra_op.dtensor_bridge import Placements, planning_mesh
from plait.planners.intra_op.problem import IntraOpProblem, ProblemOptions, build_problem, chosen
from plait.planners.intra_op.propagate import Propagation, propagate_plan
from plait.planners.intra_op.strategies import BOUNDARY, Enumerator
from plait.planners.intra_op.work import intra_op_work, local_bytes_of
from plait.planners.program import lower_program
from plait.sim import simulate

SHARE_REPEATS_ABOVE = 1500  # joint-graph nodes above which identical layers share one decision


@dataclass(frozen=True)
class IntraOpOptions:
    """Options of the intra-op planner."""

    forbid: tuple[str, ...] = ()  # collective kinds the plan may not use (e.g. "all_to_all")
    replicated_heavy_ops: bool = True  # False: every matmul/attention split on every model axis (Alpa's rule)
    share_repeated: bool | None = None  # identical layers share one decision (None: when the graph is large)
    time_limit_s: float | None = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    reshard_after_forward: bool = True  # FSDP2 on a data-parallel axis: ZeRO-3 (True) or ZeRO-2-like (False)
    max_model_axes: int = 1  # of a given mesh, how many axes may be model axes at once (a 2-D model mesh is slow to plan)
    batch_on_model_axes: bool = False  # pins may split an activation's batch dim on a model axis (data parallelism in DTensor)


@dataclass(frozen=True)
class Solved:
    """A choice on the model axes (the ILP's, or a layout given by hand) and what DTensor does with it."""

    params: dict[str, Placements]
    pins: dict[int, Placements]
    propagation: Propagation
    solution: ILPSolution | None = None  # None: a layout given by hand
    problem: IntraOpProblem | None = None

    @property
    def summary(self) -> str:
        """The ILP's size and solve time, or where the layout came from."""
        return str(self.solution.stats) if self.solution is not None else "layout given by hand"


def given_layout(joint: JointGraph, mesh: MeshSpec, model_axes: tuple[str, ...], params: dict[str, Placements],
                 pins: dict[int, Placements]) -> Solved:
    """A layout chosen by hand (parameter placements and pins by boundary key, on the model axes), propagated."""
    pmesh = planning_mesh(tuple(mesh.axis_size(a) for a in model_axes), model_axes)
    return Solved(params=dict(params), pins=dict(pins), propagation=propagate_plan(joint, pmesh, params, pins, joint.boundaries))


def solve_model_axes(joint: JointGraph, mesh: MeshSpec, model_axes: tuple[str, ...], cost: object, *,
                     dp: DataParallel, precision: PrecisionPolicy, optimizer: str, options: IntraOpOptions,
                     memory_limit: float | None = None) -> Solved:
    """The ILP on the model axes of ``mesh`` for ``joint`` (captured at the per-rank micro-batch, with markers)."""
    shape = tuple(mesh.axis_size(a) for a in model_axes)
    pmesh = planning_mesh(shape, model_axes)
    share = options.share_repeated if options.share_repeated is not None else len(joint) > SHARE_REPEATS_ABOVE
    graph = joint if share else joint.without_repeats()
    groups = [mesh.group(0, (a,)) for a in model_axes]
    table = CostTable(cost, pmesh, groups, forbidden=options.forbid, compute_dtype=precision.compute_dtype)
    problem = build_problem(
        graph, Enumerator(graph, pmesh, graph.boundaries, batch_on_model_axes=options.batch_on_model_axes), table, dp,
        ProblemOptions(optimizer_states=OPTIMIZER_STATES[optimizer],
                       reduce_ratio=dtype_ratio(precision.reduce_dtype, precision.param_dtype),
                       replicated_heavy_ops=options.replicated_heavy_ops, memory_limit=memory_limit),
    )
    solution = solve_ilp(problem.ilp, time_limit_s=options.time_limit_s)
    picked = chosen(problem, graph, solution.choices)
    params: dict[str, Placements] = {}
    pins: dict[int, Placements] = {}
    for node in graph.nodes:
        if node.index not in picked:
            continue
        strategy = problem.choices[graph.representative(node.index)].strategies[picked[node.index]]
        if node.kind == "param" and node.param is not None:
            params[node.param] = strategy.outputs[0]  # type: ignore[assignment]
        elif node.kind == "call" and node.target is BOUNDARY and strategy.pin is not None:
            pins[int(node.args[1])] = strategy.pin
    propagation = propagate_plan(graph, pmesh, params, pins, graph.boundaries)
    return Solved(params=params, pins=pins, propagation=propagation, solution=solution, problem=problem)


def _full(model: Placements, mesh: MeshSpec, model_axes: tuple[str, ...], dp_value: Placement) -> tuple[Placement, ...]:
    """Placements on every mesh axis: the model axes' own, ``dp_value`` on the data-parallel ones."""
    it = iter(model)
    return tuple(next(it) if a in model_axes else dp_value for a in mesh.axes)


def _param_plans(graph: ModelGraph, solved: Solved, mesh: MeshSpec, model_axes: tuple[str, ...], fsdp: bool,
                 buckets: dict[str, int]) -> tuple[ParamPlan, ...]:
    """Every parameter's placements and sync over the data-parallel axes (all-reduce in a bucket, or FSDP2's
    reduce-scatter); ``_with_partial_grads`` adds the model axes."""
    dp_axes = tuple(a for a in mesh.axes if a not in model_axes)
    out = []
    for p in graph.params:
        model = solved.params.get(p.name, (REPLICATE,) * len(model_axes))
        shard_axis = dp_axes[-1] if fsdp and dp_axes else None
        placements = tuple(
            model[model_axes.index(a)] if a in model_axes else (shard(0) if a == shard_axis else REPLICATE) for a in mesh.axes
        )
        axes = tuple(a for a in dp_axes if mesh.axis_size(a) > 1)
        kind: SyncKind = "reduce_scatter" if shard_axis is not None else ("allreduce" if axes else "none")
        out.append(ParamPlan(name=p.name, placements=placements, sync=SyncSpec(kind=kind, axes=axes, bucket=buckets.get(p.name))))
    return tuple(out)


def build_intra_op_plan(
    graph: ModelGraph,
    joint: JointGraph,
    cluster: Cluster,
    *,
    mesh: MeshSpec,
    model_axes: tuple[str, ...],
    global_batch: int,
    joint_batch: int,
    num_micro: int = 1,
    fsdp: bool = False,
    cost: object,
    optimizer: str = "adamw",
    precision: PrecisionPolicy | str | None = None,
    recompute: bool = False,
    options: IntraOpOptions = IntraOpOptions(),
    solved: Solved | None = None,
    memory_limit: float | None = None,
) -> tuple[Plan, Solved]:
    """A complete intra-op Plan for one mesh and role assignment; ``solved`` reuses an earlier ILP solution
    (other micro-batching or recomputation of the same choice)."""
    t0 = time.perf_counter()
    check_optimizer(optimizer)
    policy = resolve_precision(precision, cluster)
    if mesh.size != cluster.world_size:
        raise PlaitError(f"mesh {mesh.shape} has {mesh.size} ranks but cluster {cluster.name} has {cluster.world_size}")
    dp_axes = tuple(a for a in mesh.axes if a not in model_axes)
    dp_degree = 1
    for a in dp_axes:
        dp_degree *= mesh.axis_size(a)
    batch = replace(batch_spec(global_batch, dp_degree, num_micro=num_micro),
                    placements=tuple(REPLICATE if a in model_axes else shard(0) for a in mesh.axes))
    dp = DataParallel(groups=tuple(mesh.group(0, (a,)) for a in dp_axes if mesh.axis_size(a) > 1), sharded=fsdp)
    if solved is None:
        solved = solve_model_axes(joint, mesh, model_axes, cost, dp=dp, precision=policy, optimizer=optimizer,
                                  options=options, memory_limit=memory_limit)
    t1 = time.perf_counter()
    shape = tuple(mesh.axis_size(a) for a in model_axes)
    local = {p.name: local_bytes_of(p.shape, p.dtype, solved.params.get(p.name), shape) for p in graph.params}
    buckets = make_buckets(graph, options.bucket_bytes, local) if dp.degree > 1 and not fsdp else ()
    bucket_of = {name: b.index for b in buckets for name in b.params}
    params = _param_plans(graph, solved, mesh, model_axes, fsdp, bucket_of)
    params = _with_partial_grads(params, joint, solved, model_axes)
    plan = Plan(
        model=graph.without_ops(), cluster=cluster, mesh=mesh, batch=batch, params=params,
        activations=_pins(joint, solved, mesh, model_axes), buckets=buckets,
        shard_units=tuple(ShardUnit(module=layer.name, reshard_after_forward=options.reshard_after_forward)
                          for layer in graph.layers if layer.param_bytes) if fsdp else (),
        precision=policy, layers=tuple(LayerPlan(name=layer.name, recompute=recompute) for layer in graph.layers),
        optimizer=optimizer,
    )
    work = intra_op_work(
        graph, joint, solved.propagation, solved.params, axes=model_axes, mesh_shape=shape, micro_batch=batch.micro_size,
        joint_batch=joint_batch, compute_dtype=policy.compute_dtype,
        recompute=frozenset(layer.name for layer in plan.layers if layer.recompute),
        fsdp_degree=mesh.axis_size(dp_axes[-1]) if fsdp and dp_axes else 1,
    )
    plan = replace(plan, programs=(lower_program(plan, graph, work),))
    t2 = time.perf_counter()
    result = simulate(plan, cost)  # type: ignore[arg-type]
    t3 = time.perf_counter()
    provenance = provenance_of(
        "plait.planners.intra_op", search_s=t3 - t0,
        passes={"intra_op_ilp": t1 - t0, "lower": t2 - t1, "simulate": t3 - t2},
        options={"mesh": " x ".join(f"{a}={s}" for a, s in zip(mesh.axes, mesh.shape, strict=True)),
                 "model_axes": ",".join(model_axes), "fsdp": str(fsdp), "ilp": solved.summary,
                 "ilp_objective_s": f"{solved.solution.objective:.6g}" if solved.solution is not None else "-"},
    )
    return replace(plan, predicted=result.prediction, provenance=provenance), solved


def _pins(joint: JointGraph, solved: Solved, mesh: MeshSpec, model_axes: tuple[str, ...]) -> tuple[ActivationPlan, ...]:
    """The pinned activations of the model's modules (the model's own inputs and outputs are handled by the runtime)."""
    out = []
    for key, placements in sorted(solved.pins.items()):
        b = joint.boundaries[key]
        if b.module == "":
            continue
        out.append(ActivationPlan(module=b.module, port=b.port, index=b.index,
                                  placements=_full(placements, mesh, model_axes, shard(0))))
    return tuple(out)


def _with_partial_grads(params: tuple[ParamPlan, ...], joint: JointGraph, solved: Solved,
                        model_axes: tuple[str, ...]) -> tuple[ParamPlan, ...]:
    """Add the model axes over which a gradient is reduced before the optimizer step to its sync spec."""
    grad_node = {g: name for name, g in joint.grads.items()}
    extra: dict[str, set[str]] = {}
    for event in solved.propagation.comms:
        name = grad_node.get(event.node)
        if name is not None and not event.per_sample and event.transform.collective in ("all_reduce", "reduce_scatter"):
            extra.setdefault(name, set()).add(model_axes[event.transform.mesh_dim])
    out = []
    for p in params:
        more = tuple(a for a in model_axes if a in extra.get(p.name, ()) and a not in p.sync.axes)
        if more:
            kind = p.sync.kind if p.sync.kind != "none" else "allreduce"
            p = replace(p, sync=replace(p.sync, kind=kind, axes=p.sync.axes + more))
        out.append(p)
    return tuple(out)
