"""Apply a pipeline Plan for the Trainer: each rank builds its stages from the plan's fields (layers, stage
meshes, schedule, micro-batches, recomputation) with ``plait.runtime.pipeline`` and trains its stage's
parameters; full state for checkpoints is gathered from every stage onto rank 0.

Nothing here decides: the stages, their ranks and the schedule are the plan's. The runtime runs stages of
one size (the plan's mesh is ``pp x dp``, or ``pp x dp x tp`` once stages shard their layers); under interleaved
1F1B each pipeline rank runs several of them (model chunks ``s, s + pp, ...``).

A token-sliced plan (``ScheduleSpec.token_slices``, TeraPipe) runs on ``plait.runtime.token_pipeline`` instead:
one stage per pipeline rank on the same mesh, every micro-batch of a replica cut into the plan's slices.

For adaptive training the stages' gradients are normed around their data-parallel average (``attach_probe``):
each rank adds its stage's shares, which add up over the stages (and ``tp``) to whole-model norms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from plait.adaptive import GradNormProbe, ProbeLayout
from plait.errors import PlaitError
from plait.plan.ir import BatchSpec, Plan
from plait.runtime.apply import dtype_of
from plait.runtime.checks import PlanMismatchError, check_optimizer_of, check_plan_model
from plait.runtime.context import DistContext
from plait.runtime.pipeline import LIST_SCHEDULES, SCHEDULES, PipelineRank, build_pipeline_rank
from plait.runtime.pipeline_lists import Pass
from plait.runtime.pipeline_tp import Boundary, StageSharding
from plait.runtime.recompute import apply_recompute
from plait.runtime.tensor_parallel import Pin
from plait.runtime.token_pipeline import TokenPipelineRank, build_token_pipeline_rank
from plait.runtime.token_state import Slicing

FULL = StateDictOptions(full_state_dict=True)
Loss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


@dataclass(kw_only=True)
class AppliedPipeline:
    """This rank's stages of a pipeline plan: run a step with ``forward_backward``; state gathered over stages."""

    model: nn.Module
    rank: PipelineRank | TokenPipelineRank  # micro-batch schedules' stages, or a token-sliced plan's stage
    ctx: DistContext
    layers: tuple[str, ...]  # this rank's stages' layers
    last_stage_ranks: int  # ranks that hold the loss (the last stage's)
    global_batch: int = 0  # samples per optimizer step over every replica of the pipeline
    num_micro: int = 1  # micro-batches per replica and step
    autocast_dtype: torch.dtype | None = None  # mixed precision: the stages compute in this dtype
    replicate: None = None  # the Trainer's WFBP traces: none in a pipeline

    def probe_layout(self) -> ProbeLayout | str:
        """How the stages' gradients give the noise-scale estimator its two norms, or why they cannot."""
        dp, num_micro = self.rank.dp, self.num_micro
        if isinstance(self.rank, TokenPipelineRank):
            return ("the token pipeline does not norm its gradients for the noise-scale estimate yet; re-plan without "
                    "token slicing (`plait plan --no-token-slicing`) to estimate it")
        if dp > 1:  # each replica's gradient before the average, and its share of the average after it
            return ProbeLayout(small_batch=self.global_batch // dp, big_batch=self.global_batch, num_local=dp,
                               synced_copies=1)
        if num_micro < 2:
            return ("a pipeline with one replica and one micro-batch has one gradient per step; plan two or more "
                    "micro-batches or replicas to estimate the noise scale")
        return ProbeLayout(small_batch=self.global_batch // num_micro, big_batch=self.global_batch, num_local=1,
                           synced_copies=1)

    def set_batch(self, spec: BatchSpec) -> None:
        """Train with another global batch from the next step on (adaptive batch): the same number of micro-batches
        per replica, each of ``spec.micro_size`` samples. The schedule infers its stages' shapes again at the next
        step (torch's re-initialisation, collective over the pipeline: every rank changes at the same step)."""
        if spec.num_micro != self.num_micro or spec.global_size != spec.micro_size * spec.num_micro * self.rank.dp:
            raise PlaitError(f"a pipeline runs {self.num_micro} micro-batches per replica (its schedule's programs); "
                             f"batch {spec.global_size} = {spec.micro_size} x {spec.num_micro} x {self.rank.dp} replicas "
                             "cannot be applied in place")
        self.global_batch = spec.global_size
        if isinstance(self.rank, TokenPipelineRank):  # the same slices of each micro-batch's sequence
            self.rank.slicing = replica_slicing(self.rank.slicing[0][1], spec.micro_size, spec.num_micro)
            return
        for flag in ("_stage_forward_initialized", "_stage_backward_initialized", "_stages_forward_initialized",
                     "_stages_backward_initialized"):
            if hasattr(self.rank.schedule, flag):
                setattr(self.rank.schedule, flag, False)

    def attach_probe(self, probe: GradNormProbe) -> None:
        """Norm the stages' gradients before and after their data-parallel average (with one replica: after the
        first micro-batch's weight gradients and after the step)."""
        if isinstance(self.rank, TokenPipelineRank):
            raise PlaitError("the token pipeline takes no gradient-norm probe (see probe_layout)")
        if self.rank.dp > 1:
            self.rank.probe = probe
        else:
            self.rank.norm_first_micro_batch(probe)

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters this rank's stages hold (its optimizer's)."""
        return list(self.rank.params.values())

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear the stage's gradients before a step."""
        optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, global_batch: Sequence[torch.Tensor], loss_fn: Loss) -> torch.Tensor:
        """Run the schedule over this replica's share of ``global_batch``; this rank's share of the mean loss
        (the last stage's ranks hold it, scaled so that its mean over every rank is the batch's loss)."""
        batch = tuple(t.to(self.ctx.device) for t in global_batch)
        mixed = self.autocast_dtype is not None
        with torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype, enabled=mixed) if mixed else nullcontext():
            loss = self.rank.step(batch)
        if loss is None:
            return torch.zeros((), device=self.ctx.device)
        return loss.float() * (self.ctx.world_size / self.last_stage_ranks)

    def before_optimizer_step(self) -> None:
        """Nothing left to reduce: the step averaged the stage's gradients over its data-parallel ranks."""

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters and buffers on rank 0 ({} elsewhere), each from the stage that trains it. Collective."""
        model_sd, _ = self._stage_state(None)
        gathered = self._gather((model_sd, {}))
        return {k: v for sd, _ in gathered for k, v in sd.items()} if gathered else {}

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model and optimizer state keyed by parameter name, every stage's, on rank 0 ({} elsewhere). Collective."""
        gathered = self._gather(self._stage_state(optimizer))
        if not gathered:
            return {}, {}
        model_sd = {k: v for sd, _ in gathered for k, v in sd.items()}
        return model_sd, merge_optimizer_states([osd for _, osd in gathered if osd])

    def load_full_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load this stage's part of a full checkpoint (any plan's) into the model and optimizer."""
        mine = set(self.rank.params)
        set_state_dict(self.model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=optimizer_state_of(state["optimizer"], mine), options=FULL)

    def _stage_state(self, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """This stage's parameters (and optimizer state) as full CPU tensors; the stage's first rank keeps them."""
        optim_sd: dict[str, Any] = {}
        if optimizer is None:
            model_sd = get_model_state_dict(self.model, options=FULL)
        else:
            model_sd, optim_sd = get_state_dict(self.model, optimizer, options=FULL)
        owned = set(self.rank.params) | self._stage_buffers()
        keep = self.rank.replica == 0 and _tp_index(self.rank) == 0
        model_sd = {k: _cpu(v) for k, v in model_sd.items() if keep and k in owned}
        return model_sd, (_cpu(optim_sd) if keep else {})

    def _stage_buffers(self) -> set[str]:
        return {n for n, _ in self.model.named_buffers() if any(n.startswith(m + ".") for m in self.layers)}

    def _gather(self, mine: tuple[dict[str, Any], dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        out: list[Any] = [None] * self.ctx.world_size if self.ctx.is_main else []
        dist.gather_object(mine, out if self.ctx.is_main else None, dst=0)
        return list(out) if self.ctx.is_main else []


def apply_pipeline_plan(model: nn.Module, plan: Plan, ctx: DistContext, loss_fn: Loss) -> AppliedPipeline:
    """Build this rank's stages of ``plan`` (collective: every rank calls it at the same point)."""
    check_pipeline_plan(plan, ctx)
    check_plan_model(plan, model)
    model.to(ctx.device)
    if plan.schedule.is_token_sliced:
        return apply_token_pipeline_plan(model, plan, ctx, loss_fn)
    apply_recompute(model, [layer.name for layer in plan.layers if layer.recompute])
    mesh = plan.stages[0].stage_mesh
    dp, tp = mesh.axis_size("dp"), mesh.axis_size("tp")
    sharding = stage_sharding(plan) if tp > 1 else None
    passes = plan_passes(plan) if plan.schedule.kind in LIST_SCHEDULES else None
    rank = build_pipeline_rank(model, [s.layers for s in plan.stages], pp=plan.num_pipeline_ranks, dp=dp, tp=tp, sharding=sharding,
                               schedule=plan.schedule.kind, num_micro=plan.schedule.num_microbatches, loss=loss_fn,
                               device=ctx.device, passes=passes)
    return _applied(model, plan, ctx, rank)


def apply_token_pipeline_plan(model: nn.Module, plan: Plan, ctx: DistContext, loss_fn: Loss) -> AppliedPipeline:
    """This rank's stage of a token-sliced ``plan`` (checked by ``check_pipeline_plan``) on the token pipeline."""
    mesh, num_micro = plan.stages[0].stage_mesh, plan.schedule.num_microbatches
    dp, tp = mesh.axis_size("dp"), mesh.axis_size("tp")
    slicing = replica_slicing(plan.schedule.token_slices or (), plan.batch.global_size // (dp * num_micro), num_micro)
    rank = build_token_pipeline_rank(model, [s.layers for s in plan.stages], dp=dp, slicing=slicing, loss=loss_fn,
                                     device=ctx.device, tp=tp, sharding=stage_sharding(plan) if tp > 1 else None)
    return _applied(model, plan, ctx, rank)


def replica_slicing(cuts: Sequence[int], micro_size: int, num_micro: int) -> Slicing:
    """A replica's token slicing: ``num_micro`` micro-batches of ``micro_size`` sequences, each cut into ``cuts``."""
    return [(micro_size, [int(n) for n in cuts]) for _ in range(num_micro)]


def _applied(model: nn.Module, plan: Plan, ctx: DistContext, rank: PipelineRank | TokenPipelineRank) -> AppliedPipeline:
    return AppliedPipeline(model=model, rank=rank, ctx=ctx, layers=tuple(n for s in plan.stages_of(ctx.rank) for n in s.layers),
                           last_stage_ranks=len(plan.stages[-1].ranks), global_batch=plan.batch.global_size,
                           num_micro=plan.schedule.num_microbatches,
                           autocast_dtype=dtype_of(plan.precision.compute_dtype) if plan.precision.mixed else None)


def plan_passes(plan: Plan) -> list[list[Pass]]:
    """Each pipeline rank's passes (kind, micro-batch, virtual stage) in the order of its program: what it runs."""
    out: list[list[Pass]] = []
    for stage in plan.stages[:plan.num_pipeline_ranks]:
        instrs = plan.program_of(stage.ranks[0]).instrs
        out.append([(str(i.pass_kind), i.micro, i.stage) for i in instrs
                    if i.pass_kind is not None and i.micro is not None and i.stage is not None])
    return out


def check_pipeline_plan(plan: Plan, ctx: DistContext) -> None:
    """Raise ``PlanMismatchError`` naming what this runtime cannot run: world size, stage sizes, schedule, batch."""
    if plan.world_size != ctx.world_size:
        raise PlanMismatchError(f"the pipeline plan has {plan.world_size} ranks but the job has {ctx.world_size}; launch "
                                f"with --nproc {plan.world_size} or re-plan for {ctx.world_size} ranks")
    meshes = {s.stage_mesh for s in plan.stages}
    if len(meshes) != 1:
        raise PlanMismatchError("the plan's stages have submeshes of different sizes, which plait's pipeline runtime does "
                                "not run yet; re-plan with stages of one size (PipelineOptions(same_size=True))")
    (mesh,) = meshes
    if set(mesh.axes) - {"dp", "tp"}:
        raise PlanMismatchError(f"stage mesh axes {mesh.axes}: the pipeline runtime knows dp and tp")
    pp = plan.num_pipeline_ranks
    expected = [tuple(range((i % pp) * mesh.size, (i % pp + 1) * mesh.size)) for i in range(len(plan.stages))]
    if [s.ranks for s in plan.stages] != expected:
        raise PlanMismatchError("stage s must hold ranks (s % pp) * size .. (s % pp + 1) * size - 1 (the pp x dp mesh, "
                                "model chunks round-robin); re-run `plait plan`")
    if plan.schedule.is_token_sliced:
        check_token_plan(plan, ctx.device)
    if plan.schedule.kind not in (*SCHEDULES, *LIST_SCHEDULES):
        raise PlanMismatchError(f"schedule {plan.schedule.kind!r}: a pipeline plan runs one of "
                                f"{', '.join((*SCHEDULES, *LIST_SCHEDULES))}")
    batch, dp = plan.batch, mesh.axis_size("dp")
    if batch.global_size % (dp * plan.schedule.num_microbatches):
        raise PlanMismatchError(f"global batch {batch.global_size} does not split into {dp} replicas x "
                                f"{plan.schedule.num_microbatches} micro-batches; re-run `plait plan`")
    check_optimizer_of(plan)


def check_token_plan(plan: Plan, device: torch.device) -> None:
    """Raise ``PlanMismatchError`` naming what the token pipeline cannot run of a token-sliced plan on ``device``."""
    cuts = list(plan.schedule.token_slices or ())
    if device.type != "cpu":
        raise PlanMismatchError(f"the plan cuts sequences into token slices {cuts}; plait's token pipeline runs on CPU "
                                f"(gloo) ranks for now, not {device.type}: re-plan with --no-token-slicing")
    way_out = "re-plan (`plait plan` offers token slicing on stages it can run) or plan without token slicing (--no-token-slicing)"
    if len(plan.stages) > plan.num_pipeline_ranks:
        raise PlanMismatchError(f"the plan cuts sequences into token slices {cuts} on {len(plan.stages)} model chunks "
                                f"over {plan.num_pipeline_ranks} pipeline ranks; the token pipeline runs one stage per "
                                f"rank: {way_out}")
    if any(s.recompute for s in plan.stages) or any(layer.recompute for layer in plan.layers):
        raise PlanMismatchError(f"the plan cuts sequences into token slices {cuts} and recomputes activations, which "
                                f"the token pipeline does not do yet; {way_out}")
    if any(int(n) < 1 for n in cuts):
        raise PlanMismatchError(f"token slices {cuts}: every slice needs at least one token; re-run `plait plan`")


def optimizer_state_of(state: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The part of a full optimizer state dict (keyed by parameter name) that covers ``names``."""
    groups = []
    for group in state.get("param_groups", []):
        params = [n for n in group["params"] if n in names]
        if params:
            groups.append({**group, "params": params})
    return {"state": {n: s for n, s in state.get("state", {}).items() if n in names}, "param_groups": groups}


def merge_optimizer_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer state dict from the stages' (each keyed by its parameters' names)."""
    merged: dict[str, Any] = {"state": {}, "param_groups": []}
    for state in states:
        merged["state"].update(state.get("state", {}))
        for group in state.get("param_groups", []):
            same = next((g for g in merged["param_groups"] if _hyper(g) == _hyper(group)), None)
            if same is None:
                merged["param_groups"].append({**group, "params": list(group["params"])})
            else:
                same["params"] += [n for n in group["params"] if n not in same["params"]]
    return merged


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def stage_sharding(plan: Plan) -> StageSharding:
    """The stages' placements and pins on their ``tp`` axis, from the plan's (on each stage's ``dp x tp`` mesh)."""
    tp = plan.stages[0].stage_mesh.axes.index("tp")
    placements = {p.name: (p.placements[tp],) for p in plan.params}
    pins = [Pin(a.module, a.port, a.index, (a.placements[tp],)) for a in plan.activations]
    boundaries = [Boundary(sent=(s.send_placements[tp],)) if s.send_placements else Boundary() for s in plan.stages[:-1]]
    return StageSharding(placements=placements, pins=pins, boundaries=boundaries)


def _tp_index(rank: PipelineRank | TokenPipelineRank) -> int:
    coords = rank.mesh.get_coordinate() if rank.mesh is not None else None
    return coords[2] if coords and len(coords) > 2 else 0  # a token pipeline without tp: a (pp, dp) mesh


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(v) for v in value)
    return value
