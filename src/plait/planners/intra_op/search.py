"""Intra-op candidates: which meshes and axis roles to try, and how each is scored (by simulation, under a limit).

On a cluster, a candidate puts a model axis of 2, 4, ... ranks inside a node (the last mesh axis, whose
ranks are neighbours) and splits the batch over the rest; on a given mesh, every assignment of its axes
to data parallelism or to the model (``force_batch_axis`` fixes one axis as data-parallel). Around each,
parameters are replicated (wait-free buckets) or, on a data-parallel axis of more than one rank, sharded
by FSDP2. The ILP is solved once per candidate at the per-rank batch; accumulation and recomputation
re-use its choice when memory needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

from plait.cluster import Cluster
from plait.errors import NoFeasiblePlanError, PlaitError
from plait.plan.ir import MeshSpec, Plan, PrecisionPolicy
from plait.planners.intra_op.planner import IntraOpOptions, Solved, build_intra_op_plan
from plait.planners.intra_op.propagate import PropagationError
from plait.planners.intra_op.source import ModelSource
from plait.planners.intra_op.strategies import UnsupportedOpError


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
    solved: Solved | None = None
    leanest: Plan | None = None
    try:
        for n in micro_counts:
            if per_rank % n:
                continue
            for recompute in (False, True):
                plan, solved = build_intra_op_plan(
                    graph, joint, cluster, mesh=option.mesh, model_axes=option.model_axes, global_batch=global_batch,
                    joint_batch=per_rank, num_micro=n, fsdp=option.fsdp, cost=cost, optimizer=optimizer,
                    precision=precision, recompute=recompute, options=options, solved=solved,
                )
                assert plan.predicted is not None
                peak = max(plan.predicted.peak_memory_bytes)
                if peak <= limit:
                    return IntraOpScore(plan=plan, fits=True, peak_bytes=peak)
                if leanest is None or peak <= max(leanest.predicted.peak_memory_bytes):  # type: ignore[union-attr]
                    leanest = plan
    except (UnsupportedOpError, PropagationError, NoFeasiblePlanError) as exc:
        return IntraOpScore(plan=None, fits=False, peak_bytes=0, reason=f"not applicable: {exc}")
    if leanest is None:
        return IntraOpScore(plan=None, fits=False, peak_bytes=0, reason="not applicable: no accumulation splits the batch")
    return IntraOpScore(plan=leanest, fits=False, peak_bytes=max(leanest.predicted.peak_memory_bytes))  # type: ignore[union-attr]
