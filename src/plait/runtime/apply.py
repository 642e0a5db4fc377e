"""Apply a Plan to a model, field by field: recomputation, model-axis placements (DTensor), data-parallel
placements (plait's wait-free buckets, FSDP2 or HSDP) and the precision policy. Nothing here decides.

Data-parallel parameters whose SyncSpecs are not all the plain ``allreduce`` (a parameter server, SFB, a compressed
all-reduce, or ``none``) are synchronised by ``plait.runtime.sync.ModelSync`` on the data-parallel group instead of
the wait-free buckets (docs/sync.md).

For adaptive training an ``AppliedPlan`` also says how its gradients give the noise-scale estimator its two
norms (``probe_layout``) and installs the probe where they are (``attach_probe``): the WFBP bucket buffers
before and after their all-reduce; FSDP2's reduce-scatter input of every micro-batch and the sharded
gradients; without data parallelism, the first accumulated micro-batch's gradients and the step's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# FSDP2's reduce-scatter communication and its gradient divide factors are private in torch 2.13 (plait pins
# torch below 2.14); adaptive training wraps the first to norm its input and asks the second for the pre-division
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
    DefaultReduceScatter,
    _get_gradient_divide_factors,
)

from plait.adaptive import GradNormProbe, ProbeLayout, placed_grads
from plait.errors import PlaitError
from plait.plan.ir import BatchSpec, Plan, SyncSpec
from plait.plan.layout import shard_axis_of
from plait.runtime import state as rstate
from plait.runtime.checks import PlanMismatchError, check_plan, check_plan_model
from plait.runtime.context import DistContext
from plait.runtime.data import local_micro_batches, to_device
from plait.runtime.recompute import apply_recompute
from plait.runtime.sync import ModelSync, build_model_sync, plan_synchronizers
from plait.runtime.sync.ps_server import OptimizerFn
from plait.runtime.tensor_parallel import (
    Pin,
    distribute_parameters,
    pin_activations,
    reduce_grads_to_placements,
)
from plait.runtime.wfbp import WaitFreeReplicate

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Loss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]

__all__ = ["AppliedPlan", "PlanMismatchError", "apply_plan", "build_mesh", "check_plan", "uses_runtime_sync"]


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
    fsdp_mesh: DeviceMesh | None = None  # FSDP2's data-parallel mesh ((replicate, shard) for HSDP), when sharded
    probe: GradNormProbe | None = None  # adaptive training: collects the step's gradient norms (attach_probe)
    sync: ModelSync | None = None  # runtime.sync's synchronizers (PS, SFB, compressed all-reduce), in place of WFBP
    sync_micro_started: float = 0.0  # perf_counter() when the last step's synchronising micro-batch began
    _normed_rs: _NormedReduceScatter | None = None  # FSDP2's norming reduce-scatter, when a probe is attached

    def accumulate(self) -> AbstractContextManager[None]:
        """Context for a micro-batch that is not the last of a step: defer what communication can wait.

        Replicated parameters: no all-reduce (gradients add up in the buckets); HSDP: reduce-scatter inside
        the shard group but no all-reduce across replicas; FSDP2: gradients are reduce-scattered every
        micro-batch so that they stay sharded.
        """
        if self.replicate is not None:
            return self.replicate.no_sync()
        if self.sync is not None:
            return self.sync.no_sync()
        if self.sharded_with_replicas:
            return _fsdp_without_all_reduce(self.model)
        return nullcontext()

    def step_context(self) -> AbstractContextManager[object]:
        """Around a micro-batch's forward and backward: autocast to the compute dtype when the plan asks for it."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.mesh.device_type, dtype=self.autocast_dtype)

    def before_optimizer_step(self) -> None:
        """Bring every gradient to its parameter's placements (model-axis reductions the backward left pending);
        with a probe outside WFBP, norm the synchronised gradients. With ``runtime.sync``: all-reduce waits, SFB
        rebuilds, parameter servers push, apply and pull (their parameters are then already updated)."""
        if self.sync is not None:
            self.sync.finish()
        if self.model_parallel:
            reduce_grads_to_placements(self.model)
        if self.probe is not None and self.replicate is None:
            self.probe.add_synced(_grads(self.model))

    def probe_layout(self) -> ProbeLayout | str:
        """How this plan's gradients give the noise-scale estimator its two norms, or why they cannot."""
        b = self.batch
        if self.sync is not None:
            return ("the plan synchronises gradients with plait.runtime.sync (parameter server, SFB or compressed "
                    "all-reduce), whose gradients plait does not norm yet")
        if self.replicate is not None:  # each replica's bucket buffers before the all-reduce; after, each its share
            return ProbeLayout(small_batch=b.global_size // self.dp_size, big_batch=b.global_size,
                               num_local=self.dp_size, synced_copies=1)
        if self.fsdp_mesh is not None:
            if self.model_parallel:
                return ("FSDP2 with tensor parallelism: the reduce-scatter input mixes tensor-sharded and replicated "
                        "gradients, which plait does not norm apart yet")
            return ProbeLayout(small_batch=b.micro_size, big_batch=b.global_size, num_local=self.dp_size * b.num_micro,
                               synced_copies=1)
        if b.num_micro < 2:
            return ("one data-parallel replica without gradient accumulation has one gradient per step; plan two or "
                    "more micro-batches (num_micro) to estimate the noise scale")
        return ProbeLayout(small_batch=b.micro_size, big_batch=b.global_size, num_local=1, synced_copies=1)

    def attach_probe(self, probe: GradNormProbe) -> None:
        """Install ``probe`` where this plan's gradients are normed (call only when ``probe_layout`` gives a layout)."""
        self.probe = probe
        if self.replicate is not None:
            self.replicate.probe = probe
        elif self.fsdp_mesh is not None:
            self._normed_rs = _normed_reduce_scatter(self.model, self.fsdp_mesh, probe, self.batch.num_micro)

    def set_batch(self, spec: BatchSpec) -> None:
        """Train with another batch spec from the next step on (adaptive batch): the global batch, micro-batch and
        number of micro-batches change; the placements and everything applied stay. ``spec`` must split over the
        data-parallel replicas (global = micro x num_micro x dp)."""
        if spec.micro_size < 1 or spec.num_micro < 1 or spec.global_size != spec.micro_size * spec.num_micro * self.dp_size:
            raise PlaitError(f"batch global {spec.global_size} != micro {spec.micro_size} x num_micro {spec.num_micro} "
                             f"x data-parallel degree {self.dp_size}; choose a batch that splits over the replicas")
        self.batch = spec
        if self._normed_rs is not None:
            self._normed_rs.num_micro = spec.num_micro

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (all of the model's, sharded or not; with ``runtime.sync`` all but
        those the parameter servers update)."""
        if self.sync is not None:
            return self.sync.local_parameters()
        return list(self.model.parameters())

    def forward_backward(self, global_batch: Sequence[torch.Tensor], loss_fn: Loss) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches of ``global_batch`` (gradients accumulate; the
        last micro-batch's backward synchronises them); the mean loss of this rank's share, on the device."""
        micro = local_micro_batches(global_batch, self.batch, dp_rank=self.dp_rank)
        total = torch.zeros((), device=self.device)
        for j, mb in enumerate(micro):
            last = j == len(micro) - 1
            if last:
                self.sync_micro_started = time.perf_counter()
            with nullcontext() if last else self.accumulate(), self.step_context():
                loss = loss_fn(self.model, to_device(mb, self.device))
                (loss / self.batch.num_micro).backward()
            total += loss.detach().float() / self.batch.num_micro
            if j == 0 and not last and self.probe is not None and self.replicate is None and self.fsdp_mesh is None:
                self._norm_first_micro_batch(self.probe)
        return total

    def _norm_first_micro_batch(self, probe: GradNormProbe) -> None:
        """The local gradient without data parallelism: the first micro-batch's (``grad / num_micro`` so far).
        Pending ``Partial`` sums on model axes are normed reduced, and left as they are."""
        grads = placed_grads(self.model.parameters()) if self.model_parallel else _grads(self.model)
        probe.add_local(grads, scale=float(self.batch.num_micro))

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
        elif self.sync is not None:  # the servers' parameters are not in the optimizer but get gradients too
            self.model.zero_grad(set_to_none=True)
        else:
            optimizer.zero_grad(set_to_none=True)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    """The model's gradients (those that exist)."""
    return [p.grad for p in model.parameters() if p.grad is not None]


class _NormedReduceScatter(DefaultReduceScatter):
    """FSDP2's default reduce-scatter that first adds its input (this rank's flat local gradient of one unit and
    micro-batch, ``grad / num_micro``, pre-divided for fp16) to a gradient-norm probe."""

    def __init__(self, probe: GradNormProbe, num_micro: int, replicate_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.probe, self.num_micro, self.replicate_group = probe, num_micro, replicate_group

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> dist.Work:
        """Norm the input, then reduce-scatter it as FSDP2 does."""
        pre, _, _, _ = _get_gradient_divide_factors(group, self.replicate_group, input_tensor.dtype, input_tensor.device.type)
        self.probe.add_local([input_tensor], scale=self.num_micro * (pre or 1.0))
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def _normed_reduce_scatter(model: nn.Module, fsdp_mesh: DeviceMesh, probe: GradNormProbe,
                           num_micro: int) -> _NormedReduceScatter:
    """Give every FSDP2 unit of ``model`` the reduce-scatter that norms its input."""
    replicate_group = fsdp_mesh.get_group(0) if fsdp_mesh.ndim == 2 else None
    comm = _NormedReduceScatter(probe, num_micro, replicate_group)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(comm)
    return comm


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


def uses_runtime_sync(plan: Plan) -> bool:
    """Whether the plan's data-parallel gradients go through ``plait.runtime.sync`` rather than the wait-free
    buckets or FSDP2: a replicated plan over more than one rank with a SyncSpec that is not the plain ``allreduce``."""
    if plan.dp_degree <= 1 or shard_axis_of(plan) is not None:
        return False
    return any(p.sync.kind != "allreduce" or p.sync.compress is not None for p in plan.params)


def apply_plan(model: nn.Module, plan: Plan, ctx: DistContext, *, optimizer_fn: OptimizerFn | None = None) -> AppliedPlan:
    """Move ``model`` to this rank's device and make it parallel exactly as the plan's fields say.

    ``optimizer_fn(params)`` builds the optimizer of the parameter servers' shards, for plans with ``ps`` SyncSpecs.
    """
    check_plan(plan, ctx)
    check_plan_model(plan, model)
    runtime_sync = uses_runtime_sync(plan)
    if runtime_sync:  # before any communication: a plan the synchronizers cannot run fails here, on every rank
        _check_runtime_sync(model, plan, has_optimizer=optimizer_fn is not None)
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
        applied.fsdp_mesh = _apply_fsdp(model, plan, mesh, shard_axis)
        applied.sharded_with_replicas = len(dp_axes) > 1
    else:
        if plan.precision.mixed:
            applied.autocast_dtype = TORCH_DTYPES[plan.precision.compute_dtype]
        if runtime_sync:
            applied.sync = build_model_sync(model, _sync_specs(model, plan), group=_dp_group(mesh, dp_axes), optimizer_fn=optimizer_fn,
                                            seed=0, broadcast_from=0)
        elif plan.dp_degree > 1:
            applied.replicate = _apply_buckets(model, plan, mesh, dp_axes)
    return applied


def _check_runtime_sync(model: nn.Module, plan: Plan, *, has_optimizer: bool) -> None:
    """Refuse, naming the parameter and what to do, a plan ``plait.runtime.sync`` cannot run; needs no process group."""
    if any(plan.mesh.axis_size(a) > 1 for a in plan.model_axes):
        raise PlanMismatchError("the plan shards parameters on model axes and synchronises them by parameter server, "
                                "SFB or compression, which plait.runtime.sync does for plain (non-DTensor) parameters "
                                "only; plan the sync strategy on a replicated data-parallel plan")
    dp = set(plan.data_parallel_axes)
    for p in plan.params:
        if p.sync.kind != "none" and p.sync.axes and set(p.sync.axes) != dp:
            raise PlanMismatchError(f"parameter {p.name!r}: its SyncSpec spans axes {list(p.sync.axes)} but the plan's "
                                    f"data-parallel axes are {sorted(dp)}; re-run `plait plan --sync`")
    if not has_optimizer and any(p.sync.kind == "ps" for p in plan.params):
        name = next(p.name for p in plan.params if p.sync.kind == "ps")
        raise PlaitError(f"parameter {name!r} is served by a parameter server, whose shards need an optimizer: pass "
                         "apply_plan(..., optimizer_fn=...) (the Trainer does)")
    try:
        plan_synchronizers(model, _sync_specs(model, plan), has_optimizer=has_optimizer)
    except PlaitError as e:
        raise PlanMismatchError(f"the plan's SyncSpecs do not fit the model: {e}; re-run `plait plan --sync` for "
                                "this model") from None


def _sync_specs(model: nn.Module, plan: Plan) -> dict[str, SyncSpec]:
    """The plan's SyncSpec of every parameter the model trains (frozen ones need none)."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {p.name: p.sync for p in plan.params if p.name in trained}


def _dp_group(mesh: DeviceMesh, dp_axes: tuple[str, ...]) -> dist.ProcessGroup:
    """The process group over the data-parallel axes (flattened when there are several)."""
    dp_mesh = _submesh(mesh, dp_axes)
    return dp_mesh.get_group() if dp_mesh.ndim == 1 else dp_mesh._flatten().get_group()


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
    group = _dp_group(mesh, dp_axes)
    buckets = [b.params for b in sorted(plan.buckets, key=lambda b: b.index)]
    return WaitFreeReplicate(model, buckets, group=group, broadcast_from=0, reduce_dtype=TORCH_DTYPES[plan.precision.reduce_dtype])


def _apply_fsdp(model: nn.Module, plan: Plan, mesh: DeviceMesh, shard_axis: str) -> DeviceMesh:
    """FSDP2 ``fully_shard`` on each shard unit (innermost first), then the root; a replicated data-parallel
    axis next to the shard axis gives HSDP. Mixed precision goes to FSDP2's MixedPrecisionPolicy. The
    data-parallel mesh FSDP2 runs on."""
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
    return dp_mesh


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a plan dtype name."""
    if name not in TORCH_DTYPES:
        raise PlaitError(f"unknown dtype {name!r}; plait knows {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
