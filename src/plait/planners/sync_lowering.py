"""Put per-parameter SyncSpecs into a replicated data-parallel plan: buckets, the lowered program, the prediction.

``apply_sync(plan, graph, "hybcomm")`` runs a strategy builder (``sync_strategies``) on the plan's model and
data-parallel group, checks its specs against the model, packs the all-reduced parameters into buckets (one
compression per bucket, in backward order), and lowers the step again with ``SyncLowering``: each bucket by its
cost entry's steps (plain, cast, or PowerSGD), then after the last backward, in the order the runtime's
``ModelSync.finish()`` runs them, SFB's all-gather and rebuild and each parameter-server set's push, server step
and pull; the local optimizer leaves out what the servers update. The instructions are the steps of
``plait.cost.sync_cost``, so ``plait sim`` and the cost entries agree.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from plait.cost import CostModel
from plait.cost.sync_cost import (
    SFBLayerSize,
    SyncStep,
    allreduce_steps,
    chain_time,
    ps_steps,
    server_loads,
    sfb_steps,
    step_group,
)
from plait.cost.work import dtype_ratio, layer_work_of
from plait.errors import PlaitError
from plait.graph.model_graph import DTYPE_BYTES, ModelGraph
from plait.plan.ir import Bucket, Instr, ParamPlan, Plan, Provenance, SyncSpec
from plait.plan.layout import shard_axis_of
from plait.planners.buckets import DEFAULT_BUCKET_BYTES, gradient_order, pack_greedy
from plait.planners.candidates import Scored
from plait.planners.lowering import Builder, OptimizerShape, lower_replicate, rank0_group
from plait.planners.program import optimizer_shape
from plait.planners.sync_strategies import ParamRole, SyncBuilder, SyncContext, param_roles, sync_builder
from plait.sim import simulate

Strategy = str | SyncBuilder | Mapping[str, SyncSpec]


def context_of(plan: Plan, graph: ModelGraph, *, roles: Mapping[str, ParamRole] | None = None,
               cost: CostModel | None = None) -> SyncContext:
    """The builders' view of a replicated data-parallel plan (roles from the graph when not given)."""
    axes = plan.data_parallel_axes
    return SyncContext(graph=graph, cluster=plan.cluster, axes=axes, group=plan.mesh.group(0, axes),
                       examples_per_step=plan.batch.micro_size * plan.batch.num_micro,
                       roles=roles if roles is not None else param_roles(graph), cost=cost,
                       dtype=plan.precision.compute_dtype,
                       recomputed=frozenset(i for i, layer in enumerate(plan.layers) if layer.recompute))


def check_specs(ctx: SyncContext, specs: Mapping[str, SyncSpec]) -> None:
    """Raise PlaitError naming the parameter when a spec does not fit the model or the group."""
    names = [p.name for p in ctx.graph.params]
    missing = [n for n in names if n not in specs]
    unknown = [n for n in specs if n not in names]
    if missing or unknown:
        raise PlaitError(f"sync specs must name every parameter once: missing {missing[:4]}, unknown {unknown[:4]}")
    for name in names:
        problem = _problem(ctx, name, specs)
        if problem:
            raise PlaitError(f"parameter {name!r}: {problem}")


def _problem(ctx: SyncContext, name: str, specs: Mapping[str, SyncSpec]) -> str:
    spec, shape = specs[name], ctx.shape(name)
    if spec.kind == "reduce_scatter":
        return "kind 'reduce_scatter' is FSDP2's; a replicated plan synchronises by allreduce, ps, sfb or none"
    if spec.kind != "none" and spec.axes != ctx.axes:
        return f"its spec spans axes {spec.axes}, but the plan's data-parallel axes are {ctx.axes}"
    if spec.kind == "sfb" and not ctx.sfb_ready(name):
        return f"SFB synchronises nn.Linear weights and biases of layers not recomputed; {_why_not_sfb(ctx, name)}"
    weight = name.rpartition(".")[0] + ".weight"
    if spec.kind == "sfb" and name.endswith(".bias") and specs.get(weight, spec).kind != "sfb":
        return f"SFB rebuilds a bias from its layer's factors; give {weight!r} kind 'sfb' too"
    if spec.kind == "ps" and spec.num_shards > 1 and not (spec.shard_dim < len(shape) and
                                                         spec.num_shards <= shape[spec.shard_dim]):
        return f"{spec.num_shards} shards along dim {spec.shard_dim} do not fit its shape {shape}"
    if spec.kind == "ps" and any(s >= ctx.num_workers for s in spec.servers):
        return f"servers {spec.servers} are not positions in a group of {ctx.num_workers} ranks"
    return ""


def _why_not_sfb(ctx: SyncContext, name: str) -> str:
    role = ctx.role(name)
    if role.kind != "linear":
        return f"module {role.module!r} is not an nn.Linear (it is {role.kind})"
    if ctx.rows(name) <= 0:
        return "its rows per step are unknown (capture the model with ops)"
    return "its layer is recomputed (activation checkpointing would capture its input twice)"


def sync_buckets(graph: ModelGraph, specs: Mapping[str, SyncSpec], bucket_bytes: int) -> tuple[Bucket, ...]:
    """Buckets of the all-reduced parameters: one compression per bucket, each group packed in backward order
    under ``bucket_bytes``, numbered in the order they become ready."""
    order = [p for p in gradient_order(graph) if specs[p.name].kind == "allreduce"]
    groups: dict[tuple[object, ...], list] = {}
    for p in order:
        s = specs[p.name]
        groups.setdefault((s.compress, s.compress_rank, s.error_feedback), []).append(p)
    made = []
    for members in groups.values():
        for idx in pack_greedy([p.nbytes for p in members], bucket_bytes):
            chosen = [members[i] for i in idx]
            made.append((-min(p.layer for p in chosen), order.index(chosen[0]), chosen))
    made.sort(key=lambda m: (m[0], m[1]))
    return tuple(Bucket(index=i, params=tuple(p.name for p in chosen), nbytes=sum(p.nbytes for p in chosen),
                        ready_after_layer=min(p.layer for p in chosen)) for i, (_, _, chosen) in enumerate(made))


def with_buckets(specs: Mapping[str, SyncSpec], buckets: Sequence[Bucket]) -> dict[str, SyncSpec]:
    """The specs with each all-reduced parameter's bucket index set."""
    bucket_of = {n: b.index for b in buckets for n in b.params}
    return {n: replace(s, bucket=bucket_of[n]) if s.kind == "allreduce" else replace(s, bucket=None)
            for n, s in specs.items()}


def sfb_layers(plan: Plan, rows: Mapping[str, int]) -> list[SFBLayerSize]:
    """The SFB layers of a plan: each SFB weight with its rows K per worker per step and whether its bias is SFB."""
    shapes = {p.name: p.shape for p in plan.model.params}
    specs = {p.name: p.sync for p in plan.params}
    out = []
    for name, spec in specs.items():
        if spec.kind == "sfb" and name.endswith(".weight"):
            bias = specs.get(name[: -len("weight")] + "bias")
            m, n = shapes[name]
            out.append(SFBLayerSize(rows=rows.get(name, 0), out_features=m, in_features=n,
                                    bias=bias is not None and bias.kind == "sfb"))
    return out


def tail_steps(plan: Plan, rows: Mapping[str, int], cost: CostModel | None = None) -> list[tuple[str, list[SyncStep]]]:
    """The synchronizers that run after the backward, in the runtime's order (first parameter of each): SFB and
    one parameter-server set per staleness bound, each with its steps (``cost`` picks each PS exchange's
    bottleneck: the busiest server or a node's link; the cluster's own cost model when None)."""
    cost = cost or CostModel(plan.cluster)
    group = plan.mesh.group(0, plan.data_parallel_axes)
    n = plan.dp_degree
    eb = DTYPE_BYTES.get(plan.precision.param_dtype, 4)
    shapes = {p.name: p.shape for p in plan.model.params}
    order: list[tuple[str, int]] = []
    for p in plan.params:
        key = ("sfb", 0) if p.sync.kind == "sfb" else ("ps", p.sync.staleness) if p.sync.kind == "ps" else None
        if key is not None and key not in order:
            order.append(key)
    out = []
    for kind, s in order:
        if kind == "sfb":
            out.append(("sfb", sfb_steps(sfb_layers(plan, rows), n, DTYPE_BYTES.get(plan.precision.compute_dtype, 4))))
            continue
        served = [(shapes[p.name], p.sync.num_shards, p.sync.shard_dim, p.sync.servers) for p in plan.params
                  if p.sync.kind == "ps" and p.sync.staleness == s]
        out.append((f"ps-s{s}", ps_steps(server_loads(served, n, eb), staleness=s, label=f"ps-s{s}", cost=cost,
                                         group=group)))
    return out


def runs_runtime_ring(plan: Plan) -> bool:
    """Whether the plan's all-reduce buckets run through ``plait.runtime.sync``'s point-to-point ring rather than the
    wait-free buckets' backend all-reduce: as ``plait.runtime.apply.uses_runtime_sync`` decides, when any parameter
    is not a plain, uncompressed all-reduce."""
    return plan.dp_degree > 1 and any(p.sync.kind != "allreduce" or p.sync.compress is not None for p in plan.params)


def bucket_steps(plan: Plan, bucket: Bucket) -> list[SyncStep]:
    """The steps of one bucket, compressed as its parameters' specs say, through the runtime's ring when it runs one."""
    spec = plan.param(bucket.params[0]).sync
    shapes = {p.name: p.shape for p in plan.model.params}
    return allreduce_steps(f"bucket {bucket.index}", [shapes[n] for n in bucket.params], compress=spec.compress,
                           rank=spec.compress_rank, error_feedback=spec.error_feedback,
                           elem_bytes=bucket.nbytes // max(1, sum(_numel(shapes[n]) for n in bucket.params)),
                           reduce_ratio=dtype_ratio(plan.precision.reduce_dtype, plan.precision.param_dtype),
                           ring=runs_runtime_ring(plan), num_workers=plan.dp_degree)


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def sync_times(plan: Plan, cost: CostModel, rows: Mapping[str, int] | None = None) -> dict[str, float]:
    """The cost entry of every synchronizer of the plan, in seconds: ``bucket i`` and those after the backward."""
    group = plan.mesh.group(0, plan.data_parallel_axes)
    dtype = plan.precision.compute_dtype
    out = {f"bucket {b.index}": chain_time(bucket_steps(plan, b), cost, group, dtype=dtype) for b in plan.buckets}
    for name, steps in tail_steps(plan, rows or {}, cost):
        out[name] = chain_time(steps, cost, group, dtype=dtype)
    return out


def instr_of(s: SyncStep, deps: tuple[int, ...], group: tuple[int, ...], axes: tuple[str, ...], *,
             in_backward: bool) -> Instr:
    """One step as an instruction: collectives on the comm stream over ``group``, a server step as an optimizer
    instruction, compute on the step's stream."""
    base = Instr(op="compute", stream=s.stream, name=s.name, phase="none" if in_backward else "step", deps=deps,
                 alloc_bytes=s.alloc_bytes, free_bytes=s.free_bytes)
    if s.kind == "collective":
        return replace(base, op="collective", stream="comm", phase="bwd" if in_backward else "step",
                       collective=s.collective, nbytes=s.nbytes, group=step_group(s, group), axes=axes)
    if s.kind == "optimizer":
        return replace(base, op="optimizer", stream="compute", numel=s.numel, num_kernels=s.num_kernels)
    return replace(base, flops=s.flops, bytes_moved=s.bytes_moved, num_kernels=s.num_kernels)


@dataclass(frozen=True, kw_only=True)
class SyncLowering:
    """``lowering.SyncHooks`` for a plan whose parameters carry SyncSpecs (``rows``: K of each SFB weight; ``cost``:
    the model that picks each PS exchange's bottleneck)."""

    plan: Plan
    rows: Mapping[str, int]
    cost: CostModel | None = None

    def emit(self, b: Builder, steps: Sequence[SyncStep], after: int, phase: str) -> list[int]:
        """The steps as instructions after instruction ``after``; returns their indices."""
        axes = self.plan.data_parallel_axes
        group = rank0_group(self.plan, axes)
        done: list[int] = []
        for k, s in enumerate(steps):
            dep = k - 1 if s.after is None else s.after
            done.append(b.add(instr_of(s, (done[dep],) if dep >= 0 else (after,), group, axes, in_backward=phase == "bwd")))
        return done

    def reduce_bucket(self, b: Builder, bucket: Bucket, after: int) -> int:
        """The bucket's steps once backward has filled it."""
        return self.emit(b, bucket_steps(self.plan, bucket), after, "bwd")[-1]

    def after_backward(self, b: Builder, after: int) -> tuple[int, ...]:
        """SFB and the parameter servers, one after the other (as ``ModelSync.finish()`` runs them)."""
        last = after
        ends = []
        for _, steps in tail_steps(self.plan, self.rows, self.cost):
            if steps:
                last = self.emit(b, steps, last, "step")[-1]
                ends.append(last)
        return tuple(ends)

    def local_state(self, state: OptimizerShape) -> OptimizerShape:
        """The local optimizer without the parameters the servers update."""
        served = {p.name for p in self.plan.params if p.sync.kind == "ps"}
        if not served:
            return state
        eb = DTYPE_BYTES.get(self.plan.precision.param_dtype, 4)
        sizes = [_numel(p.shape) for p in self.plan.model.params if p.name not in served]
        return OptimizerShape(numel=sum(sizes), num_tensors=len(sizes), largest_bytes=eb * max(sizes, default=0),
                              total_bytes=eb * sum(sizes))


def _check_plan(plan: Plan) -> None:
    """Sync strategies apply to replicated, data-parallel SPMD plans."""
    model_parallel = any(plan.mesh.axis_size(a) > 1 for a in plan.model_axes)
    if plan.is_pipeline or model_parallel or shard_axis_of(plan) is not None:
        raise PlaitError("sync strategies apply to replicated data-parallel plans; this plan "
                         f"{'is a pipeline' if plan.is_pipeline else 'shards parameters'} (plan it with "
                         "--family data-parallel, or keep its all-reduce/reduce-scatter)")


def rows_of(ctx: SyncContext) -> dict[str, int]:
    """K per worker per step of every parameter whose rows are known."""
    return {p.name: ctx.rows(p.name) for p in ctx.graph.params if ctx.rows(p.name) > 0}


def with_sync(plan: Plan, graph: ModelGraph, specs: Mapping[str, SyncSpec], *, cost: CostModel,
              rows: Mapping[str, int], bucket_bytes: int, label: str) -> Plan:
    """``plan`` with these specs: buckets, parameters, program and the simulator's prediction."""
    buckets = sync_buckets(graph, specs, bucket_bytes)
    final = with_buckets(specs, buckets)
    params = tuple(ParamPlan(name=p.name, placements=p.placements, sync=final[p.name], stage=p.stage)
                   for p in plan.params)
    out = replace(plan, params=params, buckets=buckets)
    program = lower_replicate(out, layer_work_of(graph, out), optimizer_shape(out, graph), SyncLowering(plan=out, rows=rows, cost=cost))
    out = replace(out, programs=(program,))
    return replace(out, predicted=simulate(out, cost).prediction, provenance=_provenance(plan, label))


def _provenance(plan: Plan, label: str) -> Provenance | None:
    if plan.provenance is None:
        return None
    return replace(plan.provenance, options={**plan.provenance.options, "sync": label})


def apply_sync(plan: Plan, graph: ModelGraph, strategy: Strategy, *, cost: CostModel | None = None,
               roles: Mapping[str, ParamRole] | None = None, bucket_bytes: int | None = None) -> Plan:
    """``plan`` synchronised by ``strategy`` (a builder, its name, or a SyncSpec per parameter). ``auto`` keeps the
    all-reduce plan when that simulates faster (the cost entries do not see the all-reduce's overlap)."""
    t0 = time.perf_counter()
    _check_plan(plan)
    cost = cost or CostModel(plan.cluster)
    ctx = context_of(plan, graph, roles=roles, cost=cost)
    builder = sync_builder(strategy) if isinstance(strategy, str) else strategy
    specs = dict(builder) if isinstance(builder, Mapping) else builder.build(ctx)
    label = "custom" if isinstance(builder, Mapping) else builder.name
    check_specs(ctx, specs)
    cap = bucket_bytes or int((plan.provenance.options if plan.provenance else {}).get("bucket_bytes", DEFAULT_BUCKET_BYTES))
    out = with_sync(plan, graph, specs, cost=cost, rows=rows_of(ctx), bucket_bytes=cap, label=label)
    if label == "auto" and plan.dp_degree > 1:
        plain = {p.name: SyncSpec(kind="allreduce", axes=ctx.axes) for p in graph.params}
        base = with_sync(plan, graph, plain, cost=cost, rows={}, bucket_bytes=cap, label="auto (all-reduce: faster)")
        assert base.predicted is not None and out.predicted is not None
        if base.predicted.step_s < out.predicted.step_s:
            out = base
    if out.provenance is not None:
        passes = {**out.provenance.passes, "sync": time.perf_counter() - t0}
        out = replace(out, provenance=replace(out.provenance, passes=passes))
    return out


def sync_scored(scored: Scored, graph: ModelGraph, strategy: Strategy, *, cost: CostModel,
                roles: Mapping[str, ParamRole] | None, limit: int) -> Scored:
    """A scored candidate re-planned with ``strategy`` when it is replicated data parallelism (others unchanged)."""
    option = scored.option
    if scored.plan is None or option.mesh is not None or option.pipeline or option.kind != "replicate":
        return scored
    plan = apply_sync(scored.plan, graph, strategy, cost=cost, roles=roles, bucket_bytes=option.bucket_bytes or None)
    assert plan.predicted is not None
    peak = max(plan.predicted.peak_memory_bytes)
    return replace(scored, plan=plan, fits=peak <= limit, peak_bytes=peak)
