"""Apply a Plan to a model, field by field: recomputation, model-axis placements (DTensor), data-parallel
placements (plait's wait-free buckets, FSDP2 or HSDP) and the precision policy. Nothing here decides."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from plait.errors import PlaitError
from plait.plan.ir import BatchSpec, Plan
from plait.plan.layout import shard_axis_of
from plait.runtime import state as rstate
from plait.runtime.checks import PlanMismatchError, check_plan, check_plan_model
from plait.runtime.context import DistContext
from plait.runtime.data import local_micro_batches, to_device
from plait.runtime.recompute import apply_recompute
from plait.runtime.tensor_parallel import (
    Pin,
    distribute_parameters,
    pin_activations,
    reduce_grads_to_placements,
)
from plait.runtime.wfbp import WaitFreeReplicate

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Loss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]

__all__ = ["AppliedPlan", "PlanMismatchError", "apply_plan", "build_mesh", "check_plan"]


@dataclass(kw_only=True)
class AppliedPlan:
    """A model made parallel by ``apply_plan``: train ``model`` as usual, inside ``step_context()``."""

    model: nn.Module
    mesh: DeviceMesh
    dp_rank: int  # this rank's index among the data-parallel replicas of the batch
    dp_size: int  # number of data-parallel replicas the global batch is split over
    batch: BatchSpec
    device: torch.device
    replicate: WaitFreeReplicate | None = None  # the gradient buckets, when parameters are replicated on dp axes
    sharded_with_replicas: bool = False  # FSDP2 with a replicated data-parallel axis (HSDP)
    autocast_dtype: torch.dtype | None = None
    model_parallel: bool = False  # parameters are DTensors on model axes (gradients reduced before the step)

    def accumulate(self) -> AbstractContextManager[None]:
        """Context for a micro-batch that is not the last of a step: defer what communication can wait.

        Replicated parameters: no all-reduce (gradients add up in the buckets); HSDP: reduce-scatter inside
        the shard group but no all-reduce across replicas; FSDP2: gradients are reduce-scattered every
        micro-batch so that they stay sharded.
        """
        if self.replicate is not None:
            return self.replicate.no_sync()
        if self.sharded_with_replicas:
            return _fsdp_without_all_reduce(self.model)
        return nullcontext()

    def step_context(self) -> AbstractContextManager[object]:
        """Around a micro-batch's forward and backward: autocast to the compute dtype when the plan asks for it."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.mesh.device_type, dtype=self.autocast_dtype)

    def before_optimizer_step(self) -> None:
        """Bring every gradient to its parameter's placements (model-axis reductions the backward left pending)."""
        if self.model_parallel:
            reduce_grads_to_placements(self.model)

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (all of the model's, sharded or not)."""
        return list(self.model.parameters())

    def forward_backward(self, global_batch: Sequence[torch.Tensor], loss_fn: Loss) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches of ``global_batch`` (gradients accumulate; the
        last micro-batch's backward synchronises them); the mean loss of this rank's share, on the device."""
        micro = local_micro_batches(global_batch, self.batch, dp_rank=self.dp_rank)
        total = torch.zeros((), device=self.device)
        for j, mb in enumerate(micro):
            last = j == len(micro) - 1
            with nullcontext() if last else self.accumulate(), self.step_context():
                loss = loss_fn(self.model, to_device(mb, self.device))
                (loss / self.batch.num_micro).backward()
            total += loss.detach().float() / self.batch.num_micro
        return total

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on rank 0 (CPU tensors); {} on other ranks. Collective."""
        return rstate.full_model_state(self.model)

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model and optimizer state, unsharded and keyed by parameter name, on rank 0. Collective."""
        return rstate.full_state(self.model, optimizer)

    def load_full_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a full checkpoint state (any plan's) into this rank's model and optimizer."""
        rstate.load_full_state(self.model, optimizer, state)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear gradients before a step (replicated parameters keep them as views of the bucket buffers)."""
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


def build_mesh(plan: Plan, ctx: DistContext) -> DeviceMesh:
    """The plan's DeviceMesh over this job's ranks (row-major: rank r sits at its unravelled index)."""
    return init_device_mesh(ctx.device.type, tuple(plan.mesh.shape), mesh_dim_names=tuple(plan.mesh.axes))


def _submesh(mesh: DeviceMesh, axes: tuple[str, ...]) -> DeviceMesh:
    return mesh[axes[0]] if len(axes) == 1 else mesh[axes]


def apply_plan(model: nn.Module, plan: Plan, ctx: DistContext) -> AppliedPlan:
    """Move ``model`` to this rank's device and make it parallel exactly as the plan's fields say."""
    check_plan(plan, ctx)
    check_plan_model(plan, model)
    model.to(ctx.device)
    mesh = build_mesh(plan, ctx)
    dp_axes = plan.data_parallel_axes
    applied = AppliedPlan(
        model=model, mesh=mesh, dp_rank=plan.mesh.index_in(ctx.rank, dp_axes) if dp_axes else 0, dp_size=plan.dp_degree,
        batch=plan.batch, device=ctx.device,
    )
    apply_recompute(model, [layer.name for layer in plan.layers if layer.recompute])
    model_axes = tuple(a for a in plan.model_axes if plan.mesh.axis_size(a) > 1)
    if model_axes:
        _apply_model_axes(model, plan, _submesh(mesh, model_axes), model_axes)
        applied.model_parallel = True
    shard_axis = shard_axis_of(plan)
    if shard_axis is not None:
        _apply_fsdp(model, plan, mesh, shard_axis)
        applied.sharded_with_replicas = len(dp_axes) > 1
    else:
        if plan.precision.mixed:
            applied.autocast_dtype = TORCH_DTYPES[plan.precision.compute_dtype]
        if plan.dp_degree > 1:
            applied.replicate = _apply_buckets(model, plan, mesh, dp_axes)
    return applied


def _apply_model_axes(model: nn.Module, plan: Plan, mesh: DeviceMesh, axes: tuple[str, ...]) -> None:
    """DTensor parameters and pinned activations on the model axes (the data-parallel axes are left out)."""
    index = [plan.mesh.axes.index(a) for a in axes]
    distribute_parameters(model, mesh, {p.name: tuple(p.placements[i] for i in index) for p in plan.params})
    pin_activations(model, mesh, [Pin(a.module, a.port, a.index, tuple(a.placements[i] for i in index)) for a in plan.activations])


def _apply_buckets(model: nn.Module, plan: Plan, mesh: DeviceMesh, dp_axes: tuple[str, ...]) -> WaitFreeReplicate:
    """plait's wait-free-backprop all-reduce over the data-parallel axes, in the plan's buckets."""
    if not plan.buckets:
        raise PlanMismatchError("the plan replicates parameters over data-parallel axes but has no gradient buckets; "
                                "re-run `plait plan` to fill them")
    dp_mesh = _submesh(mesh, dp_axes)
    group = dp_mesh.get_group() if dp_mesh.ndim == 1 else dp_mesh._flatten().get_group()
    buckets = [b.params for b in sorted(plan.buckets, key=lambda b: b.index)]
    return WaitFreeReplicate(model, buckets, group=group, broadcast_from=0, reduce_dtype=TORCH_DTYPES[plan.precision.reduce_dtype])


def _apply_fsdp(model: nn.Module, plan: Plan, mesh: DeviceMesh, shard_axis: str) -> None:
    """FSDP2 ``fully_shard`` on each shard unit (innermost first), then the root; a replicated data-parallel
    axis next to the shard axis gives HSDP. Mixed precision goes to FSDP2's MixedPrecisionPolicy."""
    replicated = tuple(a for a in plan.data_parallel_axes if a != shard_axis)
    dp_mesh = mesh[(*replicated, shard_axis)] if replicated else mesh[shard_axis]
    p = plan.precision
    policy = MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[p.compute_dtype], reduce_dtype=TORCH_DTYPES[p.reduce_dtype])
    root_reshard = all(u.reshard_after_forward for u in plan.shard_units)
    for unit in plan.shard_units:
        if unit.module == "":
            continue
        try:
            module = model.get_submodule(unit.module)
        except AttributeError:
            raise PlanMismatchError(f"the plan shards module {unit.module!r}, which the model does not have; "
                                    "re-run `plait plan`") from None
        fully_shard(module, mesh=dp_mesh, reshard_after_forward=unit.reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=root_reshard, mp_policy=policy)


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a plan dtype name."""
    if name not in TORCH_DTYPES:
        raise PlaitError(f"unknown dtype {name!r}; plait knows {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
