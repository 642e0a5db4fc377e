"""Run a model as pipeline stages with ``torch.distributed.pipelining``, data-parallel inside each stage.

The model's layers (its layer view's modules, in order) are cut into virtual stages; virtual stage ``s`` runs on
physical stage ``s % pp`` (interleaved schedules put several on one rank). Physical stage ``p`` holds ranks
``p * dp .. p * dp + dp - 1``; pipeline replica ``j`` is ranks ``{p * dp + j}`` and trains on the ``j``-th
slice of the global batch, split into micro-batches by torch's schedule, which also divides the gradients by
the number of micro-batches. After the schedule's step the ranks of each stage average their gradients.

A stage runs its layers as a chain (each takes the previous one's output), so the model's forward must be
that chain: true of plait's zoo GPTs and MLPs. The loss must call the model once on the batch's first
element (``loss(model, (inputs, targets))``), as the zoo's losses do: the last stage applies it to its output.

With ``tp > 1`` (or a ``StageSharding``) each stage's ranks also form a tensor-parallel submesh: the job's mesh is
``(pp, dp, tp)`` with axes ``("pp", "dp", "tp")`` (rank ``(p * dp + j) * tp + k``), the stages' layers get DTensor
placements on ``tp`` and the boundary tensors cross as local pieces (``plait.runtime.pipeline_tp``). After the
schedule, gradients that DTensor left as pending sums over ``tp`` are reduced, then the ``dp`` average runs.

A ``GradNormProbe`` on the rank (adaptive training) norms the stage's gradients just before that average (the
flat buffer it already makes, or, with ``tp``, the DTensor gradients, shares counted once) and, after it,
this replica's ``1/dp`` share of them (a slice of the flat buffer, or every ``dp``-th DTensor gradient).
With one replica (``dp == 1``) there is no average; ``norm_first_micro_batch`` then norms each stage's
gradients after its first weight-gradient pass of the step (one micro-batch's) and the whole step's after
the schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from plait.adaptive.gradnorms import GradNormProbe, placed_grads
from plait.errors import PlaitError
from plait.runtime.pipeline_buffers import LazyRecvStage
from plait.runtime.pipeline_lists import Pass, list_runner
from plait.runtime.pipeline_tp import StageSharding, check_stage_sharding, tensor_parallel_stage
from plait.runtime.tensor_parallel import reduce_grads_to_placements

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}
LIST_SCHEDULES = ("zero-bubble",)  # run from plait's pass lists (``passes``)
Loss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


class ChainStage(nn.Module):
    """Layers of a model run one after another; it owns only its layers (torch's schedule scales the
    gradients of every parameter a stage module holds, so two stages on a rank must not share one)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        missing = [n for n in names if not _has_module(model, n)]
        if missing:
            raise PlaitError(f"the model has no module {missing[0]!r}; a stage names modules of the layer view")
        self.names = tuple(names)
        self.layers = nn.ModuleList(model.get_submodule(n) for n in names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each layer on the previous one's output."""
        for layer in self.layers:
            x = layer(x)
        return x


class _Output(nn.Module):
    """Stands in for the model inside the user's loss on the last stage: returns the stage's output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any) -> torch.Tensor:
        return self.output


@dataclass
class PipelineRank:
    """What one rank runs: its stages under a schedule, its parameters, the job's mesh and its place in it."""

    schedule: Any
    stages: list[PipelineStage]
    params: dict[str, nn.Parameter]
    replica: int
    dp: int
    first: bool
    last: bool
    dp_group: Any
    mesh: DeviceMesh | None = None  # (pp, dp, tp) with axes ("pp", "dp", "tp")
    tensor_parallel: bool = False  # the stages' parameters are DTensors on the tp axis
    probe: GradNormProbe | None = None  # adaptive training: norms before and after the dp average
    first_micro: bool = False  # the probe's local norm is each stage's first micro-batch gradient (dp == 1)
    _normed: set[int] = field(default_factory=set, init=False, repr=False)  # stages whose first micro-batch was normed this step

    def step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """Forward and backward of this replica's slice of the global ``batch`` (gradients accumulate into
        the stage parameters and are averaged over the stage's ranks); the mean loss on the last stage."""
        inputs, targets = (t.chunk(self.dp)[self.replica] for t in batch[:2])
        losses: list[torch.Tensor] = []
        self._normed.clear()
        if self.first and self.last:
            self.schedule.step(inputs, target=targets, losses=losses, return_outputs=False)
        elif self.first:
            self.schedule.step(inputs, return_outputs=False)
        elif self.last:
            self.schedule.step(target=targets, losses=losses, return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)
        if self.tensor_parallel:
            for stage in self.stages:
                reduce_grads_to_placements(stage.submod)
        if self.dp > 1:
            self._average_over_dp()
        elif self.probe is not None and self.first_micro:
            self.probe.add_synced(placed_grads(self.params.values()))
        return torch.stack(losses).mean().detach() if losses else None

    def norm_first_micro_batch(self, probe: GradNormProbe) -> None:
        """Norm each stage's gradients after its first weight-gradient pass of a step, and the step's after it."""
        self.probe, self.first_micro = probe, True
        for stage in self.stages:
            self._wrap_backward(stage)

    def _wrap_backward(self, stage: PipelineStage) -> None:
        """Make the stage's full-backward and weight-gradient passes call ``_after_weight_grads`` (the schedule calls
        them through the stage object, so instance attributes take effect)."""
        full, weight = stage.backward_one_chunk, stage.backward_weight_one_chunk

        def backward_one_chunk(bwd_chunk_id: int, loss: Any = None, full_backward: bool = True,
                               last_backward: bool = False) -> Any:
            out = full(bwd_chunk_id, loss=loss, full_backward=full_backward, last_backward=last_backward)
            if full_backward:
                self._after_weight_grads(stage)
            return out

        def backward_weight_one_chunk(bwd_chunk_id: int, last_backward: bool = False) -> Any:
            out = weight(bwd_chunk_id, last_backward=last_backward)
            self._after_weight_grads(stage)
            return out

        stage.backward_one_chunk = backward_one_chunk  # type: ignore[method-assign]
        stage.backward_weight_one_chunk = backward_weight_one_chunk  # type: ignore[method-assign]

    def _after_weight_grads(self, stage: PipelineStage) -> None:
        """After a stage's first weight-gradient pass in a step its gradients are one micro-batch's: norm them."""
        if self.probe is None or stage.stage_index in self._normed:
            return
        self._normed.add(stage.stage_index)
        self.probe.add_local(placed_grads(stage.submod.parameters()))

    def _average_over_dp(self) -> None:
        """One all-reduce per dtype over the stage's gradients (their local pieces), flattened together."""
        placed = [p.grad for p in self.params.values() if p.grad is not None]
        grads = [g.to_local() if isinstance(g, DTensor) else g for g in placed]  # to_local shares the memory
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        flat_probe = None if self.tensor_parallel else self.probe  # norms the flat buffers; with tp, the DTensors
        if self.probe is not None and self.tensor_parallel:
            self.probe.add_local(placed)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([g.reshape(-1) for g in group])
                if flat_probe is not None:
                    flat_probe.add_local([flat])
                dist.all_reduce(flat, group=self.dp_group)
                flat.div_(self.dp)
                if flat_probe is not None:  # every replica holds the average: each norms its slice
                    flat_probe.add_synced([torch.tensor_split(flat, self.dp)[self.replica]])
                for g, piece in zip(group, flat.split([g.numel() for g in group]), strict=True):
                    g.copy_(piece.view_as(g))
        if self.probe is not None and self.tensor_parallel:
            self.probe.add_synced(placed[self.replica :: self.dp])


def build_pipeline_rank(model: nn.Module, stage_layers: Sequence[Sequence[str]], *, pp: int, dp: int, schedule: str,
                        num_micro: int, loss: Loss, device: torch.device | None = None, tp: int | Sequence[int] = 1,
                        sharding: StageSharding | None = None, passes: Sequence[Sequence[Pass]] | None = None,
                        ) -> PipelineRank:
    """This rank's part of the pipeline (``stage_layers[s]``: the module names of virtual stage ``s``; ``tp``: the
    tensor-parallel size of every stage, ``sharding``: placements there; ``passes[r]``: the pass list pipeline rank
    ``r`` runs, required by ``zero-bubble``); every rank must call it at the same point, since it makes the
    process groups."""
    world = dist.get_world_size()
    if tp != 1 and sharding is None:
        sharding = StageSharding()
    tp_size = check_stage_sharding(sharding, stage_layers, tp, model) if sharding is not None else 1
    check_pipeline_layout(stage_layers, pp=pp, dp=dp, world=world, schedule=schedule, num_micro=num_micro, tp=tp_size,
                          passes=passes)
    device = device or torch.device("cpu")
    mesh = init_device_mesh(device.type, (pp, dp, tp_size), mesh_dim_names=("pp", "dp", "tp"))
    stage, replica, _ = mesh.get_coordinate() or (0, 0, 0)
    virtual = len(stage_layers)
    mine = [s for s in range(virtual) if s % pp == stage]
    modules: list[nn.Module] = []
    for s in mine:
        chain = ChainStage(model, stage_layers[s])
        modules.append(chain if sharding is None else tensor_parallel_stage(chain, mesh["tp"], sharding, s, virtual))
    stages: list[PipelineStage] = [LazyRecvStage(m, s, virtual, device, group=mesh.get_group("pp")) for m, s in zip(modules, mine, strict=True)]
    names = {n for s in mine for n in stage_layers[s]}
    params = {n: p for n, p in model.named_parameters() if any(n.startswith(m + ".") for m in names)}

    def output_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(_Output(output), (output, target))

    if passes is not None:
        runner = list_runner(stages, num_micro, output_loss, passes)
    else:
        multi = SCHEDULES[schedule] is ScheduleInterleaved1F1B
        runner = SCHEDULES[schedule](stages if multi else stages[0], num_micro, loss_fn=output_loss)
    return PipelineRank(schedule=runner, stages=stages, params=params, replica=replica, dp=dp, first=0 in mine,
                        last=virtual - 1 in mine, dp_group=mesh.get_group("dp"), mesh=mesh,
                        tensor_parallel=sharding is not None)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def check_pipeline_layout(stage_layers: Sequence[Sequence[str]], *, pp: int, dp: int, world: int, schedule: str,
                          num_micro: int, tp: int = 1, passes: Sequence[Sequence[Pass]] | None = None) -> None:
    """Raise ``PlaitError`` naming what does not fit: schedule, ranks, stages per rank, micro-batches, pass lists."""
    if schedule in LIST_SCHEDULES:
        if passes is None or len(passes) != pp:
            raise PlaitError(f"schedule {schedule!r} runs from the plan's pass lists: give one list per pipeline rank ({pp})")
        schedule = "1f1b"  # one stage per rank, as 1F1B (the rest of the checks)
    if schedule not in SCHEDULES:
        raise PlaitError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join((*SCHEDULES, *LIST_SCHEDULES))}")
    if pp * dp * tp != world:
        ways = f"{dp} data-parallel" + (f" x {tp} tensor-parallel" if tp > 1 else "")
        raise PlaitError(f"{pp} stages x {ways} ranks need {pp * dp * tp} ranks, the job has {world}")
    virtual = len(stage_layers)
    if virtual % pp or (virtual > pp and schedule != "interleaved-1f1b") or (virtual == pp and schedule == "interleaved-1f1b"):
        raise PlaitError(f"{virtual} stages on {pp} ranks: gpipe and 1f1b need one stage per rank, interleaved-1f1b "
                         f"a multiple (at least 2) of the ranks")
    if any(not layers for layers in stage_layers):
        raise PlaitError("every pipeline stage needs at least one layer")
    if num_micro < 1 or (schedule == "interleaved-1f1b" and num_micro % pp):
        raise PlaitError(f"{num_micro} micro-batches: need at least 1 (a multiple of the {pp} ranks for interleaved-1f1b)")
