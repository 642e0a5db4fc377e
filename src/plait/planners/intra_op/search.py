"""Intra-op candidates: which meshes and axis roles to try, and how each is scored (by simulation, under a limit).

On a cluster, a candidate puts a model axis of 2, 4, ... ranks inside a node (the last mesh axis, whose
ranks are neighbours) and splits the batch over the rest; on a given mesh, every assignment of its axes
to data parallelism or to the model (``force_batch_axis`` fixes one axis as data-parallel). Around each,
parameters are replicated (wait-free buckets) or, on a data-parallel axis of more than one rank, sharded
by FSDP2. The ILP is solved once per candidate at the per-rank batch; accumulation and recomputation
re-use its choice when memory needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import product

from plait.cluster import Cluster
from plait.errors import NoFeasiblePlanError, PlaitError
from plait.plan.ir import MeshSpec, Plan, PrecisionPolicy
from plait.planners.intra_op.planner import IntraOpOptions, Solved, build_intra_op_plan
from plait.planners.intra_op.propagate import PropagationError
from plait.planners.intra_op.source import ModelSource
from plait.planners.intra_op.strategies import UnsupportedOpError

MEMORY_RETRIES = 2  # re-solves of the ILP under a memory limit when its choice fits no accumulation


@dataclass(frozen=True, kw_only=True)
class MeshOption:
    """One intra-op candidate: a mesh, its model axes, and how parameters meet on the data-parallel axes."""

    mesh: MeshSpec
    model_axes: tuple[str, ...]
    fsdp: bool = False

    @property
    def name(self) -> str:
        """Short label for the candidates table."""
        roles = " x ".join(f"{'tp' if a in self.model_axes else 'dp'}({a})={s}" if a not in ("dp", "tp") else f"{a}={s}"
                           for a, s in zip(self.mesh.axes, self.mesh.shape, strict=True) if s > 1 or a in self.model_axes)
        return f"intra-op {roles}" + (", fsdp" if self.fsdp else "")

    @property
    def dp_degree(self) -> int:
        """Ranks the batch is split over."""
        n = 1
        for a, s in zip(self.mesh.axes, self.mesh.shape, strict=True):
            if a not in self.model_axes:
                n *= s
        return n


def cluster_meshes(cluster: Cluster) -> list[MeshSpec]:
    """(dp, tp) meshes with tp a power of two from 2 up to the devices of one node."""
    out = []
    tp = 2
    while tp <= cluster.devices_per_node and cluster.world_size % tp == 0:
        out.append(MeshSpec(shape=(cluster.world_size // tp, tp), axes=("dp", "tp")))
        tp *= 2
    return out


def mesh_options(cluster: Cluster, meshes: Sequence[MeshSpec] | None = None, *, force_batch_axis: str | None = None,
                 fsdp: Sequence[bool] = (False, True), max_model_axes: int = 1) -> list[MeshOption]:
    """Every candidate (see the module docstring); at most ``max_model_axes`` axes of a given mesh are model axes."""
    out = []
    if meshes is None:
        for mesh in cluster_meshes(cluster):
            out += [MeshOption(mesh=mesh, model_axes=("tp",), fsdp=f) for f in fsdp if not f or mesh.shape[0] > 1]
        return out
    for mesh in meshes:
        if force_batch_axis is not None and force_batch_axis not in mesh.axes:
            raise PlaitError(f"force_batch_axis {force_batch_axis!r} is not an axis of mesh {mesh.axes}")
        sized = [a for a, s in zip(mesh.axes, mesh.shape, strict=True) if s > 1]
        for roles in product((False, True), repeat=len(sized)):
            model_axes = tuple(a for a, is_model in zip(sized, roles, strict=True) if is_model)
            if not model_axes or len(model_axes) > max_model_axes or force_batch_axis in model_axes:
                continue
            dp = [a for a in sized if a not in model_axes]
            out += [MeshOption(mesh=mesh, model_axes=model_axes, fsdp=f) for f in fsdp if not f or dp]
    return out


@dataclass(frozen=True)
class IntraOpScore:
    """A scored intra-op candidate: the leanest plan tried, whether it fits, and why it was dropped if it was."""

    plan: Plan | None
    fits: bool
    peak_bytes: int
    reason: str = ""


def score_mesh(option: MeshOption, source: ModelSource, cluster: Cluster, *, global_batch: int, micro_counts: Sequence[int],
               cost: object, limit: int, optimizer: str, precision: PrecisionPolicy, options: IntraOpOptions) -> IntraOpScore:
    """Solve the candidate's ILP at the per-rank batch, then try the fewest micro-batches (and recomputation)
    whose simulated peak fits ``limit``."""
    dp = option.dp_degree
    if global_batch % dp:
        return IntraOpScore(plan=None, fits=False, peak_bytes=0,
                            reason=f"not applicable: global batch {global_batch} does not split over {dp} data-parallel ranks")
    per_rank = global_batch // dp
    graph = source.graph(per_rank)
    joint = source.joint(per_rank)
    build = partial(build_intra_op_plan, graph, joint, cluster, mesh=option.mesh, model_axes=option.model_axes,
                    global_batch=global_batch, joint_batch=per_rank, fsdp=option.fsdp, cost=cost, optimizer=optimizer,
                    precision=precision, options=options)
    counts = [n for n in micro_counts if per_rank % n == 0]
    if not counts:
        return IntraOpScore(plan=None, fits=False, peak_bytes=0, reason="not applicable: no accumulation splits the batch")
    try:
        plan, solved = build(num_micro=counts[0])
        if _shards_nothing(solved):
            return IntraOpScore(plan=None, fits=False, peak_bytes=0,
                                reason="not applicable: the ILP splits nothing on the model axis (every rank would repeat "
                                       "the same work; the data-parallel candidates cover that)")
        found = _fewest_that_fit(build, solved, counts, limit)
        for _ in range(MEMORY_RETRIES):  # the choice itself holds too much: ask the ILP for a leaner one
            if found.fits or solved.solution is None:
                break
            excess = found.peak_bytes - limit
            _, solved = build(num_micro=counts[0], memory_limit=max(0.0, solved.solution.memory - 1.05 * excess))
            found = _fewest_that_fit(build, solved, counts, limit)
    except (UnsupportedOpError, PropagationError, NoFeasiblePlanError) as exc:
        return IntraOpScore(plan=None, fits=False, peak_bytes=0, reason=f"not applicable: {exc}")
    return found


def _shards_nothing(solved: Solved) -> bool:
    """True when neither a parameter nor a pinned activation is split or partial on a model axis."""
    placed = [*solved.params.values(), *solved.pins.values()]
    return all(p.is_replicate for placements in placed for p in placements)


def _fewest_that_fit(build: Callable[..., tuple[Plan, Solved]], solved: Solved, counts: Sequence[int], limit: int) -> IntraOpScore:
    """The fewest micro-batches (without, then with recomputation) whose simulated peak fits ``limit`` under
    the choice ``solved``; else the leanest plan tried."""
    leanest: Plan | None = None
    for n in counts:
        for recompute in (False, True):
            plan, _ = build(num_micro=n, recompute=recompute, solved=solved)
            assert plan.predicted is not None
            peak = max(plan.predicted.peak_memory_bytes)
            if peak <= limit:
                return IntraOpScore(plan=plan, fits=True, peak_bytes=peak)
            if leanest is None or peak <= max(leanest.predicted.peak_memory_bytes):  # type: ignore[union-attr]
                leanest = plan
    assert leanest is not None and leanest.predicted is not None
    return IntraOpScore(plan=leanest, fits=False, peak_bytes=max(leanest.predicted.peak_memory_bytes))
