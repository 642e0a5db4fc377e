"""Shared pieces of the runtime.sync tests (no tests here): a tiny MLP, its data, a single-process reference
and a rank loop that trains it with per-parameter SyncSpecs through ``build_model_sync``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from plait.plan.ir import SyncSpec
from plait.runtime import init_distributed, teardown
from plait.runtime.sync import ModelSync, build_model_sync

WORLD = 4
GLOBAL_BATCH = 16  # K = 4 rows per worker
IN, HIDDEN, OUT = 16, 32, 8
OptFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Net(nn.Module):
    """Three Linear layers (16 -> 32 -> 32 -> 8) with tanh between them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def build_net(seed: int = 0) -> Net:
    """The same initial parameters in every process."""
    torch.manual_seed(seed)
    return Net()


def batch(step: int, size: int = GLOBAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: inputs and a fixed smooth target, the same for every rank and the reference."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, IN, generator=gen)
    target = torch.sin(x[:, :OUT]) + 0.5 * x[:, OUT:].mean(dim=1, keepdim=True)
    return x, target


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return ((model(x) - y) ** 2).mean()


def reference(steps: int, make_opt: OptFactory) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process over the whole global batch: every step's loss and the final parameters."""
    model = build_net()
    opt = make_opt(model.parameters())
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of(model, *batch(step))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def local_rows(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the global batch."""
    x, y = batch(step)
    k = x.shape[0] // world
    return x[rank * k : (rank + 1) * k], y[rank * k : (rank + 1) * k]


Inspect = Callable[[ModelSync], dict[str, Any]]


def train_scenario(specs: Mapping[str, SyncSpec], steps: int, make_opt: OptFactory, inspect: Inspect | None = None,
                   num_micro: int = 1) -> dict[str, Any]:
    """One rank (process group already up): train with ``specs`` (``num_micro`` micro-batches per step, all but the
    last in ``no_sync()``); losses, final state, bytes per step, and what ``inspect(sync)`` returns at the end."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_net()
    sync = build_model_sync(model, specs, optimizer_fn=make_opt)
    local = sync.local_parameters()
    opt = make_opt(local) if local else None  # every parameter on a server: nothing for a local optimizer
    losses, step_bytes = [], []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        x, y = local_rows(step, rank, world)
        total = torch.zeros(())
        for j, (xm, ym) in enumerate(zip(x.chunk(num_micro), y.chunk(num_micro), strict=True)):
            with sync.no_sync() if j < num_micro - 1 else nullcontext():
                loss = loss_of(model, xm, ym) / num_micro
                loss.backward()
            total += loss.detach()
        sync.finish()
        if opt is not None:
            opt.step()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        step_bytes.append(sync.step_bytes())
    seen = inspect(sync) if inspect is not None else {}
    sync.close()
    per_step = [sync.step_bytes(s) for s in range(steps)]  # exact now that every message is done
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "state": state, "bytes": per_step, "live_bytes": step_bytes, **seen}


def run_scenarios(scenarios: Mapping[str, Mapping[str, SyncSpec]], steps: int, make_opt: OptFactory,
                  inspect: Inspect | None = None, num_micro: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Rank entry point: every scenario in turn on one process group."""
    init_distributed()
    try:
        micro = num_micro or {}
        out = {name: train_scenario(specs, steps, make_opt, inspect, micro.get(name, 1)) for name, specs in scenarios.items()}
        dist.barrier()
        return out
    finally:
        teardown()


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter's shape."""
    return {n: tuple(p.shape) for n, p in build_net().named_parameters()}


def specs_all(kind: str, **fields: Any) -> dict[str, SyncSpec]:
    """The same SyncSpec for every parameter."""
    return {n: SyncSpec(kind=kind, axes=("dp",), **fields) for n in param_shapes()}  # type: ignore[arg-type]
