"""Apply a Plan's data-parallel part to a model: plait's WFBP replication, FSDP2, or HSDP (hybrid)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from plait.errors import PlaitError
from plait.plan.ir import DataParallelKind, Plan
from plait.runtime.context import DistContext
from plait.runtime.optim import OPTIMIZERS
from plait.runtime.wfbp import WaitFreeReplicate


class PlanMismatchError(PlaitError):
    """A plan that does not fit the model or the running job."""


@dataclass(kw_only=True)
class AppliedPlan:
    """A model made data-parallel by ``apply_plan``: train ``model`` as usual, with these helpers."""

    model: nn.Module
    kind: DataParallelKind
    mesh: DeviceMesh
    dp_rank: int  # this rank's index among the data-parallel replicas of the batch
    dp_size: int  # number of ranks the global batch is split over
    replicate: WaitFreeReplicate | None = None  # set for kind "replicate"

    def accumulate(self) -> AbstractContextManager[None]:
        """Context for a micro-batch that is not the last of a step: defer what communication can wait.

        replicate: no all-reduce (gradients add up in the buckets); hybrid: reduce-scatter inside the
        node but no all-reduce across nodes; fsdp: gradients are reduce-scattered every micro-batch so
        that they stay sharded.
        """
        if self.replicate is not None:
            return self.replicate.no_sync()
        if self.kind == "hybrid":
            return _fsdp_without_all_reduce(self.model)
        return nullcontext()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear gradients before a step (replicate keeps them as views of the bucket buffers)."""
        if self.replicate is not None:
            self.replicate.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)


@contextmanager
def _fsdp_without_all_reduce(model: nn.Module) -> Iterator[None]:
    assert isinstance(model, FSDPModule)
    model.set_requires_all_reduce(False)
    try:
        yield
    finally:
        model.set_requires_all_reduce(True)


def check_plan(plan: Plan, ctx: DistContext) -> None:
    """Raise ``PlanMismatchError`` when the plan cannot run on this job as it is."""
    dp, mesh, batch = plan.data_parallel, plan.mesh, plan.batch
    if mesh.size != ctx.world_size:
        raise PlanMismatchError(
            f"the plan's mesh {mesh.shape} has {mesh.size} ranks but the job has {ctx.world_size}; "
            f"launch with --nproc {mesh.size} or re-plan for {ctx.world_size} ranks"
        )
    expected = {
        "replicate": (dp.replicate_axis,),
        "fsdp": (dp.shard_axis,),
        "hybrid": (dp.replicate_axis, dp.shard_axis),
    }[dp.kind]
    if tuple(mesh.axes) != expected:
        raise PlanMismatchError(f"a {dp.kind} plan needs mesh axes {expected}, but the plan's mesh has {mesh.axes}")
    per_rank = batch.micro_size * batch.num_micro
    if batch.micro_size < 1 or batch.num_micro < 1 or batch.global_size != per_rank * mesh.size:
        raise PlanMismatchError(
            f"batch global {batch.global_size} != micro {batch.micro_size} x num_micro {batch.num_micro} "
            f"x data-parallel degree {mesh.size}; fix the plan's batch"
        )
    if plan.optimizer not in OPTIMIZERS:
        raise PlanMismatchError(
            f"the plan's optimizer {plan.optimizer!r} is not one the runtime builds ({', '.join(OPTIMIZERS)}); "
            "re-plan with one of them"
        )


def build_mesh(plan: Plan, ctx: DistContext) -> DeviceMesh:
    """The plan's DeviceMesh over this job's ranks (row-major: rank r sits at its unravelled index)."""
    return init_device_mesh(ctx.device.type, tuple(plan.mesh.shape), mesh_dim_names=tuple(plan.mesh.axes))


def apply_plan(model: nn.Module, plan: Plan, ctx: DistContext) -> AppliedPlan:
    """Move ``model`` to this rank's device and make it data-parallel exactly as the plan says."""
    check_plan(plan, ctx)
    model.to(ctx.device)
    mesh = build_mesh(plan, ctx)
    kind = plan.data_parallel.kind
    if kind == "replicate":
        return apply_replicate(model, plan, mesh, ctx)
    apply_fsdp(model, plan, mesh)
    return AppliedPlan(model=model, kind=kind, mesh=mesh, dp_rank=ctx.rank, dp_size=ctx.world_size)


def apply_replicate(model: nn.Module, plan: Plan, mesh: DeviceMesh, ctx: DistContext) -> AppliedPlan:
    """plait's wait-free-backprop replication over the plan's buckets."""
    dp = plan.data_parallel
    if not dp.buckets:
        raise PlanMismatchError("the replicate plan has no gradient buckets; re-run `plait plan` to fill them")
    assert dp.replicate_axis is not None
    group = mesh.get_group(dp.replicate_axis)
    buckets = [b.params for b in sorted(dp.buckets, key=lambda b: b.index)]
    sync = WaitFreeReplicate(model, buckets, group=group, broadcast_from=0)
    return AppliedPlan(model=model, kind="replicate", mesh=mesh, dp_rank=ctx.rank, dp_size=ctx.world_size, replicate=sync)


def apply_fsdp(model: nn.Module, plan: Plan, mesh: DeviceMesh) -> None:
    """FSDP2 ``fully_shard`` on each shard unit (innermost first), then the root; a 2-D mesh gives HSDP."""
    dp = plan.data_parallel
    reshard = dp.reshard_after_forward
    for fqn in dp.shard_units:
        if fqn == "":
            continue
        try:
            unit = model.get_submodule(fqn)
        except AttributeError:
            raise PlanMismatchError(f"the plan shards module {fqn!r}, which the model does not have; re-run `plait plan`") from None
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
