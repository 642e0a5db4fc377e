"""Full (unsharded) model/optimizer state, RNG states and rank 0's outcomes across ranks, for checkpoints.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict`` with full state dicts
keyed by parameter name, so a checkpoint taken by one plan kind or world size loads into another.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from plait.errors import PlaitError
from plait.fileio import atomic_write
from plait.runtime.context import DistContext

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL = StateDictOptions(full_state_dict=True)
T = TypeVar("T")


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (CPU tensors); {} on other ranks. Collective."""
    state = get_model_state_dict(model, options=FULL_ON_RANK0)
    return {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state, unsharded and keyed by parameter name, on rank 0. Collective."""
    return get_state_dict(model, optimizer, options=FULL_ON_RANK0)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full checkpoint state (read on every rank) into the rank's (possibly sharded) model and optimizer."""
    if not optimizer.state:
        # torch initialises empty optimizer state only when no gradient exists; WFBP keeps gradients
        # as bucket views, so drop them here (the next zero_grad re-attaches the views)
        optimizer.zero_grad(set_to_none=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=FULL)


def broadcast_value(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.device.type == "cuda" else None)
    return box[0]


def run_on_main(fn: Callable[[], T], ctx: DistContext, *, what: str) -> T:
    """``fn()`` on rank 0 and its value on every rank; if it raises, every rank raises the same PlaitError.

    Collective: the other ranks wait for rank 0's outcome here instead of hanging in their next collective
    until the process group's timeout (a launcher such as torchrun does not stop them).
    """
    outcome: tuple[str | None, T | None] = (None, None)
    cause: Exception | None = None
    if ctx.is_main:
        try:
            outcome = (None, fn())
        except Exception as exc:
            detail = str(exc) if isinstance(exc, PlaitError) else f"{type(exc).__name__}: {exc}"
            outcome, cause = (f"{what} failed on rank 0: {detail}", None), exc
    error, value = broadcast_value(outcome, ctx)
    if error is not None:
        raise PlaitError(error) from cause
    return value


def seed_rank(seed: int, *, step: int, rank: int) -> None:
    """Seed this rank's generators from (seed, step, rank): distinct per rank, reproducible per step."""
    mixed = (seed * 1_000_003 + step) * 4099 + rank + 1
    torch.manual_seed(mixed)
    random.seed(mixed)


def rng_state(ctx: DistContext) -> dict[str, Any]:
    """This rank's random generator states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def gather_rng(ctx: DistContext) -> list[dict[str, Any]] | None:
    """Every rank's generator states, in rank order, on rank 0 (None elsewhere). Collective."""
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, rng_state(ctx))
    return states if ctx.is_main else None


def restore_rng(states: list[dict[str, Any]] | None, ctx: DistContext, *, seed: int, step: int) -> int:
    """Give each rank back its saved generator states; reseed instead when the world size changed.

    ``states`` is the checkpoint's list, one entry per rank of the run that wrote it. Returns that run's
    world size.
    """
    saved_world = len(states) if states else 0
    if states and saved_world == ctx.world_size:
        mine = states[ctx.rank]
        torch.set_rng_state(mine["torch"])
        random.setstate(mine["python"])
        if "cuda" in mine and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], ctx.device)
    else:
        seed_rank(seed, step=step, rank=ctx.rank)
    return saved_world


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically (see ``plait.fileio.atomic_write``)."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    atomic_write(path, buf.getvalue())
