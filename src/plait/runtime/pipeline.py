"""Run a model as pipeline stages with ``torch.distributed.pipelining``, data-parallel inside each stage.

The model's layers (its layer view's modules, in order) are cut into virtual stages; virtual stage ``s`` runs on
physical stage ``s % pp`` (interleaved schedules put several on one rank). Physical stage ``p`` holds ranks
``p * dp .. p * dp + dp - 1``; pipeline replica ``j`` is ranks ``{p * dp + j}`` and trains on the ``j``-th
slice of the global batch, split into micro-batches by torch's schedule, which also divides the gradients by
the number of micro-batches. After the schedule's step the ranks of each stage average their gradients.

A stage runs its layers as a chain (each takes the previous one's output), so the model's forward must be
that chain: true of plait's zoo GPTs and MLPs. The loss must call the model once on the batch's first
element (``loss(model, (inputs, targets))``), as the zoo's losses do: the last stage applies it to its output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from plait.errors import PlaitError

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}
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
    """What one rank runs: its stages under a schedule, its parameters and its data-parallel group."""

    schedule: Any
    stages: list[PipelineStage]
    params: dict[str, nn.Parameter]
    replica: int
    dp: int
    first: bool
    last: bool
    dp_group: Any

    def step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """Forward and backward of this replica's slice of the global ``batch`` (gradients accumulate into
        the stage parameters and are averaged over the stage's ranks); the mean loss on the last stage."""
        inputs, targets = (t.chunk(self.dp)[self.replica] for t in batch[:2])
        losses: list[torch.Tensor] = []
        if self.first and self.last:
            self.schedule.step(inputs, target=targets, losses=losses)
        elif self.first:
            self.schedule.step(inputs)
        elif self.last:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        if self.dp > 1:
            for p in self.params.values():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)
                    p.grad.div_(self.dp)
        return torch.stack(losses).mean().detach() if losses else None


def build_pipeline_rank(model: nn.Module, stage_layers: Sequence[Sequence[str]], *, pp: int, dp: int, schedule: str,
                        num_micro: int, loss: Loss, device: torch.device | None = None) -> PipelineRank:
    """This rank's part of the pipeline (``stage_layers[s]``: the module names of virtual stage ``s``); every
    rank must call it at the same point, since it makes the process groups."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_pipeline_layout(stage_layers, pp=pp, dp=dp, world=world, schedule=schedule, num_micro=num_micro)
    device = device or torch.device("cpu")
    stage, replica = divmod(rank, dp)
    pp_group = dp_group = None
    for j in range(dp):  # every rank makes every group, in the same order
        group = dist.new_group([p * dp + j for p in range(pp)])
        pp_group = group if j == replica else pp_group
    for p in range(pp):
        group = dist.new_group(list(range(p * dp, (p + 1) * dp)))
        dp_group = group if p == stage else dp_group
    virtual = len(stage_layers)
    mine = [s for s in range(virtual) if s % pp == stage]
    stages = [PipelineStage(ChainStage(model, stage_layers[s]), s, virtual, device, group=pp_group) for s in mine]
    names = {n for s in mine for n in stage_layers[s]}
    params = {n: p for n, p in model.named_parameters() if any(n.startswith(m + ".") for m in names)}

    def output_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(_Output(output), (output, target))

    multi = SCHEDULES[schedule] is ScheduleInterleaved1F1B
    runner = SCHEDULES[schedule](stages if multi else stages[0], num_micro, loss_fn=output_loss)
    return PipelineRank(schedule=runner, stages=stages, params=params, replica=replica, dp=dp,
                        first=0 in mine, last=virtual - 1 in mine, dp_group=dp_group)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def check_pipeline_layout(stage_layers: Sequence[Sequence[str]], *, pp: int, dp: int, world: int, schedule: str,
                          num_micro: int) -> None:
    """Raise ``PlaitError`` naming what does not fit: schedule, ranks, stages per rank, micro-batches."""
    if schedule not in SCHEDULES:
        raise PlaitError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if pp * dp != world:
        raise PlaitError(f"{pp} stages x {dp} data-parallel ranks need {pp * dp} ranks, the job has {world}")
    virtual = len(stage_layers)
    if virtual % pp or (virtual > pp and schedule != "interleaved-1f1b") or (virtual == pp and schedule == "interleaved-1f1b"):
        raise PlaitError(f"{virtual} stages on {pp} ranks: gpipe and 1f1b need one stage per rank, interleaved-1f1b "
                         f"a multiple (at least 2) of the ranks")
    if any(not layers for layers in stage_layers):
        raise PlaitError("every pipeline stage needs at least one layer")
    if num_micro < 1 or (schedule == "interleaved-1f1b" and num_micro % pp):
        raise PlaitError(f"{num_micro} micro-batches: need at least 1 (a multiple of the {pp} ranks for interleaved-1f1b)")
