"""Checks that a plan can run on this job and this model, before anything is built; one clear error each."""

from __future__ import annotations

from torch import nn

from plait.errors import PlaitError
from plait.plan.ir import Plan
from plait.runtime.context import DistContext
from plait.runtime.optim import OPTIMIZERS


class PlanMismatchError(PlaitError):
    """A plan that does not fit the model or the running job."""


def check_plan(plan: Plan, ctx: DistContext) -> None:
    """Raise ``PlanMismatchError`` when the plan cannot run on this job as it is."""
    mesh, batch = plan.mesh, plan.batch
    if plan.is_pipeline:
        raise PlanMismatchError(f"this plan is a {len(plan.stages)}-stage pipeline: apply it with "
                                "plait.runtime.pipeline_apply.apply_pipeline_plan (the Trainer does)")
    if mesh.size != ctx.world_size:
        raise PlanMismatchError(
            f"the plan's mesh {mesh.shape} has {mesh.size} ranks but the job has {ctx.world_size}; "
            f"launch with --nproc {mesh.size} or re-plan for {ctx.world_size} ranks"
        )
    if len(batch.placements) != len(mesh.axes):
        raise PlanMismatchError(f"the plan's batch has {len(batch.placements)} placements for a {len(mesh.axes)}-axis mesh; "
                                "re-run `plait plan`")
    if any(not (p.is_replicate or (p.is_shard and p.dim == 0)) for p in batch.placements):
        raise PlanMismatchError(f"the batch placements {[str(p) for p in batch.placements]} must be Shard(0) (data-parallel "
                                "axes) or Replicate(); re-run `plait plan`")
    per_rank = batch.micro_size * batch.num_micro
    if batch.micro_size < 1 or batch.num_micro < 1 or batch.global_size != per_rank * plan.dp_degree:
        raise PlanMismatchError(
            f"batch global {batch.global_size} != micro {batch.micro_size} x num_micro {batch.num_micro} "
            f"x data-parallel degree {plan.dp_degree}; fix the plan's batch"
        )
    for p in plan.params:
        if len(p.placements) != len(mesh.axes) or any(pl.is_partial for pl in p.placements):
            raise PlanMismatchError(f"parameter {p.name!r} needs one Shard or Replicate placement per mesh axis "
                                    f"{mesh.axes}, the plan has {[str(pl) for pl in p.placements]}")
    for a in plan.activations:
        if len(a.placements) != len(mesh.axes):
            raise PlanMismatchError(f"the pinned {a.port} {a.index} of {a.module!r} needs one placement per mesh axis")
    check_optimizer_of(plan)


def check_optimizer_of(plan: Plan) -> None:
    """Raise ``PlanMismatchError`` when the runtime cannot build the plan's optimizer."""
    if plan.optimizer not in OPTIMIZERS:
        raise PlanMismatchError(
            f"the plan's optimizer {plan.optimizer!r} is not one the runtime builds ({', '.join(OPTIMIZERS)}); "
            "re-plan with one of them"
        )


def check_plan_model(plan: Plan, model: nn.Module) -> None:
    """Raise ``PlanMismatchError`` when the plan's parameters are not the model's."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    planned = {p.name for p in plan.params}
    missing, extra = sorted(names - planned), sorted(planned - names)
    if missing or extra:
        what = (f"the model has parameters the plan does not place ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"
                if missing else
                f"the plan places parameters the model does not have ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})")
        raise PlanMismatchError(f"{what}; the plan was made for another model: re-run `plait plan` for this one")
    modules = {n for n, _ in model.named_modules()}
    for layer in plan.layers:
        if layer.recompute and layer.name not in modules:
            raise PlanMismatchError(f"the plan recomputes layer {layer.name!r}, which the model does not have; re-run `plait plan`")
